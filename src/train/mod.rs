//! The in-process trainer: GRPO-family updates of a LoRA adapter from scored rollouts.
//!
//! A step takes groups of rollouts (G completions of one prompt, each with a reward),
//! turns rewards into group-relative advantages, drops groups without signal (dynamic
//! sampling), scores the completions with `forward_train` (prompt tokens masked), forms the
//! clipped policy loss, accumulates gradients over micro-batches, and — unless the loss,
//! the gradient or the updated weights are not finite, in which case the step is skipped
//! and counted — applies AdamW and publishes the new values as the adapter's next snapshot, so the engine's next
//! decode step uses them (see `LoraAdapter::publish`).

pub mod advantage;
pub mod guard;
pub mod loss;
pub mod optim;
pub mod rewards;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ops, LoraAdapter, Transformer};
pub use advantage::{group_advantages, has_signal, ScaleRewards};
pub use loss::{policy_loss, token_weights, ClipRange, LossAggregation, LossInputs};
pub use optim::{AdamW, AdamWConfig, Schedule};

/// One completion of one prompt with its reward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Completions with the same `group` share a prompt and are compared to each other.
    pub group: usize,
    /// Prompt token ids (conditioning only; no loss on them).
    pub prompt: Vec<u32>,
    /// Generated token ids, the ones the loss is taken over; not empty.
    pub completion: Vec<u32>,
    /// log π of each completion token as recorded while decoding.
    pub decode_logprobs: Vec<f32>,
    /// Adapter version that decoded it.
    pub adapter_version: u64,
    /// Scalar reward, usually in [0, 1] from a verifier.
    pub reward: f64,
}

/// Settings of a [`Trainer`]; the defaults are DAPO-like (token-level loss, clip-higher,
/// dynamic sampling, no KL).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Optimizer and learning-rate schedule.
    pub optimizer: AdamWConfig,
    /// Clip range of the probability ratio.
    pub clip: ClipRange,
    /// How per-token terms become the loss.
    pub aggregation: LossAggregation,
    /// What centred rewards are divided by.
    pub scale_rewards: ScaleRewards,
    /// KL coefficient to the base policy (adapter off), k3 estimator; 0 = off.
    pub beta: f64,
    /// Skip groups whose rewards are all equal.
    pub dynamic_sampling: bool,
    /// Sequences per forward/backward pass.
    pub micro_batch: usize,
    /// Dr. GRPO's normaliser.
    pub max_completion_len: usize,
    /// Use the decode-time log-probs as π_old when the rollout's adapter version is the
    /// current one; otherwise (and always when false) π_old is recomputed with the training
    /// forward, and the decode/train mismatch enters as a truncated importance weight.
    pub use_decode_logprobs: bool,
    /// Cap of the truncated importance weight exp(log π_old − log π_decode).
    pub tis_cap: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            optimizer: AdamWConfig::default(),
            clip: ClipRange::default(),
            aggregation: LossAggregation::default(),
            scale_rewards: ScaleRewards::default(),
            beta: 0.0,
            dynamic_sampling: true,
            micro_batch: 8,
            max_completion_len: 512,
            use_decode_logprobs: false,
            tis_cap: 2.0,
        }
    }
}

