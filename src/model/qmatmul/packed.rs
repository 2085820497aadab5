//! Weights of the 32-value types (Q4_1, Q5_0, Q8_0) repacked at load for a GEMM
//! microkernel, after llama.cpp's Q4_0x8 / Q8_0x4 repacking: 16 output columns side by
//! side, so that one 512-bit `vpdpbusd` multiplies 4 values of one activation row into 16
//! columns at once, and one weight load serves every activation row of a tile.
//!
//! A weight of n rows (output columns) and k inputs becomes ⌈n/16⌉ column groups of k/32
//! tiles, group-major. A tile holds one 32-value block of 16 columns (missing columns are
//! zeros):
//!
//! - the values as unsigned bytes u = q + c, c = 0 (Q4_1), 16 (Q5_0), 128 (Q8_0), in
//!   quads: quad t (values 4t..4t+4) of column j is the 4 bytes at lane j of a 64-byte
//!   vector. Q8_0 stores quad t's vector at 64t. The 4-bit types store quads t and t + 4
//!   as the low and high nibbles of the vector at 64t (t < 4), and Q5_0 adds, per quad, a
//!   64-bit mask of the fifth bits (bit 4j + i for value i of column j's quad);
//! - the scales d as 16 f16, then (Q4_1) the mins as 16 f16.
//!
//! The bytes per value are those of the GGUF blocks, so batch-1 decode, which streams the
//! weights, reads no more than before.
//!
//! Activations are quantized per 32 values to [`Q8Block`]. Per block and output, with a
//! the activation's quants, d_a its scale and Σa their sum:
//!
//!   y += (d · d_a) · (Σ u·a − c·Σa) [+ m · (d_a · Σa) for Q4_1],
//!
//! the integer part exact, the f32 part one multiply and one or two fused multiply-adds in
//! this order, in every kernel (scalar, AVX2, AVX-VNNI, AVX-512). So every level gives the
//! same bits, and an output never depends on which rows share its tile or how columns
//! are split among threads.

use candle_core::quantized::{GgmlDType, QTensor};

use super::packed_k;
use super::quant::{
    f16_at, round_small, Q4K_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q6K_BYTES, Q8_0_BYTES, QK_K,
};
use crate::error::{Error, Result};

/// Output columns per group: the lanes of a 512-bit vector of i32.
pub(super) const LANES: usize = 16;
/// Values per block.
pub(super) const BLOCK: usize = 32;

/// The repacked weight types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PackedType {
    Q4_1,
    Q5_0,
    Q8_0,
    /// The K-quants, laid out by `packed_k`.
    Q4K,
    Q6K,
}

impl PackedType {
    pub(super) fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    pub(super) fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Whether this is a K-quant (256-value blocks, Q8_K activations).
    pub(super) const fn is_k(self) -> bool {
        matches!(self, Self::Q4K | Self::Q6K)
    }

