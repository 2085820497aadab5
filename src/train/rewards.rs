//! Rewards for a group of rollouts of one prompt: from a verifier, or without one —
//! INTUITOR (the sample's self-certainty, normalised within its group), TTRL (agreement
//! with the group's majority answer as a pseudo-label), EM-RL (low entropy, the sample's
//! negative mean token entropy normalised within its group) and RLPR (the policy's
//! probability of the reference answer after the sample's reasoning) — combined with
//! weights, with an optional length penalty.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::{LoraAdapter, Model};
use crate::score::{mean_entropy, mean_self_certainty, TokenStats};
use crate::select::{select, Candidate, SelectionRule};
use crate::verify::{equivalent, extract_answer, Answer, AnswerSource, Verifier};

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
    z_scores(
        &stats
            .iter()
            .map(|s| mean_self_certainty(s).unwrap_or(0.0))
            .collect::<Vec<_>>(),
    )
}

/// EM-RL (entropy minimisation as the only reward, arXiv 2505.15134, its token-level
/// form): minus the sample's mean token entropy, z-scored within the group. The mean, not
/// the paper's sum, so that a longer sample is not rewarded for its length alone; an empty
/// sample counts as the group's mean.
pub fn entropy_rewards(stats: &[&[TokenStats]]) -> Vec<f64> {
    let raw: Vec<Option<f64>> = stats.iter().map(|s| mean_entropy(s).map(|h| -h)).collect();
    let known: Vec<f64> = raw.iter().flatten().copied().collect();
    let fill = known.iter().sum::<f64>() / known.len().max(1) as f64;
    z_scores(&raw.iter().map(|r| r.unwrap_or(fill)).collect::<Vec<_>>())
}

/// `raw` minus its mean, over its standard deviation (all zero when constant or empty).
fn z_scores(raw: &[f64]) -> Vec<f64> {
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

/// RLPR (Yu et al., 2025): the policy's own probability of the reference answer after each
/// completion's reasoning, with no verifier. A completion's reasoning is its text up to the
/// extracted final answer (inside `\boxed{` when it boxed one; the whole text followed by
/// `\boxed{` when it gave none); the reference is appended and the reward is the mean
/// per-token probability of the reference's tokens, debiased by the same
/// probability without any reasoning (`prompt` + `\boxed{` + reference) and clipped to
/// [0, 1]: r = clip(p̄(y* | x, z) − p̄(y* | x), 0, 1).
pub fn rlpr_rewards(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    completions: &[&str],
    reference: &str,
) -> Result<Vec<f64>> {
    let tokenizer = &model.tokenizer;
    let answer = tokenizer.encode(reference.trim(), false)?;
    if answer.is_empty() || prompt.is_empty() {
        return Err(Error::InvalidArgument(
            "RLPR needs a prompt and a non-empty reference".into(),
        ));
    }
    let baseline = mean_answer_probability(model, adapter, prompt, "\\boxed{", &answer)?;
    completions
        .iter()
        .map(|text| {
            let reasoning = match extract_answer(text) {
                Some(found) if matches!(found.source, AnswerSource::Boxed) => {
                    text[..found.span.start].to_string()
                }
                Some(found) => format!("{}\\boxed{{", &text[..found.span.start]),
                None => format!("{text} \\boxed{{"),
            };
            let p = mean_answer_probability(model, adapter, prompt, &reasoning, &answer)?;
            Ok((p - baseline).clamp(0.0, 1.0))
        })
        .collect()
}

/// Mean probability of the `answer` tokens after `prompt` + the tokens of `reasoning`.
pub fn mean_answer_probability(
    model: &Model,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    reasoning: &str,
    answer: &[u32],
) -> Result<f64> {
    let mut tokens = prompt.to_vec();
    tokens.extend(model.tokenizer.encode(reasoning, false)?);
    let start = tokens.len();
    tokens.extend_from_slice(answer);
    let t = &model.transformer;
    let input = Tensor::new(tokens.as_slice(), t.device())?.unsqueeze(0)?;
    // token_logprobs[i] is log p(tokens[i + 1] | tokens[..=i]).
    let logp: Vec<f32> = t
        .token_logprobs(&input, adapter)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let probs = &logp[start - 1..];
    Ok(probs.iter().map(|&l| f64::from(l).exp()).sum::<f64>() / probs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_entropies(h: &[f32]) -> Vec<TokenStats> {
        h.iter()
            .map(|&entropy| TokenStats {
                entropy,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn entropy_rewards_favour_the_confident_sample_within_its_group() {
        // Mean entropies 0.5, 1.0 and 1.5 → raw rewards -0.5, -1.0, -1.5: mean -1.0,
        // population std √(1/6) → z-scores ±√(3/2) and 0.
        let a = with_entropies(&[0.25, 0.75]);
        let b = with_entropies(&[1.0]);
        let c = with_entropies(&[1.5, 1.5, 1.5]);
        let r = entropy_rewards(&[&a, &b, &c]);
        let z = 1.5f64.sqrt();
        for (got, want) in r.iter().zip([z, 0.0, -z]) {
            assert!((got - want).abs() < 1e-6, "{r:?}");
        }
        // An empty sample takes the group's mean; a constant group gets no signal.
        let empty = with_entropies(&[]);
        let r = entropy_rewards(&[&a, &empty, &c]);
        assert!(r[1].abs() < 1e-9 && r[0] > 0.0 && r[2] < 0.0, "{r:?}");
        assert_eq!(entropy_rewards(&[&b, &b]), vec![0.0, 0.0]);
        assert!(entropy_rewards(&[]).is_empty());
    }
}
