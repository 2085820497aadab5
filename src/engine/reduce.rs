//! The decode step's logits, reduced where they live: for each row the chosen token (greedy,
//! or a draw through the whole softmax), its log-prob, the per-token statistics, the
//! logsumexp and the tempered mass, and the 64 most likely candidates sorted. Only these
//! ~140 numbers per row leave the device, never the vocabulary-wide rows (64 rows of a 152k
//! vocabulary are 39 MB a step). The host finishes what needs a request's own state:
//! top-k / top-p / min-p cuts over the candidates ([`draw_sorted`]), top log-probs; a row
//! the candidates cannot decide (a wide nucleus, penalties) is copied whole, alone.
//!
//! On CUDA the reduction is one kernel launch for the whole batch (`src/kernels/row_reduce.cu`,
//! compiled at run time with NVRTC); elsewhere [`RowReduce::cpu_fwd`] computes the same
//! outputs with the host's own functions, so it is the kernel's reference, and the engine
//! can run this very path on the CPU (the `device_reduce` engine option) in every test.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};
use crate::sampling::{argmax, draw_sorted, has_cut, sample_full, SamplingParams};
use crate::stats::{sum_exp_scaled, token_stats, TokenStats};

/// Candidates kept per row, most likely first.
pub(crate) const CANDIDATES: usize = 64;
/// Numbers before the candidates in an output row.
const HEADER: usize = 10;
/// Numbers per output row.
pub(crate) const OUT_WIDTH: usize = HEADER + 2 * CANDIDATES;
/// Numbers per parameter row: 1/T, the uniform draw, the mode, whether candidates are wanted.
const PARAMS: usize = 4;

/// How a row's token is chosen on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The arg-max (the first index on ties), as [`argmax`].
    Greedy = 0,
    /// A draw through the whole tempered softmax, as `sample_full`.
    Full = 1,
    /// The host picks from the candidates (a cut applies).
    Host = 2,
}

/// What one row asks of the reduction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowParams {
    pub mode: Mode,
    /// 1/T (0 when greedy).
    pub inv_t: f64,
    /// The uniform draw in [0, 1) the row's generator gave for this token (0 when greedy).
    pub u: f64,
    /// Select the candidates (and so the top-k confidence): needed for cuts, top log-probs
    /// and statistics; without them the reduction skips its costliest part.
    pub candidates: bool,
}

impl RowParams {
    /// The parameters of a row sampled under `params` from a `vocab`-wide row; `draw` is
    /// called once when the token is drawn (never for greedy decoding), as [`sample`] does,
    /// so a sample's generator advances the same on either path.
    ///
    /// [`sample`]: crate::sampling::sample
    pub fn new(params: &SamplingParams, vocab: usize, draw: impl FnOnce() -> f64) -> Self {
        if params.temperature == 0.0 || vocab <= 1 {
            return Self {
                mode: Mode::Greedy,
                inv_t: 0.0,
                u: 0.0,
                candidates: true,
            };
        }
        let mode = if has_cut(params) {
            Mode::Host
        } else {
            Mode::Full
        };
        Self {
            mode,
            inv_t: 1.0 / params.temperature as f64,
            u: draw(),
            candidates: true,
        }
    }
}

/// One reduced row, as read back on the host.
#[derive(Debug, Clone)]
pub(crate) struct Reduced {
    /// The token chosen on the device (None: [`Mode::Host`]).
    pub token: Option<u32>,
    /// Statistics of the row; `logprob` is the device-chosen token's.
    pub stats: TokenStats,
    pub max: f32,
    pub lse: f64,
    /// Σ e^((z − max)/T) over the row.
    pub tempered_mass: f64,
    /// (id, logit) of the most likely tokens, by logit (desc), then id (asc).
    pub candidates: Vec<(u32, f32)>,
}

