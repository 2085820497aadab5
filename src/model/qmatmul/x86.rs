//! The x86-64 dot-product kernels of the K-quants (Q4_K, Q6_K) on their GGUF blocks,
//! after ggml-cpu's `quants.c`, with AVX2 (built twice by the `kernels!` macro, with and
//! without AVX-VNNI; an AVX-512 CPU uses them too). The 32-value types are repacked and
//! have their own kernels (`packed_x86`).
//!
//! Each kernel takes W weight rows and R activation rows and returns the W × R dot
//! products. Every (weight row, activation row) pair has its own accumulator, updated
//! by the same operations in the same order whatever W and R are: W > 1 gives a
//! single activation row independent chains to overlap, R > 1 reads a weight block
//! once for several activation rows.
//!
//! Layout: [`Simd`] (the detected feature level, a token that proves it) and the safe,
//! size-checking entry points come first; then the `kernels!` macro, the `avx512`
//! module and the `avx2` / `avx_vnni` instantiations. This file is longer than the
//! others because those parts share private helpers and one `unsafe` contract (the
//! entry points' bounds check is what makes every raw read below sound), which is easier
//! to audit in one place. The AVX-512 and AVX-VNNI intrinsics need Rust 1.89.

use super::quant::Q8KBlock;

/// How far ahead (bytes) the kernels prefetch weights.
const PREFETCH: usize = 4096;

/// Proof of the CPU's features, and the kernels they allow: only [`Simd::detect`]
/// makes one.
#[derive(Debug, Clone, Copy)]
pub(super) enum Simd {
    /// AVX2, FMA and F16C.
    Avx2(Private),
    /// And AVX-VNNI (256-bit `vpdpbusd`).
    AvxVnni(Private),
    /// And AVX-512 F/BW/VL/VNNI: the 32-value types take two blocks per 512-bit op.
    Avx512(Private),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Private(());

impl Simd {
    /// The best level this CPU has; `VERITY_QMATMUL_SIMD=avx2|avxvnni` caps it.
    pub(super) fn detect() -> Option<Self> {
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
    pub(super) fn all() -> Vec<Self> {
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
        pub(super) fn $name<const W: usize, const R: usize>(
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
entry!(q4k, Q8KBlock, 144, 1);
entry!(q6k, Q8KBlock, 210, 1);

/// The kernels, for the target features given. Each `unsafe fn` reads `nb` blocks
/// from each weight row pointer and each activation row: the caller checks that they
/// exist and that the CPU has the features.
macro_rules! kernels {
    ($features:literal) => {
        use super::super::quant::{q4k_scale_min, Q8KBlock};

        /// Asks for the weight bytes `PREFETCH` ahead of `p` (blocks of the rows that
        /// come next), `lines` cache lines of them, so that memory keeps streaming
        /// while the kernel computes. A prefetch never faults, wherever it points.
        #[target_feature(enable = $features)]
        pub(super) fn prefetch(p: *const u8, lines: usize) {
            for l in 0..lines {
                let q = p.wrapping_add(super::PREFETCH + 64 * l);
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
                            s[c] =
                                _mm256_set_m128i(_mm_set1_epi16(sc[j + 1]), _mm_set1_epi16(sc[j]));
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

/// The K-quants use the AVX2 kernels on an AVX-512 CPU too (the 32-value types, repacked,
/// have their own: `packed_x86`).
mod avx512 {
    pub use super::avx2::{q4k, q6k};
}

mod avx2 {
    use std::arch::x86_64::*;

    kernels!("avx2,fma,f16c");
}

mod avx_vnni {
    use std::arch::x86_64::*;

    kernels!("avx2,fma,f16c,avxvnni");
}
