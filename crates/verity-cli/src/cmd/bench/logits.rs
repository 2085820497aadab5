//! `verity bench logits`: what the model computes for given token ids, for comparisons with
//! other implementations (`scripts/gpu/compare.py` against transformers) and between
//! devices. Writes JSON with
//! - `logits`: the last prompt position's full logits row (f32, as `forward_step` returns
//!   it), from a fresh KV cache;
//! - `greedy`: `--steps` greedy tokens continuing the prompt, one `forward_step` each, with
//!   the chosen token's log-prob, the gap between the two largest logits (a near-tie makes
//!   a different greedy choice legitimate), the top 5, the statistics of `verity::stats`
//!   on the row copied to the host (`stats`) and the same statistics computed on the row's
//!   device (`device_stats`, the engine's row reduction: the CUDA kernel on a GPU);
//! - `engine`: the same greedy continuation decoded by the runtime's engine (its batching,
//!   prefill and statistics path), tokens and per-token statistics.
//!
//! `--adapter` applies a PEFT LoRA folder on both paths.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use verity::engine::{Prompt, Request};
use verity::model::StepInput;
use verity::runtime::BASE_ADAPTER;
use verity::stats::{token_stats, DEFAULT_TOP_K};
use verity::GenerateRequest;

use super::{parse_list, write_json};
use crate::args::ModelArgs;

/// The id the `--adapter` folder is loaded under in the runtime.
const CHECK_ADAPTER: &str = "check";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt token ids, comma-separated (used as they are: no BOS is added).
    #[arg(long)]
    ids: String,
    /// Greedy tokens to generate after the prompt.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// A PEFT LoRA folder to apply (verity's or PEFT's own).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The JSON file to write.
    #[arg(long)]
    out: PathBuf,
}

/// Index of the largest entry (the first of equals) and the gap to the second largest.
fn argmax_gap(row: &[f32]) -> (u32, f32) {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    let second = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best.0)
        .map(|(_, &x)| x)
        .fold(f32::NEG_INFINITY, f32::max);
    (best.0 as u32, best.1 - second)
}

fn top(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|i| (i, row[i as usize]))
        .collect()
}

pub fn run(args: Args) -> Result<(), String> {
    let ids: Vec<u32> = parse_list(&args.ids, "--ids")?;
    if ids.is_empty() {
        return Err("--ids: give at least one token id".into());
    }
    let mut builder = ModelArgs::builder(args.model.config())?;
    if let Some(dir) = &args.adapter {
        builder = builder.adapter(CHECK_ADAPTER, dir);
    }
    let load = Instant::now();
    let runtime = builder.build().map_err(|e| e.to_string())?;
    let load_seconds = load.elapsed().as_secs_f64();
    let model = runtime.model();
    let t = &model.transformer;
    let vocab = model.config().vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(format!(
            "--ids: token id {bad} is outside the vocabulary of {vocab}"
        ));
    }
    let adapter = match &args.adapter {
        Some(dir) => Some(
            verity::adapter::load_peft(dir, model.config(), t.dtype(), t.device())
                .map_err(|e| format!("--adapter: {e}"))?,
        ),
        None => None,
    };

    // Direct: forward_step on a fresh cache, the whole prompt in one step, then one token
    // per step.
    let start = Instant::now();
    let mut kv = t.new_kv();
    let mut next: Vec<u32> = ids.clone();
    let mut first_row = Vec::new();
    let mut greedy = Vec::new();
    // One step per greedy token (the prompt's step gives the first); with --steps 0 the
    // prompt's step still runs, for its row.
    for step in 0..args.steps.max(1) {
        let logits = t
            .forward_step(&mut [StepInput {
                tokens: &next,
                kv: &mut kv,
                adapter: adapter.as_ref(),
                all_logits: false,
            }])
            .map_err(|e| e.to_string())?;
        let row: Vec<f32> = logits
            .flatten_all()
            .and_then(|r| r.to_vec1())
            .map_err(|e| e.to_string())?;
        if step < args.steps {
            let (chosen, gap) = argmax_gap(&row);
            let stats = token_stats(&row, chosen, DEFAULT_TOP_K);
            // A failure here is recorded, not fatal: the logits are the main result.
            let device_stats = verity::engine::greedy_stats_on_device(&logits, DEFAULT_TOP_K)
                .map(|mut s| s.pop())
                .map(|s| s.filter(|(token, _)| *token == chosen).map(|(_, st)| st));
            let mut entry = json!({
                "id": chosen,
                "logprob": stats.logprob,
                "top2_gap": gap,
                "top5": top(&row, 5),
                "stats": stats,
            });
            match device_stats {
                Ok(s) => entry["device_stats"] = json!(s),
                Err(e) => entry["device_stats_error"] = json!(e.to_string()),
            }
            greedy.push(entry);
            next = vec![chosen];
        }
        if step == 0 {
            first_row = row;
        }
    }
    let direct_seconds = start.elapsed().as_secs_f64();

    // The engine: the same greedy continuation through the runtime (an error is recorded
    // in the report rather than losing the logits above).
    let engine = if args.steps > 0 {
        let mut request = Request::new(Prompt::Tokens(ids.clone()));
        request.max_tokens = args.steps;
        request.ignore_eos = true;
        let start = Instant::now();
        let result = runtime.generate(GenerateRequest {
            adapter: Some(
                if args.adapter.is_some() {
                    CHECK_ADAPTER
                } else {
                    BASE_ADAPTER
                }
                .into(),
            ),
            remember: false,
            ..GenerateRequest::new(request)
        });
        match result {
            Ok(result) => match result.traces.first() {
                Some(t) => json!({
                    "tokens": t.trace.tokens,
                    "stats": t.trace.stats,
                    "seconds": start.elapsed().as_secs_f64(),
                }),
                None => json!({ "error": "the engine returned no trace" }),
            },
            Err(e) => json!({ "error": e.to_string() }),
        }
    } else {
        serde_json::Value::Null
    };

    let report = json!({
        "model": model.path.display().to_string(),
        "device": runtime.device(),
        "dtype": format!("{:?}", t.dtype()).to_lowercase(),
        "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
        "top_k": DEFAULT_TOP_K,
        "prompt_ids": ids,
        "vocab_size": vocab,
        "load_seconds": load_seconds,
        "direct_seconds": direct_seconds,
        "logits": first_row,
        "greedy": greedy,
        "engine": engine,
    });
    write_json(&args.out, &report)?;
    eprintln!(
        "logits of {} prompt tokens and {} greedy tokens on {} written to {}",
        ids.len(),
        args.steps,
        runtime.device(),
        args.out.display()
    );
    Ok(())
}
