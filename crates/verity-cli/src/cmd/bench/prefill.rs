//! `verity bench prefill`: prompt tokens/s, the time from submitting a prompt to its first
//! new token (like llama.cpp's `llama-bench -p N -n 0`), through the runtime, best of
//! `--repeats`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use verity::engine::{Prompt, Request};
use verity::runtime::BASE_ADAPTER;
use verity::GenerateRequest;

use super::decode::gsm8k_prompt;
use super::{parse_list, write_json};
use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths to measure, in tokens (the GSM8K prompt's tokens repeated or cut).
    #[arg(long, default_value = "512")]
    prompt_tokens: String,
    /// Prompt tokens per engine step (the runtime's `prefill_chunk`).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Runs per prompt length; the fastest is kept.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Also write the measured numbers to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), String> {
    let lengths: Vec<usize> = parse_list(&args.prompt_tokens, "--prompt-tokens")?;
    if lengths.is_empty() || lengths.contains(&0) || args.chunk == 0 || args.repeats == 0 {
        return Err("--prompt-tokens, --chunk and --repeats must be positive".into());
    }
    let mut config = args.model.config();
    let longest = lengths.iter().copied().max().unwrap_or(1);
    config.prefill_chunk = args.chunk;
    config.kv_budget_tokens = config.kv_budget_tokens.max(longest + 1);
    let runtime = ModelArgs::build(config)?;
    let context = runtime.model().config().max_position_embeddings;
    if longest >= context {
        return Err(format!(
            "--prompt-tokens {longest}: the model's context is {context} tokens"
        ));
    }
    let source = gsm8k_prompt(&runtime)?;
    let mut report = json!({
        "model": runtime.model().path.display().to_string(),
        "device": runtime.device(),
        "chunk": args.chunk,
        "prefill": [],
    });
    // The first step loads kernels and makes handles: not prefill speed.
    first_token(&runtime, &Arc::new(source.clone()))?;
    println!(
        "prefill on {}, {} prompt tokens per step, best of {}",
        runtime.device(),
        args.chunk,
        args.repeats
    );
    for &n in &lengths {
        let prompt = Arc::new(source.iter().copied().cycle().take(n).collect::<Vec<_>>());
        let mut best = f64::INFINITY;
        for _ in 0..args.repeats {
            best = best.min(first_token(&runtime, &prompt)?);
        }
        let tps = n as f64 / best;
        println!(
            "  {n:>5} tokens: {tps:>8.1} tok/s ({:.3} s to the first token)",
            best
        );
        report["prefill"].as_array_mut().unwrap().push(json!({
            "prompt_tokens": n,
            "seconds": best,
            "tokens_per_second": tps,
        }));
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
    }
    Ok(())
}

/// Seconds from submitting `prompt` to its one new token.
fn first_token(runtime: &verity::Runtime, prompt: &Arc<Vec<u32>>) -> Result<f64, String> {
    let start = Instant::now();
    let mut r = Request::new(Prompt::Tokens(prompt.to_vec()));
    r.max_tokens = 1;
    r.ignore_eos = true;
    runtime
        .submit(GenerateRequest {
            adapter: Some(BASE_ADAPTER.into()),
            remember: false,
            ..GenerateRequest::new(r)
        })
        .and_then(|g| g.blocking_result())
        .map_err(|e| e.to_string())?;
    Ok(start.elapsed().as_secs_f64())
}
