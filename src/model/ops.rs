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

/// act(gate) · up for f32 tensors on the CPU, in one pass over the values with a
/// vectorized e^x (candle's `silu` and `gelu` call `expf` per value and make two more
/// passes for the product), on the calling thread: a decode step's rows are too few to
/// share out. None for other dtypes and devices (then [`gated`] applies). Within a few ulp
/// of [`gated`], which the tests check.
pub fn gated_f32_cpu(
    activation: crate::model::config::Activation,
    gate: &Tensor,
    up: &Tensor,
) -> Result<Option<Tensor>> {
    use crate::model::config::Activation;
    use crate::stats::exp_nonpositive;
    if !gate.device().is_cpu() || gate.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (g, u) = (gate.contiguous()?, up.contiguous()?);
    let (gs, gl) = g.storage_and_layout();
    let (us, ul) = u.storage_and_layout();
    let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gs, &*us) else {
        return Ok(None);
    };
    if gl.shape() != ul.shape() {
        return Err(crate::Error::Internal(format!(
            "gated: gate {:?} and up {:?} differ",
            gl.shape(),
            ul.shape()
        )));
    }
    let n = gl.shape().elem_count();
    let gv = &gc.as_slice::<f32>()?[gl.start_offset()..][..n];
    let uv = &uc.as_slice::<f32>()?[ul.start_offset()..][..n];
    // σ(x) from e = e^{−|x|} ∈ (0, 1]: 1/(1 + e) for x ≥ 0, e/(1 + e) below.
    let sigmoid = |x: f32| {
        // e^{−87} is about f32's smallest normal: below it, 0.
        let a = x.abs();
        let e = if a < 87.0 {
            exp_nonpositive(-a.min(87.0))
        } else {
            0.0
        };
        let s = 1.0 / (1.0 + e);
        if x >= 0.0 {
            s
        } else {
            e * s
        }
    };
    let out: Vec<f32> = match activation {
        Activation::Silu => gv
            .iter()
            .zip(uv)
            .map(|(&x, &u)| x * sigmoid(x) * u)
            .collect(),
        // 0.5·x·(1 + tanh y) = x·σ(2y), y = √(2/π)·(x + 0.044715·x³).
        Activation::GeluTanh => gv
            .iter()
            .zip(uv)
            .map(|(&x, &u)| {
                let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                x * sigmoid(2.0 * y) * u
            })
            .collect(),
    };
    Ok(Some(Tensor::from_vec(
        out,
        gl.shape().clone(),
        gate.device(),
    )?))
}

/// Runs `f` on the values of `x` (row-major) when it lives on the CPU as f32: borrowed in
/// place when contiguous, else copied. None for other devices and dtypes. (A decode step
/// runs hundreds of these small ops; copying each input cost more than the op.)
pub(crate) fn with_cpu_f32<R>(
    x: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<Option<R>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<f32>()?[start..end]).map(Some);
        }
    }
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    f(&values).map(Some)
}

/// RMSNorm of rows of `w.len()` values from `x` into `out`: each over √(mean of squares +
/// eps), times w (candle's formula). Σ v² is summed in order, as candle's RMSNorm sums it,
/// so that both give the same bits (the int8 activation quantization downstream can turn
/// a last-bit difference into a visible one); eight rows' sums run side by side (lanes of
/// one vector on AVX2) so that the chain of dependent adds does not set the pace.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if x86_gather::usable(x.len()) {
        // SAFETY: `usable` checked AVX2 and that every row offset fits the gather's i32.
        return unsafe { x86_gather::rms_norm_rows(x, w, eps) };
    }
    rms_norm_rows_with(x, w, eps, sums_of_squares)
}

/// Σ v² of each of the `rows` ≤ 8 rows of d values in x, in order, the rows interleaved.
fn sums_of_squares(x: &[f32], d: usize, rows: usize) -> [f32; NORM_ROWS] {
    let mut sums = [0f32; NORM_ROWS];
    for j in 0..d {
        for (r, sum) in sums[..rows].iter_mut().enumerate() {
            let v = x[r * d + j];
            *sum += v * v;
        }
    }
    sums
}

/// Rows whose sums of squares run side by side.
const NORM_ROWS: usize = 8;

/// [`rms_norm_rows`] with `sums(x, d, rows)` giving Σ v² of each of the `rows` ≤ 8 rows of
/// `x` (in order).
#[inline(always)]
fn rms_norm_rows_with(
    x: &[f32],
    w: &[f32],
    eps: f32,
    sums: impl Fn(&[f32], usize, usize) -> [f32; NORM_ROWS],
) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0f32; x.len()];
    for (x, out) in x.chunks(NORM_ROWS * d).zip(out.chunks_mut(NORM_ROWS * d)) {
        let sums = sums(x, d, x.len() / d);
        for ((row, o), sum) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(sums) {
            let m = (sum / d as f32 + eps).sqrt();
            // (A plain loop, so that it inlines into the AVX2 caller and vectorizes there.)
            for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                *o = v / m * w;
            }
        }
    }
    out
}

