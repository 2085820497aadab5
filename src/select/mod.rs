//! Choosing one answer among N sampled traces: greedy, best-of-N by a score, majority
//! vote, score-weighted vote, Borda vote, confidence-informed self-consistency (CISC),
//! DeepConf offline filtering, the sequential rules that stop sampling once the answer is
//! settled (early-stopping self-consistency, adaptive consistency and DeepConf online, see
//! [`SelectionRule::samples_needed`]), and the window tracker that stops DeepConf online's
//! low-confidence traces while they decode ([`WindowTracker`]).
//!
//! Answers are pooled by [`equivalent`]. Ties are broken deterministically: between
//! answers with equal vote weight, the one whose first supporting candidate has the
//! lowest index wins (as in the Self-Certainty reference code), so Borda with power 0
//! gives exactly the majority vote. The representative trace of the winning answer is
//! its best-ranked supporter under the rule's score (the first one for majority).

use crate::score::{TraceScore, TraceView};
use crate::verify::{equivalent, extract_answer, Answer};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

mod online;
mod sequential;
#[cfg(test)]
mod tests;

pub use online::WindowTracker;
pub use sequential::leader_stays_ahead;

/// One sampled trace as the selection rules see it: its extracted answer and the
/// trace scores computed for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidate {
    /// The normalised final answer, or None when the trace gave none (it then never votes).
    pub answer: Option<Answer>,
    /// Trace scores by kind, higher is better. Where a rule needs a score the candidate
    /// lacks (or that is not finite), the candidate ranks last and its vote weighs 0.
    pub scores: BTreeMap<TraceScore, f64>,
}

impl Candidate {
    /// A candidate with this answer and no scores yet.
    pub fn new(answer: Option<Answer>) -> Self {
        Candidate {
            answer,
            scores: BTreeMap::new(),
        }
    }

    /// Adds one score (builder style).
    pub fn with_score(mut self, score: TraceScore, value: f64) -> Self {
        self.scores.insert(score, value);
        self
    }

    /// Extracts the trace's answer and computes the listed scores (those that come out
    /// `None`, e.g. on an empty trace, are left out).
    pub fn from_trace(view: &TraceView, scores: &[TraceScore]) -> Self {
        let answer = extract_answer(view.text).map(|found| found.answer);
        let scores = scores
            .iter()
            .filter_map(|&score| score.compute(view).map(|value| (score, value)))
            .collect();
        Candidate { answer, scores }
    }

    /// The candidate's value of `score`, if present and finite.
    pub fn score(&self, score: TraceScore) -> Option<f64> {
        self.scores.get(&score).copied().filter(|v| v.is_finite())
    }
}

/// How to pick the final answer.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum SelectionRule {
    /// The first candidate.
    Greedy,
    /// Best-of-N: the candidate with the highest score.
    Max(TraceScore),
    /// One vote per candidate with an answer.
    Majority,
    /// Votes weighted by a score. When some score is negative, every weight is shifted
    /// by the lowest score (weight = score − min) so weights are ≥ 0; the lowest-scoring
    /// candidate then adds no weight, though it still counts.
    Weighted(TraceScore),
    /// Borda vote on self-certainty: rank r (0-based, over all N candidates) gives
    /// (N − r)^power votes to its answer. power = 0 is majority vote.
    Borda {
        /// Exponent of the rank weight (N − r)^power; [`DEFAULT_BORDA_POWER`] by default.
        power: f64,
    },
    /// DeepConf offline: among candidates with an answer and the metric, keep those at
    /// or above the (100 − keep_percent)th percentile of the metric (so at least one),
    /// then a vote weighted by the metric.
    DeepConf {
        /// The confidence score candidates are filtered and weighted by.
        metric: TraceScore,
        /// η: the percentage of candidates kept, in (0, 100] (10 keeps the top 10%).
        keep_percent: f64,
    },
    /// Confidence-informed self-consistency (CISC, Taubenfeld et al. 2025): each
    /// candidate's vote weighs softmax(score / temperature) over the group, i.e.
    /// exp((score − best) / temperature). A large temperature is majority vote, a small
    /// one best-of-N.
    Cisc {
        /// The confidence the votes are weighted by.
        score: TraceScore,
        /// Softmax temperature, finite and > 0, in the score's units.
        temperature: f64,
    },
    /// Early-stopping self-consistency (ESC, Li et al. 2024): candidates are drawn in
    /// windows of `window`; drawing stops after the first window whose answers are all
    /// present and equivalent. The answer is the majority of every candidate drawn.
    Esc {
        /// Candidates per window (≥ 1).
        window: usize,
    },
    /// Adaptive consistency (Aggarwal et al. 2023) with its Beta stopping rule: after
    /// each candidate, stop once the leading answer stays ahead of the runner-up with
    /// posterior probability at least `threshold` ([`leader_stays_ahead`]). The answer
    /// is the majority of every candidate drawn.
    Adaptive {
        /// Stopping probability, in (0.5, 1).
        threshold: f64,
    },
    /// DeepConf online (Fu et al. 2025): the first `warmup` candidates are decoded whole
    /// and the `percentile`th percentile of their lowest group confidences becomes the
    /// threshold (90 keeps about the best 10% of traces, 10 about 90%). Every later trace
    /// stops while it decodes once a window's mean confidence falls below it (a stopped
    /// trace has no answer). The vote is weighted by lowest group confidence over the
    /// candidates at or above the threshold; with `tau`, drawing stops once the leading
    /// answer holds that share of the vote weight.
    DeepConfOnline {
        /// Warm-up candidates (≥ 1), decoded in full.
        warmup: usize,
        /// Percentile (0–100) of the warm-up values that is the threshold.
        percentile: f64,
        /// Group window in tokens (≥ 1).
        window: usize,
        /// Consensus share in (0, 1] that stops drawing; `None` draws every sample.
        tau: Option<f64>,
    },
}