impl TrainConfig {
    /// Errors with [`Error::OutOfRange`] on a setting that would make a step non-finite or
    /// meaningless (the optimizer's, see [`AdamWConfig::validate`]; clip distances, the KL
    /// coefficient and the importance-weight cap), and on zero sizes.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        let finite_non_negative = |x: f64| x.is_finite() && x >= 0.0;
        for (what, x) in [
            ("clip eps_low", self.clip.eps_low),
            ("clip eps_high", self.clip.eps_high),
            ("beta (KL coefficient)", self.beta),
        ] {
            if !finite_non_negative(x) {
                return Err(Error::OutOfRange(format!(
                    "training {what} must be finite and non-negative, got {x}"
                )));
            }
        }
        if !(self.tis_cap.is_finite() && self.tis_cap >= 1.0) {
            return Err(Error::OutOfRange(format!(
                "training tis_cap must be finite and at least 1, got {}",
                self.tis_cap
            )));
        }
        if self.micro_batch == 0 || self.max_completion_len == 0 {
            return Err(Error::OutOfRange(
                "training micro_batch and max_completion_len must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The largest reward magnitude accepted, from feedback or in a rollout. Group statistics
/// square reward differences: beyond this they stop being meaningful long before f64
/// overflows (a reward of 1e308 made the next step's loss NaN).
pub const MAX_ABS_REWARD: f64 = 1e6;

/// A reward is a finite number within ±[`MAX_ABS_REWARD`]; else [`Error::OutOfRange`].
pub fn check_reward(reward: f64) -> Result<()> {
    if reward.is_finite() && reward.abs() <= MAX_ABS_REWARD {
        Ok(())
    } else {
        Err(Error::OutOfRange(format!(
            "a reward must be a finite number within ±{MAX_ABS_REWARD:e}, got {reward}"
        )))
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    /// 1-based count of calls to [`Trainer::step`], skipped steps included.
    pub step: u64,
    /// The adapter version after the step (unchanged if nothing was applied).
    pub version: u64,
    /// Whether the weights were updated and a new snapshot published.
    pub applied: bool,
    /// Why nothing was applied, if so.
    pub skipped: Option<String>,
    /// The aggregated policy loss, summed over micro-batches.
    pub loss: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// Share of tokens whose ratio left the clip range, averaged over sequences.
    pub clip_fraction: f64,
    /// Learning rate of the update (0 if none was applied).
    pub lr: f64,
    /// Mean reward over all rollouts given, skipped groups included.
    pub reward_mean: f64,
    /// Groups that entered the loss.
    pub groups_used: usize,
    /// Groups dropped for having no reward variance (dynamic sampling).
    pub groups_skipped: usize,
    /// Completion tokens in the groups used.
    pub tokens: usize,
    /// Wall time of the whole step.
    #[serde(with = "seconds")]
    pub train_time: Duration,
    /// Time from the new weights' existence to the decoder's use of them: one snapshot
    /// swap, which never waits for a decode step (see `LoraAdapter::publish`).
    #[serde(with = "seconds")]
    pub handoff_time: Duration,
}

/// Durations as seconds (f64) in JSON, e.g. `"train_time": 0.61`.
mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

/// Runs GRPO-family steps on one LoRA adapter; each applied step publishes a new adapter
/// version that decoding picks up at its next step.
pub struct Trainer {
    /// The adapter being trained (shared with the engine that decodes with it).
    pub adapter: Arc<LoraAdapter>,
    /// Step settings; `config.optimizer` is copied into the optimizer at construction.
    pub config: TrainConfig,
    optimizer: AdamW,
    steps: u64,
    skipped_nonfinite: u64,
}

/// Per-token log-probs (B, T) of `completions` after a shared `prompt` (right-padded;
/// entries past a completion's end are meaningless), differentiable w.r.t. the adapter.
/// The prompt is computed once for all B completions (see
/// [`Transformer::forward_train_hidden_after`]).
pub fn completion_logprobs(
    model: &Transformer,
    prompt: &[u32],
    completions: &[&[u32]],
    adapter: Option<&LoraAdapter>,
) -> Result<Tensor> {
    let t_max = completions.iter().map(|c| c.len()).max().unwrap_or(0);
    let p = prompt.len();
    if p == 0 || t_max == 0 {
        return Err(Error::InvalidArgument(
            "log-probs of completions need a prompt and at least one completion token".into(),
        ));
    }
    let rows: Vec<u32> = completions
        .iter()
        .flat_map(|c| {
            c.iter()
                .copied()
                .chain(std::iter::repeat_n(0, t_max - c.len()))
        })
        .collect();
    let b = completions.len();
    let device = model.device();
    let prefix = Tensor::from_vec(prompt.to_vec(), (1, p), device)?;
    let tokens = Tensor::from_vec(rows, (b, t_max), device)?;
    let (prefix_hidden, hidden) =
        model.forward_train_hidden_after(Some(&prefix), &tokens, adapter)?;
    let prefix_hidden = prefix_hidden.ok_or_else(|| Error::InvalidArgument("no prompt".into()))?;
    // The prompt's last row predicts completion token 0; completion row j predicts j + 1.
    let last = prefix_hidden
        .narrow(1, p - 1, 1)?
        .broadcast_as((b, 1, hidden.dim(2)?))?;
    let predicting = if t_max > 1 {
        Tensor::cat(&[&last, &hidden.narrow(1, 0, t_max - 1)?], 1)?
    } else {
        last.contiguous()?
    };
    let logp = ops::log_softmax(&model.lm_head_train(&predicting)?)?;
    Ok(logp
        .gather(&tokens.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?)
}

impl Trainer {
    /// A trainer at step 0 with fresh optimizer state.
    pub fn new(adapter: Arc<LoraAdapter>, config: TrainConfig) -> Self {
        Self {
            optimizer: AdamW::new(config.optimizer.clone()),
            adapter,
            config,
            steps: 0,
            skipped_nonfinite: 0,
        }
    }

    /// Multiplies the learning rate (the collapse guard halves it after a rollback).
    pub fn scale_lr(&mut self, factor: f64) {
        self.optimizer.config.lr *= factor;
    }

    /// Updates AdamW has applied (skipped steps do not count; the schedule follows these).
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer.steps_taken()
    }

    /// Steps skipped because the loss, the gradient or the updated weights were not finite.
    pub fn skipped_nonfinite(&self) -> u64 {
        self.skipped_nonfinite
    }

    /// One update from `rollouts` (grouped by their `group` field), scored with `model`
    /// and the adapter. A step with no usable group or a non-finite loss or gradient
    /// leaves the weights alone and says why in [`StepReport::skipped`]. Errors on an
    /// empty prompt or completion, mismatched log-prob counts, or a group whose prompts
    /// differ.
    pub fn step(&mut self, model: &Transformer, rollouts: &[Rollout]) -> Result<StepReport> {
        self.step_with(model, rollouts, |_| {})
    }

    /// [`Self::step`] with a hook that sees (and may change) the gradients before the
    /// finiteness check (tests inject NaN through it).
    #[doc(hidden)]
    pub fn step_with(
        &mut self,
        model: &Transformer,
        rollouts: &[Rollout],
        hook: impl FnOnce(&mut [Option<Tensor>]),
    ) -> Result<StepReport> {
        let start = Instant::now();
        let c = &self.config;
        self.steps += 1;
        let mut report = StepReport {
            step: self.steps,
            version: self.adapter.version(),
            reward_mean: rollouts.iter().map(|r| r.reward).sum::<f64>()
                / rollouts.len().max(1) as f64,
            ..Default::default()
        };
        for r in rollouts {
            check_reward(r.reward)?;
            if r.completion.is_empty() || r.prompt.is_empty() {
                return Err(Error::InvalidArgument(
                    "a rollout has an empty prompt or completion".into(),
                ));
            }
            if r.decode_logprobs.len() != r.completion.len() {
                return Err(Error::InvalidArgument(format!(
                    "a rollout has {} decode log-probs for {} completion tokens",
                    r.decode_logprobs.len(),
                    r.completion.len()
                )));
            }
        }
        // Groups → advantages; groups without signal are dropped.
        let mut groups: BTreeMap<usize, Vec<&Rollout>> = BTreeMap::new();
        for r in rollouts {
            groups.entry(r.group).or_default().push(r);
        }
        let (mut kept, mut rewards) = (Vec::new(), Vec::new());
        for g in groups.values() {
            let rs: Vec<f64> = g.iter().map(|r| r.reward).collect();
            if c.dynamic_sampling && !has_signal(&rs) {
                report.groups_skipped += 1;
                continue;
            }
            if g.iter().any(|r| r.prompt != g[0].prompt) {
                return Err(Error::InvalidArgument(
                    "rollouts of one group must share their prompt".into(),
                ));
            }
            kept.push(g.clone());
            rewards.push(rs);
        }
        report.groups_used = kept.len();
        if kept.is_empty() {
            report.skipped = Some("no group with reward variance".into());
            return Ok(report);
        }
        let advantages = group_advantages(&rewards, c.scale_rewards);
        let lengths: Vec<usize> = kept.iter().flatten().map(|r| r.completion.len()).collect();
        let total_tokens: usize = lengths.iter().sum();
        report.tokens = total_tokens;
        let weights = token_weights(
            c.aggregation,
            &lengths,
            total_tokens,
            lengths.len(),
            c.max_completion_len,
        );

        let vars = self.adapter.vars();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut clip_sum, mut clip_n) = (0f64, 0f64, 0f64);
        let current = self.adapter.version();
        let device = model.device().clone();
        let dtype = model.dtype();
        let mut seq = 0;
        for (group, adv) in kept.iter().zip(&advantages) {
            for (chunk, adv_chunk) in group
                .chunks(c.micro_batch.max(1))
                .zip(adv.chunks(c.micro_batch.max(1)))
            {
                let prompt = &chunk[0].prompt;
                let completions: Vec<&[u32]> =
                    chunk.iter().map(|r| r.completion.as_slice()).collect();
                let t_max = completions.iter().map(|x| x.len()).max().unwrap_or(0);
                let b = chunk.len();
                let logp = completion_logprobs(model, prompt, &completions, Some(&self.adapter))?;
                // π_old and the per-token weights (aggregation × mask × importance cap).
                let mut old = Vec::with_capacity(b * t_max);
                let mut w = Vec::with_capacity(b * t_max);
                let recomputed: Vec<Vec<f32>> = logp.to_dtype(DType::F32)?.to_vec2()?;
                for (i, r) in chunk.iter().enumerate() {
                    let decode_ok = c.use_decode_logprobs && r.adapter_version == current;
                    for (j, &train_old) in recomputed[i].iter().enumerate() {
                        if j < r.completion.len() {
                            let decode = r.decode_logprobs[j];
                            old.push(if decode_ok { decode } else { train_old });
                            let tis = if decode_ok {
                                1.0
                            } else {
                                ((train_old - decode) as f64).exp().min(c.tis_cap)
                            };
                            w.push((weights[seq + i] * tis) as f32);
                        } else {
                            old.push(0.0);
                            w.push(0.0);
                        }
                    }
                }
                let logp_old = Tensor::from_vec(old, (b, t_max), &device)?.to_dtype(dtype)?;
                let wt = Tensor::from_vec(w, (b, t_max), &device)?.to_dtype(dtype)?;
                let adv_t = Tensor::from_vec(
                    adv_chunk.iter().map(|a| *a as f32).collect::<Vec<_>>(),
                    (b, 1),
                    &device,
                )?
                .to_dtype(dtype)?;
                let logp_ref = if c.beta > 0.0 {
                    Some(completion_logprobs(model, prompt, &completions, None)?.detach())
                } else {
                    None
                };
                let (loss, clip_frac) = policy_loss(&LossInputs {
                    logp: &logp,
                    logp_old: &logp_old,
                    logp_ref: logp_ref.as_ref(),
                    advantages: &adv_t,
                    weights: &wt,
                    clip: c.clip,
                    beta: c.beta,
                })?;
                loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                clip_sum += clip_frac.to_dtype(DType::F64)?.to_scalar::<f64>()? * b as f64;
                clip_n += b as f64;
                let store = loss.backward()?;
                for (slot, var) in grads.iter_mut().zip(&vars) {
                    if let Some(g) = store.get(var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g.clone(),
                        });
                    }
                }
                seq += b;
            }
        }
        hook(&mut grads);
        let grad_norm = AdamW::grad_norm(&grads)?;
        report.loss = loss_sum;
        report.grad_norm = grad_norm;
        report.clip_fraction = if clip_n > 0.0 { clip_sum / clip_n } else { 0.0 };
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            self.skipped_nonfinite += 1;
            report.skipped = Some(format!(
                "non-finite loss ({loss_sum}) or gradient norm ({grad_norm}); weights untouched"
            ));
            report.train_time = start.elapsed();
            return Ok(report);
        }
        let Some((version, lr, handoff)) = self.optimizer.step(&self.adapter, &grads, grad_norm)?
        else {
            self.skipped_nonfinite += 1;
            report.skipped = Some(
                "the update would make a weight non-finite; weights and optimizer state untouched"
                    .into(),
            );
            report.train_time = start.elapsed();
            return Ok(report);
        };
        report.handoff_time = handoff;
        report.version = version;
        report.lr = lr;
        report.applied = true;
        report.train_time = start.elapsed();
        Ok(report)
    }
}
