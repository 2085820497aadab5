//! The x86-64 microkernels over repacked tiles (`packed`): a register tile of R
//! activation rows × G column groups of 16, the integer products by `vpdpbusd` (AVX-512
//! VNNI, AVX-VNNI) or `maddubs`/`madd` (AVX2), the f32 part in the order `packed`
//! documents, so every level returns the scalar kernel's bits.
//!
//! Per block and quad t < 4, each group's two weight vectors (quads t and t + 4) are
//! loaded once and met by every row's activation quads, broadcast from memory: one weight
//! load per R rows, one activation load per G groups.

use std::arch::x86_64::*;

use super::packed::{PackedType, Q8Block, BLOCK, LANES};
use super::x86::Simd;

/// Rows of the largest register tile, by vector width.
pub(super) const ROWS_512: usize = 4;
pub(super) const ROWS_256: usize = 2;
/// Column groups of the largest register tile.
pub(super) const GROUPS: usize = 2;

/// How far ahead (bytes) the kernels prefetch each group's tiles.
const PREFETCH: usize = 2048;

const Q4_1: u8 = 0;
const Q5_0: u8 = 1;
const Q8_0: u8 = 2;

const fn code(ty: PackedType) -> u8 {
    match ty {
        PackedType::Q4_1 => Q4_1,
        PackedType::Q5_0 => Q5_0,
        PackedType::Q8_0 => Q8_0,
        PackedType::Q4K | PackedType::Q6K => panic!("K-quants have their kernels in packed_k_x86"),
    }
}

const fn ty_of(code: u8) -> PackedType {
    match code {
        Q4_1 => PackedType::Q4_1,
        Q5_0 => PackedType::Q5_0,
        _ => PackedType::Q8_0,
    }
}

/// Rows `a` (1 to the level's rows, each `nb` blocks) against column groups `tiles`
/// (1 to [`GROUPS`], each `nb` tiles of `ty`): `out[r * tiles.len() + g]` gets row r's 16
/// outputs of group g. Panics on sizes that do not match.
pub(super) fn tile(
    simd: Simd,
    ty: PackedType,
    tiles: &[&[u8]],
    a: &[&[Q8Block]],
    out: &mut [[f32; LANES]],
) {
    let nb = a.first().map_or(0, |a| a.len());
    assert!(a.iter().all(|a| a.len() == nb));
    assert!(tiles.iter().all(|t| t.len() == nb * ty.tile_bytes()));
    assert_eq!(out.len(), a.len() * tiles.len());
    let t: [*const u8; GROUPS] =
        std::array::from_fn(|g| tiles.get(g).map_or(std::ptr::null(), |t| t.as_ptr()));
    let max_rows = match simd {
        Simd::Avx512(_) => ROWS_512,
        _ => ROWS_256,
    };
    assert!(!a.is_empty() && a.len() <= max_rows && (1..=GROUPS).contains(&tiles.len()));

    macro_rules! go {
        ($m:ident, $ty:ident, $r:literal, $g:literal) => {{
            let ap: [*const Q8Block; $r] = std::array::from_fn(|r| a[r].as_ptr());
            let tp: [*const u8; $g] = std::array::from_fn(|g| t[g]);
            // SAFETY: the token proves the CPU features; the checks above bound the reads.
            let y = unsafe { $m::tile::<$ty, $r, $g>(tp, nb, ap) };
            for r in 0..$r {
                for g in 0..$g {
                    out[r * $g + g] = y[r][g];
                }
            }
        }};
    }
    macro_rules! by_size {
        ($m:ident, $ty:ident) => {
            match (a.len(), tiles.len()) {
                (1, 1) => go!($m, $ty, 1, 1),
                (1, _) => go!($m, $ty, 1, 2),
                (2, 1) => go!($m, $ty, 2, 1),
                (2, _) => go!($m, $ty, 2, 2),
                (3, 1) => go!($m, $ty, 3, 1),
                (3, _) => go!($m, $ty, 3, 2),
                (_, 1) => go!($m, $ty, 4, 1),
                (_, _) => go!($m, $ty, 4, 2),
            }
        };
    }
    macro_rules! by_size_256 {
        ($m:ident, $ty:ident) => {
            match (a.len(), tiles.len()) {
                (1, 1) => go!($m, $ty, 1, 1),
                (1, _) => go!($m, $ty, 1, 2),
                (_, 1) => go!($m, $ty, 2, 1),
                (_, _) => go!($m, $ty, 2, 2),
            }
        };
    }
    match (simd, code(ty)) {
        (Simd::Avx512(_), Q4_1) => by_size!(avx512, Q4_1),
        (Simd::Avx512(_), Q5_0) => by_size!(avx512, Q5_0),
        (Simd::Avx512(_), _) => by_size!(avx512, Q8_0),
        (Simd::AvxVnni(_), Q4_1) => by_size_256!(avx_vnni, Q4_1),
        (Simd::AvxVnni(_), Q5_0) => by_size_256!(avx_vnni, Q5_0),
        (Simd::AvxVnni(_), _) => by_size_256!(avx_vnni, Q8_0),
        (Simd::Avx2(_), Q4_1) => by_size_256!(avx2, Q4_1),
        (Simd::Avx2(_), Q5_0) => by_size_256!(avx2, Q5_0),
        (Simd::Avx2(_), _) => by_size_256!(avx2, Q8_0),
    }
}

