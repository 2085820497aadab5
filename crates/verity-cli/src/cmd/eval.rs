//! `verity eval`: the accuracy of selection rules (and DeepConf-online) on a JSONL data
//! set, with a progress bar, a trace file, and a table that compares every rule with
//! majority vote question by question.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use verity::select::{DeepConfOnline, SelectionRule};
use verity_cli::eval::{read_jsonl, run as run_eval, EvalConfig, RuleResult};

use crate::args::{parse_rules, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Comma-separated rules: greedy,majority,borda:0.5,max:self_certainty,deepconf:bottom10:64:10
    #[arg(
        long,
        default_value = "greedy,majority,borda:0.5,max:self_certainty,weighted:self_certainty,deepconf:bottom10:64:10"
    )]
    select: String,
    /// DeepConf-online: warmup:percentile:window, optionally :tau (budget = --n).
    #[arg(long)]
    online: Option<String>,
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "question")]
    question_field: String,
    #[arg(long, default_value = "answer")]
    answer_field: String,
    /// Write every trace with its scores here (JSONL).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Questions in flight at once; their requests share the engine's batches.
    /// Results do not depend on it (each question has its own seeds).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Decode with this LoRA adapter (a PEFT folder, e.g. the `adapter/` that `verity
    /// rl` writes) instead of the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), String> {
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let rules = parse_rules(&args.select)?;
    let online = args
        .online
        .as_deref()
        .map(|spec| parse_online(spec, args.n))
        .transpose()?;
    let mut items = read_jsonl(&args.data, &args.question_field, &args.answer_field)
        .map_err(|e| e.to_string())?;
    if let Some(k) = args.limit {
        items.truncate(k);
    }
    if items.is_empty() {
        return Err(format!("{} holds no items", args.data.display()));
    }
    let runtime = ModelArgs::build(args.model.config())?;
    if let Some(dir) = &args.adapter {
        runtime
            .adapter_load("eval", dir)
            .map_err(|e| format!("--adapter {}: {e}", dir.display()))?;
    }
    let config = EvalConfig {
        n: args.n,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        rules,
        online,
        adapter: args.adapter.as_ref().map(|_| "eval".to_string()),
        concurrency: args.concurrency,
    };
    let mut file = match &args.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => None,
    };
    let start = Instant::now();
    let results = run_eval(
        &runtime,
        &items,
        &config,
        |done, total| progress_bar(done, total, start),
        file.as_mut().map(|f| f as &mut dyn Write),
    )
    .map_err(|e| e.to_string())?;
    eprintln!();
    if let Some(f) = file.as_mut() {
        f.flush().map_err(|e| e.to_string())?;
    }
    print_table(&results);
    println!("({} questions, n = {})", items.len(), args.n);
    Ok(())
}

fn progress_bar(done: usize, total: usize, start: Instant) {
    let width = 30;
    let filled = width * done / total.max(1);
    let elapsed = start.elapsed().as_secs_f64();
    let eta = if done > 0 {
        format!(
            ", ~{:.0} s left",
            elapsed / done as f64 * (total - done) as f64
        )
    } else {
        String::new()
    };
    eprint!(
        "\r[{}{}] {done}/{total} questions, {elapsed:.0} s{eta}   ",
        "#".repeat(filled),
        " ".repeat(width - filled),
    );
}

/// Rules are compared with majority vote question by question: intervals of two
/// accuracies overlap long before a paired difference stops being real.
fn print_table(results: &[RuleResult]) {
    let majority = SelectionRule::Majority.to_string();
    let baseline = results.iter().find(|r| r.rule == majority);
    println!(
        "{:<44} {:>9} {:>17} {:>12} {:>9}   {}",
        "rule",
        "accuracy",
        "95% interval",
        "tokens/q",
        "wall s",
        if baseline.is_some() {
            "vs majority: +right −right (sign test p)"
        } else {
            ""
        }
    );
    for r in results {
        let (lo, hi) = r.interval();
        let paired = match baseline {
            Some(b) if b.rule != r.rule => {
                let d = r.paired(b);
                format!("+{} −{} (p = {:.2})", d.gained, d.lost, d.p_value)
            }
            _ => String::new(),
        };
        println!(
            "{:<44} {:>8.1}% {:>7.1}% – {:>5.1}% {:>12.0} {:>9.1}   {paired}",
            r.rule,
            100.0 * r.accuracy(),
            100.0 * lo,
            100.0 * hi,
            r.mean_tokens,
            r.wall.as_secs_f64()
        );
    }
}

/// `warmup:percentile:window[:tau]` with the budget from --n.
fn parse_online(spec: &str, budget: usize) -> Result<DeepConfOnline, String> {
    let spec = spec.strip_prefix("deepconf:").unwrap_or(spec);
    let parts: Vec<&str> = spec.split(':').collect();
    let num = |i: usize, name: &str| -> Result<f64, String> {
        parts
            .get(i)
            .ok_or_else(|| format!("--online: missing {name} (warmup:percentile:window[:tau])"))?
            .parse::<f64>()
            .map_err(|_| format!("--online: {name} is not a number"))
    };
    let warmup = num(0, "warmup")? as usize;
    let percentile = num(1, "percentile")?;
    let window = num(2, "window")? as usize;
    let tau = if parts.len() > 3 {
        Some(num(3, "tau")?)
    } else {
        None
    };
    if warmup == 0 || warmup > budget || window == 0 || !(0.0..=100.0).contains(&percentile) {
        return Err(format!(
            "--online: need 0 < warmup ≤ n ({budget}), window > 0, percentile in [0, 100]"
        ));
    }
    Ok(DeepConfOnline::new(warmup, percentile, window, tau, budget))
}
