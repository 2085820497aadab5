//! CPU matrix products with GGML-quantized weights: `y = x · Wᵀ` for a weight `W` of
//! shape (out, in) stored in GGUF blocks and f32 activations `x` of shape (m, in).
//!
//! candle 0.11 runs these row by row, and for Q4_1 with a scalar dot product, so batch-1
//! decode is far from the memory-bandwidth limit and batches barely scale. This module
//! follows llama.cpp's ggml-cpu quants instead:
//!
//! 1. each activation row is quantized once to 8-bit blocks: [`Q8Pair`] (two blocks of 32
//!    values, each with scale `d` and `s = d·Σq`, like ggml's Q8_1) for the 32-value
//!    weight types, [`Q8KBlock`] (256 values with 16-value sums, ggml's Q8_K) for the
//!    K-quants;
//! 2. each weight block is dotted with integer multiply-adds (AVX2 `maddubs`/`madd`, or
//!    VNNI `vpdpbusd`) and scaled in f32;
//! 3. a weight row is decoded once and dotted against a tile of up to [`TILE`] activation
//!    rows, so a batch reads the weights once; a single row takes four weight rows at a
//!    time; threads split the output columns; weights are prefetched ahead.
//!
//! **Determinism.** Every output element is computed by the same sequence of floating-point
//! operations whatever `m` is, whichever tile it falls in and however the columns are split
//! among threads: integer parts are exact, and the f32 accumulation of one (row, column)
//! pair never mixes with another pair's. So a sequence's logits do not depend on what else
//! is in its batch.
//!
//! The scalar kernels are the reference and the path on non-x86 machines; the x86 kernels
//! (AVX2, AVX-VNNI, AVX-512 VNNI) are chosen at run time (`is_x86_feature_detected!`).
//! Weight types without a kernel here stay on candle's `QMatMul`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use parking_lot::Mutex;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Activation rows dotted against one decoded weight row at a time.
pub const TILE: usize = 4;

/// Weight rows that all tiles of a batch meet before the next ones (see `dot_rows`).
const ROW_BLOCK: usize = 32;

/// Below this many multiply-adds (m · out · in) a product runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// How far ahead (bytes) the kernels prefetch weights.
const PREFETCH: usize = 4096;

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// Whether `VERITY_CANDLE_QMATMUL=1` asks for candle's quantized matmul instead (A/B runs).
pub fn disabled_by_env() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        std::env::var("VERITY_CANDLE_QMATMUL").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Whether [`forward`] handles this weight: a 2-D CPU tensor of a type with a kernel here.
pub fn supports(w: &QTensor) -> bool {
    let Ok((_, k)) = w.shape().dims2() else {
        return false;
    };
    matches!(w.device(), Device::Cpu)
        && WeightType::of(w.dtype()).is_some_and(|t| k > 0 && k.is_multiple_of(t.block_elems()))
}

/// `x · Wᵀ` for `x` of shape (…, in) in any float dtype; the result has x's dtype and
/// shape (…, out). Fails on a weight that [`supports`] rejects.
pub fn forward(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let ty = WeightType::of(w.dtype())
        .filter(|_| supports(w))
        .ok_or_else(|| Error::InvalidArgument(format!("no CPU kernel for {w:?}")))?;
    let mut out_dims = x.dims().to_vec();
    if out_dims.last() != Some(&k) {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: input {:?} does not end in {k} (weight {:?})",
            x.dims(),
            w.shape()
        )));
    }
    let m = x.elem_count() / k;
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let data = w.data()?;
    let y = matmul(ty, Isa::detect(), &data, n, k, &xs, m)?;
    let y = Tensor::from_vec(y, out_dims, &Device::Cpu)?;
    Ok(if x.dtype() == DType::F32 {
        y
    } else {
        y.to_dtype(x.dtype())?
    })
}

/// The weight block formats with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightType {
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl WeightType {
    fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    fn block_elems(self) -> usize {
        match self {
            Self::Q4_1 | Self::Q5_0 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q6K => QK_K,
        }
    }
}

/// The instruction set the kernels use, detected once.
#[derive(Debug, Clone, Copy)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    X86(x86::Simd),
}

impl Isa {
    fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if let Some(s) = x86::Simd::detect() {
                return Isa::X86(s);
            }
            Isa::Scalar
        })
    }
}

/// `y = x · Wᵀ` on raw GGUF blocks: `w` holds n rows of k values, `x` m rows of k values;
/// returns y as m rows of n values.
fn matmul(
    ty: WeightType,
    isa: Isa,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    match ty {
        WeightType::Q4_1 => run::<Q4_1>(isa, w, n, k, x, m),
        WeightType::Q5_0 => run::<Q5_0>(isa, w, n, k, x, m),
        WeightType::Q8_0 => run::<Q8_0>(isa, w, n, k, x, m),
        WeightType::Q4K => run::<Q4K>(isa, w, n, k, x, m),
        WeightType::Q6K => run::<Q6K>(isa, w, n, k, x, m),
    }
}

// ---------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------

/// 64 activations as two blocks of 32 i8 with scale `d` and `s = d · Σ qs` each (ggml's
/// Q8_1 with f32 scales), laid out for 512-bit kernels: quants contiguous, `d` as
/// [d₀ ×8, d₁ ×8] and `s` as [s₀, 0 ×7, s₁, 0 ×7], the lanes of a 16-lane accumulator
/// that hold each block. A row with an odd number of blocks ends in a zero block.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Q8Pair {
    qs: [i8; 64],
    d: [f32; 16],
    s: [f32; 16],
}

impl Q8Pair {
    /// Block h (0 or 1): its quants, d and s.
    fn block(&self, h: usize) -> (&[i8], f32, f32) {
        (&self.qs[32 * h..32 * h + 32], self.d[8 * h], self.s[8 * h])
    }
}

/// The 32-value activation blocks of a row, in order.
fn q8_blocks(a: &[Q8Pair]) -> impl Iterator<Item = (&[i8], f32, f32)> {
    a.iter().flat_map(|p| [p.block(0), p.block(1)])
}

/// 256 activations as i8 with scale `d` and the sums of each 16 (ggml's Q8_K).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Q8KBlock {
    d: f32,
    qs: [i8; QK_K],
    bsums: [i16; QK_K / 16],
}

/// Largest |v|, in a shape the compiler vectorizes.
fn abs_max(x: &[f32]) -> f32 {
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    m.iter().fold(0f32, |a, &v| a.max(v))
}

/// v rounded to the nearest integer, ties to even, for |v| < 2²²: adding 1.5 · 2²³ drops
/// the fraction in the f32 rounding itself and leaves the integer in the low mantissa
/// bits. Unlike `f32::round` and `as` casts it is no library call and no saturating
/// conversion, so the quantization loops vectorize on any x86-64. (A NaN gives some value;
/// no panic, no UB.)
fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 0x4B40_0000
    (v + MAGIC).to_bits() as i32 - 0x4B40_0000
}

