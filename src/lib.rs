//! verity: an embeddable inference-time reasoning runtime.
//!
//! One process holds a language model and decodes in batches, scores every generated token
//! from the logits it already has, selects among N samples, and learns LoRA adapters from
//! verified rollouts while it serves. `ARCHITECTURE.md` maps the code; `DESIGN.md` (beside
//! the checkout) has the formulas.
//!
//! Start with [`Runtime::builder`] (or [`Runtime::new`]): it loads the model on the device
//! the config names and is what every surface (CLI, HTTP server, C ABI) is built on.
//!
//! ```no_run
//! use verity::engine::Request;
//! use verity::select::SelectionRule;
//! use verity::{ChatMessage, DeviceSpec, GenerateRequest, Runtime, RuntimeConfig};
//!
//! let runtime = Runtime::new(RuntimeConfig {
//!     model: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
//!     device: DeviceSpec::Auto,
//!     ..RuntimeConfig::default()
//! })?;
//! // 8 samples of one prompt (prefilled once), voted on by Borda count over self-certainty.
//! let mut request = Request::chat(vec![ChatMessage::user("What is 17 * 23? Use \\boxed{}.")]);
//! request.n = 8;
//! request.sampling.temperature = 0.8;
//! let result = runtime.generate(GenerateRequest {
//!     selection: Some(SelectionRule::Borda { power: 0.5 }),
//!     verify: Some(("math".into(), "391".into())),
//!     ..GenerateRequest::new(request)
//! })?;
//! println!("answer {:?} from {} traces", result.answer, result.traces.len());
//! // The verifier's rewards were recorded as feedback: one GRPO step on them; the next
//! // request decodes with the updated adapter.
//! let report = runtime.learn_step()?;
//! println!("applied: {} (adapter version {})", report.applied, report.version);
//! # Ok::<(), verity::Error>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod chat;
pub mod device;
pub mod engine;
pub mod error;
pub mod ffi;
pub mod files;
mod kernels;
pub mod model;
pub(crate) mod pool;
pub mod runtime;
pub mod sampling;
pub mod score;
pub mod select;
pub mod stats;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use chat::{ChatMessage, ChatTemplate};
pub use device::DeviceSpec;
pub use error::{Error, Result};
pub use model::{LoadOptions, Model, ModelConfig, WeightFormat};
pub use runtime::{
    GenerateRequest, GenerateResult, Generation, GenerationEvent, Runtime, RuntimeBuilder,
    RuntimeConfig,
};
pub use tokenizer::Tokenizer;

/// Fix the CPU thread count in the environment, once, at the start of a program.
///
/// Unless `RAYON_NUM_THREADS` is set, candle asks `/proc/cpuinfo` for the number of
/// physical cores on every f32 matmul and every pool dispatch; on small models that read
/// costs a fifth of decode time. This sets it to the count candle would have found. Call it
/// from `main` before any other thread starts: changing the environment while other threads
/// read it is a data race in C, which is why the library never does it by itself (a C or
/// Python host sets `RAYON_NUM_THREADS` before loading verity instead).
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Bound glibc's malloc arenas, once, at the start of a program that trains while it
/// serves. A training step allocates about a gigabyte of short-lived buffers; glibc gives
/// each thread that allocates its own arena (up to 8 per core) and keeps each arena's high
/// water mark, so learn steps that run on different threads (the server's blocking pool)
/// grow the resident size by that much per arena: 0.9 → 2.7 GB over 640 soak requests, flat
/// at 1.4 GB with one arena at the same speed. `MALLOC_ARENA_MAX`, when set, wins. A no-op
/// elsewhere than glibc; C hosts set `MALLOC_ARENA_MAX` themselves.
pub fn bound_malloc_arenas(arenas: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

/// Returns the allocator's free memory to the system (glibc's `malloc_trim`; a no-op
/// elsewhere). A training step frees about a gigabyte of buffers at once; without this,
/// glibc keeps them resident in the arena of whichever thread ran the step, and a server
/// whose learn steps run on several threads grows by that much per arena.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}