/// Borda's default power (DESIGN.md).
pub const DEFAULT_BORDA_POWER: f64 = 0.5;
/// ESC's default window (a quarter of the usual 16 samples).
pub const DEFAULT_ESC_WINDOW: usize = 4;
/// Adaptive consistency's default stopping probability (the paper's).
pub const DEFAULT_ADAPTIVE_THRESHOLD: f64 = 0.95;

impl SelectionRule {
    /// The scores candidates need for this rule.
    pub fn required_scores(&self) -> Vec<TraceScore> {
        match *self {
            SelectionRule::Greedy | SelectionRule::Majority => Vec::new(),
            SelectionRule::Max(score) | SelectionRule::Weighted(score) => vec![score],
            SelectionRule::Borda { .. } => vec![TraceScore::MeanSelfCertainty],
            SelectionRule::DeepConf { metric, .. } => vec![metric],
            SelectionRule::Cisc { score, .. } => vec![score],
            SelectionRule::Esc { .. } | SelectionRule::Adaptive { .. } => Vec::new(),
            SelectionRule::DeepConfOnline { window, .. } => {
                vec![TraceScore::LowestGroup { window }]
            }
        }
    }

    /// Whether the rule decides how many candidates it needs as they arrive (ESC,
    /// adaptive consistency, DeepConf online): a request with such a rule can stop
    /// sampling early.
    pub fn is_sequential(&self) -> bool {
        matches!(
            self,
            SelectionRule::Esc { .. }
                | SelectionRule::Adaptive { .. }
                | SelectionRule::DeepConfOnline { .. }
        )
    }

    /// Samples worth decoding at once under a sequential rule: one ESC window; for
    /// adaptive consistency 4, the fewest votes that can pass its default threshold; for
    /// DeepConf online the warm-up. `None` for rules that use every sample.
    pub fn default_parallel(&self) -> Option<usize> {
        match *self {
            SelectionRule::Esc { window } => Some(window.max(1)),
            SelectionRule::Adaptive { .. } => Some(4),
            SelectionRule::DeepConfOnline { warmup, .. } => Some(warmup.max(1)),
            _ => None,
        }
    }

    /// For DeepConf online: the threshold the first `warmup` of `drawn` set (see
    /// [`SelectionRule::DeepConfOnline`]); `None` for other rules and before the warm-up
    /// is drawn.
    pub fn online_threshold(&self, drawn: &[Candidate]) -> Option<f64> {
        match *self {
            SelectionRule::DeepConfOnline {
                warmup,
                percentile,
                window,
                ..
            } => online::online_threshold(drawn, warmup, percentile, window),
            _ => None,
        }
    }

