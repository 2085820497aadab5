//! The training entry points ([`Transformer::forward_train`] and the hidden-state, head and
//! log-probability forwards around it): whole sequences through dense weights and
//! differentiable ops only, keeping the autograd graph back to the LoRA weights.

use candle_core::{Tensor, D};

use super::{Block, Transformer};
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, LoraTarget};
use crate::model::ops;
use crate::model::weights::Weight;

/// Qwen3's RMSNorm of every head of `x` (rows, heads·head_dim), differentiable, when the
/// block has one.
fn head_norm(x: &Tensor, norm: Option<&Tensor>, heads: usize, eps: f64) -> Result<Tensor> {
    let Some(w) = norm else {
        return Ok(x.clone());
    };
    let (rows, width) = x.dims2()?;
    let per_head = x.reshape((rows, heads, width / heads))?;
    Ok(ops::rms_norm(&per_head, w, eps)?.reshape((rows, width))?)
}

/// Gemma's RMSNorm of an attention or MLP output before the residual add, differentiable;
/// `x` as it is for blocks without one.
fn output_norm(x: &Tensor, norm: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    match norm {
        Some(w) => ops::rms_norm(x, w, eps),
        None => Ok(x.clone()),
    }
}

impl Transformer {
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
        if let Some(m) = c.embedding_multiplier {
            x = (x * m)?;
        }
        let heads = |y: &Tensor, n: usize, start: usize, batch: usize, len: usize| {
            y.narrow(0, start, batch * len)?
                .reshape((batch, len, n, hd))?
                .transpose(1, 2)
        };
        // Per RoPE table: the prefix's rows and the continuations'.
        let ropes = self
            .ropes
            .iter()
            .map(|(cos, sin)| {
                Ok((
                    (cos.narrow(0, 0, p)?, sin.narrow(0, 0, p)?),
                    (cos.narrow(0, p, t)?, sin.narrow(0, p, t)?),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for (l, block) in self.layers.iter().enumerate() {
            let ((cos_p, sin_p), (cos, sin)) = &ropes[block.rope];
            let shape = ops::AttentionShape {
                scale: c.attention_scale(),
                window: block.window,
            };
            let h = ops::rms_norm(&x, &block.input_norm, c.rms_norm_eps)?;
            let q = self.linear_train(block, l, LoraTarget::Q, &h, adapter)?;
            let k = self.linear_train(block, l, LoraTarget::K, &h, adapter)?;
            let q = head_norm(&q, block.q_norm.as_ref(), nh, c.rms_norm_eps)?;
            let k = head_norm(&k, block.k_norm.as_ref(), nkv, c.rms_norm_eps)?;
            let v = self.linear_train(block, l, LoraTarget::V, &h, adapter)?;
            let qc = ops::rope(&heads(&q, nh, p, b, t)?, cos, sin)?;
            let kc = ops::rope(&heads(&k, nkv, p, b, t)?, cos, sin)?;
            let vc = heads(&v, nkv, p, b, t)?;
            let attn = if p > 0 {
                let qp = ops::rope(&heads(&q, nh, 0, 1, p)?, cos_p, sin_p)?;
                let kp = ops::rope(&heads(&k, nkv, 0, 1, p)?, cos_p, sin_p)?;
                let vp = heads(&v, nkv, 0, 1, p)?;
                let prefix_out = ops::causal_attention_shaped(&qp, &kp, &vp, shape)?;
                let out = ops::causal_attention_after(&qc, &kc, &vc, &kp, &vp, shape)?;
                Tensor::cat(
                    &[
                        &prefix_out.transpose(1, 2)?.reshape((p, nh * hd))?,
                        &out.transpose(1, 2)?.reshape((b * t, nh * hd))?,
                    ],
                    0,
                )?
            } else {
                ops::causal_attention_shaped(&qc, &kc, &vc, shape)?
                    .transpose(1, 2)?
                    .reshape((b * t, nh * hd))?
            };
            let attn = self.linear_train(block, l, LoraTarget::O, &attn, adapter)?;
            x = (x + output_norm(&attn, block.attn_out_norm.as_ref(), c.rms_norm_eps)?)?;
            let h = ops::rms_norm(&x, &block.post_norm, c.rms_norm_eps)?;
            let gate = self.linear_train(block, l, LoraTarget::Gate, &h, adapter)?;
            let up = self.linear_train(block, l, LoraTarget::Up, &h, adapter)?;
            let mlp = ops::gated(c.activation, &gate, &up)?;
            let mlp = self.linear_train(block, l, LoraTarget::Down, &mlp, adapter)?;
            x = (x + output_norm(&mlp, block.mlp_out_norm.as_ref(), c.rms_norm_eps)?)?;
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
