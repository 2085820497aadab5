//! Each architecture against transformers itself: tiny random-weight models made by
//! `tests/fixtures/make_tiny.py` (config.json as transformers 5 writes it, safetensors, a
//! PEFT adapter with random A and B), with transformers' f32 logits at every position of a
//! few sequences and its greedy continuation. verity must give the same logits through both
//! entry points (decode steps and the training forward), with and without the PEFT adapter,
//! from the HF folder and from the same weights written as GGUF, and the same greedy tokens.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use verity::adapter::load_peft;
use verity::model::{LoraAdapter, StepInput, WeightFormat};
use verity::{LoadOptions, Model};

/// Worst error relative to the largest reference logit: transformers and verity sum in
/// different orders, so f32 agreement is to a few ulps of the largest value.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/tiny").join(name)
}

fn dense_f32() -> LoadOptions {
    LoadOptions {
        format: WeightFormat::Dense,
        dtype: Some(DType::F32),
        ..Default::default()
    }
}

struct Golden {
    sequences: Vec<Vec<u32>>,
    greedy_prompt: Vec<u32>,
    greedy: Vec<u32>,
    adapter_greedy: Vec<u32>,
    logits: HashMap<String, Tensor>,
}

fn golden(dir: &Path) -> Golden {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let seqs = |v: &serde_json::Value| -> Vec<u32> { ids(v) };
    Golden {
        sequences: json["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(seqs)
            .collect(),
        greedy_prompt: ids(&json["greedy_prompt"]),
        greedy: ids(&json["greedy"]),
        adapter_greedy: ids(&json["adapter_greedy"]),
        logits: candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)
            .unwrap(),
    }
}

/// Logits (T, V) of every position: once through one decode step over the whole sequence,
/// once through the training forward. Both must be within tolerance of `want`.
fn check_logits(
    model: &Model,
    tokens: &[u32],
    adapter: Option<&LoraAdapter>,
    want: &Tensor,
    what: &str,
) {
    let mut kv = model.transformer.new_kv();
    let step = model
        .transformer
        .forward_step(&mut [StepInput {
            tokens,
            kv: &mut kv,
            adapter,
            all_logits: true,
        }])
        .unwrap();
    let e = relative_error(&step, want);
    assert!(e < TOLERANCE, "{what}: decode-step logits off by {e}");
    // One token per step (the batched decode attention), after a prompt of a third of the
    // sequence held as a shared segment of a fork, beside a second sequence in the batch.
    let split = (tokens.len() / 3).max(1);
    let mut parent = model.transformer.new_kv();
    let mut other = model.transformer.new_kv();
    let mut rows = vec![model
        .transformer
        .forward_step(&mut [StepInput {
            tokens: &tokens[..split],
            kv: &mut parent,
            adapter,
            all_logits: true,
        }])
        .unwrap()];
    let mut kv = parent.fork().unwrap();
    for (i, t) in tokens[split..].iter().enumerate() {
        let logits = model
            .transformer
            .forward_step(&mut [
                StepInput {
                    tokens: &tokens[i % tokens.len()..][..1],
                    kv: &mut other,
                    adapter: None,
                    all_logits: false,
                },
                StepInput {
                    tokens: std::slice::from_ref(t),
                    kv: &mut kv,
                    adapter,
                    all_logits: false,
                },
            ])
            .unwrap();
        rows.push(logits.narrow(0, 1, 1).unwrap());
    }
    let e = relative_error(&Tensor::cat(&rows, 0).unwrap(), want);
    assert!(e < TOLERANCE, "{what}: token-by-token logits off by {e}");
    let t = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let train = model
        .transformer
        .forward_train(&t, adapter)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let e = relative_error(&train, want);
    assert!(e < TOLERANCE, "{what}: training-forward logits off by {e}");
}

/// Greedy tokens one decode step at a time (the KV cache path).
fn greedy(model: &Model, prompt: &[u32], steps: usize, adapter: Option<&LoraAdapter>) -> Vec<u32> {
    let mut kv = model.transformer.new_kv();
    let mut next: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let logits = model
            .transformer
            .forward_step(&mut [StepInput {
                tokens: &next,
                kv: &mut kv,
                adapter,
                all_logits: false,
            }])
            .unwrap();
        let id = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(id);
        next = vec![id];
    }
    out
}

