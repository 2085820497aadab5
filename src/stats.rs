//! Per-token statistics from one raw logits row: the chosen token's log-probability,
//! entropy, self-certainty and DeepConf's top-k confidence. This is the one place these
//! formulas live (DESIGN.md, "Formulas"); everything else calls [`token_stats`].
//!
//! With p = softmax(z) over V entries, m = max(z), d = z − m and S = Σ e^d:
//! - log-prob  = `z[t] − logsumexp(z) = d[t] − ln S`
//! - entropy   = `−Σ p ln p = ln S − Σ e^d d / S`
//! - self-certainty = `KL(U ‖ p) = logsumexp(z) − mean(z) − ln V`
//! - confidence = `−(1/k) Σ_{top-k} ln p = logsumexp(z) − mean of the k largest z`
//!
//! The row is read twice, with no allocation for k ≤ 64: once for Σ z and the
//! k largest logits (whose largest is m), once for S and Σ e^d d. Both passes run in
//! `LANES` (16) f32 lanes that the compiler vectorizes, and flush to f64 every `BLOCK` (256)
//! entries, so the f32 rounding stays near 1e-7 relative while the totals are f64.

use serde::{Deserialize, Serialize};

/// DeepConf's default k.
pub const DEFAULT_TOP_K: usize = 20;

/// The largest k kept on the stack; a larger k allocates once per call.
const STACK_TOP_K: usize = 64;

/// f32 lanes per step: one AVX-512 register, two AVX2 ones. The loops are written over
/// `[f32; LANES]` arrays for the auto-vectorizer; `timing` below measures the result (with
/// 8 lanes the exp loop stayed scalar, 7× slower).
const LANES: usize = 16;
/// Entries summed in f32 before the lane sums go to the f64 totals.
pub(crate) const BLOCK: usize = 16 * LANES;
/// e^d for d below this is taken as 0: e^-80 ≈ 1.8e-35 is far below the rounding of S ≥ 1,
/// and the floor keeps every result a normal f32 (subnormals are slow on x86).
const EXP_FLOOR: f32 = -80.0;

/// What one generated token tells about the model's certainty; all in nats, from the raw
/// logits (see the module docs for the formulas).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenStats {
    /// ln p of the chosen token (≤ 0).
    pub logprob: f32,
    /// Entropy −Σ p ln p of the distribution, in [0, ln V].
    pub entropy: f32,
    /// Self-certainty KL(U ‖ p), in [0, ∞): 0 for a uniform distribution.
    pub self_certainty: f32,
    /// DeepConf token confidence over the top `k` log-probs.
    pub confidence: f32,
}

/// Statistics of `row` (raw logits, before temperature or truncation) for the chosen token.
pub fn token_stats(row: &[f32], chosen: u32, top_k: usize) -> TokenStats {
    let v = row.len();
    if v == 0 {
        return TokenStats::default();
    }
    let k = top_k.clamp(1, v);
    let mut stack = [f32::NEG_INFINITY; STACK_TOP_K];
    let mut heap = Vec::new();
    let top: &mut [f32] = if k <= STACK_TOP_K {
        &mut stack[..k]
    } else {
        heap.resize(k, f32::NEG_INFINITY);
        &mut heap
    };
    let sum_z = sum_and_top(row, top);
    let max = top[k - 1];
    let (sum_exp, sum_exp_d) = sum_exp(row, max);
    let ln_s = sum_exp.ln();
    let lse = max as f64 + ln_s;
    let chosen_d = row
        .get(chosen as usize)
        .map_or(f64::NEG_INFINITY, |&z| (z - max) as f64);
    let top_d: f64 = top.iter().map(|&z| (z - max) as f64).sum();
    TokenStats {
        logprob: (chosen_d - ln_s) as f32,
        entropy: (ln_s - sum_exp_d / sum_exp) as f32,
        self_certainty: (lse - sum_z / v as f64 - (v as f64).ln()) as f32,
        confidence: (ln_s - top_d / k as f64) as f32,
    }
}

