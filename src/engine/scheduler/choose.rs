//! The token choice of a decode step: each sample's next token and its statistics, from a
//! reduction of the logits rows on their device ([`super::super::reduce`]) or from the
//! whole row on the host (penalties, many top log-probs, or the CPU without
//! `device_reduce`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use parking_lot::Mutex;

use super::{Active, Sample, Scheduler};
use crate::engine::logits::{apply_penalties, top_logprobs};
use crate::engine::reduce::{reduce_rows, Mode, RowParams, CANDIDATES};
use crate::engine::Request;
use crate::engine::Shared;
use crate::error::{Error, Result};
use crate::model::cpu_ops::with_cpu_f32;
use crate::pool::Pool;
use crate::sampling::{sample_with, SamplingParams};
use crate::stats::{token_stats, TokenStats};

/// The token chosen for one sample in a step, with what it tells.
pub(super) struct Choice {
    pub(super) token: u32,
    pub(super) stats: TokenStats,
    /// The request's top log-probs at this position, when it asks for them.
    pub(super) top_logprobs: Option<Vec<(u32, f32)>>,
}

impl Scheduler {
    /// Whether this step's rows are reduced on the model's device (see [`super::reduce`]).
    pub(super) fn reduce_on_device(&self) -> bool {
        let config = &self.shared.config;
        let possible = (1..=CANDIDATES).contains(&config.confidence_top_k);
        possible
            && config
                .device_reduce
                .unwrap_or(!self.shared.model.transformer.device().is_cpu())
    }

    /// Chooses the token of every pick from a reduction of the rows on their device; the
    /// few picks the candidates cannot serve (penalties, a wide nucleus, many top log-probs)
    /// copy their own row to the host.
    pub(super) fn choose_on_device(
        &mut self,
        logits: &candle_core::Tensor,
        picks: &[(usize, usize, usize)],
    ) -> Result<Vec<Choice>> {
        let (rows, vocab) = logits.dims2()?;
        let mut params = Vec::with_capacity(picks.len());
        let mut whole_row = Vec::with_capacity(picks.len());
        for &(_, ai, si) in picks {
            let a = &mut self.active[ai];
            let request = &a.request;
            let s = &mut a.samples[si];
            // Penalties change the row itself; many top log-probs need more than the
            // candidates: both take the host path with the sample's own generator.
            let host = !request.penalties.is_noop() || request.top_logprobs > CANDIDATES;
            whole_row.push(host);
            let mut row = if host {
                RowParams::new(&SamplingParams::default(), vocab, || 0.0)
            } else {
                RowParams::new(&request.sampling, vocab, || s.rng.next_f64())
            };
            // Without statistics, cuts or top log-probs, the candidates are not needed.
            row.candidates = self.shared.config.token_stats
                || row.mode == Mode::Host
                || request.top_logprobs > 0;
            params.push(row);
        }
        let identity = picks.len() == rows && picks.iter().enumerate().all(|(i, p)| p.0 == i);
        let input = if identity {
            logits.clone()
        } else {
            let idx: Vec<u32> = picks.iter().map(|p| p.0 as u32).collect();
            let idx = candle_core::Tensor::from_vec(idx, picks.len(), logits.device())?;
            logits.index_select(&idx, 0)?
        };
        let reduced = reduce_rows(&input, &params, self.shared.config.confidence_top_k)?;
        let mut choices = Vec::with_capacity(picks.len());
        for (i, (&(r, ai, si), red)) in picks.iter().zip(reduced).enumerate() {
            let a = &mut self.active[ai];
            let sampling = &a.request.sampling;
            let picked = if whole_row[i] {
                None
            } else if let Some(token) = red.token {
                Some((token, red.stats))
            } else {
                red.pick(sampling, vocab, params[i].u)
                    .map(|(token, logprob)| {
                        (
                            token,
                            TokenStats {
                                logprob,
                                ..red.stats
                            },
                        )
                    })
            };
            let top = a.request.top_logprobs;
            let choice = match picked {
                Some((token, stats)) => Choice {
                    token,
                    stats: if self.shared.config.token_stats {
                        stats
                    } else {
                        TokenStats::default()
                    },
                    top_logprobs: (top > 0).then(|| {
                        red.top_logprobs(top.min(red.candidates.len()))
                            .unwrap_or_default()
                    }),
                },
                None => {
                    let row: Vec<f32> = logits.get(r)?.to_vec1()?;
                    let u = (!whole_row[i]).then_some(params[i].u);
                    Self::choose_on_host(&self.shared, &a.request, &mut a.samples[si], &row, u)
                }
            };
            choices.push(choice);
        }
        Ok(choices)
    }

