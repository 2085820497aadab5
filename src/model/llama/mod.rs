//! The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3, Gemma 3,
//! Phi-3/4-mini): one set of weights, two entry points.
//!
//! - [`Transformer::forward_step`] decodes: a batch of sequences, each at its own position,
//!   each with its own KV cache and LoRA adapter; fused kernels, quantized matmuls.
//! - [`Transformer::forward_train`] scores whole sequences and keeps the autograd graph:
//!   dense weights (dequantized once, on first use) and differentiable ops only.
//!
//! Both read the same LoRA `Var`s, so the policy that sampled a rollout is the policy that
//! is trained on it, and a training step is visible to the next decode step.

mod cpu_attention;
mod decode_attention;
mod linear;
mod step;
mod train;

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use self::linear::Linear;
pub use self::step::StepInput;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, ModelConfig};
use crate::model::kv::{KvGeometry, SeqKv};
use crate::model::lora::LoraTarget;
use crate::model::weights::{Weight, WeightMap};

/// How weights are held for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightFormat {
    /// Keep GGUF blocks quantized; matmuls run on them (fastest decode on CPU).
    Quantized,
    /// Dense tensors in the activation dtype.
    Dense,
}

struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3, Gemma 3: RMSNorm weights (head_dim) applied to every query / key head before
    /// RoPE.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Gemma: RMSNorm of the attention output before the residual add.
    attn_out_norm: Option<Tensor>,
    /// The norm before the MLP.
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma: RMSNorm of the MLP output before the residual add.
    mlp_out_norm: Option<Tensor>,
    /// The attention window of this layer, if it slides.
    window: Option<usize>,
    /// Index into the transformer's RoPE tables (0: global, 1: the sliding layers' base).
    rope: usize,
}

impl Block {
    fn linear(&self, target: LoraTarget) -> &Linear {
        match target {
            LoraTarget::Q => &self.q,
            LoraTarget::K => &self.k,
            LoraTarget::V => &self.v,
            LoraTarget::O => &self.o,
            LoraTarget::Gate => &self.gate,
            LoraTarget::Up => &self.up,
            LoraTarget::Down => &self.down,
        }
    }
}

/// A Llama-family transformer ready to run: batched decode steps over per-sequence KV
/// caches ([`Self::forward_step`]) and differentiable full-sequence forwards for training.
pub struct Transformer {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    embed: Weight,
    embed_dense: OnceLock<Tensor>,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    /// cos and sin (positions, rotated dims / 2) per RoPE base: [global, sliding layers'].
    ropes: Vec<(Tensor, Tensor)>,
    kv_geometry: Arc<KvGeometry>,
    dense_rows: Option<usize>,
}

