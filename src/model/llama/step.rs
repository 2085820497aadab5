//! The decode entry point, [`Transformer::forward_step`]: a batch of sequences, each at its
//! own position with its own KV cache and LoRA adapter, through fused kernels and quantized
//! matmuls; attention over shared and own KV segments; per-adapter LoRA row groups.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::linear::Linear;
use super::{Block, Transformer};
use crate::error::{Error, Result};
use crate::model::kv::SeqKv;
use crate::model::lora::{LoraAdapter, LoraSnapshot, LoraTarget};
use crate::model::weights::Weight;
use crate::model::{cpu_ops, ops};

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

/// An RMSNorm over the last dimension when the block has this norm (Qwen3's per-head q/k
/// norms, Gemma's attention- and MLP-output norms), else `x` as it is.
fn head_norm(x: Tensor, norm: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    match norm {
        Some(w) => rms_norm(&x, w, eps),
        None => Ok(x),
    }
}

/// RMSNorm(x) · w: verity's own for f32 on the CPU (`cpu_ops`), candle's elsewhere.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    match cpu_ops::rms_norm_f32_cpu(x, w, eps)? {
        Some(y) => Ok(y),
        None => Ok(candle_nn::ops::rms_norm(x, w, eps)?),
    }
}

/// The residual stream x + y and its RMSNorm · w (the next sublayer's input), in one pass
/// for f32 on the CPU.
fn residual_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if let Some(both) = cpu_ops::residual_rms_norm_f32_cpu(x, y, w, eps)? {
        return Ok(both);
    }
    let sum = (x + y)?;
    let normed = candle_nn::ops::rms_norm(&sum, w, eps)?;
    Ok((sum, normed))
}

/// candle's fused RoPE over x (1, T, heads, head_dim) with cos/sin (T, r/2): the first r
/// dimensions of each head rotate, the rest pass through (partial rotary, r < head_dim).
fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(3)?;
    let r = 2 * cos.dim(1)?;
    if r == d {
        if let Some(y) = cpu_ops::rope_thd_f32_cpu(x, cos, sin)? {
            return Ok(y);
        }
        return Ok(candle_nn::rotary_emb::rope_thd(x, cos, sin)?);
    }
    let rotated = candle_nn::rotary_emb::rope_thd(&x.narrow(3, 0, r)?.contiguous()?, cos, sin)?;
    Ok(Tensor::cat(&[&rotated, &x.narrow(3, r, d - r)?], 3)?)
}

