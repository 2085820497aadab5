//! A tiny random-weight model, built here in both architectures and both file formats:
//! loaders agree, batched incremental decode equals whole-sequence scoring and one-at-a-time
//! decode, LoRA changes reach the next step without reload, and bad input fails clearly.

mod common;
use common::*;

use candle_core::{DType, Device, Tensor};
use verity::model::config::Architecture;
use verity::model::{LoraAdapter, LoraSpec, LoraTarget, StepInput, WeightFormat};
use verity::{Error, LoadOptions, Model};

fn dense(dtype: DType) -> LoadOptions {
    LoadOptions {
        format: WeightFormat::Dense,
        dtype: Some(dtype),
        ..Default::default()
    }
}

/// Writes a tiny model of `arch` as GGUF (f32) and as a HF folder; returns both paths.
fn tiny_files(arch: Architecture, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = temp_dir(name);
    let config = tiny_config(arch);
    let weights = tiny_weights(&config, 7);
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &config, &weights, None);
    let model = Model::load(&gguf, &dense(DType::F32)).expect("tiny GGUF loads");
    let hf = dir.join("hf");
    write_tiny_hf(&hf, &config, &weights, &model.tokenizer.to_json().unwrap());
    (gguf, hf)
}

/// Logits (T, V) of every position of `tokens` through forward_train.
fn train_logits(model: &Model, tokens: &[u32], adapter: Option<&LoraAdapter>) -> Tensor {
    let t = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .transformer
        .forward_train(&t, adapter)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn step(
    model: &Model,
    tokens: &[u32],
    kv: &mut verity::model::SeqKv,
    adapter: Option<&LoraAdapter>,
) -> Tensor {
    model
        .transformer
        .forward_step(&mut [StepInput {
            tokens,
            kv,
            adapter,
            all_logits: true,
        }])
        .unwrap()
}

#[test]
fn gguf_and_hf_folder_give_the_same_logits_for_both_architectures() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let (gguf, hf) = tiny_files(arch, &format!("formats-{arch:?}"));
        let a = Model::load(&gguf, &dense(DType::F32)).unwrap();
        let b = Model::load(&hf, &dense(DType::F32)).unwrap();
        assert_eq!(
            a.config().tie_word_embeddings,
            b.config().tie_word_embeddings
        );
        assert_eq!(a.config().qkv_bias, arch == Architecture::Qwen2);
        let tokens = [5u32, 77, 260, 3, 150, 299, 12];
        let la = train_logits(&a, &tokens, None);
        let lb = train_logits(&b, &tokens, None);
        assert!(max_abs_diff(&la, &lb) < 1e-5, "{arch:?}: GGUF vs HF logits");
        // Same tokenizer both ways, and the chat template renders.
        let text = " the cat in the hat<|im_end|>";
        assert_eq!(
            a.tokenizer.encode(text, true).unwrap(),
            b.tokenizer.encode(text, true).unwrap()
        );
        assert_eq!(a.tokenizer.special().eog, b.tokenizer.special().eog);
        let msgs = [verity::ChatMessage::user("hi")];
        assert_eq!(
            a.tokenizer.apply_chat_template(&msgs, true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}

#[test]
fn batched_incremental_decode_equals_whole_sequence_and_single_decode() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let (gguf, _) = tiny_files(arch, &format!("batch-{arch:?}"));
        let model = Model::load(&gguf, &dense(DType::F32)).unwrap();
        let seqs: Vec<Vec<u32>> = vec![
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            vec![200, 100, 50],
            vec![17, 18, 19, 20, 21, 22],
        ];
        // Reference: each full sequence through forward_train.
        let full: Vec<Tensor> = seqs.iter().map(|s| train_logits(&model, s, None)).collect();

        // Batched: prefill different prompt lengths together, then one token per step,
        // with sequences dropping out as they end (different lengths in one batch).
        let prompt_len = [4usize, 1, 3];
        let mut kvs: Vec<_> = seqs.iter().map(|_| model.transformer.new_kv()).collect();
        let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); seqs.len()];
        let mut pos: Vec<usize> = vec![0; seqs.len()];
        loop {
            let active: Vec<usize> = (0..seqs.len())
                .filter(|&i| pos[i] < seqs[i].len())
                .collect();
            if active.is_empty() {
                break;
            }
            let chunks: Vec<&[u32]> = active
                .iter()
                .map(|&i| {
                    let n = if pos[i] == 0 { prompt_len[i] } else { 1 };
                    &seqs[i][pos[i]..pos[i] + n]
                })
                .collect();
            let mut kv_refs: Vec<&mut verity::model::SeqKv> = Vec::new();
            for (i, kv) in kvs.iter_mut().enumerate() {
                if active.contains(&i) {
                    kv_refs.push(kv);
                }
            }
            let mut batch: Vec<StepInput> = chunks
                .iter()
                .zip(kv_refs)
                .map(|(tokens, kv)| StepInput {
                    tokens,
                    kv,
                    adapter: None,
                    all_logits: true,
                })
                .collect();
            let logits = model.transformer.forward_step(&mut batch).unwrap();
            let mut r = 0;
            for (&i, chunk) in active.iter().zip(&chunks) {
                rows[i].push(logits.narrow(0, r, chunk.len()).unwrap());
                r += chunk.len();
                pos[i] += chunk.len();
            }
        }
        for (i, s) in seqs.iter().enumerate() {
            let batched = Tensor::cat(&rows[i], 0).unwrap();
            let d = max_abs_diff(&batched, &full[i]);
            assert!(
                d < 1e-4,
                "{arch:?} seq {i}: batched decode vs forward_train differ by {d}"
            );
            // Alone, token by token.
            let mut kv = model.transformer.new_kv();
            let alone: Vec<Tensor> = s
                .iter()
                .map(|t| step(&model, &[*t], &mut kv, None))
                .collect();
            let d = max_abs_diff(&Tensor::cat(&alone, 0).unwrap(), &batched);
            assert!(d < 1e-4, "{arch:?} seq {i}: batched vs alone differ by {d}");
        }
    }
}

