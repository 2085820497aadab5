//! Tests for the selection rules and DeepConf online, on hand-computed cases.

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

// ---- DeepConf online ----

const LOWEST3: TraceScore = TraceScore::LowestGroup { window: 3 };

fn online_rule(warmup: usize, percentile: f64, tau: Option<f64>) -> SelectionRule {
    SelectionRule::DeepConfOnline {
        warmup,
        percentile,
        window: 3,
        tau,
    }
}

/// Six warm-up candidates with lowest group confidences 14, 10, 18, 12, (none), 16.
fn warmup_candidates() -> Vec<Candidate> {
    [
        Some(14.0),
        Some(10.0),
        Some(18.0),
        Some(12.0),
        None,
        Some(16.0),
    ]
    .into_iter()
    .map(|v| {
        let c = Candidate::new(num(1.0));
        match v {
            Some(v) => c.with_score(LOWEST3, v),
            None => c,
        }
    })
    .collect()
}

#[test]
fn online_threshold_from_warmup() {
    let drawn = warmup_candidates();
    let low = online_rule(6, 10.0, None);
    // Not before the whole warm-up is drawn.
    assert_eq!(low.online_threshold(&drawn[..5]), None);
    // 10th percentile of 10, 12, 14, 16, 18 (the candidate without a score is skipped):
    // position 0.4 between 10 and 12.
    let t = low.online_threshold(&drawn).unwrap_or(f64::NAN);
    assert!((t - 10.8).abs() < 1e-12, "{t}");
    let t = online_rule(6, 90.0, None)
        .online_threshold(&drawn)
        .unwrap_or(f64::NAN);
    assert!((t - 17.2).abs() < 1e-12, "{t}");
    // Later candidates do not move it.
    let mut more = drawn.clone();
    more.push(Candidate::new(num(2.0)).with_score(LOWEST3, 0.0));
    assert_eq!(low.online_threshold(&more), low.online_threshold(&drawn));
    assert_eq!(SelectionRule::Majority.online_threshold(&drawn), None);
}

/// Feeds a stream and returns the step (1-based) at which the tracker stopped it.
fn stop_step(tracker: &mut WindowTracker, stream: &[f32]) -> Option<usize> {
    for (i, &c) in stream.iter().enumerate() {
        if tracker.push(c) {
            return Some(i + 1);
        }
    }
    None
}

#[test]
fn online_traces_stop_at_the_expected_token() {
    let tracker = || WindowTracker::new(3, Some(10.8));
    // Window means: 12, 11.5, 11.33, then (11+11+10)/3 = 10.67 < 10.8.
    let mut a = tracker();
    assert_eq!(
        stop_step(&mut a, &[12.0, 11.0, 11.0, 10.0, 12.0, 12.0]),
        Some(4)
    );
    assert_eq!(a.stopped_at(), Some(4));
    assert_eq!(a.tokens_seen(), 4);
    // Pushing after a stop changes nothing.
    assert!(a.push(30.0));
    assert_eq!(a.tokens_seen(), 4);
    // Before a full window the running mean decides: 10 < 10.8 at the first token.
    let mut b = tracker();
    assert_eq!(stop_step(&mut b, &[10.0, 20.0]), Some(1));
    // Running means 11, then 10.75 < 10.8: stopped at 2, before the window is full.
    let mut c = tracker();
    assert_eq!(stop_step(&mut c, &[11.0, 10.5]), Some(2));
    // Never below: never stopped.
    let mut d = tracker();
    assert_eq!(stop_step(&mut d, &[20.0, 5.0, 20.0, 20.0, 20.0]), None);
    assert_eq!(d.lowest_group_confidence(), Some(15.0));
}

#[test]
fn tracker_without_threshold_never_stops_until_one_is_set() {
    let mut tracker = WindowTracker::new(3, None);
    assert_eq!(stop_step(&mut tracker, &[0.0; 100]), None);
    assert_eq!(tracker.current_mean(), Some(0.0));
    // A threshold learned mid-trace applies from the next token on: window means
    // (0+0+9)/3 = 3 < 5 stops at once; a fresh one over 9, 9, 9 does not.
    tracker.set_threshold(5.0);
    assert_eq!(stop_step(&mut tracker, &[9.0]), Some(1));
    let mut fresh = WindowTracker::new(3, None);
    fresh.set_threshold(5.0);
    assert_eq!(stop_step(&mut fresh, &[9.0, 9.0, 9.0]), None);
}

