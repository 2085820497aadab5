//! Single-sequence generation: prefill a prompt, then decode token by token with the
//! sampler, recording per-token statistics. The batched engine builds on the same
//! `forward_step`; this loop serves the CLI, tests and benchmarks.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{Model, StepInput};
use crate::sampling::{sample, Rng, SamplingParams};
use crate::stats::{token_stats, TokenStats, DEFAULT_TOP_K};

pub use crate::engine::FinishReason;

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stats: Vec<TokenStats>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    /// Decode speed, tokens per second, counting the tokens after the first (the first
    /// comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.tokens.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            return 0.0;
        }
        n as f64 / self.decode_time.as_secs_f64()
    }
}

/// Generates up to `max_tokens` after `prompt`. `on_token(id, stats, text_piece)` sees each
/// token as it is chosen (text pieces are whole UTF-8 characters) and returns false to stop.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    params: &SamplingParams,
    mut on_token: impl FnMut(u32, &TokenStats, &str) -> bool,
) -> Result<Generation> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        return Err(Error::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let max_tokens = max_tokens.min(context - prompt.len());
    let transformer = &model.transformer;
    let tokenizer = &model.tokenizer;
    let mut kv = transformer.new_kv();
    kv.reserve(prompt.len() + max_tokens)?;
    let mut rng = Rng::new(params.seed);
    let mut decoder = tokenizer.stream_decoder(false);
    let mut tokens = Vec::new();
    let mut stats = Vec::new();
    let mut text = String::new();
    let mut finish = FinishReason::Length;

    let start = Instant::now();
    let mut logits = transformer.forward_step(&mut [StepInput {
        tokens: prompt,
        kv: &mut kv,
        adapter: None,
        all_logits: false,
    }])?;
    let prefill_time = start.elapsed();
    let decode_start = Instant::now();
    for step in 0..max_tokens {
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let token = sample(&row, params, &mut rng);
        let st = token_stats(&row, token, DEFAULT_TOP_K);
        tokens.push(token);
        stats.push(st);
        if tokenizer.is_eog(token) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = decoder.push(token);
        text.push_str(&piece);
        if !on_token(token, &st, &piece) {
            finish = FinishReason::Aborted;
            break;
        }
        if step + 1 == max_tokens {
            break;
        }
        logits = transformer.forward_step(&mut [StepInput {
            tokens: &[token],
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }])?;
    }
    // Bytes of a character the generation cut in half come out as U+FFFD, at the end of
    // `text` only (the callback saw whole characters).
    text.push_str(&decoder.finish());
    Ok(Generation {
        tokens,
        text,
        stats,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: decode_start.elapsed(),
    })
}
