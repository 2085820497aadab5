//! Tests for the selection rules, on hand-computed cases; DeepConf online and the
//! sequential rules (ESC, adaptive consistency, CISC) in the submodules.

use super::*;
use crate::score::{lowest_group_confidence, TokenStats};

const SC: TraceScore = TraceScore::MeanSelfCertainty;
const METRIC: TraceScore = TraceScore::Bottom10 { window: 4 };

fn num(x: f64) -> Option<Answer> {
    Some(Answer::Number(x))
}

fn text(t: &str) -> Option<Answer> {
    Some(Answer::Text(t.to_string()))
}

/// A candidate with an answer and a self-certainty score.
fn with_sc(answer: Option<Answer>, self_certainty: f64) -> Candidate {
    Candidate::new(answer).with_score(SC, self_certainty)
}

fn rows(selection: &Selection) -> Vec<(String, f64, usize)> {
    selection
        .votes
        .iter()
        .map(|r| (r.answer.to_string(), r.weight, r.count))
        .collect()
}

#[test]
fn majority_breaks_ties_by_first_index() {
    let candidates: Vec<Candidate> = [num(1.0), num(2.0), num(2.0), None, num(1.0), num(3.0)]
        .into_iter()
        .map(Candidate::new)
        .collect();
    let s = select(&SelectionRule::Majority, &candidates);
    assert_eq!(s.answer, num(1.0));
    assert_eq!(s.chosen, Some(0));
    assert_eq!(
        rows(&s),
        vec![
            ("1".into(), 2.0, 2),
            ("2".into(), 2.0, 2),
            ("3".into(), 1.0, 1)
        ]
    );
}

#[test]
fn majority_pools_equivalent_answers() {
    let candidates: Vec<Candidate> = [num(7.0), num(18.0), num(18.000_000_000_1), num(7.5)]
        .into_iter()
        .map(Candidate::new)
        .collect();
    let s = select(&SelectionRule::Majority, &candidates);
    assert_eq!(s.answer, num(18.0));
    assert_eq!(s.chosen, Some(1));
    assert_eq!(s.votes[0].count, 2);
}

#[test]
fn no_answers_and_no_candidates() {
    let nothing = vec![Candidate::new(None), Candidate::new(None)];
    for rule in [
        "majority",
        "borda:0.5",
        "weighted:self_certainty",
        "deepconf:self_certainty:50",
    ] {
        let rule: SelectionRule = rule.parse().expect(rule);
        let s = select(&rule, &nothing);
        assert_eq!(
            (s.answer, s.chosen, s.votes.len()),
            (None, None, 0),
            "{rule}"
        );
        assert_eq!(select(&rule, &[]).chosen, None);
    }
    let greedy = select(&SelectionRule::Greedy, &nothing);
    assert_eq!((greedy.answer, greedy.chosen), (None, Some(0)));
    assert_eq!(select(&SelectionRule::Greedy, &[]).chosen, None);
}

/// c0: A sc 0.1, c1: B sc 0.9, c2: A sc 0.5, c3: no answer sc 1.0.
/// Ranks by self-certainty: c3 (r0), c1 (r1), c2 (r2), c0 (r3); N = 4.
fn borda_case() -> Vec<Candidate> {
    vec![
        with_sc(text("A"), 0.1),
        with_sc(text("B"), 0.9),
        with_sc(text("A"), 0.5),
        with_sc(None, 1.0),
    ]
}

#[test]
fn borda_power_one_tie_goes_to_first_index() {
    // B: 3^1 = 3; A: 2 + 1 = 3. Tie: A's first supporter is c0, B's is c1.
    let s = select(&SelectionRule::Borda { power: 1.0 }, &borda_case());
    assert_eq!(s.answer, text("A"));
    // The representative is A's best-ranked supporter.
    assert_eq!(s.chosen, Some(2));
    assert_eq!(rows(&s), vec![("A".into(), 3.0, 2), ("B".into(), 3.0, 1)]);
}

