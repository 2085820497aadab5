//! The clipped policy loss of the GRPO family, per token, with its aggregation modes and
//! the optional k3 KL penalty to the base policy.
//!
//! Per token: `ρ = exp(log π_θ − log π_old)`,
//! `L = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) · w_tis + β·k3`, with
//! `k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1`.
//! Aggregation turns per-token terms into one number: `dapo` = Σ / tokens in the batch,
//! `grpo` = mean per sequence then mean, `dr_grpo` = Σ / (G · max_completion_len).
//! Each is a per-token weight, so micro-batches can be summed exactly.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// How per-token loss terms are combined into one number (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LossAggregation {
    /// Mean over each sequence's tokens, then mean over sequences (original GRPO); long
    /// completions get less weight per token.
    Grpo,
    /// Sum over tokens divided by G · max_completion_len (Dr. GRPO): a constant
    /// normaliser, so no length bias.
    DrGrpo,
    /// Sum over tokens divided by the number of tokens in the batch (DAPO's token-level
    /// mean); the default.
    #[default]
    Dapo,
}

impl std::str::FromStr for LossAggregation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "grpo" => Ok(Self::Grpo),
            "dr_grpo" => Ok(Self::DrGrpo),
            "dapo" => Ok(Self::Dapo),
            other => Err(format!(
                "unknown loss aggregation '{other}' (grpo, dr_grpo, dapo)"
            )),
        }
    }
}

/// The trust region of the ratio ρ: it is clipped to [1 − `eps_low`, 1 + `eps_high`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipRange {
    /// ε_low, the lower clip distance (0.2 by default).
    pub eps_low: f64,
    /// ε_high, the upper clip distance (0.28 by default: DAPO's clip-higher).
    pub eps_high: f64,
}

impl Default for ClipRange {
    /// DAPO's clip-higher.
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.28,
        }
    }
}

/// Weight of each token of each sequence in the aggregated loss, for sequences with
/// `lengths` completion tokens, in a batch with these totals.
pub fn token_weights(
    mode: LossAggregation,
    lengths: &[usize],
    batch_tokens: usize,
    batch_sequences: usize,
    max_completion_len: usize,
) -> Vec<f64> {
    lengths
        .iter()
        .map(|&len| match mode {
            LossAggregation::Dapo => 1.0 / batch_tokens.max(1) as f64,
            LossAggregation::Grpo => 1.0 / (len.max(1) * batch_sequences.max(1)) as f64,
            LossAggregation::DrGrpo => {
                1.0 / (batch_sequences.max(1) * max_completion_len.max(1)) as f64
            }
        })
        .collect()
}

/// Inputs of the loss for a micro-batch of B sequences padded to T completion tokens.
pub struct LossInputs<'a> {
    /// log π_θ (B, T), differentiable.
    pub logp: &'a Tensor,
    /// log π_old (B, T).
    pub logp_old: &'a Tensor,
    /// log π_ref (B, T) for the KL term, when β > 0.
    pub logp_ref: Option<&'a Tensor>,
    /// Advantage per sequence (B, 1).
    pub advantages: &'a Tensor,
    /// Per-token weight (B, T): aggregation weight × mask × truncated importance weight.
    pub weights: &'a Tensor,
    /// Clip range of the ratio.
    pub clip: ClipRange,
    /// β, the weight of the k3 KL penalty; 0 disables it (and `logp_ref` is not read).
    pub beta: f64,
}

/// The aggregated loss (a scalar) and, for logging, the clipped fraction of tokens.
pub fn policy_loss(x: &LossInputs<'_>) -> Result<(Tensor, Tensor)> {
    let log_ratio = (x.logp - x.logp_old)?;
    let ratio = log_ratio.exp()?;
    let unclipped = ratio.broadcast_mul(x.advantages)?;
    let clipped_ratio = ratio.clamp(1.0 - x.clip.eps_low, 1.0 + x.clip.eps_high)?;
    let clipped = clipped_ratio.broadcast_mul(x.advantages)?;
    let mut per_token = unclipped.minimum(&clipped)?.neg()?;
    if x.beta > 0.0 {
        if let Some(reference) = x.logp_ref {
            let d = (reference - x.logp)?;
            let k3 = ((d.exp()? - &d)? - 1.0)?;
            per_token = (per_token + (k3 * x.beta)?)?;
        }
    }
    let loss = (per_token * x.weights)?.sum_all()?;
    // Tokens whose ratio left the clip range (counted with the weights' support).
    let outside = ratio
        .ne(&clipped_ratio)?
        .to_dtype(x.weights.dtype())?
        .detach();
    let support = x.weights.gt(0.0)?.to_dtype(x.weights.dtype())?;
    let tokens = support
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    let clip_frac = ((outside * &support)?.sum_all()? / tokens)?;
    Ok((loss, clip_frac))
}
