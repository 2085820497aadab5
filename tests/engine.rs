//! The batched engine on the tiny model and on SmolLM2: batching changes nothing, the
//! prompt of n samples is prefilled once, statistics equal an f64 reference, continuous
//! batching admits and frees as it should, and every way a trace can end works.

mod common;
use common::*;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use verity::engine::{
    Engine, EngineConfig, Event, FinishReason, Prompt, Request, Sequential, TraceMonitor,
};
use verity::model::config::Architecture;
use verity::sampling::SamplingParams;
use verity::stats::TokenStats;
use verity::Model;

fn tiny_model(name: &str) -> Arc<Model> {
    tiny_dense_model(name, Architecture::Qwen2, 11, &Device::Cpu, DType::F32)
}

fn engine(model: &Arc<Model>, config: EngineConfig) -> Engine {
    Engine::new(model.clone(), config).unwrap()
}

fn req(prompt: &[u32], max_tokens: usize, temperature: f32, seed: u64) -> Request {
    let mut r = Request::new(Prompt::Tokens(prompt.to_vec()));
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r.sampling = SamplingParams {
        temperature,
        seed,
        top_p: 0.95,
        ..Default::default()
    };
    r
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 6, 7],
        vec![100, 20, 30, 40, 50, 60, 70],
        vec![9],
        vec![250, 251, 252, 253, 1],
    ]
}

fn assert_stats_close(a: &[TokenStats], b: &[TokenStats], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for (u, v) in [
            (x.logprob, y.logprob),
            (x.entropy, y.entropy),
            (x.self_certainty, y.self_certainty),
            (x.confidence, y.confidence),
        ] {
            assert!((u - v).abs() <= tol, "{x:?} vs {y:?}");
        }
    }
}

#[test]
fn batched_decode_equals_one_at_a_time_on_the_tiny_model() {
    let model = tiny_model("engine-batch");
    for temperature in [0.0, 0.9] {
        let e = engine(&model, EngineConfig::default());
        let handles: Vec<_> = prompts()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                e.submit(req(p, 12 + i, temperature, 40 + i as u64), None)
                    .unwrap()
            })
            .collect();
        let together: Vec<_> = handles
            .into_iter()
            .map(|h| h.blocking_completion().unwrap())
            .collect();
        let one = engine(
            &model,
            EngineConfig {
                max_batch: 1,
                ..Default::default()
            },
        );
        for (i, p) in prompts().iter().enumerate() {
            let alone = one
                .generate(req(p, 12 + i, temperature, 40 + i as u64), None)
                .unwrap();
            assert_eq!(
                alone.traces[0].tokens, together[i].traces[0].tokens,
                "prompt {i}, T = {temperature}"
            );
            assert_eq!(alone.traces[0].tokens.len(), 12 + i);
            assert_stats_close(&alone.traces[0].stats, &together[i].traces[0].stats, 1e-4);
        }
    }
}

