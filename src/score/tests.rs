//! Tests for the trace scores against hand-computed values.

use super::*;

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

fn stats_from_conf(conf: &[f32]) -> Vec<TokenStats> {
    conf.iter()
        .map(|&c| TokenStats {
            confidence: c,
            ..TokenStats::default()
        })
        .collect()
}

#[test]
fn group_confidences_slide_with_stride_one() {
    let conf = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    assert_eq!(group_confidences(&conf, 3), vec![2.0, 3.0, 4.0, 5.0]);
    assert_eq!(group_confidences(&conf, 6), vec![3.5]);
    // Fewer tokens than the window: one group, the mean of all.
    assert_eq!(group_confidences(&conf, 10), vec![3.5]);
    // A window of 0 is taken as 1.
    assert_eq!(group_confidences(&conf, 0).len(), 6);
    assert!(group_confidences(&[], 3).is_empty());
    assert_eq!(
        group_confidences(&[5.0, 1.0, 5.0, 1.0, 5.0], 2),
        vec![3.0; 4]
    );
}

#[test]
fn lowest_bottom_and_tail() {
    let conf = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    assert!(close(lowest_group_confidence(&conf, 3), 2.0));
    // 4 groups: 10% rounds down to 0, so the single lowest group.
    assert!(close(bottom_percent_group_confidence(&conf, 3, 10.0), 2.0));
    assert!(close(bottom_percent_group_confidence(&conf, 3, 50.0), 2.5));
    assert!(close(bottom_percent_group_confidence(&conf, 3, 100.0), 3.5));
    assert!(close(tail_confidence(&conf, 3), 5.0));
    assert!(close(tail_confidence(&conf, 100), 3.5));
    assert_eq!(lowest_group_confidence(&[], 3), None);
    assert_eq!(bottom_percent_group_confidence(&[], 3, 10.0), None);
    assert_eq!(tail_confidence(&[], 3), None);
}

#[test]
fn bottom_ten_percent_of_twenty_groups_is_two_groups() {
    // 23 tokens 0..22 with window 4: group i has mean i + 1.5, 20 groups.
    let conf: Vec<f32> = (0..23).map(|i| i as f32).collect();
    assert_eq!(group_confidences(&conf, 4).len(), 20);
    assert!(close(bottom_percent_group_confidence(&conf, 4, 10.0), 2.0));
    // Order does not matter: the lowest groups are found anywhere.
    let reversed: Vec<f32> = conf.iter().rev().copied().collect();
    assert!(close(
        bottom_percent_group_confidence(&reversed, 4, 10.0),
        2.0
    ));
}

#[test]
fn token_means() {
    let stats = [
        TokenStats {
            logprob: -0.5,
            entropy: 0.2,
            self_certainty: 1.0,
            confidence: 0.0,
        },
        TokenStats {
            logprob: -1.5,
            entropy: 0.4,
            self_certainty: 2.0,
            confidence: 0.0,
        },
        TokenStats {
            logprob: -1.0,
            entropy: 0.3,
            self_certainty: 3.0,
            confidence: 0.0,
        },
    ];
    assert!(close(mean_self_certainty(&stats), 2.0));
    assert!(close(mean_logprob(&stats), -1.0));
    assert!((mean_entropy(&stats).unwrap_or(f64::NAN) - 0.3).abs() < 1e-7);
    let view = TraceView {
        text: "",
        stats: &stats,
        token_end: &[],
    };
    assert!(close(TraceScore::MeanSelfCertainty.compute(&view), 2.0));
    assert!(close(TraceScore::MeanLogprob.compute(&view), -1.0));
    let neg_entropy = TraceScore::NegMeanEntropy
        .compute(&view)
        .unwrap_or(f64::NAN);
    assert!((neg_entropy + 0.3).abs() < 1e-7);
    assert_eq!(mean_self_certainty(&[]), None);
}

#[test]
fn crew_averages_the_answer_tokens() {
    let text = "The answer is 42.";
    // "The" " answer" " is" " 4" "2" "."
    let token_end = [3, 10, 13, 15, 16, 17];
    let stats = stats_from_conf(&[1.0, 2.0, 3.0, 4.0, 6.0, 8.0]);
    let view = TraceView {
        text,
        stats: &stats,
        token_end: &token_end,
    };
    // "42" is bytes 14..16, overlapping " 4" and "2".
    assert!(close(crew(&view, 14..16), 5.0));
    assert!(close(TraceScore::Crew.compute(&view), 5.0));
    assert!(close(crew(&view, 0..17), 4.0));
    assert_eq!(crew(&view, 5..5), None);
    assert_eq!(crew(&view, 40..50), None);
    // Fewer token ends than stats: only the tokens with an end are used.
    let short = TraceView {
        text,
        stats: &stats,
        token_end: &token_end[..2],
    };
    assert!(close(crew(&short, 0..4), 1.5));
    let no_answer = TraceView {
        text: "nothing here",
        stats: &stats,
        token_end: &token_end,
    };
    assert_eq!(TraceScore::Crew.compute(&no_answer), None);
}

#[test]
fn compute_group_scores() {
    let stats = stats_from_conf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let view = TraceView {
        text: "",
        stats: &stats,
        token_end: &[],
    };
    assert!(close(
        TraceScore::LowestGroup { window: 3 }.compute(&view),
        2.0
    ));
    assert!(close(
        TraceScore::Bottom10 { window: 3 }.compute(&view),
        2.0
    ));
    assert!(close(TraceScore::Tail { window: 2 }.compute(&view), 5.5));
}

#[test]
fn empty_and_non_finite_traces_score_none() {
    let empty = TraceView {
        text: "",
        stats: &[],
        token_end: &[],
    };
    let nan_stats = stats_from_conf(&[1.0, f32::NAN]);
    let nan = TraceView {
        text: "",
        stats: &nan_stats,
        token_end: &[],
    };
    for score in [
        TraceScore::MeanSelfCertainty,
        TraceScore::MeanLogprob,
        TraceScore::NegMeanEntropy,
        TraceScore::LowestGroup { window: 2 },
        TraceScore::Bottom10 { window: 2 },
        TraceScore::Tail { window: 2 },
        TraceScore::Crew,
    ] {
        assert_eq!(score.compute(&empty), None, "{score}");
    }
    assert_eq!(TraceScore::Tail { window: 2 }.compute(&nan), None);
}

#[test]
fn parse_and_display_round_trip() {
    for text in [
        "self_certainty",
        "logprob",
        "entropy",
        "crew",
        "lowest_group:64",
        "bottom10:2048",
        "tail:1",
    ] {
        let score: TraceScore = text.parse().expect(text);
        assert_eq!(score.to_string(), text);
    }
    assert_eq!(
        "lowest_group".parse(),
        Ok(TraceScore::LowestGroup {
            window: DEFAULT_WINDOW
        })
    );
    for bad in [
        "",
        "bogus",
        "tail:0",
        "tail:-1",
        "tail:abc",
        "crew:5",
        "bottom10:",
    ] {
        assert!(bad.parse::<TraceScore>().is_err(), "{bad}");
    }
}
