//! Hyper-parameters of a Llama-family transformer, read from a HF `config.json` or a GGUF
//! header, checked for consistency, plus the RoPE frequency table they imply.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The architectures verity runs. Both are the Llama block (RMSNorm, RoPE, GQA attention,
/// SwiGLU MLP); Qwen2 adds q/k/v biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Architecture {
    /// Llama 2/3 and Mistral (no q/k/v biases unless `attention_bias` says so).
    Llama,
    /// Qwen2 / Qwen2.5: the Llama block with q/k/v biases.
    Qwen2,
}

impl Architecture {
    /// Parses a GGUF `general.architecture` or a HF `architectures`/`model_type` name
    /// (`"llama"`, `"LlamaForCausalLM"`, `"mistral"`, `"qwen2"`, …); anything else is
    /// [`Error::UnsupportedArchitecture`].
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "LlamaForCausalLM" | "MistralForCausalLM" | "mistral" => Ok(Self::Llama),
            "qwen2" | "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }
    /// The lowercase GGUF name (`"llama"`, `"qwen2"`), which [`Self::parse`] accepts back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
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
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (LlamaForCausalLM, Qwen2ForCausalLM, Mistral).
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
        let rope_scaling = match json.get("rope_scaling") {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(Error::Config(format!(
                        "rope_scaling type '{kind}' is not supported (only 'llama3')"
                    )));
                }
                Some(serde_json::from_value(s.clone()).map_err(|e| {
                    Error::Config(format!("config.json: bad llama3 rope_scaling: {e}"))
                })?)
            }
        };
        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => json
                .get("attention_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
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
            rope_theta: f64_field("rope_theta", 10_000.0),
            rope_scaling,
            rope_freq_factors: None,
            max_position_embeddings: usize_field("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            qkv_bias,
        };
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` a Hugging Face loader would read for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
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
        if self.architecture == Architecture::Llama {
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
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}