/// Up to 64 values as a [`Q8Pair`]; missing values are zeros.
fn quantize_q8(x: &[f32]) -> Q8Pair {
    let mut p = Q8Pair {
        qs: [0; 64],
        d: [0.0; 16],
        s: [0.0; 16],
    };
    for (h, x) in x.chunks(32).take(2).enumerate() {
        let d = abs_max(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in p.qs[32 * h..32 * h + 32].iter_mut().zip(x) {
            // |v · id| ≤ 127 up to rounding, so i32 → i8 keeps the value.
            let r = round_small(v * id);
            *q = r as i8;
            sum += r;
        }
        p.d[8 * h..8 * h + 8].fill(d);
        p.s[8 * h] = d * sum as f32;
    }
    p
}

fn quantize_q8k(x: &[f32]) -> Q8KBlock {
    // The value of largest magnitude maps to ∓127 (ggml uses -128; candle and we keep the
    // range symmetric).
    let amax = abs_max(x);
    let mut b = Q8KBlock {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let Some(&max) = x.iter().find(|v| v.abs() == amax).filter(|_| amax != 0.0) else {
        return b;
    };
    let iscale = -127.0 / max;
    for (q, v) in b.qs.iter_mut().zip(x) {
        *q = round_small(iscale * v) as i8;
    }
    for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
        *s = q.iter().map(|&v| v as i16).sum();
    }
    b.d = 1.0 / iscale;
    b
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

// ---------------------------------------------------------------------------------------
// Kernels: one implementation of this trait per weight type
// ---------------------------------------------------------------------------------------

trait Kernel {
    /// The activation block this weight type is dotted with, and its number of values.
    type Act: Copy + Send + Sync;
    const ACT_ELEMS: usize;
    /// Values and bytes per weight block.
    const ELEMS: usize;
    const BYTES: usize;
    /// Up to ACT_ELEMS values (a row's last block may be short: zeros fill it).
    fn quantize(x: &[f32]) -> Self::Act;
    /// Reference dot product of one weight row (its blocks) with one activation row.
    fn dot_scalar(w: &[u8], a: &[Self::Act]) -> f32;
    /// W weight rows against R activation rows, with AVX2.
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Self::Act]; R],
    ) -> [[f32; R]; W];
}

struct Q4_1;
struct Q5_0;
struct Q8_0;
struct Q4K;
struct Q6K;

impl Kernel for Q4_1 {
    type Act = Q8Pair;
    const ACT_ELEMS: usize = 64;
    const ELEMS: usize = 32;
    const BYTES: usize = 20; // d: f16, m: f16, qs: [u8; 16] (value j | value j+16 << 4)
    fn quantize(x: &[f32]) -> Q8Pair {
        quantize_q8(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8Pair]) -> f32 {
        let mut sum = 0f32;
        for (wb, (qs, ad, as_)) in w.chunks_exact(Self::BYTES).zip(q8_blocks(a)) {
            let (d, mn) = (f16_at(wb, 0), f16_at(wb, 2));
            let mut sumi = 0i32;
            for j in 0..16 {
                let q = wb[4 + j];
                sumi += (q & 0xF) as i32 * qs[j] as i32 + (q >> 4) as i32 * qs[j + 16] as i32;
            }
            sum += d * ad * sumi as f32 + mn * as_;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8Pair]; R],
    ) -> [[f32; R]; W] {
        x86::q4_1(s, w, a)
    }
}

impl Kernel for Q5_0 {
    type Act = Q8Pair;
    const ACT_ELEMS: usize = 64;
    const ELEMS: usize = 32;
    const BYTES: usize = 22; // d: f16, qh: u32 (5th bits), qs: [u8; 16]
    fn quantize(x: &[f32]) -> Q8Pair {
        quantize_q8(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8Pair]) -> f32 {
        let mut sum = 0f32;
        for (wb, (qs, ad, _)) in w.chunks_exact(Self::BYTES).zip(q8_blocks(a)) {
            let d = f16_at(wb, 0);
            let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
            let mut sumi = 0i32;
            for j in 0..16 {
                let q = wb[6 + j] as u32;
                let lo = ((q & 0xF) | ((qh >> j) & 1) << 4) as i32 - 16;
                let hi = ((q >> 4) | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
                sumi += lo * qs[j] as i32 + hi * qs[j + 16] as i32;
            }
            sum += d * ad * sumi as f32;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8Pair]; R],
    ) -> [[f32; R]; W] {
        x86::q5_0(s, w, a)
    }
}

impl Kernel for Q8_0 {
    type Act = Q8Pair;
    const ACT_ELEMS: usize = 64;
    const ELEMS: usize = 32;
    const BYTES: usize = 34; // d: f16, qs: [i8; 32]
    fn quantize(x: &[f32]) -> Q8Pair {
        quantize_q8(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8Pair]) -> f32 {
        let mut sum = 0f32;
        for (wb, (qs, ad, _)) in w.chunks_exact(Self::BYTES).zip(q8_blocks(a)) {
            let sumi: i32 = wb[2..]
                .iter()
                .zip(qs)
                .map(|(&q, &v)| q as i8 as i32 * v as i32)
                .sum();
            sum += f16_at(wb, 0) * ad * sumi as f32;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8Pair]; R],
    ) -> [[f32; R]; W] {
        x86::q8_0(s, w, a)
    }
}

/// Q4_K's 6-bit scale and min of sub-block j (ggml's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

impl Kernel for Q4K {
    type Act = Q8KBlock;
    const ACT_ELEMS: usize = QK_K;
    const ELEMS: usize = QK_K;
    // d: f16, dmin: f16, scales: [u8; 12] (8 scales and 8 mins of 6 bits), qs: [u8; 128]:
    // in each 32 bytes, low nibbles are 32 values of sub-block 2c, high nibbles of 2c+1.
    const BYTES: usize = 144;
    fn quantize(x: &[f32]) -> Q8KBlock {
        quantize_q8k(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8KBlock]) -> f32 {
        let mut sum = 0f32;
        for (wb, ab) in w.chunks_exact(Self::BYTES).zip(a) {
            let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
            let scales = &wb[4..16];
            let qs = &wb[16..];
            let (mut sumi, mut summ) = (0i32, 0i32);
            for sub in 0..8 {
                let (sc, mn) = q4k_scale_min(sub, scales);
                let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
                let shift = 4 * (sub % 2);
                let dot: i32 = bytes
                    .iter()
                    .zip(&ab.qs[32 * sub..32 * sub + 32])
                    .map(|(&q, &v)| ((q >> shift) & 0xF) as i32 * v as i32)
                    .sum();
                sumi += sc as i32 * dot;
                summ += mn as i32 * (ab.bsums[2 * sub] as i32 + ab.bsums[2 * sub + 1] as i32);
            }
            sum += d * ab.d * sumi as f32 - dmin * ab.d * summ as f32;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8KBlock]; R],
    ) -> [[f32; R]; W] {
        x86::q4k(s, w, a)
    }
}