    /// With `drawn` the candidates drawn so far, in drawing order, out of at most `budget`:
    /// whether a sequential rule would stop drawing now. ESC and adaptive consistency also
    /// stop once the vote is decided ([`sequential::decided`]: the samples left could not
    /// change the majority), which changes no answer. Always false for the other rules
    /// (they use every candidate).
    pub fn settled(&self, drawn: &[Candidate], budget: usize) -> bool {
        match *self {
            SelectionRule::Esc { window } => {
                sequential::esc_settled(drawn, window) || sequential::decided(drawn, budget)
            }
            SelectionRule::Adaptive { threshold } => {
                sequential::adaptive_settled(drawn, threshold) || sequential::decided(drawn, budget)
            }
            SelectionRule::DeepConfOnline {
                warmup,
                percentile,
                window,
                tau,
            } => online::online_settled(drawn, warmup, percentile, window, tau),
            _ => false,
        }
    }

    /// How many of `candidates` (in drawing order, all of the budget) the rule looks at:
    /// the first prefix that is [`settled`](Self::settled) for a sequential rule (all when
    /// none is), one for greedy, all for the rest. [`select`] decides on exactly this
    /// prefix, so a run that stops drawing there gets the same answer.
    pub fn samples_needed(&self, candidates: &[Candidate]) -> usize {
        match self {
            SelectionRule::Greedy => candidates.len().min(1),
            rule if rule.is_sequential() => (1..=candidates.len())
                .find(|&k| rule.settled(&candidates[..k], candidates.len()))
                .unwrap_or(candidates.len()),
            _ => candidates.len(),
        }
    }
}

impl fmt::Display for SelectionRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectionRule::Greedy => f.write_str("greedy"),
            SelectionRule::Max(score) => write!(f, "max:{score}"),
            SelectionRule::Majority => f.write_str("majority"),
            SelectionRule::Weighted(score) => write!(f, "weighted:{score}"),
            SelectionRule::Borda { power } => write!(f, "borda:{power}"),
            SelectionRule::DeepConf {
                metric,
                keep_percent,
            } => write!(f, "deepconf:{metric}:{keep_percent}"),
            SelectionRule::Cisc { score, temperature } => write!(f, "cisc:{score}:{temperature}"),
            SelectionRule::Esc { window } => write!(f, "esc:{window}"),
            SelectionRule::Adaptive { threshold } => write!(f, "adaptive:{threshold}"),
            SelectionRule::DeepConfOnline {
                warmup,
                percentile,
                window,
                tau,
            } => {
                write!(f, "deepconf-online:{warmup}:{percentile}:{window}")?;
                match tau {
                    Some(tau) => write!(f, ":{tau}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A string that does not name a [`SelectionRule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selection rule {input:?}: {reason}")]
pub struct ParseRuleError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it, for humans.
    pub reason: String,
}

impl FromStr for SelectionRule {
    type Err = ParseRuleError;

