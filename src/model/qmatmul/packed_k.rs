//! The K-quants (Q4_K, Q6_K) repacked at load like the 32-value types (`packed`): 16
//! output columns side by side, one tile per 256-value super-block, so that one `vpdpbusd`
//! multiplies 4 values of an activation row into 16 columns and a weight load serves every
//! activation row of a register tile. The activations are ggml's Q8_K ([`Q8KBlock`]).
//!
//! Q4_K tile (2,368 bytes; value = d · sc_j · q − dmin · m_j, q in 0..16, sub-block j of 32):
//!
//! - at 256j (j < 8), four 64-byte vectors: vector t holds, at bytes 4l..4l+4 of lane
//!   (column) l, values 32j + 4t.. in the low nibbles and 32j + 16 + 4t.. in the high ones;
//! - at 2048, the 6-bit scales in pairs: byte 2048 + 32i + 2l + e is sc_{2i+e} of lane l;
//! - at 2176, the mins the same way; at 2304 the 16 d, at 2336 the 16 dmin (f16).
//!
//! Q6_K tile (3,360 bytes; value = d · sc_j · (q − 32), q in 0..64, sub-block j of 16):
//!
//! - at 384u (u < 8), for values 32u..32u + 32 (sub-blocks 2u, 2u + 1): four vectors of
//!   low nibbles laid out as Q4_K's, then two of high bit pairs: byte 4l + b of the vector
//!   at 384u + 256 + 64h holds, at bits 2t..2t + 2, the high bits of value
//!   32u + 16h + 4t + b of lane l;
//! - at 3072, the signed scales in pairs (byte 3072 + 32u + 2l + e is sc_{2u+e} of lane
//!   l); at 3328 the 16 d (f16).
//!
//! The bytes per value are the GGUF blocks' (0.58 and 0.82), so batch-1 decode reads no
//! more than before.
//!
//! Per super-block and output, with y the activation's quants, d_y its scale and Σ_j the
//! sum of its values in sub-block j (from the Q8_K sums of 16):
//!
//!   Q4_K: v = d · Σ_j sc_j (q·y)_j − (dmin · Σ_j m_j Σ_j y),  y_out += d_y · v
//!   Q6_K: y_out += (d · d_y) · (Σ_j sc_j (q·y)_j − 32 Σ_j sc_j Σ_j y)
//!
//! the integer parts exact, the f32 part in this order (fused where written as one
//! multiply-add) in every kernel, so every level gives the scalar kernel's bits and a row
//! never depends on its batch.

use super::packed::{PackedType, PackedWeight, LANES};
use super::quant::{f16_at, q4k_scale_min, q6k_value, Q8KBlock, QK_K};

pub(super) const Q4K_TILE: usize = 2368;
pub(super) const Q6K_TILE: usize = 3360;

/// Where the fields of a tile start.
pub(super) const Q4K_SCALES: usize = 2048;
pub(super) const Q4K_MINS: usize = 2176;
pub(super) const Q4K_D: usize = 2304;
pub(super) const Q4K_DMIN: usize = 2336;
pub(super) const Q6K_SCALES: usize = 3072;
pub(super) const Q6K_D: usize = 3328;

