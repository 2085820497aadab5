//! The library's error type: one enum, messages that name the file, tensor or field at fault.

use std::path::PathBuf;

/// Everything that can go wrong in verity.
///
/// The surfaces map it once each: [`Error::http_status`] for the HTTP API and the C ABI's
/// status codes in `ffi`. A caller's mistake (bad argument, unknown id, full queue) is told
/// apart from verity's own failure ([`Error::Internal`], [`Error::Candle`]) and from a
/// runtime that is shutting down ([`Error::Unavailable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable model file: {reason}")]
    /// A model file exists but cannot be used.
    BadModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's architecture is not one verity runs.
    #[error("unsupported architecture '{0}' (verity runs: llama — Llama 2/3, SmolLM2, Mistral —, qwen2, qwen3, gemma3, phi3 — Phi-3, Phi-4-mini)")]
    UnsupportedArchitecture(String),
    /// A model or runtime configuration is missing a field or has a bad value.
    #[error("model config: {0}")]
    Config(String),
    #[error("weight '{name}': {reason}")]
    /// A weight tensor is missing or has the wrong shape or type.
    Weight {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    /// The prompt does not leave room for one generated token.
    PromptTooLong {
        /// Prompt length.
        tokens: usize,
        /// The model's context.
        context: usize,
    },
    #[error("prompt of {bytes} bytes is at least {at_least} tokens, more than the context of {context} tokens")]
    /// The prompt's text is too long to fit the context however it tokenizes (refused
    /// before tokenizing it).
    PromptTooLarge {
        /// The text's length.
        bytes: usize,
        /// A lower bound on its tokens.
        at_least: usize,
        /// The model's context.
        context: usize,
    },
    /// A value the caller passed is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A number the caller passed is outside what it may be (a LoRA rank above what the
    /// model's layers can hold, a value that is not finite in the type it is used as).
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A trace, adapter or other object named by id does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// Too much work is queued; try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// The runtime (or its engine) is shutting down or has stopped; nothing was done.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// verity failed at something that is not the caller's fault (a decode step, a thread).
    #[error("internal error: {0}")]
    Internal(String),
    /// A tensor operation failed (verity's fault or the device's).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// verity's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The HTTP status this error is answered with: 4xx for what the caller can fix, 503
    /// while shutting down, 500 for verity's own failures.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidArgument(_)
            | Error::OutOfRange(_)
            | Error::PromptTooLong { .. }
            | Error::PromptTooLarge { .. }
            | Error::Tokenizer(_)
            | Error::ChatTemplate(_)
            | Error::Config(_) => 400,
            Error::NotFound(_) => 404,
            Error::Busy(_) => 429,
            Error::Unavailable(_) => 503,
            Error::Io { .. }
            | Error::BadModelFile { .. }
            | Error::UnsupportedArchitecture(_)
            | Error::Weight { .. }
            | Error::Internal(_)
            | Error::Candle(_) => 500,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadModelFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn weight(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Weight {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
