//! `verity bench decode`: decode tokens/s by batch size, n samples of one prompt against n
//! independent requests, and what the per-token statistics cost, all through the runtime.
//! `--json` writes the numbers (rewritten after every measurement, so that a run cut short
//! keeps what it measured).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use verity::engine::{Prompt, Request};
use verity::runtime::{RuntimeConfig, BASE_ADAPTER};
use verity::sampling::SamplingParams;
use verity::{ChatMessage, GenerateRequest, Runtime};

use super::{parse_list, write_json};
use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch sizes to measure.
    #[arg(long, default_value = "1,4,16,64")]
    batches: String,
    /// Tokens generated per sequence (end-of-generation tokens do not stop a sequence).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Prompt length of the batch and statistics runs, in tokens (the GSM8K prompt's tokens
    /// repeated or cut) [default: its first 8 tokens, so that prefill does not blur the
    /// decode rate]. The n-samples comparison always uses the whole GSM8K prompt.
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Batch sizes at which the statistics are measured on against off.
    #[arg(long, default_value = "1,16")]
    stats_batches: String,
    /// Runs of each runtime (statistics on, off) per statistics batch; the best is kept.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Rounds of the batch-scaling runs: each round measures every batch size once, in
    /// turn, and each size's best round is reported (a shared machine's load drifts over
    /// seconds, and alternating keeps the sizes' chances even).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also write the measured numbers to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), String> {
    let batches: Vec<usize> = parse_list(&args.batches, "--batches")?;
    let stats_batches: Vec<usize> = parse_list(&args.stats_batches, "--stats-batches")?;
    if batches.contains(&0) || stats_batches.contains(&0) {
        return Err("--batches, --stats-batches: a batch size must be positive".into());
    }
    if args.tokens == 0 || args.repeats == 0 || args.rounds == 0 || args.prompt_tokens == Some(0) {
        return Err("--tokens, --repeats, --rounds and --prompt-tokens must be positive".into());
    }
    let mut config = args.model.config();
    let largest = batches
        .iter()
        .chain(&stats_batches)
        .copied()
        .max()
        .unwrap_or(1)
        .max(16);
    config.max_batch = largest;
    // Room for every sequence of the largest batch at once (the n = 16 run shares its
    // prompt, so this covers it too unless the GSM8K prompt is the longer one).
    let per_sequence = args.prompt_tokens.unwrap_or(512).max(512) + args.tokens;
    config.kv_budget_tokens = config.kv_budget_tokens.max(largest * per_sequence);
    let runtime = ModelArgs::build(config.clone())?;
    // The same weights without statistics, to measure what they cost.
    let plain = Runtime::builder(RuntimeConfig {
        token_stats: false,
        ..config
    })
    .model(runtime.model().clone())
    .build()
    .map_err(|e| e.to_string())?;
    let bench = Bench {
        runtime: &runtime,
        plain: &plain,
        tokens: args.tokens,
    };
    bench.run(&args, &batches, &stats_batches)
}

struct Bench<'a> {
    runtime: &'a Runtime,
    plain: &'a Runtime,
    tokens: usize,
}

/// One measurement: generated tokens and the wall time they took.
#[derive(Clone, Copy)]
struct Run {
    tokens: usize,
    seconds: f64,
}

impl Run {
    fn tps(self) -> f64 {
        self.tokens as f64 / self.seconds
    }
    fn json(self) -> serde_json::Value {
        json!({
            "tokens_per_second": self.tps(),
            "generated_tokens": self.tokens,
            "seconds": self.seconds,
        })
    }
}

