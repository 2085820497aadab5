//! The portable scalar kernels of the K-quants: one weight row (its blocks) dotted with one quantized
//! activation row, block by block, in plain Rust. They are the reference the x86 kernels
//! are tested against, and the path on CPUs without AVX2, FMA and F16C and on other
//! architectures.
//!
//! In the sums below, per block, q are the weight's values, y the activation's quants,
//! d_y their scale and s_y = d_y · Σ y.

use super::quant::{f16_at, q4k_scale_min, q6k_value, Q8KBlock, Q4K_BYTES, Q6K_BYTES};

/// Q4_K: d · d_y · Σ scale · (q·y) − dmin · d_y · Σ min · (Σ y), over the 8 sub-blocks.
pub(super) fn q4k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q4K_BYTES).zip(a) {
        let (d, dmin) = (f16_at(wb, 0), f16_at(wb, 2));
        let scales = &wb[4..16];
        let qs = &wb[16..];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for sub in 0..8 {
            let (sc, mn) = q4k_scale_min(sub, scales);
            let bytes = &qs[32 * (sub / 2)..32 * (sub / 2) + 32];
            let shift = 4 * (sub % 2);
            let dot: i32 = bytes
                .iter()
                .zip(&ab.qs[32 * sub..32 * sub + 32])
                .map(|(&q, &v)| ((q >> shift) & 0xF) as i32 * v as i32)
                .sum();
            sumi += sc as i32 * dot;
            summ += mn as i32 * (ab.bsums[2 * sub] as i32 + ab.bsums[2 * sub + 1] as i32);
        }
        sum += d * ab.d * sumi as f32 - dmin * ab.d * summ as f32;
    }
    sum
}

/// Q6_K: d · d_y · Σ scale · (q·y), over the 16 sub-blocks of 16 values.
pub(super) fn q6k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(Q6K_BYTES).zip(a) {
        let d = f16_at(wb, 208);
        let mut sumi = 0i32;
        for sub in 0..16 {
            let dot: i32 = (16 * sub..16 * sub + 16)
                .map(|i| q6k_value(wb, i) * ab.qs[i] as i32)
                .sum();
            sumi += wb[192 + sub] as i8 as i32 * dot;
        }
        sum += d * ab.d * sumi as f32;
    }
    sum
}
