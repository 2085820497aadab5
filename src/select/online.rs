//! DeepConf online early termination: a threshold from warm-up traces, a per-trace
//! window tracker that says when to stop decoding, and a consensus test that says when
//! to stop sampling new traces.

use super::{percentile, SelectionRule, VoteRow};
use crate::score::{TraceScore, DEFAULT_WINDOW};
use std::collections::VecDeque;

/// The DeepConf online procedure for one prompt.
///
/// 1. Decode `warmup` traces fully and feed each one's lowest group confidence to
///    [`observe_warmup`](Self::observe_warmup).
/// 2. [`threshold`](Self::threshold) is the `percentile`th percentile of those values
///    (90 keeps about the top 10% of traces, 10 about the top 90%).
/// 3. Decode further traces (up to `budget` in all), each with a [`WindowTracker`] from
///    [`tracker`](Self::tracker); stop a trace when the tracker says so.
/// 4. Vote with [`vote_rule`](Self::vote_rule) over the traces that
///    [`keeps`](Self::keeps); stop sampling early once
///    [`consensus_reached`](Self::consensus_reached).
#[derive(Debug, Clone, PartialEq)]
pub struct DeepConfOnline {
    /// Number of warm-up traces.
    pub warmup: usize,
    /// Percentile (0–100) of warm-up lowest-group confidences used as the threshold.
    pub percentile: f64,
    /// Group window in tokens.
    pub window: usize,
    /// Stop sampling when the leading answer holds at least this share of vote weight.
    pub tau: Option<f64>,
    /// Total number of traces, warm-up included.
    pub budget: usize,
    warmup_lowest: Vec<f64>,
}

impl Default for DeepConfOnline {
    /// The paper's settings: 16 warm-up traces, percentile 90, window 2048, budget 512,
    /// no consensus stop.
    fn default() -> Self {
        DeepConfOnline::new(16, 90.0, DEFAULT_WINDOW, None, 512)
    }
}

impl DeepConfOnline {
    /// A procedure with the given settings (fields of the same names) and no warm-up
    /// trace observed yet.
    pub fn new(
        warmup: usize,
        percentile: f64,
        window: usize,
        tau: Option<f64>,
        budget: usize,
    ) -> Self {
        DeepConfOnline {
            warmup,
            percentile,
            window,
            tau,
            budget,
            warmup_lowest: Vec::new(),
        }
    }

    /// Records a warm-up trace's lowest group confidence (non-finite values are ignored).
    pub fn observe_warmup(&mut self, lowest_group_conf: f64) {
        if lowest_group_conf.is_finite() {
            self.warmup_lowest.push(lowest_group_conf);
        }
    }

    /// Warm-up values recorded so far (non-finite ones not counted).
    pub fn warmup_observed(&self) -> usize {
        self.warmup_lowest.len()
    }

    /// True once `warmup` values have been recorded and the threshold is final.
    pub fn warmup_done(&self) -> bool {
        self.warmup_lowest.len() >= self.warmup
    }

    /// The stopping threshold: the `percentile`th percentile of the warm-up values seen
    /// so far (numpy-style linear interpolation); `None` before any.
    pub fn threshold(&self) -> Option<f64> {
        percentile(&self.warmup_lowest, self.percentile)
    }

    /// A tracker for a new trace, with the current threshold (it never stops a trace
    /// when there is no threshold yet).
    pub fn tracker(&self) -> WindowTracker {
        WindowTracker::new(self.window, self.threshold())
    }

    /// Whether a finished trace with this lowest group confidence takes part in the vote.
    pub fn keeps(&self, lowest_group_conf: f64) -> bool {
        self.threshold().is_none_or(|t| lowest_group_conf >= t)
    }

    /// The final vote: weighted by lowest group confidence.
    pub fn vote_rule(&self) -> SelectionRule {
        SelectionRule::Weighted(TraceScore::LowestGroup {
            window: self.window,
        })
    }

    /// How many more traces the budget allows after `traces_started`.
    pub fn traces_left(&self, traces_started: usize) -> usize {
        self.budget.saturating_sub(traces_started)
    }

    /// Whether the leading answer holds a share ≥ `tau` of the total vote weight
    /// (always false without `tau` or without positive weight).
    pub fn consensus_reached(&self, votes: &[VoteRow]) -> bool {
        let Some(tau) = self.tau else {
            return false;
        };
        let weights = votes.iter().map(|v| v.weight).filter(|w| w.is_finite());
        let total: f64 = weights.clone().map(|w| w.max(0.0)).sum();
        let leading = weights.fold(0.0, f64::max);
        total > 0.0 && leading / total >= tau
    }
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
