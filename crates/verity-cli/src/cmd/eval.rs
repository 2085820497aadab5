//! `verity eval`: the accuracy of selection rules (and DeepConf-online) on a JSONL data
//! set, with a progress bar, a trace file, and a table that compares every rule with
//! majority vote question by question; `--from` applies rules to a saved trace file
//! without decoding. Both print accuracy against samples and tokens, and draw it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use verity::score::TraceScore;
use verity::select::SelectionRule;
use verity_cli::eval::{read_jsonl, run as run_eval, EvalConfig, RuleResult};
use verity_cli::plot::accuracy_vs_tokens;
use verity_cli::rescore::{
    curve, curve_sizes, read_traces, rescore, samples_per_question, tune_cisc, tune_sequential,
    SavedQuestion, SequentialKind,
};

use crate::args::{parse_rules, ModelArgs};

/// The rules compared by default: the baselines, the sequential rules that stop early,
/// and the confidence-based ones.
const DEFAULT_RULES: &str = "greedy,majority,esc:4,adaptive:0.95,borda:0.5,max:self_certainty,weighted:self_certainty,deepconf:bottom10:64:10";

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Questions to sample (JSONL with question and answer fields).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    data: Option<PathBuf>,
    /// Re-score a trace file written by `--out` instead of sampling: no model is loaded,
    /// and the sampling flags are not used.
    #[arg(long)]
    from: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// Comma-separated rules: greedy, majority, esc:<window>, adaptive:<threshold>,
    /// borda:<power>, max:<score>, weighted:<score>, cisc:<score>:<temperature>,
    /// deepconf:<metric>:<eta>. With --from, cisc:<score>:tune tunes the temperature on
    /// the --tune-fraction split (the most accurate), esc:tune the window and
    /// adaptive:tune the threshold (the fewest tokens within 1 question of majority).
    #[arg(long, default_value = DEFAULT_RULES)]
    select: String,
    /// Rules run online, each on its own samples, comma-separated: the sequential rules
    /// (esc:<window>, adaptive:<threshold>, deepconf-online:<warmup>:<percentile>:<window>
    /// [:<tau>], the last also as deepconf:... or bare numbers) drawn in the engine, --n
    /// at most, until the answer settles; a sample that stops (DeepConf's low confidence)
    /// frees its batch slot for the next at once.
    #[arg(long, conflicts_with = "from")]
    online: Option<String>,
    /// Samples of an --online rule decoding at once per question (default: the rule's own:
    /// ESC's window, 4 for adaptive, DeepConf's warm-up). Fewer waste fewer tokens on
    /// samples cut when the answer settles (1 decodes exactly the samples the simulated
    /// rule is charged); raise --concurrency to keep the batch full.
    #[arg(long, requires = "online")]
    parallel: Option<usize>,
    /// With --from: tune `:tune` parameters on this leading fraction of the questions and
    /// report every rule on the rest only.
    #[arg(long, default_value_t = 0.0, requires = "from")]
    tune_fraction: f64,
    /// Where to draw accuracy against tokens (default: next to the trace file, as
    /// <name>.curve.png; nothing without a trace file).
    #[arg(long)]
    plot: Option<PathBuf>,
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
    if let Some(from) = &args.from {
        return run_from(&args, from);
    }
    let Some(data) = &args.data else {
        return Err("give --data (questions to sample) or --from (a trace file)".into());
    };
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.parallel == Some(0) {
        return Err("--parallel must be at least 1".into());
    }
    if args.plot.is_some() && args.out.is_none() {
        return Err("--plot needs --out: the curve is drawn from the trace file".into());
    }
    let rules = parse_rules(&args.select)?;
    let online = parse_online_list(args.online.as_deref(), args.n)?;
    let mut items =
        read_jsonl(data, &args.question_field, &args.answer_field).map_err(|e| e.to_string())?;
    if let Some(k) = args.limit {
        items.truncate(k);
    }
    if items.is_empty() {
        return Err(format!("{} holds no items", data.display()));
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
        parallel: args.parallel,
        adapter: args.adapter.as_ref().map(|_| "eval".to_string()),
        concurrency: args.concurrency,
    };
    verity_cli::eval::require_chat_template(&runtime, "eval").map_err(|e| e.to_string())?;
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
    print_table(&results, true);
    println!("({} questions, n = {})", items.len(), args.n);
    if config.rules.iter().any(SelectionRule::is_sequential) {
        println!(
            "(sequential rules above are simulated on the n samples in order and charged the \
             samples they would draw; 'online' rows decoded in the engine, in parallel \
             windows, and count every token decoded)"
        );
    }
    if let Some(out) = &args.out {
        // The curve comes from the trace file just written, as --from would read it.
        let questions = read_traces(out).map_err(|e| e.to_string())?;
        let sampled: Vec<SelectionRule> = config
            .rules
            .iter()
            .copied()
            .filter(|r| *r != SelectionRule::Greedy)
            .collect();
        if args.n > 1 && !sampled.is_empty() {
            print_curve(&questions, &sampled, args.n, &plot_path(&args, out))?;
        }
    }
    Ok(())
}

