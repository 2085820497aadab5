//! The decode step's small f32 ops on the CPU, on verity's own threads: RMSNorm (alone
//! and after the residual add), RoPE, the gated MLP body, a LoRA adapter's low-rank
//! delta, and the borrowing of a tensor's values in place ([`with_cpu_f32`]).
//!
//! candle's versions of these wake rayon's threads, which then spin against
//! [`crate::pool::Pool`], and copy their inputs; a decode step runs hundreds of them. The
//! norms and RoPE give candle's bits (tested), so a sequence's numbers do not depend on
//! which path ran; the gated body is within a few ulp of [`super::ops::gated`]. Each op
//! returns None off the CPU or for other dtypes, and the caller then uses candle's.

use candle_core::{Storage, Tensor, D};

use crate::error::Result;
use crate::pool::Pool;

/// act(gate) · up for f32 tensors on the CPU, in one pass over the values with a
/// vectorized e^x (candle's `silu` and `gelu` call `expf` per value and make two more
/// passes for the product). None for other dtypes and devices (then
/// [`super::ops::gated`] applies). Within a few ulp of it, which the tests check.
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
    let mut out = vec![0f32; n];
    // Parts of 64 values: cache lines of whole vectors.
    let part = n
        .div_ceil(2 * Pool::global().threads())
        .next_multiple_of(64);
    in_parts(&mut out, part, |i, out| {
        let (g, u) = (&gv[i * part..][..out.len()], &uv[i * part..][..out.len()]);
        let pairs = out.iter_mut().zip(g.iter().zip(u));
        match activation {
            Activation::Silu => pairs.for_each(|(o, (&x, &u))| *o = x * sigmoid(x) * u),
            // 0.5·x·(1 + tanh y) = x·σ(2y), y = √(2/π)·(x + 0.044715·x³).
            Activation::GeluTanh => pairs.for_each(|(o, (&x, &u))| {
                let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
                *o = x * sigmoid(2.0 * y) * u
            }),
        }
    });
    Ok(Some(Tensor::from_vec(
        out,
        gl.shape().clone(),
        gate.device(),
    )?))
}

/// `scale · x Aᵀ Bᵀ` (a LoRA delta, the formula of `lora::low_rank_delta`) for f32
/// tensors on the CPU: x (rows, in), A (rank, in), B (out, rank). Each row is computed
/// from its own values in a fixed order, so its bits do not depend on how many rows the
/// call holds (candle's matrix product picks its blocking by shape: a decode row's
/// adapter output, and then its greedy token, changed with the batch). None for other
/// dtypes and devices.
pub fn low_rank_delta_f32_cpu(
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    let (Ok((rank, width)), Ok((out_width, b_rank)), Ok((rows, x_width))) =
        (a.dims2(), b.dims2(), x.dims2())
    else {
        return Ok(None);
    };
    if rank != b_rank || width != x_width {
        return Err(crate::Error::Internal(format!(
            "LoRA delta: A {:?}, B {:?} and x {:?} do not chain",
            a.shape(),
            b.shape(),
            x.shape()
        )));
    }
    let scale = scale as f32;
    let delta = with_cpu_f32(a, |a| {
        with_cpu_f32(b, |b| {
            with_cpu_f32(x, |x| {
                let mut out = vec![0f32; rows * out_width];
                let part_len = rows_per_part(rows * out_width, out_width);
                in_parts(&mut out, part_len, |i, part| {
                    let first = i * part_len / out_width.max(1);
                    let mut low = vec![0f32; rank];
                    for (r, out_row) in part.chunks_exact_mut(out_width).enumerate() {
                        let x_row = &x[(first + r) * width..][..width];
                        for (l, a_row) in low.iter_mut().zip(a.chunks_exact(width)) {
                            *l = lane_dot(x_row, a_row);
                        }
                        for (o, b_row) in out_row.iter_mut().zip(b.chunks_exact(rank)) {
                            *o = scale * lane_dot(&low, b_row);
                        }
                    }
                });
                Ok(out)
            })
        })
    })?;
    match delta.flatten().flatten() {
        Some(out) => Ok(Some(Tensor::from_vec(out, (rows, out_width), x.device())?)),
        None => Ok(None),
    }
}