impl Reduced {
    fn parse(row: &[f64]) -> Self {
        let n = (row[8] as usize).min(CANDIDATES);
        let candidates = (0..n)
            .map(|i| (row[HEADER + i] as u32, row[HEADER + CANDIDATES + i] as f32))
            .collect();
        Self {
            token: (row[0] >= 0.0).then_some(row[0] as u32),
            stats: TokenStats {
                logprob: row[1] as f32,
                entropy: row[2] as f32,
                self_certainty: row[3] as f32,
                confidence: row[4] as f32,
            },
            max: row[5] as f32,
            lse: row[6],
            tempered_mass: row[7],
            candidates,
        }
    }

    /// The token a cut draw picks from the candidates, as [`sample`] would from the whole
    /// row, with its log-prob; None when the candidates cannot decide it (the caller then
    /// samples the whole row with the same draw).
    ///
    /// [`sample`]: crate::sampling::sample
    pub fn pick(&self, params: &SamplingParams, vocab: usize, u: f64) -> Option<(u32, f32)> {
        let inv_t = 1.0 / params.temperature as f64;
        let top_k_cut = params.top_k > 0 && params.top_k < vocab;
        let (list, complete, total) = if top_k_cut {
            if params.top_k > self.candidates.len() {
                return None;
            }
            let list = &self.candidates[..params.top_k];
            let total = list
                .iter()
                .map(|&(_, z)| ((z as f64 - self.max as f64) * inv_t).exp())
                .sum();
            (list, true, total)
        } else {
            (
                &self.candidates[..],
                self.candidates.len() == vocab,
                self.tempered_mass,
            )
        };
        let sorted: Vec<f32> = list.iter().map(|&(_, z)| z).collect();
        let at = draw_sorted(&sorted, self.max, inv_t, total, params, complete, u)?;
        let (id, z) = list[at];
        Some((id, (z as f64 - self.lse) as f32))
    }

    /// The `k` most likely tokens with their log-probs, or None past the candidates.
    pub fn top_logprobs(&self, k: usize) -> Option<Vec<(u32, f32)>> {
        (k <= self.candidates.len()).then(|| {
            self.candidates[..k]
                .iter()
                .map(|&(id, z)| (id, (z as f64 - self.lse) as f32))
                .collect()
        })
    }
}

/// Reduces `logits` (rows, V), f32, on their device under one [`RowParams`] per row.
/// `confidence_top_k` must be in 1..=[`CANDIDATES`].
pub(crate) fn reduce_rows(
    logits: &Tensor,
    rows: &[RowParams],
    confidence_top_k: usize,
) -> Result<Vec<Reduced>> {
    let (n, _) = logits.dims2()?;
    if n != rows.len() || !(1..=CANDIDATES).contains(&confidence_top_k) {
        return Err(Error::Internal(format!(
            "row reduction: {n} rows for {} parameters, confidence k {confidence_top_k}",
            rows.len()
        )));
    }
    let params: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.inv_t, r.u, r.mode as u8 as f64, r.candidates as u8 as f64])
        .collect();
    let params = Tensor::from_vec(params, (n, PARAMS), logits.device())?;
    let out = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op2_no_bwd(&params, &RowReduce { confidence_top_k })?;
    let out: Vec<f64> = out.flatten_all()?.to_vec1()?;
    Ok(out.chunks(OUT_WIDTH).map(Reduced::parse).collect())
}

/// The arg-max of each row of `logits` (rows, V) with its statistics, reduced on the
/// logits' device exactly as a decode step reduces them (on CUDA, by the row-reduction
/// kernel): for diagnostics that hold the device path to [`token_stats`] on a copied row.
pub fn greedy_stats_on_device(
    logits: &Tensor,
    confidence_top_k: usize,
) -> Result<Vec<(u32, TokenStats)>> {
    let (rows, vocab) = logits.dims2()?;
    let params = vec![RowParams::new(&SamplingParams::default(), vocab, || 0.0); rows];
    reduce_rows(logits, &params, confidence_top_k)?
        .into_iter()
        .map(|r| {
            r.token
                .map(|t| (t, r.stats))
                .ok_or_else(|| Error::Internal("a greedy row came back without a token".into()))
        })
        .collect()
}