/// A KV cache stored in f16 (the default for quantized weights on the CPU): a whole-prompt
/// step and single-token steps (both through the CPU attention kernel) give logits within
/// f16's rounding of the f32 training forward (candle ops), and of each other.
#[test]
fn an_f16_kv_cache_stays_within_rounding_of_f32_whole_or_token_by_token() {
    let (gguf, _) = tiny_files(Architecture::Qwen2, "kv-f16");
    let model = Model::load(
        &gguf,
        &LoadOptions {
            kv_dtype: Some(DType::F16),
            ..dense(DType::F32)
        },
    )
    .unwrap();
    assert_eq!(model.transformer.kv_dtype(), DType::F16);
    assert_eq!(
        Model::load(&gguf, &LoadOptions::default())
            .unwrap()
            .transformer
            .kv_dtype(),
        DType::F16,
        "quantized weights on the CPU default to an f16 cache"
    );
    assert_eq!(
        Model::load(&gguf, &dense(DType::F32))
            .unwrap()
            .transformer
            .kv_dtype(),
        DType::F32
    );
    let seq = [5u32, 17, 230, 41, 8, 99, 3, 150, 64, 12, 7, 201];
    let full = train_logits(&model, &seq, None);
    let mut kv = model.transformer.new_kv();
    let whole = step(&model, &seq, &mut kv, None);
    let mut kv = model.transformer.new_kv();
    let mut rows = vec![step(&model, &seq[..4], &mut kv, None)];
    rows.extend(seq[4..].iter().map(|t| step(&model, &[*t], &mut kv, None)));
    let one_by_one = Tensor::cat(&rows, 0).unwrap();
    for (what, logits) in [("whole prompt", &whole), ("token by token", &one_by_one)] {
        let d = relative_error(logits, &full);
        // f16 keeps 11 bits: a relative error of about 5e-4 per value.
        assert!(d < 5e-3, "{what}: f16 cache off f32 by {d} (relative)");
        assert!(d > 0.0, "{what}: the cache was not rounded to f16");
    }
    let d = relative_error(&whole, &one_by_one);
    assert!(d < 5e-3, "the two attention paths differ by {d} (relative)");
}

