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
    // A segment's visible rows: from the window's oldest position to `at`.
    let visible = move |seg: &SegmentView<'_, T>| {
        let to = (at + 1).saturating_sub(seg.start).min(seg.len);
        oldest.saturating_sub(seg.start).min(to)..to
    };
    // Each segment's visible rows, as (keys, values) of this head, oldest first.
    let rows = segments.iter().flat_map(move |seg| {
        visible(seg).map(move |r| {
            let at = (r * kv_heads + head) * hd;
            (&seg.keys[at..at + hd], &seg.values[at..at + hd])
        })
    });
    let keys: usize = segments.iter().map(|seg| visible(seg).len()).sum();
    // scores[g·keys + j]
    let mut scores = vec![0f32; groups * keys];
    #[cfg(target_arch = "x86_64")]
    if let Some(kind) = T::SIMD.filter(|_| x86::fits(hd)) {
        // SAFETY: `fits` checked the CPU's features and the head size.
        unsafe { x86::attend(kind, rows, keys, hd, scale, queries, &mut scores, out) };
        return;
    }
    attend_portable::<T>(rows, keys, hd, scale, queries, &mut scores, out);
}

/// [`attend_one`] after the rows are found, in plain Rust (other CPUs, bf16 caches, odd
/// head sizes; and the reference of the x86 kernel's tests).
#[allow(clippy::too_many_arguments)]
fn attend_portable<'a, T: KvElement + 'a>(
    rows: impl Iterator<Item = (&'a [T], &'a [T])> + Clone,
    keys: usize,
    hd: usize,
    scale: f32,
    queries: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let mut buf = vec![0f32; hd];
    for (j, (key, _)) in rows.clone().enumerate() {
        let key = T::as_f32(key, &mut buf);
        for (g, query) in queries.chunks_exact(hd).enumerate() {
            scores[g * keys + j] = dot(query, key) * scale;
        }
    }
    for s in scores.chunks_exact_mut(keys.max(1)) {
        softmax_in_place(s);
    }
    out.fill(0.0);
    for (j, (_, value)) in rows.enumerate() {
        let value = T::as_f32(value, &mut buf);
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[g * keys + j];
            o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
        }
    }
}

/// softmax(s) in place: e^(s − max) through the stats' branch-free exp, then normalized.
fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = crate::stats::exp_nonpositive((*x - max).max(-80.0));
        sum += *x;
    }
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

