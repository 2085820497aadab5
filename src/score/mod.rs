//! Trace-level confidence scores computed from per-token statistics: mean
//! self-certainty, mean log-probability, mean entropy, the DeepConf group metrics
//! (lowest group, bottom-10% groups, tail) and CREW (the confidence of the tokens that
//! spell the answer). Every score is "higher is better"; all sums are in f64.

use crate::verify::extract_answer;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

#[cfg(test)]
mod tests;

/// Sliding-window length of the DeepConf paper, used when a score string names none.
pub const DEFAULT_WINDOW: usize = 2048;

pub use crate::stats::TokenStats;

/// One generated trace: its text and the statistics of each generated token.
#[derive(Debug, Clone, Copy)]
pub struct TraceView<'a> {
    /// The generated text (the completion only, not the prompt).
    pub text: &'a str,
    /// One entry per generated token, in order.
    pub stats: &'a [TokenStats],
    /// Byte offset in `text` where each token's text ends (token i spans
    /// `token_end[i-1]..token_end[i]`, the first one starts at 0).
    pub token_end: &'a [usize],
}

impl TraceView<'_> {
    /// The DeepConf confidence of every token.
    pub fn confidences(&self) -> Vec<f32> {
        self.stats.iter().map(|s| s.confidence).collect()
    }
}

fn mean_of(values: impl Iterator<Item = f32>) -> Option<f64> {
    let (sum, count) = values.fold((0.0f64, 0usize), |(s, n), v| (s + f64::from(v), n + 1));
    (count > 0).then(|| sum / count as f64)
}

/// Mean self-certainty over the generated tokens.
pub fn mean_self_certainty(stats: &[TokenStats]) -> Option<f64> {
    mean_of(stats.iter().map(|s| s.self_certainty))
}

/// Mean log-probability of the sampled tokens.
pub fn mean_logprob(stats: &[TokenStats]) -> Option<f64> {
    mean_of(stats.iter().map(|s| s.logprob))
}

/// Mean entropy (lower means more certain; [`TraceScore::NegMeanEntropy`] negates it).
pub fn mean_entropy(stats: &[TokenStats]) -> Option<f64> {
    mean_of(stats.iter().map(|s| s.entropy))
}

/// Group confidences: the mean of `conf` over every window of `window` consecutive
/// tokens (stride 1). With fewer tokens than the window there is one group, the mean of
/// all; with no tokens there are none. A window of 0 is taken as 1.
pub fn group_confidences(conf: &[f32], window: usize) -> Vec<f64> {
    let window = window.max(1);
    if conf.is_empty() {
        return Vec::new();
    }
    if conf.len() < window {
        return mean_of(conf.iter().copied()).into_iter().collect();
    }
    let mut sum: f64 = conf[..window].iter().map(|&c| f64::from(c)).sum();
    let mut groups = Vec::with_capacity(conf.len() - window + 1);
    groups.push(sum / window as f64);
    for i in window..conf.len() {
        sum += f64::from(conf[i]) - f64::from(conf[i - window]);
        groups.push(sum / window as f64);
    }
    groups
}

/// The lowest group confidence (DeepConf "lowest group").
pub fn lowest_group_confidence(conf: &[f32], window: usize) -> Option<f64> {
    group_confidences(conf, window).into_iter().reduce(f64::min)
}

/// The mean of the lowest `percent`% of group confidences, at least one group
/// (DeepConf "bottom 10%" with `percent` = 10; the count is rounded down).
pub fn bottom_percent_group_confidence(conf: &[f32], window: usize, percent: f64) -> Option<f64> {
    let mut groups = group_confidences(conf, window);
    if groups.is_empty() {
        return None;
    }
    groups.sort_by(f64::total_cmp);
    let wanted = (groups.len() as f64 * percent.clamp(0.0, 100.0) / 100.0).floor() as usize;
    let lowest = &groups[..wanted.clamp(1, groups.len())];
    Some(lowest.iter().sum::<f64>() / lowest.len() as f64)
}

/// The mean confidence of the last `window` tokens (all of them when fewer).
pub fn tail_confidence(conf: &[f32], window: usize) -> Option<f64> {
    let start = conf.len().saturating_sub(window.max(1));
    mean_of(conf[start..].iter().copied())
}

/// CREW: the mean confidence of the tokens whose text overlaps `answer_span` (a byte
/// range of `view.text`). `None` when the span is empty or no token overlaps it.
pub fn crew(view: &TraceView, answer_span: Range<usize>) -> Option<f64> {
    if answer_span.is_empty() {
        return None;
    }
    let (mut sum, mut count) = (0.0f64, 0usize);
    let mut token_start = 0;
    for (stats, &token_end) in view.stats.iter().zip(view.token_end) {
        if token_start < answer_span.end && answer_span.start < token_end {
            sum += f64::from(stats.confidence);
            count += 1;
        }
        token_start = token_end;
    }
    (count > 0).then(|| sum / count as f64)
}

