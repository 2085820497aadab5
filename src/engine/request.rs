//! What callers hand the engine and what they get back: requests, traces, stream events.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::chat::ChatMessage;
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::stats::TokenStats;

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text; special-token text in it is parsed as special tokens.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
    /// A conversation rendered with the model's chat template (generation prompt added).
    Chat(Vec<ChatMessage>),
    /// A conversation rendered with the chat template and extra template variables, as
    /// transformers' `apply_chat_template(**kwargs)` takes them (Qwen3's
    /// `enable_thinking`).
    ChatWith(Vec<ChatMessage>, ChatKwargs),
}

/// Extra variables for a chat template, by name.
pub type ChatKwargs = serde_json::Map<String, serde_json::Value>;

/// Per-token logit adjustments beyond the plain sampler.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Penalties {
    /// CTRL-style: logits of tokens already generated are divided (if > 0) or multiplied
    /// (if < 0) by this; 1 = off.
    pub repetition: f32,
    /// Subtracted once per previous occurrence (OpenAI's frequency_penalty).
    pub frequency: f32,
    /// Subtracted once if the token occurred (OpenAI's presence_penalty).
    pub presence: f32,
    /// Added to the logit of a token id.
    pub logit_bias: HashMap<u32, f32>,
}

impl Penalties {
    /// True when no adjustment changes a logit (the sampler then reads the row as is).
    pub fn is_noop(&self) -> bool {
        (self.repetition == 1.0 || self.repetition == 0.0)
            && self.frequency == 0.0
            && self.presence == 0.0
            && self.logit_bias.is_empty()
    }
}

/// Watches one trace's statistics as they arrive and says when to stop it early
/// (DeepConf-online uses this). One monitor per trace, so it can keep running state.
pub trait TraceMonitor: Send {
    /// Called after each generated token; true stops the trace with
    /// [`FinishReason::AbortedLowConfidence`].
    fn observe(&mut self, stats: &TokenStats) -> bool;
}

/// Makes a monitor for each sample of a request.
pub type EarlyStop = Arc<dyn Fn(usize) -> Box<dyn TraceMonitor> + Send + Sync>;

/// Given the finished samples 0..k of a request, in order: whether they settle it.
pub type Settled = Arc<dyn Fn(&[&Trace]) -> bool + Send + Sync>;

/// Draws a request's samples in order, a few at a time, and stops drawing once the
/// finished ones settle the answer (early-stopping self-consistency, adaptive
/// consistency). Sample i is the same trace it would be in a plain request (its own
/// seed), so the samples drawn are a prefix of the plain request's.
#[derive(Clone)]
pub struct Sequential {
    /// Samples decoding at once (≥ 1); when one finishes, the next starts in its batch
    /// slot at the following step, so the slot never idles while samples remain.
    pub parallel: usize,
    /// Asked with samples 0..k for each k, in turn, as the run of finished samples from
    /// sample 0 grows. The first k it accepts settles the request: samples not yet
    /// started never start, and running ones stop with [`FinishReason::Unneeded`].
    pub settled: Settled,
}

impl std::fmt::Debug for Sequential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequential")
            .field("parallel", &self.parallel)
            .finish_non_exhaustive()
    }
}

