//! Re-scoring saved traces without decoding (`verity eval --from TRACES.jsonl`): read the
//! trace file `verity eval --out` writes, apply any selection rules to its samples, at the
//! full sample count and at smaller ones (accuracy against samples and tokens), and tune
//! CISC's temperature on one split of the questions to report it on the other.
//!
//! Samples keep their per-token statistics, so any trace score can be computed again;
//! files written before they were saved still work for rules whose scores they hold.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use verity::score::{TokenStats, TraceScore, TraceView};
use verity::select::{select, Candidate, SelectionRule};
use verity::verify::{equivalent, extract_answer, reference_answer, Answer};
use verity::{Error, Result};

use crate::eval::RuleResult;

/// Per-token statistics as four columns (a third of the size of one object per token).
/// JSON has no NaN or infinity: serde_json writes them as null, read back as NaN.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenColumns {
    #[serde(deserialize_with = "nullable_floats")]
    pub logprob: Vec<f32>,
    #[serde(deserialize_with = "nullable_floats")]
    pub entropy: Vec<f32>,
    #[serde(deserialize_with = "nullable_floats")]
    pub self_certainty: Vec<f32>,
    #[serde(deserialize_with = "nullable_floats")]
    pub confidence: Vec<f32>,
}

fn nullable_floats<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<f32>, D::Error> {
    let values: Vec<Option<f32>> = Deserialize::deserialize(d)?;
    Ok(values.into_iter().map(|v| v.unwrap_or(f32::NAN)).collect())
}

impl TokenColumns {
    pub fn from_stats(stats: &[TokenStats]) -> Self {
        TokenColumns {
            logprob: stats.iter().map(|s| s.logprob).collect(),
            entropy: stats.iter().map(|s| s.entropy).collect(),
            self_certainty: stats.iter().map(|s| s.self_certainty).collect(),
            confidence: stats.iter().map(|s| s.confidence).collect(),
        }
    }

    /// The statistics again; None when the columns differ in length.
    pub fn to_stats(&self) -> Option<Vec<TokenStats>> {
        let n = self.logprob.len();
        if [&self.entropy, &self.self_certainty, &self.confidence]
            .iter()
            .any(|c| c.len() != n)
        {
            return None;
        }
        Some(
            (0..n)
                .map(|i| TokenStats {
                    logprob: self.logprob[i],
                    entropy: self.entropy[i],
                    self_certainty: self.self_certainty[i],
                    confidence: self.confidence[i],
                })
                .collect(),
        )
    }
}

/// One sampled trace as saved.
#[derive(Debug, Clone)]
pub struct SavedSample {
    pub text: String,
    /// Generated tokens.
    pub tokens: usize,
    /// Whether its own answer was right (used to judge files without a reference).
    pub correct: bool,
    /// Trace scores computed when it was saved, by name.
    pub scores: BTreeMap<String, f64>,
    /// Per-token statistics and token ends (files written since they are saved).
    pub tokens_detail: Option<(Vec<TokenStats>, Vec<usize>)>,
}

/// One question of a trace file: its reference, its greedy trace, its samples in order.
#[derive(Debug, Clone)]
pub struct SavedQuestion {
    pub index: usize,
    pub reference: Option<Answer>,
    /// (correct, tokens) of the temperature-0 trace, when the run had `greedy`.
    pub greedy: Option<(bool, usize)>,
    pub samples: Vec<SavedSample>,
}

