//! Models: configuration, weight loading (GGUF, Hugging Face safetensors folders), the
//! transformer, its KV cache and LoRA weights.

pub mod config;
pub(crate) mod cpu_ops;
pub(crate) mod gguf;
pub(crate) mod hf;
mod kv;
mod llama;
mod loader;
pub(crate) mod lora;
pub(crate) mod ops;
mod qmatmul;
mod weights;

pub use config::{Architecture, ModelConfig};
pub use kv::{KvSegment, SeqKv};
pub use llama::{StepInput, Transformer, WeightFormat};
pub use loader::{LoadOptions, Model, ModelFormat};
pub use lora::{LoraAdapter, LoraPair, LoraSnapshot, LoraSpec, LoraTarget};

/// Internals that only verity's own tests reach: GGUF row permutation, writing a
/// safetensors folder, and the differentiable ops. Not part of the API; may change at will.
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod testing {
    pub use super::gguf::permute_rows;
    pub use super::hf::save;
    pub use super::ops::{causal_attention, log_softmax, rms_norm, rope, softmax, swiglu};
}