fn check_architecture(name: &str, arch: &str) {
    let dir = fixture(name);
    let g = golden(&dir);
    let hf = Model::load(&dir, &dense_f32()).unwrap();
    assert_eq!(hf.config().architecture.name(), arch);
    // The same weights as GGUF, written the way llama.cpp's converter lays them out.
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let gguf_path = temp_dir(&format!("arch-{name}")).join("model.gguf");
    write_tiny_gguf(&gguf_path, hf.config(), &weights, None);
    let gguf = Model::load(&gguf_path, &dense_f32()).unwrap();
    assert_eq!(gguf.config().architecture, hf.config().architecture);
    assert_eq!(gguf.config().head_dim, hf.config().head_dim);
    // And as llama.cpp's own converter wrote it (tests/fixtures/convert_tiny_gguf.py), where
    // it can: its Gemma 3 path trims the embedding to the toy tokenizer's 266 entries but
    // lists 300 tokens (the real Gemma-3-270M file it made is tests/reference.rs's), and it
    // drops Mistral's window (llama.cpp runs Mistral with full attention), so that file
    // agrees with transformers only on sequences inside the window.
    let converted = (name != "gemma3")
        .then(|| Model::load(dir.join("llama.cpp.f32.gguf"), &dense_f32()).unwrap());
    let converted_window = hf.config().sliding_window.unwrap_or(usize::MAX);
    if let Some(c) = &converted {
        assert_eq!(c.config().architecture, hf.config().architecture);
        if name == "mistral" {
            assert_eq!(c.config().sliding_window, None);
        }
    }
    let adapter = load_peft(&dir.join("adapter"), hf.config(), DType::F32, &Device::Cpu).unwrap();
    for (i, seq) in g.sequences.iter().enumerate() {
        let want = &g.logits[&format!("logits.{i}")];
        check_logits(&hf, seq, None, want, &format!("{name} HF, sequence {i}"));
        if let Some(c) = converted
            .as_ref()
            .filter(|c| c.config().sliding_window.is_some() || seq.len() <= converted_window)
        {
            check_logits(
                c,
                seq,
                None,
                want,
                &format!("{name} GGUF by llama.cpp's converter, sequence {i}"),
            );
        }
        check_logits(
            &gguf,
            seq,
            None,
            want,
            &format!("{name} GGUF, sequence {i}"),
        );
        let want = &g.logits[&format!("adapter_logits.{i}")];
        check_logits(
            &hf,
            seq,
            Some(&adapter),
            want,
            &format!("{name} + PEFT adapter, sequence {i}"),
        );
    }
    let steps = g.greedy.len();
    assert_eq!(
        greedy(&hf, &g.greedy_prompt, steps, None),
        g.greedy,
        "{name}: greedy"
    );
    assert_eq!(
        greedy(&hf, &g.greedy_prompt, steps, Some(&adapter)),
        g.adapter_greedy,
        "{name}: greedy with the adapter"
    );
}

#[test]
fn qwen3_matches_transformers() {
    check_architecture("qwen3", "qwen3");
}

/// Llama 3 RoPE scaling, from a config in transformers 5's `rope_parameters` form.
#[test]
fn llama3_with_rope_scaling_matches_transformers() {
    check_architecture("llama3", "llama");
    let model = Model::load(fixture("llama3"), &dense_f32()).unwrap();
    let scaling = model
        .config()
        .rope_scaling
        .clone()
        .expect("llama3 scaling read");
    assert_eq!(
        (scaling.factor, scaling.original_max_position_embeddings),
        (8.0, 32)
    );
    assert_eq!(model.config().rope_theta, 500_000.0);
}