/// The device reduction (the path a GPU takes: statistics, candidates and draws reduced
/// where the logits live, the host finishing cuts) run on the CPU gives what the host path
/// gives: the same tokens for every kind of request, the same statistics and top log-probs.
/// Covers n samples sharing a prompt row, cuts the candidates decide, a nucleus wider than
/// them and penalties (both copy their row), and top log-probs.
#[test]
fn device_reduction_path_equals_the_host_path() {
    let model = tiny_model("engine-device-reduce");
    type Kind = Box<dyn Fn(&mut Request)>;
    let kinds: Vec<Kind> = vec![
        Box::new(|r| r.sampling.temperature = 0.0),
        Box::new(|r| r.sampling.top_p = 1.0),
        Box::new(|_| {}),
        Box::new(|r| {
            r.sampling.top_k = 20;
            r.sampling.min_p = 0.02;
        }),
        Box::new(|r| {
            r.sampling.temperature = 3.0;
            r.sampling.top_p = 0.999;
        }),
        Box::new(|r| r.penalties.repetition = 1.3),
        Box::new(|r| r.top_logprobs = 5),
    ];
    let host = engine(&model, EngineConfig::default());
    // Prompt chunks of 2 tokens: steps that prefill without choosing any token occur too.
    let device = engine(
        &model,
        EngineConfig {
            device_reduce: Some(true),
            prefill_chunk: 2,
            ..Default::default()
        },
    );
    for (k, kind) in kinds.iter().enumerate() {
        let make = |p: &[u32], i: usize| {
            let mut r = req(p, 10, 0.9, 70 + i as u64);
            r.n = 3;
            kind(&mut r);
            r
        };
        let submit = |e: &Engine| -> Vec<_> {
            prompts()
                .iter()
                .enumerate()
                .map(|(i, p)| e.submit(make(p, i), None).unwrap())
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.blocking_completion().unwrap())
                .collect()
        };
        let (a, b) = (submit(&host), submit(&device));
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            for (ta, tb) in a.traces.iter().zip(&b.traces) {
                assert_eq!(ta.tokens, tb.tokens, "kind {k}, prompt {i}");
                assert_stats_close(&ta.stats, &tb.stats, 1e-5);
                assert_eq!(ta.top_logprobs.len(), tb.top_logprobs.len());
                for (x, y) in ta.top_logprobs.iter().zip(&tb.top_logprobs) {
                    assert_eq!(x.len(), y.len());
                    for (p, q) in x.iter().zip(y) {
                        assert_eq!(p.0, q.0, "kind {k}");
                        assert!((p.1 - q.1).abs() < 1e-5, "kind {k}: {p:?} vs {q:?}");
                    }
                }
            }
        }
        // The kinds differ: a test that compares equal outputs of one kind proves little.
        if k == 1 {
            assert_ne!(
                a[0].traces[0].tokens, a[0].traces[1].tokens,
                "samples differ"
            );
        }
    }
    // Without statistics the device path skips the candidates for uncut rows: same tokens.
    let quiet = |device_reduce| {
        engine(
            &model,
            EngineConfig {
                token_stats: false,
                device_reduce,
                ..Default::default()
            },
        )
    };
    let (host, device) = (quiet(Some(false)), quiet(Some(true)));
    for temperature in [0.0, 0.9] {
        for (i, p) in prompts().iter().enumerate() {
            let make = || {
                let mut r = req(p, 10, temperature, 90 + i as u64);
                r.sampling.top_p = 1.0;
                r
            };
            let a = host.generate(make(), None).unwrap();
            let b = device.generate(make(), None).unwrap();
            assert_eq!(a.traces[0].tokens, b.traces[0].tokens, "T = {temperature}");
            assert!(b.traces[0]
                .stats
                .iter()
                .all(|s| *s == TokenStats::default()));
        }
    }
}

/// The formulas again, in f64, straight from a logits row (independent of src/stats.rs).
fn reference_stats(row: &[f64], token: usize, k: usize) -> [f64; 4] {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
    let logp: Vec<f64> = row.iter().map(|z| z - lse).collect();
    let entropy = -logp.iter().map(|l| l.exp() * l).sum::<f64>();
    let v = row.len() as f64;
    let sc = -v.ln() - logp.iter().sum::<f64>() / v;
    let mut sorted = logp.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let conf = -sorted[..k].iter().sum::<f64>() / k as f64;
    [logp[token], entropy, sc, conf]
}

