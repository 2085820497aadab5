//! The AVX2 kernel of [`super::attend_one`] for f32 and f16 caches. Keys go in blocks of four:
//! each is converted to f32 once, the G queries meet the block in four independent FMA
//! chains, and one horizontal reduction gives the four scores. The weighted sum of
//! values keeps G heads × 16 values in registers over all the keys.

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
        let k: [*const T; BLOCK] = std::array::from_fn(|j| four[j.min(four.len() - 1)].0.as_ptr());
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
            unsafe { _mm_storeu_ps(four_scores.as_mut_ptr(), _mm_mul_ps(s, _mm_set1_ps(scale))) };
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