/// Qwen3's thinking switch: the chat template with `enable_thinking` (unset, false, true)
/// renders exactly as transformers' `apply_chat_template` does, and a request with those
/// template variables decodes from the same tokens.
#[test]
fn chat_template_variables_render_like_transformers() {
    let dir = fixture("qwen3");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let model = Model::load(&dir, &dense_f32()).unwrap();
    let cases = json["chat"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    let mut thinking_off = 0;
    for case in cases {
        let messages: Vec<verity::ChatMessage> =
            serde_json::from_value(case["messages"].clone()).unwrap();
        let kwargs = case["kwargs"].as_object().unwrap().clone();
        let want = case["text"].as_str().unwrap();
        let got = model
            .tokenizer
            .apply_chat_template_with(&messages, true, &kwargs)
            .unwrap();
        assert_eq!(got, want, "{kwargs:?}");
        thinking_off += want.ends_with("<think>\n\n</think>\n\n") as usize;
        let prompt = verity::engine::Prompt::ChatWith(messages, kwargs);
        assert_eq!(
            verity::engine::prompt_tokens(&model, &prompt).unwrap(),
            model.tokenizer.encode(want, true).unwrap()
        );
    }
    assert_eq!(
        thinking_off, 2,
        "enable_thinking=false pre-fills an empty block"
    );
    // Variables verity sets itself cannot be overridden.
    let mut clash = serde_json::Map::new();
    clash.insert("add_generation_prompt".into(), false.into());
    let err = model
        .tokenizer
        .apply_chat_template_with(&[verity::ChatMessage::user("hi")], true, &clash)
        .unwrap_err()
        .to_string();
    assert!(err.contains("add_generation_prompt"), "{err}");
}

/// Gemma 3: (1 + w) norms around attention and MLP, q/k norms, GeGLU, the √d embedding
/// scale, five sliding-window layers (window 8, outgrown by the 40-token sequence) with a
/// RoPE base of their own, and a global layer.
#[test]
fn gemma3_matches_transformers() {
    check_architecture("gemma3", "gemma3");
    let model = Model::load(fixture("gemma3"), &dense_f32()).unwrap();
    let c = model.config();
    let slides: Vec<Option<usize>> = (0..c.num_layers).map(|l| c.window(l)).collect();
    assert_eq!(slides, [Some(8), Some(8), Some(8), Some(8), Some(8), None]);
    assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
}

/// Mistral's sliding window on every layer (8 positions; the 40-token sequence outgrows
/// it): honoured in decode steps and the training forward, not just a context cap.
#[test]
fn mistral_sliding_window_matches_transformers() {
    check_architecture("mistral", "llama");
    let model = Model::load(fixture("mistral"), &dense_f32()).unwrap();
    assert_eq!(model.config().window(1), Some(8));
    assert_eq!(model.config().max_position_embeddings, 256);
}

/// Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj split at load (HF and GGUF), PEFT's
/// adapter on the fused modules (one A per fused matrix), a partial rotary factor of 0.75
/// and LongRoPE's short factors with their attention factor, the context capped at the
/// original 64 positions where the long factors would take over.
#[test]
fn phi3_matches_transformers() {
    check_architecture("phi3", "phi3");
    // llama.cpp's Q8_0 file: the fused attn_qkv and ffn_up split as quantized bytes, run by
    // the quantized matmuls. Weight and activation rounding leave a small error; a row
    // split in the wrong place would leave noise.
    let q8 = Model::load(
        fixture("phi3").join("llama.cpp.q8_0.gguf"),
        &LoadOptions {
            format: WeightFormat::Quantized,
            dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        q8.transformer.weight_types().contains("q8_0"),
        "{}",
        q8.transformer.weight_types()
    );
    let g = golden(&fixture("phi3"));
    for (i, seq) in g.sequences.iter().enumerate() {
        let mut kv = q8.transformer.new_kv();
        let logits = q8
            .transformer
            .forward_step(&mut [StepInput {
                tokens: seq,
                kv: &mut kv,
                adapter: None,
                all_logits: true,
            }])
            .unwrap();
        let e = relative_error(&logits, &g.logits[&format!("logits.{i}")]);
        assert!(e < 0.05, "phi3 Q8_0 sequence {i}: off by {e}");
    }
    let model = Model::load(fixture("phi3"), &dense_f32()).unwrap();
    let c = model.config();
    assert_eq!((c.head_dim, c.rotary_dim), (16, Some(12)));
    assert_eq!(c.max_position_embeddings, 64);
    let want = (1.0 + (256.0f64 / 64.0).ln() / 64f64.ln()).sqrt();
    assert!((c.rope_attention_factor.unwrap() - want).abs() < 1e-12);
    // Saved by verity, the adapter is PEFT's file again: the same keys, the same numbers.
    let dir = fixture("phi3").join("adapter");
    let adapter = load_peft(&dir, c, DType::F32, &Device::Cpu).unwrap();
    let saved = temp_dir("phi3-adapter").join("adapter");
    verity::adapter::save_peft(&adapter, c, &saved, "").unwrap();
    let read = |d: &Path| {
        candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (theirs, ours) = (read(&dir), read(&saved));
    let mut keys: Vec<&String> = ours.keys().collect();
    keys.sort();
    let mut want_keys: Vec<&String> = theirs.keys().collect();
    want_keys.sort();
    assert_eq!(keys, want_keys);
    for (k, t) in &theirs {
        assert_eq!(max_abs_diff(t, &ours[k]), 0.0, "{k}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("adapter_config.json")).unwrap())
            .unwrap();
    let mut targets: Vec<&str> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(targets, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
    // A fused matrix is adapted whole or not at all.
    let spec = verity::model::LoraSpec {
        rank: 2,
        alpha: 4.0,
        targets: vec![verity::model::LoraTarget::Q, verity::model::LoraTarget::V],
        use_rslora: false,
    };
    let err = verity::model::LoraAdapter::new(c, spec, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("qkv_proj"), "{err}");
}

/// The other direction: adapters that `verity rl` trained and saved (3 steps, on the Qwen3
/// and Phi-3 fixtures; Phi-3's on its fused modules), loaded by PEFT onto the transformers
/// model (`make_tiny.py --score-adapter`), give the logits verity gives with them. The
/// adapters moved the model: a file PEFT misread would show.
#[test]
fn adapters_verity_trained_give_verity_logits_under_peft() {
    for name in ["qwen3", "phi3"] {
        let dir = fixture(name);
        let g = golden(&dir);
        let model = Model::load(&dir, &dense_f32()).unwrap();
        let adapter = load_peft(
            &dir.join("verity_adapter"),
            model.config(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert!(adapter.version() == 0 && adapter.spec.targets.len() == 7);
        let peft = candle_core::safetensors::load(
            dir.join("verity_adapter_logits.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        for (i, seq) in g.sequences.iter().enumerate() {
            let want = &peft[&format!("logits.{i}")];
            let moved = relative_error(&g.logits[&format!("logits.{i}")], want);
            assert!(
                moved > 1e-3,
                "{name}: the trained adapter changes little ({moved})"
            );
            check_logits(
                &model,
                seq,
                Some(&adapter),
                want,
                &format!("{name} + verity-trained adapter under PEFT, sequence {i}"),
            );
        }
    }
}

/// Phi-3's fused parts share one A: the trainer sees it once (11 Vars a layer, not 14), and
/// a published update reaches decode steps part by part exactly as the Vars hold it.
#[test]
fn fused_parts_share_one_a_through_publish() {
    use verity::model::{LoraAdapter, LoraSpec, LoraTarget};
    let model = Model::load(fixture("phi3"), &dense_f32()).unwrap();
    let c = model.config();
    let spec = LoraSpec {
        rank: 3,
        alpha: 6.0,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    };
    let adapter = LoraAdapter::new(c, spec, DType::F32, &Device::Cpu).unwrap();
    let vars = adapter.vars();
    assert_eq!(vars.len(), 11 * c.num_layers);
    let values: Vec<Tensor> = vars
        .iter()
        .map(|v| Tensor::randn(0f32, 1.0, v.dims(), &Device::Cpu).unwrap())
        .collect();
    adapter.publish(values).unwrap();
    let snapshot = adapter.snapshot();
    let x = Tensor::randn(0f32, 1.0, (2, c.hidden_size), &Device::Cpu).unwrap();
    for layer in 0..c.num_layers {
        let q = adapter.get(layer, LoraTarget::Q).unwrap();
        for t in [LoraTarget::K, LoraTarget::V] {
            let other = adapter.get(layer, t).unwrap();
            assert_eq!(max_abs_diff(q.a.as_tensor(), other.a.as_tensor()), 0.0);
        }
        for t in [
            LoraTarget::Q,
            LoraTarget::K,
            LoraTarget::V,
            LoraTarget::Gate,
            LoraTarget::Up,
        ] {
            // The decode view's CPU kernel sums in its own order: equal to f32 rounding
            // of the values' size.
            let published = snapshot.delta(layer, t, &x).unwrap().unwrap();
            let held = adapter.delta(layer, t, &x).unwrap().unwrap();
            let d = relative_error(&published, &held);
            assert!(d < 1e-5, "layer {layer} {t:?}: relative error {d}");
        }
    }
}

/// A chat template in Gemma's shape (no system role: a system message joins the first user
/// turn; "model" turns; trimmed contents; the BOS written by the template) renders exactly
/// as transformers renders it, and a tokenizer that adds its own BOS still gives one BOS,
/// transformers' ids. Roles that do not alternate are the template's own error.
#[test]
fn a_gemma_style_chat_template_renders_like_transformers_with_one_bos() {
    let chat: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gemma3").join("chat.json")).unwrap(),
    )
    .unwrap();
    let dir = temp_dir("gemma-chat");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("gemma3").join(f), dir.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "bos_token": chat["bos_token"], "eos_token": chat["eos_token"],
        "add_bos_token": true, "chat_template": chat["template"],
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let model = Model::load(&dir, &dense_f32()).unwrap();
    assert!(model.tokenizer.special().add_bos);
    let renders = chat["renders"].as_array().unwrap();
    assert_eq!(renders.len(), 2);
    for r in renders {
        let messages: Vec<verity::ChatMessage> =
            serde_json::from_value(r["messages"].clone()).unwrap();
        let text = model
            .tokenizer
            .apply_chat_template(&messages, true)
            .unwrap();
        assert_eq!(text, r["text"].as_str().unwrap());
        let tokens =
            verity::engine::prompt_tokens(&model, &verity::engine::Prompt::Chat(messages)).unwrap();
        assert_eq!(tokens, ids(&r["ids"]), "{text:?}");
    }
    let wrong: Vec<verity::ChatMessage> =
        serde_json::from_value(chat["not_alternating"].clone()).unwrap();
    let err = model
        .tokenizer
        .apply_chat_template(&wrong, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must alternate"), "{err}");
}