impl SavedQuestion {
    /// The samples as selection rules see them, with `scores` computed from the per-token
    /// statistics (or, in older files, taken from the saved scores).
    pub fn candidates(&self, scores: &[TraceScore]) -> Result<Vec<Candidate>> {
        self.samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut c = Candidate::new(extract_answer(&s.text).map(|f| f.answer));
                for &score in scores {
                    let value = match &s.tokens_detail {
                        Some((stats, token_end)) => score.compute(&TraceView {
                            text: &s.text,
                            stats,
                            token_end,
                        }),
                        None => Some(*s.scores.get(&score.to_string()).ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "question {}, sample {i}: no per-token statistics and no saved \
                                 '{score}' score (files from `verity eval --out` of this \
                                 version have both)",
                                self.index
                            ))
                        })?),
                    };
                    if let Some(v) = value {
                        c = c.with_score(score, v);
                    }
                }
                Ok(c)
            })
            .collect()
    }

    /// Whether the selected answer of `rule` over `block` (a run of this question's
    /// candidates starting at sample `offset`) is right, and the tokens of the samples it
    /// used.
    fn judge(&self, rule: &SelectionRule, block: &[Candidate], offset: usize) -> (bool, usize) {
        if *rule == SelectionRule::Greedy {
            return self.greedy.unwrap_or((false, 0));
        }
        let selection = select(rule, block);
        let tokens = self.samples[offset..offset + selection.used]
            .iter()
            .map(|s| s.tokens)
            .sum();
        let correct = match (&self.reference, &selection.answer) {
            (Some(r), Some(a)) => equivalent(a, r),
            (None, Some(_)) => selection
                .chosen
                .is_some_and(|i| self.samples[offset + i].correct),
            (_, None) => false,
        };
        (correct, tokens)
    }
}

/// Reads a trace file of `verity eval --out`: questions in index order, each with its
/// samples in sample order.
pub fn read_traces(path: &Path) -> Result<Vec<SavedQuestion>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut questions: BTreeMap<usize, SavedQuestion> = BTreeMap::new();
    let mut samples: BTreeMap<(usize, usize), SavedSample> = BTreeMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |what: String| Error::InvalidArgument(format!("{}:{}: {what}", path.display(), n + 1));
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let usize_field = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("'{name}' must be a whole number")))
        };
        let question = usize_field("question")?;
        let entry = questions.entry(question).or_insert_with(|| SavedQuestion {
            index: question,
            reference: None,
            greedy: None,
            samples: Vec::new(),
        });
        let bool_field = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_bool)
                .ok_or_else(|| bad(format!("'{name}' must be true or false")))
        };
        let text_field = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad(format!("'{name}' must be a string")))
        };
        match v.get("kind").and_then(serde_json::Value::as_str) {
            Some("question") => entry.reference = reference_answer(text_field("reference")?),
            Some("greedy") => entry.greedy = Some((bool_field("correct")?, usize_field("tokens")?)),
            Some("sample") => {
                let index = usize_field("index")?;
                let scores = match v.get("scores") {
                    None => BTreeMap::new(),
                    Some(s) => serde_json::from_value(s.clone())
                        .map_err(|e| bad(format!("'scores': {e}")))?,
                };
                let tokens = usize_field("tokens")?;
                let tokens_detail = match (v.get("token_stats"), v.get("token_end")) {
                    (Some(stats), Some(ends)) => {
                        let columns: TokenColumns = serde_json::from_value(stats.clone())
                            .map_err(|e| bad(format!("'token_stats': {e}")))?;
                        let ends: Vec<usize> = serde_json::from_value(ends.clone())
                            .map_err(|e| bad(format!("'token_end': {e}")))?;
                        match columns.to_stats() {
                            Some(stats) if stats.len() == tokens && ends.len() == tokens => {
                                Some((stats, ends))
                            }
                            _ => {
                                return Err(bad(format!(
                                    "'token_stats' and 'token_end' must hold one value per token ({tokens})"
                                )))
                            }
                        }
                    }
                    _ => None,
                };
                let sample = SavedSample {
                    text: text_field("text")?.to_string(),
                    tokens,
                    correct: bool_field("correct")?,
                    scores,
                    tokens_detail,
                };
                if samples.insert((question, index), sample).is_some() {
                    return Err(bad(format!("question {question} has sample {index} twice")));
                }
            }
            Some(_) => {} // rule and online lines are results, not inputs
            None => return Err(bad("no 'kind'".into())),
        }
    }
    for ((question, index), sample) in samples {
        let q = questions
            .get_mut(&question)
            .ok_or_else(|| Error::Internal("a sample without its question".into()))?;
        if index != q.samples.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: question {question} has sample {index} but not sample {}",
                path.display(),
                q.samples.len()
            )));
        }
        q.samples.push(sample);
    }
    let questions: Vec<SavedQuestion> = questions.into_values().collect();
    if questions.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} holds no questions",
            path.display()
        )));
    }
    Ok(questions)
}

