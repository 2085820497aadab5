//! The sequential rules (ESC, adaptive consistency) and CISC's confidence-weighted vote.

use super::*;

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
    // A missing answer breaks a window; with no unanimous window, candidates are drawn
    // until the vote is decided (2 leads 6 to 4 after 11, with 1 left), and the answer is
    // plain majority vote.
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
    assert_eq!((s.answer.clone(), s.used), (num(2.0), 11));
    assert_eq!(s, select(&SelectionRule::Majority, &c[..11]));
    // A partial last window never settles; the first full one can.
    assert!(!esc.settled(&c[..3], 16));
    assert!(esc.settled(&answers(&[Some(5.0); 4]), 16));
    assert!(!esc.settled(&answers(&[Some(5.0); 6]), 16));
    assert!(SelectionRule::Esc { window: 1 }.settled(&answers(&[Some(5.0)]), 16));
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
fn a_decided_vote_stops_drawing() {
    // ESC's windows of 4 are never unanimous here, but after 11 of 16 the leader has 9
    // votes to 2: the 5 left cannot change the majority (after 10, 8 to 2 with 6 left could).
    let v: Vec<Option<f64>> = (0..16)
        .map(|i| Some(if i % 4 == 3 { 6.0 } else { 5.0 }))
        .collect();
    let esc = SelectionRule::Esc { window: 4 };
    let c = answers(&v);
    assert!(!esc.settled(&c[..10], 16) && esc.settled(&c[..11], 16));
    assert_eq!(select(&esc, &c).used, 11);
    // A lead equal to what is left is not decided (the runner-up could tie). (Unanimous
    // votes of 8 and 9 are below this threshold: 1 − 2⁻⁹ and 1 − 2⁻¹⁰.)
    let strict = SelectionRule::Adaptive { threshold: 0.9999 };
    assert!(!strict.settled(&answers(&[Some(5.0); 8]), 16));
    assert!(strict.settled(&answers(&[Some(5.0); 9]), 16));
    assert!(!strict.settled(&answers(&[Some(5.0); 9]), usize::MAX));
    // Without answers nothing is decided, whatever the budget.
    assert!(!esc.settled(&answers(&[None; 3]), 3));
}

/// Stopping once the vote is decided changes no answer: on every sequence of answers
/// (seeded, three answers and none, budgets 1-16), ESC and adaptive consistency answer as
/// they do when the budget is unbounded (no vote is ever decided), after no more samples.
#[test]
fn a_decided_stop_changes_no_answer() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rules = [
        SelectionRule::Esc { window: 2 },
        SelectionRule::Esc { window: 4 },
        SelectionRule::Adaptive { threshold: 0.8 },
        SelectionRule::Adaptive { threshold: 0.95 },
    ];
    let mut saved = 0;
    for _ in 0..4000 {
        let n = 1 + (next() % 16) as usize;
        // Skewed towards one answer, as samples of one question are.
        let v: Vec<Option<f64>> = (0..n)
            .map(|_| match next() % 10 {
                0..=4 => Some(1.0),
                5..=6 => Some(2.0),
                7..=8 => Some(3.0),
                _ => None,
            })
            .collect();
        let c = answers(&v);
        for rule in rules {
            let unbounded = (1..=n)
                .find(|&k| rule.settled(&c[..k], usize::MAX))
                .unwrap_or(n);
            let used = rule.samples_needed(&c);
            assert!(used <= unbounded, "{rule} {v:?}");
            let with_stop = select(&rule, &c);
            let without = select(&SelectionRule::Majority, &c[..unbounded]);
            assert_eq!(with_stop.answer, without.answer, "{rule} {v:?}");
            saved += unbounded - used;
        }
    }
    // The stop did happen (otherwise the comparison above tested nothing).
    assert!(saved > 1000, "{saved} samples saved");
}

#[test]
fn non_sequential_rules_use_every_candidate() {
    let c = answers(&[Some(1.0); 5]);
    for rule in [
        SelectionRule::Majority,
        SelectionRule::Max(SC),
        SelectionRule::Borda { power: 0.5 },
    ] {
        assert!(!rule.is_sequential() && !rule.settled(&c, 5));
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
