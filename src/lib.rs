//! verity: an embeddable inference-time reasoning runtime.
//!
//! One process holds a language model and decodes in batches, scores every generated token
//! from the logits it already has, selects among N samples, and learns LoRA adapters from
//! verified rollouts while it serves. See `DESIGN.md` for the data flow.
//!
//! Start with [`Model::load`], then [`generate`] for a single sequence.

pub mod adapter;
pub mod chat;
pub mod engine;
pub mod error;
pub mod eval;
pub mod ffi;
pub mod generate;
pub mod model;
pub mod plot;
pub mod runtime;
pub mod sampling;
pub mod score;
pub mod select;
pub mod server;
pub mod stats;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::{Error, Result};
pub use model::{LoadOptions, Model, ModelConfig, WeightFormat};
pub use runtime::{GenerateRequest, GenerateResult, Runtime, RuntimeConfig};
pub use tokenizer::Tokenizer;