#[test]
fn forked_kv_continues_like_a_fresh_sequence() {
    let (gguf, _) = tiny_files(Architecture::Llama, "fork");
    let model = Model::load(&gguf, &dense(DType::F32)).unwrap();
    let prompt = [10u32, 11, 12, 13, 14];
    let mut parent = model.transformer.new_kv();
    step(&model, &prompt, &mut parent, None);
    let mut a = parent.fork().unwrap();
    let mut b = parent.fork().unwrap();
    assert_eq!(a.len(), prompt.len());
    assert_eq!(a.shared_segments().len(), 1);
    assert!(
        std::sync::Arc::ptr_eq(&a.shared_segments()[0], &b.shared_segments()[0]),
        "the prompt is held once"
    );
    let la = step(&model, &[40, 41], &mut a, None);
    let lb = step(&model, &[90], &mut b, None);
    let fa = train_logits(&model, &[10, 11, 12, 13, 14, 40, 41], None);
    let fb = train_logits(&model, &[10, 11, 12, 13, 14, 90], None);
    assert!(max_abs_diff(&la, &fa.narrow(0, 5, 2).unwrap()) < 1e-4);
    assert!(max_abs_diff(&lb, &fb.narrow(0, 5, 1).unwrap()) < 1e-4);
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    }
}

/// Gives every B a random value so the adapter does something.
/// Publishes new adapter values: A as it is, B random (as an optimizer update would).
fn randomize_b(adapter: &LoraAdapter, seed: u64) {
    let mut rng = verity::sampling::Rng::new(seed);
    let values = adapter
        .vars()
        .iter()
        .enumerate()
        .map(|(i, var)| {
            if i % 2 == 0 {
                return var.as_tensor().copy().unwrap();
            }
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let data: Vec<f64> = (0..n).map(|_| rng.next_f64() * 0.2 - 0.1).collect();
            Tensor::from_vec(data, dims, &Device::Cpu)
                .unwrap()
                .to_dtype(var.dtype())
                .unwrap()
        })
        .collect();
    adapter.publish(values).unwrap();
}

#[test]
fn lora_changes_reach_the_next_step_without_reload() {
    let (gguf, _) = tiny_files(Architecture::Qwen2, "lora-live");
    let model = Model::load(&gguf, &dense(DType::F32)).unwrap();
    let adapter = LoraAdapter::new(model.config(), lora_spec(), DType::F32, &Device::Cpu).unwrap();
    let tokens = [3u32, 4, 5, 6];
    let base = train_logits(&model, &tokens, None);
    // A fresh adapter (B = 0) changes nothing.
    let mut kv = model.transformer.new_kv();
    let fresh = step(&model, &tokens, &mut kv, Some(&adapter));
    assert!(max_abs_diff(&fresh, &base) < 1e-5);
    // Publish a new B: the next decode step sees it, and agrees with forward_train.
    randomize_b(&adapter, 1);
    let mut kv = model.transformer.new_kv();
    let changed = step(&model, &tokens, &mut kv, Some(&adapter));
    assert!(
        max_abs_diff(&changed, &base) > 1e-3,
        "the LoRA update must change the logits"
    );
    assert!(max_abs_diff(&changed, &train_logits(&model, &tokens, Some(&adapter))) < 1e-4);
    // Mixed batch: one sequence with the adapter, one on the base model.
    let mut kv1 = model.transformer.new_kv();
    let mut kv2 = model.transformer.new_kv();
    let out = model
        .transformer
        .forward_step(&mut [
            StepInput {
                tokens: &tokens,
                kv: &mut kv1,
                adapter: Some(&adapter),
                all_logits: true,
            },
            StepInput {
                tokens: &tokens,
                kv: &mut kv2,
                adapter: None,
                all_logits: true,
            },
        ])
        .unwrap();
    assert!(max_abs_diff(&out.narrow(0, 0, 4).unwrap(), &changed) < 1e-4);
    assert!(
        max_abs_diff(&out.narrow(0, 4, 4).unwrap(), &base) < 1e-4,
        "the base-model row is unaffected"
    );
}

