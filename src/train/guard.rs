//! A collapse guard for learning without labels (TTRL, INTUITOR, EM-RL rewards). Such
//! rewards can rise while the policy gets worse: TTRL's majority agrees with itself more
//! and more while its pseudo-labels are wrong, entropy falls, every prompt gets the same
//! answer ("No Free Lunch", arXiv 2506.17219). The guard sees only what needs no reference
//! answer — agreement and margin of each group, token entropy, answer diversity across
//! prompts, response length and truncation, and (when measured) the policy's distance from
//! the base model on fixed probe prompts — compares a moving window with the first steps,
//! says when the policy has collapsed and why, and ranks checkpoints by label-free health
//! so the caller can roll back to the best one.
//!
//! Health is the share of rollouts that *finish* with their group's majority answer (the
//! majority of the finished ones), an answer copied from the question not counting.
//! Plain group agreement would be the TTRL reward itself, which training raises whether
//! or not answers get better. Two TTRL runs found two ways to raise it
//! (results/ttrl-guard.md): rollouts that run to the token limit, and rollouts that end
//! by repeating the question, so that every sample "answers" its last operand. Unfinished
//! rollouts and echoed answers count as disagreeing, and a rise in echoed answers is a
//! collapse of its own.

use std::collections::{HashSet, VecDeque};

use crate::verify::{equivalent, extract_answer, numbers_in, Answer};

/// What one learning step's rollouts say, without labels.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSignals {
    /// Mean over groups of the share of samples that give the group's majority answer.
    pub agreement: f64,
    /// Mean over groups of the share of samples that finished (not cut at the token limit)
    /// with the majority answer of the finished samples; see [`finished_agreement`].
    pub finished_agreement: f64,
    /// Share of rollouts that finished with an extractable answer.
    pub answered: f64,
    /// Share of finished answers that repeat a number of the question.
    pub echoed: f64,
    /// Mean per-token entropy of the rollouts (nats).
    pub entropy: f64,
    /// The majority answer of each group (normalized text), None where no sample answered.
    pub majority_answers: Vec<Option<String>>,
    /// Mean generated tokens per rollout.
    pub length: f64,
    /// Share of rollouts cut at the token limit.
    pub truncated: f64,
    /// Mean KL(policy ‖ base) per token on the probe prompts (nats), when measured this
    /// step.
    pub probe_kl: Option<f64>,
}

/// Thresholds, each relative to the baseline (the mean of the first steps) where it can be.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// Steps averaged into the baseline.
    pub baseline_steps: usize,
    /// Steps in the moving window compared with it.
    pub window: usize,
    /// Collapse when the window's entropy falls below this fraction of the baseline's
    /// while agreement is at least `high_agreement`.
    pub entropy_floor: f64,
    /// See `entropy_floor`: low entropy alone is sharpening, not collapse.
    pub high_agreement: f64,
    /// Collapse when the share of distinct majority answers across the window's prompts
    /// falls below this fraction of the baseline's (one answer for everything).
    pub diversity_floor: f64,
    /// Collapse when the window's mean length rises above `high` × the baseline's, or
    /// falls below `low` × it while the share of rollouts that answer falls below
    /// `answered_floor` × the baseline's. Shorter answers that still answer are what
    /// confidence rewards are meant to produce (INTUITOR and EM-RL runs shortened from
    /// ~80 to ~25 tokens while held-out accuracy doubled), not a collapse.
    pub length_band: (f64, f64),
    /// See `length_band`.
    pub answered_floor: f64,
    /// Collapse when the share of answers that repeat a number of the question rises
    /// this far above the baseline's (absolute).
    pub echo_rise: f64,
    /// Collapse when more than this share of the window's rollouts hit the token limit,
    /// and a quarter more than at the start (a limit that cut most rollouts from the
    /// start says nothing about drift).
    pub truncation_ceiling: f64,
    /// Collapse when the policy is farther than this from the base on the probe prompts
    /// (nats per token).
    pub kl_ceiling: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            baseline_steps: 5,
            window: 5,
            entropy_floor: 0.3,
            high_agreement: 0.9,
            diversity_floor: 0.5,
            length_band: (0.4, 2.5),
            answered_floor: 0.5,
            echo_rise: 0.2,
            truncation_ceiling: 0.5,
            kl_ceiling: 1.0,
        }
    }
}

/// The guard's reading of a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Still filling the baseline: nothing to compare with yet.
    Warming,
    /// No collapse signal; `health` ranks checkpoints (higher is better, see
    /// [`outranks`]).
    Healthy {
        /// The window's mean finished agreement.
        health: f64,
        /// Its standard error, from the spread of the window's steps.
        stderr: f64,
    },
    /// Collapsed, with one line per signal that tripped.
    Collapsed {
        /// What tripped, readable.
        reasons: Vec<String>,
    },
}

