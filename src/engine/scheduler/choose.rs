//! The token choice of a decode step: each sample's next token and its statistics, from a
//! reduction of the logits rows on their device ([`super::super::reduce`]) or from the
//! whole row on the host (penalties, many top log-probs, or the CPU without
//! `device_reduce`).

use super::{Active, Scheduler};
use crate::engine::logits::{apply_penalties, top_logprobs};
use crate::engine::reduce::{reduce_rows, Mode, RowParams, CANDIDATES};
use crate::engine::Shared;
use crate::error::Result;
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
                    Self::choose_on_host(&self.shared, a, si, &row, u)
                }
            };
            choices.push(choice);
        }
        Ok(choices)
    }

    /// Chooses the next token of one sample from its logits row on the host; `drawn` is the
    /// uniform draw already taken from the sample's generator for this token, if any.
    pub(super) fn choose_on_host(
        shared: &Shared,
        a: &mut Active,
        si: usize,
        row: &[f32],
        drawn: Option<f64>,
    ) -> Choice {
        let request = &a.request;
        let s = &mut a.samples[si];
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
