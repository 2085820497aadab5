//! Hyper-parameters of a Llama-family transformer, read from a HF `config.json` or a GGUF
//! header, checked for consistency, plus the RoPE frequency table they imply.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod hf;

/// The architectures verity runs. All are the Llama block (RMSNorm, RoPE, GQA attention,
/// gated MLP); Qwen2 adds q/k/v biases, Qwen3 an RMSNorm of each query and key head, Gemma 3
/// those norms plus norms after attention and MLP, a GELU MLP, a scaled embedding and
/// sliding-window layers with their own RoPE base; Phi-3 fuses q/k/v and gate/up into one
/// matrix each (split at load) and may rotate only part of each head.
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
    /// Gemma 3 (text): see [`ModelConfig`]'s `activation`, `embedding_multiplier`,
    /// `query_scale`, `sandwich_norms`, `sliding_window` and `rope_local_theta`.
    Gemma3,
    /// Phi-3 / Phi-4-mini: fused `qkv_proj` and `gate_up_proj`, split into the Llama
    /// block's projections at load; LongRoPE's short factors; partial rotary embeddings.
    Phi3,
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
            "gemma3" | "gemma3_text" | "Gemma3ForCausalLM" => Ok(Self::Gemma3),
            "phi3" | "Phi3ForCausalLM" => Ok(Self::Phi3),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }
    /// The lowercase GGUF name (`"llama"`, `"qwen2"`), which [`Self::parse`] accepts back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Phi3 => "phi3",
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

/// The gate's nonlinearity in the MLP: down(act(gate(x)) · up(x)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen.
    #[default]
    Silu,
    /// GELU, tanh approximation (GeGLU): Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
}

impl Activation {
    /// A HF `hidden_act` / `hidden_activation` name, or None for one verity lacks.
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }
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
    /// An RMSNorm (weight of `head_dim`) over each query and key head before RoPE (Qwen3,
    /// Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// The MLP's gate nonlinearity.
    #[serde(default)]
    pub activation: Activation,
    /// Embedding rows are multiplied by this (Gemma: √hidden_size).
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    /// Attention logits are q·k times this; `None`: 1/√head_dim (Gemma sets
    /// `query_pre_attn_scalar`^-½).
    #[serde(default)]
    pub query_scale: Option<f64>,
    /// RMSNorms on the attention output and the MLP output before each is added to the
    /// residual (Gemma's post-attention and post-feedforward norms).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// Sliding-window attention: a query sees the `sliding_window` most recent positions
    /// (itself included), in the layers `sliding_layers` marks (all when it is empty).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Which layers slide, when not all do (Gemma 3: five local layers to one global).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// The RoPE base of the sliding layers when it differs from `rope_theta` (Gemma 3).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// RoPE rotates only the first `rotary_dim` dimensions of each head (even, less than
    /// `head_dim`), the rest pass through: `partial_rotary_factor` (Phi-4-mini: 0.75).
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor).
    #[serde(default)]
    pub rope_attention_factor: Option<f64>,
}