/// One generation request: a prompt and how to continue it `n` times.
#[derive(Clone)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// Number of samples; the prompt is prefilled once and its KV shared by all of them.
    pub n: usize,
    /// Tokens per sample at most (capped by the context).
    pub max_tokens: usize,
    /// Sample i draws from its own generator seeded with `sampling.seed + i`, so its tokens
    /// do not depend on the rest of the batch.
    pub sampling: SamplingParams,
    /// Repetition, frequency and presence penalties and logit bias.
    pub penalties: Penalties,
    /// Strings that end a trace (matched on the decoded text, across token boundaries;
    /// the stop string is not part of the output).
    pub stop: Vec<String>,
    /// Token ids that end a trace, besides the model's end-of-generation tokens.
    pub stop_tokens: Vec<u32>,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Record this many top alternatives (id, log-prob) per token; 0 = none.
    pub top_logprobs: usize,
    /// Makes a monitor per sample that can stop it early (DeepConf-online).
    pub early_stop: Option<EarlyStop>,
    /// Draw the samples a few at a time and stop once they settle; `None` runs all `n`
    /// together.
    pub sequential: Option<Sequential>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("prompt", &self.prompt)
            .field("n", &self.n)
            .field("max_tokens", &self.max_tokens)
            .field("sampling", &self.sampling)
            .field("stop", &self.stop)
            .field("sequential", &self.sequential)
            .finish_non_exhaustive()
    }
}

impl Request {
    /// One greedy sample of at most 256 tokens, no stops, no penalties.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            n: 1,
            max_tokens: 256,
            sampling: SamplingParams::default(),
            penalties: Penalties::default(),
            stop: Vec::new(),
            stop_tokens: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
            early_stop: None,
            sequential: None,
        }
    }

    /// Samples decoding at once: `n`, or fewer for a sequential request.
    pub fn parallel_samples(&self) -> usize {
        match &self.sequential {
            Some(s) => s.parallel.clamp(1, self.n.max(1)),
            None => self.n,
        }
    }
    /// A request for raw text (special-token text in it is parsed).
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Prompt::Text(text.into()))
    }
    /// A request for a conversation, rendered with the model's chat template.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    /// Checks everything that does not need the model.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::InvalidArgument("n must be at least 1".into()));
        }
        if self.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_tokens must be at least 1".into(),
            ));
        }
        if self.sequential.as_ref().is_some_and(|s| s.parallel == 0) {
            return Err(Error::InvalidArgument(
                "a sequential request needs at least 1 sample in parallel".into(),
            ));
        }
        self.sampling.validate()?;
        let p = &self.penalties;
        // 0 and 1 are both "off"; past [1/100, 100] every seen token is either banned or
        // forced, which no sampler setting means.
        let repetition_ok =
            p.repetition == 0.0 || (MIN_REPETITION..=MAX_REPETITION).contains(&p.repetition);
        if !repetition_ok {
            return Err(Error::InvalidArgument(format!(
                "repetition penalty must be 0 (off) or in [{MIN_REPETITION}, {MAX_REPETITION}], got {}",
                p.repetition
            )));
        }
        for (what, x) in [("frequency", p.frequency), ("presence", p.presence)] {
            if !(x.is_finite() && x.abs() <= MAX_ADDITIVE_PENALTY) {
                return Err(Error::InvalidArgument(format!(
                    "{what} penalty must be within ±{MAX_ADDITIVE_PENALTY}, got {x}"
                )));
            }
        }
        if let Some((id, b)) = p
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && b.abs() <= MAX_ADDITIVE_PENALTY))
        {
            return Err(Error::InvalidArgument(format!(
                "logit bias of token {id} must be within ±{MAX_ADDITIVE_PENALTY}, got {b}"
            )));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::InvalidArgument(
                "stop strings must not be empty".into(),
            ));
        }
        // Every decoded token is matched against every stop string.
        if self.stop.len() > MAX_STOP_STRINGS
            || self.stop.iter().any(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_STRING_BYTES} bytes each"
            )));
        }
        Ok(())
    }
}

/// Bounds of a request's penalties (see [`Request::validate`]).
pub const MIN_REPETITION: f32 = 0.01;
/// The largest repetition penalty.
pub const MAX_REPETITION: f32 = 100.0;
/// The largest magnitude of a frequency or presence penalty or a logit bias (OpenAI's
/// logit_bias range).
pub const MAX_ADDITIVE_PENALTY: f32 = 100.0;
/// The most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 64;
/// The longest stop string, in bytes.
pub const MAX_STOP_STRING_BYTES: usize = 1024;

