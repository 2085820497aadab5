//! The `Runtime` on SmolLM2: verifier rewards recorded as feedback, background learning
//! that steps once enough rewarded traces are pending, adapter save → load → select, and
//! the errors a host gets for unknown ids and bad values.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use verity::engine::Request;
use verity::runtime::{GenerateRequest, Runtime, RuntimeConfig};
use verity::select::{select, SelectionRule};
use verity::verify::FnVerifier;
use verity::{ChatMessage, Error};

fn runtime() -> Runtime {
    let config = RuntimeConfig {
        model: common::real_model(common::SMOLLM2),
        learn_min_traces: 4,
        ..RuntimeConfig::default()
    };
    Runtime::new(config).unwrap()
}

fn request(n: usize, seed: u64) -> GenerateRequest {
    let mut r = Request::chat(vec![ChatMessage::user(
        "What is 3 + 4? Answer in \\boxed{}.",
    )]);
    r.n = n;
    r.max_tokens = 12;
    r.sampling.temperature = 0.9;
    r.sampling.seed = seed;
    GenerateRequest::new(r)
}

#[test]
fn verifier_rewards_drive_background_learning() {
    let rt = runtime();
    // A host verifier: reward 1 for traces whose text has an even length.
    rt.register_verifier(
        "even",
        Arc::new(FnVerifier::new(|text, _| {
            (text.len() % 2 == 0) as u8 as f64
        })),
    )
    .unwrap();
    let mut req = request(4, 3);
    req.selection = Some(SelectionRule::Majority);
    req.verify = Some(("even".into(), String::new()));
    let result = rt.generate(req).unwrap();
    assert_eq!(result.traces.len(), 4);
    for t in &result.traces {
        let want = (t.trace.text.len() % 2 == 0) as u8 as f64;
        assert_eq!(t.reward, Some(want), "{:?}", t.trace.text);
    }
    assert_eq!(rt.feedback_pending(), 4);
    let ids: Vec<u64> = result.traces.iter().map(|t| t.id).collect();
    // A reward the group statistics cannot take is refused and consumes nothing (1e308
    // used to be stored, and the next step's loss was NaN).
    for bad in [1e308, -2e6, f64::INFINITY] {
        match rt.feedback(ids[0], bad) {
            Err(Error::OutOfRange(m)) => assert!(m.contains("reward"), "{m}"),
            other => panic!("reward {bad}: {other:?}"),
        }
    }
    assert_eq!(rt.feedback_pending(), 4);
    assert_eq!(ids.windows(2).filter(|w| w[1] == w[0] + 1).count(), 3);

    // Background learning steps once 4 rewarded traces are pending (they already are).
    let before = rt.adapter_version("learned").unwrap();
    rt.start_learning(None).unwrap();
    // (A bound against a hang, not a speed check: other tests share the two cores.)
    let deadline = Instant::now() + Duration::from_secs(600);
    while rt.learning_status().steps == 0 {
        assert!(Instant::now() < deadline, "no background step");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.stop_learning();
    let status = rt.learning_status();
    assert!(!status.running);
    assert_eq!(status.pending, 0, "trained traces leave the store");
    let rewards: Vec<f64> = result.traces.iter().filter_map(|t| t.reward).collect();
    let varied = rewards.iter().any(|&r| r != rewards[0]);
    let after = rt.adapter_version("learned").unwrap();
    // A group whose rewards are all equal carries no signal and is skipped (dynamic
    // sampling); otherwise the step changes the adapter.
    assert_eq!(after, before + varied as u64, "{status:?}");
    // The traces were consumed: feedback on them now is an error.
    assert!(matches!(rt.feedback(ids[0], 1.0), Err(Error::NotFound(_))));
}

#[test]
fn adapters_round_trip_and_errors_are_typed() {
    let rt = runtime();
    let dir = common::temp_dir("runtime-adapters");
    let saved = rt.adapter_save("learned", Some(&dir)).unwrap();
    assert!(saved.join("adapter_config.json").is_file());
    rt.adapter_load("copy", &saved).unwrap();
    let ids: Vec<String> = rt.adapters().into_iter().map(|a| a.id).collect();
    assert_eq!(ids, vec!["copy", "learned"]);
    // A fresh adapter (B = 0) changes nothing: the same greedy text on base and copy.
    let greedy = |adapter: &str| {
        let mut r = request(1, 0);
        r.request.sampling.temperature = 0.0;
        r.adapter = Some(adapter.into());
        rt.generate(r).unwrap().traces.remove(0).trace.text
    };
    assert_eq!(greedy("copy"), greedy("base"));
    rt.adapter_select(Some("copy")).unwrap();
    assert_eq!(rt.default_adapter().as_deref(), Some("copy"));
    assert_eq!(
        rt.generate(request(1, 0)).unwrap().adapter.as_deref(),
        Some("copy")
    );
    rt.adapter_remove("copy").unwrap();
    assert_eq!(
        rt.default_adapter(),
        None,
        "removing the default falls back to base"
    );

    assert!(matches!(
        rt.feedback(u64::MAX, 1.0),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        rt.feedback(1, f64::NAN),
        Err(Error::OutOfRange(_))
    ));
    // More traces than the store ever holds: learning would wait forever.
    assert!(matches!(
        rt.start_learning(Some(1_000_000_000_000_000_000)),
        Err(Error::OutOfRange(_))
    ));
    assert!(!rt.learning_status().running);
    assert!(matches!(
        rt.adapter_select(Some("missing")),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        rt.adapter_remove("learned"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        rt.adapter_load("../evil", &saved),
        Err(Error::InvalidArgument(_))
    ));
    let mut unknown = request(1, 0);
    unknown.verify = Some(("nope".into(), "7".into()));
    assert!(matches!(rt.generate(unknown), Err(Error::NotFound(_))));
    let report = rt.learn_step().unwrap();
    assert!(!report.applied && report.skipped.is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An error keeps its kind from the engine to the surfaces: a failed decode step is
/// `Internal` (HTTP 500), a bad parameter `InvalidArgument` refused at submit (400), a
/// stopped runtime `Unavailable` (503). The engine survives a failed step.
#[test]
fn errors_keep_their_kind_from_the_engine_to_the_surfaces() {
    let rt = runtime();
    rt.fail_next_decode_steps(1);
    let err = rt.generate(request(2, 0)).unwrap_err();
    assert!(matches!(err, Error::Internal(_)), "{err}");
    assert!(err.to_string().contains("decode step failed"), "{err}");
    assert_eq!(err.http_status(), 500);
    assert_eq!(rt.generate(request(2, 1)).unwrap().traces.len(), 2);

    let mut bad = request(1, 0);
    bad.request.sampling.temperature = f32::NAN;
    let err = rt.submit(bad).err().expect("refused at submit");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(err.http_status(), 400);
    let stats = rt.stats();
    assert_eq!((stats.requests_failed, stats.in_flight), (2, 0));

    rt.shutdown();
    let err = rt
        .submit(request(1, 0))
        .err()
        .expect("refused after shutdown");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert_eq!(err.http_status(), 503);
}

/// A sequential selection rule decodes in the engine until the answer settles, and its
/// result is what the same rule picks offline from the plain request's samples: sample i is
/// the same trace in both, so the online run is the offline simulation, cut short.
#[test]
fn online_sequential_rules_equal_their_offline_simulation() {
    let rt = runtime();
    let make = |selection: Option<SelectionRule>| {
        let mut r = Request::chat(vec![ChatMessage::user(
            "What is 2 + 2? Answer in \\boxed{}.",
        )]);
        r.n = 8;
        r.max_tokens = 64;
        r.sampling.temperature = 0.3;
        r.sampling.seed = 11;
        GenerateRequest {
            selection,
            remember: false,
            ..GenerateRequest::new(r)
        }
    };
    let plain = rt.generate(make(None)).unwrap();
    let mut stopped_early = 0;
    // esc:1 and adaptive:0.6 settle on the first sample with an answer (one vote gives
    // P = 3/4); the others stop wherever these samples let them.
    assert!(plain.traces[0].answer.is_some());
    for rule in ["esc:1", "adaptive:0.6", "esc:2", "adaptive:0.9", "esc:8"] {
        let rule: SelectionRule = rule.parse().unwrap();
        let offline = select(&rule, plain.candidates());
        let online = rt.generate(make(Some(rule))).unwrap();
        assert_eq!(
            online.answer,
            offline.answer.as_ref().map(|a| a.to_string()),
            "{rule}"
        );
        let settled = rule.settled(&plain.candidates()[..offline.used], 8);
        assert_eq!(
            online.settled_after,
            settled.then_some(offline.used),
            "{rule}"
        );
        for (a, b) in plain.traces[..offline.used].iter().zip(&online.traces) {
            assert_eq!(
                a.trace.tokens, b.trace.tokens,
                "{rule}: sample {}",
                a.trace.index
            );
        }
        if offline.used < 8 {
            stopped_early += 1;
            assert!(
                online.generated_tokens() < plain.generated_tokens(),
                "{rule}"
            );
        }
    }
    assert!(
        stopped_early >= 2,
        "esc:1 and adaptive:0.6 stop at the first answer"
    );
    let mut zero = make(Some("esc:2".parse().unwrap()));
    zero.parallel = Some(0);
    assert!(matches!(rt.generate(zero), Err(Error::InvalidArgument(_))));
}

/// DeepConf online in the engine: the warm-up samples run whole, their lowest group
/// confidences set the threshold, and every later sample is the plain request's sample
/// cut at the token where a replayed window tracker falls below that threshold. Stopped
/// samples free their slot for the next one, so the whole budget is drawn; stopped
/// samples never vote.
#[test]
fn deepconf_online_cuts_later_samples_where_the_warmup_threshold_says() {
    use verity::engine::FinishReason;
    use verity::score::lowest_group_confidence;
    use verity::select::{percentile, WindowTracker};
    let rt = runtime();
    let (n, warmup, window, pct) = (8, 3, 6, 75.0);
    let make = |selection: Option<SelectionRule>, parallel: Option<usize>| {
        let mut r = Request::chat(vec![ChatMessage::user(
            "What is 17 + 25? Think step by step, then answer in \\boxed{}.",
        )]);
        r.n = n;
        r.max_tokens = 40;
        r.sampling.temperature = 1.0;
        r.sampling.seed = 5;
        GenerateRequest {
            selection,
            parallel,
            remember: false,
            ..GenerateRequest::new(r)
        }
    };
    let plain = rt.generate(make(None, None)).unwrap();
    let confidences: Vec<Vec<f32>> = plain
        .traces
        .iter()
        .map(|t| t.trace.stats.iter().map(|s| s.confidence).collect())
        .collect();
    let warm: Vec<f64> = confidences[..warmup]
        .iter()
        .filter_map(|c| lowest_group_confidence(c, window))
        .collect();
    let threshold = percentile(&warm, pct).unwrap();
    let rule = SelectionRule::DeepConfOnline {
        warmup,
        percentile: pct,
        window,
        tau: None,
    };
    // One sample at a time: every later sample knows the threshold from its first token.
    let online = rt.generate(make(Some(rule), Some(1))).unwrap();
    assert_eq!(online.traces.len(), n, "the whole budget is drawn");
    assert_eq!(online.settled_after, None);
    let mut cut = 0;
    for (i, (p, o)) in plain.traces.iter().zip(&online.traces).enumerate() {
        let stop = if i < warmup {
            None
        } else {
            let mut tracker = WindowTracker::new(window, Some(threshold));
            confidences[i].iter().position(|&c| tracker.push(c))
        };
        match stop {
            Some(k) if k + 1 < p.trace.tokens.len() => {
                cut += 1;
                assert_eq!(o.trace.finish, FinishReason::AbortedLowConfidence, "{i}");
                assert_eq!(o.trace.tokens, p.trace.tokens[..=k], "sample {i}");
                assert_eq!(o.answer, None, "a cut sample has no answer");
            }
            _ => assert_eq!(o.trace.tokens, p.trace.tokens, "sample {i}"),
        }
    }
    assert!(cut >= 1, "no later sample fell below {threshold}");
    // The vote: samples that ran whole and reach the threshold, weighted by their lowest
    // group confidence.
    let voters: f64 = online
        .traces
        .iter()
        .zip(&confidences)
        .filter(|(o, _)| !o.trace.finish.is_cut_short() && o.answer.is_some())
        .filter_map(|(_, c)| lowest_group_confidence(c, window))
        .filter(|&l| l >= threshold)
        .sum();
    let weights: f64 = online.votes.iter().map(|v| v.weight).sum();
    assert!((voters - weights).abs() < 1e-9, "{voters} vs {weights}");
    // Refill at the default width (the warm-up): still the whole budget, and every sample
    // a prefix of the plain one.
    let wide = rt.generate(make(Some(rule), None)).unwrap();
    assert_eq!(wide.traces.len(), n);
    for (p, o) in plain.traces.iter().zip(&wide.traces) {
        assert!(p.trace.tokens.starts_with(&o.trace.tokens));
    }
    assert_eq!(
        wide.traces[..warmup]
            .iter()
            .map(|t| &t.trace.tokens)
            .collect::<Vec<_>>(),
        plain.traces[..warmup]
            .iter()
            .map(|t| &t.trace.tokens)
            .collect::<Vec<_>>()
    );
    // A consensus share any vote reaches settles the request right after the warm-up.
    let settle = SelectionRule::DeepConfOnline {
        warmup,
        percentile: pct,
        window,
        tau: Some(0.01),
    };
    let settled = rt.generate(make(Some(settle), None)).unwrap();
    let a_voter = plain.traces[..warmup]
        .iter()
        .zip(&confidences)
        .any(|(t, c)| t.answer.is_some() && lowest_group_confidence(c, window) >= Some(threshold));
    assert_eq!(settled.settled_after, a_voter.then_some(warmup));
}