#[derive(Debug, Clone)]
struct Baseline {
    entropy: f64,
    diversity: f64,
    length: f64,
    truncated: f64,
    answered: f64,
    echoed: f64,
}

/// Watches steps; see the module doc.
#[derive(Debug, Clone)]
pub struct CollapseGuard {
    config: GuardConfig,
    seen: Vec<StepSignals>,
    baseline: Option<Baseline>,
    window: VecDeque<StepSignals>,
}

/// The mean of `x` (0 when empty).
pub fn mean(x: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = x.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Distinct answers over answered prompts (1 = every prompt its own answer).
fn diversity<'a>(steps: impl Iterator<Item = &'a StepSignals>) -> Option<f64> {
    let answers: Vec<&String> = steps
        .flat_map(|s| s.majority_answers.iter().flatten())
        .collect();
    if answers.len() < 2 {
        return None;
    }
    let distinct: HashSet<&String> = answers.iter().copied().collect();
    Some(distinct.len() as f64 / answers.len() as f64)
}

/// What a group's rollouts say without labels, counting only rollouts that finished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinishedAgreement {
    /// Share of the group that finished with the most common answer among finished
    /// answers not copied from the question (0 when there is none).
    pub agreement: f64,
    /// Share of the group that finished with an extractable answer.
    pub answered: f64,
    /// Share of the finished answers that are a number of the question itself (0 when
    /// none finished with an answer).
    pub echoed: f64,
}

/// Finished agreement of one group for `question`: `(completion, finished)` pairs, where
/// `finished` is false for a rollout cut at the token limit (its last number is not its
/// answer). An answer that repeats a number of the question is no evidence of solving
/// it: TTRL learned to end with the question ("9 * 6:"), so that the last-number
/// extractor read the same operand from every sample and the group agreed fully while
/// every answer was wrong.
pub fn finished_agreement(question: &str, group: &[(&str, bool)]) -> FinishedAgreement {
    let given = numbers_in(question);
    let answers: Vec<Answer> = group
        .iter()
        .filter(|(_, finished)| *finished)
        .filter_map(|(t, _)| extract_answer(t).map(|e| e.answer))
        .collect();
    let (echoed, own): (Vec<&Answer>, Vec<&Answer>) = answers
        .iter()
        .partition(|a| given.iter().any(|g| equivalent(a, g)));
    // The largest class of equivalent answers (which one leads does not matter here).
    let largest = own
        .iter()
        .map(|a| own.iter().filter(|b| equivalent(a, b)).count())
        .max()
        .unwrap_or(0);
    let size = group.len().max(1) as f64;
    FinishedAgreement {
        agreement: largest as f64 / size,
        answered: answers.len() as f64 / size,
        echoed: echoed.len() as f64 / answers.len().max(1) as f64,
    }
}

/// Whether a checkpoint read `(health, stderr)` should replace the best so far, read
/// `best`: only when it is healthier by more than one standard error of the difference.
/// Health is a mean over a few dozen rollouts; without the margin the ranking follows
/// noise away from a good early checkpoint (or from the base model).
pub fn outranks(candidate: (f64, f64), best: (f64, f64)) -> bool {
    if !best.0.is_finite() {
        return candidate.0.is_finite();
    }
    candidate.0 - best.0 > candidate.1.hypot(best.1)
}

impl CollapseGuard {
    /// A guard with no baseline yet.
    pub fn new(config: GuardConfig) -> Self {
        Self {
            config,
            seen: Vec::new(),
            baseline: None,
            window: VecDeque::new(),
        }
    }

    /// Reads one step.
    pub fn observe(&mut self, step: StepSignals) -> Verdict {
        let c = &self.config;
        if self.baseline.is_none() {
            self.seen.push(step);
            if self.seen.len() < c.baseline_steps.max(1) {
                return Verdict::Warming;
            }
            self.baseline = Some(Baseline {
                entropy: mean(self.seen.iter().map(|s| s.entropy)),
                diversity: diversity(self.seen.iter()).unwrap_or(1.0),
                length: mean(self.seen.iter().map(|s| s.length)),
                truncated: mean(self.seen.iter().map(|s| s.truncated)),
                answered: mean(self.seen.iter().map(|s| s.answered)),
                echoed: mean(self.seen.iter().map(|s| s.echoed)),
            });
            self.window.extend(self.seen.drain(..));
            while self.window.len() > c.window.max(1) {
                self.window.pop_front();
            }
            return self.verdict();
        }
        self.window.push_back(step);
        while self.window.len() > c.window.max(1) {
            self.window.pop_front();
        }
        self.verdict()
    }