#[test]
fn borda_power_half_and_two() {
    // p = 0.5: A = sqrt 2 + 1 = 2.414, B = sqrt 3 = 1.732.
    let half = select(&SelectionRule::Borda { power: 0.5 }, &borda_case());
    assert_eq!(half.answer, text("A"));
    assert!((half.votes[0].weight - (2f64.sqrt() + 1.0)).abs() < 1e-12);
    // p = 2: B = 9, A = 4 + 1 = 5.
    let two = select(&SelectionRule::Borda { power: 2.0 }, &borda_case());
    assert_eq!(two.answer, text("B"));
    assert_eq!(two.chosen, Some(1));
    assert_eq!(rows(&two), vec![("B".into(), 9.0, 1), ("A".into(), 5.0, 2)]);
}

#[test]
fn weighted_vote_shifts_negative_scores() {
    let lp = TraceScore::MeanLogprob;
    let candidates = vec![
        Candidate::new(text("A")).with_score(lp, -1.0),
        Candidate::new(text("B")).with_score(lp, -3.0),
        Candidate::new(text("B")).with_score(lp, -2.5),
    ];
    // Shifted by the lowest score, -3: A = 2, B = 0 + 0.5.
    let s = select(&SelectionRule::Weighted(lp), &candidates);
    assert_eq!(s.answer, text("A"));
    assert_eq!(s.chosen, Some(0));
    assert_eq!(rows(&s), vec![("A".into(), 2.0, 1), ("B".into(), 0.5, 2)]);
    // Majority would say B.
    assert_eq!(
        select(&SelectionRule::Majority, &candidates).answer,
        text("B")
    );
}

#[test]
fn weighted_vote_with_positive_and_missing_scores() {
    let candidates = vec![
        with_sc(text("A"), 0.9),
        with_sc(text("B"), 0.5),
        with_sc(text("B"), 0.5),
        Candidate::new(text("A")),
    ];
    let s = select(&SelectionRule::Weighted(SC), &candidates);
    assert_eq!(s.answer, text("B"));
    assert_eq!(s.chosen, Some(1));
    assert_eq!(rows(&s), vec![("B".into(), 1.0, 2), ("A".into(), 0.9, 2)]);
}

#[test]
fn max_and_greedy() {
    let candidates = vec![
        with_sc(num(1.0), 0.2),
        with_sc(None, 0.7),
        with_sc(num(3.0), 0.5),
    ];
    let best = select(&SelectionRule::Max(SC), &candidates);
    assert_eq!((best.answer, best.chosen), (None, Some(1)));
    assert!(best.votes.is_empty());
    let logprob = select(&SelectionRule::Max(TraceScore::MeanLogprob), &candidates);
    assert_eq!(
        logprob.chosen,
        Some(0),
        "no candidate has the score: the first one"
    );
    let greedy = select(&SelectionRule::Greedy, &candidates);
    assert_eq!((greedy.answer, greedy.chosen), (num(1.0), Some(0)));
}

/// Ten answered candidates with metric 1..=10, plus an unanswered one with metric 100.
/// Metric 10 says X; 9 and 8 say Y; the rest say Z.
fn deepconf_case() -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> = (1..=10)
        .map(|m| {
            let answer = match m {
                10 => text("X"),
                8 | 9 => text("Y"),
                _ => text("Z"),
            };
            Candidate::new(answer).with_score(METRIC, f64::from(m))
        })
        .collect();
    candidates.push(Candidate::new(None).with_score(METRIC, 100.0));
    candidates
}

#[test]
fn deepconf_keeps_top_ten_percent() {
    // 90th percentile of 1..=10 is 9.1: only metric 10 is kept.
    let rule = SelectionRule::DeepConf {
        metric: METRIC,
        keep_percent: 10.0,
    };
    let s = select(&rule, &deepconf_case());
    assert_eq!((s.answer.clone(), s.chosen), (text("X"), Some(9)));
    assert_eq!(rows(&s), vec![("X".into(), 10.0, 1)]);
}

#[test]
fn deepconf_keeps_top_thirty_percent() {
    // 70th percentile is 7.3: metrics 8, 9, 10 are kept; Y = 17 beats X = 10.
    let rule: SelectionRule = "deepconf:bottom10:4:30".parse().expect("rule");
    let s = select(&rule, &deepconf_case());
    assert_eq!((s.answer.clone(), s.chosen), (text("Y"), Some(8)));
    assert_eq!(rows(&s), vec![("Y".into(), 17.0, 2), ("X".into(), 10.0, 1)]);
    // Keeping everything is a metric-weighted vote: Z = 1+..+7 = 28.
    let all: SelectionRule = "deepconf:bottom10:4:100".parse().expect("rule");
    assert_eq!(select(&all, &deepconf_case()).answer, text("Z"));
}

