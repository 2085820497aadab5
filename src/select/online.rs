//! DeepConf online early termination (Fu et al. 2025): a threshold from warm-up traces,
//! a per-trace window tracker that says when to stop decoding, and a consensus test that
//! says when to stop sampling new traces. [`super::SelectionRule::DeepConfOnline`] is the rule;
//! the engine runs it with a [`WindowTracker`] per sample.

use super::{rank_by, ranked, tally, weighted_ballots, Candidate, VoteRow};
use crate::score::TraceScore;
use std::collections::VecDeque;

/// The threshold of DeepConf online: the `percentile`th percentile (numpy-style linear
/// interpolation) of the lowest group confidences of the first `warmup` candidates (those
/// that have one); `None` until all `warmup` are drawn, or when none has a score.
pub(super) fn online_threshold(
    drawn: &[Candidate],
    warmup: usize,
    percentile: f64,
    window: usize,
) -> Option<f64> {
    if warmup == 0 || drawn.len() < warmup {
        return None;
    }
    let lowest = TraceScore::LowestGroup { window };
    let values: Vec<f64> = drawn[..warmup]
        .iter()
        .filter_map(|c| c.score(lowest))
        .collect();
    super::percentile(&values, percentile)
}

/// The candidates that vote under DeepConf online, in preference order: those with an
/// answer whose lowest group confidence reaches the threshold (every one with an answer
/// and a score while there is no threshold).
pub(super) fn online_voters(
    candidates: &[Candidate],
    warmup: usize,
    percentile: f64,
    window: usize,
) -> Vec<usize> {
    let lowest = TraceScore::LowestGroup { window };
    let threshold = online_threshold(candidates, warmup, percentile, window);
    rank_by(candidates, lowest)
        .into_iter()
        .filter(|&i| candidates[i].answer.is_some())
        .filter(|&i| {
            candidates[i]
                .score(lowest)
                .is_some_and(|v| threshold.is_none_or(|t| v >= t))
        })
        .collect()
}

/// Whether DeepConf online stops drawing: the warm-up is done and the leading answer
/// holds a share ≥ `tau` of the confidence-weighted vote of the voters.
pub(super) fn online_settled(
    drawn: &[Candidate],
    warmup: usize,
    percentile: f64,
    window: usize,
    tau: Option<f64>,
) -> bool {
    let Some(tau) = tau else {
        return false;
    };
    if drawn.len() < warmup.max(1) {
        return false;
    }
    let voters = online_voters(drawn, warmup, percentile, window);
    let lowest = TraceScore::LowestGroup { window };
    let votes = tally(drawn, ranked(weighted_ballots(drawn, &voters, lowest))).votes;
    consensus_reached(&votes, tau)
}

/// Whether the leading answer holds a share ≥ `tau` of the total vote weight (false
/// without positive weight).
pub(super) fn consensus_reached(votes: &[VoteRow], tau: f64) -> bool {
    let weights = votes.iter().map(|v| v.weight).filter(|w| w.is_finite());
    let total: f64 = weights.clone().map(|w| w.max(0.0)).sum();
    let leading = weights.fold(0.0, f64::max);
    total > 0.0 && leading / total >= tau
}

/// Follows one trace's token confidences while it decodes and says when to stop it:
/// the moment the mean of the current window (of the last `window` tokens; before a full
/// window is seen, of all tokens so far) falls below the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowTracker {
    window: usize,
    threshold: Option<f64>,
    recent: VecDeque<f64>,
    recent_sum: f64,
    tokens: usize,
    lowest_full_window: Option<f64>,
    stopped_at: Option<usize>,
}

impl WindowTracker {
    /// A window of 0 is taken as 1; with no threshold the tracker never stops.
    pub fn new(window: usize, threshold: Option<f64>) -> Self {
        let window = window.max(1);
        WindowTracker {
            window,
            threshold,
            recent: VecDeque::with_capacity(window),
            recent_sum: 0.0,
            tokens: 0,
            lowest_full_window: None,
            stopped_at: None,
        }
    }

    /// Feeds the next token's confidence and returns [`should_stop`](Self::should_stop).
    /// After a stop, and for non-finite values, nothing changes.
    pub fn push(&mut self, confidence: f32) -> bool {
        if self.stopped_at.is_some() || !confidence.is_finite() {
            return self.should_stop();
        }
        let confidence = f64::from(confidence);
        self.tokens += 1;
        self.recent.push_back(confidence);
        self.recent_sum += confidence;
        if self.recent.len() > self.window {
            self.recent_sum -= self.recent.pop_front().unwrap_or(0.0);
        }
        let mean = self.recent_sum / self.recent.len() as f64;
        if self.recent.len() == self.window {
            self.lowest_full_window = Some(self.lowest_full_window.map_or(mean, |m| m.min(mean)));
        }
        if self.threshold.is_some_and(|t| mean < t) {
            self.stopped_at = Some(self.tokens);
        }
        self.should_stop()
    }

    /// Sets the threshold of a tracker made without one (DeepConf online learns it once
    /// the warm-up traces are done, while later traces already decode); the tokens seen
    /// so far are not re-examined, the next ones are.
    pub fn set_threshold(&mut self, threshold: f64) {
        self.threshold = Some(threshold);
    }

    /// True once a window mean has fallen below the threshold; stays true.
    pub fn should_stop(&self) -> bool {
        self.stopped_at.is_some()
    }

    /// The number of tokens seen when the trace was stopped (the stopping token included).
    pub fn stopped_at(&self) -> Option<usize> {
        self.stopped_at
    }

    /// Finite confidences counted so far (pushes after a stop are ignored).
    pub fn tokens_seen(&self) -> usize {
        self.tokens
    }

    /// Mean of the current window (all tokens so far before a full window).
    pub fn current_mean(&self) -> Option<f64> {
        (!self.recent.is_empty()).then(|| self.recent_sum / self.recent.len() as f64)
    }

    /// The trace's lowest group confidence so far, as
    /// [`lowest_group_confidence`](crate::score::lowest_group_confidence) computes it:
    /// the lowest full-window mean, or the mean of all tokens when fewer than a window.
    pub fn lowest_group_confidence(&self) -> Option<f64> {
        if self.tokens >= self.window {
            self.lowest_full_window
        } else {
            self.current_mean()
        }
    }
}