/// A trace-level score; `compute` returns higher-is-better values, `None` for an empty
/// trace or a non-finite result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TraceScore {
    /// Mean self-certainty KL(U ‖ p) over the tokens (`"self_certainty"`).
    MeanSelfCertainty,
    /// Mean log-probability of the sampled tokens (`"logprob"`).
    MeanLogprob,
    /// The negated mean entropy, so that higher is better (`"entropy"`).
    NegMeanEntropy,
    /// The lowest mean confidence over any `window` consecutive tokens
    /// (`"lowest_group:W"`).
    LowestGroup {
        /// Group length in tokens.
        window: usize,
    },
    /// The mean of the lowest 10% of groups (`"bottom10:W"`).
    Bottom10 {
        /// Group length in tokens.
        window: usize,
    },
    /// The mean confidence of the last `window` tokens (`"tail:W"`).
    Tail {
        /// Number of final tokens averaged.
        window: usize,
    },
    /// Mean confidence of the tokens of the extracted answer (`"crew"`).
    Crew,
}

impl TraceScore {
    /// The score of one trace; None for an empty trace, a non-finite value, or (for
    /// [`TraceScore::Crew`]) a trace without an extractable answer.
    pub fn compute(&self, view: &TraceView) -> Option<f64> {
        let value = match *self {
            TraceScore::MeanSelfCertainty => mean_self_certainty(view.stats),
            TraceScore::MeanLogprob => mean_logprob(view.stats),
            TraceScore::NegMeanEntropy => mean_entropy(view.stats).map(|h| -h),
            TraceScore::LowestGroup { window } => {
                lowest_group_confidence(&view.confidences(), window)
            }
            TraceScore::Bottom10 { window } => {
                bottom_percent_group_confidence(&view.confidences(), window, 10.0)
            }
            TraceScore::Tail { window } => tail_confidence(&view.confidences(), window),
            TraceScore::Crew => extract_answer(view.text).and_then(|found| crew(view, found.span)),
        };
        value.filter(|v| v.is_finite())
    }
}

impl fmt::Display for TraceScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceScore::MeanSelfCertainty => f.write_str("self_certainty"),
            TraceScore::MeanLogprob => f.write_str("logprob"),
            TraceScore::NegMeanEntropy => f.write_str("entropy"),
            TraceScore::LowestGroup { window } => write!(f, "lowest_group:{window}"),
            TraceScore::Bottom10 { window } => write!(f, "bottom10:{window}"),
            TraceScore::Tail { window } => write!(f, "tail:{window}"),
            TraceScore::Crew => f.write_str("crew"),
        }
    }
}

/// A string that does not name a [`TraceScore`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trace score {input:?}: {reason}")]
pub struct ParseScoreError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it, for humans.
    pub reason: String,
}

impl FromStr for TraceScore {
    type Err = ParseScoreError;

    /// "self_certainty", "logprob", "entropy", "crew", and "lowest_group:W",
    /// "bottom10:W", "tail:W" with a window W ≥ 1 (W defaults to 2048 when left out).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| ParseScoreError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (name, window) = match s.trim().split_once(':') {
            Some((name, w)) => (name, Some(w)),
            None => (s.trim(), None),
        };
        let window = match window {
            None => DEFAULT_WINDOW,
            Some(w) => match w.trim().parse::<usize>() {
                Ok(w) if w >= 1 => w,
                _ => return Err(error("the window must be a whole number of tokens >= 1")),
            },
        };
        let windowless = |score: TraceScore| {
            if s.contains(':') {
                Err(error("this score takes no window"))
            } else {
                Ok(score)
            }
        };
        match name {
            "self_certainty" => windowless(TraceScore::MeanSelfCertainty),
            "logprob" => windowless(TraceScore::MeanLogprob),
            "entropy" => windowless(TraceScore::NegMeanEntropy),
            "crew" => windowless(TraceScore::Crew),
            "lowest_group" => Ok(TraceScore::LowestGroup { window }),
            "bottom10" => Ok(TraceScore::Bottom10 { window }),
            "tail" => Ok(TraceScore::Tail { window }),
            _ => Err(error(
                "expected self_certainty, logprob, entropy, crew, lowest_group:W, bottom10:W or tail:W",
            )),
        }
    }
}
