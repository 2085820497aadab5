//! Speed and memory of one GRPO trainer step on a real model.
//!
//! `cargo bench --bench train [-- MODEL.gguf] [--group G] [--prompt P] [--completion T]
//! [--steps S]`
//! (default: SmolLM2-135M Q4_1, one group of 8 completions of 96 tokens after an
//! 80-token prompt, rank-8 LoRA on every module). It reports the step time split into the
//! forward/backward and the optimizer with the hand-off, trained tokens per second, and the
//! peak resident memory, which is what bounds the micro-batch on a small machine.

use std::sync::Arc;
use std::time::Instant;

use verity::model::{LoraAdapter, LoraSpec, LoraTarget};
use verity::train::{Rollout, TrainConfig, Trainer};
use verity::{LoadOptions, Model};

/// Peak resident set size of this process so far, in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() {
    verity::pin_thread_count();
    let path = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".gguf") || std::path::Path::new(a).is_dir())
        .unwrap_or_else(|| verity::runtime::DEFAULT_MODEL.into());
    let (group, prompt_len, completion_len, steps) = (
        arg("--group", 8),
        arg("--prompt", 80),
        arg("--completion", 96),
        arg("--steps", 4).max(2),
    );
    let model = match Model::load(&path, &LoadOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot load {path}: {e} (run models/fetch.sh)");
            std::process::exit(1);
        }
    };
    let t = &model.transformer;
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter =
        Arc::new(LoraAdapter::new(model.config(), spec, t.dtype(), t.device()).expect("adapter"));
    let text = model
        .tokenizer
        .encode("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. ", false)
        .expect("tokenize");
    let tokens = |offset: usize, n: usize| -> Vec<u32> {
        text.iter().cycle().skip(offset).take(n).copied().collect()
    };
    let prompt = tokens(0, prompt_len);
    // Completions of different lengths (as real groups have), rewards alternating.
    let rollouts: Vec<Rollout> = (0..group)
        .map(|i| {
            let len = completion_len - (i * completion_len / (4 * group.max(1)));
            Rollout {
                group: 0,
                prompt: prompt.clone(),
                completion: tokens(i + 1, len),
                decode_logprobs: vec![-1.0; len],
                adapter_version: 0,
                reward: (i % 2) as f64,
            }
        })
        .collect();
    let tokens_per_step: usize = rollouts.iter().map(|r| r.completion.len()).sum();
    let mut trainer = Trainer::new(adapter, TrainConfig::default());
    println!(
        "model: {path}; {group} completions of ≤{completion_len} tokens after a {prompt_len}-token prompt; micro-batch {}",
        trainer.config.micro_batch
    );
    let rss_loaded = peak_rss_mib();
    let mut times = Vec::new();
    for step in 0..steps {
        let start = Instant::now();
        let report = trainer.step(t, &rollouts).expect("step");
        let total = start.elapsed().as_secs_f64();
        let handoff = report.handoff_time.as_secs_f64();
        println!(
            "step {step}: {total:.2} s ({:.0} trained tokens/s), hand-off {:.0} µs, loss {:+.4}{}",
            tokens_per_step as f64 / total,
            handoff * 1e6,
            report.loss,
            if step == 0 {
                "  (first: builds the dense weights)"
            } else {
                ""
            }
        );
        if step > 0 {
            times.push(total);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median step {median:.2} s, {:.0} trained tokens/s; peak RSS {:.0} MiB ({:.0} MiB after loading)",
        tokens_per_step as f64 / median,
        peak_rss_mib(),
        rss_loaded
    );
}