/// The AVX2 kernel of [`attend_one`] for f32 and f16 caches: each key and value row is
/// converted to f32 once into registers' worth of scratch, the dot products run in two
/// FMA chains of 8 lanes each, and the weighted sum of values is fused multiply-adds.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The largest head size the kernel's scratch holds.
    const MAX_HEAD: usize = 256;

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

    /// [`super::attend_one`] after the rows are found: `rows` yields each visible
    /// (key, value) of the head (hd values each), `scores` has room for G · keys.
    ///
    /// # Safety
    /// [`fits`]`(hd)` holds, and `T` is f32 for `Kind::F32`, f16 for `Kind::F16`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend<'a, T: 'a>(
        kind: Kind,
        rows: impl Iterator<Item = (&'a [T], &'a [T])> + Clone,
        keys: usize,
        hd: usize,
        scale: f32,
        queries: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe {
            match kind {
                Kind::F32 => run::<T, false>(rows, keys, hd, scale, queries, scores, out),
                Kind::F16 => run::<T, true>(rows, keys, hd, scale, queries, scores, out),
            }
        }
    }

    /// Row `src` (hd values of f32, or f16 when F16) as f32 into `dst`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen<T, const F16: bool>(src: &[T], dst: &mut [f32; MAX_HEAD], hd: usize) {
        for c in (0..hd).step_by(8) {
            unsafe {
                let v = if F16 {
                    _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast::<u16>().add(c).cast()))
                } else {
                    _mm256_loadu_ps(src.as_ptr().cast::<f32>().add(c))
                };
                _mm256_storeu_ps(dst.as_mut_ptr().add(c), v);
            }
        }
    }

    /// Rows read ahead of the one in use.
    const AHEAD: usize = 4;

    /// Asks for the cache lines of a row.
    #[inline(always)]
    fn prefetch<T>(row: &[T]) {
        let p = row.as_ptr().cast::<u8>();
        for at in (0..std::mem::size_of_val(row)).step_by(64) {
            // SAFETY: a prefetch never faults; the addresses lie in the row anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at).cast()) };
        }
    }

    /// Σ a·b over hd values (a multiple of 8), in two chains of 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot(a: *const f32, b: *const f32, hd: usize) -> f32 {
        unsafe {
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c + 16 <= hd {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), _mm256_loadu_ps(b.add(c)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.add(c + 8)),
                    _mm256_loadu_ps(b.add(c + 8)),
                    s1,
                );
                c += 16;
            }
            if c < hd {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(c)), _mm256_loadu_ps(b.add(c)), s0);
            }
            let s = _mm256_add_ps(s0, s1);
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run<'a, T: 'a, const F16: bool>(
        rows: impl Iterator<Item = (&'a [T], &'a [T])> + Clone,
        keys: usize,
        hd: usize,
        scale: f32,
        queries: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let groups = queries.len() / hd;
        let mut buf = [0f32; MAX_HEAD];
        let mut values = Vec::with_capacity(keys);
        // Rows are a head's slice of each position (strided by the other heads): ask for
        // the ones a few keys ahead, so that loads overlap the arithmetic.
        let mut ahead = rows.clone().skip(AHEAD);
        for (j, (key, value)) in rows.enumerate() {
            if let Some((next_key, next_value)) = ahead.next() {
                // (The values are asked for here too: the loop over them does too little
                // per row to hide a miss.)
                prefetch(next_key);
                prefetch(next_value);
            }
            values.push(value.as_ptr());
            unsafe { widen::<T, F16>(key, &mut buf, hd) };
            for g in 0..groups {
                let q = queries[g * hd..].as_ptr();
                scores[g * keys + j] = unsafe { dot(q, buf.as_ptr(), hd) } * scale;
            }
        }
        for s in scores.chunks_exact_mut(keys.max(1)) {
            super::softmax_in_place(s);
        }
        unsafe {
            match groups {
                1 => weighted_sum::<T, F16, 1>(&values, hd, scores, out),
                2 => weighted_sum::<T, F16, 2>(&values, hd, scores, out),
                3 => weighted_sum::<T, F16, 3>(&values, hd, scores, out),
                4 => weighted_sum::<T, F16, 4>(&values, hd, scores, out),
                5 => weighted_sum::<T, F16, 5>(&values, hd, scores, out),
                6 => weighted_sum::<T, F16, 6>(&values, hd, scores, out),
                7 => weighted_sum::<T, F16, 7>(&values, hd, scores, out),
                8 => weighted_sum::<T, F16, 8>(&values, hd, scores, out),
                _ => {
                    for (g, o) in out.chunks_exact_mut(hd).enumerate() {
                        let w = &scores[g * values.len()..(g + 1) * values.len()];
                        weighted_sum::<T, F16, 1>(&values, hd, w, o);
                    }
                }
            }
        }
    }

    /// out[g] = Σ_j scores[g · keys + j] · value_j for G heads: 8 values of each head
    /// at a time, their G sums in registers over all the keys (fused multiply-adds in key
    /// order).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn weighted_sum<T, const F16: bool, const G: usize>(
        values: &[*const T],
        hd: usize,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let keys = values.len();
        for c in (0..hd).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); G];
            for (j, &v) in values.iter().enumerate() {
                let x = unsafe {
                    if F16 {
                        _mm256_cvtph_ps(_mm_loadu_si128(v.cast::<u16>().add(c).cast()))
                    } else {
                        _mm256_loadu_ps(v.cast::<f32>().add(c))
                    }
                };
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(scores[g * keys + j]);
                    *acc = _mm256_fmadd_ps(w, x, *acc);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                unsafe { _mm256_storeu_ps(out[g * hd + c..][..8].as_mut_ptr(), *acc) };
            }
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
            let rows = ks.iter().zip(&vs).map(|(k, v)| (&k[..], &v[..]));
            let mut scores = vec![0f32; groups * keys];
            let mut portable = vec![0f32; groups * hd];
            attend_portable::<T>(
                rows.clone(),
                keys,
                hd,
                scale,
                &q,
                &mut scores,
                &mut portable,
            );
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
                unsafe { x86::attend(kind, rows, keys, hd, scale, &q, &mut scores, &mut simd) };
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
