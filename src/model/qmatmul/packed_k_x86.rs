//! The x86-64 microkernels over repacked K-quant tiles (`packed_k`): a register tile of R
//! activation rows × G column groups of 16; per sub-block the integer products by
//! `vpdpbusd` (AVX-512 VNNI, AVX-VNNI) or `maddubs`/`madd` (AVX2), times the sub-block
//! scales (`vpmulld`), the mins (Q4_K) or the −32 offset (Q6_K) through `madd` of the scale
//! pairs with the activation's sub-block sums, and the f32 part in the order `packed_k`
//! documents, so every level returns the scalar kernel's bits.

use std::arch::x86_64::*;

use super::packed::{PackedType, LANES};
use super::packed_k::{
    Q4K_D, Q4K_DMIN, Q4K_MINS, Q4K_SCALES, Q4K_TILE, Q6K_D, Q6K_SCALES, Q6K_TILE,
};
use super::packed_x86::{GROUPS, ROWS_256, ROWS_512};
use super::quant::Q8KBlock;
use super::x86::Simd;

/// Rows `a` (1 to the level's rows, each `nb` blocks) against column groups `tiles` (1 to
/// [`GROUPS`], each `nb` tiles of `ty`, a K-quant): `out[r * tiles.len() + g]` gets row r's
/// 16 outputs of group g. Panics on sizes that do not match.
pub(super) fn tile(
    simd: Simd,
    ty: PackedType,
    tiles: &[&[u8]],
    a: &[&[Q8KBlock]],
    out: &mut [[f32; LANES]],
) {
    let nb = a.first().map_or(0, |a| a.len());
    assert!(ty.is_k());
    assert!(a.iter().all(|a| a.len() == nb));
    assert!(tiles.iter().all(|t| t.len() == nb * ty.tile_bytes()));
    assert_eq!(out.len(), a.len() * tiles.len());
    let max_rows = match simd {
        Simd::Avx512(_) => ROWS_512,
        _ => ROWS_256,
    };
    assert!(!a.is_empty() && a.len() <= max_rows && (1..=GROUPS).contains(&tiles.len()));
    let t: [*const u8; GROUPS] =
        std::array::from_fn(|g| tiles.get(g).map_or(std::ptr::null(), |t| t.as_ptr()));
    let q6 = ty == PackedType::Q6K;

    macro_rules! go {
        ($f:path, $r:literal, $g:literal) => {{
            let ap: [*const Q8KBlock; $r] = std::array::from_fn(|r| a[r].as_ptr());
            let tp: [*const u8; $g] = std::array::from_fn(|g| t[g]);
            // SAFETY: the token proves the CPU features; the checks above bound the reads.
            let y = unsafe { $f(tp, nb, ap) };
            for r in 0..$r {
                for g in 0..$g {
                    out[r * $g + g] = y[r][g];
                }
            }
        }};
    }
    macro_rules! by_size {
        ($q4:path, $q6:path, [$(($r:literal, $g:literal)),*]) => {
            match (a.len(), tiles.len(), q6) {
                $(
                    ($r, $g, false) => go!($q4, $r, $g),
                    ($r, $g, true) => go!($q6, $r, $g),
                )*
                _ => unreachable!("checked above"),
            }
        };
    }
    match simd {
        Simd::Avx512(_) => by_size!(
            q4k_512,
            q6k_512,
            [
                (1, 1),
                (1, 2),
                (2, 1),
                (2, 2),
                (3, 1),
                (3, 2),
                (4, 1),
                (4, 2)
            ]
        ),
        Simd::AvxVnni(_) => by_size!(
            avx_vnni::q4k,
            avx_vnni::q6k,
            [(1, 1), (1, 2), (2, 1), (2, 2)]
        ),
        Simd::Avx2(_) => by_size!(avx2::q4k, avx2::q6k, [(1, 1), (1, 2), (2, 1), (2, 2)]),
    }
}

