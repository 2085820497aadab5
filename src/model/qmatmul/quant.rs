//! The block formats: the GGUF weight blocks the kernels read (their sizes and how to
//! decode their fields), and the K-quants' 8-bit activation blocks ([`Q8KBlock`]) that
//! activation rows are quantized to before they meet the weights.

use half::f16;

/// Values per K-quant super-block.
pub(super) const QK_K: usize = 256;

// ---------------------------------------------------------------------------------------
// Weight blocks: bytes per block, and the fields the scalar kernels decode
// ---------------------------------------------------------------------------------------

/// Q4_1 (32 values): d: f16, m: f16, qs: [u8; 16] (value j | value j+16 << 4).
pub(super) const Q4_1_BYTES: usize = 20;
/// Q5_0 (32 values): d: f16, qh: u32 (5th bits), qs: [u8; 16].
pub(super) const Q5_0_BYTES: usize = 22;
/// Q8_0 (32 values): d: f16, qs: [i8; 32].
pub(super) const Q8_0_BYTES: usize = 34;
/// Q4_K (256 values): d: f16, dmin: f16, scales: [u8; 12] (8 scales and 8 mins of 6
/// bits), qs: [u8; 128]: in each 32 bytes, low nibbles are 32 values of sub-block 2c,
/// high nibbles of 2c+1.
pub(super) const Q4K_BYTES: usize = 144;
/// Q6_K (256 values): ql: [u8; 128] low 4 bits, qh: [u8; 64] high 2 bits, scales:
/// [i8; 16], d: f16. Value = (ql | qh << 4) - 32; see `q6k_value` for where each one
/// lives.
pub(super) const Q6K_BYTES: usize = 210;

/// The little-endian f16 at byte `at` of a block, as f32.
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K's 6-bit scale and min of sub-block j (ggml's `get_scale_min_k4`).
pub(super) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Value i (0..256) of a Q6_K block, in -32..32. Each half of 128 values uses 64 bytes of
/// ql and 32 of qh: value 32c + l (c < 4, l < 32) has its low bits in ql[l + 32(c % 2)]
/// (low nibble for c < 2, high for c ≥ 2) and its high bits at bit 2c of qh[l].
pub(super) fn q6k_value(wb: &[u8], i: usize) -> i32 {
    let (half, r) = (i / 128, i % 128);
    let (c, l) = (r / 32, r % 32);
    let ql = wb[64 * half + l + 32 * (c % 2)];
    let qh = wb[128 + 32 * half + l];
    let lo = if c < 2 { ql & 0xF } else { ql >> 4 };
    let hi = (qh >> (2 * c)) & 3;
    (lo | hi << 4) as i32 - 32
}

// ---------------------------------------------------------------------------------------
// Activation blocks and their quantization
// ---------------------------------------------------------------------------------------

/// 256 activations as i8 with scale `d` and the sums of each 16 (ggml's Q8_K).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(super) struct Q8KBlock {
    pub(super) d: f32,
    pub(super) qs: [i8; QK_K],
    pub(super) bsums: [i16; QK_K / 16],
}

impl Q8KBlock {
    pub(super) const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
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
pub(super) fn round_small(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0; // 0x4B40_0000
    (v + MAGIC).to_bits() as i32 - 0x4B40_0000
}

/// 256 values as a [`Q8KBlock`].
pub(super) fn quantize_q8k(x: &[f32]) -> Q8KBlock {
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