    /// Values per block.
    pub(super) const fn block_values(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            BLOCK
        }
    }

    /// Bytes of one GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q5_0 => Q5_0_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
            Self::Q4K => Q4K_BYTES,
            Self::Q6K => Q6K_BYTES,
        }
    }

    /// Bytes of one tile (16 columns × one block).
    pub(super) const fn tile_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 256 + 64,
            Self::Q5_0 => 256 + 64 + 32,
            Self::Q8_0 => 512 + 32,
            Self::Q4K => packed_k::Q4K_TILE,
            Self::Q6K => packed_k::Q6K_TILE,
        }
    }

    /// Where the 16 f16 scales start in a tile (the mins of Q4_1 follow them).
    pub(super) const fn scales_at(self) -> usize {
        match self {
            Self::Q4_1 => 256,
            Self::Q5_0 => 320,
            Self::Q8_0 => 512,
            Self::Q4K | Self::Q6K => panic!("K-quant tiles are laid out by packed_k"),
        }
    }

    /// The offset c added to the values to make them unsigned.
    pub(super) const fn offset(self) -> i32 {
        match self {
            Self::Q4_1 => 0,
            Self::Q5_0 => 16,
            Self::Q8_0 => 128,
            Self::Q4K | Self::Q6K => panic!("K-quant tiles are laid out by packed_k"),
        }
    }

    /// The 32 unsigned values u = q + c of a GGUF block, its scale and its min (0 but for
    /// Q4_1).
    fn decode(self, b: &[u8]) -> ([u8; BLOCK], f32, f32) {
        let mut u = [0u8; BLOCK];
        match self {
            Self::Q4_1 => {
                for j in 0..16 {
                    u[j] = b[4 + j] & 0xF;
                    u[j + 16] = b[4 + j] >> 4;
                }
                (u, f16_at(b, 0), f16_at(b, 2))
            }
            Self::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for j in 0..16 {
                    u[j] = (b[6 + j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
                    u[j + 16] = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
                }
                (u, f16_at(b, 0), 0.0)
            }
            Self::Q8_0 => {
                for (u, &q) in u.iter_mut().zip(&b[2..]) {
                    *u = (q as i8 as i32 + 128) as u8;
                }
                (u, f16_at(b, 0), 0.0)
            }
            Self::Q4K | Self::Q6K => unreachable!("K-quant blocks: packed_k"),
        }
    }
}

/// A weight repacked into tiles (see the module documentation).
pub(crate) struct PackedWeight {
    pub(super) ty: PackedType,
    /// Output columns (weight rows) and inputs.
    pub(super) n: usize,
    pub(super) k: usize,
    /// The tiles, group-major, 64-byte aligned.
    data: Vec<Align64>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({:?}, {}×{})", self.ty, self.n, self.k)
    }
}

impl PackedWeight {
    /// Repacks a 2-D weight of a 32-value type; None for other types and shapes.
    pub(crate) fn new(w: &QTensor) -> Result<Option<Self>> {
        let Some(ty) = PackedType::of(w.dtype()) else {
            return Ok(None);
        };
        let Ok((n, k)) = w.shape().dims2() else {
            return Ok(None);
        };
        if k == 0 || !k.is_multiple_of(ty.block_values()) {
            return Ok(None);
        }
        let data = w.data()?;
        Self::from_blocks(ty, &data, n, k).map(Some)
    }

