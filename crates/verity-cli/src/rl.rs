//! The online learning loop behind `verity rl`: prompts stream in, each becomes a group of
//! rollouts from the engine (decoded with the adapter being trained), rewards (a verifier,
//! or TTRL / INTUITOR without labels), and a GRPO update; the next rollouts already use
//! the new adapter version. A held-out greedy evaluation runs periodically; the best
//! adapter version is checkpointed, and a collapse rolls the adapter back to the best
//! version and halves the learning rate. With a held-out set, a collapse is held-out
//! accuracy falling well below the best; without one, the label-free
//! [`CollapseGuard`] decides (agreement, entropy, answer diversity, length, truncation, and
//! the policy's KL from the base model on probe prompts), and ranks checkpoints.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::eval::{self, EvalConfig, EvalItem};
use verity::adapter::{save_peft, save_versioned};
use verity::engine::FinishReason;
use verity::runtime::{GenerateResult, Generation, Runtime};
use verity::select::SelectionRule;
use verity::train::guard::{
    finished_agreement, mean, outranks, CollapseGuard, GuardConfig, StepSignals, Verdict,
};
use verity::train::rewards::{
    entropy_rewards, intuitor_rewards, majority_label, rlpr_rewards, ttrl_rewards, verifier_rewards,
};
use verity::train::{Rollout, StepReport};
use verity::verify::{equivalent, extract_answer, reference_answer, MathVerifier};
use verity::{Error, Result};

/// Where rewards come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// The math verifier against the item's reference answer.
    Verifier,
    /// Majority vote of the group as a pseudo-label (labels hidden).
    Ttrl,
    /// The sample's self-certainty, normalised in its group (labels hidden).
    Intuitor,
    /// EM-RL: the sample's negative mean token entropy, normalised in its group (labels
    /// hidden).
    Entropy,
    /// The policy's probability of the reference answer after the sample's reasoning,
    /// debiased (reference answers, no verifier).
    Rlpr,
}

impl RewardKind {
    /// Whether the reward needs no reference answers (TTRL, INTUITOR, EM-RL): such a
    /// reward can rise while the answers get worse, so the label-free guard watches it.
    pub fn is_label_free(self) -> bool {
        matches!(self, Self::Ttrl | Self::Intuitor | Self::Entropy)
    }
}

impl std::str::FromStr for RewardKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "verifier" => Ok(Self::Verifier),
            "ttrl" => Ok(Self::Ttrl),
            "intuitor" => Ok(Self::Intuitor),
            "entropy" => Ok(Self::Entropy),
            "rlpr" => Ok(Self::Rlpr),
            other => Err(format!(
                "unknown reward '{other}' (verifier, ttrl, intuitor, entropy, rlpr)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LearnConfig {
    pub reward: RewardKind,
    pub steps: usize,
    /// Completions per prompt.
    pub group: usize,
    pub prompts_per_step: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    /// Evaluate (held-out greedy accuracy) every this many steps; 0 = only before and after.
    pub eval_every: usize,
    /// Roll back when held-out accuracy drops this far below the best (absolute).
    pub collapse_drop: f64,
    pub out: PathBuf,
    /// Generate the rollouts of step t + 1 while step t trains (one step stale).
    pub overlap: bool,
}

/// One line of `metrics.jsonl` (the step number is the trainer's, `train.step`).
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub reward: f64,
    /// Fraction of rollouts whose answer matches the true reference (known labels only).
    pub sample_accuracy: f64,
    /// TTRL: fraction of groups whose pseudo-label is right.
    pub label_accuracy: Option<f64>,
    pub entropy: f64,
    pub tokens_per_second: f64,
    pub rollout_seconds: f64,
    pub train_seconds: f64,
    pub handoff_microseconds: f64,
    pub heldout_accuracy: Option<f64>,
    /// Label-free signals of the step (no held-out set): group agreement, the same over
    /// finished rollouts only, the share that finished with an answer, mean length,
    /// share truncated, KL from the base on the probe prompts when measured.
    pub agreement: f64,
    pub finished_agreement: f64,
    pub answered: f64,
    /// Share of finished answers that repeat a number of the question.
    pub echoed: f64,
    pub mean_length: f64,
    pub truncated: f64,
    pub probe_kl: Option<f64>,
    /// The label-free guard's health of the window (what ranks checkpoints), when it
    /// read the policy healthy.
    pub health: Option<f64>,
    /// The label-free guard's reasons, when it tripped.
    pub guard: Option<Vec<String>>,
    pub rolled_back: bool,
    #[serde(flatten)]
    pub train: StepReport,
}

