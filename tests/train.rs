//! The trainer: advantages, aggregation and the clipped loss against hand-computed values,
//! loss gradients against finite differences, GRPO steps that move probabilities the way
//! the rewards say, the hand-off to the engine, and NaN handling.

mod common;
use common::*;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use verity::engine::{Engine, EngineConfig, Prompt, Request};
use verity::model::config::Architecture;
use verity::model::{LoraAdapter, LoraSpec, LoraTarget};
use verity::train::*;
use verity::Model;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn advantages_match_hand_computed_values() {
    let groups = vec![vec![1.0, 0.0, 0.0, 1.0], vec![2.0, 4.0]];
    let a = group_advantages(&groups, ScaleRewards::Group);
    // Group 1: mean 0.5, std 0.5 → ±0.5/(0.5+1e-4); group 2: mean 3, std 1 → ∓1/(1+1e-4).
    assert!(close(a[0][0], 0.5 / 0.5001, 1e-12) && close(a[0][1], -0.5 / 0.5001, 1e-12));
    assert!(close(a[1][0], -1.0 / 1.0001, 1e-12) && close(a[1][1], 1.0 / 1.0001, 1e-12));
    // Batch: all six rewards, mean 4/3, std sqrt(((1/3)²·2 + (4/3)²·2 + (2/3)² + (8/3)²)/6).
    let all = [1.0f64, 0.0, 0.0, 1.0, 2.0, 4.0];
    let m = all.iter().sum::<f64>() / 6.0;
    let sd = (all.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 6.0).sqrt();
    let b = group_advantages(&groups, ScaleRewards::Batch);
    assert!(close(b[1][1], 1.0 / (sd + 1e-4), 1e-12));
    let n = group_advantages(&groups, ScaleRewards::None);
    assert_eq!(n, vec![vec![0.5, -0.5, -0.5, 0.5], vec![-1.0, 1.0]]);
    assert!(has_signal(&[0.0, 1.0]) && !has_signal(&[1.0, 1.0, 1.0]));
}

#[test]
fn aggregation_weights_match_each_mode() {
    let lengths = [2, 4];
    assert_eq!(
        token_weights(LossAggregation::Dapo, &lengths, 6, 2, 5),
        vec![1.0 / 6.0; 2]
    );
    assert_eq!(
        token_weights(LossAggregation::Grpo, &lengths, 6, 2, 5),
        vec![1.0 / 4.0, 1.0 / 8.0]
    );
    assert_eq!(
        token_weights(LossAggregation::DrGrpo, &lengths, 6, 2, 5),
        vec![1.0 / 10.0; 2]
    );
}

fn t(v: &[f64], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

#[test]
fn clipped_loss_matches_hand_computed_values() {
    let logp = t(&[-1.0, -2.0], (1, 2));
    let old = t(&[-1.1, -1.5], (1, 2));
    let w = t(&[0.5, 0.5], (1, 2));
    let clip = ClipRange {
        eps_low: 0.2,
        eps_high: 0.28,
    };
    let loss = |a: f64, beta: f64, reference: Option<&Tensor>| {
        let adv = t(&[a], (1, 1));
        let (l, c) = policy_loss(&LossInputs {
            logp: &logp,
            logp_old: &old,
            logp_ref: reference,
            advantages: &adv,
            weights: &w,
            clip,
            beta,
        })
        .unwrap();
        (l.to_scalar::<f64>().unwrap(), c.to_scalar::<f64>().unwrap())
    };
    let (r1, r2) = (0.1f64.exp(), (-0.5f64).exp());
    // A = 2: token 1 inside the range; token 2's ratio 0.607 < 0.8, min picks the unclipped.
    let (l, clipped) = loss(2.0, 0.0, None);
    assert!(
        close(l, 0.5 * (-(r1 * 2.0)) + 0.5 * (-(r2 * 2.0)), 1e-12),
        "{l}"
    );
    assert!(
        close(clipped, 0.5, 1e-12),
        "one of two tokens is outside the range"
    );
    // A = -1: token 2 takes the clipped 0.8·A.
    let (l, _) = loss(-1.0, 0.0, None);
    assert!(close(l, 0.5 * r1 + 0.5 * 0.8, 1e-12), "{l}");
    // k3 KL with β = 0.1 against a reference.
    let reference = t(&[-1.5, -1.5], (1, 2));
    let k3 = |d: f64| d.exp() - d - 1.0;
    let (l, _) = loss(-1.0, 0.1, Some(&reference));
    let expected = 0.5 * (r1 + 0.1 * k3(-0.5)) + 0.5 * (0.8 + 0.1 * k3(0.5));
    assert!(close(l, expected, 1e-12), "{l} vs {expected}");
}

fn tiny(dtype: DType, name: &str) -> Arc<Model> {
    tiny_dense_model(name, Architecture::Llama, 5, &Device::Cpu, dtype)
}

fn adapter(model: &Model, dtype: DType) -> Arc<LoraAdapter> {
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    };
    Arc::new(LoraAdapter::new(model.config(), spec, dtype, &Device::Cpu).unwrap())
}