    /// Repacks n rows of k values in GGUF blocks of type `ty`.
    pub(super) fn from_blocks(ty: PackedType, blocks: &[u8], n: usize, k: usize) -> Result<Self> {
        let nb = k / ty.block_values();
        let row_bytes = nb * ty.block_bytes();
        if !k.is_multiple_of(ty.block_values()) || blocks.len() != n * row_bytes {
            return Err(Error::InvalidArgument(format!(
                "qmatmul: {} bytes of {ty:?} blocks for {n} rows of {k} values",
                blocks.len()
            )));
        }
        let groups = n.div_ceil(LANES);
        let tile = ty.tile_bytes();
        let mut data = vec![Align64([0; 64]); (groups * nb * tile).div_ceil(64)];
        // SAFETY: Align64 is plain bytes; the slice covers exactly the vector's memory.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), data.len() * 64)
        };
        for j in 0..n {
            let (g, lane) = (j / LANES, j % LANES);
            for b in 0..nb {
                let src = &blocks[j * row_bytes + b * ty.block_bytes()..][..ty.block_bytes()];
                let t = &mut bytes[(g * nb + b) * tile..][..tile];
                if ty.is_k() {
                    packed_k::write_lane(ty, t, lane, src);
                    continue;
                }
                let (u, d, m) = ty.decode(src);
                write_lane(ty, t, lane, &u, d, m);
            }
        }
        // Missing columns of the last group hold zero scales, and for Q8_0 the value
        // bytes of a zero (128), so that they are exact zeros like the rest.
        if ty == PackedType::Q8_0 {
            for j in n..groups * LANES {
                let (g, lane) = (j / LANES, j % LANES);
                for b in 0..nb {
                    let t = &mut bytes[(g * nb + b) * tile..][..tile];
                    write_lane(ty, t, lane, &[128; BLOCK], 0.0, 0.0);
                }
            }
        }
        Ok(Self { ty, n, k, data })
    }

    /// Blocks per column.
    pub(super) fn blocks(&self) -> usize {
        self.k / self.ty.block_values()
    }

    /// Column groups.
    pub(super) fn groups(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    /// The tiles of column group g, one per block.
    pub(super) fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks() * self.ty.tile_bytes();
        &self.bytes()[g * len..(g + 1) * len]
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in `from_blocks`.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * 64) }
    }

    /// Bytes of the tiles (what one product reads).
    pub(crate) fn size_in_bytes(&self) -> usize {
        self.groups() * self.blocks() * self.ty.tile_bytes()
    }

    pub(crate) fn dtype(&self) -> GgmlDType {
        self.ty.dtype()
    }

    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight as n × k f32 values, row-major: d · q (+ m), exactly as GGUF
    /// dequantizes it.
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        let tile = self.ty.tile_bytes();
        if self.ty.is_k() {
            for (j, row) in out.chunks_exact_mut(self.k).enumerate() {
                let (g, lane) = (j / LANES, j % LANES);
                for (b, vals) in row.chunks_exact_mut(QK_K).enumerate() {
                    let t = &self.group(g)[b * tile..][..tile];
                    for (i, v) in vals.iter_mut().enumerate() {
                        *v = packed_k::dequantize(self.ty, t, lane, i);
                    }
                }
            }
            return out;
        }
        let c = self.ty.offset();
        for (j, row) in out.chunks_exact_mut(self.k).enumerate() {
            let (g, lane) = (j / LANES, j % LANES);
            let tiles = self.group(g);
            for (b, vals) in row.chunks_exact_mut(BLOCK).enumerate() {
                let t = &tiles[b * tile..][..tile];
                let (d, m) = scale_min(self.ty, t, lane);
                for (i, v) in vals.iter_mut().enumerate() {
                    let q = (value(self.ty, t, lane, i) as i32 - c) as f32;
                    // (No "+ 0.0" for the types without a min: d · 0 keeps its sign.)
                    *v = if self.ty == PackedType::Q4_1 {
                        d * q + m
                    } else {
                        d * q
                    };
                }
            }
        }
        out
    }
}

