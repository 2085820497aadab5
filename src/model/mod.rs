//! Models: configuration, weight loading (GGUF, Hugging Face safetensors folders), the
//! transformer, its KV cache and LoRA weights.

pub mod config;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod llama;
pub mod loader;
pub mod lora;
pub mod ops;
pub mod qmatmul;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use kv::SeqKv;
pub use llama::{StepInput, Transformer, WeightFormat};
pub use loader::{LoadOptions, Model, ModelFormat};
pub use lora::{LoraAdapter, LoraSnapshot, LoraSpec, LoraTarget};
