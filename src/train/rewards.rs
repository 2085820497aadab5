//! Rewards for a group of rollouts of one prompt: from a verifier, or without one —
//! INTUITOR (the sample's self-certainty, normalised within its group) and TTRL (agreement
//! with the group's majority answer as a pseudo-label) — combined with weights, with an
//! optional length penalty.

use crate::score::{mean_self_certainty, TokenStats};
use crate::select::{select, Candidate, SelectionRule};
use crate::verify::{equivalent, extract_answer, Answer, Verifier};

/// Verifier reward of each completion against the reference.
pub fn verifier_rewards(
    verifier: &dyn Verifier,
    completions: &[&str],
    reference: &str,
) -> Vec<f64> {
    completions
        .iter()
        .map(|c| verifier.verify(c, reference).reward.clamp(0.0, 1.0))
        .collect()
}

/// INTUITOR: mean self-certainty of each sample, z-scored within the group (all zero when
/// the group is constant or empty).
pub fn intuitor_rewards(stats: &[&[TokenStats]]) -> Vec<f64> {
    let raw: Vec<f64> = stats
        .iter()
        .map(|s| mean_self_certainty(s).unwrap_or(0.0))
        .collect();
    let n = raw.len().max(1) as f64;
    let mean = raw.iter().sum::<f64>() / n;
    let std = (raw.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    raw.iter()
        .map(|r| if std > 1e-12 { (r - mean) / std } else { 0.0 })
        .collect()
}

/// TTRL's pseudo-label: the majority answer among the completions, if any has an answer.
pub fn majority_label(completions: &[&str]) -> Option<Answer> {
    let candidates: Vec<Candidate> = completions
        .iter()
        .map(|c| Candidate::new(extract_answer(c).map(|e| e.answer)))
        .collect();
    select(&SelectionRule::Majority, &candidates).answer
}

/// TTRL: 1 for completions whose answer matches the majority pseudo-label, else 0. Also
/// returns the label (to log its accuracy when the true answer is known).
pub fn ttrl_rewards(completions: &[&str]) -> (Vec<f64>, Option<Answer>) {
    let label = majority_label(completions);
    let rewards = completions
        .iter()
        .map(|c| match (&label, extract_answer(c)) {
            (Some(l), Some(e)) if equivalent(l, &e.answer) => 1.0,
            _ => 0.0,
        })
        .collect();
    (rewards, label)
}

/// Weighted sum of reward vectors of equal length.
pub fn combine(parts: &[(f64, Vec<f64>)]) -> Vec<f64> {
    let n = parts.first().map(|(_, r)| r.len()).unwrap_or(0);
    (0..n)
        .map(|i| {
            parts
                .iter()
                .map(|(w, r)| w * r.get(i).copied().unwrap_or(0.0))
                .sum()
        })
        .collect()
}

/// Subtracts `coef · max(0, len − target) / target` from each reward (0 = off).
pub fn length_penalty(rewards: &mut [f64], lengths: &[usize], target: usize, coef: f64) {
    if coef == 0.0 || target == 0 {
        return;
    }
    for (r, &len) in rewards.iter_mut().zip(lengths) {
        *r -= coef * len.saturating_sub(target) as f64 / target as f64;
    }
}
