//! Attention for the whole batch on the CPU, decode tokens and prompt chunks alike, in one
//! parallel call per layer.
//!
//! The reference, [`Transformer::attend`](super::Transformer), is about fifteen candle ops
//! per sequence and layer; at batch 16 on a 30-layer model that is thousands of small ops
//! per step, whose dispatch costs more than the arithmetic (a context of a few hundred
//! positions is a few hundred thousand multiply-adds per sequence and layer). Here every
//! sequence's new rows are written into its own KV segment, and then each sequence's
//! segments are read in place: one task per (new row, KV head) computes the scores of the
//! head's query group over the positions up to the row's own, the softmax and the
//! weighted sum of values, and the tasks share out over [`crate::pool::Pool`].
//!
//! A task's arithmetic depends only on its own row's position and sequence, in a fixed
//! order, so a row's result depends neither on the batch it is in nor on how its prompt
//! was cut into chunks. (The reference's matrix products over a chunk's keys do depend on
//! the chunk: greedy answers differed in 1–3% of questions between `verity eval`
//! runs whose concurrency shared each step's prompt budget differently.)

use candle_core::{DType, Device, Storage, StorageRef, Tensor};
use half::slice::HalfFloatSliceExt;
use parking_lot::Mutex;

use super::step::StepInput;
use super::Transformer;
use crate::error::{Error, Result};
use crate::model::cpu_ops::with_cpu_f32;
use crate::pool::Pool;

/// One segment of one sequence as the kernel reads it, for one layer.
struct SegmentView<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    /// Absolute position of its first row, and the rows to read.
    start: usize,
    len: usize,
}

/// One new row to attend (the i-th is row i of the step's queries): its sequence (an index
/// into the batch) and its absolute position.
#[derive(Clone, Copy)]
pub(super) struct NewRow {
    sequence: usize,
    at: usize,
}

/// The step's new rows in batch order: the same for every layer, so built once a step.
pub(super) fn new_rows(batch: &[StepInput<'_>]) -> Vec<NewRow> {
    batch
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..s.tokens.len()).map(move |j| NewRow {
                sequence: i,
                at: s.kv.len() + j,
            })
        })
        .collect()
}

impl Transformer {
    /// Whether [`Self::attend_cpu`] takes this step: f32 activations on the CPU. (Then it
    /// takes every sequence, so that a sequence's numbers do not depend on its batch.)
    pub(super) fn cpu_attention_fits(&self) -> bool {
        matches!(self.device, Device::Cpu)
            && self.dtype == DType::F32
            && self
                .config
                .num_heads
                .is_multiple_of(self.config.num_kv_heads)
            && std::env::var_os("VERITY_REFERENCE_ATTENTION").is_none()
    }