    /// `"greedy"`, `"majority"`, `"max:<score>"`, `"weighted:<score>"`, `"borda[:<p>]"`,
    /// `"deepconf:<metric>:<eta>"` (e.g. `"deepconf:bottom10:2048:10"` keeps the top 10%),
    /// `"cisc:<score>:<temperature>"`, `"esc[:<window>]"`, `"adaptive[:<threshold>]"`,
    /// `"deepconf-online:<warmup>:<percentile>:<window>[:<tau>]"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason: String| ParseRuleError {
            input: s.to_string(),
            reason,
        };
        let parse_score = |text: &str| text.parse::<TraceScore>().map_err(|e| error(e.reason));
        let s = s.trim();
        let (name, argument) = match s.split_once(':') {
            Some((name, argument)) => (name, Some(argument)),
            None => (s, None),
        };
        match (name, argument) {
            ("greedy", None) => Ok(SelectionRule::Greedy),
            ("majority", None) => Ok(SelectionRule::Majority),
            ("max", Some(score)) => Ok(SelectionRule::Max(parse_score(score)?)),
            ("weighted", Some(score)) => Ok(SelectionRule::Weighted(parse_score(score)?)),
            ("borda", None) => Ok(SelectionRule::Borda {
                power: DEFAULT_BORDA_POWER,
            }),
            ("borda", Some(power)) => match power.trim().parse::<f64>() {
                Ok(power) if power.is_finite() && power >= 0.0 => {
                    Ok(SelectionRule::Borda { power })
                }
                _ => Err(error("the Borda power must be a number >= 0".into())),
            },
            ("deepconf", Some(rest)) => {
                let Some((metric, eta)) = rest.rsplit_once(':') else {
                    return Err(error("expected deepconf:<metric>:<eta>".into()));
                };
                let metric = parse_score(metric)?;
                match eta.trim().parse::<f64>() {
                    Ok(keep_percent) if keep_percent > 0.0 && keep_percent <= 100.0 => {
                        Ok(SelectionRule::DeepConf {
                            metric,
                            keep_percent,
                        })
                    }
                    _ => Err(error("eta must be a percentage in (0, 100]".into())),
                }
            }
            ("cisc", Some(rest)) => {
                let Some((score, temperature)) = rest.rsplit_once(':') else {
                    return Err(error("expected cisc:<score>:<temperature>".into()));
                };
                let score = parse_score(score)?;
                match temperature.trim().parse::<f64>() {
                    Ok(temperature) if temperature.is_finite() && temperature > 0.0 => {
                        Ok(SelectionRule::Cisc { score, temperature })
                    }
                    _ => Err(error(
                        "the CISC temperature must be a finite number > 0".into(),
                    )),
                }
            }
            ("esc", None) => Ok(SelectionRule::Esc {
                window: DEFAULT_ESC_WINDOW,
            }),
            ("esc", Some(window)) => match window.trim().parse::<usize>() {
                Ok(window) if window >= 1 => Ok(SelectionRule::Esc { window }),
                _ => Err(error("the ESC window must be a whole number >= 1".into())),
            },
            ("adaptive", None) => Ok(SelectionRule::Adaptive {
                threshold: DEFAULT_ADAPTIVE_THRESHOLD,
            }),
            ("adaptive", Some(threshold)) => match threshold.trim().parse::<f64>() {
                Ok(threshold) if threshold > 0.5 && threshold < 1.0 => {
                    Ok(SelectionRule::Adaptive { threshold })
                }
                _ => Err(error(
                    "the adaptive-consistency threshold must be in (0.5, 1)".into(),
                )),
            },
            ("deepconf-online", Some(rest)) => parse_deepconf_online(rest).map_err(error),
            _ => Err(error(
                "expected greedy, majority, max:<score>, weighted:<score>, borda:<p>, deepconf:<metric>:<eta>, cisc:<score>:<temperature>, esc:<window>, adaptive:<threshold> or deepconf-online:<warmup>:<percentile>:<window>[:<tau>]"
                    .into(),
            )),
        }
    }
}

/// `<warmup>:<percentile>:<window>[:<tau>]` of `deepconf-online`.
fn parse_deepconf_online(spec: &str) -> Result<SelectionRule, String> {
    let parts: Vec<&str> = spec.split(':').map(str::trim).collect();
    let [warmup, percentile, window, rest @ ..] = parts.as_slice() else {
        return Err("expected deepconf-online:<warmup>:<percentile>:<window>[:<tau>]".into());
    };
    let warmup = match warmup.parse::<usize>() {
        Ok(w) if w >= 1 => w,
        _ => return Err("the DeepConf-online warm-up must be a whole number >= 1".into()),
    };
    let percentile = match percentile.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => p,
        _ => return Err("the DeepConf-online percentile must be in [0, 100]".into()),
    };
    let window = match window.parse::<usize>() {
        Ok(w) if w >= 1 => w,
        _ => return Err("the DeepConf-online window must be a whole number >= 1".into()),
    };
    let tau = match rest {
        [] => None,
        [tau] => match tau.parse::<f64>() {
            Ok(t) if t > 0.0 && t <= 1.0 => Some(t),
            _ => return Err("the DeepConf-online consensus tau must be in (0, 1]".into()),
        },
        _ => return Err("deepconf-online takes at most 4 values".into()),
    };
    Ok(SelectionRule::DeepConfOnline {
        warmup,
        percentile,
        window,
        tau,
    })
}

/// The pooled vote of one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteRow {
    /// The answer (the first supporter's form of it, when equivalent answers differ).
    pub answer: Answer,
    /// Total vote weight for the answer under the rule (candidate count for majority).
    pub weight: f64,
    /// How many candidates voted for it (including any with weight 0).
    pub count: usize,
}

