//! Choosing the next token from a logits row: greedy, temperature, top-k, top-p, min-p,
//! with a per-sequence seeded generator so a sample's tokens depend only on its own seed.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to pick each next token. The defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 means no top-k cut.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 means no min-p cut.
    pub min_p: f32,
    /// Seed of the sequence's own generator; the same seed and params give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Errors with [`Error::InvalidArgument`] unless temperature ≥ 0 and finite,
    /// top_p ∈ (0, 1] and min_p ∈ [0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::InvalidArgument(format!(
                "min_p must be in [0, 1], got {}",
                self.min_p
            )));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    /// The next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest entry (the first one on ties).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in row.iter().enumerate() {
        if z > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks a token from `row` under `params`, drawing from `rng` only when sampling.
///
/// With a top-k, top-p or min-p cut the result is what sorting every candidate by logit
/// (ties by id), normalizing over all of them, cutting, and drawing from the rest would give;
/// but only the few candidates the cut can keep are sorted (see `nucleus_window`), since
/// a full sort of a 150k-entry vocabulary costs milliseconds per token.
pub fn sample(row: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    sample_with(row, params, || rng.next_f64())
}

/// [`sample`] with the uniform draw given as a function, called once when sampling and
/// never for greedy decoding (the engine draws before a device step and passes the value).
pub fn sample_with(row: &[f32], params: &SamplingParams, draw: impl FnOnce() -> f64) -> u32 {
    if params.temperature == 0.0 || row.len() <= 1 {
        return argmax(row);
    }
    let inv_t = 1.0 / params.temperature as f64;
    if !has_cut(params) {
        return sample_full(row, inv_t, draw());
    }
    let top_k_cut = params.top_k > 0 && params.top_k < row.len();
    // The candidates: the top-k cut first (a linear selection), or the whole row.
    let top_k_ids: Option<Vec<u32>> = top_k_cut.then(|| {
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        ids.select_nth_unstable_by(params.top_k - 1, |&a, &b| by_logit(row, a, b));
        ids.truncate(params.top_k);
        ids
    });
    let candidates = top_k_ids.as_deref();
    let (max, total) = match candidates {
        Some(ids) => {
            let max = ids
                .iter()
                .map(|&i| row[i as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let total = ids
                .iter()
                .map(|&i| ((row[i as usize] as f64 - max as f64) * inv_t).exp())
                .sum();
            (max, total)
        }
        None => {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (max, crate::stats::sum_exp_scaled(row, max, inv_t as f32))
        }
    };
    let mut idx = nucleus_window(row, candidates, max, inv_t, total, params);
    idx.sort_unstable_by(|&a, &b| by_logit(row, a, b).then(a.cmp(&b)));
    let sorted: Vec<f32> = idx.iter().map(|&i| row[i as usize]).collect();
    // The window holds every token the cuts keep, so the draw is always decided.
    let at = draw_sorted(&sorted, max, inv_t, total, params, true, draw()).unwrap_or(0);
    idx[at]
}

/// Whether `params` ask for a cut (top-k, top-p, min-p) before drawing: the draw then walks
/// the candidates in sorted order; without one it walks the whole softmax in vocabulary
/// order. (A top-k at or above the vocabulary cuts nothing but still draws in sorted order.)
pub(crate) fn has_cut(params: &SamplingParams) -> bool {
    params.top_k > 0 || params.top_p < 1.0 || params.min_p > 0.0
}

/// The cuts and the draw over a prefix of the candidates sorted by logit (ties by id):
/// `sorted` holds their logits, `max` the largest logit and `total` Σ e^((z − max)/T) over
/// every candidate the draw normalizes by (the whole row, or the top-k set). Returns the
/// position in `sorted` of the drawn token, or None when the prefix is too short to decide
/// the cuts (some token past it could still be kept); `complete` says that no candidate
/// lies past the prefix. `u` is the uniform draw in [0, 1).
pub(crate) fn draw_sorted(
    sorted: &[f32],
    max: f32,
    inv_t: f64,
    total: f64,
    params: &SamplingParams,
    complete: bool,
    u: f64,
) -> Option<usize> {
    if sorted.is_empty() {
        return None;
    }
    let probs: Vec<f64> = sorted
        .iter()
        .map(|&z| ((z as f64 - max as f64) * inv_t).exp() / total)
        .collect();
    let mut keep = probs.len();
    let mut decided = complete;
    if params.min_p > 0.0 {
        let floor = params.min_p as f64 * probs[0];
        let above = probs.iter().take_while(|&&p| p >= floor).count();
        decided |= above < probs.len();
        keep = keep.min(above.max(1));
    }
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut n = 0;
        for p in probs.iter().take(keep) {
            cum += p;
            n += 1;
            if cum >= params.top_p as f64 {
                decided = true;
                break;
            }
        }
        keep = n.max(1);
    }
    if !decided {
        return None;
    }
    let kept: f64 = probs[..keep].iter().sum();
    let mut u = u * kept;
    for (i, p) in probs[..keep].iter().enumerate() {
        u -= p;
        if u < 0.0 {
            return Some(i);
        }
    }
    Some(keep - 1)
}

/// Larger logit first.
fn by_logit(row: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    row[b as usize].total_cmp(&row[a as usize])
}

/// The candidates whose logit is within a window below `max`, widened until the window
/// surely holds every token the min-p and top-p cuts keep. A window {z ≥ floor} is a prefix
/// of the sorted order (ties enter together), so the cuts computed on it equal the cuts
/// computed on the full sorted list. Usually a few hundred of 150k candidates.
fn nucleus_window(
    row: &[f32],
    candidates: Option<&[u32]>,
    max: f32,
    inv_t: f64,
    total: f64,
    params: &SamplingParams,
) -> Vec<u32> {
    let all = || match candidates {
        Some(ids) => ids.to_vec(),
        None => (0..row.len() as u32).collect(),
    };
    let top_p_cut = params.top_p < 1.0;
    let min_p_cut = params.min_p > 0.0;
    if !top_p_cut && !min_p_cut {
        return all();
    }
    // A window of depth d (in units of z·inv_t) holds every token with p ≥ e^-d · p_max.
    let min_p_depth = if min_p_cut {
        -(params.min_p as f64).ln()
    } else {
        f64::INFINITY
    };
    // The window's mass is summed unsorted, so demand a little more than top_p.
    let top_p_mass = (params.top_p as f64 + 1e-9) * total;
    let mut depth = 1.0;
    while depth <= 64.0 {
        let floor = max as f64 - depth / inv_t;
        let mut window = Vec::new();
        let mut mass = 0.0;
        let mut take = |i: u32| {
            let z = row[i as usize];
            if z as f64 >= floor {
                window.push(i);
                mass += ((z as f64 - max as f64) * inv_t).exp();
            }
        };
        match candidates {
            Some(ids) => ids.iter().for_each(|&i| take(i)),
            None => (0..row.len() as u32).for_each(&mut take),
        }
        if depth > min_p_depth + 1e-6 || (top_p_cut && mass >= top_p_mass) {
            return window;
        }
        depth *= 2.0;
    }
    all()
}

/// Samples from softmax(row / T) over the whole vocabulary for the uniform draw `u`, without
/// sorting: the draw skips whole blocks by their mass and scans only the block it lands in.
pub(crate) fn sample_full(row: &[f32], inv_t: f64, u: f64) -> u32 {
    use crate::stats::{exp_scaled, sum_exp_scaled, BLOCK};
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = inv_t as f32;
    // Block masses are computed exactly as the total sums them, so the walk ends inside.
    let total = sum_exp_scaled(row, max, scale);
    let mut u = u * total;
    for (b, block) in row.chunks(BLOCK).enumerate() {
        let mass = sum_exp_scaled(block, max, scale);
        if u >= mass {
            u -= mass;
            continue;
        }
        let mut last = None;
        for (i, &z) in block.iter().enumerate() {
            let w = exp_scaled(z, max, scale);
            if w > 0.0 {
                last = Some(i);
            }
            u -= w as f64;
            if u < 0.0 {
                return (b * BLOCK + i) as u32;
            }
        }
        // The entries summed one by one fell a rounding short of the block's mass.
        if let Some(i) = last {
            return (b * BLOCK + i) as u32;
        }
    }
    argmax(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward sampler, as it was before the window: sort every candidate by
    /// logit (ties by id), normalize in f64 over all of them, cut, draw.
    fn reference_sample(row: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
        let inv_t = 1.0 / params.temperature as f64;
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        if params.top_k > 0 {
            idx.truncate(params.top_k);
        }
        let max = row[idx[0] as usize] as f64;
        let w: Vec<f64> = idx
            .iter()
            .map(|&i| ((row[i as usize] as f64 - max) * inv_t).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let probs: Vec<f64> = w.iter().map(|x| x / total).collect();
        let mut keep = probs.len();
        if params.min_p > 0.0 {
            let floor = params.min_p as f64 * probs[0];
            keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
        }
        if params.top_p < 1.0 {
            let (mut cum, mut n) = (0.0, 0);
            for p in &probs[..keep] {
                cum += p;
                n += 1;
                if cum >= params.top_p as f64 {
                    break;
                }
            }
            keep = n;
        }
        let kept: f64 = probs[..keep].iter().sum();
        let mut u = rng.next_f64() * kept;
        for (i, p) in probs[..keep].iter().enumerate() {
            u -= p;
            if u < 0.0 {
                return idx[i];
            }
        }
        idx[keep - 1]
    }

    /// Logits spread like a language model's: a few large, a long tail, some exact ties
    /// and a masked (−∞) entry.
    fn logits(v: usize, rng: &mut Rng) -> Vec<f32> {
        let mut row: Vec<f32> = (0..v)
            .map(|_| {
                let u = rng.next_f64();
                (12.0 * u * u * u - 4.0 * rng.next_f64()) as f32
            })
            .collect();
        if v > 4 {
            row[v / 2] = row[v / 3];
            row[v - 1] = f32::NEG_INFINITY;
        }
        row
    }

    #[test]
    fn windowed_cuts_draw_what_sorting_everything_draws() {
        let cases = [
            (0.8, 0, 0.95, 0.0),
            (1.0, 0, 0.5, 0.0),
            (1.5, 0, 0.999, 0.0),
            (0.7, 40, 1.0, 0.0),
            (1.2, 40, 0.9, 0.0),
            (1.0, 0, 1.0, 0.05),
            (0.6, 0, 0.9, 0.1),
            (3.0, 0, 1.0, 1e-30),
            (0.9, 1, 1.0, 0.0),
        ];
        let mut data = Rng::new(7);
        let mut draws = 0;
        for v in [2usize, 7, 300, 5000, 40_000] {
            for &(temperature, top_k, top_p, min_p) in &cases {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: 0,
                };
                for trial in 0..6 {
                    let row = logits(v, &mut data);
                    let (mut a, mut b) = (Rng::new(trial), Rng::new(trial));
                    for _ in 0..5 {
                        assert_eq!(
                            sample(&row, &params, &mut a),
                            reference_sample(&row, &params, &mut b),
                            "vocabulary {v}, {params:?}"
                        );
                        draws += 1;
                    }
                }
            }
        }
        assert_eq!(draws, 5 * 9 * 6 * 5);
    }

    #[test]
    fn full_softmax_draws_follow_the_softmax() {
        // 600 entries span three 256-entry blocks of the block-skipping walk.
        let mut data = Rng::new(3);
        let mut row: Vec<f32> = (0..600).map(|_| (data.next_f64() * 6.0) as f32).collect();
        row[5] = f32::NEG_INFINITY;
        let temperature = 0.7;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = row
            .iter()
            .map(|&z| ((z as f64 - max) / temperature).exp())
            .collect();
        let total: f64 = w.iter().sum();
        let params = SamplingParams {
            temperature: temperature as f32,
            ..Default::default()
        };
        let n = 400_000;
        let mut counts = vec![0usize; row.len()];
        let mut rng = Rng::new(11);
        for _ in 0..n {
            counts[sample(&row, &params, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[5], 0, "a masked token is never drawn");
        for (i, &c) in counts.iter().enumerate() {
            let p = w[i] / total;
            let sigma = (p * (1.0 - p) / n as f64).sqrt();
            let freq = c as f64 / n as f64;
            assert!(
                (freq - p).abs() <= 5.0 * sigma + 1e-6,
                "token {i}: frequency {freq}, probability {p}"
            );
        }
    }

    /// `cargo test --release --lib sampling::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn timing() {
        let mut data = Rng::new(5);
        let row = logits(151_936, &mut data);
        let nucleus = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            ..Default::default()
        };
        let full = SamplingParams {
            temperature: 0.8,
            ..Default::default()
        };
        let time = |name: &str, f: &dyn Fn(&mut Rng) -> u32| {
            let mut rng = Rng::new(1);
            let start = std::time::Instant::now();
            let reps = 200;
            for _ in 0..reps {
                std::hint::black_box(f(&mut rng));
            }
            println!(
                "{name}: {:.1} µs per row",
                start.elapsed().as_secs_f64() * 1e6 / reps as f64
            );
        };
        time("top-p 0.95, sort everything (reference)", &|r| {
            reference_sample(&row, &nucleus, r)
        });
        time("top-p 0.95, window", &|r| sample(&row, &nucleus, r));
        time("full softmax", &|r| sample(&row, &full, r));
        time("argmax", &|_| argmax(&row));
    }
}
