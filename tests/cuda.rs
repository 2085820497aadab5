//! The GPU path against its references, on a CUDA device: the batched decode attention
//! kernel against the per-sequence candle-ops attention, CUDA against the CPU on the same
//! weights, the engine's on-device reduction against the host path, and a GRPO step on the
//! GPU against the same step on the CPU. These need a GPU:
//! `scripts/gpu-check.sh` runs them (`--ignored`); a CUDA build without one compiles them.
#![cfg(feature = "cuda")]

mod common;
use common::*;

use std::sync::Arc;

use candle_core::{DType, Device};
use verity::engine::{Completion, Engine, EngineConfig, Prompt, Request};
use verity::model::config::Architecture;
use verity::model::{LoraAdapter, LoraSpec, LoraTarget};
use verity::sampling::SamplingParams;
use verity::train::{completion_logprobs, AdamWConfig, Rollout, TrainConfig, Trainer};
use verity::Model;

fn tiny(name: &str, device: Device, dtype: DType) -> Arc<Model> {
    tiny_dense_model(name, Architecture::Qwen2, 11, &device, dtype)
}

/// Three prompts, n = 3 samples each (shared prompt segments), greedy and sampled.
fn run(model: &Arc<Model>, config: EngineConfig) -> Vec<Completion> {
    let engine = Engine::new(model.clone(), config).unwrap();
    let prompts: [&[u32]; 3] = [&[5, 6, 7], &[100, 20, 30, 40, 50, 60, 70], &[9]];
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            [0.0f32, 0.9].map(|temperature| {
                let mut r = Request::new(Prompt::Tokens(p.to_vec()));
                r.n = 3;
                r.max_tokens = 24;
                r.ignore_eos = true;
                r.sampling = SamplingParams {
                    temperature,
                    seed: 7 + i as u64,
                    ..Default::default()
                };
                engine.submit(r, None).unwrap()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.blocking_completion().unwrap())
        .collect()
}

fn assert_same(a: &[Completion], b: &[Completion], stats_tol: f32, what: &str) {
    for (x, y) in a.iter().zip(b) {
        for (tx, ty) in x.traces.iter().zip(&y.traces) {
            assert_eq!(tx.tokens, ty.tokens, "{what}");
            for (sx, sy) in tx.stats.iter().zip(&ty.stats) {
                assert!(
                    (sx.logprob - sy.logprob).abs() < stats_tol
                        && (sx.entropy - sy.entropy).abs() < stats_tol,
                    "{what}: {sx:?} vs {sy:?}"
                );
            }
        }
    }
}

/// CUDA device 0 as the runtime opens it (`DeviceSpec::resolve`: no event tracking).
fn cuda_device() -> Device {
    verity::DeviceSpec::Cuda(0).resolve().unwrap()
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn decode_attention_kernel_equals_the_reference_and_the_cpu() {
    let gpu = cuda_device();
    let model = tiny("cuda-attention", gpu, DType::F32);
    let kernel = run(&model, EngineConfig::default());
    // The only test in this binary that touches the switch; read per step.
    std::env::set_var("VERITY_REFERENCE_ATTENTION", "1");
    let reference = run(&model, EngineConfig::default());
    std::env::remove_var("VERITY_REFERENCE_ATTENTION");
    assert_same(
        &kernel,
        &reference,
        1e-4,
        "kernel vs reference attention (f32)",
    );
    let cpu = run(
        &tiny("cuda-attention-cpu", Device::Cpu, DType::F32),
        EngineConfig::default(),
    );
    assert_same(&kernel, &cpu, 1e-3, "CUDA vs CPU (f32)");
    // bf16 (the kernel's bf16 entry) runs every request to the end and stays close to f32
    // where no near-tie can intervene: the first token's entropy depends on the prompt only.
    let bf16 = run(
        &tiny("cuda-attention-bf16", cuda_device(), DType::BF16),
        EngineConfig::default(),
    );
    for (b, c) in bf16.iter().zip(&cpu) {
        for (tb, tc) in b.traces.iter().zip(&c.traces) {
            assert_eq!(tb.tokens.len(), tc.tokens.len());
            let (eb, ec) = (tb.stats[0].entropy, tc.stats[0].entropy);
            assert!((eb - ec).abs() < 0.05, "bf16 entropy {eb} vs f32 {ec}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn on_device_reduction_equals_the_host_path_on_the_cuda_device() {
    let model = tiny("cuda-reduce", cuda_device(), DType::F32);
    let device = run(&model, EngineConfig::default());
    let host = run(
        &model,
        EngineConfig {
            device_reduce: Some(false),
            ..Default::default()
        },
    );
    // Sums run in another order on the GPU: statistics agree to rounding; a draw lands on
    // another token only within rounding of a boundary (not expected in these few draws).
    assert_same(&device, &host, 1e-4, "device vs host reduction");
}

/// One adapter's log-probs of `completions` after the prompt [5, 6, 7].
fn logprobs(model: &Model, adapter: &LoraAdapter, completions: &[&[u32]]) -> Vec<f64> {
    completions
        .iter()
        .map(|c| completion_logprob(model, adapter, &[5, 6, 7], c))
        .collect()
}

/// The training forward, backward and AdamW on the GPU give the CPU's step: the same
/// adapter (saved on the CPU, loaded on the GPU), the same rollouts, three steps; the
/// log-probs after agree to f32 rounding and moved the way the rewards say.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn grpo_steps_on_the_gpu_equal_the_cpu_steps() {
    let gpu = cuda_device();
    let cpu_model = tiny("cuda-train-cpu", Device::Cpu, DType::F32);
    let gpu_model = tiny("cuda-train-gpu", gpu.clone(), DType::F32);
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    };
    let on_cpu =
        Arc::new(LoraAdapter::new(cpu_model.config(), spec, DType::F32, &Device::Cpu).unwrap());
    let dir = temp_dir("cuda-train-adapter");
    verity::adapter::save_peft(&on_cpu, cpu_model.config(), &dir, "tiny").unwrap();
    let on_gpu =
        Arc::new(verity::adapter::load_peft(&dir, gpu_model.config(), DType::F32, &gpu).unwrap());
    let good: &[u32] = &[10, 11, 12];
    let bad: &[u32] = &[20, 21, 22];
    let rollouts = |model: &Model, adapter: &LoraAdapter| -> Vec<Rollout> {
        [(good, 1.0), (bad, 0.0)]
            .into_iter()
            .map(|(c, reward)| Rollout {
                group: 0,
                prompt: vec![5, 6, 7],
                completion: c.to_vec(),
                decode_logprobs: completion_logprobs(
                    &model.transformer,
                    &[5, 6, 7],
                    &[c],
                    Some(adapter),
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap(),
                adapter_version: 0,
                reward,
            })
            .collect()
    };
    let config = TrainConfig {
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..Default::default()
        },
        ..Default::default()
    };
    let before = logprobs(&cpu_model, &on_cpu, &[good, bad]);
    for (model, adapter) in [(&cpu_model, &on_cpu), (&gpu_model, &on_gpu)] {
        let mut trainer = Trainer::new(adapter.clone(), config.clone());
        let batch = rollouts(model, adapter);
        for _ in 0..3 {
            assert!(trainer.step(&model.transformer, &batch).unwrap().applied);
        }
    }
    let (after_cpu, after_gpu) = (
        logprobs(&cpu_model, &on_cpu, &[good, bad]),
        logprobs(&gpu_model, &on_gpu, &[good, bad]),
    );
    for i in 0..2 {
        assert!(
            (after_cpu[i] - after_gpu[i]).abs() < 1e-3,
            "{after_cpu:?} vs {after_gpu:?}"
        );
    }
    assert!(after_gpu[0] > before[0] + 0.01 && after_gpu[1] < before[1] - 0.01);
}
