//! The runtime object: its parameters (`verity_runtime_params`), creation and freeing,
//! the model's name, and monitoring (`verity_runtime_stats`, the status JSON).

use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::handles::{free_handle, new_handle, runtime_of, verity_runtime, Object};
use super::verity_status::{self, *};
use super::{ffi_call, opt_str, out, scratch, Fail};
use crate::device::DeviceSpec;
use crate::error::Error;
use crate::runtime::{Runtime, RuntimeConfig};

/// How to build a runtime. Get one from `verity_runtime_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_runtime_params {
    /// KV positions all running sequences may hold together.
    pub kv_budget_tokens: usize,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Requests in flight before new ones get `VERITY_ERR_BUSY`.
    pub max_queued_requests: usize,
    /// LoRA rank and alpha of the learning adapter.
    pub lora_rank: usize,
    /// LoRA alpha of the learning adapter.
    pub lora_alpha: f64,
    /// Rewarded traces the background learner waits for before a step.
    pub learn_min_traces: usize,
    /// Decode requests that name no adapter with the learning adapter (else the base).
    pub serve_learn_adapter: bool,
    /// Dequantize the weights (faster prefill, 4x the memory).
    pub dense: bool,
    /// Folder `verity_adapter_save` writes into when given none; NULL: none.
    pub adapter_dir: *const c_char,
    /// Where to run: "auto" (a GPU when this build and the machine have one, else the
    /// CPU), "cpu", "cuda" or "cuda:N"; NULL: "auto" (or the config file's). Asking for
    /// CUDA from a build without it, or without that GPU, is `VERITY_ERR_INVALID_ARGUMENT`.
    pub device: *const c_char,
    /// A JSON or TOML runtime configuration file (see `RuntimeConfig`); NULL: none. When
    /// set, the file is the configuration and the fields above but `device` are ignored; the
    /// `model_path` argument of `verity_runtime_new`, when not NULL, overrides its model.
    pub config_path: *const c_char,
}

/// The defaults (the same as `RuntimeConfig::default()`).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_runtime_default_params() -> verity_runtime_params {
    let c = RuntimeConfig::default();
    verity_runtime_params {
        kv_budget_tokens: c.kv_budget_tokens,
        max_batch: c.max_batch,
        max_queued_requests: c.max_queued_requests,
        lora_rank: c.lora.rank,
        lora_alpha: c.lora.alpha,
        learn_min_traces: c.learn_min_traces,
        serve_learn_adapter: c.serve_learn_adapter,
        dense: c.dense,
        adapter_dir: std::ptr::null(),
        device: std::ptr::null(),
        config_path: std::ptr::null(),
    }
}

unsafe fn runtime_config(
    model_path: *const c_char,
    params: &verity_runtime_params,
) -> std::result::Result<RuntimeConfig, Fail> {
    let model = opt_str(model_path, "model_path")?;
    let config_path = opt_str(params.config_path, "params.config_path")?;
    let adapter_dir = opt_str(params.adapter_dir, "params.adapter_dir")?;
    let device = match opt_str(params.device, "params.device")? {
        Some(d) => Some(d.parse::<DeviceSpec>()?),
        None => None,
    };
    let mut config = match config_path {
        Some(path) => RuntimeConfig::from_file(Path::new(path)).map_err(|e| {
            let status = match e {
                Error::Io { .. } => VERITY_ERR_IO,
                _ => VERITY_ERR_INVALID_ARGUMENT,
            };
            Fail::new(status, e.to_string())
        })?,
        None => {
            let mut c = RuntimeConfig {
                kv_budget_tokens: params.kv_budget_tokens,
                max_batch: params.max_batch,
                max_queued_requests: params.max_queued_requests,
                learn_min_traces: params.learn_min_traces,
                serve_learn_adapter: params.serve_learn_adapter,
                dense: params.dense,
                adapter_dir: adapter_dir.map(PathBuf::from),
                ..RuntimeConfig::default()
            };
            c.lora.rank = params.lora_rank;
            c.lora.alpha = params.lora_alpha;
            c
        }
    };
    if let Some(d) = device {
        config.device = d;
    }
    match model {
        Some(m) => config.model = PathBuf::from(m),
        None if config_path.is_none() => {
            return Err(Fail::new(
                VERITY_ERR_NULL_POINTER,
                "model_path is NULL and no params.config_path names a model",
            ))
        }
        None => {}
    }
    if config.learn_min_traces == 0 {
        return Err(Fail::new(
            VERITY_ERR_INVALID_ARGUMENT,
            "learn_min_traces must be at least 1",
        ));
    }
    Ok(config)
}

