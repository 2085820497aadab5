//! The Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5): one set of
//! weights, two entry points.
//!
//! - [`Transformer::forward_step`] decodes: a batch of sequences, each at its own position,
//!   each with its own KV cache and LoRA adapter; fused kernels, quantized matmuls.
//! - [`Transformer::forward_train`] scores whole sequences and keeps the autograd graph:
//!   dense weights (dequantized once, on first use) and differentiable ops only.
//!
//! Both read the same LoRA `Var`s, so the policy that sampled a rollout is the policy that
//! is trained on it, and a training step is visible to the next decode step.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};

use super::config::ModelConfig;
use super::kv::{KvGeometry, SeqKv};
use super::lora::{LoraAdapter, LoraSnapshot, LoraTarget};
use super::ops;
use super::qmatmul;
use super::weights::{Weight, WeightMap};
use crate::error::{Error, Result};

/// How weights are held for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WeightFormat {
    /// Keep GGUF blocks quantized; matmuls run on them (fastest decode on CPU).
    Quantized,
    /// Dense tensors in the activation dtype.
    Dense,
}

/// A linear layer `y = x Wᵀ + b` whose weight may be quantized. LoRA is applied by the
/// caller, which knows the layer index and the adapter of each row.
pub(crate) struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Dense copy for the training forward, made on first use.
    dense: OnceLock<Tensor>,
    dtype: DType,
}

enum LinearWeight {
    Quantized(Arc<QTensor>, QMatMul),
    Dense(Tensor),
}

impl Linear {
    fn new(
        weight: Weight,
        bias: Option<Tensor>,
        format: WeightFormat,
        dtype: DType,
    ) -> Result<Self> {
        let device = match &weight {
            Weight::Quantized(q) => q.device(),
            Weight::Dense(t) => t.device().clone(),
        };
        let weight = match (weight, format) {
            (Weight::Quantized(q), WeightFormat::Quantized) => {
                LinearWeight::Quantized(q.clone(), QMatMul::from_arc(q)?)
            }
            (w, _) => LinearWeight::Dense(w.to_dense(dtype, &device)?),
        };
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        Ok(Self {
            weight,
            bias,
            dense: OnceLock::new(),
            dtype,
        })
    }

    /// Inference forward for x of shape (rows, in). With `dense_rows` set, inputs of at
    /// least that many rows run on the dense copy of a quantized weight (a real GEMM)
    /// instead of the row-by-row quantized kernels.
    pub fn forward(&self, x: &Tensor, dense_rows: Option<usize>) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quantized(..)
                if dense_rows.is_some_and(|n| x.dim(0).unwrap_or(0) >= n) =>
            {
                x.matmul(&self.dense_weight()?.t()?)?
            }
            // Our CPU kernels (batched, SIMD chosen at run time) where they cover the
            // weight type; candle's QMatMul elsewhere, or when VERITY_CANDLE_QMATMUL=1.
            LinearWeight::Quantized(q, _)
                if !qmatmul::disabled_by_env() && qmatmul::supports(q) =>
            {
                qmatmul::forward(q, x)?
            }
            LinearWeight::Quantized(_, qm) => qm.forward(x)?,
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// The weight as a dense (out, in) tensor; quantized weights are dequantized once.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Quantized(q, _) => {
                if let Some(w) = self.dense.get() {
                    return Ok(w.clone());
                }
                let w = q.dequantize(&q.device())?.to_dtype(self.dtype)?;
                Ok(self.dense.get_or_init(|| w).clone())
            }
        }
    }

    /// Training forward: dense and differentiable w.r.t. x (the weight is frozen).
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::frozen_linear(x, &self.dense_weight()?)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Storage type name ("q4_1", "f32", …).
    pub fn type_name(&self) -> String {
        match &self.weight {
            LinearWeight::Quantized(q, _) => format!("{:?}", q.dtype()).to_lowercase(),
            LinearWeight::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
        }
    }

    /// Bytes read per use of the weight (what bounds batch-1 decode).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Quantized(q, _) => q.storage_size_in_bytes(),
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
        }
    }
}