impl ModelConfig {
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
        let has_qk_norm = matches!(
            self.architecture,
            Architecture::Qwen3 | Architecture::Gemma3
        );
        if self.qk_norm != has_qk_norm {
            return Err(Error::Config(format!(
                "{}: q/k norm is part of the Qwen3 and Gemma 3 blocks and of no other",
                self.architecture.name()
            )));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::Config("sliding_window must be positive".into()));
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.num_layers {
            return Err(Error::Config(format!(
                "{} sliding-layer flags for {} layers",
                self.sliding_layers.len(),
                self.num_layers
            )));
        }
        if let Some(r) = self.rotary_dim {
            if r == 0 || !r.is_multiple_of(2) || r >= self.head_dim {
                return Err(Error::Config(format!(
                    "rotary_dim ({r}) must be even, positive and less than head_dim ({}): \
                     check partial_rotary_factor",
                    self.head_dim
                )));
            }
        }
        for (name, value) in [
            ("embedding_multiplier", self.embedding_multiplier),
            ("query_scale", self.query_scale),
            ("rope_local_theta", self.rope_local_theta),
            ("rope_attention_factor", self.rope_attention_factor),
        ] {
            if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(Error::Config(format!("{name} must be finite and positive")));
            }
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.rope_dims() / 2 {
                return Err(Error::Config(format!(
                    "rope frequency factors have {} entries, expected one per rotated pair ({})",
                    f.len(),
                    self.rope_dims() / 2
                )));
            }
            if f.iter().any(|k| !(k.is_finite() && *k > 0.0)) {
                return Err(Error::Config(
                    "rope frequency factors must be finite and positive".into(),
                ));
            }
        }
        Ok(())
    }

    /// Query heads per key/value head (`num_heads / num_kv_heads`).
    pub fn kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// The attention window of `layer`, if it slides.
    pub fn window(&self, layer: usize) -> Option<usize> {
        let slides = self.sliding_layers.get(layer).copied().unwrap_or(true);
        self.sliding_window.filter(|_| slides)
    }

    /// The attention logit scale: `query_scale`, else 1/√head_dim.
    pub fn attention_scale(&self) -> f64 {
        self.query_scale
            .unwrap_or(1.0 / (self.head_dim as f64).sqrt())
    }

    /// The dimensions of each head RoPE rotates: `rotary_dim`, else all of `head_dim`.
    pub fn rope_dims(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim)
    }

    /// RoPE inverse frequencies of the sliding layers when their base differs
    /// (`rope_local_theta`, no scaling), else `None`: they use [`Self::rope_inv_freq`].
    pub fn rope_local_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.rope_local_theta?;
        let d = self.rope_dims();
        Some(
            (0..d / 2)
                .map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32)
                .collect(),
        )
    }

    /// RoPE inverse frequencies θ^(-2i/d) over the rotated dimensions d, with Llama-3
    /// scaling or per-frequency divisors (GGUF `rope_freqs`, LongRoPE's short factors).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.rope_dims();
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
        let sandwich = if self.sandwich_norms { 2 * h } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h + qk_norm + sandwich;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An architecture verity lacks is refused naming it and every one it runs.
    #[test]
    fn unknown_architectures_name_the_supported_ones() {
        let e = Architecture::parse("GPTNeoXForCausalLM")
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPTNeoXForCausalLM"), "{e}");
        for known in ["llama", "qwen2", "qwen3", "gemma3", "phi3"] {
            assert!(e.contains(known), "{e}");
            assert_eq!(Architecture::parse(known).unwrap().name(), known);
        }
    }

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
                json!({"partial_rotary_factor": 1.5}),
                "partial_rotary_factor",
            ),
            (
                json!({"partial_rotary_factor": 0.5,
                    "rope_parameters": {"partial_rotary_factor": 0.75}}),
                "partial_rotary_factor",
            ),
            (
                json!({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0]}}),
                "original_max_position_embeddings",
            ),
            (
                json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
                "'yarn' is not implemented",
            ),
            (
                json!({"final_logit_softcapping": 30.0}),
                "final_logit_softcapping",
            ),
            (
                json!({"attn_logit_softcapping": 50.0}),
                "attn_logit_softcapping",
            ),
            (json!({"hidden_act": "relu2"}), "hidden_act"),
            (json!({"mlp_bias": true}), "mlp_bias"),
        ] {
            let e = ModelConfig::from_hf_json(&llama(extra.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
        // Partial rotary from either place; LongRoPE's short factors, its attention factor
        // √(1 + ln(256/64) / ln 64) = √(4/3), and the context capped at the original 64.
        let c = load(llama(
            json!({"rope_parameters": {"partial_rotary_factor": 0.5}}),
        ));
        assert_eq!((c.rotary_dim, c.rope_dims()), (Some(2), 2));
        assert_eq!(c.rope_inv_freq(), vec![1.0]);
        let c = load(llama(
            json!({"max_position_embeddings": 256, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [2.0, 4.0],
            "long_factor": [9.0, 9.0], "original_max_position_embeddings": 64}}),
        ));
        assert_eq!(c.max_position_embeddings, 64);
        let want = (4.0f64 / 3.0).sqrt();
        assert!((c.rope_attention_factor.unwrap() - want).abs() < 1e-12);
        assert_eq!(c.rope_inv_freq(), vec![0.5, 0.01 / 4.0]);
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
    fn sliding_windows_apply_to_the_layers_the_config_names() {
        let mistral = |w: serde_json::Value| {
            load(llama(
                json!({"architectures": ["MistralForCausalLM"], "sliding_window": w}),
            ))
        };
        let m = mistral(json!(4096));
        assert_eq!(
            (m.sliding_window, m.max_position_embeddings),
            (Some(4096), 8192)
        );
        assert_eq!((m.window(0), m.window(1)), (Some(4096), Some(4096)));
        assert_eq!(mistral(json!(null)).sliding_window, None);
        let qwen = |on: bool| {
            load(llama(json!({"architectures": ["Qwen2ForCausalLM"],
                "sliding_window": 4096, "use_sliding_window": on})))
        };
        assert_eq!(qwen(false).window(0), None);
        assert_eq!(qwen(true).window(1), Some(4096));
        // Gemma 3: the layers layer_types names, or every sixth layer global without it.
        let gemma = |extra: serde_json::Value| {
            let mut j = llama(
                json!({"architectures": ["Gemma3ForCausalLM"], "sliding_window": 512,
                "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16}),
            );
            for (k, v) in extra.as_object().unwrap() {
                j[k] = v.clone();
            }
            load(j)
        };
        let g = gemma(json!({"layer_types": ["sliding_attention", "full_attention"]}));
        assert_eq!((g.window(0), g.window(1)), (Some(512), None));
        let g = gemma(json!({"num_hidden_layers": 7}));
        let slides: Vec<bool> = (0..7).map(|l| g.window(l).is_some()).collect();
        assert_eq!(slides, [true, true, true, true, true, false, true]);
        assert_eq!(g.activation, Activation::GeluTanh);
        assert!((g.attention_scale() - 0.25).abs() < 1e-15);
        assert_eq!(g.embedding_multiplier, Some(4.0));
        assert!(g.tie_word_embeddings && g.sandwich_norms && g.qk_norm);
        // transformers 5's per-layer-type RoPE.
        let g = gemma(json!({"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}));
        assert_eq!((g.rope_theta, g.rope_local_theta), (1e6, Some(1e4)));
        let old = gemma(json!({"rope_theta": 1e6, "rope_local_base_freq": 1e4}));
        assert_eq!(old, g);
        for (extra, says) in [
            (json!({"layer_types": ["sliding_attention"]}), "layer_types"),
            (
                json!({"layer_types": ["chunked_attention", "full_attention"]}),
                "chunked_attention",
            ),
            (
                json!({"use_bidirectional_attention": true}),
                "use_bidirectional_attention",
            ),
            (
                json!({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}}),
                "'linear'",
            ),
            (
                json!({"rope_parameters": {"global": {"rope_theta": 1e4}}}),
                "'global'",
            ),
        ] {
            let mut j =
                llama(json!({"architectures": ["Gemma3ForCausalLM"], "sliding_window": 512}));
            for (k, v) in extra.as_object().unwrap() {
                j[k] = v.clone();
            }
            let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
            assert!(e.contains(says), "{extra}: {e}");
        }
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