/// [`rms_norm_rows`] with AVX2: a gather reads column j of eight rows into one vector.
#[cfg(target_arch = "x86_64")]
mod x86_gather {
    use std::arch::x86_64::*;

    use super::NORM_ROWS;

    /// Whether the AVX2 version runs here for a slice of `len` values.
    pub(super) fn usable(len: usize) -> bool {
        len < i32::MAX as usize && is_x86_feature_detected!("avx2")
    }

    /// # Safety
    /// [`usable`]`(x.len())` holds.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        super::rms_norm_rows_with(x, w, eps, |x, d, rows| {
            // Lanes past the last row read the last row again and are dropped.
            let at: [i32; NORM_ROWS] = std::array::from_fn(|r| (r.min(rows - 1) * d) as i32);
            let mut sums = [0f32; NORM_ROWS];
            // SAFETY: AVX2 is there (this function's feature); every index r·d + j with
            // r < rows and j < d lies in x, whose length fits an i32.
            unsafe {
                let at = _mm256_loadu_si256(at.as_ptr().cast());
                let mut acc = _mm256_setzero_ps();
                for j in 0..d {
                    let v = _mm256_i32gather_ps::<4>(x.as_ptr().add(j), at);
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
                }
                _mm256_storeu_ps(sums.as_mut_ptr(), acc);
            }
            sums
        })
    }
}

/// `x + y` and RMSNorm(x + y) · w over the last dimension in one pass on the calling
/// thread, for f32 on the CPU: a decode step's few rows cost less than a parallel op's
/// dispatch (candle's ops wake rayon's threads, which then spin against verity's pool).
/// None elsewhere.
pub fn residual_rms_norm_f32_cpu(
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    if x.shape() != y.shape() || w.dims() != [x.dim(D::Minus1)?] {
        return Err(crate::Error::Internal(format!(
            "residual norm: {:?} + {:?}, weight {:?}",
            x.shape(),
            y.shape(),
            w.shape()
        )));
    }
    let sum = with_cpu_f32(x, |xv| {
        with_cpu_f32(y, |yv| {
            Ok(xv.iter().zip(yv).map(|(x, y)| x + y).collect::<Vec<_>>())
        })
    })?
    .flatten();
    let Some(sum) = sum else {
        return Ok(None);
    };
    let Some(normed) = with_cpu_f32(w, |w| Ok(rms_norm_rows(&sum, w, eps)))? else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(sum, x.shape(), x.device())?,
        Tensor::from_vec(normed, x.shape(), x.device())?,
    )))
}

/// RMSNorm(x) · w over the last dimension, as [`residual_rms_norm_f32_cpu`] computes it;
/// None off the CPU or for other dtypes.
pub fn rms_norm_f32_cpu(x: &Tensor, w: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if w.dims() != [x.dim(D::Minus1)?] {
        return Err(crate::Error::Internal(format!(
            "rms_norm: weight {:?} for {:?}",
            w.shape(),
            x.shape()
        )));
    }
    let normed =
        with_cpu_f32(x, |xv| with_cpu_f32(w, |w| Ok(rms_norm_rows(xv, w, eps))))?.flatten();
    normed
        .map(|v| Ok(Tensor::from_vec(v, x.shape(), x.device())?))
        .transpose()
}

