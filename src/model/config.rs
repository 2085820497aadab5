//! Hyper-parameters of a Llama-family transformer, read from a HF `config.json` or a GGUF
//! header, checked for consistency, plus the RoPE frequency table they imply.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architectures verity runs. All are the Llama block (RMSNorm, RoPE, GQA attention,
/// SwiGLU MLP); Qwen2 adds q/k/v biases, Qwen3 an RMSNorm of each query and key head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Architecture {
    /// Llama 2/3 and Mistral (no q/k/v biases unless `attention_bias` says so).
    Llama,
    /// Qwen2 / Qwen2.5: the Llama block with q/k/v biases.
    Qwen2,
    /// Qwen3 (dense): per-head RMSNorm on q and k before RoPE, `head_dim` set on its own.
    Qwen3,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` or a HF `architectures`/`model_type` name
    /// (`"llama"`, `"LlamaForCausalLM"`, `"mistral"`, `"qwen2"`, …); anything else is
    /// [`Error::UnsupportedArchitecture`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" | "MistralForCausalLM" | "mistral" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            "qwen3" | "Qwen3ForCausalLM" => Ok(Self::Qwen3),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }
    /// The lowercase GGUF name (`"llama"`, `"qwen2"`), which [`Self::parse`] accepts back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// Llama-3 style RoPE scaling (`rope_type = "llama3"` in HF configs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Divisor applied to the low (long-wavelength) frequencies, e.g. 8.0.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are unscaled;
    /// between the two bounds the scaling is interpolated linearly.
    pub high_freq_factor: f64,
    /// Context length of the model before scaling, in tokens.
    pub original_max_position_embeddings: usize,
}

/// RoPE's base and scaling from a HF config in either form: transformers ≥ 5 writes
/// `rope_parameters` (`rope_theta`, `rope_type` and the scaling fields in one object), older
/// versions a top-level `rope_theta` and `rope_scaling`. When both forms are present they
/// must agree. Only the default RoPE and Llama-3 scaling are implemented; any other type is
/// an error naming it, never a silent fallback to the default.
fn rope_from_hf(json: &serde_json::Value) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let top_theta = json.get("rope_theta").and_then(|v| v.as_f64());
    let (theta, scaling) = match json.get("rope_parameters") {
        None | Some(serde_json::Value::Null) => (top_theta, json.get("rope_scaling")),
        Some(p) if p.is_object() => {
            if p.as_object()
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
                "llama3" => Some(serde_json::from_value(s.clone()).map_err(|e| {
                    Error::Config(format!("config.json: bad llama3 RoPE scaling: {e}"))
                })?),
                other => {
                    return Err(Error::Config(format!(
                        "config.json: RoPE type '{other}' is not implemented (default and \
                         llama3 are)"
                    )))
                }
            }
        }
    };
    Ok((theta.unwrap_or(10_000.0), scaling))
}

/// The attention window a HF config sets, if any: Mistral's `sliding_window` (null means
/// none), Qwen2's and Qwen3's when `use_sliding_window` is true or some `layer_types` entry
/// is `sliding_attention`.
fn sliding_window(json: &serde_json::Value, architecture: Architecture) -> Option<usize> {
    let window = json
        .get("sliding_window")
        .and_then(|v| v.as_u64())
        .map(|w| w as usize);
    match architecture {
        Architecture::Qwen2 | Architecture::Qwen3 => window.filter(|_| {
            let flag = json.get("use_sliding_window").and_then(|v| v.as_bool());
            let layers = json.get("layer_types").and_then(|v| v.as_array());
            flag.unwrap_or(false)
                || layers.is_some_and(|l| l.iter().any(|t| t == "sliding_attention"))
        }),
        Architecture::Llama => window,
    }
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
        if let Some(v) = json.get(field) {
            if !matches!(v.as_str(), Some("silu") | Some("swish")) {
                return refuse(field, v);
            }
        }
    }
    if let Some(v) = json.get("partial_rotary_factor").filter(|v| !v.is_null()) {
        if v.as_f64() != Some(1.0) {
            return refuse("partial_rotary_factor", v);
        }
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
        // Qwen3's q/k norm is part of its block.
        Architecture::Qwen3 => &[],
        _ => &["use_qk_norm", "qk_layernorm"],
    };
    for field in std::iter::once(&"mlp_bias").chain(qk_norm_fields) {
        if let Some(v) = json.get(field).filter(|v| v.as_bool() == Some(true)) {
            return refuse(field, v);
        }
    }
    Ok(())
}

/// Hyper-parameters of a Llama-family model: the shapes of every weight and the constants of
/// the forward pass. [`ModelConfig::validate`] checks them before any tensor is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which block variant the weights are for.
    pub architecture: Architecture,
    /// Rows of the embedding and output head (including added/special tokens).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_heads: usize,
    /// Key/value heads per layer (grouped-query attention); divides `num_heads`.
    pub num_kv_heads: usize,
    /// Width of one attention head; even, since RoPE rotates pairs.
    pub head_dim: usize,
    /// Epsilon added to the mean square in RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base θ of the inverse frequencies θ^(-2i/d).
    pub rope_theta: f64,
    /// Llama-3 frequency scaling, if the model uses it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Per-frequency divisors, as GGUF files of Llama-3 models store them (`rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Longest context the model was trained for, in tokens.
    pub max_position_embeddings: usize,
    /// The output head reuses the embedding matrix instead of having its own.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama's `attention_bias` puts one on
    /// q, k, v and o alike).
    #[serde(default)]
    pub o_bias: bool,
    /// An RMSNorm (weight of `head_dim`) over each query and key head before RoPE (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
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
        let (rope_theta, rope_scaling) = rope_from_hf(json)?;
        let attention_bias = json
            .get("attention_bias")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
        };
        let max_position_embeddings = usize_field("max_position_embeddings").unwrap_or(4096);
        let config = Self {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_field("rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            // Within its window, sliding-window attention is full attention: a context capped
            // at the window computes exactly what the model does.
            max_position_embeddings: match sliding_window(json, architecture) {
                Some(w) => max_position_embeddings.min(w),
                None => max_position_embeddings,
            },
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3,
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

    /// Rejects configurations no transformer can have, before any tensor is touched.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        // Tables are allocated from these sizes before any weight is read (the RoPE table
        // holds max_position_embeddings × head_dim numbers): a file that states an absurd
        // size must be refused, not abort the process. Each bound is far above any model
        // in use (1M-token contexts, 256k vocabularies, 16k-wide layers).
        let bounded = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 17),
            ("intermediate_size", self.intermediate_size, 1 << 19),
            ("num_layers", self.num_layers, 1 << 10),
            ("num_heads", self.num_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 11),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 21,
            ),
        ];
        for (name, value, bound) in bounded {
            if value > bound {
                return Err(Error::Config(format!(
                    "{name} = {value} is larger than any model has (at most {bound})"
                )));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::Config(format!(
                "num_heads ({}) is not a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            )));
        }
        if self.rope_theta.is_nan()
            || self.rope_theta <= 0.0
            || self.rms_norm_eps.is_nan()
            || self.rms_norm_eps <= 0.0
        {
            return Err(Error::Config(
                "rope_theta and rms_norm_eps must be positive".into(),
            ));
        }
        if self.qk_norm != (self.architecture == Architecture::Qwen3) {
            return Err(Error::Config(format!(
                "{}: q/k norm is part of the Qwen3 block and of no other",
                self.architecture.name()
            )));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return Err(Error::Config(format!(
                    "rope frequency factors have {} entries, expected head_dim/2 = {}",
                    f.len(),
                    self.head_dim / 2
                )));
            }
        }
        Ok(())
    }

    /// Query heads per key/value head (`num_heads / num_kv_heads`).
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// RoPE inverse frequencies θ^(-2i/d), with Llama-3 scaling or GGUF frequency factors.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let old_ctx = s.original_max_position_embeddings as f64;
            let low_wavelen = old_ctx / s.low_freq_factor;
            let high_wavelen = old_ctx / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (old_ctx / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, k) in inv.iter_mut().zip(factors) {
                *f /= *k as f64;
            }
        }
        inv.into_iter().map(|f| f as f32).collect()
    }

    /// Number of parameters of the base model (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 };
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h + qk_norm;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small Llama config.json with `extra` fields set on top.
    fn llama(extra: serde_json::Value) -> serde_json::Value {
        let mut j = json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 8192, "hidden_act": "silu",
        });
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        j
    }

    fn load(j: serde_json::Value) -> ModelConfig {
        ModelConfig::from_hf_json(&j).unwrap()
    }

    #[test]
    fn transformers_5_rope_parameters_read_like_the_older_fields() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let old = load(llama(
            json!({"rope_theta": 500000.0, "rope_scaling": scaling, "torch_dtype": "bfloat16"}),
        ));
        let mut params = scaling.clone();
        params["rope_theta"] = 500000.0.into();
        let new = load(llama(
            json!({"rope_parameters": params, "dtype": "bfloat16"}),
        ));
        assert_eq!(old, new);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(new.rope_scaling.as_ref().map(|s| s.factor), Some(8.0));
        // What reading only the old names gave: the default base, no scaling, other
        // frequencies from the first token on.
        let misread = load(llama(json!({})));
        assert_eq!(misread.rope_theta, 10_000.0);
        assert_ne!(new.rope_inv_freq(), misread.rope_inv_freq());
        // The default type in either form: no scaling, the base as given.
        let plain = load(llama(
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
        ));
        assert_eq!((plain.rope_theta, plain.rope_scaling.clone()), (1e6, None));
        let plain_old = load(llama(
            json!({"rope_theta": 1e6, "rope_scaling": {"rope_type": "default"}}),
        ));
        assert_eq!(plain, plain_old);
        // Both forms saying the same thing is fine.
        let both = load(llama(
            json!({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 1e6}}),
        ));
        assert_eq!(both, plain);
        let p = json!({"rope_type": "default", "rope_theta": 1e6});
        let both = load(llama(json!({"rope_parameters": p, "rope_scaling": p})));
        assert_eq!(both, plain);
    }

    #[test]
    fn unimplemented_fields_are_errors_naming_them() {
        for (extra, says) in [
            (
                json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}),
                "'yarn'",
            ),
            (
                json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
                "'dynamic'",
            ),
            (
                json!({"rope_parameters": {"rope_theta": 1e4}, "rope_theta": 5e5}),
                "rope_theta",
            ),
            (
                json!({"rope_parameters": {"rope_theta": 1e4}, "rope_scaling": {"rope_type": "llama3"}}),
                "rope_scaling",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                    "sliding_attention": {"rope_theta": 1e4}}}),
                "per layer type",
            ),
            (
                json!({"partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (
                json!({"final_logit_softcapping": 30.0}),
                "final_logit_softcapping",
            ),
            (
                json!({"attn_logit_softcapping": 50.0}),
                "attn_logit_softcapping",
            ),
            (json!({"hidden_act": "gelu_pytorch_tanh"}), "hidden_act"),
            (json!({"mlp_bias": true}), "mlp_bias"),
        ] {
            let e = ModelConfig::from_hf_json(&llama(extra.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
        // The same fields at values that change nothing load.
        for extra in [
            json!({"partial_rotary_factor": 1.0}),
            json!({"partial_rotary_factor": null}),
            json!({"final_logit_softcapping": null}),
            json!({"mlp_bias": false}),
            json!({"hidden_act": "silu"}),
        ] {
            assert_eq!(load(llama(extra)), load(llama(json!({}))));
        }
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_is_allocated() {
        // A mutated GGUF stated a context of ~2^35 tokens: its RoPE table would have been
        // a 438 GB allocation, which aborts the process.
        for (field, value) in [
            ("max_position_embeddings", 1u64 << 35),
            ("vocab_size", 1 << 40),
            ("num_hidden_layers", 1 << 20),
        ] {
            let err = ModelConfig::from_hf_json(&llama(json!({ field: value })))
                .unwrap_err()
                .to_string();
            assert!(err.contains("larger than any model has"), "{field}: {err}");
        }
        assert!(
            ModelConfig::from_hf_json(&llama(json!({"max_position_embeddings": 1 << 20}))).is_ok()
        );
    }

    #[test]
    fn a_sliding_window_caps_the_context_at_the_window() {
        // Within its window, sliding-window attention is full attention: capping the
        // context there computes exactly what the model computes.
        let mistral = |w: serde_json::Value| {
            load(llama(
                json!({"architectures": ["MistralForCausalLM"], "sliding_window": w}),
            ))
        };
        assert_eq!(mistral(json!(4096)).max_position_embeddings, 4096);
        assert_eq!(mistral(json!(null)).max_position_embeddings, 8192);
        assert_eq!(mistral(json!(1 << 20)).max_position_embeddings, 8192);
        let qwen = |on: bool| {
            load(llama(json!({"architectures": ["Qwen2ForCausalLM"],
                "sliding_window": 4096, "use_sliding_window": on})))
        };
        assert_eq!(qwen(false).max_position_embeddings, 8192);
        assert_eq!(qwen(true).max_position_embeddings, 4096);
    }

    #[test]
    fn llama_attention_bias_puts_a_bias_on_all_four_projections() {
        let c = load(llama(json!({"attention_bias": true})));
        assert!(c.qkv_bias && c.o_bias);
        let c = load(llama(json!({})));
        assert!(!c.qkv_bias && !c.o_bias);
        let c = load(llama(json!({"architectures": ["Qwen2ForCausalLM"]})));
        assert!(c.qkv_bias && !c.o_bias);
    }
}