/// The share of a group that gives its majority answer, and that answer (as text; None
/// when no sample has an extractable answer).
fn group_agreement(texts: &[&str]) -> (f64, Option<String>) {
    let Some(label) = majority_label(texts) else {
        return (0.0, None);
    };
    let agree = texts
        .iter()
        .filter(|t| extract_answer(t).is_some_and(|e| equivalent(&e.answer, &label)))
        .count();
    (
        agree as f64 / texts.len().max(1) as f64,
        Some(format!("{label:?}")),
    )
}

/// KL(policy ‖ base) per token on the probe prompts (nats): two samples of each from the
/// policy at temperature 1, their log-probs as decoded minus the base model's (no
/// adapter) on the same tokens, averaged over the tokens (the unbiased k1 estimator).
fn probe_kl(
    runtime: &Runtime,
    probes: &[&EvalItem],
    eval_config: &EvalConfig,
    config: &LearnConfig,
) -> Result<f64> {
    let model = runtime.model();
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for (k, item) in probes.iter().enumerate() {
        let seed = config.seed ^ 0x9e37_79b9 ^ k as u64;
        let result = runtime.generate(eval::request(
            &item.question,
            2,
            eval_config,
            1.0,
            seed,
            &[],
        ))?;
        let completions: Vec<&[u32]> = result
            .traces
            .iter()
            .map(|t| t.trace.tokens.as_slice())
            .filter(|c| !c.is_empty())
            .collect();
        if completions.is_empty() {
            continue;
        }
        let base = verity::train::completion_logprobs(
            &model.transformer,
            result.prompt_ids(),
            &completions,
            None,
        )?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2::<f32>()?;
        let policy = result.traces.iter().filter(|t| !t.trace.tokens.is_empty());
        for (t, base_row) in policy.zip(&base) {
            for (s, b) in t.trace.stats.iter().zip(base_row) {
                sum += f64::from(s.logprob) - f64::from(*b);
                tokens += 1;
            }
        }
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Held-out greedy accuracy with the adapter.
pub fn heldout_accuracy(
    runtime: &Runtime,
    items: &[EvalItem],
    max_tokens: usize,
    adapter: Option<&str>,
) -> Result<f64> {
    let config = EvalConfig {
        n: 1,
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        rules: vec![SelectionRule::Greedy],
        online: Vec::new(),
        parallel: None,
        adapter: adapter.map(str::to_string),
        // Greedy questions are short requests: many in flight fill the batch.
        concurrency: 16,
    };
    let results = eval::run(runtime, items, &config, |_, _| {}, None)?;
    Ok(results.first().map(|r| r.accuracy()).unwrap_or(0.0))
}

/// Runs the loop on the runtime's learning adapter and trainer; `progress(step, metrics)`
/// is called after every step.
pub fn learn(
    runtime: &Runtime,
    train: &[EvalItem],
    heldout: &[EvalItem],
    config: &LearnConfig,
    mut progress: impl FnMut(&StepMetrics),
) -> Result<LearnReport> {
    if train.is_empty() || config.group < 2 || config.prompts_per_step == 0 {
        return Err(Error::InvalidArgument(
            "need training items, a group of at least 2 and at least one prompt per step".into(),
        ));
    }
    eval::require_chat_template(runtime, "rl")?;
    std::fs::create_dir_all(&config.out).map_err(|e| Error::io(&config.out, e))?;
    let metrics_path = config.out.join("metrics.jsonl");
    let mut metrics_file =
        std::fs::File::create(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
    let model = runtime.model().clone();
    let adapter = runtime.learning_adapter();
    let adapter_id = runtime.learning_adapter_id().to_string();
    let eval_config = EvalConfig {
        n: config.group,
        max_tokens: config.max_tokens,
        temperature: config.temperature,
        top_p: 1.0,
        seed: config.seed,
        rules: Vec::new(),
        online: Vec::new(),
        parallel: None,
        adapter: Some(adapter_id.clone()),
        concurrency: 1,
    };
    let checkpoints = config.out.join("checkpoints");
    let mut best: Option<(f64, PathBuf)>;
    let mut guard = CollapseGuard::new(GuardConfig::default());
    // Fixed prompts on which the policy's distance from the base model is measured.
    let probes: Vec<&EvalItem> = train.iter().take(4).collect();
    let mut rollbacks = 0;
    let mut stopped = None;
    // The guard's last reading of the policy as it stands (label-free runs), and the
    // standard error of the best checkpoint's health.
    let mut last_health: Option<(f64, f64)> = None;
    let mut best_stderr = 0.0;
    let mut heldout_before = None;
    // The starting adapter is the first checkpoint: a collapse before a better one
    // exists goes back to it (without labels any healthy checkpoint outranks it).
    let start_dir = save_versioned(&adapter, model.config(), &checkpoints, "policy")?;
    if heldout.is_empty() {
        best = Some((f64::NEG_INFINITY, start_dir));
    } else {
        let acc = heldout_accuracy(runtime, heldout, config.max_tokens, Some(&adapter_id))?;
        best = Some((acc, start_dir));
        heldout_before = Some(acc);
    }
    let mut all = Vec::new();
    // The rollouts of one step: its prompts, submitted to the engine (which decodes them on
    // its own thread while this one trains, when `overlap` is on).
    let submit = |step: usize| -> Result<(Instant, Vec<(Generation, &EvalItem)>)> {
        let start = Instant::now();
        let submitted = (0..config.prompts_per_step)
            .map(|k| {
                let item = &train[((step - 1) * config.prompts_per_step + k) % train.len()];
                let seed = config
                    .seed
                    .wrapping_add((step as u64) << 16)
                    .wrapping_add(k as u64 * 1000);
                let generation = runtime.submit(eval::request(
                    &item.question,
                    config.group,
                    &eval_config,
                    config.temperature,
                    seed,
                    &[],
                ))?;
                Ok((generation, item))
            })
            .collect::<Result<_>>()?;
        Ok((start, submitted))
    };
    let mut next = Some(submit(1)?);
    // Without labels the best starts unmeasured (not finite): there is no held-out point.
    let mut heldout_curve: Vec<(usize, f64)> = (best.iter())
        .filter(|(acc, _)| acc.is_finite())
        .map(|(acc, _)| (0, *acc))
        .collect();
    for step in 1..=config.steps {
        // Rollout time runs from submission (with `overlap`, during the previous step's
        // training) to the last completion.
        let (rollout_start, submitted) = match next.take() {
            Some(s) => s,
            None => submit(step)?,
        };
        let mut groups: Vec<(Vec<u32>, GenerateResult, &EvalItem)> = Vec::new();
        for (generation, item) in submitted {
            let result = generation.blocking_result()?;
            groups.push((result.prompt_ids().to_vec(), result, item));
        }
        let rollout_seconds = rollout_start.elapsed().as_secs_f64();
        let generated: usize = groups.iter().map(|(_, r, _)| r.generated_tokens()).sum();

        let mut rollouts = Vec::new();
        let (mut correct, mut total, mut label_right, mut labels) =
            (0usize, 0usize, 0usize, 0usize);
        let mut majority_answers = Vec::new();
        let mut agreements = Vec::new();
        let mut finished = Vec::new();
        for (g, (prompt, result, item)) in groups.iter().enumerate() {
            let traces: Vec<_> = result.traces.iter().map(|t| &t.trace).collect();
            let texts: Vec<&str> = traces.iter().map(|t| t.text.as_str()).collect();
            let truth = reference_answer(&item.answer);
            let rewards = match config.reward {
                RewardKind::Verifier => verifier_rewards(&MathVerifier, &texts, &item.answer),
                RewardKind::Intuitor => intuitor_rewards(
                    &traces
                        .iter()
                        .map(|t| t.stats.as_slice())
                        .collect::<Vec<_>>(),
                ),
                RewardKind::Entropy => entropy_rewards(
                    &traces
                        .iter()
                        .map(|t| t.stats.as_slice())
                        .collect::<Vec<_>>(),
                ),
                RewardKind::Rlpr => {
                    rlpr_rewards(&model, Some(&adapter), prompt, &texts, &item.answer)?
                }
                RewardKind::Ttrl => {
                    let (r, label) = ttrl_rewards(&texts);
                    if let (Some(l), Some(t)) = (&label, &truth) {
                        labels += 1;
                        label_right += equivalent(l, t) as usize;
                    }
                    r
                }
            };
            let (agreement, majority) = group_agreement(&texts);
            agreements.push(agreement);
            let done: Vec<(&str, bool)> = traces
                .iter()
                .map(|t| (t.text.as_str(), t.finish != FinishReason::Length))
                .collect();
            finished.push(finished_agreement(&item.question, &done));
            majority_answers.push(majority);
            let true_rewards = verifier_rewards(&MathVerifier, &texts, &item.answer);
            correct += true_rewards.iter().filter(|&&r| r >= 1.0).count();
            total += texts.len();
            for (t, reward) in traces.iter().zip(rewards) {
                if t.tokens.is_empty() {
                    continue;
                }
                rollouts.push(Rollout {
                    group: g,
                    prompt: prompt.clone(),
                    completion: t.tokens.clone(),
                    decode_logprobs: t.stats.iter().map(|s| s.logprob).collect(),
                    adapter_version: t.adapter_version,
                    reward,
                });
            }
        }
        let entropy = mean(groups.iter().flat_map(|(_, r, _)| {
            r.traces
                .iter()
                .flat_map(|t| t.trace.stats.iter().map(|s| s.entropy as f64))
        }));
        let traces = || groups.iter().flat_map(|(_, r, _)| r.traces.iter());
        let rollout_count = traces().count().max(1) as f64;
        let mean_length =
            traces().map(|t| t.trace.tokens.len() as f64).sum::<f64>() / rollout_count;
        let truncated = traces()
            .filter(|t| t.trace.finish == FinishReason::Length)
            .count() as f64
            / rollout_count;
        if config.overlap && step < config.steps {
            // Bounded staleness of one step: the next rollouts decode with this step's
            // adapter version while it trains; each trace records the version it used.
            next = Some(submit(step + 1)?);
        }
        let report = runtime.train_on(&rollouts)?;
        let mut m = StepMetrics {
            reward: mean(rollouts.iter().map(|r| r.reward)),
            sample_accuracy: correct as f64 / total.max(1) as f64,
            label_accuracy: (labels > 0).then(|| label_right as f64 / labels as f64),
            entropy,
            tokens_per_second: generated as f64 / rollout_seconds.max(1e-9),
            rollout_seconds,
            train_seconds: report.train_time.as_secs_f64(),
            handoff_microseconds: report.handoff_time.as_secs_f64() * 1e6,
            heldout_accuracy: None,
            agreement: mean(agreements.iter().copied()),
            finished_agreement: mean(finished.iter().map(|f| f.agreement)),
            answered: mean(finished.iter().map(|f| f.answered)),
            echoed: mean(finished.iter().map(|f| f.echoed)),
            mean_length,
            truncated,
            probe_kl: None,
            health: None,
            guard: None,
            rolled_back: false,
            train: report,
        };
        // Collapse guard.
        let evaluate = !heldout.is_empty()
            && (step == config.steps || (config.eval_every > 0 && step % config.eval_every == 0));
        if evaluate {
            let acc = heldout_accuracy(runtime, heldout, config.max_tokens, Some(&adapter_id))?;
            m.heldout_accuracy = Some(acc);
            heldout_curve.push((step, acc));
            match &best {
                Some((b, dir)) if acc < b - config.collapse_drop => {
                    runtime.restore_learning_adapter(dir)?;
                    runtime.scale_learning_rate(0.5);
                    rollbacks += 1;
                    m.rolled_back = true;
                }
                Some((b, _)) if acc <= *b => {}
                _ => {
                    let dir = save_versioned(&adapter, model.config(), &checkpoints, "policy")?;
                    best = Some((acc, dir));
                }
            }
        } else if heldout.is_empty() {
            // No labels: the label-free guard reads the step (and, every `eval_every`
            // steps, the policy's distance from the base on the probe prompts).
            let probe_now = config.eval_every > 0 && step % config.eval_every == 0;
            if probe_now {
                m.probe_kl = Some(probe_kl(runtime, &probes, &eval_config, config)?);
                // Every probed policy is kept as it is, so that it can be scored afterwards
                // on labels the run never saw (what a labelled guard would have picked).
                let snapshot = checkpoints.join("steps").join(format!("step-{step:04}"));
                save_peft(&adapter, model.config(), &snapshot, "")?;
            }
            // The guard judges rewards that need no reference answers: only those can rise
            // while the answers get worse. A verifier's reward is itself the measure (its
            // sharpening, confident agreement on right answers, is what the guard's
            // entropy rule reads as collapse).
            let signals = StepSignals {
                agreement: m.agreement,
                finished_agreement: m.finished_agreement,
                answered: m.answered,
                echoed: m.echoed,
                entropy,
                majority_answers,
                length: mean_length,
                truncated,
                probe_kl: m.probe_kl,
            };
            let verdict = if config.reward.is_label_free() {
                guard.observe(signals)
            } else {
                Verdict::Warming
            };
            last_health = match &verdict {
                Verdict::Healthy { health, stderr } => Some((*health, *stderr)),
                _ => None,
            };
            m.health = last_health.map(|(h, _)| h);
            match verdict {
                Verdict::Collapsed { reasons } => {
                    if let Some((_, dir)) = &best {
                        runtime.restore_learning_adapter(dir)?;
                    }
                    runtime.scale_learning_rate(0.5);
                    guard.reset_window();
                    rollbacks += 1;
                    m.rolled_back = true;
                    m.guard = Some(reasons);
                }
                // Checkpoints are ranked by label-free health; the best is kept. The first
                // reading covers the first steps, the policy nearest the base: it is the
                // starting checkpoint's health, which a later one must beat beyond noise.
                Verdict::Healthy { health, stderr } => match &mut best {
                    Some((b, _)) if !b.is_finite() => {
                        *b = health;
                        best_stderr = stderr;
                    }
                    Some((b, _)) if probe_now && outranks((health, stderr), (*b, best_stderr)) => {
                        let dir = save_versioned(&adapter, model.config(), &checkpoints, "policy")?;
                        best = Some((health, dir));
                        best_stderr = stderr;
                    }
                    _ => {}
                },
                Verdict::Warming => {}
            }
        }
        let line = serde_json::to_string(&m).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        writeln!(metrics_file, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        progress(&m);
        all.push(m);
        let curve = crate::plot::LearningCurve {
            reward: (all.iter().enumerate())
                .map(|(i, m)| (i + 1, m.reward))
                .collect(),
            heldout: heldout_curve.clone(),
            health: (all.iter().enumerate())
                .filter_map(|(i, m)| m.health.map(|h| (i + 1, h)))
                .collect(),
            rollbacks: (all.iter().enumerate())
                .filter(|(_, m)| m.rolled_back)
                .map(|(i, _)| i + 1)
                .collect(),
        };
        crate::plot::learning_curve(&config.out.join("plot.png"), &curve)?;
        if rollbacks >= MAX_ROLLBACKS {
            stopped = Some(format!(
                "stopped at step {step} of {}: the collapse guard rolled back {rollbacks} times",
                config.steps
            ));
            break;
        }
    }
    // Without labels, the run keeps its healthiest checkpoint unless the policy as it
    // stands reads healthier beyond noise.
    let mut kept_checkpoint = None;
    if heldout.is_empty() {
        if let Some((health, dir)) = &best {
            if health.is_finite()
                && last_health.is_none_or(|last| !outranks(last, (*health, best_stderr)))
            {
                runtime.restore_learning_adapter(dir)?;
                kept_checkpoint = Some((*health, dir.clone()));
            }
        }
    }
    // The adapter as it stands now: after a final rollback it is the restored checkpoint,
    // so it is measured again rather than taken from the metrics.
    let heldout_after = match all.iter().rev().find(|m| m.heldout_accuracy.is_some()) {
        Some(m) if m.rolled_back => Some(heldout_accuracy(
            runtime,
            heldout,
            config.max_tokens,
            Some(&adapter_id),
        )?),
        Some(m) => m.heldout_accuracy,
        None => heldout_before,
    };
    Ok(LearnReport {
        heldout_before,
        heldout_after,
        kept_checkpoint,
        stopped,
        steps: all,
    })
}

/// Rollbacks after which a run stops: each one halves the learning rate, so by then the
/// policy keeps drifting to a collapse at an eighth of the rate it started with.
const MAX_ROLLBACKS: usize = 3;

/// What [`learn`] did: the held-out accuracy of the adapter it started from and of the one
/// it leaves (when a held-out set was given), and every step's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct LearnReport {
    pub heldout_before: Option<f64>,
    pub heldout_after: Option<f64>,
    /// Without labels: the checkpoint (its label-free health and folder) the run ended on
    /// instead of the last policy, when that read less healthy.
    pub kept_checkpoint: Option<(f64, PathBuf)>,
    /// Why training ended before its last step, when it did.
    pub stopped: Option<String>,
    pub steps: Vec<StepMetrics>,
}