/// Σ a·b in eight interleaved partial sums (lane j takes elements j, j + 8, …) added in a
/// fixed order at the end: vectorizable, and the same bits for the same values.
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += x * y;
        }
    }
    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
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

/// RMSNorm of the rows of `w.len()` values in `x`: each over √(mean of squares +
/// eps), times w (candle's formula). Σ v² is summed in order, as candle's RMSNorm sums it,
/// so that both give the same bits (the int8 activation quantization downstream can turn
/// a last-bit difference into a visible one); eight rows' sums run side by side (lanes of
/// one vector on AVX2) so that the chain of dependent adds does not set the pace.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let part = NORM_ROWS * w.len();
    let mut out = vec![0f32; x.len()];
    in_parts(&mut out, part, |i, out| {
        let x = &x[i * part..][..out.len()];
        #[cfg(target_arch = "x86_64")]
        if x86_gather::usable(x.len()) {
            // SAFETY: `usable` checked AVX2 and that every row offset fits the gather's i32.
            return unsafe { x86_gather::rms_norm_rows(x, w, eps, out) };
        }
        rms_norm_rows_with(x, w, eps, out, sums_of_squares)
    });
    out
}

/// Below this many values an op runs on the calling thread: a pool call costs about a
/// microsecond, what a decode step's single row takes.
const MIN_PARALLEL_VALUES: usize = 4096;

/// Runs `f(i, part)` over `out` cut into parts of `part_len` values, shared out over
/// [`Pool`] when `out` is large enough. Every caller computes a part from its own rows
/// only, so the split changes no bit.
fn in_parts(out: &mut [f32], part_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let part_len = part_len.max(1);
    if out.len() >= MIN_PARALLEL_VALUES && out.len() > part_len {
        Pool::global().for_each_part(out, part_len, f);
    } else {
        out.chunks_mut(part_len)
            .enumerate()
            .for_each(|(i, o)| f(i, o));
    }
}