impl Transformer {
    /// Builds the model from named weights, checking every shape against the config.
    pub(crate) fn new(
        config: ModelConfig,
        weights: &mut WeightMap,
        format: WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, v, hd) = (c.hidden_size, c.vocab_size, c.head_dim);
        let q_out = c.num_heads * hd;
        let kv_out = c.num_kv_heads * hd;
        if c.architecture == Architecture::Phi3 {
            // Phi-3 stacks q, k, v (and gate, up) in one matrix: the same rows as separate
            // projections, so the block (and LoRA on each part) is the Llama block's.
            for l in 0..c.num_layers {
                let p = format!("model.layers.{l}");
                weights.split_rows(
                    &format!("{p}.self_attn.qkv_proj.weight"),
                    &[
                        (format!("{p}.self_attn.q_proj.weight"), q_out),
                        (format!("{p}.self_attn.k_proj.weight"), kv_out),
                        (format!("{p}.self_attn.v_proj.weight"), kv_out),
                    ],
                )?;
                weights.split_rows(
                    &format!("{p}.mlp.gate_up_proj.weight"),
                    &[
                        (format!("{p}.mlp.gate_proj.weight"), c.intermediate_size),
                        (format!("{p}.mlp.up_proj.weight"), c.intermediate_size),
                    ],
                )?;
            }
        }
        let embed = weights.take("model.embed_tokens.weight", &[v, h])?;
        let embed = match (embed, format) {
            (Weight::Quantized(q), WeightFormat::Quantized) => Weight::Quantized(q),
            (w, _) => Weight::Dense(w.to_dense(dtype, device)?),
        };
        let norm_vec = |weights: &mut WeightMap, name: &str| -> Result<Tensor> {
            weights.take(name, &[h])?.to_dense(dtype, device)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let w = weights.take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let b = if bias {
                    Some(
                        weights
                            .take(&format!("{p}.{name}.bias"), &[out])?
                            .to_dense(dtype, device)?,
                    )
                } else {
                    weights
                        .take_optional(&format!("{p}.{name}.bias"), &[out])?
                        .map(|b| b.to_dense(dtype, device))
                        .transpose()?
                };
                Linear::new(w, b, format, dtype)
            };
            let q = linear("self_attn.q_proj", q_out, h, c.qkv_bias)?;
            let k = linear("self_attn.k_proj", kv_out, h, c.qkv_bias)?;
            let vv = linear("self_attn.v_proj", kv_out, h, c.qkv_bias)?;
            let o = linear("self_attn.o_proj", h, q_out, c.o_bias)?;
            let gate = linear("mlp.gate_proj", c.intermediate_size, h, false)?;
            let up = linear("mlp.up_proj", c.intermediate_size, h, false)?;
            let down = linear("mlp.down_proj", h, c.intermediate_size, false)?;
            let mut head_norm = |name: &str| -> Result<Option<Tensor>> {
                if !c.qk_norm {
                    return Ok(None);
                }
                let w = weights.take(&format!("{p}.self_attn.{name}.weight"), &[hd])?;
                Ok(Some(w.to_dense(dtype, device)?))
            };
            let (q_norm, k_norm) = (head_norm("q_norm")?, head_norm("k_norm")?);
            // Llama's "post_attention_layernorm" is the norm before the MLP; Gemma's is a
            // norm of the attention output, and its pre-MLP norm has a name of its own.
            let (pre_mlp, attn_out_norm, mlp_out_norm) = if c.sandwich_norms {
                (
                    norm_vec(weights, &format!("{p}.pre_feedforward_layernorm.weight"))?,
                    Some(norm_vec(
                        weights,
                        &format!("{p}.post_attention_layernorm.weight"),
                    )?),
                    Some(norm_vec(
                        weights,
                        &format!("{p}.post_feedforward_layernorm.weight"),
                    )?),
                )
            } else {
                let pre_mlp = norm_vec(weights, &format!("{p}.post_attention_layernorm.weight"))?;
                (pre_mlp, None, None)
            };
            let window = c.window(l);
            layers.push(Block {
                input_norm: norm_vec(weights, &format!("{p}.input_layernorm.weight"))?,
                q,
                k,
                v: vv,
                o,
                q_norm,
                k_norm,
                attn_out_norm,
                post_norm: pre_mlp,
                gate,
                up,
                down,
                mlp_out_norm,
                window,
                rope: usize::from(window.is_some() && c.rope_local_theta.is_some()),
            });
        }
        let norm = norm_vec(weights, "model.norm.weight")?;
        let lm_head = if c.tie_word_embeddings {
            if weights.contains("lm_head.weight") {
                return Err(Error::Config(
                    "tie_word_embeddings is set but the weights carry a separate lm_head.weight"
                        .into(),
                ));
            }
            Linear::new(embed.clone(), None, format, dtype)?
        } else {
            let w = weights
                .take("lm_head.weight", &[v, h])
                .map_err(|e| match e {
                    Error::Weight { name, reason } if reason.starts_with("missing") => {
                        Error::Weight {
                            name,
                            reason: format!("{reason} (the config says embeddings are not tied)"),
                        }
                    }
                    e => e,
                })?;
            Linear::new(w, None, format, dtype)?
        };

        let positions = c.max_position_embeddings;
        let pairs = c.rope_dims() / 2;
        let attention_factor = c.rope_attention_factor.unwrap_or(1.0);
        let table = |inv_freq: Vec<f32>| -> Result<(Tensor, Tensor)> {
            let mut cos = Vec::with_capacity(positions * inv_freq.len());
            let mut sin = Vec::with_capacity(positions * inv_freq.len());
            for pos in 0..positions {
                for f in &inv_freq {
                    let angle = pos as f64 * *f as f64;
                    cos.push((angle.cos() * attention_factor) as f32);
                    sin.push((angle.sin() * attention_factor) as f32);
                }
            }
            let cos = Tensor::from_vec(cos, (positions, pairs), device)?.to_dtype(dtype)?;
            let sin = Tensor::from_vec(sin, (positions, pairs), device)?.to_dtype(dtype)?;
            Ok((cos, sin))
        };
        let mut ropes = vec![table(c.rope_inv_freq())?];
        if let Some(local) = c.rope_local_inv_freq() {
            ropes.push(table(local)?);
        }
        let kv_geometry = Arc::new(KvGeometry {
            num_layers: c.num_layers,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            dtype,
            device: device.clone(),
        });
        Ok(Self {
            config,
            device: device.clone(),
            dtype,
            embed,
            embed_dense: OnceLock::new(),
            layers,
            norm,
            lm_head,
            ropes,
            kv_geometry,
            dense_rows: None,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs steps of at least `rows` tokens (big batches, prompt chunks) on dense copies of
    /// the quantized weights: a GEMM instead of row-by-row quantized dot products, several
    /// times faster there, at the cost of a dense copy of the weights in memory. Rows then
    /// see dense instead of int8-activation numerics, so a sample's tokens can depend on the
    /// size of the batch it ran in; None (the default) keeps every step on one path.
    pub fn set_dense_rows(&mut self, rows: Option<usize>) -> Result<()> {
        self.dense_rows = rows;
        if rows.is_some() {
            // Make the dense copies now rather than inside the first big step.
            for block in &self.layers {
                for t in LoraTarget::ALL {
                    block.linear(t).dense_weight()?;
                }
            }
            self.lm_head.dense_weight()?;
        }
        Ok(())
    }
    /// Stores the KV caches made from now on in `dtype` (a float type); attention
    /// computes in the activation dtype.
    pub fn set_kv_dtype(&mut self, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::InvalidArgument(format!(
                "KV cache dtype {dtype:?}: a float type only"
            )));
        }
        self.kv_geometry = Arc::new(KvGeometry {
            dtype,
            ..(*self.kv_geometry).clone()
        });
        Ok(())
    }
    /// The KV caches' dtype.
    pub fn kv_dtype(&self) -> DType {
        self.kv_geometry.dtype
    }
    /// The device holding the weights; inputs and KV caches live there too.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Activation dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// An empty KV cache for one sequence of this model.
    pub fn new_kv(&self) -> SeqKv {
        SeqKv::new(self.kv_geometry.clone())
    }

    /// Storage type of the linear weights ("q4_1", "f32", …), as a summary.
    pub fn weight_types(&self) -> String {
        let mut names: Vec<String> = self
            .layers
            .iter()
            .flat_map(|b| LoraTarget::ALL.map(|t| b.linear(t).type_name()))
            .chain([self.lm_head.type_name()])
            .collect();
        names.sort();
        names.dedup();
        names.join(",")
    }

    /// Bytes of weights read for one decoded token (linear layers + lm_head + norms + one
    /// embedding row): the numerator of the memory-bandwidth roofline.
    pub fn weight_bytes_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(|b| LoraTarget::ALL.map(|t| b.linear(t).weight_bytes()))
            .sum();
        let norms =
            (2 * self.layers.len() + 1) * self.config.hidden_size * self.dtype.size_in_bytes();
        linears + self.lm_head.weight_bytes() + norms
    }
}