    /// For every sequence of the batch, adding `tokens.len()` rows ([`new_rows`]) whose
    /// queries, keys and values are consecutive rows of `q` (T, H, d), `k`, `v` (T, KV, d)
    /// in batch order:
    /// writes the keys and values into the sequence's own segment and returns the
    /// attention as (T, H·d), for one layer. A sequence's new rows sit at positions
    /// `kv.len()..`; each sees the positions up to its own, and with a `window` only the
    /// `window` latest of those.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_cpu(
        &self,
        batch: &[StepInput<'_>],
        new_rows: &[NewRow],
        layer: usize,
        window: Option<usize>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (total, nh, hd) = q.dims3()?;
        if new_rows.len() != total {
            return Err(Error::Internal(format!(
                "CPU attention: {} new rows for {total} queries",
                new_rows.len()
            )));
        }
        let nkv = self.config.num_kv_heads;
        let row = nkv * hd;
        let written = with_cpu_f32(k, |k| {
            with_cpu_f32(v, |v| {
                let mut first = 0;
                for s in batch {
                    let span = first * row..(first + s.tokens.len()) * row;
                    s.kv.own_segment()
                        .write_rows_cpu(layer, &k[span.clone()], &v[span])?;
                    first += s.tokens.len();
                }
                Ok(())
            })
        })?
        .flatten();
        if written.is_none() {
            return Err(Error::Internal(format!(
                "CPU attention: keys {:?} and values {:?} not f32 on the CPU",
                k.dtype(),
                v.dtype()
            )));
        }
        let scale = self.config.attention_scale() as f32;

        // Every segment's storage, held for reading while the tasks run; sequence i's
        // segments are `held[first[i]..first[i + 1]]`.
        let mut held = Vec::new();
        let mut first = Vec::with_capacity(batch.len() + 1);
        for s in batch {
            first.push(held.len());
            let own = s.kv.own_segment();
            let segments = s.kv.shared_segments().iter().map(|seg| (&**seg, seg.len()));
            // The own segment: its stored positions and those this step wrote.
            for (seg, len) in segments.chain([(own, own.len() + s.tokens.len())]) {
                held.push((
                    seg.key_buffer(layer).storage_and_layout().0,
                    seg.value_buffer(layer).storage_and_layout().0,
                    seg.start(),
                    len,
                ));
            }
        }
        first.push(held.len());
        let kv_dtype = self.kv_dtype();
        let out = with_cpu_f32(q, |q| {
            let job = Job {
                new_rows,
                first: &first,
                window,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale,
                q,
            };
            match kv_dtype {
                DType::F32 => job.run::<f32>(&held),
                DType::F16 => job.run::<half::f16>(&held),
                DType::BF16 => job.run::<half::bf16>(&held),
                other => Err(Error::Internal(format!(
                    "CPU attention over a {other:?} KV cache"
                ))),
            }
        })?
        .ok_or_else(|| Error::Internal("CPU attention: queries not f32 on the CPU".into()))?;
        Ok(Tensor::from_vec(out, (total, nh * hd), &self.device)?)
    }
}

/// A segment's key and value storage, held for reading, its first position and the rows
/// to read.
type Held<'a> = (StorageRef<'a>, StorageRef<'a>, usize, usize);

/// What every task of one layer's call reads.
struct Job<'a> {
    new_rows: &'a [NewRow],
    /// Sequence i's segments are `held[first[i]..first[i + 1]]`.
    first: &'a [usize],
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// The queries, (T, H, d) flat.
    q: &'a [f32],
}