/// Writes column `lane`'s values u, scale d and min m into tile t.
fn write_lane(ty: PackedType, t: &mut [u8], lane: usize, u: &[u8; BLOCK], d: f32, m: f32) {
    for (i, &u) in u.iter().enumerate() {
        let (quad, byte) = (i / 4, i % 4);
        let at = 4 * lane + byte;
        match ty {
            PackedType::Q8_0 => t[64 * quad + at] = u,
            PackedType::Q4_1 | PackedType::Q5_0 => {
                let v = &mut t[64 * (quad % 4) + at];
                *v |= if quad < 4 { u & 0xF } else { (u & 0xF) << 4 };
                if ty == PackedType::Q5_0 && u & 0x10 != 0 {
                    t[256 + 8 * quad + at / 8] |= 1 << (at % 8);
                }
            }
            PackedType::Q4K | PackedType::Q6K => unreachable!("K-quants: packed_k"),
        }
    }
    let s = ty.scales_at();
    let put = |t: &mut [u8], at: usize, v: f32| {
        t[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    };
    put(t, s + 2 * lane, d);
    if ty == PackedType::Q4_1 {
        put(t, s + 32 + 2 * lane, m);
    }
}

/// Value i (0..32, unsigned: q + c) of column `lane` in tile t.
pub(super) fn value(ty: PackedType, t: &[u8], lane: usize, i: usize) -> u8 {
    let (quad, byte) = (i / 4, i % 4);
    let at = 4 * lane + byte;
    match ty {
        PackedType::Q8_0 => t[64 * quad + at],
        PackedType::Q4_1 | PackedType::Q5_0 => {
            let v = t[64 * (quad % 4) + at];
            let low = if quad < 4 { v & 0xF } else { v >> 4 };
            let fifth = ty == PackedType::Q5_0 && t[256 + 8 * quad + at / 8] >> (at % 8) & 1 == 1;
            low | if fifth { 0x10 } else { 0 }
        }
        PackedType::Q4K | PackedType::Q6K => unreachable!("K-quants: packed_k"),
    }
}

/// Column `lane`'s scale and min (0 but for Q4_1) in tile t.
pub(super) fn scale_min(ty: PackedType, t: &[u8], lane: usize) -> (f32, f32) {
    let s = ty.scales_at();
    let m = if ty == PackedType::Q4_1 {
        f16_at(t, s + 32 + 2 * lane)
    } else {
        0.0
    };
    (f16_at(t, s + 2 * lane), m)
}

// ---------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------

/// 32 activations as i8 with scale `d`, their sum and `s = d · Σ qs` (ggml's Q8_1 with
/// f32 scales).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
pub(super) struct Q8Block {
    pub(super) qs: [i8; BLOCK],
    pub(super) d: f32,
    pub(super) s: f32,
    pub(super) sum: i32,
}

impl Q8Block {
    pub(super) const ZERO: Self = Self {
        qs: [0; BLOCK],
        d: 0.0,
        s: 0.0,
        sum: 0,
    };
}

/// A row of activations (a multiple of 32 values on the SIMD levels) as blocks: the
/// x86 levels give [`quantize_block`]'s bits (the same max, division, products and
/// ties-to-even rounding).
pub(super) fn quantize_row(isa: super::Isa, x: &[f32], out: &mut [Q8Block]) {
    #[cfg(target_arch = "x86_64")]
    if let super::Isa::X86(simd) = isa {
        if x.len() == out.len() * BLOCK {
            return super::packed_x86::quantize_row(simd, x, out);
        }
    }
    let _ = isa;
    for (o, x) in out.iter_mut().zip(x.chunks(BLOCK)) {
        *o = quantize_block(x);
    }
}

/// Up to 32 values as a [`Q8Block`]; missing values are zeros.
pub(super) fn quantize_block(x: &[f32]) -> Q8Block {
    let mut v = [0f32; BLOCK];
    v[..x.len()].copy_from_slice(x);
    // Fixed-size loops, which the compiler vectorizes.
    let mut m = [0f32; 8];
    for c in v.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let d = m.iter().fold(0f32, |a, &v| a.max(v)) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i32; BLOCK];
    for (q, v) in q.iter_mut().zip(&v) {
        // |v · id| ≤ 127 up to rounding, so i32 → i8 keeps the value.
        *q = round_small(v * id);
    }
    let sum: i32 = q.iter().sum();
    Q8Block {
        qs: q.map(|q| q as i8),
        d,
        s: d * sum as f32,
        sum,
    }
}

// ---------------------------------------------------------------------------------------
// The scalar kernel: the reference, and the path on CPUs without the SIMD levels
// ---------------------------------------------------------------------------------------

/// Columns [16g, 16g + 16) of activation rows `a` (each `blocks()` blocks) into `out`
/// (row r's 16 outputs at `out[r]`).
pub(super) fn group_scalar(p: &PackedWeight, g: usize, a: &[&[Q8Block]], out: &mut [[f32; LANES]]) {
    let (ty, tile) = (p.ty, p.ty.tile_bytes());
    let tiles = p.group(g);
    for (a, out) in a.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; LANES];
        for (b, blk) in a.iter().enumerate() {
            let t = &tiles[b * tile..][..tile];
            for (lane, acc) in acc.iter_mut().enumerate() {
                let mut dot = -ty.offset() * blk.sum;
                for (i, &q) in blk.qs.iter().enumerate() {
                    dot += value(ty, t, lane, i) as i32 * q as i32;
                }
                let (d, m) = scale_min(ty, t, lane);
                *acc = (d * blk.d).mul_add(dot as f32, *acc);
                if ty == PackedType::Q4_1 {
                    *acc = m.mul_add(blk.s, *acc);
                }
            }
        }
        *out = acc;
    }
}
