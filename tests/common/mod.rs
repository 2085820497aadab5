//! Helpers shared by the integration tests: where the real models and the llama.cpp
//! reference data live, and a tiny random-weight model written in both file formats.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use verity::model::config::{Architecture, ModelConfig};
use verity::model::testing::permute_rows;

/// The repository root (the tests of `crates/*` include this file too).
pub fn repo() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if here.join("models").is_dir() {
        here
    } else {
        here.join("../..")
    }
}

/// `../shared` beside the checkout (where CI puts it), or $VERITY_SHARED.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("VERITY_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"))
}

/// A real model fetched by `models/fetch.sh`; the test fails with instructions if missing.
pub fn real_model(file: &str) -> PathBuf {
    let dir = std::env::var_os("VERITY_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"));
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `models/fetch.sh` (smollm2) or `models/fetch.sh models qwen-coder-0.5b` first",
        path.display()
    );
    path
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN_05B: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
/// Gemma-3-270M base (Gemma terms: fetched by `models/fetch.sh models gemma3-270m`, never
/// committed).
pub const GEMMA3_270M: &str = "gemma-3-270m-q4_k_m.gguf";

/// Qwen tests run when the model is present or VERITY_TEST_QWEN=1 demands it.
pub fn qwen_wanted() -> bool {
    std::env::var("VERITY_TEST_QWEN")
        .map(|v| v == "1")
        .unwrap_or(false)
        || repo().join("models").join(QWEN_05B).is_file()
}

/// Reference data by file name: the project's own (`tests/fixtures/reference`, for models
/// shared/reference does not cover), else shared/reference.
pub fn reference(name: &str) -> serde_json::Value {
    let own = repo().join("tests/fixtures/reference").join(name);
    let path = if own.is_file() {
        own
    } else {
        shared_dir().join("reference").join(name)
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read reference data {}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// A unique temporary folder for one test. (Folders outlive their test, for looking at
/// after a failure; the first call of a process removes those of processes that ended,
/// untouched for an hour.)
pub fn temp_dir(name: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(remove_ended_processes_dirs);
    let dir = std::env::temp_dir().join(format!("verity-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Removes `verity-test-PID-*` folders whose process has ended (Linux: no `/proc/PID`) and
/// that nobody touched for an hour (a process in another PID namespace sharing `/tmp`
/// has no `/proc/PID` here either).
fn remove_ended_processes_dirs() {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("verity-test-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if stale && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A tiny model's config.
pub fn tiny_config(arch: Architecture) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: 300,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        // Qwen3 sets head_dim on its own: wider than hidden / heads here.
        head_dim: if arch == Architecture::Qwen3 { 16 } else { 8 },
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_freq_factors: None,
        max_position_embeddings: 64,
        tie_word_embeddings: arch == Architecture::Llama,
        qkv_bias: arch == Architecture::Qwen2,
        o_bias: false,
        qk_norm: arch == Architecture::Qwen3,
        activation: Default::default(),
        embedding_multiplier: None,
        query_scale: None,
        sandwich_norms: false,
        sliding_window: None,
        sliding_layers: Vec::new(),
        rope_local_theta: None,
        rotary_dim: None,
        rope_attention_factor: None,
    }
}

/// Random HF-named weights for `config`, reproducible from `seed`.
pub fn tiny_weights(config: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut rng = verity::sampling::Rng::new(seed);
    let mut rand = |shape: &[usize], scale: f64| -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_vec(data, shape, &dev).expect("tensor")
    };
    let c = config;
    let (h, i, v, hd) = (c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim);
    let q = c.num_heads * hd;
    let kv = c.num_kv_heads * hd;
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), rand(&[v, h], 1.0));
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let norm =
            |rand: &mut dyn FnMut(&[usize], f64) -> Tensor| (rand(&[h], 0.2) + 1.0).expect("norm");
        w.insert(format!("{p}.input_layernorm.weight"), norm(&mut rand));
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            norm(&mut rand),
        );
        w.insert(format!("{p}.self_attn.q_proj.weight"), rand(&[q, h], 0.3));
        w.insert(format!("{p}.self_attn.k_proj.weight"), rand(&[kv, h], 0.3));
        w.insert(format!("{p}.self_attn.v_proj.weight"), rand(&[kv, h], 0.3));
        w.insert(format!("{p}.self_attn.o_proj.weight"), rand(&[h, q], 0.3));
        w.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[i, h], 0.3));
        w.insert(format!("{p}.mlp.up_proj.weight"), rand(&[i, h], 0.3));
        w.insert(format!("{p}.mlp.down_proj.weight"), rand(&[h, i], 0.3));
        if c.qkv_bias {
            w.insert(format!("{p}.self_attn.q_proj.bias"), rand(&[q], 0.1));
            w.insert(format!("{p}.self_attn.k_proj.bias"), rand(&[kv], 0.1));
            w.insert(format!("{p}.self_attn.v_proj.bias"), rand(&[kv], 0.1));
        }
        if c.o_bias {
            w.insert(format!("{p}.self_attn.o_proj.bias"), rand(&[h], 0.1));
        }
        if c.qk_norm {
            for name in ["q_norm", "k_norm"] {
                let weight = (rand(&[hd], 0.2) + 1.0).expect("norm");
                w.insert(format!("{p}.self_attn.{name}.weight"), weight);
            }
        }
    }
    w.insert(
        "model.norm.weight".to_string(),
        (rand(&[h], 0.2) + 1.0).expect("norm"),
    );
    if !c.tie_word_embeddings {
        w.insert("lm_head.weight".to_string(), rand(&[v, h], 0.3));
    }
    w
}