/// The activation quad at byte `at` of a block, in every 32-bit lane.
#[inline(always)]
unsafe fn quad(b: *const Q8KBlock, at: usize) -> i32 {
    unsafe { (*b).qs.as_ptr().add(at).cast::<i32>().read_unaligned() }
}

/// Two i16 sums as the halves of an i32 (first in the low half), for `madd` against scale
/// pairs.
#[inline(always)]
fn pair(lo: i32, hi: i32) -> i32 {
    (lo as u16 as i32) | (hi << 16)
}

/// Sub-block j's activation sum: Q4_K's sub-blocks are 32 values (two sums of 16).
#[inline(always)]
unsafe fn sum32(b: *const Q8KBlock, j: usize) -> i32 {
    unsafe { (*b).bsums[2 * j] as i32 + (*b).bsums[2 * j + 1] as i32 }
}

#[inline(always)]
unsafe fn sum16(b: *const Q8KBlock, j: usize) -> i32 {
    unsafe { (*b).bsums[j] as i32 }
}

/// Asks for `bytes` bytes of the next tile (`TILE` past p).
#[inline(always)]
fn prefetch_next<const TILE: usize>(p: *const u8, bytes: usize) {
    for l in 0..bytes.div_ceil(64) {
        // SAFETY: a prefetch never faults, wherever it points.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(TILE + 64 * l).cast()) };
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_512<const R: usize, const G: usize>(
    tiles: [*const u8; G],
    nb: usize,
    a: [*const Q8KBlock; R],
) -> [[[f32; LANES]; G]; R] {
    let low4 = _mm512_set1_epi8(0xF);
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..nb {
        let blk: [*const Q8KBlock; R] = a.map(|p| unsafe { p.add(b) });
        let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * Q4K_TILE) });
        let mut sumi = [[_mm512_setzero_si512(); G]; R];
        let mut summ = [[_mm512_setzero_si512(); G]; R];
        for i in 0..4 {
            let scales: [__m512i; G] = t.map(|t| unsafe {
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(t.add(Q4K_SCALES + 32 * i).cast()))
            });
            for e in 0..2 {
                let j = 2 * i + e;
                for &t in &t {
                    prefetch_next::<Q4K_TILE>(unsafe { t.add(256 * j) }, 256);
                }
                let mut dot = [[_mm512_setzero_si512(); G]; R];
                for q in 0..4 {
                    let w: [(__m512i, __m512i); G] = t.map(|t| {
                        let v = unsafe { _mm512_loadu_si512(t.add(256 * j + 64 * q).cast()) };
                        (
                            _mm512_and_si512(v, low4),
                            _mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                        )
                    });
                    for r in 0..R {
                        let alo = _mm512_set1_epi32(unsafe { quad(blk[r], 32 * j + 4 * q) });
                        let ahi = _mm512_set1_epi32(unsafe { quad(blk[r], 32 * j + 16 + 4 * q) });
                        for g in 0..G {
                            dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], w[g].0, alo);
                            dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], w[g].1, ahi);
                        }
                    }
                }
                let sc: [__m512i; G] = scales.map(|x| {
                    if e == 0 {
                        _mm512_and_si512(x, _mm512_set1_epi32(0xFFFF))
                    } else {
                        _mm512_srli_epi32(x, 16)
                    }
                });
                for r in 0..R {
                    for g in 0..G {
                        let p = _mm512_mullo_epi32(dot[r][g], sc[g]);
                        sumi[r][g] = _mm512_add_epi32(sumi[r][g], p);
                    }
                }
            }
            let mins: [__m512i; G] = t.map(|t| unsafe {
                _mm512_cvtepu8_epi16(_mm256_loadu_si256(t.add(Q4K_MINS + 32 * i).cast()))
            });
            for r in 0..R {
                let s = unsafe { pair(sum32(blk[r], 2 * i), sum32(blk[r], 2 * i + 1)) };
                let s = _mm512_set1_epi32(s);
                for g in 0..G {
                    summ[r][g] = _mm512_add_epi32(summ[r][g], _mm512_madd_epi16(mins[g], s));
                }
            }
        }
        let f16s =
            |at: usize| t.map(|t| _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(t.add(at).cast()) }));
        let (d, dmin) = (f16s(Q4K_D), f16s(Q4K_DMIN));
        for r in 0..R {
            let da = _mm512_set1_ps(unsafe { (*blk[r]).d });
            for g in 0..G {
                let m = _mm512_mul_ps(dmin[g], _mm512_cvtepi32_ps(summ[r][g]));
                let v = _mm512_fmsub_ps(d[g], _mm512_cvtepi32_ps(sumi[r][g]), m);
                acc[r][g] = _mm512_fmadd_ps(da, v, acc[r][g]);
            }
        }
    }
    store_512(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_512<const R: usize, const G: usize>(
    tiles: [*const u8; G],
    nb: usize,
    a: [*const Q8KBlock; R],
) -> [[[f32; LANES]; G]; R] {
    let low4 = _mm512_set1_epi8(0xF);
    let low2 = _mm512_set1_epi8(3);
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..nb {
        let blk: [*const Q8KBlock; R] = a.map(|p| unsafe { p.add(b) });
        let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * Q6K_TILE) });
        let mut sumi = [[_mm512_setzero_si512(); G]; R];
        let mut offs = [[_mm512_setzero_si512(); G]; R];
        for u in 0..8 {
            for &t in &t {
                prefetch_next::<Q6K_TILE>(unsafe { t.add(384 * u) }, 384);
            }
            let high: [(__m512i, __m512i); G] = t.map(|t| unsafe {
                (
                    _mm512_loadu_si512(t.add(384 * u + 256).cast()),
                    _mm512_loadu_si512(t.add(384 * u + 320).cast()),
                )
            });
            // Sub-blocks 2u (quads 0..4, low nibbles) and 2u + 1 (high nibbles).
            let mut dot = [[[_mm512_setzero_si512(); 2]; G]; R];
            for q in 0..4 {
                let w: [(__m512i, __m512i); G] = std::array::from_fn(|g| {
                    let v = unsafe { _mm512_loadu_si512(t[g].add(384 * u + 64 * q).cast()) };
                    let bits = |h: __m512i| {
                        let s = _mm_cvtsi32_si128(2 * q as i32);
                        let two = _mm512_and_si512(_mm512_srl_epi16(h, s), low2);
                        _mm512_slli_epi16::<4>(two)
                    };
                    (
                        _mm512_or_si512(_mm512_and_si512(v, low4), bits(high[g].0)),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                            bits(high[g].1),
                        ),
                    )
                });
                for r in 0..R {
                    let alo = _mm512_set1_epi32(unsafe { quad(blk[r], 32 * u + 4 * q) });
                    let ahi = _mm512_set1_epi32(unsafe { quad(blk[r], 32 * u + 16 + 4 * q) });
                    for g in 0..G {
                        dot[r][g][0] = _mm512_dpbusd_epi32(dot[r][g][0], w[g].0, alo);
                        dot[r][g][1] = _mm512_dpbusd_epi32(dot[r][g][1], w[g].1, ahi);
                    }
                }
            }
            let scales: [__m512i; G] = t.map(|t| unsafe {
                _mm512_cvtepi8_epi16(_mm256_loadu_si256(t.add(Q6K_SCALES + 32 * u).cast()))
            });
            let sc: [(__m512i, __m512i); G] = scales.map(|x| {
                (
                    _mm512_srai_epi32(_mm512_slli_epi32(x, 16), 16),
                    _mm512_srai_epi32(x, 16),
                )
            });
            for r in 0..R {
                let s = unsafe { pair(sum16(blk[r], 2 * u), sum16(blk[r], 2 * u + 1)) };
                let s = _mm512_set1_epi32(s);
                for g in 0..G {
                    let p0 = _mm512_mullo_epi32(dot[r][g][0], sc[g].0);
                    let p1 = _mm512_mullo_epi32(dot[r][g][1], sc[g].1);
                    sumi[r][g] = _mm512_add_epi32(sumi[r][g], _mm512_add_epi32(p0, p1));
                    offs[r][g] = _mm512_add_epi32(offs[r][g], _mm512_madd_epi16(scales[g], s));
                }
            }
        }
        let d: [__m512; G] =
            t.map(|t| _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(t.add(Q6K_D).cast()) }));
        for r in 0..R {
            let da = _mm512_set1_ps(unsafe { (*blk[r]).d });
            for g in 0..G {
                let s = _mm512_sub_epi32(sumi[r][g], _mm512_slli_epi32(offs[r][g], 5));
                acc[r][g] =
                    _mm512_fmadd_ps(_mm512_mul_ps(d[g], da), _mm512_cvtepi32_ps(s), acc[r][g]);
            }
        }
    }
    store_512(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn store_512<const R: usize, const G: usize>(acc: [[__m512; G]; R]) -> [[[f32; LANES]; G]; R] {
    let mut out = [[[0f32; LANES]; G]; R];
    for r in 0..R {
        for g in 0..G {
            // SAFETY: 16 f32 fit the array.
            unsafe { _mm512_storeu_ps(out[r][g].as_mut_ptr(), acc[r][g]) };
        }
    }
    out
}

/// The 256-bit kernels, built twice (AVX2 alone, and with AVX-VNNI): a 16-column group is
/// two 8-lane halves, each run over the whole block in turn (fewer live registers).
macro_rules! kernels_256 {
    ($features:literal) => {
        use std::arch::x86_64::*;

        use super::super::super::packed::LANES;
        use super::super::super::packed_k::{
            Q4K_D, Q4K_DMIN, Q4K_MINS, Q4K_SCALES, Q4K_TILE, Q6K_D, Q6K_SCALES, Q6K_TILE,
        };
        use super::super::super::quant::Q8KBlock;
        use super::super::{pair, prefetch_next, quad, sum16, sum32};
        use super::dpbusd;

        #[target_feature(enable = $features)]
        pub(in super::super::super) unsafe fn q4k<const R: usize, const G: usize>(
            tiles: [*const u8; G],
            nb: usize,
            a: [*const Q8KBlock; R],
        ) -> [[[f32; LANES]; G]; R] {
            let low4 = _mm256_set1_epi8(0xF);
            let mut out = [[[0f32; LANES]; G]; R];
            for h in 0..2 {
                let mut acc = [[_mm256_setzero_ps(); G]; R];
                for b in 0..nb {
                    let blk: [*const Q8KBlock; R] = a.map(|p| unsafe { p.add(b) });
                    let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * Q4K_TILE) });
                    let mut sumi = [[_mm256_setzero_si256(); G]; R];
                    let mut summ = [[_mm256_setzero_si256(); G]; R];
                    for i in 0..4 {
                        let scales: [__m256i; G] = t.map(|t| unsafe {
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(
                                t.add(Q4K_SCALES + 32 * i + 16 * h).cast(),
                            ))
                        });
                        for e in 0..2 {
                            let j = 2 * i + e;
                            if h == 0 {
                                for &t in &t {
                                    prefetch_next::<Q4K_TILE>(unsafe { t.add(256 * j) }, 256);
                                }
                            }
                            let mut dot = [[_mm256_setzero_si256(); G]; R];
                            for q in 0..4 {
                                let w: [(__m256i, __m256i); G] = t.map(|t| {
                                    let v = unsafe {
                                        _mm256_loadu_si256(t.add(256 * j + 64 * q + 32 * h).cast())
                                    };
                                    (
                                        _mm256_and_si256(v, low4),
                                        _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                    )
                                });
                                for r in 0..R {
                                    let alo =
                                        _mm256_set1_epi32(unsafe { quad(blk[r], 32 * j + 4 * q) });
                                    let ahi = _mm256_set1_epi32(unsafe {
                                        quad(blk[r], 32 * j + 16 + 4 * q)
                                    });
                                    for g in 0..G {
                                        dot[r][g] = dpbusd(dot[r][g], w[g].0, alo);
                                        dot[r][g] = dpbusd(dot[r][g], w[g].1, ahi);
                                    }
                                }
                            }
                            let sc: [__m256i; G] = scales.map(|x| {
                                if e == 0 {
                                    _mm256_and_si256(x, _mm256_set1_epi32(0xFFFF))
                                } else {
                                    _mm256_srli_epi32(x, 16)
                                }
                            });
                            for r in 0..R {
                                for g in 0..G {
                                    let p = _mm256_mullo_epi32(dot[r][g], sc[g]);
                                    sumi[r][g] = _mm256_add_epi32(sumi[r][g], p);
                                }
                            }
                        }
                        let mins: [__m256i; G] = t.map(|t| unsafe {
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(
                                t.add(Q4K_MINS + 32 * i + 16 * h).cast(),
                            ))
                        });
                        for r in 0..R {
                            let s = unsafe { pair(sum32(blk[r], 2 * i), sum32(blk[r], 2 * i + 1)) };
                            let s = _mm256_set1_epi32(s);
                            for g in 0..G {
                                let m = _mm256_madd_epi16(mins[g], s);
                                summ[r][g] = _mm256_add_epi32(summ[r][g], m);
                            }
                        }
                    }
                    let f16s = |at: usize| {
                        t.map(|t| {
                            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(t.add(at + 16 * h).cast()) })
                        })
                    };
                    let (d, dmin) = (f16s(Q4K_D), f16s(Q4K_DMIN));
                    for r in 0..R {
                        let da = _mm256_set1_ps(unsafe { (*blk[r]).d });
                        for g in 0..G {
                            let m = _mm256_mul_ps(dmin[g], _mm256_cvtepi32_ps(summ[r][g]));
                            let v = _mm256_fmsub_ps(d[g], _mm256_cvtepi32_ps(sumi[r][g]), m);
                            acc[r][g] = _mm256_fmadd_ps(da, v, acc[r][g]);
                        }
                    }
                }
                for r in 0..R {
                    for g in 0..G {
                        // SAFETY: 8 f32 fit the half.
                        unsafe { _mm256_storeu_ps(out[r][g][8 * h..].as_mut_ptr(), acc[r][g]) };
                    }
                }
            }
            out
        }

        #[target_feature(enable = $features)]
        pub(in super::super::super) unsafe fn q6k<const R: usize, const G: usize>(
            tiles: [*const u8; G],
            nb: usize,
            a: [*const Q8KBlock; R],
        ) -> [[[f32; LANES]; G]; R] {
            let low4 = _mm256_set1_epi8(0xF);
            let low2 = _mm256_set1_epi8(3);
            let mut out = [[[0f32; LANES]; G]; R];
            for h in 0..2 {
                let mut acc = [[_mm256_setzero_ps(); G]; R];
                for b in 0..nb {
                    let blk: [*const Q8KBlock; R] = a.map(|p| unsafe { p.add(b) });
                    let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * Q6K_TILE) });
                    let mut sumi = [[_mm256_setzero_si256(); G]; R];
                    let mut offs = [[_mm256_setzero_si256(); G]; R];
                    for u in 0..8 {
                        if h == 0 {
                            for &t in &t {
                                prefetch_next::<Q6K_TILE>(unsafe { t.add(384 * u) }, 384);
                            }
                        }
                        let high: [(__m256i, __m256i); G] = t.map(|t| unsafe {
                            (
                                _mm256_loadu_si256(t.add(384 * u + 256 + 32 * h).cast()),
                                _mm256_loadu_si256(t.add(384 * u + 320 + 32 * h).cast()),
                            )
                        });
                        let mut dot = [[[_mm256_setzero_si256(); 2]; G]; R];
                        for q in 0..4 {
                            let w: [(__m256i, __m256i); G] = std::array::from_fn(|g| {
                                let v = unsafe {
                                    _mm256_loadu_si256(t[g].add(384 * u + 64 * q + 32 * h).cast())
                                };
                                let bits = |x: __m256i| {
                                    let s = _mm_cvtsi32_si128(2 * q as i32);
                                    _mm256_slli_epi16(
                                        _mm256_and_si256(_mm256_srl_epi16(x, s), low2),
                                        4,
                                    )
                                };
                                (
                                    _mm256_or_si256(_mm256_and_si256(v, low4), bits(high[g].0)),
                                    _mm256_or_si256(
                                        _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                        bits(high[g].1),
                                    ),
                                )
                            });
                            for r in 0..R {
                                let alo =
                                    _mm256_set1_epi32(unsafe { quad(blk[r], 32 * u + 4 * q) });
                                let ahi =
                                    _mm256_set1_epi32(unsafe { quad(blk[r], 32 * u + 16 + 4 * q) });
                                for g in 0..G {
                                    dot[r][g][0] = dpbusd(dot[r][g][0], w[g].0, alo);
                                    dot[r][g][1] = dpbusd(dot[r][g][1], w[g].1, ahi);
                                }
                            }
                        }
                        let scales: [__m256i; G] = t.map(|t| unsafe {
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                t.add(Q6K_SCALES + 32 * u + 16 * h).cast(),
                            ))
                        });
                        for r in 0..R {
                            let s = unsafe { pair(sum16(blk[r], 2 * u), sum16(blk[r], 2 * u + 1)) };
                            let s = _mm256_set1_epi32(s);
                            for g in 0..G {
                                let x = scales[g];
                                let lo = _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16);
                                let hi = _mm256_srai_epi32(x, 16);
                                let p0 = _mm256_mullo_epi32(dot[r][g][0], lo);
                                let p1 = _mm256_mullo_epi32(dot[r][g][1], hi);
                                sumi[r][g] = _mm256_add_epi32(sumi[r][g], _mm256_add_epi32(p0, p1));
                                offs[r][g] = _mm256_add_epi32(offs[r][g], _mm256_madd_epi16(x, s));
                            }
                        }
                    }
                    let d: [__m256; G] = t.map(|t| {
                        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(t.add(Q6K_D + 16 * h).cast()) })
                    });
                    for r in 0..R {
                        let da = _mm256_set1_ps(unsafe { (*blk[r]).d });
                        for g in 0..G {
                            let s = _mm256_sub_epi32(sumi[r][g], _mm256_slli_epi32(offs[r][g], 5));
                            let scale = _mm256_mul_ps(d[g], da);
                            acc[r][g] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(s), acc[r][g]);
                        }
                    }
                }
                for r in 0..R {
                    for g in 0..G {
                        // SAFETY: 8 f32 fit the half.
                        unsafe { _mm256_storeu_ps(out[r][g][8 * h..].as_mut_ptr(), acc[r][g]) };
                    }
                }
            }
            out
        }
    };
}

mod avx2 {
    use super::super::packed_x86::dpbusd_avx2 as dpbusd;

    mod kernels {
        kernels_256!("avx2,fma,f16c");
    }
    pub(super) use kernels::{q4k, q6k};
}

mod avx_vnni {
    use super::super::packed_x86::dpbusd_avx_vnni as dpbusd;

    mod kernels {
        kernels_256!("avx2,fma,f16c,avxvnni");
    }
    pub(super) use kernels::{q4k, q6k};
}