/// Central finite differences of a scalar function of one tensor element.
fn numeric_grad(f: &dyn Fn() -> f64, var: &candle_core::Var, index: usize, h: f64) -> f64 {
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let set = |delta: f64| {
        let mut v = orig.clone();
        v[index] += delta;
        var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
            .unwrap();
    };
    set(h);
    let plus = f();
    set(-h);
    let minus = f();
    set(0.0);
    (plus - minus) / (2.0 * h)
}

#[test]
fn lora_gradients_of_forward_train_match_finite_differences() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ] {
        let (_, hf) = tiny_files(arch, &format!("grad-{arch:?}"));
        let model = Model::load(&hf, &dense(DType::F64)).unwrap();
        let adapter =
            LoraAdapter::new(model.config(), lora_spec(), DType::F64, &Device::Cpu).unwrap();
        randomize_b(&adapter, 3);
        let tokens =
            Tensor::new(&[[3u32, 70, 5, 260, 9], [8, 8, 1, 2, 299]], &Device::Cpu).unwrap();
        let v = model.config().vocab_size;
        let weights = Tensor::randn(0f64, 1.0, (2, 5, v), &Device::Cpu).unwrap();
        let loss = || -> Tensor {
            let logits = model
                .transformer
                .forward_train(&tokens, Some(&adapter))
                .unwrap();
            (logits * &weights).unwrap().sum_all().unwrap()
        };
        let grads = loss().backward().unwrap();
        let scalar = || loss().to_scalar::<f64>().unwrap();
        let vars = adapter.vars();
        // A and B of the first and last layer's q, v, down projections.
        for (k, var) in vars
            .iter()
            .enumerate()
            .filter(|(k, _)| [0, 1, 4, 5, 12, 13, 28, 29].contains(k) || *k >= vars.len() - 2)
        {
            let g = grads
                .get(var.as_tensor())
                .expect("gradient for every LoRA tensor")
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for index in [0, g.len() / 2, g.len() - 1] {
                let numeric = numeric_grad(&scalar, var, index, 1e-5);
                let err = (g[index] - numeric).abs();
                assert!(
                    err <= 1e-6 * (1.0 + numeric.abs()),
                    "{arch:?} var {k}[{index}]: autograd {} vs finite difference {numeric}",
                    g[index]
                );
            }
        }
    }
}

