//! Per-token statistics from one raw logits row: the chosen token's log-probability,
//! entropy, self-certainty and DeepConf's top-k confidence. This is the one place these
//! formulas live (DESIGN.md, "Formulas"); everything else calls [`token_stats`].
//!
//! With p = softmax(z) over V entries:
//! - log-prob  = z[t] − logsumexp(z)
//! - entropy   = −Σ p ln p = logsumexp(z) − Σ p z
//! - self-certainty = KL(U ‖ p) = logsumexp(z) − mean(z) − ln V
//! - confidence = −(1/k) Σ_{top-k} ln p

use serde::{Deserialize, Serialize};

/// DeepConf's default k.
pub const DEFAULT_TOP_K: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenStats {
    pub logprob: f32,
    pub entropy: f32,
    pub self_certainty: f32,
    /// DeepConf token confidence over the top `k` log-probs.
    pub confidence: f32,
}

/// Statistics of `row` (raw logits, before temperature or truncation) for the chosen token.
/// Two passes over the row; accumulations in f64.
pub fn token_stats(row: &[f32], chosen: u32, top_k: usize) -> TokenStats {
    let v = row.len();
    if v == 0 {
        return TokenStats::default();
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum_exp = 0f64;
    let mut sum_exp_z = 0f64;
    let mut sum_z = 0f64;
    let k = top_k.clamp(1, v);
    // The k largest logits, kept sorted ascending; most entries fail the first comparison.
    let mut top: Vec<f32> = Vec::with_capacity(k + 1);
    for &z in row {
        let e = ((z - max) as f64).exp();
        sum_exp += e;
        sum_exp_z += e * z as f64;
        sum_z += z as f64;
        if top.len() < k || z > top[0] {
            let at = top.partition_point(|&x| x < z);
            top.insert(at, z);
            if top.len() > k {
                top.remove(0);
            }
        }
    }
    let lse = max as f64 + sum_exp.ln();
    let chosen_z = row
        .get(chosen as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY) as f64;
    let entropy = lse - sum_exp_z / sum_exp;
    let self_certainty = lse - sum_z / v as f64 - (v as f64).ln();
    let top_logp: f64 = top.iter().map(|&z| z as f64 - lse).sum();
    TokenStats {
        logprob: (chosen_z - lse) as f32,
        entropy: entropy as f32,
        self_certainty: self_certainty as f32,
        confidence: (-top_logp / k as f64) as f32,
    }
}