/// A rule as given to --from: fixed, or with its parameter still to tune.
enum RuleSpec {
    Fixed(SelectionRule),
    TunedCisc(TraceScore),
    TunedSequential(SequentialKind),
}

/// `verity eval --from`: the table and the curve from saved traces.
fn run_from(args: &Args, from: &Path) -> Result<(), String> {
    let mut questions = read_traces(from).map_err(|e| e.to_string())?;
    if let Some(k) = args.limit {
        questions.truncate(k);
    }
    if questions.is_empty() {
        return Err("--limit 0 leaves no questions".into());
    }
    let n = samples_per_question(&questions, from).map_err(|e| e.to_string())?;
    let specs: Vec<RuleSpec> = args
        .select
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "esc:tune" => Ok(RuleSpec::TunedSequential(SequentialKind::Esc)),
            "adaptive:tune" => Ok(RuleSpec::TunedSequential(SequentialKind::Adaptive)),
            _ => match s
                .strip_prefix("cisc:")
                .and_then(|r| r.strip_suffix(":tune"))
            {
                Some(score) => score
                    .parse()
                    .map(RuleSpec::TunedCisc)
                    .map_err(|e| format!("--select {s}: {e}")),
                None => s
                    .parse()
                    .map(RuleSpec::Fixed)
                    .map_err(|e| format!("--select: {e}")),
            },
        })
        .collect::<Result<_, _>>()?;
    let f = args.tune_fraction;
    if !(0.0..1.0).contains(&f) {
        return Err(format!("--tune-fraction must be in [0, 1), got {f}"));
    }
    let tuned = (f * questions.len() as f64).round() as usize;
    let needs_tuning = specs.iter().any(|s| !matches!(s, RuleSpec::Fixed(_)));
    if needs_tuning && tuned == 0 {
        return Err(
            "a ':tune' rule needs --tune-fraction with at least one question to tune on".into(),
        );
    }
    if tuned >= questions.len() {
        return Err(format!(
            "--tune-fraction {f} leaves none of the {} questions to report on",
            questions.len()
        ));
    }
    let (tuning, report) = questions.split_at(tuned);
    let mut rules = Vec::with_capacity(specs.len());
    for spec in specs {
        rules.push(match spec {
            RuleSpec::Fixed(rule) => rule,
            RuleSpec::TunedCisc(score) => {
                let temperature = tune_cisc(tuning, score).map_err(|e| e.to_string())?;
                // Four significant digits: the rule's name stays readable and parses back.
                let temperature: f64 = format!("{temperature:.3e}")
                    .parse()
                    .map_err(|e| format!("{e}"))?;
                println!(
                    "cisc:{score}: temperature {temperature} tuned on {} questions",
                    tuning.len()
                );
                SelectionRule::Cisc { score, temperature }
            }
            RuleSpec::TunedSequential(kind) => {
                let rule = tune_sequential(tuning, kind, n, 1).map_err(|e| e.to_string())?;
                println!(
                    "{rule}: the fewest tokens within 1 question of majority vote on {} questions",
                    tuning.len()
                );
                rule
            }
        });
    }
    let results = rescore(report, &rules).map_err(|e| e.to_string())?;
    print_table(&results, false);
    match tuned {
        0 => println!(
            "({} questions, n = {n}, from {})",
            report.len(),
            from.display()
        ),
        _ => println!(
            "({} held-out questions after {tuned} for tuning, n = {n}, from {})",
            report.len(),
            from.display()
        ),
    }
    let sampled: Vec<SelectionRule> = rules
        .into_iter()
        .filter(|r| *r != SelectionRule::Greedy)
        .collect();
    if n > 1 && !sampled.is_empty() {
        print_curve(report, &sampled, n, &plot_path(args, from))?;
    }
    Ok(())
}

