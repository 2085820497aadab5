//! Reading a Hugging Face `config.json` into a [`ModelConfig`] in either form transformers
//! writes (RoPE as `rope_parameters` or `rope_theta` + `rope_scaling`, per layer type or not),
//! refusing every field that would change the computation in a way verity does not
//! implement; and the `config.json` verity's tests write back.

use super::{Activation, Architecture, Llama3RopeScaling, ModelConfig};
use crate::error::{Error, Result};

/// A RoPE scaling a HF config asks for, of the kinds verity implements.
#[derive(Debug, Clone, PartialEq)]
enum HfScaling {
    Llama3(Llama3RopeScaling),
    /// LongRoPE (Phi-3's `longrope`, formerly `su`) with only its short factors: exact up to
    /// `original_max_position_embeddings`, where transformers and llama.cpp switch to the
    /// long factors, so the context is capped there.
    LongRopeShort {
        /// Divisors of the inverse frequencies, one per rotated pair.
        short_factor: Vec<f64>,
        /// Multiplies cos and sin.
        attention_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// RoPE's base and scaling from a HF config in either form: transformers ≥ 5 writes
/// `rope_parameters` (`rope_theta`, `rope_type` and the scaling fields in one object), older
/// versions a top-level `rope_theta` and `rope_scaling`. When both forms are present they
/// must agree. The default RoPE, Llama-3 scaling and LongRoPE's short factors are
/// implemented; any other type is an error naming it, never a silent fallback.
fn rope_from_hf(json: &serde_json::Value) -> Result<(f64, Option<HfScaling>)> {
    rope_from_hf_with(json, true)
}

/// LongRoPE's short factors and attention factor, as transformers computes them
/// (`_compute_longrope_parameters`): the factor defaults to max / original context and the
/// attention factor to √(1 + ln factor / ln original).
fn long_rope(s: &serde_json::Value, top: &serde_json::Value) -> Result<HfScaling> {
    let bad = |what: &str| Error::Config(format!("config.json: LongRoPE scaling: {what}"));
    let short_factor: Vec<f64> = s
        .get("short_factor")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("short_factor must be a list of numbers"))?
        .iter()
        .map(|v| v.as_f64().filter(|f| f.is_finite() && *f > 0.0))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("short_factor must hold positive numbers"))?;
    let original =
        s.get("original_max_position_embeddings")
            .or_else(|| top.get("original_max_position_embeddings"))
            .and_then(|v| v.as_u64())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("original_max_position_embeddings is missing"))? as usize;
    let max = top
        .get("max_position_embeddings")
        .and_then(|v| v.as_u64())
        .unwrap_or(original as u64) as f64;
    let factor = match s.get("factor").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| bad("factor must be a positive number"))?,
        None => max / original as f64,
    };
    let attention_factor = match s.get("attention_factor").filter(|v| !v.is_null()) {
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| bad("attention_factor must be a positive number"))?,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(HfScaling::LongRopeShort {
        short_factor,
        attention_factor,
        original_max_position_embeddings: original,
    })
}

/// The share of each head RoPE rotates: `partial_rotary_factor` at the top level or in
/// `rope_parameters` (transformers 5 moves it there); 1 when neither sets it.
fn partial_rotary_factor(json: &serde_json::Value) -> Result<f64> {
    let read = |v: Option<&serde_json::Value>| -> Result<Option<f64>> {
        match v.filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| *f > 0.0 && *f <= 1.0)
                .map(Some)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "config.json: partial_rotary_factor = {v} must be in (0, 1]"
                    ))
                }),
        }
    };
    let top = read(json.get("partial_rotary_factor"))?;
    let params = json.get("rope_parameters").filter(|p| p.is_object());
    let mut nested = read(params.and_then(|p| p.get("partial_rotary_factor")))?;
    // Per layer type (Gemma 3): every type must agree.
    if let Some(per_type) = params.and_then(|p| p.as_object()) {
        for p in per_type.values().filter(|p| p.is_object()) {
            let f = read(p.get("partial_rotary_factor"))?;
            if f.is_some() && nested.is_some() && f != nested {
                return Err(Error::Config(
                    "config.json: partial_rotary_factor differs between layer types".into(),
                ));
            }
            nested = nested.or(f);
        }
    }
    match (top, nested) {
        (Some(a), Some(b)) if a != b => Err(Error::Config(format!(
            "config.json: partial_rotary_factor = {a} but rope_parameters says {b}"
        ))),
        (a, b) => Ok(a.or(b).unwrap_or(1.0)),
    }
}