/// Makes the next `steps` decode steps fail (tests of the error paths; only in builds with
/// the `test-hooks` feature, never in the header).
///
/// cbindgen:ignore
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[no_mangle]
pub unsafe extern "C" fn verity_test_fail_next_decode_steps(
    rt: *const verity_runtime,
    steps: usize,
) -> verity_status {
    ffi_call(|| {
        runtime_of(rt)?.fail_next_decode_steps(steps);
        Ok(())
    })
}

/// Loads a model (a GGUF file or a Hugging Face folder) and starts its engine.
/// `model_path` may be NULL when `params.config_path` names the model. On success `*out`
/// is a new runtime; free it with `verity_runtime_free`.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_runtime_new(
    model_path: *const c_char,
    params: verity_runtime_params,
    out: *mut *mut verity_runtime,
) -> verity_status {
    ffi_call(|| {
        let out = self::out(out, "out")?;
        let config = runtime_config(model_path, &params)?;
        let runtime = Runtime::new(config)?;
        *out = new_handle(Object::Runtime(Arc::new(runtime))) as *mut verity_runtime;
        Ok(())
    })
}

/// Stops the runtime (background learning, then the engine) and frees it. Calls still
/// running on other threads finish first (requests among them end with an error). NULL is
/// accepted and does nothing.
///
/// Thread safety: any thread; the handle is invalid for every thread afterwards.
#[no_mangle]
pub extern "C" fn verity_runtime_free(rt: *mut verity_runtime) -> verity_status {
    ffi_call(|| {
        if rt.is_null() {
            return Ok(());
        }
        free_handle(rt as usize, "runtime", |o| matches!(o, Object::Runtime(_)))
    })
}

/// Writes the model's short name (its file or folder name) to `*name` (thread-local
/// storage).
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_runtime_model_name(
    rt: *const verity_runtime,
    name: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let name = out(name, "name")?;
        *name = scratch(rt.model_name());
        Ok(())
    })
}

/// Monitoring counters of a runtime.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct verity_runtime_stats {
    /// Requests accepted.
    pub requests: u64,
    /// Requests refused or failed.
    pub requests_failed: u64,
    /// Requests accepted and not finished.
    pub in_flight: usize,
    /// Traces remembered for feedback.
    pub traces_recorded: u64,
    /// Rewards reported.
    pub feedback_received: u64,
    /// Rewarded traces not yet trained on.
    pub feedback_pending: usize,
    /// Learning steps taken.
    pub learn_steps: u64,
    /// Learning steps that changed the adapter.
    pub learn_steps_applied: u64,
    /// The background learner is on.
    pub learning_running: bool,
    /// KV positions all running sequences may hold.
    pub kv_budget_tokens: usize,
    /// KV positions reserved now.
    pub kv_reserved: usize,
    /// Prompt tokens run through the model.
    pub prompt_tokens_prefilled: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests decoding now.
    pub running_requests: usize,
    /// Requests waiting for room.
    pub waiting_requests: usize,
    /// Seconds since the runtime started.
    pub uptime_seconds: f64,
}

/// Fills `*stats` with the runtime's counters.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_runtime_get_stats(
    rt: *const verity_runtime,
    stats: *mut verity_runtime_stats,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let stats = out(stats, "stats")?;
        let s = rt.stats();
        *stats = verity_runtime_stats {
            requests: s.requests,
            requests_failed: s.requests_failed,
            in_flight: s.in_flight,
            traces_recorded: s.traces_recorded,
            feedback_received: s.feedback_received,
            feedback_pending: s.feedback_pending,
            learn_steps: s.learn_steps,
            learn_steps_applied: s.learn_steps_applied,
            learning_running: s.learning_running,
            kv_budget_tokens: s.kv_budget_tokens,
            kv_reserved: s.kv_reserved,
            prompt_tokens_prefilled: s.prompt_tokens_prefilled,
            generated_tokens: s.generated_tokens,
            running_requests: s.running_requests,
            waiting_requests: s.waiting_requests,
            uptime_seconds: s.uptime_seconds,
        };
        Ok(())
    })
}

/// Writes a JSON object to `*json` (thread-local storage): `stats` (the counters),
/// `learning` (the background learner's status, with the last step's report) and
/// `adapters` (every loaded adapter with its version, rank and targets).
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_runtime_status_json(
    rt: *const verity_runtime,
    json: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let json = out(json, "json")?;
        let value = serde_json::json!({
            "model": rt.model_name(),
            "default_adapter": rt.default_adapter(),
            "stats": rt.stats(),
            "learning": rt.learning_status(),
            "adapters": rt.adapters(),
        });
        *json = scratch(value.to_string());
        Ok(())
    })
}