    /// Chooses the token of every pick from its whole logits row on the host, the picks
    /// shared out over the CPU pool: at batch 16 the softmax-sized passes over 16 rows of
    /// a 49k vocabulary were several percent of a step, on one thread. Each pick draws
    /// from its own sample's generator, so no result depends on the thread that takes it.
    pub(super) fn choose_all_on_host(
        &mut self,
        logits: &Tensor,
        picks: &[(usize, usize, usize)],
    ) -> Result<Vec<Choice>> {
        let (_, vocab) = logits.dims2()?;
        let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        // Each pick's request and sample (a step picks a sample at most once).
        let at: HashMap<(usize, usize), usize> = picks
            .iter()
            .enumerate()
            .map(|(p, &(_, ai, si))| ((ai, si), p))
            .collect();
        let mut slots: Vec<Option<(&Request, &mut Sample)>> = picks.iter().map(|_| None).collect();
        for (
            ai,
            Active {
                request, samples, ..
            },
        ) in self.active.iter_mut().enumerate()
        {
            for (si, s) in samples.iter_mut().enumerate() {
                if let Some(&p) = at.get(&(ai, si)) {
                    slots[p] = Some((&**request, s));
                }
            }
        }
        let jobs = slots
            .into_iter()
            .map(|slot| {
                slot.map(|(request, sample)| Mutex::new((request, sample, None)))
                    .ok_or_else(|| Error::Internal("a pick names no running sample".into()))
            })
            .collect::<Result<Vec<Mutex<(&Request, &mut Sample, Option<Choice>)>>>>()?;
        let shared = &*self.shared;
        with_cpu_f32(&logits, |flat| {
            Pool::global().run(jobs.len(), |p| {
                let mut job = jobs[p].lock();
                let (request, sample, choice) = &mut *job;
                let row = &flat[picks[p].0 * vocab..][..vocab];
                *choice = Some(Self::choose_on_host(shared, request, sample, row, None));
            });
            Ok(())
        })?
        .ok_or_else(|| Error::Internal("logits did not reach the host".into()))?;
        jobs.into_iter()
            .map(|job| {
                job.into_inner()
                    .2
                    .ok_or_else(|| Error::Internal("a pick was not chosen".into()))
            })
            .collect()
    }

    /// Chooses the next token of one sample from its logits row on the host; `drawn` is the
    /// uniform draw already taken from the sample's generator for this token, if any.
    pub(super) fn choose_on_host(
        shared: &Shared,
        request: &Request,
        s: &mut Sample,
        row: &[f32],
        drawn: Option<f64>,
    ) -> Choice {
        let mut draw = || drawn.unwrap_or_else(|| s.rng.next_f64());
        let token = if request.penalties.is_noop() {
            sample_with(row, &request.sampling, &mut draw)
        } else {
            let adjusted = apply_penalties(row, &request.penalties, &s.counts);
            sample_with(&adjusted, &request.sampling, &mut draw)
        };
        let stats = if shared.config.token_stats {
            token_stats(row, token, shared.config.confidence_top_k)
        } else {
            TokenStats::default()
        };
        Choice {
            token,
            stats,
            top_logprobs: (request.top_logprobs > 0)
                .then(|| top_logprobs(row, request.top_logprobs)),
        }
    }
}