struct Block {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
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

/// One sequence's part of a decode step.
pub struct StepInput<'a> {
    /// New tokens to append (a prompt chunk when prefilling, one token when decoding).
    pub tokens: &'a [u32],
    /// The sequence's KV cache; the new tokens' keys and values are appended to it.
    pub kv: &'a mut SeqKv,
    /// LoRA adapter for this sequence, or None for the base model. Rows of one batch may
    /// use different adapters.
    pub adapter: Option<&'a LoraAdapter>,
    /// Return a logits row for every new token instead of only the last.
    pub all_logits: bool,
}

/// Rows of the batch that use one adapter.
struct LoraGroup {
    /// Taken once per step: a concurrent update shows from the next step on.
    adapter: Arc<LoraSnapshot>,
    /// None when every row of the batch uses this adapter.
    rows: Option<Tensor>,
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
    rope_cos: Tensor,
    rope_sin: Tensor,
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
            let o = linear("self_attn.o_proj", h, q_out, false)?;
            let gate = linear("mlp.gate_proj", c.intermediate_size, h, false)?;
            let up = linear("mlp.up_proj", c.intermediate_size, h, false)?;
            let down = linear("mlp.down_proj", h, c.intermediate_size, false)?;
            layers.push(Block {
                input_norm: norm_vec(weights, &format!("{p}.input_layernorm.weight"))?,
                q,
                k,
                v: vv,
                o,
                post_norm: norm_vec(weights, &format!("{p}.post_attention_layernorm.weight"))?,
                gate,
                up,
                down,
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

        let inv_freq = c.rope_inv_freq();
        let positions = c.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * inv_freq.len());
        let mut sin = Vec::with_capacity(positions * inv_freq.len());
        for pos in 0..positions {
            for f in &inv_freq {
                let angle = pos as f64 * *f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let rope_cos = Tensor::from_vec(cos, (positions, hd / 2), device)?.to_dtype(dtype)?;
        let rope_sin = Tensor::from_vec(sin, (positions, hd / 2), device)?.to_dtype(dtype)?;
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
            rope_cos,
            rope_sin,
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
    /// The device holding the weights; inputs and KV caches live there too.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Activation (and KV) dtype.
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

    fn embed_dense(&self) -> Result<Tensor> {
        match &self.embed {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quantized(q) => {
                if let Some(t) = self.embed_dense.get() {
                    return Ok(t.clone());
                }
                let t = q.dequantize(&self.device)?.to_dtype(self.dtype)?;
                Ok(self.embed_dense.get_or_init(|| t).clone())
            }
        }
    }

    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.embed {
            Weight::Quantized(q) => Ok(q.embedding(ids)?.to_dtype(self.dtype)?),
            Weight::Dense(t) => Ok(t.index_select(ids, 0)?),
        }
    }

    /// Appends each sequence's new tokens to its KV cache and returns logits, f32, one row
    /// per sequence (its last new token) or one per new token where `all_logits` is set,
    /// in batch order.
    pub fn forward_step(&self, batch: &mut [StepInput<'_>]) -> Result<Tensor> {
        let c = &self.config;
        if batch.is_empty() {
            return Err(Error::InvalidArgument(
                "forward_step needs at least one sequence".into(),
            ));
        }
        // Positions, bounds and KV room first, so a bad input changes nothing.
        let mut positions: Vec<u32> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(Error::InvalidArgument(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            let start = s.kv.len();
            if start + s.tokens.len() > c.max_position_embeddings {
                return Err(Error::PromptTooLong {
                    tokens: start + s.tokens.len(),
                    context: c.max_position_embeddings,
                });
            }
            if let Some(bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::InvalidArgument(format!(
                    "token id {bad} is outside the vocabulary of {} tokens",
                    c.vocab_size
                )));
            }
            if let Some(a) = s.adapter {
                if a.num_layers() != c.num_layers {
                    return Err(Error::InvalidArgument(format!(
                        "adapter has {} layers, the model {}",
                        a.num_layers(),
                        c.num_layers
                    )));
                }
            }
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
            tokens.extend_from_slice(s.tokens);
        }
        for s in batch.iter_mut() {
            s.kv.reserve(s.tokens.len())?;
        }
        let total = tokens.len();
        let ids = Tensor::from_vec(tokens, total, &self.device)?;
        let pos = Tensor::from_vec(positions, total, &self.device)?;
        let cos = self.rope_cos.index_select(&pos, 0)?;
        let sin = self.rope_sin.index_select(&pos, 0)?;
        let groups = self.lora_groups(batch)?;
        // Causal masks for sequences that add more than one token (prefill chunks).
        let masks: Vec<Option<Tensor>> = batch
            .iter()
            .map(|s| {
                let n = s.tokens.len();
                if n == 1 {
                    return Ok(None);
                }
                let own = s.kv.own_len();
                ops::causal_mask(n, own, own + n, self.dtype, &self.device).map(Some)
            })
            .collect::<Result<_>>()?;

        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed_rows(&ids)?;
        for (l, block) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.input_norm, eps)?;
            let q = self.linear_step(block, l, LoraTarget::Q, &h, &groups)?;
            let k = self.linear_step(block, l, LoraTarget::K, &h, &groups)?;
            let v = self.linear_step(block, l, LoraTarget::V, &h, &groups)?;
            let q = candle_nn::rotary_emb::rope_thd(&q.reshape((1, total, nh, hd))?, &cos, &sin)?
                .squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.reshape((1, total, nkv, hd))?, &cos, &sin)?
                .squeeze(0)?;
            let v = v.reshape((total, nkv, hd))?;
            let mut outs = Vec::with_capacity(batch.len());
            let mut row = 0;
            for (s, mask) in batch.iter().zip(&masks) {
                let n = s.tokens.len();
                let out = self.attend(
                    l,
                    s.kv,
                    &q.narrow(0, row, n)?,
                    &k.narrow(0, row, n)?,
                    &v.narrow(0, row, n)?,
                    mask.as_ref(),
                )?;
                outs.push(out);
                row += n;
            }
            // (`cat` of a single tensor is a cheap clone.)
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + self.linear_step(block, l, LoraTarget::O, &attn, &groups)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.post_norm, eps)?;
            let gate = self.linear_step(block, l, LoraTarget::Gate, &h, &groups)?;
            let up = self.linear_step(block, l, LoraTarget::Up, &h, &groups)?;
            let mlp = ops::swiglu(&gate, &up)?;
            x = (x + self.linear_step(block, l, LoraTarget::Down, &mlp, &groups)?)?;
        }
        for s in batch.iter_mut() {
            s.kv.commit(s.tokens.len());
        }

