//! `verity bench train`: GRPO steps of the runtime's learning adapter on synthetic rollouts
//! (`--prompts` groups of `--group` completions, rewards alternating 0/1 within each group
//! so that every group carries signal), through `Runtime::train_on`: the trainer the `rl`
//! harness and the server use, on the runtime's device, ending in the snapshot hand-off to
//! the decoder. Reports each step's wall time and hand-off time; `--save-peft` writes the
//! trained adapter as a PEFT folder (for a round trip through the `peft` package).
//!
//! No decoding happens here: rollout generation is what `bench decode` measures.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use verity::runtime::LoraSettings;
use verity::train::{AdamWConfig, Rollout, Schedule, TrainConfig};

use super::write_json;
use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts (groups) per step.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens per completion.
    #[arg(long, default_value_t = 256)]
    completion_tokens: usize,
    /// LoRA rank (on every linear module).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Sequences per forward/backward pass.
    #[arg(long, default_value_t = 8)]
    micro_batch: usize,
    /// Learning rate (constant: no warm-up; large values make the adapter's effect on the
    /// logits large enough to check a saved adapter against).
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Steps to run (the first includes one-time costs; the report's `step_seconds` is the
    /// median of the others when there are any).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Write the trained adapter here as a PEFT folder.
    #[arg(long)]
    save_peft: Option<PathBuf>,
    /// Also write the measured numbers to this JSON file (rewritten after every step).
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), String> {
    if args.prompts == 0
        || args.group < 2
        || args.prompt_tokens == 0
        || args.completion_tokens == 0
        || args.steps == 0
    {
        return Err(
            "--prompts, --prompt-tokens, --completion-tokens and --steps must be positive, \
             --group at least 2 (GRPO learns from differences within a group)"
                .into(),
        );
    }
    let mut config = args.model.config();
    config.lora = LoraSettings {
        rank: args.rank,
        alpha: args.alpha,
        ..LoraSettings::default()
    };
    config.train = TrainConfig {
        optimizer: AdamWConfig {
            lr: args.lr,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            ..Default::default()
        },
        micro_batch: args.micro_batch.max(1),
        max_completion_len: args.completion_tokens,
        ..Default::default()
    };
    let runtime = ModelArgs::build(config)?;
    let model = runtime.model();
    let text = model
        .tokenizer
        .encode(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May? ",
            false,
        )
        .map_err(|e| e.to_string())?;
    if text.is_empty() {
        return Err("the tokenizer encodes the sample text to no tokens".into());
    }
    let tokens = |offset: usize, n: usize| -> Vec<u32> {
        text.iter().cycle().skip(offset).take(n).copied().collect()
    };
    let version = runtime.learning_adapter().version();
    let rollouts: Vec<Rollout> = (0..args.prompts)
        .flat_map(|p| {
            let prompt = tokens(p, args.prompt_tokens);
            (0..args.group).map(move |i| (p, i, prompt.clone()))
        })
        .map(|(p, i, prompt)| Rollout {
            group: p,
            prompt,
            completion: tokens(p * args.group + i + 1, args.completion_tokens),
            decode_logprobs: vec![-1.0; args.completion_tokens],
            adapter_version: version,
            reward: (i % 2) as f64,
        })
        .collect();
    let mut report = json!({
        "model": model.path.display().to_string(),
        "device": runtime.device(),
        "dtype": format!("{:?}", model.transformer.dtype()).to_lowercase(),
        "prompts": args.prompts,
        "group": args.group,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": "all linear modules",
        "micro_batch": args.micro_batch.max(1),
        "lr": args.lr,
        "steps": [],
    });
    let save = |report: &serde_json::Value| match &args.json {
        Some(path) => write_json(path, report),
        None => Ok(()),
    };
    println!(
        "GRPO steps on {}: {} prompts × {} completions × {} tokens after {}-token prompts, LoRA rank {} on every linear module",
        runtime.device(),
        args.prompts,
        args.group,
        args.completion_tokens,
        args.prompt_tokens,
        args.rank
    );
    let mut times = Vec::new();
    for step in 0..args.steps {
        let start = Instant::now();
        let r = runtime.train_on(&rollouts).map_err(|e| e.to_string())?;
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "  step {}: {seconds:.2} s ({:.0} trained tokens/s), hand-off {:.0} µs, loss {:+.4}{}",
            step + 1,
            r.tokens as f64 / seconds,
            r.handoff_time.as_secs_f64() * 1e6,
            r.loss,
            r.skipped
                .as_ref()
                .map(|s| format!("  [skipped: {s}]"))
                .unwrap_or_default()
        );
        report["steps"].as_array_mut().unwrap().push(json!({
            "seconds": seconds,
            "handoff_seconds": r.handoff_time.as_secs_f64(),
            "applied": r.applied,
            "skipped": r.skipped,
            "loss": r.loss,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "version": r.version,
        }));
        if step > 0 || args.steps == 1 {
            times.push(seconds);
        }
        times.sort_by(f64::total_cmp);
        report["step_seconds"] = json!(times.get(times.len() / 2));
        save(&report)?;
    }
    if let Some(dir) = &args.save_peft {
        let adapter = runtime.learning_adapter();
        verity::adapter::save_peft(
            &adapter,
            model.config(),
            dir,
            &model.path.display().to_string(),
        )
        .map_err(|e| format!("--save-peft: {e}"))?;
        report["peft_dir"] = json!(dir.display().to_string());
        report["adapter_version"] = json!(adapter.version());
        save(&report)?;
        println!(
            "adapter (version {}) saved to {}",
            adapter.version(),
            dir.display()
        );
    }
    Ok(())
}