/// Why a trace ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token, stop token or stop string.
    Stop,
    /// `max_tokens` (or the context) reached.
    Length,
    /// Cancelled by the caller.
    Aborted,
    /// Stopped by the request's early-stop monitor; keeps what it generated.
    AbortedLowConfidence,
    /// Stopped because earlier samples settled a sequential request; keeps what it
    /// generated.
    Unneeded,
}

impl FinishReason {
    /// The engine cut the trace short (low confidence, or the answer was settled): its
    /// text is a fragment, with no final answer to vote on, verify or learn from.
    pub fn is_cut_short(self) -> bool {
        matches!(
            self,
            FinishReason::AbortedLowConfidence | FinishReason::Unneeded
        )
    }
}

/// One finished sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trace {
    /// The sample (0..n).
    pub index: usize,
    /// Generated token ids (an end-of-generation token that ended it is included).
    pub tokens: Vec<u32>,
    /// The decoded text (stop string excluded).
    pub text: String,
    /// Per generated token, from the raw logits of the step that produced it.
    pub stats: Vec<TokenStats>,
    /// Byte offset in `text` where each token's text ends (for answer spans → tokens).
    pub token_end: Vec<usize>,
    /// Top alternatives (id, log-prob) per token, when asked for.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Version of the request's adapter when the trace started (0 for the base model);
    /// the trainer uses it to decide whether decode-time log-probs are on-policy.
    pub adapter_version: u64,
}

/// What a request's stream carries.
#[derive(Debug)]
pub enum Event {
    /// A token of sample `index` and the text it completed (may be empty while a
    /// character or a possible stop string is incomplete).
    Token {
        /// The sample (0..n).
        index: usize,
        /// The token id.
        token: u32,
        /// Text completed by this token.
        text: String,
        /// Its statistics, from the raw logits of the step that produced it.
        stats: TokenStats,
    },
    /// Every trace, in sample order; the last event of a request.
    Done(Completion),
    /// The request failed; the last event.
    Error(Error),
}

/// The result of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Every trace, in sample order (a settled sequential request: the samples started).
    pub traces: Vec<Trace>,
    /// For a sequential request that settled: how many samples, from sample 0, settled it.
    pub settled_after: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each bound at its edge: the value on it passes, the one past it does not.
    #[test]
    fn penalties_and_stop_strings_are_bounded() {
        let check = |edit: &dyn Fn(&mut Request)| {
            let mut r = Request::text("x");
            edit(&mut r);
            r.validate()
        };
        for ok in [0.0, 0.01, 1.0, 1.3, 100.0] {
            check(&|r| r.penalties.repetition = ok).unwrap();
        }
        for bad in [1e-45, 0.009, 100.5, 1e30, -1.0, f32::NAN, f32::INFINITY] {
            let e = check(&|r| r.penalties.repetition = bad).unwrap_err();
            assert!(e.to_string().contains("repetition"), "{bad}: {e}");
        }
        check(&|r| r.penalties.frequency = -100.0).unwrap();
        for bad in [100.1, f32::NAN] {
            assert!(check(&|r| r.penalties.presence = bad).is_err(), "{bad}");
            assert!(check(&|r| r.penalties.frequency = bad).is_err(), "{bad}");
            let e = check(&|r| {
                r.penalties.logit_bias.insert(7, bad);
            })
            .unwrap_err();
            assert!(e.to_string().contains("token 7"), "{e}");
        }
        check(&|r| r.stop = vec!["a".repeat(MAX_STOP_STRING_BYTES); MAX_STOP_STRINGS]).unwrap();
        assert!(check(&|r| r.stop = vec!["a".repeat(MAX_STOP_STRING_BYTES + 1)]).is_err());
        assert!(check(&|r| r.stop = vec!["a".into(); MAX_STOP_STRINGS + 1]).is_err());
        assert!(check(&|r| r.stop = vec![String::new()]).is_err());
    }
}
