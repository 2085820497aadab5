//! GGUF (v2/v3) loading: hyper-parameters from the header, tensors renamed to Hugging Face
//! names, quantized blocks kept as they are, and the Q/K rows of `llama` files un-permuted
//! from llama.cpp's interleaved RoPE layout back to the half-split layout HF uses.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;

use super::config::{Activation, Architecture, ModelConfig};
use super::weights::{Weight, WeightMap};
use crate::error::{Error, Result};

/// The header of a GGUF file: metadata and tensor directory.
pub struct GgufHeader {
    pub content: Content,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        }
    }
    pub fn get_usize(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(value_as_u64).map(|v| v as usize)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            other => value_as_u64(other).map(|v| v as f64),
        }
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            other => value_as_u64(other).map(|v| v != 0),
        }
    }
}

/// Any GGUF integer (files disagree on widths) as u64; negatives are None.
pub fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

pub fn read_header(path: &Path) -> Result<(GgufHeader, BufReader<File>)> {
    let (file, _) = crate::files::open_regular(path, u64::MAX)?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::bad_file(path, format!("cannot read the GGUF header: {e}")))?;
    Ok((GgufHeader { content }, reader))
}

/// Hyper-parameters from the `{arch}.*` keys of the header.
pub fn config_from_header(path: &Path, header: &GgufHeader) -> Result<ModelConfig> {
    let arch_name = header
        .get_str("general.architecture")
        .ok_or_else(|| Error::bad_file(path, "no 'general.architecture' in the GGUF metadata"))?;
    let architecture = Architecture::parse(arch_name)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let required = |k: &str| {
        header
            .get_usize(&key(k))
            .ok_or_else(|| Error::bad_file(path, format!("GGUF metadata lacks '{}'", key(k))))
    };
    let hidden_size = required("embedding_length")?;
    let num_heads = required("attention.head_count")?;
    let phi3 = architecture == Architecture::Phi3;
    let rope_dims = header.get_usize(&key("rope.dimension_count"));
    // Phi-3's `rope.dimension_count` is the rotated part of a head (partial rotary), not
    // its width.
    let head_dim = header
        .get_usize(&key("attention.key_length"))
        .or(rope_dims.filter(|_| !phi3))
        .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
    let rotary_dim = rope_dims.filter(|&r| phi3 && r < head_dim);
    let embedding = header
        .content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::bad_file(path, "no 'token_embd.weight' tensor"))?;
    let vocab_size = match embedding.shape.dims() {
        [rows, _] => *rows,
        dims => {
            return Err(Error::bad_file(
                path,
                format!("'token_embd.weight' has shape {dims:?}, not (vocab, hidden)"),
            ))
        }
    };
    let gemma = architecture == Architecture::Gemma3;
    let num_layers = required("block_count")?;
    // llama.cpp's Gemma 3: every sixth layer global, the others a sliding window with a
    // RoPE base of 10,000 (not stored in the file).
    let sliding_window = header
        .get_usize(&key("attention.sliding_window"))
        .filter(|&w| w > 0);
    let sliding_layers: Vec<bool> = match (gemma, sliding_window) {
        (true, Some(_)) => (0..num_layers).map(|l| l % 6 < 5).collect(),
        _ => Vec::new(),
    };
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads: header
            .get_usize(&key("attention.head_count_kv"))
            .unwrap_or(num_heads),
        head_dim,
        rms_norm_eps: header
            .get_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: header.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        rope_freq_factors: None,
        max_position_embeddings: header.get_usize(&key("context_length")).unwrap_or(4096),
        tie_word_embeddings: !header.content.tensor_infos.contains_key("output.weight"),
        qkv_bias: header
            .content
            .tensor_infos
            .contains_key("blk.0.attn_q.bias"),
        o_bias: header
            .content
            .tensor_infos
            .contains_key("blk.0.attn_output.bias"),
        qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        embedding_multiplier: gemma.then(|| (hidden_size as f64).sqrt()),
        // llama.cpp's Gemma 3: 1/√head_dim, but 1/√(hidden/heads) for the 62-layer 27B
        // (its query_pre_attn_scalar, not stored in the file).
        query_scale: (gemma && num_layers == 62)
            .then(|| 1.0 / ((hidden_size / num_heads.max(1)) as f64).sqrt()),
        sandwich_norms: gemma,
        sliding_window,
        sliding_layers,
        // Newer converters store the sliding layers' base; older files leave llama.cpp's
        // default of 10,000.
        rope_local_theta: (gemma && sliding_window.is_some()).then(|| {
            header
                .get_f64(&key("rope.freq_base_swa"))
                .unwrap_or(10_000.0)
        }),
        rotary_dim,
        // Set with LongRoPE's short factors (`rope_factors_short`), when those are read.
        rope_attention_factor: None,
    };
    // Checked here too, before the weights are read and rearranged by these sizes.
    config
        .validate()
        .map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok(config)
}

/// The HF name of a GGUF tensor, or None for tensors verity does not map. Gemma's norms
/// are named for where they sit: `ffn_norm` is its pre-feedforward norm, and it has
/// post-attention and post-feedforward norms besides.
fn hf_name(gguf: &str, architecture: Architecture) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gemma = architecture == Architecture::Gemma3;
    let phi3 = architecture == Architecture::Phi3;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        // Phi-3's fused projections, split when the model is built.
        "attn_qkv" => "self_attn.qkv_proj",
        "ffn_up" if phi3 => "mlp.gate_up_proj",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{suffix}"))
}