impl Kernel for Q6K {
    type Act = Q8KBlock;
    const ACT_ELEMS: usize = QK_K;
    const ELEMS: usize = QK_K;
    // ql: [u8; 128] low 4 bits, qh: [u8; 64] high 2 bits, scales: [i8; 16], d: f16.
    // Value = (ql | qh << 4) - 32; see `q6k_value` for where each one lives.
    const BYTES: usize = 210;
    fn quantize(x: &[f32]) -> Q8KBlock {
        quantize_q8k(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8KBlock]) -> f32 {
        let mut sum = 0f32;
        for (wb, ab) in w.chunks_exact(Self::BYTES).zip(a) {
            let d = f16_at(wb, 208);
            let mut sumi = 0i32;
            for sub in 0..16 {
                let dot: i32 = (16 * sub..16 * sub + 16)
                    .map(|i| q6k_value(wb, i) * ab.qs[i] as i32)
                    .sum();
                sumi += wb[192 + sub] as i8 as i32 * dot;
            }
            sum += d * ab.d * sumi as f32;
        }
        sum
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8KBlock]; R],
    ) -> [[f32; R]; W] {
        x86::q6k(s, w, a)
    }
}

/// Value i (0..256) of a Q6_K block, in -32..32. Each half of 128 values uses 64 bytes of
/// ql and 32 of qh: value 32c + l (c < 4, l < 32) has its low bits in ql[l + 32(c % 2)]
/// (low nibble for c < 2, high for c ≥ 2) and its high bits at bit 2c of qh[l].
fn q6k_value(wb: &[u8], i: usize) -> i32 {
    let (half, r) = (i / 128, i % 128);
    let (c, l) = (r / 32, r % 32);
    let ql = wb[64 * half + l + 32 * (c % 2)];
    let qh = wb[128 + 32 * half + l];
    let lo = if c < 2 { ql & 0xF } else { ql >> 4 };
    let hi = (qh >> (2 * c)) & 3;
    (lo | hi << 4) as i32 - 32
}

// ---------------------------------------------------------------------------------------
// The driver: quantize activations, split output columns among threads, tile rows
// ---------------------------------------------------------------------------------------

fn run<K: Kernel>(isa: Isa, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Result<Vec<f32>> {
    if k == 0 || !k.is_multiple_of(K::ELEMS) || x.len() != m * k {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: k = {k} with {} inputs for m = {m}",
            x.len()
        )));
    }
    let nb = k / K::ELEMS;
    let row_bytes = nb * K::BYTES;
    if w.len() != n * row_bytes {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: {} weight bytes for {n} rows of {row_bytes}",
            w.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(vec![0.0; m * n]);
    }
    let per_row = k.div_ceil(K::ACT_ELEMS);
    let acts: Vec<K::Act> = x
        .chunks_exact(k)
        .flat_map(|row| row.chunks(K::ACT_ELEMS).map(K::quantize))
        .collect();
    let acts: Vec<&[K::Act]> = acts.chunks_exact(per_row).collect();

    // yt holds y transposed (n × m): each weight row's m outputs are contiguous, so
    // threads own disjoint column ranges of y.
    let mut yt = vec![0f32; n * m];
    let columns = |j0: usize, out: &mut [f32]| dot_rows::<K>(isa, w, row_bytes, j0, &acts, out);
    let pool = Pool::get();
    let threads = pool.threads();
    if threads <= 1 || n * k * m < min_parallel_work() {
        columns(0, &mut yt);
    } else {
        // A few chunks per thread for balance; never under 16 columns each.
        let per_chunk = n.div_ceil(4 * threads).max(16);
        match pool {
            Pool::Rayon => yt
                .par_chunks_mut(per_chunk * m)
                .enumerate()
                .for_each(|(c, out)| columns(c * per_chunk, out)),
            Pool::Candle => {
                // Each chunk behind its own (uncontended) lock: the pool's closure is
                // shared by its threads, which take chunks from a common cursor.
                let chunks: Vec<Mutex<&mut [f32]>> =
                    yt.chunks_mut(per_chunk * m).map(Mutex::new).collect();
                candle_core::utils::barrier_pool().execute_chunked(chunks.len(), |range| {
                    for c in range {
                        columns(c * per_chunk, &mut chunks[c].lock());
                    }
                });
            }
        }
    }
    if m == 1 {
        return Ok(yt);
    }
    // Transpose in blocks of 64 columns, so that reads and writes stay in cache.
    let mut y = vec![0f32; m * n];
    for j0 in (0..n).step_by(64) {
        let j1 = (j0 + 64).min(n);
        for (i, y_row) in y.chunks_exact_mut(n).enumerate() {
            for (j, v) in (j0..j1).zip(&mut y_row[j0..j1]) {
                *v = yt[j * m + i];
            }
        }
    }
    Ok(y)
}

/// The threads that share out a product's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// candle's persistent pool, the one its own CPU ops use: the calling thread works
    /// too and the others spin briefly between calls, so the hundreds of small products
    /// of a decode step pay no wake-ups, and no second set of threads competes with
    /// candle's for the cores. The default: SmolLM2 batch-1 decode on 2 cores runs at
    /// ~100 tok/s with it and ~60 with rayon. A call waits for every thread at its
    /// barrier, which stalls when another process holds a core.
    Candle,
    /// rayon's global pool (`VERITY_QMATMUL_POOL=rayon`): work-stealing, so a thread the
    /// OS has not scheduled holds nobody up.
    Rayon,
}

impl Pool {
    fn get() -> Self {
        static POOL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();
        *POOL.get_or_init(|| match std::env::var("VERITY_QMATMUL_POOL").as_deref() {
            Ok("rayon") => Pool::Rayon,
            _ => Pool::Candle,
        })
    }

    fn threads(self) -> usize {
        match self {
            Pool::Rayon => rayon::current_num_threads(),
            Pool::Candle => candle_core::utils::barrier_pool().n_workers() + 1,
        }
    }
}

fn min_parallel_work() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("VERITY_QMATMUL_MIN_PARALLEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_PARALLEL_WORK)
    })
}