/// RoPE in the "thd" layout (x: (1, T, heads, d), cos/sin: (T, d/2); each head's halves
/// rotated as candle's `rope_thd` does) on the calling thread, for f32 on the CPU; None
/// elsewhere.
pub fn rope_thd_f32_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let (_, t, heads, d) = x.dims4()?;
    let half = d / 2;
    if cos.dims() != [t, half] || sin.dims() != [t, half] {
        return Ok(None);
    }
    let rotated = with_cpu_f32(x, |v| {
        with_cpu_f32(cos, |c| {
            with_cpu_f32(sin, |s| {
                let mut out = Vec::with_capacity(v.len());
                for (i, row) in v.chunks_exact(d).enumerate() {
                    let p = i / heads;
                    let (c, s) = (&c[p * half..][..half], &s[p * half..][..half]);
                    let (x1, x2) = row.split_at(half);
                    let pairs = || x1.iter().zip(x2).zip(c.iter().zip(s));
                    out.extend(pairs().map(|((a, b), (c, s))| a * c - b * s));
                    out.extend(pairs().map(|((a, b), (c, s))| a * s + b * c));
                }
                Ok(out)
            })
        })
    })?
    .flatten()
    .flatten();
    rotated
        .map(|v| Ok(Tensor::from_vec(v, x.shape(), x.device())?))
        .transpose()
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

    /// The single-threaded CPU norms and RoPE of a decode step give candle's bits.
    #[test]
    fn cpu_norms_and_rope_give_candles_bits() {
        let dev = Device::Cpu;
        let vals = |n: usize, k: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 % 997) as f32 / 498.5 - 1.0) * k)
                .collect()
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        // Fewer rows than a group of eight, then two groups and a part.
        let d = 96;
        let w = Tensor::from_vec(vals(d, 1.5), d, &dev).unwrap();
        for rows in [5, 19] {
            let x = Tensor::from_vec(vals(rows * d, 3.0), (rows, d), &dev).unwrap();
            let y = Tensor::from_vec(vals(rows * d, 0.5), (rows, d), &dev).unwrap();
            let normed = rms_norm_f32_cpu(&x, &w, 1e-6).unwrap().unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
            assert_eq!(bits(&normed), bits(&want));
            // The portable sums (the path without AVX2) give the same bits.
            let (xv, wv) = (
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                w.to_vec1::<f32>().unwrap(),
            );
            let portable = rms_norm_rows_with(&xv, &wv, 1e-6, sums_of_squares);
            assert_eq!(
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                bits(&want)
            );
            let (sum, normed) = residual_rms_norm_f32_cpu(&x, &y, &w, 1e-5)
                .unwrap()
                .unwrap();
            let want = (&x + &y).unwrap();
            assert_eq!(bits(&sum), bits(&want));
            assert_eq!(
                bits(&normed),
                bits(&candle_nn::ops::rms_norm(&want, &w, 1e-5).unwrap())
            );
        }
        let x = Tensor::from_vec(vals(5 * d, 3.0), (5, d), &dev).unwrap();
        // RoPE over (1, T, heads, d) with (T, d/2) angles.
        let (t, heads, hd) = (3, 4, 16);
        let q = Tensor::from_vec(vals(t * heads * hd, 2.0), (1, t, heads, hd), &dev).unwrap();
        let cos = Tensor::from_vec(vals(t * hd / 2, 1.0), (t, hd / 2), &dev).unwrap();
        let sin = Tensor::from_vec(vals(t * hd / 2, 0.7), (t, hd / 2), &dev).unwrap();
        let ours = rope_thd_f32_cpu(&q, &cos, &sin).unwrap().unwrap();
        let theirs = candle_nn::rotary_emb::rope_thd(&q, &cos, &sin).unwrap();
        assert_eq!(bits(&ours), bits(&theirs));
        // Off the fast path's dtype: None, and the callers use candle's ops.
        let bf = x.to_dtype(candle_core::DType::BF16).unwrap();
        let wb = w.to_dtype(candle_core::DType::BF16).unwrap();
        assert!(rms_norm_f32_cpu(&bf, &wb, 1e-6).unwrap().is_none());
    }

    /// The CPU fast path of the gated MLP body equals the f64 formula (and so candle's
    /// ops) within a few ulp, from deep negative to large positive gates.
    #[test]
    fn gated_f32_cpu_matches_the_formula_in_f64() {
        use crate::model::config::Activation;
        let dev = Device::Cpu;
        let mut gate: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.25).collect();
        gate.extend([-1e-30, 0.0, 1e-30, 1e-3, -1e-3, 88.0, -88.0, 200.0, -200.0]);
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 0.5 + (i % 7) as f32 * 0.3)
            .collect();
        let n = gate.len();
        let g = Tensor::from_vec(gate.clone(), (1, n), &dev).unwrap();
        let u = Tensor::from_vec(up.clone(), (1, n), &dev).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for act in [Activation::Silu, Activation::GeluTanh] {
            let fast = flat(gated_f32_cpu(act, &g, &u).unwrap().unwrap());
            let candle = flat(gated(act, &g, &u).unwrap());
            for i in 0..n {
                let (x, up) = (gate[i] as f64, up[i] as f64);
                // (the value, the argument of σ: its rounding in f32 scales the error)
                let (want, arg) = match act {
                    Activation::Silu => (x / (1.0 + (-x).exp()) * up, x),
                    Activation::GeluTanh => {
                        let y = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3));
                        // 0.5·(1 + tanh y) = σ(2y), without 1 + tanh's cancellation.
                        (x / (1.0 + (-2.0 * y).exp()) * up, 2.0 * y)
                    }
                };
                let tol = 4.0 * f32::EPSILON as f64 * want.abs() * (1.0 + arg.abs()) + 1e-35;
                assert!(
                    (fast[i] as f64 - want).abs() <= tol,
                    "{act:?}({x}) · {up}: {} vs {want}",
                    fast[i]
                );
                // candle's GELU, 0.5·x·(1 + tanh y), cancels for negative x: an absolute
                // error of about ε·|x·up| there.
                let tol = 8.0 * f32::EPSILON * (candle[i].abs() + (x * up).abs() as f32);
                assert!(
                    (fast[i] - candle[i]).abs() <= tol,
                    "{act:?}({x}): vs candle"
                );
            }
        }
    }

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