/// The reduction as a candle op: (logits f32 (rows, V), params f64 (rows, 4)) → f64
/// (rows, [`OUT_WIDTH`]).
pub(crate) struct RowReduce {
    pub confidence_top_k: usize,
}

impl RowReduce {
    /// The output row of one logits row: the reference the kernel is held to.
    fn reduce_row(&self, z: &[f32], p: &[f64], out: &mut [f64]) {
        let v = z.len();
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let best = argmax(z);
        let (inv_t, u, mode, candidates) = (p[0], p[1], p[2] as u8, p[3] != 0.0);
        let tempered_mass = if mode == Mode::Greedy as u8 {
            0.0
        } else {
            sum_exp_scaled(z, max, inv_t as f32)
        };
        let token = match mode {
            0 => Some(best),
            1 => Some(sample_full(z, inv_t, u)),
            _ => None,
        };
        let stats = token_stats(z, token.unwrap_or(best), self.confidence_top_k);
        let lse = max as f64 + sum_exp_scaled(z, max, 1.0).ln();
        let want = if candidates { CANDIDATES.min(v) } else { 0 };
        let mut ids: Vec<u32> = (0..v as u32).collect();
        let by = |a: &u32, b: &u32| z[*b as usize].total_cmp(&z[*a as usize]).then(a.cmp(b));
        if want == 0 {
            ids.clear();
        } else if want < v {
            ids.select_nth_unstable_by(want - 1, by);
            ids.truncate(want);
        }
        ids.sort_unstable_by(by);
        out[0] = token.map_or(-1.0, |t| t as f64);
        out[1] = if token.is_some() {
            stats.logprob as f64
        } else {
            0.0
        };
        out[2] = stats.entropy as f64;
        out[3] = stats.self_certainty as f64;
        out[4] = if candidates {
            stats.confidence as f64
        } else {
            0.0
        };
        out[5] = max as f64;
        out[6] = lse;
        out[7] = tempered_mass;
        out[8] = want as f64;
        out[9] = 0.0;
        for i in 0..CANDIDATES {
            let (id, logit) = ids.get(i).map_or((-1.0, f64::NEG_INFINITY), |&id| {
                (id as f64, z[id as usize] as f64)
            });
            out[HEADER + i] = id;
            out[HEADER + CANDIDATES + i] = logit;
        }
    }
}

impl CustomOp2 for RowReduce {
    fn name(&self) -> &'static str {
        "verity-row-reduce"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        params: &CpuStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = logits_layout.shape().dims2()?;
        let (CpuStorage::F32(z), CpuStorage::F64(p)) = (logits, params) else {
            candle_core::bail!("row reduction: logits must be f32 and params f64")
        };
        let (Some((z0, z1)), Some((p0, p1))) = (
            logits_layout.contiguous_offsets(),
            params_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("row reduction: inputs must be contiguous")
        };
        let (z, p) = (&z[z0..z1], &p[p0..p1]);
        let mut out = vec![0f64; rows * OUT_WIDTH];
        for r in 0..rows {
            self.reduce_row(
                &z[r * v..(r + 1) * v],
                &p[r * PARAMS..(r + 1) * PARAMS],
                &mut out[r * OUT_WIDTH..(r + 1) * OUT_WIDTH],
            );
        }
        Ok((CpuStorage::F64(out), Shape::from((rows, OUT_WIDTH))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        params: &candle_core::CudaStorage,
        params_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let (rows, v) = logits_layout.shape().dims2()?;
        if !logits_layout.is_contiguous() || !params_layout.is_contiguous() {
            candle_core::bail!("row reduction: inputs must be contiguous")
        }
        let dev = logits.device();
        let func = crate::kernels::ROW_REDUCE.function(dev, "verity_row_reduce")?;
        let z = logits
            .as_cuda_slice::<f32>()?
            .slice(logits_layout.start_offset()..);
        let p = params
            .as_cuda_slice::<f64>()?
            .slice(params_layout.start_offset()..);
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<f64>(rows * OUT_WIDTH)? };
        let (vocab, stride, k) = (v as i32, v as i32, self.confidence_top_k as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&z);
        b.arg(&vocab);
        b.arg(&stride);
        b.arg(&p);
        b.arg(&k);
        b.arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature in row_reduce.cu.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, OUT_WIDTH)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{sample, sample_with, Rng};
    use candle_core::Device;