/// A part length of whole rows of `row` values that gives each thread of the pool about
/// two parts of `len` values.
fn rows_per_part(len: usize, row: usize) -> usize {
    let rows = len / row.max(1);
    rows.div_ceil(2 * Pool::global().threads()).max(1) * row
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
    out: &mut [f32],
    sums: impl Fn(&[f32], usize, usize) -> [f32; NORM_ROWS],
) {
    let d = w.len();
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
    pub(super) unsafe fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        super::rms_norm_rows_with(x, w, eps, out, |x, d, rows| {
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

/// `x + y` and RMSNorm(x + y) · w over the last dimension, for f32 on the CPU; None
/// elsewhere.
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
/// rotated as candle's `rope_thd` does), for f32 on the CPU; None elsewhere.
pub fn rope_thd_f32_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let (_, t, heads, d) = x.dims4()?;
    let half = d / 2;
    if cos.dims() != [t, half] || sin.dims() != [t, half] {
        return Ok(None);
    }
    let rotated = with_cpu_f32(x, |v| {
        with_cpu_f32(cos, |c| {
            with_cpu_f32(sin, |s| {
                let mut out = vec![0f32; v.len()];
                // Parts of whole positions (heads · d values each).
                let part = rows_per_part(v.len(), heads * d);
                in_parts(&mut out, part, |i, out| {
                    let v = &v[i * part..][..out.len()];
                    for (h, (row, o)) in v.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate()
                    {
                        let p = (i * part) / (heads * d) + h / heads;
                        let (c, s) = (&c[p * half..][..half], &s[p * half..][..half]);
                        let (x1, x2) = row.split_at(half);
                        let (o1, o2) = o.split_at_mut(half);
                        for j in 0..half {
                            o1[j] = x1[j] * c[j] - x2[j] * s[j];
                            o2[j] = x1[j] * s[j] + x2[j] * c[j];
                        }
                    }
                });
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The LoRA delta against scale · x Aᵀ Bᵀ in f64, and a row's bits the same alone or
    /// among 64 rows (shared out over the pool).
    #[test]
    fn low_rank_delta_matches_f64_and_does_not_depend_on_the_rows_around() {
        let dev = Device::Cpu;
        let vals = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i + seed) * 7919 % 997) as f32 / 498.5 - 1.0)
                .collect()
        };
        // 37 inputs: four groups of eight and a tail.
        let (rows, width, rank, out) = (64, 37, 8, 200);
        let (xv, av, bv) = (
            vals(rows * width, 1),
            vals(rank * width, 2),
            vals(out * rank, 3),
        );
        let x = Tensor::from_vec(xv.clone(), (rows, width), &dev).unwrap();
        let a = Tensor::from_vec(av.clone(), (rank, width), &dev).unwrap();
        let b = Tensor::from_vec(bv.clone(), (out, rank), &dev).unwrap();
        let scale = 0.75;
        let all = low_rank_delta_f32_cpu(&a, &b, scale, &x)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, got) in all.iter().enumerate() {
            let low: Vec<f64> = (0..rank)
                .map(|k| {
                    (0..width)
                        .map(|i| xv[r * width + i] as f64 * av[k * width + i] as f64)
                        .sum()
                })
                .collect();
            for (o, g) in got.iter().enumerate() {
                let want: f64 = scale
                    * (0..rank)
                        .map(|k| low[k] * bv[o * rank + k] as f64)
                        .sum::<f64>();
                assert!(
                    (*g as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "row {r} out {o}: {g} vs {want}"
                );
            }
        }
        for r in [0, 17, 63] {
            let alone = low_rank_delta_f32_cpu(&a, &b, scale, &x.narrow(0, r, 1).unwrap())
                .unwrap()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone[0]), bits(&all[r]), "row {r}");
        }
    }

    /// The CPU norms and RoPE of a decode step give candle's bits, on one thread or shared
    /// out.
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
        // Fewer rows than a group of eight, then groups and a part.
        let d = 96;
        let w = Tensor::from_vec(vals(d, 1.5), d, &dev).unwrap();
        // (64 rows: enough values for the parallel path.)
        for rows in [5, 19, 64] {
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
            let mut portable = vec![0f32; xv.len()];
            rms_norm_rows_with(&xv, &wv, 1e-6, &mut portable, sums_of_squares);
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
        // (80 positions: enough values for the parallel path.)
        for t in [3, 80] {
            let (heads, hd) = (4, 16);
            let q = Tensor::from_vec(vals(t * heads * hd, 2.0), (1, t, heads, hd), &dev).unwrap();
            let cos = Tensor::from_vec(vals(t * hd / 2, 1.0), (t, hd / 2), &dev).unwrap();
            let sin = Tensor::from_vec(vals(t * hd / 2, 0.7), (t, hd / 2), &dev).unwrap();
            let ours = rope_thd_f32_cpu(&q, &cos, &sin).unwrap().unwrap();
            let theirs = candle_nn::rotary_emb::rope_thd(&q, &cos, &sin).unwrap();
            assert_eq!(bits(&ours), bits(&theirs));
        }
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
        // Enough values for the parallel path, its parts not aligned with the pattern.
        let gate = gate.repeat(6);
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 0.5 + (i % 7) as f32 * 0.3)
            .collect();
        let n = gate.len();
        let g = Tensor::from_vec(gate.clone(), (1, n), &dev).unwrap();
        let u = Tensor::from_vec(up.clone(), (1, n), &dev).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for act in [Activation::Silu, Activation::GeluTanh] {
            let fast = flat(gated_f32_cpu(act, &g, &u).unwrap().unwrap());
            let candle = flat(crate::model::ops::gated(act, &g, &u).unwrap());
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
}