#[test]
fn token_stats_equal_an_f64_reference_from_the_full_logits_row() {
    let model = tiny_model("engine-stats");
    let e = engine(&model, EngineConfig::default());
    let prompt = [3u32, 1, 4, 1, 5, 9, 2, 6];
    let trace = e
        .generate(req(&prompt, 10, 1.0, 5), None)
        .unwrap()
        .traces
        .remove(0);
    let all: Vec<u32> = prompt.iter().chain(&trace.tokens).copied().collect();
    let input = Tensor::new(all.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .transformer
        .forward_train(&input, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let rows: Vec<Vec<f64>> = logits.to_vec2().unwrap();
    for (i, st) in trace.stats.iter().enumerate() {
        let r = reference_stats(&rows[prompt.len() - 1 + i], trace.tokens[i] as usize, 20);
        let ours = [
            st.logprob as f64,
            st.entropy as f64,
            st.self_certainty as f64,
            st.confidence as f64,
        ];
        for (o, t) in ours.iter().zip(r) {
            assert!(
                (o - t).abs() < 1e-4,
                "token {i}: {ours:?} vs reference {r:?}"
            );
        }
    }
}

#[test]
fn n_samples_prefill_the_prompt_once_and_match_separate_requests() {
    let model = tiny_model("engine-prefix");
    let prompt: Vec<u32> = (10..40).collect();
    let e = engine(&model, EngineConfig::default());
    let mut r = req(&prompt, 8, 0.9, 1000);
    r.n = 16;
    let together = e.generate(r, None).unwrap();
    assert_eq!(
        e.stats().prompt_tokens_prefilled,
        prompt.len() as u64,
        "the prompt is prefilled once, not 16 times"
    );
    assert_eq!(together.traces.len(), 16);
    let distinct: std::collections::HashSet<_> =
        together.traces.iter().map(|t| t.tokens.clone()).collect();
    assert!(distinct.len() > 1, "samples differ");
    let separate = engine(&model, EngineConfig::default());
    for (i, t) in together.traces.iter().enumerate() {
        let alone = separate
            .generate(req(&prompt, 8, 0.9, 1000 + i as u64), None)
            .unwrap();
        assert_eq!(alone.traces[0].tokens, t.tokens, "sample {i}");
        assert_stats_close(&alone.traces[0].stats, &t.stats, 1e-4);
    }
    assert_eq!(
        separate.stats().prompt_tokens_prefilled,
        16 * prompt.len() as u64
    );
}

/// A sequential request's samples are the plain request's, token for token; it asks
/// `settled` about every length of the finished run from sample 0, once each and in order;
/// no more than `parallel` samples decode in one step; and once settled, it stops.
#[test]
fn sequential_requests_draw_a_prefix_of_the_plain_samples_and_stop_when_settled() {
    let model = tiny_model("engine-sequential");
    let prompt: Vec<u32> = (10..30).collect();
    let e = engine(&model, EngineConfig::default());
    let mut plain = req(&prompt, 24, 1.0, 500);
    plain.n = 12;
    // Many stop tokens, so that samples end at different lengths and slots refill unevenly.
    plain.stop_tokens = (0..60).collect();
    let all = e.generate(plain.clone(), None).unwrap();
    assert_eq!(all.settled_after, None);
    let lengths: std::collections::BTreeSet<usize> =
        all.traces.iter().map(|t| t.tokens.len()).collect();
    assert!(
        lengths.len() >= 3,
        "samples end at different lengths: {lengths:?}"
    );

    // On the host path and on the device-reduction path (the one a GPU takes, where the
    // late samples' first rows are appended to the step's logits).
    for config in [
        EngineConfig::default(),
        EngineConfig {
            device_reduce: Some(true),
            ..EngineConfig::default()
        },
    ] {
        let e = engine(&model, config);
        // Never settled: all 12, three at a time.
        let asked = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = asked.clone();
        let mut r = plain.clone();
        r.sequential = Some(Sequential {
            parallel: 3,
            settled: Arc::new(move |traces| {
                log.lock().push(traces.len());
                false
            }),
        });
        let steps_before = e.stats().steps;
        let drawn = e.generate(r, None).unwrap();
        let steps = e.stats().steps - steps_before;
        assert_eq!(drawn.settled_after, None);
        assert_eq!(drawn.traces.len(), 12);
        for (a, b) in all.traces.iter().zip(&drawn.traces) {
            assert_eq!(
                (&a.tokens, a.finish),
                (&b.tokens, b.finish),
                "sample {}",
                a.index
            );
            assert_stats_close(&a.stats, &b.stats, 1e-4);
        }
        assert_eq!(*asked.lock(), (1..=12).collect::<Vec<_>>());
        // At most 3 tokens a step (the prompt's step chooses the first three).
        let tokens: usize = all.traces.iter().map(|t| t.tokens.len()).sum();
        assert!(
            steps as usize >= tokens.div_ceil(3),
            "{steps} steps for {tokens} tokens"
        );

        // Settled by the first five: they are the plain ones, later ones stopped or never began.
        let mut r = plain.clone();
        r.sequential = Some(Sequential {
            parallel: 3,
            settled: Arc::new(|traces| traces.len() == 5),
        });
        let settled = e.generate(r, None).unwrap();
        assert_eq!(settled.settled_after, Some(5));
        assert!(settled.traces.len() < 12 && settled.traces.len() >= 5);
        for (a, b) in all.traces.iter().zip(&settled.traces) {
            if b.finish == FinishReason::Unneeded {
                assert!(
                    b.index >= 5 && a.tokens.starts_with(&b.tokens),
                    "{}",
                    b.index
                );
            } else {
                assert_eq!(
                    (&a.tokens, a.finish),
                    (&b.tokens, b.finish),
                    "sample {}",
                    a.index
                );
            }
        }
        let generated: usize = settled.traces.iter().map(|t| t.tokens.len()).sum();
        assert!(generated < tokens);
        // Everything was freed: nothing reserved, nothing running.
        let stats = e.stats();
        assert_eq!((stats.kv_reserved, stats.running_requests), (0, 0));
    }

    // Cancelled part-way (the engine is held in `settled` after the first sample while
    // the abort is sent): the request ends with what it has, and frees everything.
    let (reached, at_gate) = std::sync::mpsc::channel::<()>();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let (reached, gate) = (
        parking_lot::Mutex::new(reached),
        parking_lot::Mutex::new(gate),
    );
    let mut r = plain.clone();
    r.sequential = Some(Sequential {
        parallel: 2,
        settled: Arc::new(move |traces| {
            if traces.len() == 1 {
                let _ = reached.lock().send(());
                let _ = gate.lock().recv();
            }
            false
        }),
    });
    let e = engine(&model, EngineConfig::default());
    let handle = e.submit(r, None).unwrap();
    at_gate.recv().unwrap();
    handle.abort();
    release.send(()).unwrap();
    let cut = handle.blocking_completion().unwrap();
    assert!(cut.traces.len() < 12 && cut.settled_after.is_none());
    assert!(cut.traces.iter().any(|t| t.finish == FinishReason::Aborted));
    let stats = e.stats();
    assert_eq!((stats.kv_reserved, stats.running_requests), (0, 0));

    // A sequential request may ask for more samples than fit in one batch.
    let small = engine(
        &model,
        EngineConfig {
            max_batch: 4,
            ..EngineConfig::default()
        },
    );
    let mut r = plain.clone();
    r.n = 10;
    r.sequential = Some(Sequential {
        parallel: 4,
        settled: Arc::new(|_| false),
    });
    let many = small.generate(r, None).unwrap();
    assert_eq!(many.traces.len(), 10);
    for (a, b) in all.traces.iter().zip(&many.traces) {
        assert_eq!(a.tokens, b.tokens);
    }
    r = plain.clone();
    r.n = 10;
    assert!(
        small.generate(r, None).is_err(),
        "10 plain samples exceed a batch of 4"
    );
}

#[test]
fn a_seed_gives_the_same_sample_in_a_batch_of_1_or_64() {
    let model = tiny_model("engine-seed");
    let e = engine(&model, EngineConfig::default());
    let target = req(&[7, 8, 9], 10, 1.0, 77);
    let alone = e.generate(target.clone(), None).unwrap();
    let others: Vec<_> = (0..63)
        .map(|i| e.submit(req(&[i as u32 + 1, 2], 10, 1.0, i), None).unwrap())
        .collect();
    let in_batch = e.submit(target, None).unwrap();
    let in_batch = in_batch.blocking_completion().unwrap();
    for h in others {
        h.blocking_completion().unwrap();
    }
    assert_eq!(alone.traces[0].tokens, in_batch.traces[0].tokens);
}

#[test]
fn continuous_batching_admits_new_requests_and_respects_the_budget() {
    let model = tiny_model("engine-cb");
    let e = engine(
        &model,
        EngineConfig {
            kv_budget_tokens: 200,
            ..Default::default()
        },
    );
    // A long request is running; a short one arriving later finishes first. The long one's
    // monitor holds the engine thread at its 5th token until the short one is queued, and
    // at its 40th until the test has sent the abort, so the order does not depend on how
    // the threads are scheduled.
    let (reached, at_gate) = std::sync::mpsc::channel::<usize>();
    let (open, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(parking_lot::Mutex::new((reached, gate)));
    let mut long_request = req(&[1, 2, 3], 60, 0.0, 0);
    long_request.early_stop = Some(Arc::new(move |_| {
        Box::new(WaitAt {
            tokens: 0,
            at: vec![5, 40],
            gate: gate.clone(),
        }) as Box<dyn TraceMonitor>
    }));
    let mut long = e.submit(long_request, None).unwrap();
    assert_eq!(at_gate.recv().unwrap(), 5);
    let short = e.submit(req(&[4, 5], 3, 0.0, 0), None).unwrap();
    open.send(()).unwrap();
    let short = short.blocking_completion().unwrap();
    assert_eq!(short.traces[0].tokens.len(), 3);
    assert!(
        e.stats().running_requests >= 1,
        "the long request is still running while the short one finished"
    );
    // Cancel the long one: it ends Aborted and its KV is released.
    long.abort();
    // (Needed only if the engine reached the 40th token first; otherwise the request is
    // gone, and its monitor with it.)
    let _ = open.send(());
    let mut aborted = None;
    while let Some(ev) = long.blocking_next() {
        if let Event::Done(c) = ev {
            aborted = Some(c);
        }
    }
    let aborted = aborted.unwrap();
    assert_eq!(aborted.traces[0].finish, FinishReason::Aborted);
    let kept = aborted.traces[0].tokens.len();
    assert!((5..=40).contains(&kept), "{kept} tokens");
    // Dropping a handle cancels too.
    let dropped = e.submit(req(&[9, 9], 50, 0.0, 0), None).unwrap();
    drop(dropped);
    // Many requests over a small budget all finish, and the budget is never exceeded.
    let handles: Vec<_> = (0..12)
        .map(|i| e.submit(req(&[i + 1, 7, 7], 40, 0.0, 0), None).unwrap())
        .collect();
    for h in handles {
        assert_eq!(h.blocking_completion().unwrap().traces[0].tokens.len(), 40);
    }
    let stats = e.stats();
    assert!(stats.kv_peak <= 200, "peak {} over budget", stats.kv_peak);
    assert_eq!(stats.kv_reserved, 0, "everything freed");
    // A request that can never fit, and an over-long prompt, are refused at once.
    let mut too_big = req(&[1], 60, 0.0, 0);
    too_big.n = 4;
    let err = e.generate(too_big, None).unwrap_err().to_string();
    assert!(err.contains("budget is 200"), "{err}");
    let long_prompt: Vec<u32> = vec![3; 64];
    let err = e
        .generate(req(&long_prompt, 1, 0.0, 0), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not fit the context of 64"), "{err}");
}

#[test]
fn a_short_prompt_is_not_held_behind_a_long_prefill() {
    let model = tiny_model("engine-fair");
    let e = engine(
        &model,
        EngineConfig {
            prefill_chunk: 4,
            ..Default::default()
        },
    );
    // 40 prompt tokens take 10 steps of 4; the 2-token prompt arriving right after them
    // must not wait for all of them (first come, first served would make it). The engine is
    // held while both arrive, so they are queued together however the threads are scheduled,
    // and each request's monitor logs its first token on the engine thread, in step order.
    let order = Arc::new(Mutex::new(Vec::new()));
    let logged = |prompt: &[u32], name: &'static str| {
        let order = order.clone();
        let mut r = req(prompt, 1, 0.0, 0);
        r.early_stop = Some(Arc::new(move |_| {
            Box::new(LogFirstToken(name, order.clone())) as Box<dyn TraceMonitor>
        }));
        r
    };
    let long_prompt: Vec<u32> = (0..40).map(|i| 1 + i % 9).collect();
    let long_request = logged(&long_prompt, "long");
    let short_request = logged(&[4, 5], "short");
    e.hold();
    let long = e.submit(long_request, None).unwrap();
    let short = e.submit(short_request, None).unwrap();
    e.resume();
    let short = short.blocking_completion().unwrap();
    assert_eq!(short.traces[0].tokens.len(), 1);
    // The long one still completes, with the tokens it would have had alone.
    let long = long.blocking_completion().unwrap();
    assert_eq!(
        *order.lock().unwrap(),
        ["short", "long"],
        "the short request's token came only after the long prompt's prefill"
    );
    let alone = e.generate(req(&long_prompt, 1, 0.0, 0), None).unwrap();
    assert_eq!(long.traces[0].tokens, alone.traces[0].tokens);
}

/// At each token count in `at`, sends the count on the first channel and waits for a
/// message on the second; never stops the trace.
struct WaitAt {
    tokens: usize,
    at: Vec<usize>,
    gate: Arc<
        parking_lot::Mutex<(
            std::sync::mpsc::Sender<usize>,
            std::sync::mpsc::Receiver<()>,
        )>,
    >,
}
impl TraceMonitor for WaitAt {
    fn observe(&mut self, _: &TokenStats) -> bool {
        self.tokens += 1;
        if self.at.contains(&self.tokens) {
            let gate = self.gate.lock();
            let _ = gate.0.send(self.tokens);
            let _ = gate.1.recv();
        }
        false
    }
}

/// Logs the trace's name at its first token; never stops it. (Monitors do not see stop
/// tokens: the requests here ignore end-of-text.)
struct LogFirstToken(&'static str, Arc<Mutex<Vec<&'static str>>>);
impl TraceMonitor for LogFirstToken {
    fn observe(&mut self, _: &TokenStats) -> bool {
        let mut order = self.1.lock().unwrap();
        if !order.contains(&self.0) {
            order.push(self.0);
        }
        false
    }
}

struct StopAfter(usize);
impl TraceMonitor for StopAfter {
    fn observe(&mut self, _: &TokenStats) -> bool {
        self.0 -= 1;
        self.0 == 0
    }
}

#[test]
fn stop_strings_tokens_length_and_early_stop_end_traces_correctly() {
    let model = tiny_model("engine-stop");
    let e = engine(&model, EngineConfig::default());
    let prompt = [40u32, 41, 42];
    let free = e
        .generate(req(&prompt, 20, 0.0, 0), None)
        .unwrap()
        .traces
        .remove(0);
    assert_eq!(free.finish, FinishReason::Length);
    assert_eq!(free.tokens.len(), 20);
    let tok = &model.tokenizer;
    // A stop string that spans a token boundary: the last byte of token 4 and the first
    // of token 5 (the tiny vocabulary is byte-level, so pieces are short).
    let text4 = tok.decode(&free.tokens[..5], false);
    let text5 = tok.decode(&free.tokens[..6], false);
    assert!(text5.len() > text4.len() && !text4.is_empty());
    let cut = text4.char_indices().last().unwrap().0;
    let stop: String = text5[cut..].to_string();
    let mut r = req(&prompt, 20, 0.0, 0);
    r.stop = vec![stop.clone()];
    let stopped = e.generate(r, None).unwrap().traces.remove(0);
    assert_eq!(stopped.finish, FinishReason::Stop);
    let expected_text = &text5[..text5.find(&stop).unwrap()];
    assert_eq!(
        stopped.text, expected_text,
        "text ends before the stop string"
    );
    // Stop token id.
    let mut r = req(&prompt, 20, 0.0, 0);
    r.stop_tokens = vec![free.tokens[2]];
    let first = free
        .tokens
        .iter()
        .position(|&t| t == free.tokens[2])
        .unwrap();
    let t = e.generate(r, None).unwrap().traces.remove(0);
    assert_eq!((t.finish, t.tokens.len()), (FinishReason::Stop, first + 1));
    // End-of-generation token: the largest bias allowed (100, OpenAI's) makes <|im_end|>
    // (an EOG id) win.
    let eog = *tok.special().eog.last().unwrap();
    let mut r = req(&prompt, 20, 0.0, 0);
    r.ignore_eos = false;
    r.penalties.logit_bias.insert(eog, 100.0);
    let t = e.generate(r, None).unwrap().traces.remove(0);
    assert_eq!(
        (t.finish, t.tokens.as_slice(), t.text.as_str()),
        (FinishReason::Stop, &[eog][..], "")
    );
    // The early-stop hook keeps what was generated.
    let mut r = req(&prompt, 20, 0.0, 0);
    r.early_stop = Some(Arc::new(|_| {
        Box::new(StopAfter(5)) as Box<dyn TraceMonitor>
    }));
    let t = e.generate(r, None).unwrap().traces.remove(0);
    assert_eq!(t.finish, FinishReason::AbortedLowConfidence);
    assert_eq!(t.tokens, free.tokens[..5]);
    // Streamed deltas add up to the final text.
    let mut h = e.submit(req(&prompt, 20, 0.0, 0), None).unwrap();
    let mut streamed = String::new();
    let mut done = None;
    while let Some(ev) = h.blocking_next() {
        match ev {
            Event::Token { text, .. } => streamed.push_str(&text),
            Event::Done(c) => done = Some(c),
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(streamed, done.unwrap().traces[0].text);
}

#[test]
fn smollm2_batched_equals_alone_and_greedy_stats_match_the_reference() {
    let model = Arc::new(Model::load(real_model(SMOLLM2), &Default::default()).unwrap());
    let reference = reference("smollm2-135m-q4_1.json");
    let e = engine(&model, EngineConfig::default());
    let prompts: Vec<Vec<u32>> = reference["greedy"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["prompt_token_ids"]))
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(req(p, 12, 0.8, 3), None).unwrap())
        .collect();
    let together: Vec<_> = handles
        .into_iter()
        .map(|h| h.blocking_completion().unwrap())
        .collect();
    for (p, t) in prompts.iter().zip(&together) {
        let alone = e.generate(req(p, 12, 0.8, 3), None).unwrap();
        assert_eq!(alone.traces[0].tokens, t.traces[0].tokens);
        assert_stats_close(&alone.traces[0].stats, &t.traces[0].stats, 1e-3);
    }
    // Greedy through the engine: per-token statistics against llama.cpp's, where the
    // continuation is margin-robust.
    let tol = &reference["notes"]["suggested_tolerances"];
    for p in reference["greedy"]["prompts"].as_array().unwrap() {
        let robust = p["checks"]["first_step_with_margin_below_0.5"]
            .as_u64()
            .unwrap_or(48) as usize;
        if robust == 0 {
            continue;
        }
        let mut r = req(&ids(&p["prompt_token_ids"]), robust, 0.0, 0);
        r.ignore_eos = false;
        let trace = e.generate(r, None).unwrap().traces.remove(0);
        for (st, step) in trace.stats.iter().zip(p["steps"].as_array().unwrap()) {
            let slack = 1.5; // quantized path, see tests/reference.rs
            assert!(
                (st.self_certainty as f64 - step["self_certainty"].as_f64().unwrap()).abs()
                    < tol["self_certainty"].as_f64().unwrap() * slack
            );
            assert!(
                (st.entropy as f64 - step["entropy"].as_f64().unwrap()).abs()
                    < tol["entropy"].as_f64().unwrap() * slack
            );
            assert!(
                (st.logprob as f64 - step["logprob"].as_f64().unwrap()).abs()
                    < tol["logprob_of_given_token"].as_f64().unwrap() * slack
            );
        }
    }
}

/// A prompt's numbers do not depend on how it is cut into chunks: the prompt budget of a
/// step is shared among requests, so the same prompt is chunked differently depending on
/// what else is in flight. SmolLM2 as served (Q4_1 weights, f16 KV cache): the same
/// sampled trace, bit for bit, whole or in chunks of 3 or 7.
#[test]
fn a_prompt_gives_the_same_bits_whatever_its_chunks() {
    let model = Arc::new(Model::load(real_model(SMOLLM2), &Default::default()).unwrap());
    let reference = reference("smollm2-135m-q4_1.json");
    let prompt = ids(&reference["greedy"]["prompts"][0]["prompt_token_ids"]);
    assert!(prompt.len() > 7, "a prompt of several chunks");
    let run = |chunk: usize| {
        let e = engine(
            &model,
            EngineConfig {
                prefill_chunk: chunk,
                ..EngineConfig::default()
            },
        );
        e.generate(req(&prompt, 12, 0.8, 5), None)
            .unwrap()
            .traces
            .remove(0)
    };
    let whole = run(512);
    for chunk in [3, 7] {
        let cut = run(chunk);
        assert_eq!(whole.tokens, cut.tokens, "chunk {chunk}");
        for (a, b) in whole.stats.iter().zip(&cut.stats) {
            assert_eq!(
                (
                    a.logprob.to_bits(),
                    a.entropy.to_bits(),
                    a.self_certainty.to_bits()
                ),
                (
                    b.logprob.to_bits(),
                    b.entropy.to_bits(),
                    b.self_certainty.to_bits()
                ),
                "chunk {chunk}"
            );
        }
    }
}