        let mut rows: Vec<u32> = Vec::new();
        let mut row = 0u32;
        for s in batch.iter() {
            let n = s.tokens.len() as u32;
            if s.all_logits {
                rows.extend(row..row + n);
            } else {
                rows.push(row + n - 1);
            }
            row += n;
        }
        let x = if rows.len() == total {
            x
        } else {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
            x.index_select(&idx, 0)?
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(self
            .lm_head
            .forward(&x, self.dense_rows)?
            .to_dtype(DType::F32)?)
    }

    /// Attention of one sequence's new rows over its cache (shared segments, then its own,
    /// where the new keys and values are written first). q: (n, H, d); k, v: (n, KV, d).
    fn attend(
        &self,
        layer: usize,
        kv: &SeqKv,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (n, nh, hd) = q.dims3()?;
        let nkv = c.num_kv_heads;
        let groups = nh / nkv;
        let own = kv.own_segment();
        own.write(layer, k, v)?;
        // (n, H, d) → (KV, G·n, d): query rows of one KV head side by side.
        let q = (q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((nkv, groups * n, hd))?
            * (1.0 / (hd as f64).sqrt()))?;
        let mut keys = Vec::with_capacity(kv.shared_segments().len() + 1);
        let mut values = Vec::with_capacity(keys.capacity());
        for seg in kv.shared_segments() {
            keys.push(seg.keys(layer)?);
            values.push(seg.values(layer)?);
        }
        keys.push(own.keys_with_pending(layer, n)?);
        values.push(own.values_with_pending(layer, n)?);

        let mut scores = Vec::with_capacity(keys.len());
        for key in &keys {
            // (len, KV, d) → (KV, d, len)
            scores.push(q.matmul(&key.permute((1, 2, 0))?)?);
        }
        let scores = Tensor::cat(&scores, 2)?;
        let total_keys = scores.dim(2)?;
        let scores = match mask {
            Some(mask) => {
                // The mask covers the own segment, the last columns.
                let shared = total_keys - mask.dim(1)?;
                let full = if shared > 0 {
                    let zeros = Tensor::zeros((n, shared), scores.dtype(), &self.device)?;
                    Tensor::cat(&[&zeros, mask], 1)?
                } else {
                    mask.clone()
                };
                scores
                    .reshape((nkv, groups, n, total_keys))?
                    .broadcast_add(&full)?
                    .reshape((nkv, groups * n, total_keys))?
            }
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let mut out: Option<Tensor> = None;
        let mut offset = 0;
        for value in &values {
            let len = value.dim(0)?;
            let w = weights.narrow(2, offset, len)?;
            let part = w.matmul(&value.transpose(0, 1)?)?; // (KV, G·n, d)
            out = Some(match out {
                Some(acc) => (acc + part)?,
                None => part,
            });
            offset += len;
        }
        let out =
            out.ok_or_else(|| Error::InvalidArgument("attention over an empty cache".into()))?;
        Ok(out
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nh * hd))?)
    }

    fn lora_groups(&self, batch: &[StepInput<'_>]) -> Result<Vec<LoraGroup>> {
        let mut by_adapter: Vec<(&LoraAdapter, Vec<u32>)> = Vec::new();
        let mut row = 0u32;
        let mut total = 0usize;
        for s in batch {
            let n = s.tokens.len() as u32;
            if let Some(a) = s.adapter {
                match by_adapter.iter_mut().find(|(b, _)| std::ptr::eq(*b, a)) {
                    Some((_, rows)) => rows.extend(row..row + n),
                    None => by_adapter.push((a, (row..row + n).collect())),
                }
            }
            row += n;
            total += n as usize;
        }
        by_adapter
            .into_iter()
            .map(|(adapter, rows)| {
                let rows = if rows.len() == total {
                    None
                } else {
                    Some(Tensor::from_vec(rows.clone(), rows.len(), &self.device)?)
                };
                Ok(LoraGroup {
                    adapter: adapter.snapshot(),
                    rows,
                })
            })
            .collect()
    }

    fn linear_step(
        &self,
        block: &Block,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
        groups: &[LoraGroup],
    ) -> Result<Tensor> {
        let mut y = block.linear(target).forward(x, self.dense_rows)?;
        for g in groups {
            match &g.rows {
                None => {
                    if let Some(d) = g.adapter.delta(layer, target, x)? {
                        let d = d.to_dtype(y.dtype())?;
                        y = (y + d)?;
                    }
                }
                Some(rows) => {
                    let xs = x.index_select(rows, 0)?;
                    if let Some(d) = g.adapter.delta(layer, target, &xs)? {
                        let d = d.to_dtype(y.dtype())?;
                        y = y.index_add(rows, &d, 0)?;
                    }
                }
            }
        }
        Ok(y)
    }

    fn linear_train(
        &self,
        block: &Block,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let y = block.linear(target).forward_train(x)?;
        match adapter
            .map(|a| a.delta(layer, target, x))
            .transpose()?
            .flatten()
        {
            Some(d) => {
                let d = d.to_dtype(y.dtype())?;
                Ok((y + d)?)
            }
            None => Ok(y),
        }
    }

    /// Final hidden states (B, T, hidden) of whole sequences, differentiable w.r.t. the
    /// LoRA weights. `tokens`: (B, T) u32; right-padding is harmless (causal attention).
    pub fn forward_train_hidden(
        &self,
        tokens: &Tensor,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        Ok(self.forward_train_hidden_after(None, tokens, adapter)?.1)
    }

    /// [`Self::forward_train_hidden`] for B continuations of one shared `prefix` (1, P):
    /// the prefix is computed once, not B times, and every continuation attends to its keys
    /// and values (gradients from all B flow back into it). Returns the prefix's hidden
    /// states (1, P, hidden) and the continuations' (B, T, hidden), the latter at positions
    /// P.. as if each row were prefix + continuation.
    pub fn forward_train_hidden_after(
        &self,
        prefix: Option<&Tensor>,
        tokens: &Tensor,
        adapter: Option<&LoraAdapter>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let c = &self.config;
        let (b, t) = tokens.dims2()?;
        let p = match prefix {
            Some(prefix) => prefix.dims2()?.1,
            None => 0,
        };
        if p + t > c.max_position_embeddings {
            return Err(Error::PromptTooLong {
                tokens: p + t,
                context: c.max_position_embeddings,
            });
        }
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        // Rows: the prefix's P first (if any), then the B·T continuation tokens. Every
        // position-wise layer runs on all rows at once; only attention tells them apart.
        let ids = match prefix {
            Some(prefix) => Tensor::cat(&[&prefix.flatten_all()?, &tokens.flatten_all()?], 0)?,
            None => tokens.flatten_all()?,
        };
        let mut x = self.embed_dense()?.index_select(&ids, 0)?;
        let heads = |y: &Tensor, n: usize, start: usize, batch: usize, len: usize| {
            y.narrow(0, start, batch * len)?
                .reshape((batch, len, n, hd))?
                .transpose(1, 2)
        };
        let (cos_p, sin_p) = (
            self.rope_cos.narrow(0, 0, p)?,
            self.rope_sin.narrow(0, 0, p)?,
        );
        let (cos, sin) = (
            self.rope_cos.narrow(0, p, t)?,
            self.rope_sin.narrow(0, p, t)?,
        );
        for (l, block) in self.layers.iter().enumerate() {
            let h = ops::rms_norm(&x, &block.input_norm, c.rms_norm_eps)?;
            let q = self.linear_train(block, l, LoraTarget::Q, &h, adapter)?;
            let k = self.linear_train(block, l, LoraTarget::K, &h, adapter)?;
            let v = self.linear_train(block, l, LoraTarget::V, &h, adapter)?;
            let qc = ops::rope(&heads(&q, nh, p, b, t)?, &cos, &sin)?;
            let kc = ops::rope(&heads(&k, nkv, p, b, t)?, &cos, &sin)?;
            let vc = heads(&v, nkv, p, b, t)?;
            let attn = if p > 0 {
                let qp = ops::rope(&heads(&q, nh, 0, 1, p)?, &cos_p, &sin_p)?;
                let kp = ops::rope(&heads(&k, nkv, 0, 1, p)?, &cos_p, &sin_p)?;
                let vp = heads(&v, nkv, 0, 1, p)?;
                let prefix_out = ops::causal_attention(&qp, &kp, &vp)?;
                let out = ops::causal_attention_after(&qc, &kc, &vc, &kp, &vp)?;
                Tensor::cat(
                    &[
                        &prefix_out.transpose(1, 2)?.reshape((p, nh * hd))?,
                        &out.transpose(1, 2)?.reshape((b * t, nh * hd))?,
                    ],
                    0,
                )?
            } else {
                ops::causal_attention(&qc, &kc, &vc)?
                    .transpose(1, 2)?
                    .reshape((b * t, nh * hd))?
            };
            x = (x + self.linear_train(block, l, LoraTarget::O, &attn, adapter)?)?;
            let h = ops::rms_norm(&x, &block.post_norm, c.rms_norm_eps)?;
            let gate = self.linear_train(block, l, LoraTarget::Gate, &h, adapter)?;
            let up = self.linear_train(block, l, LoraTarget::Up, &h, adapter)?;
            let mlp = ops::swiglu(&gate, &up)?;
            x = (x + self.linear_train(block, l, LoraTarget::Down, &mlp, adapter)?)?;
        }
        let x = ops::rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        let prefix_hidden = if p > 0 {
            Some(x.narrow(0, 0, p)?.reshape((1, p, c.hidden_size))?)
        } else {
            None
        };
        let hidden = x.narrow(0, p, b * t)?.reshape((b, t, c.hidden_size))?;
        Ok((prefix_hidden, hidden))
    }

    /// Logits of hidden states (…, hidden) through the output head, differentiable.
    pub fn lm_head_train(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = hidden.reshape(((), self.config.hidden_size))?;
        let logits = self.lm_head.forward_train(&h)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(self.config.vocab_size);
        Ok(logits.reshape(out_dims)?)
    }

    /// Logits (B, T, vocab) of whole sequences, keeping the autograd graph.
    pub fn forward_train(&self, tokens: &Tensor, adapter: Option<&LoraAdapter>) -> Result<Tensor> {
        let hidden = self.forward_train_hidden(tokens, adapter)?;
        self.lm_head_train(&hidden)
    }

    /// Log-probabilities (B, T-1) of each next token under the model (teacher forcing).
    pub fn token_logprobs(&self, tokens: &Tensor, adapter: Option<&LoraAdapter>) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let logits = self.forward_train(tokens, adapter)?.narrow(1, 0, t - 1)?;
        let logp = ops::log_softmax(&logits)?;
        let next = tokens.narrow(1, 1, t - 1)?.unsqueeze(D::Minus1)?;
        Ok(logp.gather(&next, D::Minus1)?.squeeze(D::Minus1)?)
    }
}