/// The outcome of a selection.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The selected answer; None when no candidate has one (or there are no candidates).
    pub answer: Option<Answer>,
    /// The representative trace: the winning answer's best-ranked supporter under the
    /// rule's score, the first one for majority (for greedy and max, the chosen
    /// candidate itself).
    pub chosen: Option<usize>,
    /// The vote table, by weight descending (ties: first supporter's index); empty for
    /// greedy and max, which do not vote.
    pub votes: Vec<VoteRow>,
    /// How many candidates, from the first, the rule looked at
    /// ([`SelectionRule::samples_needed`]): fewer than all when a sequential rule settled
    /// early.
    pub used: usize,
}

impl Selection {
    fn empty() -> Self {
        Selection {
            answer: None,
            chosen: None,
            votes: Vec::new(),
            used: 0,
        }
    }
}

/// Applies `rule` to `candidates` (in drawing order).
pub fn select(rule: &SelectionRule, candidates: &[Candidate]) -> Selection {
    if candidates.is_empty() {
        return Selection::empty();
    }
    let used = rule.samples_needed(candidates);
    Selection {
        used,
        ..decide(rule, &candidates[..used])
    }
}

/// The rule's decision on exactly these candidates.
fn decide(rule: &SelectionRule, candidates: &[Candidate]) -> Selection {
    match *rule {
        SelectionRule::Greedy => pick(candidates, 0),
        SelectionRule::Max(score) => pick(candidates, rank_by(candidates, score)[0]),
        SelectionRule::Majority | SelectionRule::Esc { .. } | SelectionRule::Adaptive { .. } => {
            majority(candidates)
        }
        SelectionRule::Weighted(score) => {
            let order = rank_by(candidates, score);
            tally(
                candidates,
                ranked(weighted_ballots(candidates, &order, score)),
            )
        }
        SelectionRule::Borda { power } => {
            let order = rank_by(candidates, TraceScore::MeanSelfCertainty);
            let n = candidates.len();
            let ballots = order
                .iter()
                .enumerate()
                .map(|(rank, &i)| (i, ((n - rank) as f64).powf(power)))
                .collect();
            tally(candidates, ranked(ballots))
        }
        SelectionRule::DeepConf {
            metric,
            keep_percent,
        } => {
            let kept = deepconf_keep(candidates, metric, keep_percent);
            tally(
                candidates,
                ranked(weighted_ballots(candidates, &kept, metric)),
            )
        }
        SelectionRule::DeepConfOnline {
            warmup,
            percentile,
            window,
            ..
        } => {
            let voters = online::online_voters(candidates, warmup, percentile, window);
            let lowest = TraceScore::LowestGroup { window };
            tally(
                candidates,
                ranked(weighted_ballots(candidates, &voters, lowest)),
            )
        }
        SelectionRule::Cisc { score, temperature } => {
            let order = rank_by(candidates, score);
            // Softmax over the candidates that vote; its normaliser is common to every
            // answer, so exp((s − best) / T) decides the same and cannot overflow.
            let best = order
                .iter()
                .filter(|&&i| candidates[i].answer.is_some())
                .filter_map(|&i| candidates[i].score(score))
                .reduce(f64::max)
                .unwrap_or(0.0);
            let ballots = order
                .iter()
                .map(|&i| {
                    let weight = candidates[i]
                        .score(score)
                        .map_or(0.0, |s| ((s - best) / temperature).exp());
                    (i, weight)
                })
                .collect();
            tally(candidates, ranked(ballots))
        }
    }
}

/// One vote per candidate with an answer.
fn majority(candidates: &[Candidate]) -> Selection {
    let ballots = (0..candidates.len()).map(|i| (i, 1.0)).collect();
    tally(candidates, ranked(ballots))
}

fn pick(candidates: &[Candidate], index: usize) -> Selection {
    Selection {
        answer: candidates[index].answer.clone(),
        chosen: Some(index),
        votes: Vec::new(),
        used: 0,
    }
}

/// Candidate indices by `score` descending; candidates without the score come last;
/// equal scores keep index order.
fn rank_by(candidates: &[Candidate], score: TraceScore) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(
        |&a, &b| match (candidates[a].score(score), candidates[b].score(score)) {
            (Some(x), Some(y)) => y.total_cmp(&x),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        },
    );
    order
}