/// A byte-level vocabulary for tiny models: 256 byte tokens, a few merges, 3 specials.
pub fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut map = Vec::new();
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable = (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map.push(if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        });
    }
    let mut tokens: Vec<String> = map.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; 256];
    let merges: Vec<String> = vec!["Ġ t".into(), "h e".into(), "Ġt he".into(), "i n".into()];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, merges, types)
}

pub const TINY_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tiny random model of `arch` (weights from `seed`) written as GGUF under a fresh
/// temporary folder `name`, loaded dense on `device` in `dtype`.
pub fn tiny_dense_model(
    name: &str,
    arch: Architecture,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> std::sync::Arc<verity::Model> {
    let dir = temp_dir(name);
    let config = tiny_config(arch);
    let weights = tiny_weights(&config, seed);
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, &config, &weights, None);
    let options = verity::LoadOptions {
        device: device.clone(),
        format: verity::model::WeightFormat::Dense,
        dtype: Some(dtype),
        ..Default::default()
    };
    std::sync::Arc::new(verity::Model::load(&path, &options).unwrap())
}

/// Σ log p of `completion` after `prompt` under `adapter`, from the training forward.
pub fn completion_logprob(
    model: &verity::Model,
    adapter: &verity::model::LoraAdapter,
    prompt: &[u32],
    completion: &[u32],
) -> f64 {
    verity::train::completion_logprobs(&model.transformer, prompt, &[completion], Some(adapter))
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Writes `weights` as a GGUF file, as llama.cpp's converter would (Q/K rows permuted for
/// `llama`; Phi-3's fused projections, rotary width and LongRoPE factors as it writes them),
/// with a byte-level tokenizer; weights stored as f32 or quantized to `dtype`.
pub fn write_tiny_gguf(
    path: &Path,
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    quant: Option<candle_core::quantized::GgmlDType>,
) {
    let arch = config.architecture.name();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let gemma = config.architecture == Architecture::Gemma3;
    let phi3 = config.architecture == Architecture::Phi3;
    for (name, t) in weights {
        let gguf = gguf_name(name, gemma, phi3);
        let mut t = t.clone();
        if gemma && name.ends_with("norm.weight") {
            // llama.cpp's converter stores Gemma's (1 + w) norm factors.
            t = (t + 1.0).unwrap();
        }
        if config.architecture == Architecture::Llama
            && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight"))
        {
            let heads = if name.ends_with("q_proj.weight") {
                config.num_heads
            } else {
                config.num_kv_heads
            };
            let (rows, cols) = t.dims2().unwrap();
            let raw: Vec<u8> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect();
            let permuted = permute_rows(&raw, rows, heads);
            let data: Vec<f32> = permuted
                .chunks(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        }
        let q = match quant {
            Some(dtype) if t.rank() == 2 => QTensor::quantize(&t, dtype).unwrap(),
            _ => QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap(),
        };
        tensors.push((gguf, q));
    }
    if config.rope_scaling.is_some() {
        // llama.cpp's converter stores Llama 3 RoPE scaling as per-frequency divisors.
        let unscaled = ModelConfig {
            rope_scaling: None,
            ..config.clone()
        };
        let factors: Vec<f32> = unscaled
            .rope_inv_freq()
            .iter()
            .zip(config.rope_inv_freq())
            .map(|(base, scaled)| base / scaled)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
        tensors.push(("rope_freqs.weight".to_string(), q));
    }
    if let (true, Some(short)) = (phi3, &config.rope_freq_factors) {
        // The converter writes LongRoPE's long factors too; verity never uses them.
        let n = short.len();
        for (name, scale) in [
            ("rope_factors_short.weight", 1.0),
            ("rope_factors_long.weight", 3.0),
        ] {
            let t = (Tensor::from_vec(short.clone(), n, &Device::Cpu).unwrap() * scale).unwrap();
            let q = QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap();
            tensors.push((name.to_string(), q));
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (tokens, merges, types) = tiny_vocab();
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            format!("{arch}.context_length"),
            Value::U32(config.max_position_embeddings as u32),
        ),
        (
            format!("{arch}.embedding_length"),
            Value::U32(config.hidden_size as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            format!("{arch}.block_count"),
            Value::U32(config.num_layers as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(config.num_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(config.num_kv_heads as u32),
        ),
        (
            format!("{arch}.attention.key_length"),
            Value::U32(config.head_dim as u32),
        ),
        (
            format!("{arch}.attention.value_length"),
            Value::U32(config.head_dim as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(if arch == "llama" { "smollm" } else { "qwen2" }.into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(tokens.len() as u32 - 1),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(tokens.len() as u32 - 2),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(TINY_TEMPLATE.into()),
        ),
    ];
    let mut md = md;
    if phi3 {
        // Phi-3's converter writes no key length: the head is hidden / heads, and
        // `rope.dimension_count` is the rotated part of it.
        md.retain(|(k, _)| !k.contains(".attention.key_length") && !k.contains(".value_length"));
        md.push((
            format!("{arch}.rope.dimension_count"),
            Value::U32(config.rope_dims() as u32),
        ));
        if let Some(f) = config.rope_attention_factor {
            md.push((
                format!("{arch}.rope.scaling.original_context_length"),
                Value::U32(config.max_position_embeddings as u32),
            ));
            md.push((
                format!("{arch}.rope.scaling.attn_factor"),
                Value::F32(f as f32),
            ));
        }
    }
    if let Some(w) = config.sliding_window {
        md.push((
            format!("{arch}.attention.sliding_window"),
            Value::U32(w as u32),
        ));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut file, &md_refs, &t_refs).unwrap();
}

fn gguf_name(hf: &str, gemma: bool, phi3: bool) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, suffix) = rest.rsplit_once('.').unwrap();
    let m = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" if phi3 => "ffn_up",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no GGUF name for {other}"),
    };
    format!("blk.{layer}.{m}.{suffix}")
}

/// Writes a HF folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).
pub fn write_tiny_hf(
    dir: &Path,
    config: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer_json: &str,
) {
    verity::model::testing::save(dir, config, weights).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json).unwrap();
    let tc = serde_json::json!({"chat_template": TINY_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, b) / scale.max(1e-6)
}
pub mod fuzz;