mod avx512 {
    pub(super) use super::tile_512 as tile;
}

/// Activations (`out.len()` blocks of 32) as [`Q8Block`]s, with `packed::quantize_block`'s
/// arithmetic: |x| max, d = max / 127, the products x · (1 / d) rounded to nearest even
/// (the default MXCSR mode of `cvtps2dq`, as `round_small` rounds), their sum.
pub(super) fn quantize_row(simd: Simd, x: &[f32], out: &mut [Q8Block]) {
    assert_eq!(x.len(), out.len() * BLOCK);
    for (o, x) in out.iter_mut().zip(x.chunks_exact(BLOCK)) {
        let x: &[f32; BLOCK] = x.try_into().expect("a block of 32");
        // SAFETY: the token proves the CPU features.
        *o = unsafe {
            match simd {
                Simd::Avx512(_) => quantize_512(x),
                _ => quantize_256(x),
            }
        };
    }
}

/// The scale and its inverse for a block whose largest |value| is `max`.
#[inline(always)]
fn scale_of(max: f32) -> (f32, f32) {
    let d = max / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn quantize_512(x: &[f32; BLOCK]) -> Q8Block {
    unsafe {
        let a = _mm512_loadu_ps(x.as_ptr());
        let b = _mm512_loadu_ps(x.as_ptr().add(16));
        let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let (d, id) = scale_of(max);
        let id = _mm512_set1_ps(id);
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        let mut o = Q8Block::ZERO;
        _mm_storeu_si128(o.qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(o.qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb));
        o.d = d;
        o.sum = sum;
        o.s = d * sum as f32;
        o
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_256(x: &[f32; BLOCK]) -> Q8Block {
    unsafe {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let m = v.map(|v| _mm256_and_ps(v, abs));
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let (d, id) = scale_of(_mm_cvtss_f32(m));
        let id = _mm256_set1_ps(id);
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_hadd_epi32(s, s);
        let sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
        // i32 → i8 with saturating packs (|q| ≤ 127, so nothing saturates), then the
        // 32-bit lanes back in order (the packs work within 128-bit halves).
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut o = Q8Block::ZERO;
        _mm256_storeu_si256(o.qs.as_mut_ptr().cast(), w);
        o.d = d;
        o.sum = sum;
        o.s = d * sum as f32;
        o
    }
}

/// Asks for `bytes` bytes `PREFETCH` ahead of p.
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    for l in 0..bytes.div_ceil(64) {
        // SAFETY: a prefetch never faults, wherever it points.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64 * l).cast()) };
    }
}

/// The activation quad at byte `at` of a block, in every 32-bit lane.
#[inline(always)]
unsafe fn quad_at(b: *const Q8Block, at: usize) -> i32 {
    unsafe { (*b).qs.as_ptr().add(at).cast::<i32>().read_unaligned() }
}

/// The weight vectors of quads t and t + 4 of a tile (u = q + c, unsigned).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn quads_512<const T: u8>(tile: *const u8, t: usize) -> (__m512i, __m512i) {
    unsafe {
        if T == Q8_0 {
            return (
                _mm512_loadu_si512(tile.add(64 * t).cast()),
                _mm512_loadu_si512(tile.add(64 * (t + 4)).cast()),
            );
        }
        let v = _mm512_loadu_si512(tile.add(64 * t).cast());
        let low4 = _mm512_set1_epi8(0xF);
        let lo = _mm512_and_si512(v, low4);
        let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        if T == Q5_0 {
            let masks = tile.add(256).cast::<u64>();
            let fifth = _mm512_set1_epi8(16);
            let klo = masks.add(t).read_unaligned();
            let khi = masks.add(t + 4).read_unaligned();
            return (
                _mm512_mask_add_epi8(lo, klo, lo, fifth),
                _mm512_mask_add_epi8(hi, khi, hi, fifth),
            );
        }
        (lo, hi)
    }
}

/// R rows × G groups of 16 columns over `nb` blocks, with 512-bit vectors.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_512<const T: u8, const R: usize, const G: usize>(
    tiles: [*const u8; G],
    nb: usize,
    a: [*const Q8Block; R],
) -> [[[f32; LANES]; G]; R] {
    let ty = ty_of(T);
    let (tb, sc, off) = (ty.tile_bytes(), ty.scales_at(), ty.offset());
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..nb {
        let blk: [*const Q8Block; R] = a.map(|p| unsafe { p.add(b) });
        let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * tb) });
        for &t in &t {
            prefetch(t, tb);
        }
        let mut dot = [[_mm512_setzero_si512(); G]; R];
        if off != 0 {
            for r in 0..R {
                let init = _mm512_set1_epi32(-off * unsafe { (*blk[r]).sum });
                dot[r] = [init; G];
            }
        }
        for q in 0..4 {
            let w: [(__m512i, __m512i); G] = t.map(|t| unsafe { quads_512::<T>(t, q) });
            for r in 0..R {
                let alo = _mm512_set1_epi32(unsafe { quad_at(blk[r], 4 * q) });
                let ahi = _mm512_set1_epi32(unsafe { quad_at(blk[r], 4 * q + 16) });
                for g in 0..G {
                    dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], w[g].0, alo);
                    dot[r][g] = _mm512_dpbusd_epi32(dot[r][g], w[g].1, ahi);
                }
            }
        }
        let d: [__m512; G] =
            t.map(|t| _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(t.add(sc).cast()) }));
        let mn: [__m512; G] = if T == Q4_1 {
            t.map(|t| _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(t.add(sc + 32).cast()) }))
        } else {
            [_mm512_setzero_ps(); G]
        };
        for r in 0..R {
            let da = _mm512_set1_ps(unsafe { (*blk[r]).d });
            let sa = _mm512_set1_ps(unsafe { (*blk[r]).s });
            for g in 0..G {
                let f = _mm512_cvtepi32_ps(dot[r][g]);
                acc[r][g] = _mm512_fmadd_ps(_mm512_mul_ps(d[g], da), f, acc[r][g]);
                if T == Q4_1 {
                    acc[r][g] = _mm512_fmadd_ps(mn[g], sa, acc[r][g]);
                }
            }
        }
    }
    let mut out = [[[0f32; LANES]; G]; R];
    for r in 0..R {
        for g in 0..G {
            // SAFETY: 16 f32 fit the array.
            unsafe { _mm512_storeu_ps(out[r][g].as_mut_ptr(), acc[r][g]) };
        }
    }
    out
}