    fn rows(n: usize, v: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n * v)
            .map(|i| {
                // A peaked row: three clear favourites over noise, exact ties among the
                // candidates (ids 2, 5, 7) and below them.
                let x = (rng.next_f64() * 8.0 - 4.0) as f32;
                match i % v {
                    0 => 12.0,
                    1 => 11.0,
                    2 | 5 | 7 => 10.0,
                    j if j % 97 == 0 => 1.5,
                    _ => x,
                }
            })
            .collect()
    }

    /// The reduction's outputs against the host's own functions on each row.
    #[test]
    fn reduced_rows_match_host_functions() {
        let (n, v) = (5, 3000);
        let z = rows(n, v, 7);
        let logits = Tensor::from_vec(z.clone(), (n, v), &Device::Cpu).unwrap();
        let greedy = SamplingParams::default();
        let full = SamplingParams {
            temperature: 0.8,
            ..Default::default()
        };
        let cut = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..Default::default()
        };
        let plans = [&greedy, &full, &cut, &full, &greedy];
        let mut rng = Rng::new(3);
        let params: Vec<RowParams> = plans
            .iter()
            .map(|p| RowParams::new(p, v, || rng.next_f64()))
            .collect();
        let out = reduce_rows(&logits, &params, 20).unwrap();
        let mut rng = Rng::new(3);
        for (r, (p, red)) in plans.iter().zip(&out).enumerate() {
            let row = &z[r * v..(r + 1) * v];
            let expect = sample(row, p, &mut rng);
            let token = match red.token {
                Some(t) => t,
                None => red.pick(p, v, params[r].u).expect("a decided cut").0,
            };
            assert_eq!(token, expect, "row {r}");
            let st = token_stats(row, token, 20);
            assert!((red.stats.entropy - st.entropy).abs() < 1e-6);
            assert!((red.stats.confidence - st.confidence).abs() < 1e-6);
            assert!((red.stats.self_certainty - st.self_certainty).abs() < 1e-6);
            // Candidates: the 64 largest, sorted with ties by id, as a full sort gives.
            let mut ids: Vec<u32> = (0..v as u32).collect();
            ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let got: Vec<u32> = red.candidates.iter().map(|c| c.0).collect();
            assert_eq!(got, ids[..CANDIDATES]);
            let top = red.top_logprobs(5).unwrap();
            let host = super::super::logits::top_logprobs(row, 5);
            for (a, b) in top.iter().zip(&host) {
                assert_eq!(a.0, b.0);
                assert!((a.1 - b.1).abs() < 1e-5, "{a:?} {b:?}");
            }
        }
    }

    /// Cut draws from the candidates equal the host sampler's draws over the whole row,
    /// for many draws and every kind of cut; undecided ones are reported, not guessed.
    #[test]
    fn candidate_draws_equal_whole_row_draws() {
        let v = 5000;
        let z = rows(1, v, 11);
        let logits = Tensor::from_vec(z.clone(), (1, v), &Device::Cpu).unwrap();
        let cuts = [
            SamplingParams {
                temperature: 1.0,
                top_k: 20,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.6,
                top_p: 0.95,
                top_k: 40,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.05,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.9,
                top_p: 0.5,
                ..Default::default()
            },
            // Hot and wide: the nucleus passes the 64 candidates, so it must be undecided.
            SamplingParams {
                temperature: 5.0,
                top_p: 0.99,
                ..Default::default()
            },
        ];
        for (c, p) in cuts.iter().enumerate() {
            let mut undecided = 0;
            for draw in 0..200 {
                let u = Rng::new(draw).next_f64();
                let rp = RowParams::new(p, v, || u);
                assert_eq!(rp.mode, Mode::Host);
                let red = &reduce_rows(&logits, &[rp], 20).unwrap()[0];
                let expect = sample_with(&z, p, || u);
                match red.pick(p, v, u) {
                    Some((t, lp)) => {
                        assert_eq!(t, expect, "cut {c}, draw {draw}");
                        let st = token_stats(&z, t, 20);
                        assert!((lp - st.logprob).abs() < 1e-5);
                    }
                    None => undecided += 1,
                }
            }
            if c == cuts.len() - 1 {
                assert_eq!(undecided, 200, "a nucleus wider than the candidates");
            } else {
                assert_eq!(undecided, 0, "cut {c} fits in the candidates");
            }
        }
    }

    #[test]
    fn rows_narrower_than_the_candidates_are_complete() {
        let z = vec![0.5f32, 2.0, -1.0, 2.0];
        let logits = Tensor::from_vec(z.clone(), (1, 4), &Device::Cpu).unwrap();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.999,
            ..Default::default()
        };
        let red = &reduce_rows(&logits, &[RowParams::new(&p, 4, || 0.9)], 20).unwrap()[0];
        let ids: Vec<u32> = red.candidates.iter().map(|c| c.0).collect();
        assert_eq!(ids, [1, 3, 0, 2]);
        assert_eq!(red.pick(&p, 4, 0.9).unwrap().0, sample_with(&z, &p, || 0.9));
        // Confidence over k > V takes all V, as token_stats does.
        assert!((red.stats.confidence - token_stats(&z, 1, 20).confidence).abs() < 1e-6);
    }
    /// The kernel against [`RowReduce::cpu_fwd`] on the same rows (Qwen's vocabulary width,
    /// 64 rows, every mode). Sums differ in order, so statistics agree to 1e-4 and draws
    /// through the whole softmax may differ only where the draw falls within rounding of a
    /// token boundary (none expected in 64 rows).
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
    fn kernel_matches_reference_on_gpu() {
        let (n, v) = (64, 151_936);
        let z = rows(n, v, 5);
        let gpu = crate::DeviceSpec::Cuda(0).resolve().unwrap();
        let params: Vec<RowParams> = (0..n)
            .map(|r| RowParams {
                mode: [Mode::Greedy, Mode::Full, Mode::Host][r % 3],
                inv_t: if r % 3 == 0 { 0.0 } else { 1.25 },
                u: Rng::new(r as u64).next_f64(),
                candidates: r % 5 != 4,
            })
            .collect();
        let cpu = reduce_rows(
            &Tensor::from_vec(z.clone(), (n, v), &Device::Cpu).unwrap(),
            &params,
            20,
        )
        .unwrap();
        let cuda = reduce_rows(&Tensor::from_vec(z, (n, v), &gpu).unwrap(), &params, 20).unwrap();
        for (r, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            assert_eq!(a.token, b.token, "row {r}");
            assert_eq!(a.candidates, b.candidates, "row {r}");
            for (x, y) in [
                (a.stats.logprob, b.stats.logprob),
                (a.stats.entropy, b.stats.entropy),
                (a.stats.self_certainty, b.stats.self_certainty),
                (a.stats.confidence, b.stats.confidence),
            ] {
                assert!((x - y).abs() < 1e-4, "row {r}: {x} vs {y}");
            }
            assert!((a.lse - b.lse).abs() < 1e-4, "row {r}");
            // Greedy rows have no tempered mass (0 on both).
            assert!(
                (a.tempered_mass - b.tempered_mass).abs()
                    <= 1e-5 * a.tempered_mass.abs().max(b.tempered_mass.abs()),
                "row {r}: tempered mass {} vs {}",
                a.tempered_mass,
                b.tempered_mass
            );
        }
    }
}
