//! The x86-64 dot-product kernels (AVX2, AVX-VNNI, AVX-512 VNNI), after ggml-cpu's
//! `quants.c`. The 256-bit kernels are built twice by the `kernels!` macro: with AVX2
//! alone, and with AVX-VNNI, whose `vpdpbusd` does the u8 × i8 multiply-add of the
//! 32-value types in one instruction. Both give the same integers, so the same results.
//! The AVX-512 kernels take the 32-value types two blocks per 512-bit operation and reuse
//! the 256-bit ones for the K-quants.
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

use super::quant::{Q8KBlock, Q8Pair};

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

impl Simd {
    /// Whether the kernels for activation blocks of `act_elems` values keep two
    /// weight rows × TILE activation rows in registers: the 512-bit ones for the
    /// 32-value types (32 vector registers); the 256-bit ones have 16.
    pub(super) fn has_registers_for_two(self, act_elems: usize) -> bool {
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
        use super::super::quant::{q4k_scale_min, Q8KBlock, Q8Pair};

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
                    let high =
                        _mm256_andnot_si256(unsafe { bits_32(wb.add(2)) }, _mm256_set1_epi8(-16));
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

/// The 32-value types with 512-bit operations: each step takes a pair of weight
/// blocks, in the halves of 16-lane vectors, against a [`Q8Pair`] of activations.
/// The K-quants use the AVX2 kernels (no VNNI in them; an AVX-512 CPU has AVX2).
mod avx512 {
    use std::arch::x86_64::*;

    use super::super::quant::Q8Pair;
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