impl Transformer {
    fn embed_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let rows = match &self.embed {
            Weight::Quantized(q) => q.embedding(ids)?.to_dtype(self.dtype)?,
            Weight::Dense(t) => t.index_select(ids, 0)?,
        };
        match self.config.embedding_multiplier {
            Some(m) => Ok((rows * m)?),
            None => Ok(rows),
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
        let ropes = self
            .ropes
            .iter()
            .map(|(cos, sin)| Ok((cos.index_select(&pos, 0)?, sin.index_select(&pos, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        let groups = self.lora_groups(batch)?;

        // A decode step on a GPU: one attention launch per layer for the whole batch (but
        // not once a sequence outgrows a sliding window: the per-sequence path masks it).
        let beyond_window = self
            .layers
            .iter()
            .filter_map(|b| b.window)
            .any(|w| batch.iter().any(|s| s.kv.len() + s.tokens.len() > w));
        let plan = if beyond_window {
            None
        } else {
            self.decode_plan(batch)?
        };
        // On the CPU, every sequence (prompt chunks, windows included) takes one parallel
        // call per layer.
        let on_cpu = plan.is_none() && self.cpu_attention_fits();
        let new_rows = if on_cpu {
            super::cpu_attention::new_rows(batch)
        } else {
            Vec::new()
        };
        // Elsewhere, causal masks for sequences that add more than one token (prompt
        // chunks) on the per-sequence path.
        let masks: Vec<Option<Tensor>> = batch
            .iter()
            .map(|s| {
                let n = s.tokens.len();
                if n == 1 || on_cpu || plan.is_some() {
                    return Ok(None);
                }
                let own = s.kv.own_len();
                ops::causal_mask(n, own, own + n, self.dtype, &self.device).map(Some)
            })
            .collect::<Result<_>>()?;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed_rows(&ids)?;
        // h: the normed input of the next block (of the output head after the last).
        let first_norm = self.layers.first().map_or(&self.norm, |b| &b.input_norm);
        let mut h = rms_norm(&x, first_norm, eps)?;
        for (l, block) in self.layers.iter().enumerate() {
            let [q, k, v] = self.linear_steps(
                block,
                l,
                [LoraTarget::Q, LoraTarget::K, LoraTarget::V],
                &h,
                &groups,
            )?;
            let q = head_norm(q.reshape((1, total, nh, hd))?, block.q_norm.as_ref(), eps)?;
            let k = head_norm(k.reshape((1, total, nkv, hd))?, block.k_norm.as_ref(), eps)?;
            let (cos, sin) = &ropes[block.rope];
            let q = rope_thd(&q, cos, sin)?.squeeze(0)?;
            let k = rope_thd(&k, cos, sin)?.squeeze(0)?;
            let v = v.reshape((total, nkv, hd))?;
            let attn = match &plan {
                Some(plan) => self.attend_decode(plan, l, &q, &k, &v)?,
                None if on_cpu => self.attend_cpu(batch, &new_rows, l, block.window, &q, &k, &v)?,
                None => {
                    let mut outs = Vec::with_capacity(batch.len());
                    let mut row = 0;
                    for (s, mask) in batch.iter().zip(&masks) {
                        let n = s.tokens.len();
                        outs.push(self.attend(
                            l,
                            block.window,
                            s.kv,
                            &q.narrow(0, row, n)?,
                            &k.narrow(0, row, n)?,
                            &v.narrow(0, row, n)?,
                            mask.as_ref(),
                        )?);
                        row += n;
                    }
                    // (`cat` of a single tensor is a cheap clone.)
                    Tensor::cat(&outs, 0)?
                }
            };
            let attn = self.linear_step(block, l, LoraTarget::O, &attn, &groups)?;
            let attn = head_norm(attn, block.attn_out_norm.as_ref(), eps)?;
            (x, h) = residual_rms_norm(&x, &attn, &block.post_norm, eps)?;
            let [gate, up] =
                self.linear_steps(block, l, [LoraTarget::Gate, LoraTarget::Up], &h, &groups)?;
            let mlp = match cpu_ops::gated_f32_cpu(c.activation, &gate, &up)? {
                Some(mlp) => mlp,
                None => ops::gated(c.activation, &gate, &up)?,
            };
            let mlp = self.linear_step(block, l, LoraTarget::Down, &mlp, &groups)?;
            let mlp = head_norm(mlp, block.mlp_out_norm.as_ref(), eps)?;
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |b| &b.input_norm);
            (x, h) = residual_rms_norm(&x, &mlp, next_norm, eps)?;
        }
        // (The residual stream itself is not needed past the last block.)
        drop(x);
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
            h
        } else {
            let idx = Tensor::from_vec(rows.clone(), rows.len(), &self.device)?;
            h.index_select(&idx, 0)?
        };
        Ok(self
            .lm_head
            .forward(&x, self.dense_rows)?
            .to_dtype(DType::F32)?)
    }

    /// Attention of one sequence's new rows over its cache (shared segments, then its own,
    /// where the new keys and values are written first). q: (n, H, d); k, v: (n, KV, d).
    /// With a `window`, each row sees only the `window` most recent positions.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        window: Option<usize>,
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
            * c.attention_scale())?;
        let mut keys = Vec::with_capacity(kv.shared_segments().len() + 1);
        let mut values = Vec::with_capacity(keys.capacity());
        // (A KV cache stored in another dtype is read in the activations'.)
        let dtype = q.dtype();
        for seg in kv.shared_segments() {
            keys.push(seg.keys(layer)?.to_dtype(dtype)?);
            values.push(seg.values(layer)?.to_dtype(dtype)?);
        }
        keys.push(own.keys_with_pending(layer, n)?.to_dtype(dtype)?);
        values.push(own.values_with_pending(layer, n)?.to_dtype(dtype)?);

        let mut scores = Vec::with_capacity(keys.len());
        for key in &keys {
            // (len, KV, d) → (KV, d, len)
            scores.push(q.matmul(&ops::gemm_operand(key.permute((1, 2, 0))?)?)?);
        }
        let scores = Tensor::cat(&scores, 2)?;
        let total_keys = scores.dim(2)?;
        // Keys are positions 0..total_keys; the new rows the last n of them. A window the
        // sequence has outgrown needs a mask over every key, shared ones included.
        let windowed = match window {
            Some(w) if total_keys > w => Some(ops::attention_mask(
                n,
                total_keys - n,
                total_keys,
                Some(w),
                scores.dtype(),
                &self.device,
            )?),
            _ => None,
        };
        let mask = windowed.as_ref().or(mask);
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
            let w = ops::gemm_operand(weights.narrow(2, offset, len)?)?;
            let part = w.matmul(&ops::gemm_operand(value.transpose(0, 1)?)?)?; // (KV, G·n, d)
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
        let y = block.linear(target).forward(x, self.dense_rows)?;
        self.add_lora(layer, target, x, y, groups)
    }

    /// [`Self::linear_step`] of several layers on one input, which the quantized kernels
    /// then quantize once.
    fn linear_steps<const N: usize>(
        &self,
        block: &Block,
        layer: usize,
        targets: [LoraTarget; N],
        x: &Tensor,
        groups: &[LoraGroup],
    ) -> Result<[Tensor; N]> {
        let ys = Linear::forward_many(targets.map(|t| block.linear(t)), x, self.dense_rows)?;
        let mut out = Vec::with_capacity(N);
        for (t, y) in targets.into_iter().zip(ys) {
            out.push(self.add_lora(layer, t, x, y, groups)?);
        }
        Ok(out.try_into().expect("N outputs"))
    }

    /// y plus the LoRA deltas of the rows' adapters for this layer and target.
    fn add_lora(
        &self,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
        mut y: Tensor,
        groups: &[LoraGroup],
    ) -> Result<Tensor> {
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
}