    /// Forgets the window (after a rollback: the restored policy starts a fresh window
    /// against the same baseline, and is not judged until it is full).
    pub fn reset_window(&mut self) {
        self.window.clear();
    }

    fn verdict(&self) -> Verdict {
        let (c, Some(b)) = (&self.config, &self.baseline) else {
            return Verdict::Warming;
        };
        // A window is judged only when full: after a rollback, one step of two prompts
        // would judge the restored policy on a handful of answers (a run tripped twice
        // in a row that way, halving its learning rate for noise).
        if self.window.len() < c.window.max(1) {
            return Verdict::Warming;
        }
        let w = &self.window;
        let entropy = mean(w.iter().map(|s| s.entropy));
        let agreement = mean(w.iter().map(|s| s.agreement));
        let length = mean(w.iter().map(|s| s.length));
        let truncated = mean(w.iter().map(|s| s.truncated));
        let answered = mean(w.iter().map(|s| s.answered));
        let echoed = mean(w.iter().map(|s| s.echoed));
        let mut reasons = Vec::new();
        if entropy < c.entropy_floor * b.entropy && agreement >= c.high_agreement {
            reasons.push(format!(
                "entropy fell to {:.0}% of its start ({entropy:.3} vs {:.3} nats) while {:.0}% of each group agrees",
                100.0 * entropy / b.entropy.max(1e-12),
                b.entropy,
                100.0 * agreement
            ));
        }
        if let Some(d) = diversity(w.iter()) {
            if d < c.diversity_floor * b.diversity {
                reasons.push(format!(
                    "answers across prompts collapsed: {:.0}% distinct vs {:.0}% at the start",
                    100.0 * d,
                    100.0 * b.diversity
                ));
            }
        }
        let (low, high) = c.length_band;
        if b.length > 0.0 && length > high * b.length {
            reasons.push(format!(
                "response length drifted to {length:.0} tokens from {:.0}",
                b.length
            ));
        }
        if b.length > 0.0 && length < low * b.length && answered < c.answered_floor * b.answered {
            reasons.push(format!(
                "responses shrank to {length:.0} tokens from {:.0} and {:.0}% of rollouts answer ({:.0}% at the start)",
                b.length,
                100.0 * answered,
                100.0 * b.answered
            ));
        }
        if truncated > c.truncation_ceiling.max(b.truncated + 0.25) {
            reasons.push(format!(
                "{:.0}% of rollouts hit the token limit",
                100.0 * truncated
            ));
        }
        if echoed > b.echoed + c.echo_rise {
            reasons.push(format!(
                "{:.0}% of answers repeat a number of the question ({:.0}% at the start)",
                100.0 * echoed,
                100.0 * b.echoed
            ));
        }
        if let Some(kl) = w.iter().rev().find_map(|s| s.probe_kl) {
            if kl > c.kl_ceiling {
                reasons.push(format!(
                    "the policy is {kl:.3} nats/token from the base model on the probe prompts (ceiling {:.3})",
                    c.kl_ceiling
                ));
            }
        }
        if reasons.is_empty() {
            // Without labels, a group that finishes and agrees with itself is the best
            // available sign of a right answer (self-consistency), as long as nothing
            // above tripped.
            let health = mean(w.iter().map(|s| s.finished_agreement));
            let n = w.len() as f64;
            let variance = w
                .iter()
                .map(|s| (s.finished_agreement - health).powi(2))
                .sum::<f64>()
                / (n - 1.0).max(1.0);
            Verdict::Healthy {
                health,
                stderr: (variance / n).sqrt(),
            }
        } else {
            Verdict::Collapsed { reasons }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(agreement: f64, entropy: f64, answers: &[&str], length: f64) -> StepSignals {
        StepSignals {
            agreement,
            finished_agreement: agreement,
            answered: 1.0,
            echoed: 0.1,
            entropy,
            majority_answers: answers.iter().map(|a| Some(a.to_string())).collect(),
            length,
            truncated: 0.0,
            probe_kl: None,
        }
    }

    fn guard() -> CollapseGuard {
        CollapseGuard::new(GuardConfig {
            baseline_steps: 2,
            window: 2,
            ..GuardConfig::default()
        })
    }

    #[test]
    fn finished_agreement_counts_only_rollouts_that_finished() {
        // Finished answers 5, 5, 7 (the bare text answers nothing); the cut rollout's
        // trailing 5 is not an answer. Nothing repeats the question's 3 or 2.
        let group = [
            ("3 + 2 = 5. The answer is 5.", true),
            ("The answer is 5.", true),
            ("The answer is 7.", true),
            ("I think", true),
            ("2 + 3 = 5 and then 5", false),
        ];
        let f = finished_agreement("What is 3 + 2?", &group);
        assert_eq!(f.agreement, 2.0 / 5.0);
        assert_eq!(f.answered, 3.0 / 5.0);
        assert_eq!(f.echoed, 0.0);
        // Cut rollouts that all agree give no finished agreement at all.
        let cut = [("The answer is 4", false), ("The answer is 4", false)];
        let f = finished_agreement("What is 2 + 2?", &cut);
        assert_eq!((f.agreement, f.answered, f.echoed), (0.0, 0.0, 0.0));
        assert_eq!(finished_agreement("", &[]).agreement, 0.0);
    }

    #[test]
    fn an_answer_that_repeats_the_question_is_no_agreement() {
        // What the collapsed TTRL policy wrote: the question again, whose last number the
        // extractor reads as the answer. Every sample agrees; none solved anything.
        let group = [
            ("9 * 6:", true),
            ("9 * 6: 9 * 6, Step-by-step:", true),
            ("When 9 * 6, I will put it within \\boxed{6}.", true),
            ("9 * 6 = 54", true),
        ];
        let f = finished_agreement("What is 9 * 6?", &group);
        assert_eq!(f.answered, 1.0);
        assert_eq!(f.echoed, 3.0 / 4.0);
        assert_eq!(f.agreement, 1.0 / 4.0);
        // Numbers of the question are read as the extractor reads them: "-5" after "is"
        // is negative, "5-3" holds 5 and 3.
        let f = finished_agreement("What is -5 + 5-3?", &[("So -5.", true), ("-3", true)]);
        assert_eq!((f.echoed, f.agreement), (0.5, 0.5));
    }

    #[test]
    fn a_rise_in_echoed_answers_is_a_collapse() {
        let mut g = guard();
        g.observe(step(0.4, 1.0, &["1", "2"], 80.0));
        g.observe(step(0.4, 1.0, &["3", "4"], 80.0));
        let mut echoing = step(0.9, 1.0, &["5", "6"], 20.0);
        echoing.echoed = 0.8;
        g.observe(echoing.clone());
        match g.observe(echoing) {
            Verdict::Collapsed { reasons } => {
                assert_eq!(reasons.len(), 1, "{reasons:?}");
                assert!(
                    reasons[0].contains(
                        "80% of answers repeat a number of the question (10% at the start)"
                    ),
                    "{reasons:?}"
                );
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn health_is_finished_agreement_not_the_agreement_ttrl_raises() {
        let mut g = guard();
        g.observe(step(0.4, 1.0, &["1", "2"], 80.0));
        g.observe(step(0.4, 1.0, &["3", "4"], 80.0));
        // Agreement rises while most rollouts run to the limit (the TTRL drift).
        let mut drifting = step(0.6, 1.0, &["5", "6"], 90.0);
        drifting.finished_agreement = 0.1;
        g.observe(drifting.clone());
        match g.observe(drifting) {
            Verdict::Healthy { health, stderr } => {
                assert!((health - 0.1).abs() < 1e-12, "{health}");
                assert_eq!(stderr, 0.0, "two equal steps");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn shorter_answers_are_a_collapse_only_when_they_stop_answering() {
        let mut g = guard();
        g.observe(step(0.4, 1.0, &["1", "2"], 80.0));
        g.observe(step(0.4, 1.0, &["3", "4"], 80.0));
        // 80 -> 20 tokens, every rollout still answers: what INTUITOR and EM-RL do.
        g.observe(step(0.6, 0.8, &["5", "6"], 20.0));
        assert!(matches!(
            g.observe(step(0.6, 0.8, &["7", "8"], 20.0)),
            Verdict::Healthy { .. }
        ));
        // The same length with a fifth of the rollouts answering.
        let mut mute = step(0.2, 0.8, &["5", "6"], 20.0);
        mute.answered = 0.2;
        g.observe(mute.clone());
        match g.observe(mute) {
            Verdict::Collapsed { reasons } => {
                assert_eq!(reasons.len(), 1, "{reasons:?}");
                assert!(
                    reasons[0].contains("shrank to 20 tokens from 80 and 20% of rollouts answer (100% at the start)"),
                    "{reasons:?}"
                );
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_checkpoint_outranks_the_best_only_beyond_the_noise() {
        // Window of two steps 0.1 and 0.3: mean 0.2, sample sd √0.02, stderr 0.1.
        let mut g = guard();
        g.observe(step(0.1, 1.0, &["1", "2"], 80.0));
        match g.observe(step(0.3, 1.0, &["3", "4"], 80.0)) {
            Verdict::Healthy { health, stderr } => {
                assert!((health - 0.2).abs() < 1e-12 && (stderr - 0.1).abs() < 1e-12);
            }
            v => panic!("{v:?}"),
        }
        // One standard error of the difference: √(0.03² + 0.04²) = 0.05.
        assert!(outranks((0.26, 0.03), (0.2, 0.04)));
        assert!(!outranks((0.24, 0.03), (0.2, 0.04)));
        // Anything measured outranks the unmeasured start.
        assert!(outranks((0.0, 0.1), (f64::NEG_INFINITY, 0.0)));
    }

    #[test]
    fn a_healthy_run_stays_healthy_and_is_ranked_by_finished_agreement() {
        let mut g = guard();
        assert_eq!(
            g.observe(step(0.4, 1.0, &["1", "2"], 100.0)),
            Verdict::Warming
        );
        // Baseline: entropy 1.0, diversity 4/4, length 100; window = the two steps.
        let health = |v: Verdict| match v {
            Verdict::Healthy { health, .. } => health,
            v => panic!("{v:?}"),
        };
        let h = health(g.observe(step(0.6, 0.9, &["3", "4"], 110.0)));
        assert!((h - 0.5).abs() < 1e-12, "{h}");
        let h = health(g.observe(step(0.8, 0.6, &["5", "6"], 90.0)));
        assert!((h - 0.7).abs() < 1e-12, "{h}");
    }

    #[test]
    fn ttrl_collapse_trips_on_entropy_and_diversity_not_on_agreement() {
        let mut g = guard();
        g.observe(step(0.4, 1.0, &["1", "2"], 100.0));
        g.observe(step(0.4, 1.0, &["3", "4"], 100.0));
        // Every group agrees on one answer for every prompt, entropy near zero.
        g.observe(step(0.95, 0.1, &["7", "7"], 100.0));
        match g.observe(step(0.97, 0.1, &["7", "7"], 100.0)) {
            Verdict::Collapsed { reasons } => {
                assert_eq!(reasons.len(), 2, "{reasons:?}");
                assert!(reasons[0].contains("entropy fell to 10%"), "{reasons:?}");
                assert!(reasons[1].contains("25% distinct vs 100%"), "{reasons:?}");
            }
            v => panic!("{v:?}"),
        }
        // After a rollback the window starts afresh against the same baseline, and one
        // step of it is too little to judge, even a collapsed one.
        g.reset_window();
        assert_eq!(
            g.observe(step(0.97, 0.1, &["7", "7"], 100.0)),
            Verdict::Warming
        );
        // A full window is judged: entropy 0.5 and agreement 0.735 on average, 3 of 4
        // answers distinct.
        assert!(matches!(
            g.observe(step(0.5, 0.9, &["1", "8"], 100.0)),
            Verdict::Healthy { .. }
        ));
    }

    #[test]
    fn a_token_limit_that_cut_most_rollouts_from_the_start_is_not_drift() {
        let mut g = guard();
        let mut cut = step(0.4, 1.0, &["1", "2"], 48.0);
        cut.truncated = 0.9;
        g.observe(cut.clone());
        g.observe(cut.clone());
        cut.truncated = 1.0;
        assert!(matches!(g.observe(cut), Verdict::Healthy { .. }));
    }

    #[test]
    fn low_entropy_alone_is_not_a_collapse_but_length_truncation_and_kl_are() {
        let mut g = guard();
        g.observe(step(0.4, 1.0, &["1", "2"], 100.0));
        g.observe(step(0.4, 1.0, &["3", "4"], 100.0));
        // Confident but still diverse and disagreeing: sharpening, not collapse.
        g.observe(step(0.6, 0.1, &["5", "6"], 100.0));
        assert!(matches!(
            g.observe(step(0.6, 0.1, &["8", "9"], 100.0)),
            Verdict::Healthy { .. }
        ));
        let mut long = step(0.5, 1.0, &["a", "b"], 400.0);
        long.truncated = 0.9;
        long.probe_kl = Some(2.0);
        g.observe(long.clone());
        match g.observe(long) {
            Verdict::Collapsed { reasons } => {
                assert_eq!(reasons.len(), 3, "{reasons:?}");
                assert!(reasons[0].contains("length drifted to 400 tokens from 100"));
                assert!(reasons[1].contains("90% of rollouts hit the token limit"));
                assert!(reasons[2].contains("2.000 nats/token"));
            }
            v => panic!("{v:?}"),
        }
    }
}