#[test]
fn tracker_stops_on_a_scripted_window_dip() {
    let mut tracker = WindowTracker::new(3, Some(5.0));
    // Means: 6, 6, 6, 5, 5, 5, 5, then (6+3+3)/3 = 4 < 5 at token 8.
    let stream = [6.0, 6.0, 6.0, 3.0, 6.0, 6.0, 3.0, 3.0, 6.0];
    assert_eq!(stop_step(&mut tracker, &stream), Some(8));
    assert_eq!(tracker.lowest_group_confidence(), Some(4.0));
}

#[test]
fn tracker_lowest_group_matches_score_module() {
    let mut rng = XorShift(42);
    for _ in 0..500 {
        let len = rng.below(30) as usize;
        let window = 1 + rng.below(8) as usize;
        let stream: Vec<f32> = (0..len).map(|_| rng.below(1000) as f32 / 100.0).collect();
        let mut tracker = WindowTracker::new(window, None);
        for &c in &stream {
            tracker.push(c);
        }
        let expected = lowest_group_confidence(&stream, window);
        match (tracker.lowest_group_confidence(), expected) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{stream:?} w={window}"),
            (a, b) => assert_eq!(a, b),
        }
    }
}

#[test]
fn consensus_share_of_the_vote_weight() {
    let row = |answer: f64, weight: f64| VoteRow {
        answer: Answer::Number(answer),
        weight,
        count: 1,
    };
    let reached = online::consensus_reached;
    assert!(reached(&[row(1.0, 3.0), row(2.0, 1.0)], 0.75));
    assert!(!reached(&[row(1.0, 2.0), row(2.0, 1.0)], 0.75));
    assert!(!reached(&[], 0.75));
    assert!(!reached(&[row(1.0, 0.0)], 0.75));
}

#[test]
fn online_vote_keeps_warmup_and_later_traces_above_the_threshold() {
    // Warm-up of 3 (window 3): 12, 11, 13 -> 50th percentile 12.
    let rule = online_rule(3, 50.0, Some(0.75));
    let c =
        |answer: Option<Answer>, lowest: f64| Candidate::new(answer).with_score(LOWEST3, lowest);
    let mut drawn = vec![c(num(5.0), 12.0), c(num(6.0), 11.0), c(num(5.0), 13.0)];
    // Voters: 5 (12) and 5 (13); 6 (11) is below 12. One answer: consensus.
    let s = select(&online_rule(3, 50.0, None), &drawn);
    assert_eq!(rows(&s), vec![("5".to_string(), 25.0, 2)]);
    assert_eq!((s.answer.clone(), s.chosen, s.used), (num(5.0), Some(2), 3));
    assert!(rule.settled(&drawn));
    // Not before the warm-up is complete, even when unanimous.
    assert!(!rule.settled(&drawn[..2]));
    // At the 0th percentile (11) every warm-up trace votes: 25 / 36 < 0.75.
    let wide = online_rule(3, 0.0, Some(0.75));
    assert!(!wide.settled(&drawn));
    // A stopped trace (no answer) never votes; a later confident one does.
    drawn.push(c(None, 30.0));
    drawn.push(c(num(6.0), 14.0));
    let s = select(&wide, &drawn);
    // Equal weight: the answer whose first supporter came first leads.
    assert_eq!(
        rows(&s),
        vec![("5".to_string(), 25.0, 2), ("6".to_string(), 25.0, 2)]
    );
    assert_eq!(s.answer, num(5.0));
    // Drawing stops at the first prefix that settles: here the warm-up itself.
    assert_eq!(select(&rule, &drawn).used, 3);
    assert_eq!(rule.samples_needed(&drawn), 3);
}

#[test]
fn online_rule_parses_and_prints() {
    let paper = SelectionRule::DeepConfOnline {
        warmup: 16,
        percentile: 90.0,
        window: 2048,
        tau: None,
    };
    for (text, expected) in [
        ("deepconf-online:16:90:2048", paper),
        (
            "deepconf-online:4:10:3:0.95",
            online_rule(4, 10.0, Some(0.95)),
        ),
    ] {
        let parsed: SelectionRule = text.parse().unwrap_or(SelectionRule::Greedy);
        assert_eq!(parsed, expected);
        assert_eq!(parsed.to_string(), text);
        assert!(parsed.is_sequential());
    }
    assert_eq!(
        "deepconf-online:4:90:64"
            .parse::<SelectionRule>()
            .ok()
            .and_then(|r| r.default_parallel()),
        Some(4)
    );
    for bad in [
        "deepconf-online",
        "deepconf-online:0:90:64",
        "deepconf-online:4:101:64",
        "deepconf-online:4:90:0",
        "deepconf-online:4:90:64:0",
        "deepconf-online:4:90:64:1.5",
        "deepconf-online:4:90:64:0.9:1",
        "deepconf-online:x:90:64",
    ] {
        assert!(bad.parse::<SelectionRule>().is_err(), "{bad}");
    }
}