/// The RoPE of each layer type: (global base, its scaling, the sliding layers' base when it
/// differs). transformers 5 writes Gemma 3's as `rope_parameters` per layer type
/// (`full_attention`, `sliding_attention`); older configs put the local base in
/// `rope_local_base_freq`. Sliding layers get no scaling (neither form gives them any).
type LayerRope = (f64, Option<HfScaling>, Option<f64>);

fn rope_by_layer_type(json: &serde_json::Value) -> Result<LayerRope> {
    let per_type = json
        .get("rope_parameters")
        .and_then(|p| p.as_object())
        .filter(|m| m.values().any(serde_json::Value::is_object));
    let Some(per_type) = per_type else {
        let (theta, scaling) = rope_from_hf(json)?;
        let local = json.get("rope_local_base_freq").and_then(|v| v.as_f64());
        return Ok((theta, scaling, local));
    };
    if let Some(other) = per_type
        .keys()
        .find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention"))
    {
        return Err(Error::Config(format!(
            "config.json: rope_parameters for layer type '{other}' (full_attention and \
             sliding_attention are known)"
        )));
    }
    let one = |kind: &str| -> Result<Option<(f64, Option<HfScaling>)>> {
        let Some(p) = per_type.get(kind) else {
            return Ok(None);
        };
        let wrapped = serde_json::json!({ "rope_parameters": p });
        rope_from_hf_with(&wrapped, false).map(Some)
    };
    let (theta, scaling) = one("full_attention")?.unwrap_or((10_000.0, None));
    let local = match one("sliding_attention")? {
        Some((_, Some(_))) => {
            return Err(Error::Config(
                "config.json: RoPE scaling on sliding-window layers is not implemented".into(),
            ))
        }
        Some((t, None)) => Some(t),
        None => None,
    };
    Ok((theta, scaling, local))
}

fn rope_from_hf_with(
    json: &serde_json::Value,
    refuse_per_type: bool,
) -> Result<(f64, Option<HfScaling>)> {
    let top_theta = json.get("rope_theta").and_then(|v| v.as_f64());
    let (theta, scaling) = match json.get("rope_parameters") {
        None | Some(serde_json::Value::Null) => (top_theta, json.get("rope_scaling")),
        Some(p) if p.is_object() => {
            if refuse_per_type
                && p.as_object()
                    .is_some_and(|m| m.values().any(serde_json::Value::is_object))
            {
                return Err(Error::Config(
                    "config.json: rope_parameters per layer type (local/global RoPE) is not \
                     implemented"
                        .into(),
                ));
            }
            let theta = p.get("rope_theta").and_then(|v| v.as_f64());
            if let (Some(a), Some(b)) = (theta, top_theta) {
                if a != b {
                    return Err(Error::Config(format!(
                        "config.json: rope_parameters.rope_theta = {a} but rope_theta = {b}"
                    )));
                }
            }
            if json
                .get("rope_scaling")
                .is_some_and(|s| !s.is_null() && s != p)
            {
                return Err(Error::Config(
                    "config.json has both rope_parameters and rope_scaling: which one holds \
                     the scaling is ambiguous"
                        .into(),
                ));
            }
            (theta.or(top_theta), Some(p))
        }
        Some(other) => {
            return Err(Error::Config(format!(
                "config.json: rope_parameters must be an object, got {other}"
            )))
        }
    };
    let scaling = match scaling {
        None | Some(serde_json::Value::Null) => None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            match kind {
                "default" => None,
                "longrope" | "su" => Some(long_rope(s, json)?),
                "llama3" => Some(HfScaling::Llama3(
                    serde_json::from_value(s.clone()).map_err(|e| {
                        Error::Config(format!("config.json: bad llama3 RoPE scaling: {e}"))
                    })?,
                )),
                other => {
                    return Err(Error::Config(format!(
                        "config.json: RoPE type '{other}' is not implemented (default, \
                         llama3 and longrope are)"
                    )))
                }
            }
        }
    };
    Ok((theta.unwrap_or(10_000.0), scaling))
}