/// Rows of a llama.cpp-permuted Q or K matrix back in HF order. llama.cpp's converter maps
/// HF row `h·d + j·d/2 + i` to GGUF row `h·d + 2i + j` (pairs for interleaved RoPE); rows are
/// whole quantized blocks, so this moves bytes and never touches values.
pub fn unpermute_rows(raw: &[u8], n_rows: usize, n_head: usize) -> Vec<u8> {
    move_rows(raw, n_rows, n_head, true)
}

/// The inverse of [`unpermute_rows`]: HF row order to llama.cpp's (for writing GGUF files,
/// which only tests do).
#[cfg(any(test, feature = "test-hooks"))]
pub fn permute_rows(raw: &[u8], n_rows: usize, n_head: usize) -> Vec<u8> {
    move_rows(raw, n_rows, n_head, false)
}

fn move_rows(raw: &[u8], n_rows: usize, n_head: usize, to_hf: bool) -> Vec<u8> {
    let row_bytes = raw.len() / n_rows;
    let head_dim = n_rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                let (to, from) = if to_hf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[to * row_bytes..(to + 1) * row_bytes]
                    .copy_from_slice(&raw[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    out
}

/// Reads every mapped tensor. Dense GGUF types (f32/f16/bf16) become dense tensors (norms,
/// some embeddings); block-quantized ones stay quantized.
pub fn read_weights(
    path: &Path,
    header: &GgufHeader,
    reader: &mut BufReader<File>,
    config: &mut ModelConfig,
    device: &Device,
) -> Result<WeightMap> {
    let file_size = reader
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    let mut weights = HashMap::new();
    let mut infos: Vec<_> = header.content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    for (name, info) in infos {
        let dims = info.shape.dims().to_vec();
        // The file states the shape: its product may overflow (and then wrap to a size that
        // passes every check below).
        let elems = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor '{name}' has an impossible shape {dims:?}"),
                )
            })?;
        let block = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(Error::bad_file(
                path,
                format!("tensor '{name}' has {elems} elements, not a multiple of the block size {block}"),
            ));
        }
        let bytes = (elems / block)
            .checked_mul(info.ggml_dtype.type_size())
            .ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor '{name}' has an impossible shape {dims:?}"),
                )
            })?;
        let start = header
            .content
            .tensor_data_offset
            .saturating_add(info.offset);
        if start.saturating_add(bytes as u64) > file_size {
            return Err(Error::bad_file(
                path,
                format!(
                    "truncated: tensor '{name}' needs bytes {start}..{} but the file has {file_size}",
                    start + bytes as u64
                ),
            ));
        }
        let mut raw = vec![0u8; bytes];
        reader
            .seek(SeekFrom::Start(start))
            .and_then(|_| reader.read_exact(&mut raw))
            .map_err(|e| Error::io(path, e))?;

        if name == "rope_freqs.weight" || name == "rope_factors_short.weight" {
            let q = ggml_file::qtensor_from_ggml(info.ggml_dtype, &raw, dims, &Device::Cpu)?;
            let factors = q
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            config.rope_freq_factors = Some(factors);
            if name == "rope_factors_short.weight" {
                // LongRoPE (Phi-3): the short factors hold up to the original context,
                // where llama.cpp switches to the long ones; verity stops there.
                let arch = config.architecture.name();
                let original = header
                    .get_usize(&format!("{arch}.rope.scaling.original_context_length"))
                    .ok_or_else(|| {
                        Error::bad_file(
                            path,
                            format!("LongRoPE factors without '{arch}.rope.scaling.original_context_length'"),
                        )
                    })?;
                config.max_position_embeddings = config.max_position_embeddings.min(original);
                config.rope_attention_factor =
                    header.get_f64(&format!("{arch}.rope.scaling.attn_factor"));
            }
            config
                .validate()
                .map_err(|e| Error::bad_file(path, e.to_string()))?;
            continue;
        }
        let Some(hf) = hf_name(name, config.architecture) else {
            continue;
        };
        if config.architecture == Architecture::Llama && dims.len() == 2 {
            let heads = if hf.ends_with("q_proj.weight") {
                Some(config.num_heads)
            } else if hf.ends_with("k_proj.weight") {
                Some(config.num_kv_heads)
            } else {
                None
            };
            if let Some(heads) = heads {
                // Whole heads of an even width, whole rows: else the rows cannot be moved
                // (and the shape check later would refuse the tensor anyway).
                let rows = dims[0];
                if rows == 0 || !rows.is_multiple_of(2 * heads) || !raw.len().is_multiple_of(rows) {
                    return Err(Error::weight(
                        name.as_str(),
                        format!(
                            "{rows} rows of {} bytes in all cannot hold {heads} heads",
                            raw.len()
                        ),
                    ));
                }
                raw = unpermute_rows(&raw, rows, heads);
            }
        }
        let qtensor = ggml_file::qtensor_from_ggml(info.ggml_dtype, &raw, dims, device)
            .map_err(|e| Error::weight(name.as_str(), format!("cannot load: {e}")))?;
        let weight = match info.ggml_dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Weight::Dense(qtensor.dequantize(device)?)
            }
            _ => Weight::Quantized(Arc::new(qtensor)),
        };
        weights.insert(hf, weight);
    }
    Ok(WeightMap::new(path.to_path_buf(), weights))
}