/// The 256-bit kernels, built twice: with AVX2 alone (`maddubs` + `madd`, Q8_0 with its
/// sign moved onto the activations, since u up to 255 would saturate `maddubs`' pairs),
/// and with AVX-VNNI. A 16-column group is two 8-lane halves.
macro_rules! kernels_256 {
    ($features:literal, $vnni:expr) => {
        use std::arch::x86_64::*;

        use super::super::super::packed::{Q8Block, LANES};
        use super::super::{prefetch, quad_at, ty_of, Q4_1, Q5_0, Q8_0};

        /// acc + the sums of four u8 × i8 products per lane (u: the weights).
        #[target_feature(enable = $features)]
        #[inline]
        fn dot4<const T: u8>(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
            if T == Q8_0 && !$vnni {
                // The signed values: |q| times the activations with q's sign.
                let q = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                return super::dpbusd(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(a, q));
            }
            super::dpbusd(acc, u, a)
        }

        /// The 32 mask bits at p as bytes: 16 where the bit is set, 0 elsewhere.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn fifth_bits(p: *const u8) -> __m256i {
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
            let select = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
            _mm256_and_si256(set, _mm256_set1_epi8(16))
        }

        /// Half h's weight vectors of quads t and t + 4.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn quads<const T: u8>(tile: *const u8, t: usize, h: usize) -> (__m256i, __m256i) {
            unsafe {
                if T == Q8_0 {
                    return (
                        _mm256_loadu_si256(tile.add(64 * t + 32 * h).cast()),
                        _mm256_loadu_si256(tile.add(64 * (t + 4) + 32 * h).cast()),
                    );
                }
                let v = _mm256_loadu_si256(tile.add(64 * t + 32 * h).cast());
                let low4 = _mm256_set1_epi8(0xF);
                let lo = _mm256_and_si256(v, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                if T == Q5_0 {
                    let masks = tile.add(256 + 4 * h);
                    return (
                        _mm256_or_si256(lo, fifth_bits(masks.add(8 * t))),
                        _mm256_or_si256(hi, fifth_bits(masks.add(8 * (t + 4)))),
                    );
                }
                (lo, hi)
            }
        }

        /// R rows × G groups of 16 columns over `nb` blocks.
        #[target_feature(enable = $features)]
        pub(in super::super::super) unsafe fn tile<const T: u8, const R: usize, const G: usize>(
            tiles: [*const u8; G],
            nb: usize,
            a: [*const Q8Block; R],
        ) -> [[[f32; LANES]; G]; R] {
            let ty = ty_of(T);
            let (tb, sc) = (ty.tile_bytes(), ty.scales_at());
            // Without VNNI, Q8_0's products are signed: no offset to take back.
            let off = if T == Q8_0 && !$vnni { 0 } else { ty.offset() };
            let mut acc = [[[_mm256_setzero_ps(); 2]; G]; R];
            for b in 0..nb {
                let blk: [*const Q8Block; R] = a.map(|p| unsafe { p.add(b) });
                let t: [*const u8; G] = tiles.map(|p| unsafe { p.add(b * tb) });
                for &t in &t {
                    prefetch(t, tb);
                }
                let mut dot = [[[_mm256_setzero_si256(); 2]; G]; R];
                if off != 0 {
                    for r in 0..R {
                        let init = _mm256_set1_epi32(-off * unsafe { (*blk[r]).sum });
                        dot[r] = [[init; 2]; G];
                    }
                }
                for q in 0..4 {
                    for h in 0..2 {
                        let w: [(__m256i, __m256i); G] = t.map(|t| unsafe { quads::<T>(t, q, h) });
                        for r in 0..R {
                            let alo = _mm256_set1_epi32(unsafe { quad_at(blk[r], 4 * q) });
                            let ahi = _mm256_set1_epi32(unsafe { quad_at(blk[r], 4 * q + 16) });
                            for g in 0..G {
                                dot[r][g][h] = dot4::<T>(dot[r][g][h], w[g].0, alo);
                                dot[r][g][h] = dot4::<T>(dot[r][g][h], w[g].1, ahi);
                            }
                        }
                    }
                }
                for h in 0..2 {
                    let scales = |at: usize| {
                        t.map(|t| unsafe {
                            _mm256_cvtph_ps(_mm_loadu_si128(t.add(at + 16 * h).cast()))
                        })
                    };
                    let d = scales(sc);
                    let mn = if T == Q4_1 { scales(sc + 32) } else { d };
                    for r in 0..R {
                        let da = _mm256_set1_ps(unsafe { (*blk[r]).d });
                        let sa = _mm256_set1_ps(unsafe { (*blk[r]).s });
                        for g in 0..G {
                            let f = _mm256_cvtepi32_ps(dot[r][g][h]);
                            let x = &mut acc[r][g][h];
                            *x = _mm256_fmadd_ps(_mm256_mul_ps(d[g], da), f, *x);
                            if T == Q4_1 {
                                *x = _mm256_fmadd_ps(mn[g], sa, *x);
                            }
                        }
                    }
                }
            }
            let mut out = [[[0f32; LANES]; G]; R];
            for r in 0..R {
                for g in 0..G {
                    for h in 0..2 {
                        // SAFETY: 8 f32 fit the half.
                        unsafe { _mm256_storeu_ps(out[r][g][8 * h..].as_mut_ptr(), acc[r][g][h]) };
                    }
                }
            }
            out
        }
    };
}

/// acc + four u8 × i8 products per lane with AVX2: through i16 pairs (`maddubs`), which
/// the operand ranges of every kernel here and in `packed_k_x86` never saturate (at most
/// 2 · 63 · 128).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn dpbusd_avx2(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
    let pairs = _mm256_maddubs_epi16(u, a);
    _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// acc + four u8 × i8 products per lane, in one AVX-VNNI instruction.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
#[inline]
pub(super) fn dpbusd_avx_vnni(acc: __m256i, u: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, a)
}

mod avx2 {
    use super::dpbusd_avx2 as dpbusd;

    mod kernels {
        kernels_256!("avx2,fma,f16c", false);
    }
    pub(super) use kernels::tile;
}

mod avx_vnni {
    use super::dpbusd_avx_vnni as dpbusd;

    mod kernels {
        kernels_256!("avx2,fma,f16c,avxvnni", true);
    }
    pub(super) use kernels::tile;
}