/// The attention window a HF config sets, if any, and which layers it applies to (empty:
/// all). Mistral's `sliding_window` (null means none) covers every layer; Qwen2's and
/// Qwen3's only when `use_sliding_window` is true or `layer_types` names sliding layers;
/// Gemma 3's the layers `layer_types` (or the older `sliding_window_pattern`) says.
fn sliding_window(
    json: &serde_json::Value,
    architecture: Architecture,
    num_layers: usize,
) -> Result<(Option<usize>, Vec<bool>)> {
    let window = json
        .get("sliding_window")
        .and_then(|v| v.as_u64())
        .map(|w| w as usize);
    let Some(window) = window else {
        return Ok((None, Vec::new()));
    };
    let layer_types = match json.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => {
            let sliding = types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::Config(format!(
                        "config.json: layer type {t} is not implemented (full_attention and \
                         sliding_attention are)"
                    ))),
                })
                .collect::<Result<Vec<bool>>>()?;
            if sliding.len() != num_layers {
                return Err(Error::Config(format!(
                    "config.json: layer_types lists {} layers, num_hidden_layers is {num_layers}",
                    sliding.len()
                )));
            }
            Some(sliding)
        }
        None => None,
    };
    let sliding = match architecture {
        Architecture::Llama | Architecture::Phi3 => layer_types.unwrap_or_default(),
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let flag = json.get("use_sliding_window").and_then(|v| v.as_bool());
            match layer_types {
                Some(types) if types.iter().any(|&s| s) => types,
                _ if flag == Some(true) => Vec::new(),
                _ => return Ok((None, Vec::new())),
            }
        }
        Architecture::Gemma3 => match layer_types {
            Some(types) => types,
            None => {
                let pattern = json
                    .get("sliding_window_pattern")
                    .or_else(|| json.get("_sliding_window_pattern"))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(6) as usize;
                (0..num_layers)
                    .map(|i| pattern == 0 || !(i + 1).is_multiple_of(pattern))
                    .collect()
            }
        },
    };
    // No layer slides: no window.
    if sliding.iter().all(|&s| !s) && !sliding.is_empty() {
        return Ok((None, Vec::new()));
    }
    Ok((Some(window), sliding))
}