/// P(p₁ > p₂) for p₁ ~ Beta(a, b), by Simpson's rule on the density (an independent check
/// of the binomial sum in `leader_stays_ahead`).
fn beta_upper_half_by_quadrature(a: f64, b: f64) -> f64 {
    let density = |x: f64| x.powf(a - 1.0) * (1.0 - x).powf(b - 1.0);
    let simpson = |lo: f64, hi: f64| {
        let n = 20_000;
        let h = (hi - lo) / n as f64;
        let mut sum = density(lo) + density(hi);
        for i in 1..n {
            sum += density(lo + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        sum * h / 3.0
    };
    simpson(0.5, 1.0) / simpson(0.0, 1.0)
}

#[test]
fn the_beta_stopping_rule_matches_its_integral_and_hand_values() {
    // By hand: P(Binomial(v₁ + v₂ + 1, ½) ≤ v₁).
    assert_eq!(leader_stays_ahead(0, 0), 0.5);
    assert!((leader_stays_ahead(1, 0) - 0.75).abs() < 1e-15);
    assert!((leader_stays_ahead(3, 0) - 15.0 / 16.0).abs() < 1e-15);
    assert!((leader_stays_ahead(4, 0) - 31.0 / 32.0).abs() < 1e-15);
    assert!((leader_stays_ahead(2, 1) - 11.0 / 16.0).abs() < 1e-15);
    assert!((leader_stays_ahead(6, 1) - 247.0 / 256.0).abs() < 1e-15);
    for (v1, v2) in [(1, 1), (2, 0), (5, 3), (9, 2), (12, 11), (30, 4), (3, 7)] {
        let exact = leader_stays_ahead(v1, v2);
        let integral = beta_upper_half_by_quadrature(v1 as f64 + 1.0, v2 as f64 + 1.0);
        assert!(
            (exact - integral).abs() < 1e-9,
            "({v1}, {v2}): {exact} vs {integral}"
        );
    }
    // Far into the tails it stays a probability.
    assert!(leader_stays_ahead(2000, 0) <= 1.0 && leader_stays_ahead(2000, 0) > 0.999);
    assert!(leader_stays_ahead(0, 2000) >= 0.0 && leader_stays_ahead(0, 2000) < 1e-300);
}

fn answers(values: &[Option<f64>]) -> Vec<Candidate> {
    values
        .iter()
        .map(|v| Candidate::new(v.map(Answer::Number)))
        .collect()
}

#[test]
fn esc_stops_after_the_first_unanimous_window() {
    let esc = SelectionRule::Esc { window: 4 };
    // Window 1 is split, window 2 unanimous: 8 drawn, majority of those 8 (1 has 7 votes).
    let c = answers(&[
        Some(1.0),
        Some(2.0),
        Some(1.0),
        Some(1.0),
        Some(1.0),
        Some(1.0),
        Some(1.0),
        Some(1.0),
        Some(2.0),
        Some(2.0),
        Some(2.0),
        Some(2.0),
    ]);
    assert_eq!(esc.samples_needed(&c), 8);
    let s = select(&esc, &c);
    assert_eq!((s.answer, s.used), (num(1.0), 8));
    assert_eq!(s.votes[0].count, 7);
    // A missing answer breaks a window; with no unanimous window every candidate is used,
    // and the answer is then plain majority vote (2 leads 6 to 5 here).
    let c = answers(&[
        Some(3.0),
        None,
        Some(3.0),
        Some(3.0),
        Some(2.0),
        Some(2.0),
        Some(3.0),
        Some(2.0),
        Some(2.0),
        Some(2.0),
        Some(2.0),
        Some(3.0),
    ]);
    let s = select(&esc, &c);
    assert_eq!((s.answer.clone(), s.used), (num(2.0), 12));
    assert_eq!(
        s,
        Selection {
            used: 12,
            ..select(&SelectionRule::Majority, &c)
        }
    );
    // A partial last window never settles; the first full one can.
    assert!(!esc.settled(&c[..3]));
    assert!(esc.settled(&answers(&[Some(5.0); 4])));
    assert!(!esc.settled(&answers(&[Some(5.0); 6])));
    assert!(SelectionRule::Esc { window: 1 }.settled(&answers(&[Some(5.0)])));
}

#[test]
fn adaptive_consistency_stops_when_the_leader_is_safe() {
    let rule = SelectionRule::Adaptive { threshold: 0.95 };
    // Unanimous: 3 votes give 15/16 < 0.95, 4 give 31/32.
    assert_eq!(rule.samples_needed(&answers(&[Some(1.0); 16])), 4);
    // 1, 2, then 1s: (5, 1) gives 120/128 < 0.95, (6, 1) gives 247/256 ≥ 0.95 at the 7th.
    let mut v = vec![Some(1.0), Some(2.0)];
    v.extend([Some(1.0); 10]);
    let s = select(&rule, &answers(&v));
    assert_eq!((s.answer, s.used), (num(1.0), 7));
    // Candidates without an answer do not vote: they only delay the stop.
    let mut v = vec![None, Some(4.0), None];
    v.extend([Some(4.0); 10]);
    assert_eq!(rule.samples_needed(&answers(&v)), 6);
    // A split that never settles uses everything.
    let split = answers(&[
        Some(1.0),
        Some(2.0),
        Some(1.0),
        Some(2.0),
        Some(1.0),
        Some(2.0),
    ]);
    assert_eq!(select(&rule, &split).used, 6);
    // A lower threshold stops sooner: 3 unanimous votes pass 0.9.
    let loose = SelectionRule::Adaptive { threshold: 0.9 };
    assert_eq!(loose.samples_needed(&answers(&[Some(1.0); 16])), 3);
}

#[test]
fn non_sequential_rules_use_every_candidate() {
    let c = answers(&[Some(1.0); 5]);
    for rule in [
        SelectionRule::Majority,
        SelectionRule::Max(SC),
        SelectionRule::Borda { power: 0.5 },
    ] {
        assert!(!rule.is_sequential() && !rule.settled(&c));
        assert_eq!(select(&rule, &c).used, 5, "{rule}");
    }
    assert_eq!(select(&SelectionRule::Greedy, &c).used, 1);
    assert_eq!(select(&SelectionRule::Esc { window: 4 }, &[]).used, 0);
}

#[test]
fn cisc_weighs_votes_by_a_softmax_of_confidence() {
    // Two confident-ish A's against one more confident B.
    let c = vec![
        with_sc(text("A"), 1.9),
        with_sc(text("A"), 1.8),
        with_sc(text("B"), 2.0),
    ];
    let cisc = |temperature| SelectionRule::Cisc {
        score: SC,
        temperature,
    };
    // T = 1: A weighs e^-0.1 + e^-0.2 = 1.7236, B weighs 1.
    let s = select(&cisc(1.0), &c);
    assert_eq!(s.answer, text("A"));
    let a = (-0.1f64).exp() + (-0.2f64).exp();
    assert!((s.votes[0].weight - a).abs() < 1e-12);
    assert!((s.votes[1].weight - 1.0).abs() < 1e-12);
    // T = 0.05: A weighs e^-2 + e^-4 = 0.1536 < 1: best-of-N's answer.
    assert_eq!(select(&cisc(0.05), &c).answer, text("B"));
    assert_eq!(select(&SelectionRule::Max(SC), &c).answer, text("B"));
    // A huge temperature is majority vote; the chosen trace is the best-scored supporter.
    let s = select(&cisc(1e9), &c);
    assert_eq!((s.answer, s.chosen), (text("A"), Some(0)));
    // Scores far apart do not overflow; a candidate without the score weighs 0.
    let c = vec![
        with_sc(text("A"), 1e6),
        Candidate::new(text("B")),
        Candidate::new(text("B")),
    ];
    let s = select(&cisc(1e-3), &c);
    assert_eq!(s.answer, text("A"));
    assert_eq!(s.votes[0].weight, 1.0);
}

#[test]
fn sequential_and_cisc_rules_parse_and_print() {
    for (text, rule) in [
        (
            "esc",
            SelectionRule::Esc {
                window: DEFAULT_ESC_WINDOW,
            },
        ),
        ("esc:8", SelectionRule::Esc { window: 8 }),
        (
            "adaptive",
            SelectionRule::Adaptive {
                threshold: DEFAULT_ADAPTIVE_THRESHOLD,
            },
        ),
        ("adaptive:0.99", SelectionRule::Adaptive { threshold: 0.99 }),
        (
            "cisc:tail:64:0.5",
            SelectionRule::Cisc {
                score: TraceScore::Tail { window: 64 },
                temperature: 0.5,
            },
        ),
    ] {
        let parsed: SelectionRule = text.parse().unwrap();
        assert_eq!(parsed, rule);
        assert_eq!(parsed.to_string().parse::<SelectionRule>().unwrap(), rule);
    }
    for bad in [
        "esc:0",
        "esc:x",
        "adaptive:0.5",
        "adaptive:1",
        "adaptive:nan",
        "cisc:self_certainty",
        "cisc:self_certainty:0",
        "cisc:self_certainty:inf",
        "cisc:nope:1",
    ] {
        assert!(bad.parse::<SelectionRule>().is_err(), "{bad}");
    }
}