/// Σ z in f64, and the `top.len()` largest entries of `row` into `top`, sorted ascending
/// (`top` starts all −∞; NaN and −∞ entries never enter it). A chunk is only searched
/// when one of its entries beats the smallest kept value, which after the first few chunks
/// is rare.
fn sum_and_top(row: &[f32], top: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for block in row.chunks(BLOCK) {
        let (chunks, rest) = block.as_chunks::<LANES>();
        let mut acc = [0f32; LANES];
        for chunk in chunks {
            for (a, &z) in acc.iter_mut().zip(chunk) {
                *a += z;
            }
        }
        for chunk in chunks {
            let floor = top[0];
            if chunk.iter().fold(false, |beats, &z| beats | (z > floor)) {
                for &z in chunk {
                    offer(top, z);
                }
            }
        }
        for &z in rest {
            acc[0] += z;
            offer(top, z);
        }
        total += acc.iter().sum::<f32>() as f64;
    }
    total
}

/// Keeps `z` among the largest values in `top` (sorted ascending, full length).
#[inline]
fn offer(top: &mut [f32], z: f32) {
    if z > top[0] {
        let at = top[1..].partition_point(|&x| x < z);
        top.copy_within(1..=at, 0);
        top[at] = z;
    }
}

/// (Σ e^d, Σ e^d d) over d = z − max in f64, each term computed in f32.
fn sum_exp(row: &[f32], max: f32) -> (f64, f64) {
    let (mut s, mut sd) = (0f64, 0f64);
    for block in row.chunks(BLOCK) {
        let (chunks, rest) = block.as_chunks::<LANES>();
        let mut acc = [0f32; LANES];
        let mut acc_d = [0f32; LANES];
        for chunk in chunks {
            for ((a, ad), &z) in acc.iter_mut().zip(&mut acc_d).zip(chunk) {
                let (e, ed) = exp_term(z - max);
                *a += e;
                *ad += ed;
            }
        }
        for &z in rest {
            let (e, ed) = exp_term(z - max);
            acc[0] += e;
            acc_d[0] += ed;
        }
        s += acc.iter().sum::<f32>() as f64;
        sd += acc_d.iter().sum::<f32>() as f64;
    }
    (s, sd)
}

/// Σ e^{(z − max)·scale} over `row` in f64, each term computed in f32: the softmax
/// normalizer at temperature 1/`scale`, for the sampler. `max` is the row's largest entry
/// and `scale` > 0, so every exponent is ≤ 0.
pub(crate) fn sum_exp_scaled(row: &[f32], max: f32, scale: f32) -> f64 {
    let mut s = 0f64;
    for block in row.chunks(BLOCK) {
        let (chunks, rest) = block.as_chunks::<LANES>();
        let mut acc = [0f32; LANES];
        for chunk in chunks {
            for (a, &z) in acc.iter_mut().zip(chunk) {
                *a += exp_scaled(z, max, scale);
            }
        }
        for &z in rest {
            acc[0] += exp_scaled(z, max, scale);
        }
        s += acc.iter().sum::<f32>() as f64;
    }
    s
}

/// e^{(z − max)·scale} in f32, the very term [`sum_exp_scaled`] adds up.
#[inline(always)]
pub(crate) fn exp_scaled(z: f32, max: f32, scale: f32) -> f32 {
    exp_term((z - max) * scale).0
}

/// (e^d, e^d d) for d ≤ 0; both 0 below [`EXP_FLOOR`], −∞ included.
#[inline(always)]
fn exp_term(d: f32) -> (f32, f32) {
    let x = d.max(EXP_FLOOR);
    let e = exp_nonpositive(x);
    let e = if d < EXP_FLOOR { 0.0 } else { e };
    (e, e * x)
}

