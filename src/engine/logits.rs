//! Helpers over one logits row: the penalties and bias a request asks for, and the most
//! likely tokens with their log-probs.

use std::collections::HashMap;

use super::Penalties;

/// The row after repetition/frequency/presence penalties and logit bias.
pub(super) fn apply_penalties(row: &[f32], p: &Penalties, counts: &HashMap<u32, u32>) -> Vec<f32> {
    let mut out = row.to_vec();
    for (&id, &count) in counts {
        let Some(z) = out.get_mut(id as usize) else {
            continue;
        };
        if p.repetition > 0.0 && p.repetition != 1.0 {
            *z = if *z > 0.0 {
                *z / p.repetition
            } else {
                *z * p.repetition
            };
        }
        *z -= p.frequency * count as f32 + p.presence;
    }
    for (&id, &bias) in &p.logit_bias {
        if let Some(z) = out.get_mut(id as usize) {
            *z += bias;
        }
    }
    out
}

/// The `k` most likely tokens with their log-probs, most likely first.
pub(super) fn top_logprobs(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + row
            .iter()
            .map(|&z| ((z - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i, (row[i as usize] as f64 - lse) as f32))
        .collect()
}
