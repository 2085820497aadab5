//! The library's error type: one enum, messages that name the file, tensor or field at fault.

use std::path::PathBuf;

/// Everything that can go wrong in verity.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable model file: {reason}")]
    BadModelFile { path: PathBuf, reason: String },
    #[error("unsupported architecture '{0}' (verity runs: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("weight '{name}': {reason}")]
    Weight { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A trace, adapter or other object named by id does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// Too much work is queued; try again later.
    #[error("busy: {0}")]
    Busy(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
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