impl Job<'_> {
    /// Runs the (new row, KV head) tasks over a KV cache of element type `T`; returns the
    /// attention (T, H·d) flat.
    fn run<T: KvElement>(&self, held: &[Held<'_>]) -> Result<Vec<f32>> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let groups = nh / nkv;
        let row = nkv * hd;
        let views = held
            .iter()
            .map(|(keys, values, start, len)| {
                Ok(SegmentView {
                    keys: rows_of::<T>(keys, len * row)?,
                    values: rows_of::<T>(values, len * row)?,
                    start: *start,
                    len: *len,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; self.new_rows.len() * nh * hd];
        // Task t = (new row t / nkv, KV head t % nkv) owns output heads h·G..(h+1)·G of
        // its row: a contiguous run of G·d values.
        let outputs: Vec<Mutex<&mut [f32]>> = out.chunks_mut(groups * hd).map(Mutex::new).collect();
        Pool::global().run(outputs.len(), |t| {
            let (r, h) = (t / nkv, t % nkv);
            let new = self.new_rows[r];
            let i = new.sequence;
            attend_one(
                &views[self.first[i]..self.first[i + 1]],
                new.at,
                self.window,
                h,
                nkv,
                hd,
                self.scale,
                &self.q[(r * nh + h * groups) * hd..(r * nh + (h + 1) * groups) * hd],
                &mut outputs[t].lock(),
            );
        });
        drop(outputs);
        Ok(out)
    }
}

/// An element type of the KV cache, read as f32.
trait KvElement: candle_core::WithDType {
    /// How the x86 kernel loads this type, if it does.
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind>;
    /// `src` as f32: itself, or converted into `buf`.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = Some(x86::Kind::F32);
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for half::f16 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = Some(x86::Kind::F16);
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

impl KvElement for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = None;
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// The first `n` values of a CPU storage of `T`.
fn rows_of<T: KvElement>(storage: &Storage, n: usize) -> Result<&[T]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Internal(
            "CPU decode attention over a device tensor".into(),
        ));
    };
    cpu.as_slice::<T>()?
        .get(..n)
        .ok_or_else(|| Error::Internal("a KV segment shorter than its length".into()))
}

/// Attention of one KV head's query group (G heads of d values: `queries` and `out` are
/// G·d) at position `at` over the positions of `segments` up to `at`.
#[allow(clippy::too_many_arguments)]
fn attend_one<T: KvElement>(
    segments: &[SegmentView<'_, T>],
    at: usize,
    window: Option<usize>,
    head: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
    queries: &[f32],
    out: &mut [f32],
) {
    let groups = queries.len() / hd;
    let oldest = window.map_or(0, |w| (at + 1).saturating_sub(w));
    // Each segment's visible rows (from the window's oldest position to `at`) as (key,
    // value) of this head, oldest first: found once, so the kernels' loops only index.
    let visible = |seg: &SegmentView<'_, T>| {
        let to = (at + 1).saturating_sub(seg.start).min(seg.len);
        oldest.saturating_sub(seg.start).min(to)..to
    };
    let mut rows = Vec::with_capacity(segments.iter().map(|seg| visible(seg).len()).sum());
    for seg in segments {
        for r in visible(seg) {
            let at = (r * kv_heads + head) * hd;
            rows.push((&seg.keys[at..at + hd], &seg.values[at..at + hd]));
        }
    }
    // scores[g·keys + j]
    let mut scores = vec![0f32; groups * rows.len()];
    #[cfg(target_arch = "x86_64")]
    if let Some(kind) = T::SIMD.filter(|_| x86::fits(hd)) {
        // SAFETY: `fits` checked the CPU's features and the head size.
        unsafe { x86::attend(kind, &rows, hd, scale, queries, &mut scores, out) };
        return;
    }
    attend_portable::<T>(&rows, hd, scale, queries, &mut scores, out);
}

/// [`attend_one`] after the rows are found, in plain Rust (other CPUs, bf16 caches, odd
/// head sizes; and the reference of the x86 kernel's tests).
fn attend_portable<T: KvElement>(
    rows: &[(&[T], &[T])],
    hd: usize,
    scale: f32,
    queries: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let keys = rows.len();
    let mut buf = vec![0f32; hd];
    for (j, (key, _)) in rows.iter().enumerate() {
        let key = T::as_f32(key, &mut buf);
        for (g, query) in queries.chunks_exact(hd).enumerate() {
            scores[g * keys + j] = dot(query, key) * scale;
        }
    }
    for s in scores.chunks_exact_mut(keys.max(1)) {
        softmax_in_place(s);
    }
    out.fill(0.0);
    for (j, (_, value)) in rows.iter().enumerate() {
        let value = T::as_f32(value, &mut buf);
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[g * keys + j];
            o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
        }
    }
}

