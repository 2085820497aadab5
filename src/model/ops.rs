//! Differentiable building blocks for the training forward. candle's fused kernels
//! (`rms_norm`, `rope*`, `softmax_last_dim`, quantized matmul) drop gradients, so the
//! training pass composes these from primitive ops instead; the decode pass uses the fused
//! kernels, and the tests hold the two to the same numbers.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, D};

use crate::error::Result;

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Half-split ("NEOX") rotary embedding of x (…, T, head_dim) with cos/sin (T, r/2): the
/// first r dimensions of each head rotate, the rest pass through (partial rotary, r < d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let r = 2 * cos.dim(D::Minus1)?;
    if r < d {
        let rotated = rope(&x.narrow(D::Minus1, 0, r)?, cos, sin)?;
        return Ok(Tensor::cat(
            &[&rotated, &x.narrow(D::Minus1, r, d - r)?],
            D::Minus1,
        )?);
    }
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

/// `x Wᵀ` for x (rows, in) and a frozen weight W (out, in): differentiable w.r.t. x only.
///
/// candle's matmul backward computes the gradient of both operands. For a base-model
/// weight that is thrown away, yet it costs a weight-sized GEMM and a weight-sized buffer
/// per layer: half the backward's work and most of its memory when only LoRA trains.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if weight.rank() != 2 || x.rank() != 2 || x.dim(1)? != weight.dim(1)? {
        return Err(crate::error::Error::InvalidArgument(format!(
            "frozen_linear: x {:?} does not fit a weight {:?}",
            x.dims(),
            weight.dims()
        )));
    }
    let op = FrozenLinear {
        weight: weight.contiguous()?,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct FrozenLinear {
    /// (out, in), contiguous.
    weight: Tensor,
}

impl FrozenLinear {
    /// (batch, m, n, k) of the product and the layout of Wᵀ as candle's matmul takes them.
    fn geometry(&self, x: &Layout) -> candle_core::Result<((usize, usize, usize, usize), Layout)> {
        let (m, k) = x.shape().dims2()?;
        let n = self.weight.dim(0)?;
        let transposed = self.weight.layout().transpose(0, 1)?;
        Ok(((1, m, n, k), transposed))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bmnk, w_t) = self.geometry(layout)?;
        let (storage, _) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("frozen_linear: the weight is not on the CPU")
        };
        Ok((
            x.matmul(w, bmnk, layout, &w_t)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (bmnk, w_t) = self.geometry(layout)?;
        let (storage, _) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            candle_core::bail!("frozen_linear: the weight is not on the GPU")
        };
        Ok((
            x.matmul(w, bmnk, layout, &w_t)?,
            Shape::from((bmnk.1, bmnk.2)),
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// A strided view made fit to be a matmul operand on the tensor's device. candle's CPU
/// matmul takes any strides; its CUDA one (cuBLAS) only row- or column-major matrices whose
/// leading dimension is the row length, so a permuted KV cache or a narrowed row of
/// attention weights is copied there (and left a view on the CPU, where copying costs).
pub fn gemm_operand(t: Tensor) -> Result<Tensor> {
    Ok(if t.device().is_cpu() {
        t
    } else {
        t.contiguous()?
    })
}

/// SwiGLU MLP body: silu(gate) · up.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// The gated MLP body for `activation`: act(gate) · up (SwiGLU, or GeGLU with the tanh
/// GELU). Both are differentiable candle ops.
pub fn gated(
    activation: crate::model::config::Activation,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Tensor> {
    use crate::model::config::Activation;
    match activation {
        Activation::Silu => swiglu(gate, up),
        Activation::GeluTanh => Ok((gate.gelu()? * up)?),
    }
}

/// How attention sees the keys: logits scaled by `scale`, and, with a `window`, each query
/// only the `window` most recent positions (itself included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Multiplies q·k (1/√head_dim for most models).
    pub scale: f64,
    /// Sliding window, if the layer has one.
    pub window: Option<usize>,
}

#[cfg(any(test, feature = "test-hooks"))]
impl AttentionShape {
    /// Plain causal attention scaled by 1/√`head_dim`.
    pub fn causal(head_dim: usize) -> Self {
        AttentionShape {
            scale: 1.0 / (head_dim as f64).sqrt(),
            window: None,
        }
    }
}

/// Causal grouped-query attention over whole sequences.
/// q: (B, H, T, d), k and v: (B, KV, T, d), H a multiple of KV. Returns (B, H, T, d).
#[cfg(any(test, feature = "test-hooks"))]
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(3)?;
    causal_attention_shaped(q, k, v, AttentionShape::causal(d))
}

/// [`causal_attention`] with a logit scale and an optional sliding window.
pub fn causal_attention_shaped(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttentionShape,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let groups = h / kv;
    let q = (q.contiguous()?.reshape((b, kv, groups * t, d))? * shape.scale)?;
    let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?; // (B, KV, G·T, T)
    let mask = attention_mask(t, 0, t, shape.window, q.dtype(), q.device())?;
    let scores = scores
        .reshape((b, kv, groups, t, t))?
        .broadcast_add(&mask)?
        .reshape((b, kv, groups * t, t))?;
    let weights = softmax(&scores)?;
    let out = weights.matmul(&v.contiguous()?)?; // (B, KV, G·T, d)
    Ok(out.reshape((b, h, t, d))?)
}

/// Causal attention of B continuations after one shared prefix: each continuation's query
/// sees all P prefix keys and its own keys up to itself. q: (B, H, T, d); k, v: (B, KV, T, d);
/// prefix_k, prefix_v: (1, KV, P, d). Returns (B, H, T, d). Equals
/// [`causal_attention_shaped`] over prefix + continuation, row by row.
pub fn causal_attention_after(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix_k: &Tensor,
    prefix_v: &Tensor,
    shape: AttentionShape,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let p = prefix_k.dim(2)?;
    let groups = h / kv;
    let q = (q.contiguous()?.reshape((b, kv, groups * t, d))? * shape.scale)?;
    // The prefix's keys and values, the same for every row (gradients sum back over B).
    let pk = prefix_k.broadcast_as((b, kv, p, d))?.contiguous()?;
    let pv = prefix_v.broadcast_as((b, kv, p, d))?.contiguous()?;
    let to_prefix = q.matmul(&pk.transpose(2, 3)?.contiguous()?)?; // (B, KV, G·T, P)
                                                                   // Continuation row i sits at position p + i: with a window it may not see the oldest
                                                                   // prefix keys.
    let to_prefix = match shape.window {
        Some(w) if p + t > w => {
            // Every prefix key is at or before each continuation row: only the window hides.
            let mask = attention_mask(t, p, p, Some(w), q.dtype(), q.device())?;
            to_prefix
                .reshape((b, kv, groups, t, p))?
                .broadcast_add(&mask)?
                .reshape((b, kv, groups * t, p))?
        }
        _ => to_prefix,
    };
    let mask = attention_mask(t, 0, t, shape.window, q.dtype(), q.device())?;
    let to_self = q
        .matmul(&k.transpose(2, 3)?.contiguous()?)?
        .reshape((b, kv, groups, t, t))?
        .broadcast_add(&mask)?
        .reshape((b, kv, groups * t, t))?;
    let weights = softmax(&Tensor::cat(&[&to_prefix, &to_self], D::Minus1)?)?;
    let out = (gemm_operand(weights.narrow(D::Minus1, 0, p)?)?.matmul(&pv)?
        + gemm_operand(weights.narrow(D::Minus1, p, t)?)?.matmul(&v.contiguous()?)?)?;
    Ok(out.reshape((b, h, t, d))?)
}

/// Additive mask (n_queries, n_keys) of keys at positions 0.. for queries at positions
/// `offset`..: query i sees keys `offset + i − window` < j ≤ `offset + i` (no lower bound
/// without a window); the others get -inf.
pub fn attention_mask(
    n_queries: usize,
    offset: usize,
    n_keys: usize,
    window: Option<usize>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n_queries)
        .flat_map(|i| {
            let at = offset + i;
            (0..n_keys).map(move |j| {
                let too_old = window.is_some_and(|w| j + w <= at);
                if j > at || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (n_queries, n_keys), device)?.to_dtype(dtype)?)
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
    attention_mask(n_queries, offset, n_keys, None, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Attention after a shared prefix equals attention over prefix + continuation, row by
    /// row, with and without a sliding window the continuation outgrows.
    #[test]
    fn attention_after_a_prefix_equals_attention_over_the_whole_sequence() {
        let dev = Device::Cpu;
        let (h, kv, p, t, d) = (4, 2, 5, 4, 8);
        let rand = |s: (usize, usize, usize, usize)| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        let (qp, kp, vp) = (rand((1, h, p, d)), rand((1, kv, p, d)), rand((1, kv, p, d)));
        let (qc, kc, vc) = (rand((1, h, t, d)), rand((1, kv, t, d)), rand((1, kv, t, d)));
        for window in [None, Some(3), Some(6)] {
            let shape = AttentionShape { scale: 0.3, window };
            let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 2).unwrap();
            let whole =
                causal_attention_shaped(&cat(&qp, &qc), &cat(&kp, &kc), &cat(&vp, &vc), shape)
                    .unwrap();
            let after = causal_attention_after(&qc, &kc, &vc, &kp, &vp, shape).unwrap();
            let diff = (whole.narrow(2, p, t).unwrap() - after)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "window {window:?}: {diff}");
        }
    }

    /// Forward and gradient equal candle's own matmul's; the weight gets no gradient.
    #[test]
    fn frozen_linear_matches_matmul_and_leaves_the_weight_without_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();
        let ours = frozen_linear(x.as_tensor(), &w).unwrap();
        let theirs = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&ours, &theirs) < 1e-5);
        let grad = |y: &Tensor| {
            let store = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            (
                store.get(x.as_tensor()).unwrap().clone(),
                store.get(&w).is_some(),
            )
        };
        let (g_ours, w_has_grad) = grad(&ours);
        let (g_theirs, _) = grad(&theirs);
        assert!(diff(&g_ours, &g_theirs) < 1e-5);
        // By hand: dL/dx = probe · W.
        assert!(diff(&g_ours, &probe.matmul(&w).unwrap()) < 1e-5);
        assert!(!w_has_grad);
        assert!(frozen_linear(x.as_tensor(), &w.t().unwrap()).is_err());
    }
}