/// xorshift64* for the randomised checks.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn borda_power_zero_is_majority_on_random_inputs() {
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    for _ in 0..2_000 {
        let n = 1 + rng.below(12) as usize;
        let candidates: Vec<Candidate> = (0..n)
            .map(|_| {
                let answer = match rng.below(5) {
                    0 => None,
                    k => num(k as f64),
                };
                // Few distinct scores, so that ranks tie often.
                with_sc(answer, rng.below(4) as f64 - 1.5)
            })
            .collect();
        let borda = select(&SelectionRule::Borda { power: 0.0 }, &candidates);
        let majority = select(&SelectionRule::Majority, &candidates);
        assert_eq!(borda.answer, majority.answer);
        assert_eq!(borda.votes, majority.votes);
    }
}

#[test]
fn rules_parse_and_display() {
    for text in [
        "greedy",
        "majority",
        "max:self_certainty",
        "max:crew",
        "weighted:tail:64",
        "borda:0.5",
        "borda:0",
        "borda:2",
        "deepconf:bottom10:2048:10",
        "deepconf:lowest_group:16:90",
        "deepconf:self_certainty:25",
    ] {
        let rule: SelectionRule = text.parse().expect(text);
        assert_eq!(rule.to_string(), text);
    }
    assert_eq!(
        "borda".parse(),
        Ok(SelectionRule::Borda {
            power: DEFAULT_BORDA_POWER
        })
    );
    for bad in [
        "",
        "vote",
        "max",
        "max:bogus",
        "borda:-1",
        "borda:nan",
        "deepconf:bottom10:2048",
        "deepconf:bottom10:2048:0",
        "deepconf:bottom10:2048:101",
        "greedy:1",
    ] {
        assert!(bad.parse::<SelectionRule>().is_err(), "{bad}");
    }
    assert_eq!(
        "deepconf:lowest_group:16:90"
            .parse::<SelectionRule>()
            .map(|r| r.required_scores()),
        Ok(vec![TraceScore::LowestGroup { window: 16 }])
    );
}

#[test]
fn candidate_from_trace() {
    let stats = [
        TokenStats {
            self_certainty: 2.0,
            confidence: 1.0,
            ..TokenStats::default()
        },
        TokenStats {
            self_certainty: 4.0,
            confidence: 3.0,
            ..TokenStats::default()
        },
    ];
    let view = TraceView {
        text: "#### 12",
        stats: &stats,
        token_end: &[4, 7],
    };
    let c = Candidate::from_trace(&view, &[SC, TraceScore::Crew, TraceScore::MeanLogprob]);
    assert_eq!(c.answer, num(12.0));
    assert_eq!(c.score(SC), Some(3.0));
    assert_eq!(c.score(TraceScore::Crew), Some(3.0));
    assert_eq!(c.score(TraceScore::MeanLogprob), Some(0.0));
    assert_eq!(c.score(TraceScore::Tail { window: 2 }), None);
}

#[test]
fn percentile_matches_numpy() {
    let values = [10.0, 12.0, 14.0, 16.0, 18.0];
    // numpy.percentile([10, 12, 14, 16, 18], q) for q = 90, 10, 50, 0, 100.
    let close = |q: f64, expected: f64| {
        let got = percentile(&values, q).unwrap_or(f64::NAN);
        assert!((got - expected).abs() < 1e-12, "q={q}: {got}");
    };
    close(90.0, 17.2);
    close(10.0, 10.8);
    close(50.0, 14.0);
    close(0.0, 10.0);
    close(100.0, 18.0);
    let sixteen: Vec<f64> = (1..=16).map(f64::from).collect();
    assert_eq!(percentile(&sixteen, 90.0), Some(14.5));
    assert_eq!(percentile(&[], 90.0), None);
    assert_eq!(percentile(&[3.0], 90.0), Some(3.0));
    assert_eq!(percentile(&[f64::NAN, 1.0], 50.0), Some(1.0));
}

mod online;
mod sequential;