/// --plot, or `<trace file stem>.curve.png` beside it.
fn plot_path(args: &Args, traces: &Path) -> PathBuf {
    args.plot.clone().unwrap_or_else(|| {
        let stem = traces.file_stem().unwrap_or_default().to_string_lossy();
        traces.with_file_name(format!("{stem}.curve.png"))
    })
}

/// Accuracy and tokens per question of every rule at 1, 2, 4, … samples, as a table and
/// as a chart at `png`.
fn print_curve(
    questions: &[SavedQuestion],
    rules: &[SelectionRule],
    n: usize,
    png: &Path,
) -> Result<(), String> {
    let sizes = curve_sizes(n);
    let points = curve(questions, rules, &sizes).map_err(|e| e.to_string())?;
    println!("\naccuracy (tokens per question) at N samples, mean over disjoint blocks of N:");
    print!("{:<44}", "rule");
    for size in &sizes {
        print!(" {:>16}", format!("N = {size}"));
    }
    println!();
    let mut series = Vec::new();
    for (rule, row) in rules.iter().zip(points.chunks(sizes.len())) {
        print!("{:<44}", rule.to_string());
        for p in row {
            print!(
                " {:>16}",
                format!("{:.1}% ({:.0})", 100.0 * p.accuracy, p.tokens)
            );
        }
        println!();
        series.push((
            rule.to_string(),
            row.iter().map(|p| (p.tokens, p.accuracy)).collect(),
        ));
    }
    accuracy_vs_tokens(png, &series).map_err(|e| e.to_string())?;
    println!("(drawn in {})", png.display());
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
fn print_table(results: &[RuleResult], show_wall: bool) {
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
        let wall = if show_wall {
            format!("{:.1}", r.wall.as_secs_f64())
        } else {
            "–".to_string()
        };
        println!(
            "{:<44} {:>8.1}% {:>7.1}% – {:>5.1}% {:>12.0} {:>9}   {paired}",
            r.rule,
            100.0 * r.accuracy(),
            100.0 * lo,
            100.0 * hi,
            r.mean_tokens,
            wall
        );
    }
}

/// --online's comma-separated list of sequential rules, each run in the engine on its own
/// samples. DeepConf-online may also be written `deepconf:warmup:percentile:window[:tau]`
/// or without a name.
fn parse_online_list(list: Option<&str>, n: usize) -> Result<Vec<SelectionRule>, String> {
    let mut rules = Vec::new();
    for spec in list.unwrap_or("").split(',').map(str::trim) {
        if spec.is_empty() {
            continue;
        }
        let spec = match spec.strip_prefix("deepconf:") {
            Some(rest) => format!("deepconf-online:{rest}"),
            None if spec.starts_with(|c: char| c.is_ascii_digit()) => {
                format!("deepconf-online:{spec}")
            }
            None => spec.to_string(),
        };
        let rule: SelectionRule = spec.parse().map_err(|e| format!("--online: {e}"))?;
        if !rule.is_sequential() {
            return Err(format!(
                "--online: {rule} uses every sample; give it to --select (online rules: esc, adaptive, deepconf-online)"
            ));
        }
        if let SelectionRule::DeepConfOnline { warmup, .. } = rule {
            if warmup > n {
                return Err(format!(
                    "--online: the DeepConf-online warm-up ({warmup}) is more than --n ({n})"
                ));
            }
        }
        rules.push(rule);
    }
    Ok(rules)
}