/// The sample count every question of `questions` has (0 when they have none).
pub fn samples_per_question(questions: &[SavedQuestion], path: &Path) -> Result<usize> {
    let n = questions[0].samples.len();
    match questions.iter().find(|q| q.samples.len() != n) {
        Some(q) => Err(Error::InvalidArgument(format!(
            "{}: question {} has {} samples and question {} has {n}; rules are compared on \
             equal sample counts",
            path.display(),
            q.index,
            q.samples.len(),
            questions[0].index
        ))),
        None => Ok(n),
    }
}

fn needed_scores(rules: &[SelectionRule]) -> Vec<TraceScore> {
    let mut scores: Vec<TraceScore> = rules.iter().flat_map(|r| r.required_scores()).collect();
    scores.sort();
    scores.dedup();
    scores
}

/// Every rule on every question with all its samples: the same table as a live run
/// (without wall time, which re-scoring does not spend).
pub fn rescore(questions: &[SavedQuestion], rules: &[SelectionRule]) -> Result<Vec<RuleResult>> {
    let scores = needed_scores(rules);
    let mut results: Vec<RuleResult> = rules
        .iter()
        .map(|r| RuleResult::new(r.to_string(), questions.len()))
        .collect();
    check_greedy(questions, rules)?;
    for (qi, q) in questions.iter().enumerate() {
        let candidates = q.candidates(&scores)?;
        for (rule, result) in rules.iter().zip(&mut results) {
            let (ok, tokens) = q.judge(rule, &candidates, 0);
            result.record(qi, ok, tokens, std::time::Duration::ZERO);
        }
    }
    for r in &mut results {
        r.finish();
    }
    Ok(results)
}

fn check_greedy(questions: &[SavedQuestion], rules: &[SelectionRule]) -> Result<()> {
    if rules.contains(&SelectionRule::Greedy) {
        if let Some(q) = questions.iter().find(|q| q.greedy.is_none()) {
            return Err(Error::InvalidArgument(format!(
                "rule 'greedy': question {} has no greedy trace (the run had no 'greedy' rule)",
                q.index
            )));
        }
    }
    Ok(())
}

/// One rule at one sample count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    pub rule: String,
    /// Samples the rule was given per question (its budget, for sequential rules).
    pub samples: usize,
    /// Accuracy, averaged over the disjoint blocks of `samples` consecutive samples of
    /// each question, then over questions.
    pub accuracy: f64,
    /// Generated tokens per question the rule used, averaged the same way.
    pub tokens: f64,
}

/// The sample counts of a curve over n samples: 1, 2, 4, … below n, and n.
pub fn curve_sizes(n: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| s.checked_mul(2))
        .take_while(|&s| s < n)
        .collect();
    if n > 0 {
        sizes.push(n);
    }
    sizes
}

/// Every rule at each of `sizes` samples per question. A question with n samples is cut
/// into ⌊n / size⌋ disjoint blocks of consecutive samples and the rule is applied to each:
/// the mean over blocks estimates accuracy at that size with far less noise than one block
/// would. (Greedy does not sample: it is the same at every size.)
pub fn curve(
    questions: &[SavedQuestion],
    rules: &[SelectionRule],
    sizes: &[usize],
) -> Result<Vec<CurvePoint>> {
    let scores = needed_scores(rules);
    check_greedy(questions, rules)?;
    let candidates: Vec<Vec<Candidate>> = questions
        .iter()
        .map(|q| q.candidates(&scores))
        .collect::<Result<_>>()?;
    let mut points = Vec::new();
    for rule in rules {
        for &size in sizes {
            let (mut accuracy, mut tokens) = (0.0, 0.0);
            for (q, cands) in questions.iter().zip(&candidates) {
                let blocks = cands.len() / size.max(1);
                if blocks == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "question {} has {} samples, fewer than {size}",
                        q.index,
                        cands.len()
                    )));
                }
                for b in 0..blocks {
                    let (ok, t) = q.judge(rule, &cands[b * size..(b + 1) * size], b * size);
                    accuracy += f64::from(u8::from(ok)) / blocks as f64;
                    tokens += t as f64 / blocks as f64;
                }
            }
            let count = questions.len().max(1) as f64;
            points.push(CurvePoint {
                rule: rule.to_string(),
                samples: size,
                accuracy: accuracy / count,
                tokens: tokens / count,
            });
        }
    }
    Ok(points)
}

