//! DeepConf online: the warm-up threshold, the sliding-window tracker, the online vote.

use super::*;

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
    let reached = crate::select::online::consensus_reached;
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
    assert!(rule.settled(&drawn, 16));
    // Not before the warm-up is complete, even when unanimous.
    assert!(!rule.settled(&drawn[..2], 16));
    // At the 0th percentile (11) every warm-up trace votes: 25 / 36 < 0.75.
    let wide = online_rule(3, 0.0, Some(0.75));
    assert!(!wide.settled(&drawn, 16));
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