fn rollout(completion: &[u32], reward: f64) -> Rollout {
    Rollout {
        group: 0,
        prompt: vec![5, 6, 7],
        completion: completion.to_vec(),
        decode_logprobs: vec![0.0; completion.len()],
        adapter_version: 0,
        reward,
    }
}

fn seq_logprob(model: &Model, adapter: &LoraAdapter, completion: &[u32]) -> f64 {
    completion_logprob(model, adapter, &[5, 6, 7], completion)
}

/// The training forward computes the prompt once for a whole group; the log-probs must
/// equal those of each prompt + completion run as one plain sequence.
#[test]
fn shared_prompt_logprobs_equal_whole_sequence_logprobs() {
    let model = tiny(DType::F64, "train-shared-prompt");
    let adapter = adapter(&model, DType::F64);
    for (i, v) in adapter.vars().iter().enumerate() {
        if i % 2 == 1 {
            v.set(&Tensor::randn(0f64, 0.05, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let prompt = [5u32, 6, 7, 8];
    let groups: [&[&[u32]]; 2] = [&[&[10, 11, 12], &[20], &[30, 31, 32, 33]], &[&[40]]];
    for completions in groups {
        let shared: Vec<Vec<f64>> =
            completion_logprobs(&model.transformer, &prompt, completions, Some(&adapter))
                .unwrap()
                .to_vec2()
                .unwrap();
        for (row, completion) in shared.iter().zip(completions) {
            let whole: Vec<u32> = prompt.iter().chain(completion.iter()).copied().collect();
            let n = whole.len();
            let tokens = Tensor::from_vec(whole, (1, n), &Device::Cpu).unwrap();
            let plain: Vec<f64> = model
                .transformer
                .token_logprobs(&tokens, Some(&adapter))
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let plain = &plain[prompt.len() - 1..];
            assert_eq!(plain.len(), completion.len());
            for (a, b) in row.iter().zip(plain) {
                assert!(close(*a, *b, 1e-10), "{a} vs {b}");
            }
        }
    }
}

#[test]
fn loss_gradients_match_finite_differences() {
    let model = tiny(DType::F64, "train-grad");
    let adapter = adapter(&model, DType::F64);
    // Give B a value so gradients reach A too.
    for (i, v) in adapter.vars().iter().enumerate() {
        if i % 2 == 1 {
            v.set(&Tensor::randn(0f64, 0.05, v.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let completions: [&[u32]; 2] = [&[10, 11, 12], &[20, 21]];
    let old = completion_logprobs(&model.transformer, &[5, 6, 7], &completions, Some(&adapter))
        .unwrap()
        .detach();
    // Perturb so ratios differ from 1 and some tokens clip.
    let old = (old + t(&[0.1, -0.3, 0.05, 0.2, 0.0, 0.0], (2, 3))).unwrap();
    let w = t(&[0.2, 0.2, 0.2, 0.2, 0.2, 0.0], (2, 3));
    let adv = t(&[1.5, -0.7], (2, 1));
    let loss = || {
        let logp =
            completion_logprobs(&model.transformer, &[5, 6, 7], &completions, Some(&adapter))
                .unwrap();
        policy_loss(&LossInputs {
            logp: &logp,
            logp_old: &old,
            logp_ref: None,
            advantages: &adv,
            weights: &w,
            clip: ClipRange::default(),
            beta: 0.0,
        })
        .unwrap()
        .0
    };
    let grads = loss().backward().unwrap();
    let vars = adapter.vars();
    for k in [0usize, 1, 6, 7, vars.len() - 2, vars.len() - 1] {
        let var = &vars[k];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for index in [0, g.len() / 3, g.len() - 1] {
            let eval = |delta: f64| {
                let mut v = orig.clone();
                v[index] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss().to_scalar::<f64>().unwrap()
            };
            let h = 1e-6;
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(orig.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (g[index] - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "var {k}[{index}]: {} vs {numeric}",
                g[index]
            );
        }
    }
}

#[test]
fn grpo_steps_raise_rewarded_and_lower_penalised_completions() {
    let model = tiny(DType::F32, "train-grpo");
    let adapter = adapter(&model, DType::F32);
    let config = TrainConfig {
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut trainer = Trainer::new(adapter.clone(), config);
    let good: [&[u32]; 2] = [&[10, 11, 12], &[30, 31]];
    let bad: [&[u32]; 2] = [&[20, 21, 22], &[40, 41]];
    let before: Vec<f64> = good
        .iter()
        .chain(&bad)
        .map(|c| seq_logprob(&model, &adapter, c))
        .collect();
    // Decode-time log-probs as the engine would have recorded them (the importance weight
    // compares the training forward against these).
    let decoded = |c: &[u32], reward: f64| {
        let mut r = rollout(c, reward);
        r.decode_logprobs =
            completion_logprobs(&model.transformer, &[5, 6, 7], &[c], Some(&adapter))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
        r
    };
    let rollouts = vec![
        decoded(good[0], 1.0),
        decoded(bad[0], 0.0),
        decoded(good[1], 1.0),
        decoded(bad[1], 0.0),
    ];
    for _ in 0..5 {
        let report = trainer.step(&model.transformer, &rollouts).unwrap();
        assert!(report.applied, "{:?}", report.skipped);
    }
    assert_eq!(adapter.version(), 5);
    let after: Vec<f64> = good
        .iter()
        .chain(&bad)
        .map(|c| seq_logprob(&model, &adapter, c))
        .collect();
    for i in 0..2 {
        assert!(
            after[i] > before[i] + 0.05,
            "rewarded completion {i}: {} → {}",
            before[i],
            after[i]
        );
        assert!(
            after[2 + i] < before[2 + i] - 0.05,
            "penalised completion {i}: {} → {}",
            before[2 + i],
            after[2 + i]
        );
    }
    // A group with equal rewards carries no signal and is skipped.
    let flat = vec![rollout(good[0], 1.0), rollout(bad[0], 1.0)];
    let report = trainer.step(&model.transformer, &flat).unwrap();
    assert!(!report.applied && report.groups_skipped == 1);
    assert_eq!(adapter.version(), 5);
}

#[test]
fn the_engine_uses_new_adapter_weights_on_its_next_step_and_base_requests_are_unaffected() {
    let model = tiny(DType::F32, "train-handoff");
    let adapter = adapter(&model, DType::F32);
    let engine = Engine::new(model.clone(), EngineConfig::default()).unwrap();
    let request = || {
        let mut r = Request::new(Prompt::Tokens(vec![5, 6, 7]));
        r.max_tokens = 4;
        r.ignore_eos = true;
        r
    };
    let policy = Some(adapter.clone());
    let base_before = engine.generate(request(), None).unwrap().traces.remove(0);
    let tuned_before = engine
        .generate(request(), policy.clone())
        .unwrap()
        .traces
        .remove(0);
    assert_eq!(
        base_before.stats, tuned_before.stats,
        "a fresh adapter changes nothing"
    );
    let mut trainer = Trainer::new(
        adapter.clone(),
        TrainConfig {
            optimizer: AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let rollouts = vec![rollout(&[10, 11], 1.0), rollout(&[20, 21], 0.0)];
    let report = trainer.step(&model.transformer, &rollouts).unwrap();
    assert!(report.applied);
    // (The hand-off's speed is measured in benches/train.rs, not here.)
    let tuned_after = engine
        .generate(request(), policy.clone())
        .unwrap()
        .traces
        .remove(0);
    assert_ne!(
        tuned_after.stats[0].logprob, tuned_before.stats[0].logprob,
        "the next decode step sees the update"
    );
    let base_after = engine.generate(request(), None).unwrap().traces.remove(0);
    assert_eq!(
        base_after.stats, base_before.stats,
        "the base model is untouched"
    );
    assert_eq!(base_after.tokens, base_before.tokens);
}

/// `scale · x Aᵀ Bᵀ` computed by hand from A and B values (f64), for comparing the views.
fn delta_by_hand(a: &Tensor, b: &Tensor, scale: f64, x: &[f64]) -> Vec<f64> {
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_vec2().unwrap();
    let low: Vec<f64> = a
        .iter()
        .map(|row| row.iter().zip(x).map(|(w, x)| *w as f64 * x).sum())
        .collect();
    b.iter()
        .map(|row| {
            scale
                * row
                    .iter()
                    .zip(&low)
                    .map(|(w, l)| *w as f64 * l)
                    .sum::<f64>()
        })
        .collect()
}

#[test]
fn publishing_swaps_whole_snapshots_and_a_held_snapshot_keeps_its_values() {
    let model = tiny(DType::F32, "train-publish");
    let adapter = adapter(&model, DType::F32);
    let (layer, target) = (1, LoraTarget::Up);
    let (fan_in, _) = target.dims(model.config());
    let x_values: Vec<f64> = (0..fan_in).map(|i| (i as f64 * 0.37).sin()).collect();
    let x = Tensor::from_vec(
        x_values.iter().map(|v| *v as f32).collect::<Vec<_>>(),
        (1, fan_in),
        &Device::Cpu,
    )
    .unwrap();
    let delta = |snap: &verity::model::LoraSnapshot| -> Vec<f64> {
        let d = snap.delta(layer, target, &x).unwrap().unwrap();
        d.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    // New values for every tensor: B gets non-zero entries so the delta changes.
    let vars = adapter.vars();
    let values: Vec<Tensor> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_tensor().affine(1.5, 0.01 * (i % 7) as f64 + 0.02)).unwrap())
        .collect();
    let pair_index = adapter
        .pairs()
        .position(|(l, t, _)| l == layer && t == target)
        .unwrap();
    let (new_a, new_b) = (&values[2 * pair_index], &values[2 * pair_index + 1]);

    // A decode step in flight holds the old snapshot; publishing must not wait for it.
    let held = adapter.snapshot();
    assert_eq!(held.version, 0);
    let before = delta(&held);
    assert!(before.iter().all(|v| *v == 0.0), "B starts at zero");
    let (version, _handoff) = adapter.publish(values.clone()).unwrap();
    assert_eq!(version, 1);
    assert_eq!(adapter.version(), 1);
    assert_eq!(delta(&held), before, "a held snapshot never changes");

    // The next step's snapshot has the new values, and so do the trainer's Vars.
    let next = adapter.snapshot();
    assert_eq!(next.version, 1);
    let expected = delta_by_hand(new_a, new_b, adapter.scale(), &x_values);
    for (got, want) in delta(&next).iter().zip(&expected) {
        assert!(close(*got, *want, 1e-4), "{got} vs {want}");
    }
    let through_vars: Vec<f32> = adapter
        .delta(layer, target, &x)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (got, want) in through_vars.iter().zip(&expected) {
        assert!(close(*got as f64, *want, 1e-4), "{got} vs {want}");
    }

    // Later in-place writes to the Vars do not leak into the published snapshot.
    adapter.vars()[2 * pair_index + 1]
        .set(&new_b.zeros_like().unwrap())
        .unwrap();
    for (got, want) in delta(&next).iter().zip(&expected) {
        assert!(close(*got, *want, 1e-4), "{got} vs {want}");
    }

    // A wrong count or shape is refused and publishes nothing.
    let err = adapter.publish(values[1..].to_vec()).unwrap_err();
    assert!(
        err.to_string().contains("tensors for an adapter of"),
        "{err}"
    );
    let mut wrong = values.clone();
    wrong[0] = wrong[0].t().unwrap();
    assert!(adapter.publish(wrong).is_err());
    assert_eq!(adapter.version(), 1);
    assert_eq!(adapter.snapshot().version, 1);
}

#[test]
fn a_nan_gradient_skips_the_step_and_leaves_the_adapter_unchanged() {
    let model = tiny(DType::F32, "train-nan");
    let adapter = adapter(&model, DType::F32);
    let mut trainer = Trainer::new(adapter.clone(), TrainConfig::default());
    let snapshot: Vec<Vec<f32>> = adapter
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let rollouts = vec![rollout(&[10, 11], 1.0), rollout(&[20, 21], 0.0)];
    let report = trainer
        .step_with(&model.transformer, &rollouts, |grads| {
            let g = grads[1].as_ref().unwrap();
            grads[1] = Some((g * f64::NAN).unwrap());
        })
        .unwrap();
    assert!(!report.applied);
    assert!(report.skipped.as_deref().unwrap().contains("non-finite"));
    assert_eq!(trainer.skipped_nonfinite(), 1);
    assert_eq!(adapter.version(), 0);
    let now: Vec<Vec<f32>> = adapter
        .vars()
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(now, snapshot);
}

/// Settings that would write non-finite or meaningless weights are refused by name (`verity
/// rl --lr nan` used to run and save an all-NaN adapter), by the runtime's config check
/// too; a rollout's reward outside ±MAX_ABS_REWARD stops the step before anything moves.
#[test]
fn optimizer_settings_and_rewards_outside_their_ranges_are_refused() {
    TrainConfig::default().validate().unwrap();
    type Set = fn(&mut TrainConfig);
    let cases: [(&str, Set); 11] = [
        ("learning rate", |c| c.optimizer.lr = f64::NAN),
        ("learning rate", |c| c.optimizer.lr = 0.0),
        ("learning rate", |c| c.optimizer.lr = 1e308),
        ("beta2", |c| c.optimizer.beta2 = 1.0),
        ("eps", |c| c.optimizer.eps = 1e-50),
        ("weight decay", |c| c.optimizer.weight_decay = f64::INFINITY),
        ("min_lr_ratio", |c| c.optimizer.min_lr_ratio = 2.0),
        ("max_grad_norm", |c| c.optimizer.max_grad_norm = f64::NAN),
        ("tis_cap", |c| c.tis_cap = 0.5),
        ("eps_high", |c| c.clip.eps_high = -0.1),
        ("micro_batch", |c| c.micro_batch = 0),
    ];
    for (what, set) in cases {
        let mut c = TrainConfig::default();
        set(&mut c);
        match c.validate() {
            Err(verity::Error::OutOfRange(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
        let runtime = verity::RuntimeConfig {
            train: c,
            ..Default::default()
        };
        assert!(matches!(
            runtime.validate(),
            Err(verity::Error::OutOfRange(_))
        ));
    }

    let model = tiny(DType::F32, "train-reward-range");
    let adapter = adapter(&model, DType::F32);
    let mut trainer = Trainer::new(adapter.clone(), TrainConfig::default());
    for bad in [1e308, -1e7, f64::NAN] {
        let rollouts = vec![rollout(&[10, 11], bad), rollout(&[20, 21], 0.0)];
        match trainer.step(&model.transformer, &rollouts) {
            Err(verity::Error::OutOfRange(m)) => assert!(m.contains("reward"), "{m}"),
            other => panic!("reward {bad}: {other:?}"),
        }
    }
    assert_eq!(adapter.version(), 0);
    let rollouts = vec![rollout(&[10, 11], MAX_ABS_REWARD), rollout(&[20, 21], 0.0)];
    assert!(trainer.step(&model.transformer, &rollouts).unwrap().applied);
}

/// Finite gradients can still write a non-finite weight: in f16, AdamW's ε = 1e-8 rounds
/// to 0, and a gradient of 1e-5 squares to 0, so m̂/(√v̂ + ε) is infinite. The step is
/// rolled back (weights, moments and step count untouched) and said so; the next sane step
/// applies as if the bad one never happened.
#[test]
fn an_update_that_would_write_a_non_finite_weight_is_rolled_back() {
    let model = tiny(DType::F16, "train-f16-overflow");
    let adapter = adapter(&model, DType::F16);
    let mut trainer = Trainer::new(adapter.clone(), TrainConfig::default());
    let weights = |a: &LoraAdapter| -> Vec<Vec<f32>> {
        a.vars()
            .iter()
            .map(|v| {
                let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect()
    };
    let before = weights(&adapter);
    let rollouts = vec![rollout(&[10, 11], 1.0), rollout(&[20, 21], 0.0)];
    let report = trainer
        .step_with(&model.transformer, &rollouts, |grads| {
            for g in grads.iter_mut().flatten() {
                *g = (g.ones_like().unwrap() * 1e-5).unwrap();
            }
        })
        .unwrap();
    // (The norm itself squares in f16 and reads 0: finite, so the first check passes.)
    assert!(report.grad_norm.is_finite(), "{report:?}");
    assert!(!report.applied, "{report:?}");
    assert!(
        report.skipped.as_deref().unwrap().contains("non-finite"),
        "{report:?}"
    );
    assert_eq!(trainer.skipped_nonfinite(), 1);
    assert_eq!(adapter.version(), 0);
    assert_eq!(weights(&adapter), before);
    assert_eq!(trainer.optimizer_steps(), 0);
}

/// Mean probability of `answer` after `prefix`, through the inference path (one decode
/// step over the whole sequence, softmax in f64): independent of the training forward
/// that `rlpr_rewards` uses.
fn decode_mean_probability(model: &verity::Model, prefix: &[u32], answer: &[u32]) -> f64 {
    let mut tokens = prefix.to_vec();
    tokens.extend_from_slice(answer);
    let mut kv = model.transformer.new_kv();
    let logits = model
        .transformer
        .forward_step(&mut [verity::model::StepInput {
            tokens: &tokens,
            kv: &mut kv,
            adapter: None,
            all_logits: true,
        }])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut sum = 0.0;
    for (k, &next) in answer.iter().enumerate() {
        let row = &logits[prefix.len() + k - 1];
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let z: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        sum += (row[next as usize] as f64 - max).exp() / z;
    }
    sum / answer.len() as f64
}

#[test]
fn rlpr_reward_is_the_debiased_answer_probability() {
    let model = verity::Model::load(
        common::real_model(common::SMOLLM2),
        &verity::LoadOptions {
            format: verity::WeightFormat::Dense,
            ..Default::default()
        },
    )
    .unwrap();
    let tok = &model.tokenizer;
    let text = tok
        .apply_chat_template(&[verity::ChatMessage::user("What is 2 + 3?")], true)
        .unwrap();
    let prompt = tok.encode(&text, true).unwrap();
    let completions = [
        "Two plus three makes \\boxed{5}.",
        "Adding them gives 7, so the answer is 7.",
        "I am not sure",
        "2 + 3 = 5 5 5 5 5. The answer is \\boxed{5}",
    ];
    let rewards =
        verity::train::rewards::rlpr_rewards(&model, None, &prompt, &completions, "5").unwrap();
    let answer = tok.encode("5", false).unwrap();
    let with = |reasoning: &str| {
        let mut prefix = prompt.clone();
        prefix.extend(tok.encode(reasoning, false).unwrap());
        decode_mean_probability(&model, &prefix, &answer)
    };
    let baseline = with("\\boxed{");
    let expected = [
        with("Two plus three makes \\boxed{"),
        with("Adding them gives 7, so the answer is \\boxed{"),
        with("I am not sure \\boxed{"),
        with("2 + 3 = 5 5 5 5 5. The answer is \\boxed{"),
    ]
    .map(|p| (p - baseline).clamp(0.0, 1.0));
    // The unclipped probabilities agree too.
    for reasoning in ["\\boxed{", "Two plus three makes \\boxed{"] {
        let p = verity::train::rewards::mean_answer_probability(
            &model, None, &prompt, reasoning, &answer,
        )
        .unwrap();
        assert!(
            (p - with(reasoning)).abs() < 1e-3,
            "{p} vs {}",
            with(reasoning)
        );
    }
    for (got, want) in rewards.iter().zip(expected) {
        assert!((got - want).abs() < 1e-3, "{rewards:?} vs {expected:?}");
    }
    // Reasoning that repeats the answer makes it more likely than no reasoning at all.
    assert!(rewards[3] > 0.0, "{rewards:?}");
}