/// softmax(s) in place: e^(s − max) through the stats' branch-free exp, then normalized.
/// Eight partial sums, so the loops vectorize (one running sum would force a serial
/// order).
fn softmax_in_place(s: &mut [f32]) {
    const L: usize = 8;
    let mut max = [f32::NEG_INFINITY; L];
    let (chunks, rest) = s.as_chunks::<L>();
    for c in chunks {
        for l in 0..L {
            max[l] = max[l].max(c[l]);
        }
    }
    let max = rest
        .iter()
        .copied()
        .fold(max.into_iter().fold(f32::NEG_INFINITY, f32::max), f32::max);
    for x in s.iter_mut() {
        *x = crate::stats::exp_nonpositive((*x - max).max(-80.0));
    }
    let mut sum = [0f32; L];
    let (chunks, rest) = s.as_chunks::<L>();
    for c in chunks {
        for l in 0..L {
            sum[l] += c[l];
        }
    }
    let sum = sum.iter().sum::<f32>() + rest.iter().sum::<f32>();
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// The AVX2 kernel of [`attend_one`] for f32 and f16 caches. Keys go in blocks of four:
/// each is converted to f32 once, the G queries meet the block in four independent FMA
/// chains, and one horizontal reduction gives the four scores. The weighted sum of
/// values keeps G heads × 16 values in registers over all the keys.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The largest head size the kernel's scratch holds.
    const MAX_HEAD: usize = 256;
    /// Keys per block of the scores.
    const BLOCK: usize = 4;

    /// The cache's element type, as the kernel loads it.
    #[derive(Clone, Copy)]
    pub(super) enum Kind {
        F32,
        F16,
    }

    /// Whether the kernel runs here for heads of `hd` values.
    pub(super) fn fits(hd: usize) -> bool {
        static FEATURES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        hd.is_multiple_of(8)
            && hd <= MAX_HEAD
            && *FEATURES.get_or_init(|| {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            })
    }

    /// [`super::attend_one`] after the rows are found: `rows` holds each visible (key,
    /// value) of the head (hd values each), `scores` has room for G · keys.
    ///
    /// # Safety
    /// [`fits`]`(hd)` holds, and `T` is f32 for `Kind::F32`, f16 for `Kind::F16`.
    pub(super) unsafe fn attend<T>(
        kind: Kind,
        rows: &[(&[T], &[T])],
        hd: usize,
        scale: f32,
        queries: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe {
            match kind {
                Kind::F32 => run::<T, false>(rows, hd, scale, queries, scores, out),
                Kind::F16 => run::<T, true>(rows, hd, scale, queries, scores, out),
            }
        }
    }

    /// 8 values at `src + c` (f32, or f16 when F16) as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<T, const F16: bool>(src: *const T, c: usize) -> __m256 {
        unsafe {
            if F16 {
                _mm256_cvtph_ps(_mm_loadu_si128(src.cast::<u16>().add(c).cast()))
            } else {
                _mm256_loadu_ps(src.cast::<f32>().add(c))
            }
        }
    }

    /// Asks for the cache lines of a row.
    #[inline(always)]
    fn prefetch<T>(row: &[T]) {
        let p = row.as_ptr().cast::<u8>();
        for at in (0..std::mem::size_of_val(row)).step_by(64) {
            // SAFETY: a prefetch never faults; the addresses lie in the row anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at).cast()) };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run<T, const F16: bool>(
        rows: &[(&[T], &[T])],
        hd: usize,
        scale: f32,
        queries: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let keys = rows.len();
        let groups = queries.len() / hd;
        unsafe {
            match groups {
                1 => scores_of::<T, F16, 1>(rows, hd, scale, queries, scores),
                2 => scores_of::<T, F16, 2>(rows, hd, scale, queries, scores),
                3 => scores_of::<T, F16, 3>(rows, hd, scale, queries, scores),
                4 => scores_of::<T, F16, 4>(rows, hd, scale, queries, scores),
                _ => {
                    for (g, q) in queries.chunks_exact(hd).enumerate() {
                        let s = &mut scores[g * keys..(g + 1) * keys];
                        scores_of::<T, F16, 1>(rows, hd, scale, q, s);
                    }
                }
            }
        }
        for s in scores.chunks_exact_mut(keys.max(1)) {
            super::softmax_in_place(s);
        }
        let values = rows;
        unsafe {
            match groups {
                1 => weighted_sum::<T, F16, 1, 4>(values, hd, scores, out),
                2 => weighted_sum::<T, F16, 2, 4>(values, hd, scores, out),
                3 => weighted_sum::<T, F16, 3, 4>(values, hd, scores, out),
                4 => weighted_sum::<T, F16, 4, 2>(values, hd, scores, out),
                5 => weighted_sum::<T, F16, 5, 2>(values, hd, scores, out),
                6 => weighted_sum::<T, F16, 6, 2>(values, hd, scores, out),
                7 => weighted_sum::<T, F16, 7, 2>(values, hd, scores, out),
                8 => weighted_sum::<T, F16, 8, 2>(values, hd, scores, out),
                _ => {
                    for (g, o) in out.chunks_exact_mut(hd).enumerate() {
                        let w = &scores[g * keys..(g + 1) * keys];
                        weighted_sum::<T, F16, 1, 4>(values, hd, w, o);
                    }
                }
            }
        }
    }

    /// The scaled scores q_g · k_j · scale into `scores[g · keys + j]` for G heads:
    /// keys in blocks of four, each 8-value piece of a key converted once and met by the
    /// G queries' pieces, 4G FMA chains in registers; one reduction per head and block.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scores_of<T, const F16: bool, const G: usize>(
        rows: &[(&[T], &[T])],
        hd: usize,
        scale: f32,
        queries: &[f32],
        scores: &mut [f32],
    ) {
        let keys = rows.len();
        for (b, four) in rows.chunks(BLOCK).enumerate() {
            // Rows are a head's slice of each position (strided by the other heads): ask
            // for the next block's, so that loads overlap the arithmetic. (The values too:
            // the weighted sum does too little per row to hide a miss.)
            for (key, value) in rows.iter().skip((b + 1) * BLOCK).take(BLOCK) {
                prefetch(key);
                prefetch(value);
            }
            // A last, short block repeats its last key; those lanes are not stored.
            let k: [*const T; BLOCK] =
                std::array::from_fn(|j| four[j.min(four.len() - 1)].0.as_ptr());
            let mut acc = [[_mm256_setzero_ps(); BLOCK]; G];
            for c in (0..hd).step_by(8) {
                let kv: [__m256; BLOCK] = k.map(|k| unsafe { load8::<T, F16>(k, c) });
                for (g, acc) in acc.iter_mut().enumerate() {
                    let q = unsafe { _mm256_loadu_ps(queries.as_ptr().add(g * hd + c)) };
                    for (acc, kv) in acc.iter_mut().zip(kv) {
                        *acc = _mm256_fmadd_ps(q, kv, *acc);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                // [a0 a0 a1 a1 | a0 a0 a1 a1] pairs, then [a0 a1 a2 a3 | a0 a1 a2 a3].
                let h01 = _mm256_hadd_ps(acc[0], acc[1]);
                let h23 = _mm256_hadd_ps(acc[2], acc[3]);
                let h = _mm256_hadd_ps(h01, h23);
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                let mut four_scores = [0f32; BLOCK];
                unsafe {
                    _mm_storeu_ps(four_scores.as_mut_ptr(), _mm_mul_ps(s, _mm_set1_ps(scale)))
                };
                // (An element loop: a slice copy of up to four is a library call.)
                let to = &mut scores[g * keys + b * BLOCK..][..four.len()];
                for (to, s) in to.iter_mut().zip(four_scores) {
                    *to = s;
                }
            }
        }
    }

    /// out[g] = Σ_j scores[g · keys + j] · value_j for G heads: W pieces of 8 values of
    /// each head at a time (fewer at the end of the head), their G·W sums in registers
    /// over all the keys (fused multiply-adds in key order).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn weighted_sum<T, const F16: bool, const G: usize, const W: usize>(
        values: &[(&[T], &[T])],
        hd: usize,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let keys = values.len();
        let mut c = 0;
        while c < hd {
            let pieces = ((hd - c) / 8).min(W);
            let mut acc = [[_mm256_setzero_ps(); W]; G];
            for (j, (_, v)) in values.iter().enumerate() {
                let v = v.as_ptr();
                let x: [__m256; W] = std::array::from_fn(|i| {
                    if i < pieces {
                        unsafe { load8::<T, F16>(v, c + 8 * i) }
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(scores[g * keys + j]);
                    for (acc, x) in acc.iter_mut().zip(x).take(pieces) {
                        *acc = _mm256_fmadd_ps(w, x, *acc);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (i, acc) in acc.iter().enumerate().take(pieces) {
                    unsafe { _mm256_storeu_ps(out[g * hd + c + 8 * i..].as_mut_ptr(), *acc) };
                }
            }
            c += 8 * pieces;
        }
    }
}

/// A dot product in 16 independent lanes, so the compiler can keep it in vector registers
/// (a single running sum would force a serial order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    /// Deterministic values in (-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// softmax(q·k · scale) · v per head, in f64 from the f32 values.
    fn reference(
        keys: &[Vec<f32>],
        vals: &[Vec<f32>],
        q: &[f32],
        hd: usize,
        scale: f32,
    ) -> Vec<f64> {
        let mut out = Vec::new();
        for q in q.chunks_exact(hd) {
            let s: Vec<f64> = keys
                .iter()
                .map(|k| {
                    q.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                out.push(e.iter().zip(vals).map(|(w, v)| w / z * v[d] as f64).sum());
            }
        }
        out
    }

    fn check<T: KvElement>(convert: impl Fn(f32) -> T, back: impl Fn(&T) -> f32) {
        for (hd, groups, keys) in [
            (64, 3, 72),
            (64, 7, 5),
            (128, 1, 33),
            (16, 9, 200),
            (24, 2, 1),
            (64, 3, 6),
            (40, 4, 3),
        ] {
            let ks: Vec<Vec<T>> = (0..keys)
                .map(|j| values(hd, j as u64 + 1).into_iter().map(&convert).collect())
                .collect();
            let vs: Vec<Vec<T>> = (0..keys)
                .map(|j| {
                    values(hd, 1000 + j as u64)
                        .into_iter()
                        .map(&convert)
                        .collect()
                })
                .collect();
            let q: Vec<f32> = values(groups * hd, 7).iter().map(|v| 4.0 * v).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let rows: Vec<(&[T], &[T])> =
                ks.iter().zip(&vs).map(|(k, v)| (&k[..], &v[..])).collect();
            let mut scores = vec![0f32; groups * keys];
            let mut portable = vec![0f32; groups * hd];
            attend_portable::<T>(&rows, hd, scale, &q, &mut scores, &mut portable);
            let as_f32 = |r: &Vec<Vec<T>>| -> Vec<Vec<f32>> {
                r.iter().map(|r| r.iter().map(&back).collect()).collect()
            };
            let want = reference(&as_f32(&ks), &as_f32(&vs), &q, hd, scale);
            let err = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .fold(0f64, |e, (g, w)| e.max((*g as f64 - w).abs()))
            };
            assert!(
                err(&portable) < 2e-6,
                "portable hd {hd} G {groups}: {}",
                err(&portable)
            );
            #[cfg(target_arch = "x86_64")]
            if let Some(kind) = T::SIMD.filter(|_| x86::fits(hd)) {
                let mut simd = vec![0f32; groups * hd];
                // SAFETY: `fits` checked the features and the head size.
                unsafe { x86::attend(kind, &rows, hd, scale, &q, &mut scores, &mut simd) };
                assert!(err(&simd) < 2e-6, "x86 hd {hd} G {groups}: {}", err(&simd));
            }
        }
    }

    #[test]
    fn both_kernels_match_softmax_attention_in_f64() {
        check::<f32>(|v| v, |v| *v);
        check::<f16>(f16::from_f32, |v| v.to_f32());
        check::<half::bf16>(half::bf16::from_f32, |v| v.to_f32());
    }
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod cold_timing {
    use half::f16;

    use super::*;

    /// Attention as a batch-16 decode step of SmolLM2 meets it: 16 sequences × 30 layers,
    /// 3 KV heads of 64, 40 visible positions, the cache evicted by ~2.8 MB of "weights"
    /// streamed between layers. Not a test: `cargo test --release --lib cold_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_with_a_cold_cache() {
        let (seqs, layers, nkv, hd, positions, keys, groups) = (16, 30, 3, 64, 72, 40, 3);
        let kv: Vec<Vec<(Vec<f16>, Vec<f16>)>> = (0..layers)
            .map(|l| {
                (0..seqs)
                    .map(|s| {
                        let v = |o: usize| {
                            (0..positions * nkv * hd)
                                .map(|i| {
                                    f16::from_f32(
                                        ((i * 31 + s * 7 + l + o) % 97) as f32 / 97.0 - 0.5,
                                    )
                                })
                                .collect::<Vec<_>>()
                        };
                        (v(0), v(1))
                    })
                    .collect()
            })
            .collect();
        let mut weights = vec![1u8; 96 << 20];
        let q: Vec<f32> = (0..groups * hd)
            .map(|i| (i % 13) as f32 / 13.0 - 0.5)
            .collect();
        let mut out = vec![0f32; groups * hd];
        let mut scores = vec![0f32; groups * keys];
        for round in 0..3 {
            let mut spent = std::time::Duration::ZERO;
            let mut per_head = [std::time::Duration::ZERO; 3];
            let mut sink = 0u64;
            for _step in 0..20 {
                for (l, layer) in kv.iter().enumerate() {
                    // A layer's weights stream through the caches between its attentions.
                    let w = &mut weights[(l * 2_900_000) % (90 << 20)..][..2_900_000];
                    for c in w.chunks(64) {
                        sink = sink.wrapping_add(c[0] as u64);
                    }
                    let t = std::time::Instant::now();
                    for (k, v) in layer {
                        for (h, spent_on_head) in per_head.iter_mut().enumerate() {
                            let th = std::time::Instant::now();
                            let rows: Vec<(&[f16], &[f16])> = (0..keys)
                                .map(|r| {
                                    let at = (r * nkv + h) * hd;
                                    (&k[at..at + hd], &v[at..at + hd])
                                })
                                .collect();
                            // SAFETY: this machine's features, checked first.
                            assert!(x86::fits(hd));
                            unsafe {
                                x86::attend(
                                    x86::Kind::F16,
                                    &rows,
                                    hd,
                                    0.125,
                                    &q,
                                    &mut scores,
                                    &mut out,
                                )
                            };
                            *spent_on_head += th.elapsed();
                        }
                    }
                    spent += t.elapsed();
                    std::hint::black_box(&mut out);
                }
                weights[sink as usize % 1000] ^= 1;
            }
            let per_task = spent.as_nanos() as f64 / (20 * layers * seqs * nkv) as f64;
            let ph = per_head.map(|d| d.as_nanos() as f64 / (20 * layers * seqs) as f64);
            // The same task again and again, its rows in L1.
            let (k, v) = &kv[0][0];
            let rows: Vec<(&[f16], &[f16])> = (0..keys)
                .map(|r| (&k[r * nkv * hd..][..hd], &v[r * nkv * hd..][..hd]))
                .collect();
            let t = std::time::Instant::now();
            for _ in 0..10_000 {
                // SAFETY: as above.
                unsafe { x86::attend(x86::Kind::F16, &rows, hd, 0.125, &q, &mut scores, &mut out) };
                std::hint::black_box(&mut out);
            }
            let hot = t.elapsed().as_nanos() as f64 / 10_000.0;
            eprintln!(
                "round {round}: {per_task:.0} ns a task, by KV head {ph:.0?} (in a row's order); {hot:.0} ns with the rows in L1"
            );
        }
    }
}