/// CISC's temperature for `score`, tuned on `questions`: the most accurate of a grid of
/// multiples of the score's spread (its standard deviation over every sample), so the
/// grid fits any score's units. Ties go to the larger temperature, the one closer to
/// majority vote.
pub fn tune_cisc(questions: &[SavedQuestion], score: TraceScore) -> Result<f64> {
    let candidates: Vec<Vec<Candidate>> = questions
        .iter()
        .map(|q| q.candidates(&[score]))
        .collect::<Result<_>>()?;
    let values: Vec<f64> = candidates
        .iter()
        .flatten()
        .filter_map(|c| c.score(score))
        .collect();
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let spread = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
        / values.len().max(1) as f64)
        .sqrt();
    let spread = if spread.is_finite() && spread > 0.0 {
        spread
    } else {
        1.0
    };
    let mut best: Option<(usize, f64)> = None;
    for factor in [30.0, 10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01] {
        let temperature = factor * spread;
        let rule = SelectionRule::Cisc { score, temperature };
        let correct = questions
            .iter()
            .zip(&candidates)
            .filter(|(q, c)| q.judge(&rule, c, 0).0)
            .count();
        // Largest first, so a tie keeps the larger temperature.
        if best.is_none_or(|(b, _)| correct > b) {
            best = Some((correct, temperature));
        }
    }
    Ok(best.map_or(spread, |(_, t)| t))
}

/// Which parameter of a sequential rule to tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequentialKind {
    /// ESC's window, over 1 ..= n / 2.
    Esc,
    /// Adaptive consistency's threshold, over a grid in (0.5, 1).
    Adaptive,
}