/// Config fields that change the computation in ways verity does not implement: a load
/// error naming the field, rather than a model that quietly computes something else.
fn refuse_unimplemented(json: &serde_json::Value, architecture: Architecture) -> Result<()> {
    let refuse = |field: &str, value: &serde_json::Value| {
        Err(Error::Config(format!(
            "config.json: {field} = {value} is not implemented by verity's {} block",
            architecture.name()
        )))
    };
    for field in ["hidden_act", "hidden_activation"] {
        if let Some(v) = json.get(field).filter(|v| !v.is_null()) {
            if v.as_str().and_then(Activation::from_hf).is_none() {
                return refuse(field, v);
            }
        }
    }
    if let Some(v) = json
        .get("use_bidirectional_attention")
        .filter(|v| v.as_bool() == Some(true))
    {
        return refuse("use_bidirectional_attention", v);
    }
    for field in [
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "logit_scale",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
    ] {
        if let Some(v) = json.get(field).filter(|v| !v.is_null()) {
            return refuse(field, v);
        }
    }
    let qk_norm_fields: &[&str] = match architecture {
        // Qwen3's and Gemma 3's q/k norms are part of their blocks.
        Architecture::Qwen3 | Architecture::Gemma3 => &[],
        _ => &["use_qk_norm", "qk_layernorm"],
    };
    for field in std::iter::once(&"mlp_bias").chain(qk_norm_fields) {
        if let Some(v) = json.get(field).filter(|v| v.as_bool() == Some(true)) {
            return refuse(field, v);
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (LlamaForCausalLM, Qwen2ForCausalLM,
    /// Qwen3ForCausalLM, Mistral).
    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self> {
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| json.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                Error::Config("config.json has neither 'architectures' nor 'model_type'".into())
            })?;
        let architecture = Architecture::parse(arch_name)?;
        let usize_field = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::Config(format!("config.json: missing or non-integer '{key}'"))
                })
        };
        let f64_field = |key: &str, default: f64| -> f64 {
            json.get(key).and_then(|v| v.as_f64()).unwrap_or(default)
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = usize_field("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match json.get("head_dim").and_then(|v| v.as_u64()) {
            Some(d) => d as usize,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        refuse_unimplemented(json, architecture)?;
        let (rope_theta, rope_scaling, rope_local_theta) = match architecture {
            Architecture::Gemma3 => rope_by_layer_type(json)?,
            _ => {
                let (theta, scaling) = rope_from_hf(json)?;
                (theta, scaling, None)
            }
        };
        let num_layers = usize_field("num_hidden_layers")?;
        let (sliding_window, sliding_layers) = sliding_window(json, architecture, num_layers)?;
        let activation = ["hidden_activation", "hidden_act"]
            .iter()
            .find_map(|f| json.get(*f).and_then(|v| v.as_str()))
            .and_then(Activation::from_hf)
            .unwrap_or(match architecture {
                Architecture::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            });
        let gemma = architecture == Architecture::Gemma3;
        let query_scale = match json.get("query_pre_attn_scalar").and_then(|v| v.as_f64()) {
            Some(q) if gemma && q > 0.0 => Some(q.powf(-0.5)),
            Some(q) if gemma => {
                return Err(Error::Config(format!(
                    "config.json: query_pre_attn_scalar must be positive, got {q}"
                )))
            }
            _ => None,
        };
        let attention_bias = json
            .get("attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            // Phi-3's fused projection has no bias.
            Architecture::Phi3 => (false, false),
            Architecture::Llama | Architecture::Qwen3 | Architecture::Gemma3 => {
                (attention_bias, attention_bias)
            }
        };
        let mut max_position_embeddings = usize_field("max_position_embeddings").unwrap_or(4096);
        let (rope_scaling, rope_freq_factors, rope_attention_factor) = match rope_scaling {
            None => (None, None, None),
            Some(HfScaling::Llama3(s)) => (Some(s), None, None),
            Some(HfScaling::LongRopeShort {
                short_factor,
                attention_factor,
                original_max_position_embeddings,
            }) => {
                // Past the original context the long factors take over: not implemented.
                max_position_embeddings =
                    max_position_embeddings.min(original_max_position_embeddings);
                let factors = short_factor.iter().map(|&f| f as f32).collect();
                (None, Some(factors), Some(attention_factor))
            }
        };
        let rotary_factor = partial_rotary_factor(json)?;
        // transformers: int(head_dim * partial_rotary_factor).
        let rotary_dim = ((head_dim as f64) * rotary_factor) as usize;
        let rotary_dim = (rotary_dim < head_dim).then_some(rotary_dim);
        let config = Self {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_field("rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors,
            max_position_embeddings,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(gemma),
            qkv_bias,
            o_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            activation,
            embedding_multiplier: gemma.then(|| (hidden_size as f64).sqrt()),
            query_scale,
            sandwich_norms: gemma,
            sliding_window,
            sliding_layers,
            rope_local_theta: rope_local_theta.filter(|&t| t != rope_theta),
            rotary_dim,
            rope_attention_factor,
        };
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` a Hugging Face loader would read for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
            Architecture::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
            Architecture::Phi3 => ("Phi3ForCausalLM", "phi3"),
        };
        let mut json = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if matches!(self.architecture, Architecture::Llama | Architecture::Qwen3) {
            json["attention_bias"] = self.qkv_bias.into();
        }
        if let Some(w) = self.sliding_window {
            json["sliding_window"] = w.into();
            if !self.sliding_layers.is_empty() {
                let types: Vec<&str> = self
                    .sliding_layers
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                json["layer_types"] = types.into();
            } else if matches!(self.architecture, Architecture::Qwen2 | Architecture::Qwen3) {
                json["use_sliding_window"] = true.into();
            }
        }
        if let Some(s) = &self.rope_scaling {
            json["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        json
    }
}