/// Generated tokens and wall time for `requests` requests of `n` samples each, submitted at
/// once (prefill included).
fn throughput(
    runtime: &Runtime,
    requests: usize,
    n: usize,
    tokens: usize,
    prompt: &Arc<Vec<u32>>,
) -> Result<Run, String> {
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
    Ok(Run {
        tokens: generated,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The GSM8K prompt's ids: chat-rendered when the model has a chat template, the plain
/// question otherwise (random-weight models made for a benchmark may have none).
pub(super) fn gsm8k_prompt(runtime: &Runtime) -> Result<Vec<u32>, String> {
    let question = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?";
    let text = format!("{question}{}", verity_cli::eval::BOXED_INSTRUCTION);
    let tokenizer = &runtime.model().tokenizer;
    let text = if tokenizer.chat_template().is_some() {
        tokenizer
            .apply_chat_template(&[ChatMessage::user(text)], true)
            .map_err(|e| e.to_string())?
    } else {
        text
    };
    let ids = tokenizer.encode(&text, true).map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Err("the GSM8K prompt encodes to no tokens".into());
    }
    Ok(ids)
}

impl Bench<'_> {
    fn run(&self, args: &Args, batches: &[usize], stats_batches: &[usize]) -> Result<(), String> {
        let (runtime, plain, tokens) = (self.runtime, self.plain, self.tokens);
        let mut prompt = gsm8k_prompt(runtime)?;
        // A small model's context may not hold the whole prompt and the new tokens.
        let room = runtime
            .model()
            .config()
            .max_position_embeddings
            .saturating_sub(tokens)
            .max(1);
        prompt.truncate(room);
        let prompt = Arc::new(prompt);
        let short_len = args.prompt_tokens.unwrap_or(8.min(prompt.len()));
        let short = Arc::new(prompt.iter().copied().cycle().take(short_len).collect());
        let model = runtime.model();
        let mut report = json!({
            "model": model.path.display().to_string(),
            "device": runtime.device(),
            "dtype": format!("{:?}", model.transformer.dtype()).to_lowercase(),
            "weight_types": model.transformer.weight_types(),
            "weight_bytes_per_token": model.transformer.weight_bytes_per_token(),
            "prompt_tokens": short_len,
            "new_tokens": tokens,
            "sampling": "temperature 0.8, end-of-generation ignored",
            "batches": [],
            "stats": [],
        });
        let save = |report: &serde_json::Value| match &args.json {
            Some(path) => write_json(path, report),
            None => Ok(()),
        };
        // The first steps on a device load kernels and make handles: not decode speed.
        let warm = Instant::now();
        throughput(runtime, 1, 1, 4, &short)?;
        throughput(plain, 1, 1, 4, &short)?;
        report["warmup_seconds"] = json!(warm.elapsed().as_secs_f64());
        println!(
            "decode on {}, {tokens} new tokens per sequence after a prompt of {short_len} tokens",
            runtime.device()
        );
        // Batch scaling on the short prompt, in rounds: each size's best run.
        let mut best: Vec<Option<Run>> = vec![None; batches.len()];
        let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
        for _ in 0..args.rounds {
            for (i, &b) in batches.iter().enumerate() {
                let run = throughput(runtime, b, 1, tokens, &short)?;
                rounds[i].push(run.tps());
                if best[i].is_none_or(|k| run.tps() > k.tps()) {
                    best[i] = Some(run);
                }
            }
        }
        let single = best.first().copied().flatten().map_or(1.0, Run::tps);
        for ((&b, run), all) in batches.iter().zip(&best).zip(&rounds) {
            let Some(run) = *run else { continue };
            let tps = run.tps();
            let each: Vec<String> = all.iter().map(|t| format!("{t:.1}")).collect();
            println!(
                "  batch {b:>3}: {tps:>8.1} tok/s  ({:.2}× batch {})  rounds: {}",
                tps / single,
                batches[0],
                each.join(", ")
            );
            let mut row = run.json();
            row["batch"] = json!(b);
            row["rounds_tokens_per_second"] = json!(all);
            report["batches"].as_array_mut().unwrap().push(row);
        }
        save(&report)?;
        println!(
            "GSM8K prompt of {} tokens (prefill included):",
            prompt.len()
        );
        let shared = throughput(runtime, 1, 16, tokens, &prompt)?;
        let independent = throughput(runtime, 16, 1, tokens, &prompt)?;
        println!(
            "  n = 16 of one prompt: {:.1} tok/s; 16 independent requests: {:.1} tok/s ({:.2}×)",
            shared.tps(),
            independent.tps(),
            shared.tps() / independent.tps()
        );
        report["shared_prompt"] = json!({
            "prompt_tokens": prompt.len(),
            "n": 16,
            "shared": shared.json(),
            "independent": independent.json(),
        });
        save(&report)?;
        // The stats cost well under the noise of one run on a shared machine: alternate the
        // two runtimes and keep the best run of each.
        for &b in stats_batches {
            let (mut with, mut without) = (None::<Run>, None::<Run>);
            let best = |kept: Option<Run>, new: Run| match kept {
                Some(k) if k.tps() >= new.tps() => Some(k),
                _ => Some(new),
            };
            for _ in 0..args.repeats {
                with = best(with, throughput(runtime, b, 1, tokens, &short)?);
                without = best(without, throughput(plain, b, 1, tokens, &short)?);
            }
            let (with, without) = (with.unwrap(), without.unwrap());
            let slower = 100.0 * (without.tps() / with.tps() - 1.0);
            println!(
                "  per-token stats at batch {b}: {:.1} tok/s with, {:.1} without ({slower:+.1}% time)",
                with.tps(),
                without.tps()
            );
            report["stats"].as_array_mut().unwrap().push(json!({
                "batch": b,
                "repeats": args.repeats,
                "with_stats": with.json(),
                "without_stats": without.json(),
                "extra_time_percent": slower,
            }));
            save(&report)?;
        }
        Ok(())
    }
}
