//! `verity rl`: learn a LoRA adapter online (GRPO) from rollouts on a JSONL task set, with
//! held-out evaluation, checkpoints and a collapse guard; the runtime's trainer and
//! learning adapter do the learning.

use std::path::PathBuf;
use std::time::Instant;

use verity::runtime::LoraSettings;
use verity::train::{AdamWConfig, TrainConfig};
use verity_cli::eval::{read_jsonl, wilson};
use verity_cli::rl::{learn, LearnConfig, LearnReport, RewardKind, StepMetrics};

use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Training prompts (JSONL, question/answer).
    #[arg(long)]
    data: PathBuf,
    /// Held-out set for greedy accuracy and the collapse guard (JSONL). Without it, and
    /// with a reward that needs no labels (ttrl, intuitor, entropy), a label-free guard
    /// watches the run (group agreement, entropy, answer diversity, length, truncation,
    /// echoed answers, KL from the base model on probe prompts every --eval-every
    /// steps), rolls back to the healthiest checkpoint when they say it collapsed (three
    /// rollbacks stop the run), and ranks checkpoints by the share of rollouts that
    /// finish with their group's majority answer. A verifier or rlpr run without it keeps
    /// its last policy.
    #[arg(long)]
    eval: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    eval_limit: usize,
    #[arg(long, default_value_t = 10)]
    eval_every: usize,
    /// verifier, ttrl, intuitor or entropy (EM-RL) (these three: labels hidden), or rlpr
    /// (references, no verifier).
    #[arg(long, default_value = "verifier")]
    reward: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 2)]
    prompts_per_step: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    #[arg(long, default_value_t = 192)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Generate the next step's rollouts while a step trains (one step stale).
    #[arg(long)]
    overlap: bool,
    /// Output folder: metrics.jsonl, plot.png, checkpoints/, adapter/ (PEFT files). A run
    /// without --eval also keeps the policy of every probe step in checkpoints/steps/.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<(), String> {
    let reward: RewardKind = args.reward.parse().map_err(|e| format!("--reward: {e}"))?;
    let train = read_jsonl(&args.data, "question", "answer").map_err(|e| e.to_string())?;
    let mut heldout = match &args.eval {
        Some(p) => read_jsonl(p, "question", "answer").map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    heldout.truncate(args.eval_limit);
    let mut config = args.model.config();
    config.learn_adapter = "policy".into();
    config.lora = LoraSettings {
        rank: args.rank,
        alpha: args.alpha,
        ..LoraSettings::default()
    };
    config.train = TrainConfig {
        optimizer: AdamWConfig {
            lr: args.lr,
            total_steps: args.steps as u64,
            ..Default::default()
        },
        max_completion_len: args.max_tokens,
        ..Default::default()
    };
    let runtime = ModelArgs::build(config)?;
    let learn_config = LearnConfig {
        reward,
        steps: args.steps,
        group: args.group,
        prompts_per_step: args.prompts_per_step,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        eval_every: args.eval_every,
        collapse_drop: 0.1,
        out: args.out.clone(),
        overlap: args.overlap,
    };
    let start = Instant::now();
    let steps = args.steps;
    let report = learn(&runtime, &train, &heldout, &learn_config, |m| {
        print_step(m, steps)
    })
    .map_err(|e| e.to_string())?;
    let final_dir = args.out.join("adapter");
    let adapter = runtime.learning_adapter();
    let model = runtime.model();
    verity::adapter::save_peft(
        &adapter,
        model.config(),
        &final_dir,
        &model.path.display().to_string(),
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{} steps in {:.0} s; adapter version {}; PEFT adapter in {}",
        report.steps.len(),
        start.elapsed().as_secs_f64(),
        adapter.version(),
        final_dir.display()
    );
    if let Some(why) = &report.stopped {
        println!("{why}");
    }
    if let Some((health, dir)) = &report.kept_checkpoint {
        println!(
            "kept the healthiest checkpoint {} (finished agreement {health:.3}): the last policy does not read healthier beyond noise",
            dir.display()
        );
    }
    print_heldout(&report, heldout.len());
    Ok(())
}

fn print_step(m: &StepMetrics, steps: usize) {
    eprintln!(
        "step {:>3}/{steps}  reward {:.3}  acc {:.2}  agree {:.2} (finished {:.2})  loss {:+.4}  clip {:.2}  entropy {:.2}  {:.0} tok/s  rollout {:.1}s train {:.1}s hand-off {:.0}µs{}{}{}{}{}",
        m.train.step, m.reward, m.sample_accuracy, m.agreement, m.finished_agreement, m.train.loss, m.train.clip_fraction, m.entropy,
        m.tokens_per_second, m.rollout_seconds, m.train_seconds, m.handoff_microseconds,
        m.heldout_accuracy.map(|a| format!("  held-out {:.1}%", 100.0 * a)).unwrap_or_default(),
        m.probe_kl.map(|k| format!("  probe KL {k:.4}")).unwrap_or_default(),
        m.train.skipped.as_ref().map(|s| format!("  [skipped: {s}]")).unwrap_or_default(),
        if m.rolled_back { "  [rolled back]" } else { "" },
        m.guard.as_ref().map(|r| format!(" ({})", r.join("; "))).unwrap_or_default(),
    );
}

fn print_heldout(report: &LearnReport, n: usize) {
    let (Some(b), Some(after)) = (report.heldout_before, report.heldout_after) else {
        return;
    };
    let (bl, bh) = wilson((b * n as f64).round() as usize, n);
    let (al, ah) = wilson((after * n as f64).round() as usize, n);
    let rolled_back = report
        .steps
        .iter()
        .rev()
        .find(|m| m.heldout_accuracy.is_some())
        .is_some_and(|m| m.rolled_back);
    println!(
        "held-out greedy accuracy ({n} items): before {:.1}% [{:.1}, {:.1}] → after {:.1}% [{:.1}, {:.1}]{}",
        100.0 * b, 100.0 * bl, 100.0 * bh, 100.0 * after, 100.0 * al, 100.0 * ah,
        if rolled_back { " (the saved adapter, after the collapse guard rolled back to the best checkpoint)" } else { "" }
    );
}
