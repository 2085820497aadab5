//! LoRA adapters on disk, in the layout Hugging Face PEFT reads and writes: a folder with
//! `adapter_config.json` and `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.{N}.self_attn.q_proj.lora_A.weight` (r × in) and
//! `….lora_B.weight` (out × r).
//!
//! Saves are atomic: a crash at any point leaves a complete old or a complete new version,
//! which [`load_peft`] reads; the next save (or [`recover`]) cleans up what the crash left.
//! [`save_versioned`] keeps numbered versions `ROOT/NAME/v1`, `v2`, … and a `LATEST` file
//! naming the newest complete one. Every save takes the adapter's Vars read lock itself
//! while it reads the weights; callers must not hold it.
//!
//! Layout (everything public is re-exported here):
//! - `peft.rs`: the format itself, no I/O: file and tensor names, the `adapter_config.json`
//!   written, and the parsing of configs and tensor keys.
//! - `save.rs`: [`save_peft`], writing the two files of an adapter.
//! - `load.rs`: [`load_peft`], reading a folder and checking it against the model.
//! - `versions.rs`: [`save_versioned`] and the `LATEST` file.
//! - `confine.rs`: [`confine`], keeping folders that clients name inside one root.
//! - `atomic.rs`: crash-safe replacement of a folder or file and [`recover`], knowing nothing
//!   of adapters; the process-wide lock that serializes saves.
//!
//! One writer per destination at a time: saves within a process are serialized, but two
//! processes saving into the same folder at once are not supported.

mod atomic;
mod confine;
mod load;
mod peft;
mod save;
mod versions;

pub use atomic::recover;
pub use confine::confine;
pub use load::load_peft;
pub use peft::{peft_config_json, peft_key, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
pub use save::save_peft;
#[doc(hidden)]
pub use save::{save_peft_with, SaveStep};
pub use versions::{
    latest_version, save_versioned, save_versioned_for_base, version_dir, LATEST_FILE,
};