/// Outputs of weight rows j0, j0 + 1, … for all m activation rows (`out` holds m values
/// per weight row).
fn dot_rows<K: Kernel>(
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    acts: &[&[K::Act]],
    out: &mut [f32],
) {
    let m = acts.len();
    let row = |j: usize| &w[j * row_bytes..(j + 1) * row_bytes];
    match isa {
        Isa::Scalar => {
            for (j, o) in (j0..).zip(out.chunks_exact_mut(m)) {
                for (o, a) in o.iter_mut().zip(acts) {
                    *o = K::dot_scalar(row(j), a);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::X86(s) if m == 1 => {
            // One activation row: four weight rows at a time, four independent chains.
            let a = [acts[0]];
            let mut quads = out.chunks_exact_mut(4);
            let mut j = j0;
            for o in &mut quads {
                let y = K::dot_x86::<4, 1>(s, [row(j), row(j + 1), row(j + 2), row(j + 3)], a);
                for (o, y) in o.iter_mut().zip(y) {
                    *o = y[0];
                }
                j += 4;
            }
            for o in quads.into_remainder() {
                *o = K::dot_x86::<1, 1>(s, [row(j)], a)[0][0];
                j += 1;
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::X86(s) => {
            // Several activation rows: a tile of TILE of them against the weight rows (two
            // at a time where registers allow), ROW_BLOCK weight rows at a time with the
            // tiles in the outer loop: a tile's activations stay in L1 while it meets
            // the block's weight rows, which stay in L2 after the first tile.
            let rows = out.len() / m;
            for first in (0..rows).step_by(ROW_BLOCK) {
                let rows = rows.min(first + ROW_BLOCK);
                for t0 in (0..m).step_by(TILE) {
                    let tile = &acts[t0..m.min(t0 + TILE)];
                    let mut j = first;
                    while j < rows {
                        let (two, one);
                        let y: &[[f32; TILE]] =
                            if j + 1 < rows && s.has_registers_for_two(K::ACT_ELEMS) {
                                two = tile_dot::<K, 2>(s, [row(j0 + j), row(j0 + j + 1)], tile);
                                &two
                            } else {
                                one = tile_dot::<K, 1>(s, [row(j0 + j)], tile);
                                &one
                            };
                        for (jj, y) in (j..).zip(y) {
                            out[jj * m + t0..jj * m + t0 + tile.len()]
                                .copy_from_slice(&y[..tile.len()]);
                        }
                        j += y.len();
                    }
                }
            }
        }
    }
}

/// W weight rows against a tile of 1 to TILE activation rows (the results past the tile's
/// length are zeros).
#[cfg(target_arch = "x86_64")]
fn tile_dot<K: Kernel, const W: usize>(
    s: x86::Simd,
    w: [&[u8]; W],
    tile: &[&[K::Act]],
) -> [[f32; TILE]; W] {
    fn widen<const R: usize, const W: usize>(y: [[f32; R]; W]) -> [[f32; TILE]; W] {
        y.map(|y| std::array::from_fn(|r| y.get(r).copied().unwrap_or(0.0)))
    }
    match *tile {
        [a0] => widen(K::dot_x86::<W, 1>(s, w, [a0])),
        [a0, a1] => widen(K::dot_x86::<W, 2>(s, w, [a0, a1])),
        [a0, a1, a2] => widen(K::dot_x86::<W, 3>(s, w, [a0, a1, a2])),
        [a0, a1, a2, a3] => K::dot_x86::<W, 4>(s, w, [a0, a1, a2, a3]),
        _ => unreachable!("tiles hold 1 to {TILE} rows"),
    }
}

// ---------------------------------------------------------------------------------------
// x86 kernels
// ---------------------------------------------------------------------------------------

// The AVX-512 and AVX-VNNI intrinsics need Rust 1.89.
#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 versions of the dot products, after ggml-cpu's `quants.c`, built twice: with
    //! AVX2 alone, and with AVX-VNNI, whose `vpdpbusd` does the u8 × i8 multiply-add of
    //! the 32-value types in one instruction. Both give the same integers, so the same
    //! results.
    //!
    //! Each kernel takes W weight rows and R activation rows and returns the W × R dot
    //! products. Every (weight row, activation row) pair has its own accumulator, updated
    //! by the same operations in the same order whatever W and R are: W > 1 gives a
    //! single activation row independent chains to overlap, R > 1 reads a weight block
    //! once for several activation rows.

    use super::{Q8KBlock, Q8Pair};

    /// Proof of the CPU's features, and the kernels they allow: only [`Simd::detect`]
    /// makes one.
    #[derive(Debug, Clone, Copy)]
    pub enum Simd {
        /// AVX2, FMA and F16C.
        Avx2(Private),
        /// And AVX-VNNI (256-bit `vpdpbusd`).
        AvxVnni(Private),
        /// And AVX-512 F/BW/VL/VNNI: the 32-value types take two blocks per 512-bit op.
        Avx512(Private),
    }

    #[derive(Debug, Clone, Copy)]
    pub struct Private(());

    impl Simd {
        /// The best level this CPU has; `VERITY_QMATMUL_SIMD=avx2|avxvnni` caps it.
        pub fn detect() -> Option<Self> {
            if !(is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c"))
            {
                return None;
            }
            let cap = std::env::var("VERITY_QMATMUL_SIMD").unwrap_or_default();
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            Some(if avx512 && cap.is_empty() {
                Simd::Avx512(Private(()))
            } else if is_x86_feature_detected!("avxvnni") && cap != "avx2" {
                Simd::AvxVnni(Private(()))
            } else {
                Simd::Avx2(Private(()))
            })
        }

        /// Every level this CPU has, lowest first (for tests).
        #[cfg(test)]
        pub fn all() -> Vec<Self> {
            let Some(best) = Self::detect() else {
                return Vec::new();
            };
            let mut v = vec![Simd::Avx2(Private(()))];
            if is_x86_feature_detected!("avxvnni") {
                v.push(Simd::AvxVnni(Private(())));
            }
            if let Simd::Avx512(_) = best {
                v.push(best);
            }
            v
        }
    }

    impl Simd {
        /// Whether the kernels for activation blocks of `act_elems` values keep two
        /// weight rows × TILE activation rows in registers: the 512-bit ones for the
        /// 32-value types (32 vector registers); the 256-bit ones have 16.
        pub fn has_registers_for_two(self, act_elems: usize) -> bool {
            matches!(self, Simd::Avx512(_)) && act_elems == 64
        }
    }

    /// Panics unless the weight rows have `nb` blocks of `bytes` each and every
    /// activation row `nb / per` blocks (rounded up); after it, the kernels' reads stay
    /// in bounds.
    fn check<A, const W: usize, const R: usize>(
        w: &[&[u8]; W],
        bytes: usize,
        a: &[&[A]; R],
        per: usize,
    ) -> usize {
        let nb = w.first().map_or(0, |w| w.len() / bytes);
        assert!(w.iter().all(|w| w.len() == nb * bytes));
        assert!(a.iter().all(|a| a.len() == nb.div_ceil(per)));
        nb
    }

    /// The safe entry points: check the sizes, then run the kernel the token allows.
    /// `$per`: weight blocks per activation block.
    macro_rules! entry {
        ($name:ident, $act:ty, $bytes:expr, $per:expr) => {
            pub fn $name<const W: usize, const R: usize>(
                simd: Simd,
                w: [&[u8]; W],
                a: [&[$act]; R],
            ) -> [[f32; R]; W] {
                let nb = check(&w, $bytes, &a, $per);
                let w = w.map(|w| w.as_ptr());
                // SAFETY: the token proves the CPU features; `check` bounds the reads.
                unsafe {
                    match simd {
                        Simd::Avx2(_) => avx2::$name(w, nb, a),
                        Simd::AvxVnni(_) => avx_vnni::$name(w, nb, a),
                        Simd::Avx512(_) => avx512::$name(w, nb, a),
                    }
                }
            }
        };
    }
    entry!(q4_1, Q8Pair, 20, 2);
    entry!(q5_0, Q8Pair, 22, 2);
    entry!(q8_0, Q8Pair, 34, 2);
    entry!(q4k, Q8KBlock, 144, 1);
    entry!(q6k, Q8KBlock, 210, 1);

    /// The kernels, for the target features given. Each `unsafe fn` reads `nb` blocks
    /// from each weight row pointer and each activation row: the caller checks that they
    /// exist and that the CPU has the features.
    macro_rules! kernels {
        ($features:literal) => {
            use super::super::{q4k_scale_min, Q8KBlock, Q8Pair};

            /// Asks for the weight bytes `PREFETCH` ahead of `p` (blocks of the rows that
            /// come next), `lines` cache lines of them, so that memory keeps streaming
            /// while the kernel computes. A prefetch never faults, wherever it points.
            #[target_feature(enable = $features)]
            pub(super) fn prefetch(p: *const u8, lines: usize) {
                for l in 0..lines {
                    let q = p.wrapping_add(super::super::PREFETCH + 64 * l);
                    _mm_prefetch::<_MM_HINT_T0>(q.cast());
                }
            }

            /// f16 at p as f32.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn load_f16(p: *const u8) -> f32 {
                let bits = unsafe { p.cast::<u16>().read_unaligned() };
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }

            /// Horizontal sums of the accumulators, each in a fixed order.
            #[target_feature(enable = $features)]
            fn hsums<const W: usize, const R: usize>(acc: [[__m256; R]; W]) -> [[f32; R]; W] {
                let mut out = [[0f32; R]; W];
                for i in 0..W {
                    for r in 0..R {
                        let x = acc[i][r];
                        let s = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
                        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                        out[i][r] = _mm_cvtss_f32(s);
                    }
                }
                out
            }

            /// 16 bytes of nibbles at p as 32 bytes: low nibbles first, then high nibbles.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn nibbles_32(p: *const u8) -> __m256i {
                let lo = unsafe { _mm_loadu_si128(p.cast()) };
                let both = _mm256_set_m128i(_mm_srli_epi16(lo, 4), lo);
                _mm256_and_si256(both, _mm256_set1_epi8(0xF))
            }

            /// The 32 bits at p as 32 bytes: 0xFF where the bit is set, 0 elsewhere.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn bits_32(p: *const u8) -> __m256i {
                let bits = unsafe { p.cast::<i32>().read_unaligned() };
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(bits),
                    _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0,
                    ),
                );
                let with_others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
                _mm256_cmpeq_epi8(with_others, _mm256_set1_epi64x(-1))
            }

            /// Block b of an activation row: its quants, its scale broadcast, and its s.
            #[target_feature(enable = $features)]
            unsafe fn act(a: &[Q8Pair], b: usize) -> (__m256i, __m256, f32) {
                let (p, h) = (unsafe { a.get_unchecked(b / 2) }, b % 2);
                let qs = unsafe { _mm256_loadu_si256(p.qs.as_ptr().add(32 * h).cast()) };
                (qs, _mm256_set1_ps(p.d[8 * h]), p.s[8 * h])
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4_1<const W: usize, const R: usize>(
                w: [*const u8; W],
                nb: usize,
                a: [&[Q8Pair]; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let mut mins = [[0f32; R]; W];
                for b in 0..nb {
                    for i in 0..W {
                        let wb = unsafe { w[i].add(20 * b) };
                        prefetch(wb, 1);
                        let d = _mm256_set1_ps(unsafe { load_f16(wb) });
                        let mn = unsafe { load_f16(wb.add(2)) };
                        let q = unsafe { nibbles_32(wb.add(4)) };
                        for r in 0..R {
                            let (y, yd, ys) = unsafe { act(a[r], b) };
                            mins[i][r] += mn * ys;
                            let xy = _mm256_cvtepi32_ps(dot_u8_i8(q, y));
                            acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), xy, acc[i][r]);
                        }
                    }
                }
                let mut out = hsums(acc);
                for i in 0..W {
                    for r in 0..R {
                        out[i][r] += mins[i][r];
                    }
                }
                out
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q5_0<const W: usize, const R: usize>(
                w: [*const u8; W],
                nb: usize,
                a: [&[Q8Pair]; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                for b in 0..nb {
                    for i in 0..W {
                        let wb = unsafe { w[i].add(22 * b) };
                        prefetch(wb, 1);
                        let d = _mm256_set1_ps(unsafe { load_f16(wb) });
                        // Nibble | 0xF0 where the fifth bit is clear: the signed value q - 16.
                        let high = _mm256_andnot_si256(
                            unsafe { bits_32(wb.add(2)) },
                            _mm256_set1_epi8(-16),
                        );
                        let q = _mm256_or_si256(unsafe { nibbles_32(wb.add(6)) }, high);
                        // |q|, with the sign moved onto the activations.
                        let uq = _mm256_sign_epi8(q, q);
                        for r in 0..R {
                            let (y, yd, _) = unsafe { act(a[r], b) };
                            let xy = _mm256_cvtepi32_ps(dot_u8_i8(uq, _mm256_sign_epi8(y, q)));
                            acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), xy, acc[i][r]);
                        }
                    }
                }
                hsums(acc)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q8_0<const W: usize, const R: usize>(
                w: [*const u8; W],
                nb: usize,
                a: [&[Q8Pair]; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                for b in 0..nb {
                    for i in 0..W {
                        let wb = unsafe { w[i].add(34 * b) };
                        prefetch(wb, 1);
                        let d = _mm256_set1_ps(unsafe { load_f16(wb) });
                        let q = unsafe { _mm256_loadu_si256(wb.add(2).cast()) };
                        let uq = _mm256_sign_epi8(q, q);
                        for r in 0..R {
                            let (y, yd, _) = unsafe { act(a[r], b) };
                            let xy = _mm256_cvtepi32_ps(dot_u8_i8(uq, _mm256_sign_epi8(y, q)));
                            acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(d, yd), xy, acc[i][r]);
                        }
                    }
                }
                hsums(acc)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q4k<const W: usize, const R: usize>(
                w: [*const u8; W],
                nb: usize,
                a: [&[Q8KBlock]; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let low4 = _mm256_set1_epi8(0xF);
                for b in 0..nb {
                    for i in 0..W {
                        let wb = unsafe { w[i].add(144 * b) };
                        prefetch(wb, 3);
                        let d = _mm256_set1_ps(unsafe { load_f16(wb) });
                        let dmin = _mm256_set1_ps(unsafe { load_f16(wb.add(2)) });
                        let mut raw = [0u8; 12];
                        unsafe { std::ptr::copy_nonoverlapping(wb.add(4), raw.as_mut_ptr(), 12) };
                        let mut sc = [0i16; 8];
                        // Each min twice, to pair with the 16 sums of 16 activations.
                        let mut mins = [0i16; 16];
                        for j in 0..8 {
                            let (s, m) = q4k_scale_min(j, &raw);
                            sc[j] = s as i16;
                            mins[2 * j] = m as i16;
                            mins[2 * j + 1] = m as i16;
                        }
                        let mins = unsafe { _mm256_loadu_si256(mins.as_ptr().cast()) };
                        let mut sumi = [_mm256_setzero_si256(); R];
                        for c in 0..4 {
                            let bytes = unsafe { _mm256_loadu_si256(wb.add(16 + 32 * c).cast()) };
                            let lo = _mm256_and_si256(bytes, low4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
                            let sl = _mm256_set1_epi16(sc[2 * c]);
                            let sh = _mm256_set1_epi16(sc[2 * c + 1]);
                            for r in 0..R {
                                let q8 = unsafe { a[r].get_unchecked(b) }.qs.as_ptr();
                                let yl = unsafe { _mm256_loadu_si256(q8.add(64 * c).cast()) };
                                let yh = unsafe { _mm256_loadu_si256(q8.add(64 * c + 32).cast()) };
                                let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, yl));
                                let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, yh));
                                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(pl, ph));
                            }
                        }
                        for r in 0..R {
                            let ab = unsafe { a[r].get_unchecked(b) };
                            let bsums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().cast()) };
                            let summ = _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bsums));
                            let sums = _mm256_cvtepi32_ps(sumi[r]);
                            // d·Σ scale·dot − dmin·Σ min·bsum, then times the activation scale.
                            let v = _mm256_fmsub_ps(d, sums, _mm256_mul_ps(dmin, summ));
                            acc[i][r] = _mm256_fmadd_ps(_mm256_set1_ps(ab.d), v, acc[i][r]);
                        }
                    }
                }
                hsums(acc)
            }

            #[target_feature(enable = $features)]
            pub unsafe fn q6k<const W: usize, const R: usize>(
                w: [*const u8; W],
                nb: usize,
                a: [&[Q8KBlock]; R],
            ) -> [[f32; R]; W] {
                let mut acc = [[_mm256_setzero_ps(); R]; W];
                let low4 = _mm256_set1_epi8(0xF);
                let low2 = _mm256_set1_epi8(3);
                for b in 0..nb {
                    for i in 0..W {
                        let wb = unsafe { w[i].add(210 * b) };
                        prefetch(wb, 4);
                        let d = _mm256_set1_ps(unsafe { load_f16(wb.add(208)) });
                        let mut sc = [0i16; 16];
                        for (s, p) in sc.iter_mut().zip(0..16) {
                            *s = unsafe { *wb.add(192 + p) } as i8 as i16;
                        }
                        let mut sumi = [_mm256_setzero_si256(); R];
                        for half in 0..2 {
                            let ql = unsafe { wb.add(64 * half) };
                            let qh = unsafe { _mm256_loadu_si256(wb.add(128 + 32 * half).cast()) };
                            let ql0 = unsafe { _mm256_loadu_si256(ql.cast()) };
                            let ql1 = unsafe { _mm256_loadu_si256(ql.add(32).cast()) };
                            // The four chunks of 32 values, unsigned (value + 32): 0..64.
                            let h = [
                                qh,
                                _mm256_srli_epi16(qh, 2),
                                _mm256_srli_epi16(qh, 4),
                                _mm256_srli_epi16(qh, 6),
                            ];
                            let l = [
                                ql0,
                                ql1,
                                _mm256_srli_epi16(ql0, 4),
                                _mm256_srli_epi16(ql1, 4),
                            ];
                            let mut q = [_mm256_setzero_si256(); 4];
                            // Chunk c covers sub-blocks 2c and 2c+1 (16 values each).
                            let mut s = [_mm256_setzero_si256(); 4];
                            for c in 0..4 {
                                let hi = _mm256_slli_epi16(_mm256_and_si256(h[c], low2), 4);
                                q[c] = _mm256_or_si256(_mm256_and_si256(l[c], low4), hi);
                                let j = 8 * half + 2 * c;
                                s[c] = _mm256_set_m128i(
                                    _mm_set1_epi16(sc[j + 1]),
                                    _mm_set1_epi16(sc[j]),
                                );
                            }
                            for r in 0..R {
                                let q8 = unsafe { a[r].get_unchecked(b) }.qs.as_ptr();
                                for c in 0..4 {
                                    let y = unsafe {
                                        _mm256_loadu_si256(q8.add(128 * half + 32 * c).cast())
                                    };
                                    let p = _mm256_madd_epi16(s[c], _mm256_maddubs_epi16(q[c], y));
                                    sumi[r] = _mm256_add_epi32(sumi[r], p);
                                }
                            }
                        }
                        let scales =
                            _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(wb.add(192).cast()) });
                        for r in 0..R {
                            let ab = unsafe { a[r].get_unchecked(b) };
                            // Remove the +32: 32 · Σ scale · (sum of the sub-block's activations).
                            let bsums = unsafe { _mm256_loadu_si256(ab.bsums.as_ptr().cast()) };
                            let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales, bsums), 5);
                            let sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[r], offset));
                            let scale = _mm256_mul_ps(d, _mm256_set1_ps(ab.d));
                            acc[i][r] = _mm256_fmadd_ps(scale, sums, acc[i][r]);
                        }
                    }
                }
                hsums(acc)
            }
        };
    }

    /// The 32-value types with 512-bit operations: each step takes a pair of weight
    /// blocks, in the halves of 16-lane vectors, against a [`Q8Pair`] of activations.
    /// The K-quants use the AVX2 kernels (no VNNI in them; an AVX-512 CPU has AVX2).
    mod avx512 {
        use std::arch::x86_64::*;

        use super::super::Q8Pair;
        use super::avx2::{bits_32, nibbles_32, prefetch};
        pub use super::avx2::{q4k, q6k};

        /// The f16 pairs at the start of two blocks (the second may be absent: zeros),
        /// as f32 in the halves of 16-lane vectors: ([x₀ ×8, x₁ ×8], [y₀ ×8, y₁ ×8]) for
        /// the f16 x and y at offsets 0 and 2 of each block.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn f16_halves(b0: *const u8, b1: Option<*const u8>) -> (__m512, __m512) {
            let first = unsafe { b0.cast::<i32>().read_unaligned() };
            let second = b1.map_or(0, |b| unsafe { b.cast::<i32>().read_unaligned() });
            // [x₀, y₀, x₁, y₁] in the low 128 bits.
            let v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, second, first)));
            let x = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
            let y = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
            (_mm512_permutexvar_ps(x, v), _mm512_permutexvar_ps(y, v))
        }

        /// Two 32-byte vectors as one 64-byte vector.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn join(lo: __m256i, hi: __m256i) -> __m512i {
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
        }

        /// Weight pair p of a row of `nb` blocks of `bytes` each: a pointer to its first
        /// block and to its second, or None when the row ends in an odd block.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn pair(
            w: *const u8,
            p: usize,
            nb: usize,
            bytes: usize,
        ) -> (*const u8, Option<*const u8>) {
            let first = unsafe { w.add(2 * p * bytes) };
            (first, (2 * p + 1 < nb).then(|| first.wrapping_add(bytes)))
        }

        /// Sum of the 16 lanes, in a fixed order.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn hsums<const W: usize, const R: usize>(acc: [[__m512; R]; W]) -> [[f32; R]; W] {
            let mut out = [[0f32; R]; W];
            for i in 0..W {
                for r in 0..R {
                    let x = acc[i][r];
                    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
                    let v = _mm256_add_ps(_mm512_castps512_ps256(x), hi);
                    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                    out[i][r] = _mm_cvtss_f32(s);
                }
            }
            out
        }

        /// acc + scale · (u · s) over a block pair, where u holds the weights' |q| and
        /// `neg` marks the negative ones, whose sign moves onto the activations.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn step(acc: __m512, d: __m512, u: __m512i, neg: __mmask64, a: &Q8Pair) -> __m512 {
            let y = unsafe { _mm512_loadu_si512(a.qs.as_ptr().cast()) };
            let sy = _mm512_mask_sub_epi8(y, neg, _mm512_setzero_si512(), y);
            let xy = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, sy));
            let scale = _mm512_mul_ps(d, unsafe { _mm512_loadu_ps(a.d.as_ptr()) });
            _mm512_fmadd_ps(scale, xy, acc)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn q4_1<const W: usize, const R: usize>(
            w: [*const u8; W],
            nb: usize,
            a: [&[Q8Pair]; R],
        ) -> [[f32; R]; W] {
            let mut acc = [[_mm512_setzero_ps(); R]; W];
            for p in 0..nb.div_ceil(2) {
                for i in 0..W {
                    let (b0, b1) = unsafe { pair(w[i], p, nb, 20) };
                    prefetch(b0, 1);
                    let (d, mn) = unsafe { f16_halves(b0, b1) };
                    let q0 = unsafe { nibbles_32(b0.add(4)) };
                    let q1 = b1.map_or(_mm256_setzero_si256(), |b| unsafe { nibbles_32(b.add(4)) });
                    let q = join(q0, q1);
                    for r in 0..R {
                        let ap = unsafe { a[r].get_unchecked(p) };
                        acc[i][r] = unsafe { step(acc[i][r], d, q, 0, ap) };
                        // mins · s: `s` holds each block's sum in one lane, zeros elsewhere.
                        let s = unsafe { _mm512_loadu_ps(ap.s.as_ptr()) };
                        acc[i][r] = _mm512_fmadd_ps(mn, s, acc[i][r]);
                    }
                }
            }
            hsums(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn q5_0_block(b: *const u8) -> __m256i {
            // Nibble | 0xF0 where the fifth bit is clear: the signed value q - 16.
            let high = _mm256_andnot_si256(unsafe { bits_32(b.add(2)) }, _mm256_set1_epi8(-16));
            _mm256_or_si256(unsafe { nibbles_32(b.add(6)) }, high)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn q5_0<const W: usize, const R: usize>(
            w: [*const u8; W],
            nb: usize,
            a: [&[Q8Pair]; R],
        ) -> [[f32; R]; W] {
            let mut acc = [[_mm512_setzero_ps(); R]; W];
            for p in 0..nb.div_ceil(2) {
                for i in 0..W {
                    let (b0, b1) = unsafe { pair(w[i], p, nb, 22) };
                    prefetch(b0, 1);
                    // d (the other vector holds qh's first bytes: unused).
                    let (d, _) = unsafe { f16_halves(b0, b1) };
                    let q0 = unsafe { q5_0_block(b0) };
                    let q1 = b1.map_or(_mm256_setzero_si256(), |b| unsafe { q5_0_block(b) });
                    let q = join(q0, q1);
                    let (u, neg) = (_mm512_abs_epi8(q), _mm512_movepi8_mask(q));
                    for r in 0..R {
                        acc[i][r] = unsafe { step(acc[i][r], d, u, neg, a[r].get_unchecked(p)) };
                    }
                }
            }
            hsums(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn q8_0<const W: usize, const R: usize>(
            w: [*const u8; W],
            nb: usize,
            a: [&[Q8Pair]; R],
        ) -> [[f32; R]; W] {
            let mut acc = [[_mm512_setzero_ps(); R]; W];
            for p in 0..nb.div_ceil(2) {
                for i in 0..W {
                    let (b0, b1) = unsafe { pair(w[i], p, nb, 34) };
                    prefetch(b0, 2);
                    // d (the other vector holds the first two quants: unused).
                    let (d, _) = unsafe { f16_halves(b0, b1) };
                    let load = |b: *const u8| unsafe { _mm256_loadu_si256(b.add(2).cast()) };
                    let q = join(load(b0), b1.map_or(_mm256_setzero_si256(), load));
                    let (u, neg) = (_mm512_abs_epi8(q), _mm512_movepi8_mask(q));
                    for r in 0..R {
                        acc[i][r] = unsafe { step(acc[i][r], d, u, neg, a[r].get_unchecked(p)) };
                    }
                }
            }
            hsums(acc)
        }
    }

    mod avx2 {
        use std::arch::x86_64::*;

        /// u8 × i8 products summed in fours into 8 i32 lanes (the operand ranges here
        /// never saturate maddubs' i16 pairs).
        #[target_feature(enable = "avx2,fma,f16c")]
        fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }

        kernels!("avx2,fma,f16c");
    }

    mod avx_vnni {
        use std::arch::x86_64::*;

        /// u8 × i8 products summed in fours into 8 i32 lanes, in one instruction.
        #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
        fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
        }

        kernels!("avx2,fma,f16c,avxvnni");
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::Module;

    use super::*;

    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    /// Deterministic values in (-1, 1), with some larger outliers as real activations have.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                if i.is_multiple_of(97) {
                    4.0 * v
                } else {
                    v
                }
            })
            .collect()
    }

    fn weight(ty: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, ty).unwrap()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        v.extend(x86::Simd::all().into_iter().map(Isa::X86));
        v
    }

    fn ours(isa: Isa, w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = w.shape().dims2().unwrap();
        let ty = WeightType::of(w.dtype()).unwrap();
        matmul(ty, isa, &w.data().unwrap(), n, k, x, m).unwrap()
    }

    /// ‖a − b‖ / ‖b‖.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f32 = b.iter().map(|y| y * y).sum();
        (diff / norm).sqrt()
    }

    /// Largest |a − b| relative to the largest |b|.
    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
        a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / scale
    }

    fn shapes(ty: GgmlDType) -> (usize, usize) {
        match ty {
            GgmlDType::Q4K | GgmlDType::Q6K => (48, 768),
            _ => (40, 160),
        }
    }

    #[test]
    fn simd_matches_scalar() {
        for ty in TYPES {
            let (n, k) = shapes(ty);
            let w = weight(ty, n, k, 1);
            for m in [1, 3, 8, 17] {
                let x = values(m * k, 100 + m as u64);
                let levels = isas();
                let results: Vec<Vec<f32>> =
                    levels.iter().map(|&isa| ours(isa, &w, &x, m)).collect();
                for (isa, y) in levels.iter().zip(&results).skip(1) {
                    let e = max_err(y, &results[0]);
                    assert!(e < 1e-4, "{ty:?} {isa:?} m={m}: max error {e}");
                }
                // AVX-VNNI computes the same integers as AVX2 in the same order, so the
                // same floats.
                #[cfg(target_arch = "x86_64")]
                if let [_, Isa::X86(x86::Simd::Avx2(_)), Isa::X86(x86::Simd::AvxVnni(_)), ..] =
                    levels[..]
                {
                    let (a, b) = (&results[1], &results[2]);
                    assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn close_to_candle_and_to_dense() {
        for ty in TYPES {
            let (n, k) = shapes(ty);
            let w = weight(ty, n, k, 2);
            let dense = w.dequantize(&Device::Cpu).unwrap();
            let candle = QMatMul::from_qtensor(weight(ty, n, k, 2)).unwrap();
            for m in [1, 3, 8, 17] {
                let x = values(m * k, 200 + m as u64);
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let exact: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let theirs: Vec<f32> = candle
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for isa in isas() {
                    let y = ours(isa, &w, &x, m);
                    // Both quantize activations to 8 bits in the same way, but candle keeps
                    // f16 scales for the 32-value types. The f32 product has no activation
                    // rounding at all, and 256-value blocks round coarser.
                    let k_quant = matches!(ty, GgmlDType::Q4K | GgmlDType::Q6K);
                    let (tc, td) = if k_quant { (1e-5, 2e-2) } else { (2e-3, 1e-2) };
                    let (ec, ed) = (rel_err(&y, &theirs), rel_err(&y, &exact));
                    assert!(ec < tc, "{ty:?} {isa:?} m={m}: {ec} from candle");
                    assert!(ed < td, "{ty:?} {isa:?} m={m}: {ed} from the f32 product");
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_its_batch() {
        for ty in TYPES {
            // Big enough that m = 17 runs on several threads; an odd number of 32-value
            // blocks for the 512-bit kernels' last half pair.
            let k = if ty.block_size() == 32 { 544 } else { 512 };
            let n = 272;
            let w = weight(ty, n, k, 3);
            let m = 17;
            let x = values(m * k, 300);
            for isa in isas() {
                let batch = ours(isa, &w, &x, m);
                for i in 0..m {
                    let alone = ours(isa, &w, &x[i * k..(i + 1) * k], 1);
                    let row = &batch[i * n..(i + 1) * n];
                    assert!(
                        row.iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{ty:?} {isa:?}: row {i} differs in a batch of {m}"
                    );
                }
                // And in a batch of 3 that starts at another offset of the tile.
                let three = ours(isa, &w, &x[5 * k..8 * k], 3);
                assert!(three
                    .iter()
                    .zip(&batch[5 * n..8 * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }

    #[test]
    fn forward_keeps_shape_and_dtype_and_rejects_what_it_cannot_do() {
        let w = weight(GgmlDType::Q4_1, 8, 64, 4);
        let x = Tensor::from_vec(values(2 * 3 * 64, 5), (2, 3, 64), &Device::Cpu).unwrap();
        let y = forward(&w, &x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 8]);
        let flat = forward(&w, &x.reshape((6, 64)).unwrap()).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            y.flatten_all().unwrap().to_vec1().unwrap(),
            flat.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
        let half = forward(&w, &x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        // Wrong inner size; a type without a kernel here.
        let bad = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(forward(&w, &bad).is_err());
        let q4_0 = weight(GgmlDType::Q4_0, 8, 64, 6);
        assert!(!supports(&q4_0));
        assert!(forward(&q4_0, &x).is_err());
        assert!(supports(&w));
    }
}

/// Kernel timings on the shapes of the models in models/ (not a test: run with
/// `cargo test --release --lib qmatmul::timing -- --ignored --nocapture`).
#[cfg(test)]
mod timing {
    use std::time::Instant;

    use super::*;

    /// CPU time of this thread in ns (Linux), 0 elsewhere.
    fn thread_cpu_ns() -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Batch-1 products over ~100 MB of distinct weights, as a decode step streams them.
    #[test]
    #[ignore]
    fn timing_streaming() {
        let (n, k) = (1536, 576);
        let ty = GgmlDType::Q4_1;
        let count = 180; // 180 × 0.55 MB
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), ty).unwrap();
        let data = w.data().unwrap().to_vec();
        let ws: Vec<Vec<u8>> = (0..count).map(|_| data.clone()).collect();
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0)
            .collect();
        for _ in 0..3 {
            let (start, start_cpu) = (Instant::now(), thread_cpu_ns());
            for w in &ws {
                std::hint::black_box(
                    matmul(WeightType::Q4_1, Isa::detect(), w, n, k, &x, 1).unwrap(),
                );
            }
            let wall = start.elapsed().as_secs_f64();
            let cpu = (thread_cpu_ns() - start_cpu) as f64 * 1e-9;
            let bytes = (count * data.len()) as f64;
            println!(
                "streaming {count} x Q4_1 {n}x{k}: {:.2} ms wall ({:.1} GB/s), {:.2} ms this thread",
                wall * 1e3,
                bytes / wall / 1e9,
                cpu * 1e3
            );
        }
    }

    #[test]
    #[ignore]
    fn timing() {
        let shapes = [
            (GgmlDType::Q4_1, 576, 576),
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q8_0, 49152, 576),
            (GgmlDType::Q5_0, 4864, 896),
            (GgmlDType::Q4K, 4864, 896 * 2),
            (GgmlDType::Q6K, 896, 4864),
        ];
        let filter = std::env::var("QMATMUL_TIMING").unwrap_or_default();
        for (ty, n, k) in shapes {
            if !filter.is_empty() && !format!("{ty:?}").contains(&filter) {
                continue;
            }
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let w =
                QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), ty).unwrap();
            for m in [1, 16, 64] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0)
                    .collect();
                let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
                let iters = (1e9 / (n * k * m) as f64).clamp(3.0, 2000.0) as usize;
                let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
                for _ in 0..3 {
                    let (start, start_cpu) = (Instant::now(), thread_cpu_ns());
                    for _ in 0..iters {
                        std::hint::black_box(forward(&w, &x).unwrap());
                    }
                    wall = wall.min(start.elapsed().as_secs_f64() / iters as f64);
                    cpu = cpu.min((thread_cpu_ns() - start_cpu) as f64 * 1e-9 / iters as f64);
                }
                // With RAYON_NUM_THREADS=1 all work runs on this thread, and its CPU
                // time is what the kernels cost even when other processes share the cores.
                println!(
                    "{ty:?} {n}x{k} m={m}: {:.1} us wall, {:.1} us this thread; {:.1} GMAC/s per thread CPU",
                    wall * 1e6,
                    cpu * 1e6,
                    (n * k * m) as f64 / cpu / 1e9
                );
            }
        }
    }
}
