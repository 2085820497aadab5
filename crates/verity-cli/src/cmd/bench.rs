//! `verity bench decode`: decode tokens/s by batch size, n samples of one prompt against n
//! independent requests, and what the per-token statistics cost, all through the runtime.

use std::sync::Arc;
use std::time::Instant;

use verity::engine::{Prompt, Request};
use verity::runtime::{RuntimeConfig, BASE_ADAPTER};
use verity::sampling::SamplingParams;
use verity::{ChatMessage, GenerateRequest, Runtime};

use crate::args::ModelArgs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Decode tokens/s by batch size, n samples vs independent requests, cost of the stats.
    Decode {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch sizes to measure.
        #[arg(long, default_value = "1,4,16,64")]
        batches: String,
        /// Tokens generated per sequence.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
}

pub fn run(command: Command) -> Result<(), String> {
    let Command::Decode {
        model,
        batches,
        tokens,
    } = command;
    let batches: Vec<usize> = batches
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .map_err(|_| format!("--batches: '{b}' is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let mut config = model.config();
    config.max_batch = batches.iter().copied().max().unwrap_or(1).max(16);
    let runtime = ModelArgs::build(config.clone())?;
    // The same weights without statistics, to measure what they cost.
    let plain = Runtime::builder(RuntimeConfig {
        token_stats: false,
        ..config
    })
    .model(runtime.model().clone())
    .build()
    .map_err(|e| e.to_string())?;
    bench_decode(&runtime, &plain, &batches, tokens)
}

/// Generated tokens per second for `requests` requests of `n` samples each.
fn throughput(
    runtime: &Runtime,
    requests: usize,
    n: usize,
    tokens: usize,
    prompt: &Arc<Vec<u32>>,
) -> Result<f64, String> {
    let start = Instant::now();
    let generations = (0..requests)
        .map(|i| {
            let mut r = Request::new(Prompt::Tokens(prompt.to_vec()));
            r.n = n;
            r.max_tokens = tokens;
            r.ignore_eos = true;
            r.sampling = SamplingParams {
                temperature: 0.8,
                seed: i as u64 * 1000,
                ..Default::default()
            };
            runtime.submit(GenerateRequest {
                adapter: Some(BASE_ADAPTER.into()),
                remember: false,
                ..GenerateRequest::new(r)
            })
        })
        .collect::<verity::Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    let mut generated = 0;
    for g in generations {
        generated += g
            .blocking_result()
            .map_err(|e| e.to_string())?
            .generated_tokens();
    }
    Ok(generated as f64 / start.elapsed().as_secs_f64())
}

fn bench_decode(
    runtime: &Runtime,
    plain: &Runtime,
    batches: &[usize],
    tokens: usize,
) -> Result<(), String> {
    let question = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?";
    let tokenizer = &runtime.model().tokenizer;
    let text = tokenizer
        .apply_chat_template(
            &[ChatMessage::user(format!(
                "{question}{}",
                verity_cli::eval::BOXED_INSTRUCTION
            ))],
            true,
        )
        .map_err(|e| e.to_string())?;
    let prompt = Arc::new(tokenizer.encode(&text, true).map_err(|e| e.to_string())?);
    let short = Arc::new(prompt[..8.min(prompt.len())].to_vec());
    println!(
        "decode on {}, {tokens} new tokens per sequence after an {}-token prompt",
        runtime.device(),
        short.len()
    );
    // Batch scaling on a short prompt, so that prefill does not blur the decode rate.
    let mut single = None;
    for &b in batches {
        let tps = throughput(runtime, b, 1, tokens, &short)?;
        let base = *single.get_or_insert(tps);
        println!(
            "  batch {b:>3}: {tps:>8.1} tok/s  ({:.2}× batch 1)",
            tps / base
        );
    }
    println!(
        "GSM8K prompt of {} tokens (prefill included):",
        prompt.len()
    );
    let shared = throughput(runtime, 1, 16, tokens, &prompt)?;
    let independent = throughput(runtime, 16, 1, tokens, &prompt)?;
    println!(
        "  n = 16 of one prompt: {shared:.1} tok/s; 16 independent requests: {independent:.1} tok/s ({:.2}×)",
        shared / independent
    );
    // The stats cost well under the noise of one run on a shared machine: alternate the two
    // runtimes and keep the best run of each.
    for b in [1usize, 16] {
        let (mut with, mut without) = (0f64, 0f64);
        for _ in 0..3 {
            with = with.max(throughput(runtime, b, 1, tokens, &short)?);
            without = without.max(throughput(plain, b, 1, tokens, &short)?);
        }
        println!(
            "  per-token stats at batch {b}: {with:.1} tok/s with, {without:.1} without ({:+.1}% time)",
            100.0 * (without / with - 1.0)
        );
    }
    Ok(())
}