#[test]
fn every_training_op_has_gradients_matching_finite_differences() {
    use verity::model::testing as ops;
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 4, 8), &dev).unwrap())
        .unwrap();
    let w = Tensor::randn(0f64, 1.0, (8,), &dev).unwrap();
    let k = Tensor::randn(0f64, 1.0, (2, 1, 4, 8), &dev).unwrap();
    let v = Tensor::randn(0f64, 1.0, (2, 1, 4, 8), &dev).unwrap();
    let cos = Tensor::randn(0f64, 1.0, (4, 4), &dev).unwrap();
    let sin = Tensor::randn(0f64, 1.0, (4, 4), &dev).unwrap();
    let lin = Tensor::randn(0f64, 1.0, (5, 8), &dev).unwrap();
    let probe = Tensor::randn(0f64, 1.0, (2, 3, 4, 8), &dev).unwrap();
    let probe5 = Tensor::randn(0f64, 1.0, (2, 3, 4, 5), &dev).unwrap();
    type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, Op)> = vec![
        (
            "rms_norm",
            Box::new(|x| {
                (ops::rms_norm(x, &w, 1e-5).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "rope",
            Box::new(|x| {
                (ops::rope(x, &cos, &sin).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "softmax",
            Box::new(|x| {
                (ops::softmax(x).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "log_softmax",
            Box::new(|x| {
                (ops::log_softmax(x).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "swiglu",
            Box::new(|x| {
                (ops::swiglu(x, &x.sin().unwrap()).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "attention (queries)",
            Box::new(|x| {
                (ops::causal_attention(x, &k, &v).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "attention (keys, values)",
            Box::new(|x| {
                let kv = x.narrow(1, 0, 1).unwrap();
                let q = Tensor::ones((2, 3, 4, 8), DType::F64, &Device::Cpu).unwrap();
                (ops::causal_attention(&q, &kv, &kv.sqr().unwrap()).unwrap() * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
        (
            "linear",
            Box::new(|x| {
                (x.broadcast_matmul(&lin.t().unwrap()).unwrap() * &probe5)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            }),
        ),
    ];
    for (name, op) in cases {
        let grads = op(x.as_tensor()).backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let scalar = || op(x.as_tensor()).to_scalar::<f64>().unwrap();
        for index in (0..g.len()).step_by(17) {
            let numeric = numeric_grad(&scalar, &x, index, 1e-5);
            assert!(
                (g[index] - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{name}[{index}]: autograd {} vs finite difference {numeric}",
                g[index]
            );
        }
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let (gguf, hf) = tiny_files(Architecture::Llama, "bad");
    let dir = gguf.parent().unwrap().to_path_buf();
    let err = |r: verity::Result<Model>| r.err().expect("must fail").to_string();

    // Missing file.
    let e = err(Model::load(dir.join("nope.gguf"), &Default::default()));
    assert!(e.contains("nope.gguf") && e.contains("No such file"), "{e}");

    // Truncated GGUF: header intact, tensor data cut.
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(Model::load(&cut, &Default::default()));
    assert!(e.contains("truncated") && e.contains("cut.gguf"), "{e}");
    // Cut inside the header.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let e = err(Model::load(&cut, &Default::default()));
    assert!(e.contains("GGUF header"), "{e}");
    // Not a GGUF at all.
    std::fs::write(&cut, b"hello world, definitely not a model").unwrap();
    let e = err(Model::load(&cut, &Default::default()));
    assert!(
        e.contains("cut.gguf") && e.contains("not a usable model file"),
        "{e}"
    );

    // Unsupported architecture.
    let mut config = tiny_config(Architecture::Llama);
    let weights = tiny_weights(&config, 1);
    let odd = dir.join("odd");
    write_tiny_hf(&odd, &config, &weights, "{}");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(odd.join("config.json")).unwrap()).unwrap();
    json["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(odd.join("config.json"), json.to_string()).unwrap();
    let e = err(Model::load(&odd, &Default::default()));
    assert!(
        e.contains("unsupported architecture 'GPTNeoXForCausalLM'"),
        "{e}"
    );

    // A config that contradicts the weights.
    config.hidden_size = 48;
    let wrong = dir.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(hf.join(f), wrong.join(f)).unwrap();
    }
    std::fs::write(wrong.join("config.json"), config.to_hf_json().to_string()).unwrap();
    let e = err(Model::load(&wrong, &Default::default()));
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("contradicts the config"),
        "{e}"
    );

    // A prompt longer than the context: clear error, KV cache untouched.
    let model = Model::load(&gguf, &Default::default()).unwrap();
    let long: Vec<u32> = vec![5; model.config().max_position_embeddings + 1];
    let mut kv = model.transformer.new_kv();
    let e = model
        .transformer
        .forward_step(&mut [StepInput {
            tokens: &long,
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }])
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            Error::PromptTooLong {
                tokens: 65,
                context: 64
            }
        ),
        "{e}"
    );
    assert_eq!(kv.len(), 0);
    let model = std::sync::Arc::new(model);
    let engine = verity::engine::Engine::new(model.clone(), Default::default()).unwrap();
    let mut request = verity::engine::Request::new(verity::engine::Prompt::Tokens(long));
    request.max_tokens = 4;
    let e = engine.generate(request, None).err().unwrap();
    assert!(
        e.to_string()
            .contains("does not fit the context of 64 tokens"),
        "{e}"
    );
    // Out-of-vocabulary token id.
    let e = model
        .transformer
        .forward_step(&mut [StepInput {
            tokens: &[100_000],
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }])
        .err()
        .unwrap();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
}