/// The most frugal setting of a sequential rule on `questions` (n samples each) that stays
/// within `slack` questions of majority vote over all n: fewest tokens among the settings
/// that are that accurate; when none is, the most accurate (ties: fewer tokens).
pub fn tune_sequential(
    questions: &[SavedQuestion],
    kind: SequentialKind,
    n: usize,
    slack: usize,
) -> Result<SelectionRule> {
    let grid: Vec<SelectionRule> = match kind {
        SequentialKind::Esc => (1..=(n / 2).max(1))
            .map(|window| SelectionRule::Esc { window })
            .collect(),
        SequentialKind::Adaptive => [0.76, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99]
            .into_iter()
            .map(|threshold| SelectionRule::Adaptive { threshold })
            .collect(),
    };
    let mut rules = vec![SelectionRule::Majority];
    rules.extend(&grid);
    let results = rescore(questions, &rules)?;
    let target = results[0].correct().saturating_sub(slack);
    let pick = results[1..]
        .iter()
        .zip(&grid)
        .min_by(|(a, _), (b, _)| {
            let (a_ok, b_ok) = (a.correct() >= target, b.correct() >= target);
            b_ok.cmp(&a_ok)
                .then_with(|| match a_ok {
                    true => std::cmp::Ordering::Equal,
                    false => b.correct().cmp(&a.correct()),
                })
                .then_with(|| a.mean_tokens.total_cmp(&b.mean_tokens))
        })
        .map(|(_, rule)| *rule);
    pick.ok_or_else(|| Error::InvalidArgument("nothing to tune on".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, tokens: usize, correct: bool, sc: f64) -> SavedSample {
        SavedSample {
            text: text.into(),
            tokens,
            correct,
            scores: BTreeMap::from([("self_certainty".to_string(), sc)]),
            tokens_detail: None,
        }
    }

    fn question(index: usize, reference: Option<&str>, samples: Vec<SavedSample>) -> SavedQuestion {
        SavedQuestion {
            index,
            reference: reference.and_then(reference_answer),
            greedy: Some((false, 7)),
            samples,
        }
    }

    #[test]
    fn curve_sizes_are_powers_of_two_then_n() {
        assert_eq!(curve_sizes(16), vec![1, 2, 4, 8, 16]);
        assert_eq!(curve_sizes(12), vec![1, 2, 4, 8, 12]);
        assert_eq!(curve_sizes(1), vec![1]);
        assert!(curve_sizes(0).is_empty());
    }

    /// Four samples: answers 5, 5, 3, 5 with 10, 20, 30, 40 tokens; reference 5.
    fn four() -> SavedQuestion {
        question(
            0,
            Some("#### 5"),
            vec![
                sample("\\boxed{5}", 10, true, 1.0),
                sample("\\boxed{5}", 20, true, 1.0),
                sample("\\boxed{3}", 30, false, 9.0),
                sample("\\boxed{5}", 40, true, 1.0),
            ],
        )
    }

    #[test]
    fn rules_are_charged_the_tokens_of_the_samples_they_used() {
        let q = [four()];
        let rules: Vec<SelectionRule> = ["majority", "esc:2", "max:self_certainty", "greedy"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let r = rescore(&q, &rules).unwrap();
        // Majority: 5 wins with all 100 tokens. ESC(2): 5, 5 is unanimous after 30.
        // Best-of-N picks the confident wrong 3. Greedy comes from its own trace.
        let got: Vec<(bool, f64)> = r.iter().map(|r| (r.outcomes[0], r.mean_tokens)).collect();
        assert_eq!(
            got,
            vec![(true, 100.0), (true, 30.0), (false, 100.0), (false, 7.0)]
        );
    }

    #[test]
    fn the_curve_averages_disjoint_blocks() {
        let q = [four()];
        let rules = [SelectionRule::Majority];
        let points = curve(&q, &rules, &curve_sizes(4)).unwrap();
        let got: Vec<(usize, f64, f64)> = points
            .iter()
            .map(|p| (p.samples, p.accuracy, p.tokens))
            .collect();
        // Size 1: 3 of 4 singletons right, 25 tokens on average. Size 2: blocks (5, 5)
        // right and (3, 5) a tie that the first supporter (3) wins: half right, 50 tokens.
        assert_eq!(got, vec![(1, 0.75, 25.0), (2, 0.5, 50.0), (4, 1.0, 100.0)]);
    }

    #[test]
    fn without_a_reference_the_chosen_samples_flag_judges() {
        let mut q = four();
        q.reference = None;
        let r = rescore(&[q], &[SelectionRule::Majority]).unwrap();
        assert!(r[0].outcomes[0]);
    }

    #[test]
    fn older_files_need_the_saved_score() {
        let q = [four()];
        let e = rescore(&q, &["max:tail:64".parse().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("'tail:64'"), "{e}");
    }

    #[test]
    fn cisc_tuning_finds_a_temperature_between_majority_and_best_of_n() {
        // Question 1: majority right, the most confident sample wrong: right when
        // e^(−0.5/T) + e^(−0.4/T) > 1, i.e. T > 0.85 (a high T).
        // Questions 2 and 3: majority wrong, one confident sample right: right when
        // 2·e^(−1/T) < 1, i.e. T < 1/ln 2 = 1.44 (a low T).
        let q1 = question(
            0,
            Some("#### 1"),
            vec![
                sample("\\boxed{1}", 1, true, 0.0),
                sample("\\boxed{1}", 1, true, 0.1),
                sample("\\boxed{2}", 1, false, 0.5),
            ],
        );
        let q2 = |i| {
            question(
                i,
                Some("#### 4"),
                vec![
                    sample("\\boxed{3}", 1, false, 0.0),
                    sample("\\boxed{3}", 1, false, 0.0),
                    sample("\\boxed{4}", 1, true, 1.0),
                ],
            )
        };
        let questions = [q1, q2(1), q2(2)];
        let t = tune_cisc(&questions, TraceScore::MeanSelfCertainty).unwrap();
        // The scores' standard deviation is 0.40946; of the grid, 3 × 0.4095 = 1.23 is the
        // one temperature in (0.85, 1.44).
        assert!((t - 3.0 * 0.409_456).abs() < 1e-5, "T = {t}");
        let rule = SelectionRule::Cisc {
            score: TraceScore::MeanSelfCertainty,
            temperature: t,
        };
        assert_eq!(rescore(&questions, &[rule]).unwrap()[0].correct(), 3);
        // On question 1 alone every T above 0.85 is right: the tie goes to the largest.
        let t1 = tune_cisc(&questions[..1], TraceScore::MeanSelfCertainty).unwrap();
        let spread1 = (((0.0f64 - 0.2).powi(2) + (0.1f64 - 0.2).powi(2) + (0.5f64 - 0.2).powi(2))
            / 3.0)
            .sqrt();
        assert!((t1 - 30.0 * spread1).abs() < 1e-9, "{t1}");
    }

    #[test]
    fn sequential_tuning_takes_the_cheapest_setting_that_keeps_majoritys_accuracy() {
        // Question A: 5, 5, 3, 3, 3, 3, 5, 5 → majority 3 (4 to 4, first supporter of 3
        // at index 2 loses to 5 at index 0: majority says 5, right). ESC(1) stops at the
        // first sample (5, right, 10 tokens); ESC(2) at samples 0-1 (5, right).
        // Question B: 7, 8, 8, 8, 8, 8, 8, 8 → majority 8 (right); ESC(1) says 7 (wrong);
        // ESC(2) stops at samples 2-3 (8, right).
        let a = question(
            0,
            Some("#### 5"),
            [5, 5, 3, 3, 3, 3, 5, 5]
                .iter()
                .map(|v| sample(&format!("\\boxed{{{v}}}"), 10, *v == 5, 0.0))
                .collect(),
        );
        let b = question(
            1,
            Some("#### 8"),
            [7, 8, 8, 8, 8, 8, 8, 8]
                .iter()
                .map(|v| sample(&format!("\\boxed{{{v}}}"), 10, *v == 8, 0.0))
                .collect(),
        );
        let qs = [a, b];
        // Majority gets both; ESC(2) gets both with 20 + 40 tokens; ESC(1) loses B.
        let rule = tune_sequential(&qs, SequentialKind::Esc, 8, 0).unwrap();
        assert_eq!(rule, SelectionRule::Esc { window: 2 });
        // Allowed to lose one question, ESC(1) is cheapest (10 tokens each).
        let rule = tune_sequential(&qs, SequentialKind::Esc, 8, 1).unwrap();
        assert_eq!(rule, SelectionRule::Esc { window: 1 });
        // Adaptive at 0.76 (one vote, P = 3/4, is not enough): A stops at (2, 0) with
        // P = 7/8, B at (3, 1) with P = 13/16: both right with 60 tokens, as at 0.8; the
        // grid's first of equally cheap settings is kept. At 0.9 B runs on to (4, 1).
        let rule = tune_sequential(&qs, SequentialKind::Adaptive, 8, 0).unwrap();
        assert_eq!(rule, SelectionRule::Adaptive { threshold: 0.76 });
    }

    #[test]
    fn token_columns_round_trip() {
        let stats = vec![
            TokenStats {
                logprob: -0.5,
                entropy: 1.0,
                self_certainty: 2.0,
                confidence: 3.0,
            },
            TokenStats::default(),
        ];
        let columns = TokenColumns::from_stats(&stats);
        let json = serde_json::to_string(&columns).unwrap();
        let back: TokenColumns = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_stats().unwrap(), stats);
        // A non-finite statistic is written as null and read back as NaN, not an error.
        let mut odd = columns.clone();
        odd.entropy[1] = f32::INFINITY;
        let json = serde_json::to_string(&odd).unwrap();
        assert!(json.contains("null"), "{json}");
        let read: TokenColumns = serde_json::from_str(&json).unwrap();
        assert!(read.entropy[1].is_nan() && read.entropy[0] == 1.0);
        let mut uneven = back;
        uneven.entropy.pop();
        assert!(uneven.to_stats().is_none());
    }
}
