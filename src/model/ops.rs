//! Differentiable building blocks for the training forward. candle's fused kernels
//! (`rms_norm`, `rope*`, `softmax_last_dim`, quantized matmul) drop gradients, so the
//! training pass composes these from primitive ops instead; the decode pass uses the fused
//! kernels, and the tests hold the two to the same numbers.

use candle_core::{Tensor, D};

use crate::error::Result;

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Half-split ("NEOX") rotary embedding of x (…, T, head_dim) with cos/sin (T, head_dim/2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[&r1, &r2], D::Minus1)?)
}

/// Softmax over the last dimension; the max shift is detached (softmax does not depend
/// on it), so no gradient flows through `max`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Log-softmax over the last dimension, differentiable.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// SwiGLU MLP body: silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Causal grouped-query attention over whole sequences.
/// q: (B, H, T, d), k and v: (B, KV, T, d), H a multiple of KV. Returns (B, H, T, d).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let groups = h / kv;
    let q = (q.contiguous()?.reshape((b, kv, groups * t, d))? / (d as f64).sqrt())?;
    let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?; // (B, KV, G·T, T)
    let mask = causal_mask(t, 0, t, q.dtype(), q.device())?;
    let scores = scores
        .reshape((b, kv, groups, t, t))?
        .broadcast_add(&mask)?
        .reshape((b, kv, groups * t, t))?;
    let weights = softmax(&scores)?;
    let out = weights.matmul(&v.contiguous()?)?; // (B, KV, G·T, d)
    Ok(out.reshape((b, h, t, d))?)
}

/// Additive mask (n_queries, n_keys): query i sits at key position `offset + i` and sees
/// keys 0..=offset+i; later keys get -inf.
pub fn causal_mask(
    n_queries: usize,
    offset: usize,
    n_keys: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n_queries)
        .flat_map(|i| {
            (0..n_keys).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n_queries, n_keys), device)?.to_dtype(dtype)?)
}