/// Writes GGUF block `b` (Q4_K or Q6_K) as column `lane` of tile t.
pub(super) fn write_lane(ty: PackedType, t: &mut [u8], lane: usize, b: &[u8]) {
    let put_f16 = |t: &mut [u8], at: usize, v: f32| {
        t[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    };
    match ty {
        PackedType::Q4K => {
            for i in 0..QK_K {
                let (j, r) = (i / 32, i % 32);
                let q = (b[16 + 32 * (j / 2) + r] >> (4 * (j % 2))) & 0xF;
                let (t4, byte, high) = ((r % 16) / 4, r % 4, r >= 16);
                let at = 256 * j + 64 * t4 + 4 * lane + byte;
                t[at] |= if high { q << 4 } else { q };
            }
            for j in 0..8 {
                let (sc, m) = q4k_scale_min(j, &b[4..16]);
                t[Q4K_SCALES + 32 * (j / 2) + 2 * lane + j % 2] = sc;
                t[Q4K_MINS + 32 * (j / 2) + 2 * lane + j % 2] = m;
            }
            // The f16 fields are copied as they are (no rounding through f32 matters:
            // f16 → f32 → f16 is exact).
            put_f16(t, Q4K_D + 2 * lane, f16_at(b, 0));
            put_f16(t, Q4K_DMIN + 2 * lane, f16_at(b, 2));
        }
        PackedType::Q6K => {
            for i in 0..QK_K {
                let q = (q6k_value(b, i) + 32) as u8;
                let (u, r) = (i / 32, i % 32);
                let (t4, byte, high) = ((r % 16) / 4, r % 4, r >= 16);
                let at = 4 * lane + byte;
                t[384 * u + 64 * t4 + at] |= if high { (q & 0xF) << 4 } else { q & 0xF };
                t[384 * u + 256 + 64 * usize::from(high) + at] |= (q >> 4) << (2 * t4);
            }
            for j in 0..16 {
                t[Q6K_SCALES + 32 * (j / 2) + 2 * lane + j % 2] = b[192 + j];
            }
            put_f16(t, Q6K_D + 2 * lane, f16_at(b, 208));
        }
        _ => unreachable!("not a K-quant: {ty:?}"),
    }
}

/// The unsigned value q of element i (0..256) of column `lane` in tile t.
pub(super) fn quant(ty: PackedType, t: &[u8], lane: usize, i: usize) -> i32 {
    let (u, r) = (i / 32, i % 32);
    let (t4, byte, high) = ((r % 16) / 4, r % 4, r >= 16);
    let at = 4 * lane + byte;
    let span = if ty == PackedType::Q4K { 256 } else { 384 };
    let v = t[span * u + 64 * t4 + at];
    let low = if high { v >> 4 } else { v & 0xF };
    if ty == PackedType::Q4K {
        return low as i32;
    }
    let hi = (t[384 * u + 256 + 64 * usize::from(high) + at] >> (2 * t4)) & 3;
    (low | hi << 4) as i32
}

/// Scale of sub-block j of column `lane` (Q4_K: and its min).
pub(super) fn scale_min(ty: PackedType, t: &[u8], lane: usize, j: usize) -> (i32, i32) {
    let pair = 32 * (j / 2) + 2 * lane + j % 2;
    match ty {
        PackedType::Q4K => (t[Q4K_SCALES + pair] as i32, t[Q4K_MINS + pair] as i32),
        _ => (t[Q6K_SCALES + pair] as i8 as i32, 0),
    }
}

/// The weight's element i of column `lane` of tile t, as GGUF dequantizes it (ggml:
/// Q4_K `d·sc · q − dmin·m`, Q6_K `d·sc · (q − 32)`).
pub(super) fn dequantize(ty: PackedType, t: &[u8], lane: usize, i: usize) -> f32 {
    let q = quant(ty, t, lane, i);
    match ty {
        PackedType::Q4K => {
            let (sc, m) = scale_min(ty, t, lane, i / 32);
            let (d, dmin) = (f16_at(t, Q4K_D + 2 * lane), f16_at(t, Q4K_DMIN + 2 * lane));
            d * sc as f32 * q as f32 - dmin * m as f32
        }
        _ => {
            let (sc, _) = scale_min(ty, t, lane, i / 16);
            f16_at(t, Q6K_D + 2 * lane) * sc as f32 * (q - 32) as f32
        }
    }
}

/// Σ of the activation quants over sub-block j of the type (32 values for Q4_K, 16 for
/// Q6_K), from the Q8_K sums of 16.
fn sub_sum(ty: PackedType, a: &Q8KBlock, j: usize) -> i32 {
    match ty {
        PackedType::Q4K => a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32,
        _ => a.bsums[j] as i32,
    }
}

/// The scalar kernel: columns [16g, 16g + 16) of activation rows `a` into `out` (row r's
/// 16 outputs at `out[r]`), in the order the module documentation gives.
pub(super) fn group_scalar(
    p: &PackedWeight,
    g: usize,
    a: &[&[Q8KBlock]],
    out: &mut [[f32; LANES]],
) {
    let (ty, tile) = (p.ty, p.ty.tile_bytes());
    let (subs, per) = match ty {
        PackedType::Q4K => (8, 32),
        _ => (16, 16),
    };
    let tiles = p.group(g);
    for (a, out) in a.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; LANES];
        for (b, blk) in a.iter().enumerate() {
            let t = &tiles[b * tile..][..tile];
            for (lane, acc) in acc.iter_mut().enumerate() {
                let (mut sumi, mut summ) = (0i32, 0i32);
                for j in 0..subs {
                    let dot: i32 = (per * j..per * (j + 1))
                        .map(|i| quant(ty, t, lane, i) * blk.qs[i] as i32)
                        .sum();
                    let (sc, m) = scale_min(ty, t, lane, j);
                    sumi += sc * dot;
                    summ += if ty == PackedType::Q4K { m } else { sc } * sub_sum(ty, blk, j);
                }
                *acc = match ty {
                    PackedType::Q4K => {
                        let d = f16_at(t, Q4K_D + 2 * lane);
                        let dmin = f16_at(t, Q4K_DMIN + 2 * lane);
                        let v = d.mul_add(sumi as f32, -(dmin * summ as f32));
                        blk.d.mul_add(v, *acc)
                    }
                    _ => {
                        let d = f16_at(t, Q6K_D + 2 * lane);
                        (d * blk.d).mul_add((sumi - 32 * summ) as f32, *acc)
                    }
                };
            }
        }
        *out = acc;
    }
}