/// e^x for x in [−80, 0], within about 2 ulp (Cephes expf: x = n ln2 + r, |r| ≤ ln2/2,
/// a degree-7 polynomial for e^r, 2^n through the exponent bits). Branch-free, so a loop
/// over it vectorizes.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = mul_add(n, 2.121_944_4e-4, mul_add(n, -0.693_359_4, x));
    let p = 1.987_569_1e-4;
    let p = mul_add(p, r, 1.398_199_9e-3);
    let p = mul_add(p, r, 8.333_345e-3);
    let p = mul_add(p, r, 4.166_579_6e-2);
    let p = mul_add(p, r, 1.666_666_5e-1);
    let p = mul_add(p, r, 0.5);
    let er = mul_add(p, r * r, r + 1.0);
    er * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// a·b + c, fused where the target has FMA (`f32::mul_add` is a libm call without it).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formulas in f64 straight from their definitions, with a full sort for top-k.
    fn reference(row: &[f32], chosen: usize, k: usize) -> [f64; 4] {
        let z: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let logp: Vec<f64> = z.iter().map(|x| x - lse).collect();
        let entropy = -logp
            .iter()
            .map(|&l| if l.exp() > 0.0 { l.exp() * l } else { 0.0 })
            .sum::<f64>();
        let v = z.len() as f64;
        let sc = lse - z.iter().sum::<f64>() / v - v.ln();
        let mut sorted = logp.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let conf = -sorted[..k].iter().sum::<f64>() / k as f64;
        [logp[chosen], entropy, sc, conf]
    }

    fn check(row: &[f32], chosen: usize, k: usize, tol: f64) {
        let st = token_stats(row, chosen as u32, k);
        let ours = [st.logprob, st.entropy, st.self_certainty, st.confidence].map(|x| x as f64);
        let r = reference(row, chosen, k.clamp(1, row.len()));
        for (o, t) in ours.iter().zip(r) {
            assert!(
                (o - t).abs() < tol * t.abs().max(1.0),
                "v {} k {k}: {ours:?} vs {r:?}",
                row.len()
            );
        }
    }

    /// A deterministic pseudo-random row: a few large logits over a noisy floor.
    fn row(v: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..v)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                let spike = if i % 997 == 3 { 12.0 } else { 0.0 };
                scale * (u - 0.5) + spike
            })
            .collect()
    }

    #[test]
    fn match_an_f64_reference_on_many_shapes() {
        for &v in &[1usize, 2, 15, 16, 17, 255, 256, 257, 1000, 49_152, 151_936] {
            for (seed, scale) in [(1u64, 1.0f32), (2, 10.0), (3, 40.0)] {
                let r = row(v, seed, scale);
                for k in [1, 5, 20, 100] {
                    check(&r, v / 2, k, 2e-6);
                }
            }
        }
    }

    #[test]
    fn sorted_and_reversed_rows_keep_the_right_top_k() {
        let up: Vec<f32> = (0..5000).map(|i| i as f32 * 0.01).collect();
        let down: Vec<f32> = up.iter().rev().copied().collect();
        check(&up, 7, 20, 2e-6);
        check(&down, 7, 20, 2e-6);
    }

    #[test]
    fn masked_logits_count_as_zero_probability() {
        let mut r = row(3000, 9, 8.0);
        let finite = token_stats(&r, 5, 20);
        r.push(f32::NEG_INFINITY);
        let st = token_stats(&r, 5, 20);
        assert!((st.entropy - finite.entropy).abs() < 1e-5);
        assert!((st.logprob - finite.logprob).abs() < 1e-5);
        assert!((st.confidence - finite.confidence).abs() < 1e-5);
        assert_eq!(token_stats(&r, 3000, 20).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn exp_is_close_to_std_over_its_range() {
        let mut worst = 0f64;
        for i in 0..=800_000 {
            let x = -(i as f32) * 1e-4;
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
    }

    /// `cargo test --release --lib stats::tests::timing -- --ignored --nocapture`
    /// (about 30 µs a row at V = 49152 on this machine's 2 cores, 250 µs before).
    #[test]
    #[ignore]
    fn timing() {
        for v in [49_152usize, 151_936] {
            let r = row(v, 5, 20.0);
            let n = 2000;
            let t = std::time::Instant::now();
            let mut acc = 0f32;
            for i in 0..n {
                acc += token_stats(std::hint::black_box(&r), i as u32, 20).entropy;
            }
            eprintln!(
                "v {v}: {:.1} us per row ({acc})",
                t.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
    }
}