/// Ballots weighted by `score` for the candidates in `order`; shifted by the lowest
/// score when it is negative, so that weights are ≥ 0. A missing score weighs 0.
fn weighted_ballots(
    candidates: &[Candidate],
    order: &[usize],
    score: TraceScore,
) -> Vec<(usize, f64)> {
    let lowest = order
        .iter()
        .filter(|&&i| candidates[i].answer.is_some())
        .filter_map(|&i| candidates[i].score(score))
        .reduce(f64::min)
        .unwrap_or(0.0);
    let shift = lowest.min(0.0);
    order
        .iter()
        .map(|&i| (i, candidates[i].score(score).map_or(0.0, |s| s - shift)))
        .collect()
}

/// DeepConf offline filtering: candidates with an answer and the metric whose metric is
/// at least the (100 − keep_percent)th percentile, best first.
fn deepconf_keep(candidates: &[Candidate], metric: TraceScore, keep_percent: f64) -> Vec<usize> {
    let eligible: Vec<usize> = rank_by(candidates, metric)
        .into_iter()
        .filter(|&i| candidates[i].answer.is_some() && candidates[i].score(metric).is_some())
        .collect();
    let values: Vec<f64> = eligible
        .iter()
        .filter_map(|&i| candidates[i].score(metric))
        .collect();
    let Some(threshold) = percentile(&values, 100.0 - keep_percent) else {
        return Vec::new();
    };
    eligible
        .into_iter()
        .filter(|&i| candidates[i].score(metric).is_some_and(|v| v >= threshold))
        .collect()
}

/// A candidate's vote: its weight, and its rank in the rule's preference order (which
/// picks the representative trace of an answer).
struct Ballot {
    index: usize,
    weight: f64,
    rank: usize,
}

/// Ballots from (candidate index, weight) pairs listed in preference order.
fn ranked(in_preference_order: Vec<(usize, f64)>) -> Vec<Ballot> {
    in_preference_order
        .into_iter()
        .enumerate()
        .map(|(rank, (index, weight))| Ballot {
            index,
            weight,
            rank,
        })
        .collect()
}

/// One answer's pool while tallying.
struct Pool {
    row: VoteRow,
    best_rank: usize,
    representative: usize,
}

/// Pools ballots on equivalent answers; candidates without an answer are skipped and a
/// non-finite weight counts as 0.
fn tally(candidates: &[Candidate], mut ballots: Vec<Ballot>) -> Selection {
    // Pooling in index order makes a pool's position its first supporter's index, so
    // the stable sort by weight below breaks ties by that index.
    ballots.sort_by_key(|b| b.index);
    let mut pools: Vec<Pool> = Vec::new();
    for ballot in ballots {
        let Some(answer) = &candidates[ballot.index].answer else {
            continue;
        };
        let weight = if ballot.weight.is_finite() {
            ballot.weight
        } else {
            0.0
        };
        match pools.iter_mut().find(|p| equivalent(&p.row.answer, answer)) {
            Some(pool) => {
                pool.row.weight += weight;
                pool.row.count += 1;
                if ballot.rank < pool.best_rank {
                    pool.best_rank = ballot.rank;
                    pool.representative = ballot.index;
                }
            }
            None => pools.push(Pool {
                row: VoteRow {
                    answer: answer.clone(),
                    weight,
                    count: 1,
                },
                best_rank: ballot.rank,
                representative: ballot.index,
            }),
        }
    }
    pools.sort_by(|a, b| b.row.weight.total_cmp(&a.row.weight));
    let Some(winner) = pools.first() else {
        return Selection::empty();
    };
    Selection {
        answer: Some(winner.row.answer.clone()),
        chosen: Some(winner.representative),
        votes: pools.into_iter().map(|p| p.row).collect(),
        used: 0,
    }
}

/// The `q`th percentile (0–100) of the finite `values`, interpolating linearly between
/// order statistics like `numpy.percentile`'s default. `None` when there is no finite
/// value or `q` is NaN.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() || q.is_nan() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let position = (sorted.len() - 1) as f64 * q.clamp(0.0, 100.0) / 100.0;
    let below = position.floor() as usize;
    let above = position.ceil() as usize;
    let fraction = position - below as f64;
    Some(sorted[below] + (sorted[above] - sorted[below]) * fraction)
}
