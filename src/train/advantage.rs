//! Group-relative advantages (GRPO): each prompt's G rewards become
//! `A_i = (r_i − mean r) / (std r + ε)`, with the std taken over the group, the whole
//! batch, or not at all (Dr. GRPO). Groups whose rewards are all equal carry no signal and
//! can be dropped (dynamic sampling).

use serde::{Deserialize, Serialize};

/// Added to the standard deviation, as TRL does.
pub const ADVANTAGE_EPS: f64 = 1e-4;

/// What a group's centred rewards are divided by before they become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation (GRPO).
    #[default]
    Group,
    /// Divide by the standard deviation of every reward in the batch.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

impl std::str::FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" => Ok(Self::Group),
            "batch" => Ok(Self::Batch),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown scale_rewards '{other}' (group, batch, none)"
            )),
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Population standard deviation (as torch's `std` with correction 0 would give; TRL uses
/// the unbiased one, which differs by √(G/(G−1)) — we follow the DESIGN formula literally).
fn std(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// Advantages for `groups` of rewards, in the same shape.
pub fn group_advantages(groups: &[Vec<f64>], scale: ScaleRewards) -> Vec<Vec<f64>> {
    let all: Vec<f64> = groups.iter().flatten().copied().collect();
    let batch_std = std(&all);
    groups
        .iter()
        .map(|g| {
            let m = mean(g);
            let denom = match scale {
                ScaleRewards::Group => std(g) + ADVANTAGE_EPS,
                ScaleRewards::Batch => batch_std + ADVANTAGE_EPS,
                ScaleRewards::None => 1.0,
            };
            g.iter().map(|r| (r - m) / denom).collect()
        })
        .collect()
}

/// Whether a group carries signal (its rewards are not all equal).
pub fn has_signal(rewards: &[f64]) -> bool {
    rewards.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-12)
}
