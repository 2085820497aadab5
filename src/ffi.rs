//! The C ABI over [`Runtime`], after llama.cpp's `llama.h` (DESIGN.md, "C ABI conventions").
//! The header `bindings/c/verity.h` is generated from this file by cbindgen
//! (`VERITY_BLESS=1 cargo test --release --test ffi_header` rewrites it).
//!
//! Conventions:
//! - Objects are opaque handles: `verity_runtime*` and `verity_result*`. A handle is an id,
//!   not an address: every call looks it up in a registry of live handles, so a freed (or
//!   made-up) handle makes the call return `VERITY_ERR_INVALID_HANDLE` instead of crashing,
//!   and ids are never reused.
//! - Parameters come from `*_default_params()` by value; change the fields you need.
//! - Every object is released with its `*_free`; freeing NULL or a freed handle is harmless
//!   (the call returns `VERITY_ERR_INVALID_HANDLE` for the latter).
//! - Every call returns a `verity_status`. On failure `verity_last_error()` describes it
//!   (a thread-local message, valid until the next call on the same thread). Output
//!   parameters are written only on success unless a function says otherwise.
//! - No Rust panic crosses the boundary: it becomes `VERITY_ERR_PANIC`. NULL pointers,
//!   invalid UTF-8, out-of-range indices and unreasonable sizes are errors, not crashes.
//!   What cannot be checked is the caller's part: a non-NULL pointer must point to what
//!   the signature says (a NUL-terminated string, an array of the given length, a
//!   writable output).
//! - Strings are UTF-8 and NUL-terminated. Text the runtime returns may hold a NUL
//!   character of its own; functions that return text also give its length in bytes.
//! - Strings returned through `const char**` outside a result object (paths, JSON, a
//!   learning report's reason) live in thread-local storage: valid until the next call on
//!   the same thread. Pointers into a result stay valid until `verity_result_free`.
//! - Thread safety: a runtime may be used from any number of threads at once; a result is
//!   immutable and may be read from any thread, but must not be freed while another
//!   thread still reads it or uses pointers obtained from it.
#![allow(non_camel_case_types)]
// Every function's safety contract is the module's (above): valid pointers as declared.
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::chat::ChatMessage;
use crate::engine::{Event, FinishReason, Prompt, Request};
use crate::error::Error;
use crate::runtime::{GenerateRequest, GenerateResult, Runtime, RuntimeConfig};
use crate::verify::{Verdict, Verifier};

// ---------------------------------------------------------------------------------------
// Status codes and errors
// ---------------------------------------------------------------------------------------

/// What every call returns. `VERITY_OK` is 0; on anything else `verity_last_error()`
/// says what went wrong.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum verity_status {
    VERITY_OK = 0,
    /// A value is not acceptable (a bad selection rule, n = 0, an unknown option, ...).
    VERITY_ERR_INVALID_ARGUMENT = 1,
    /// A required pointer argument was NULL.
    VERITY_ERR_NULL_POINTER = 2,
    /// A string argument is not valid UTF-8.
    VERITY_ERR_UTF8 = 3,
    /// An index or size is out of range.
    VERITY_ERR_OUT_OF_RANGE = 4,
    /// A named thing (adapter, verifier, trace id, score) does not exist.
    VERITY_ERR_NOT_FOUND = 5,
    /// Too many requests are in flight; try again later.
    VERITY_ERR_BUSY = 6,
    /// The model (or its tokenizer or chat template) could not be loaded or used.
    VERITY_ERR_MODEL = 7,
    /// A file could not be read or written.
    VERITY_ERR_IO = 8,
    /// The streaming callback asked to stop.
    VERITY_ERR_CANCELLED = 9,
    /// The handle was freed, never created, or is of the wrong kind.
    VERITY_ERR_INVALID_HANDLE = 10,
    /// A bug: the runtime panicked. The handle stays usable, but report it.
    VERITY_ERR_PANIC = 11,
    /// A tensor operation or other internal step failed.
    VERITY_ERR_INTERNAL = 12,
}
use verity_status::*;

/// A failed call: its status and message.
struct Fail {
    status: verity_status,
    message: String,
}

impl Fail {
    fn new(status: verity_status, message: impl Into<String>) -> Self {
        Fail {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Io { .. } => VERITY_ERR_IO,
            Error::BadModelFile { .. }
            | Error::UnsupportedArchitecture(_)
            | Error::Config(_)
            | Error::Weight { .. }
            | Error::Tokenizer(_)
            | Error::ChatTemplate(_) => VERITY_ERR_MODEL,
            Error::PromptTooLong { .. } | Error::InvalidArgument(_) => VERITY_ERR_INVALID_ARGUMENT,
            Error::NotFound(_) => VERITY_ERR_NOT_FOUND,
            Error::Busy(_) => VERITY_ERR_BUSY,
            Error::Candle(_) => VERITY_ERR_INTERNAL,
        };
        Fail::new(status, e.to_string())
    }
}

type Outcome = std::result::Result<(), Fail>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    static SCRATCH: RefCell<CString> = RefCell::new(CString::default());
}

/// Runs the body of an entry point: clears the last error, catches panics, records the
/// failure's message.
fn ffi_call(body: impl FnOnce() -> Outcome) -> verity_status {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => VERITY_OK,
        Ok(Err(fail)) => {
            set_last_error(fail.message);
            fail.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("internal error (panic): {what}"));
            VERITY_ERR_PANIC
        }
    }
}

fn c_string_lossy(s: String) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let mut bytes = e.into_vec();
        bytes.retain(|&b| b != 0);
        CString::new(bytes).unwrap_or_default()
    })
}

fn set_last_error(message: String) {
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c_string_lossy(message));
}

/// Keeps `s` in this thread's scratch slot and returns a pointer to it.
fn scratch(s: String) -> *const c_char {
    SCRATCH
        .try_with(|slot| {
            let mut slot = slot.borrow_mut();
            *slot = c_string_lossy(s);
            slot.as_ptr()
        })
        .unwrap_or(std::ptr::null())
}

/// The message of the last failed call on this thread ("" after a successful call).
/// Never NULL; valid until the next verity call on this thread.
///
/// Thread safety: thread-local; call it from the thread that made the failed call.
#[no_mangle]
pub extern "C" fn verity_last_error() -> *const c_char {
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The library's version ("0.1.0"), a static string.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static name for a status code ("VERITY_ERR_NOT_FOUND"); "VERITY_UNKNOWN_STATUS" for
/// a value that is none.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_status_name(status: c_int) -> *const c_char {
    let name: &CStr = match status {
        0 => c"VERITY_OK",
        1 => c"VERITY_ERR_INVALID_ARGUMENT",
        2 => c"VERITY_ERR_NULL_POINTER",
        3 => c"VERITY_ERR_UTF8",
        4 => c"VERITY_ERR_OUT_OF_RANGE",
        5 => c"VERITY_ERR_NOT_FOUND",
        6 => c"VERITY_ERR_BUSY",
        7 => c"VERITY_ERR_MODEL",
        8 => c"VERITY_ERR_IO",
        9 => c"VERITY_ERR_CANCELLED",
        10 => c"VERITY_ERR_INVALID_HANDLE",
        11 => c"VERITY_ERR_PANIC",
        12 => c"VERITY_ERR_INTERNAL",
        _ => c"VERITY_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

// ---------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------

/// A required string argument.
unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> std::result::Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::new(
            VERITY_ERR_NULL_POINTER,
            format!("{what} is NULL"),
        ));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|e| Fail::new(VERITY_ERR_UTF8, format!("{what} is not valid UTF-8: {e}")))
}

/// An optional string argument (NULL → None).
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> std::result::Result<Option<&'a str>, Fail> {
    if p.is_null() {
        Ok(None)
    } else {
        arg_str(p, what).map(Some)
    }
}

/// A required output pointer.
unsafe fn out<'a, T>(p: *mut T, what: &str) -> std::result::Result<&'a mut T, Fail> {
    p.as_mut()
        .ok_or_else(|| Fail::new(VERITY_ERR_NULL_POINTER, format!("{what} is NULL")))
}

fn index_in(i: usize, len: usize, what: &str) -> Outcome {
    if i < len {
        Ok(())
    } else {
        Err(Fail::new(
            VERITY_ERR_OUT_OF_RANGE,
            format!("{what} {i} is out of range (there are {len})"),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------

/// A runtime: one model, its engine, adapters and learner. Opaque.
pub struct verity_runtime {
    _opaque: [u8; 0],
}

/// The outcome of one generate call: N traces, their statistics and scores, the
/// selection. Immutable. Opaque.
pub struct verity_result {
    _opaque: [u8; 0],
}

enum Object {
    Runtime(Arc<Runtime>),
    Result(Arc<ResultData>),
}

/// Live handles by id. Ids count up from 1 and are never reused.
static HANDLES: Mutex<BTreeMap<usize, Object>> = Mutex::new(BTreeMap::new());
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

/// Handle values are ids spaced by 16, so they look like aligned pointers and are never
/// NULL; they are never dereferenced.
fn new_handle(object: Object) -> usize {
    let id = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) << 4;
    HANDLES.lock().insert(id, object);
    id
}

fn runtime_of(h: *const verity_runtime) -> std::result::Result<Arc<Runtime>, Fail> {
    if h.is_null() {
        return Err(Fail::new(VERITY_ERR_NULL_POINTER, "runtime handle is NULL"));
    }
    match HANDLES.lock().get(&(h as usize)) {
        Some(Object::Runtime(rt)) => Ok(rt.clone()),
        _ => Err(Fail::new(
            VERITY_ERR_INVALID_HANDLE,
            format!("{h:p} is not a live runtime handle (freed, or never created)"),
        )),
    }
}

fn result_of(h: *const verity_result) -> std::result::Result<Arc<ResultData>, Fail> {
    if h.is_null() {
        return Err(Fail::new(VERITY_ERR_NULL_POINTER, "result handle is NULL"));
    }
    match HANDLES.lock().get(&(h as usize)) {
        Some(Object::Result(r)) => Ok(r.clone()),
        _ => Err(Fail::new(
            VERITY_ERR_INVALID_HANDLE,
            format!("{h:p} is not a live result handle (freed, or never created)"),
        )),
    }
}

/// Removes a handle of the kind `is_kind` accepts; its object is dropped once no call
/// still uses it.
fn free_handle(h: usize, kind: &str, is_kind: fn(&Object) -> bool) -> Outcome {
    let removed = {
        let mut handles = HANDLES.lock();
        match handles.get(&h) {
            Some(o) if is_kind(o) => handles.remove(&h),
            _ => None,
        }
    };
    match removed {
        // Dropped outside the registry lock: a runtime's drop joins its threads.
        Some(object) => {
            drop(object);
            Ok(())
        }
        None => Err(Fail::new(
            VERITY_ERR_INVALID_HANDLE,
            format!("{h:#x} is not a live {kind} handle (already freed, or never created)"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Runtime
// ---------------------------------------------------------------------------------------

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
    pub lora_alpha: f64,
    /// Rewarded traces the background learner waits for before a step.
    pub learn_min_traces: usize,
    /// Decode requests that name no adapter with the learning adapter (else the base).
    pub serve_learn_adapter: bool,
    /// Dequantize the weights (faster prefill, 4x the memory).
    pub dense: bool,
    /// Folder `verity_adapter_save` writes into when given none; NULL: none.
    pub adapter_dir: *const c_char,
    /// A JSON or TOML runtime configuration file (see `RuntimeConfig`); NULL: none. When
    /// set, the file is the configuration and the fields above are ignored; the
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
    pub requests: u64,
    pub requests_failed: u64,
    pub in_flight: usize,
    pub traces_recorded: u64,
    pub feedback_received: u64,
    /// Rewarded traces not yet trained on.
    pub feedback_pending: usize,
    pub learn_steps: u64,
    pub learn_steps_applied: u64,
    pub learning_running: bool,
    pub kv_budget_tokens: usize,
    pub kv_reserved: usize,
    pub prompt_tokens_prefilled: u64,
    pub generated_tokens: u64,
    pub running_requests: usize,
    pub waiting_requests: usize,
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

// ---------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------

/// The most samples one request may ask for through the C ABI.
pub const VERITY_MAX_SAMPLES: usize = 4096;
/// The most stop strings one request may carry.
pub const VERITY_MAX_STOP_STRINGS: usize = 64;
/// The most alternatives per token `top_logprobs` may ask for.
pub const VERITY_MAX_TOP_LOGPROBS: usize = 256;

/// One generation request. Get one from `verity_generate_default_params()`. The strings
/// are borrowed for the duration of the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_generate_params {
    /// The prompt (required).
    pub prompt: *const c_char,
    /// Render the prompt with the model's chat template as one user message (else it is
    /// used as raw text, special-token text parsed as special tokens).
    pub chat: bool,
    /// Samples; the prompt is prefilled once and shared by all (1..=VERITY_MAX_SAMPLES).
    pub n: usize,
    /// Tokens per sample at most (clamped to the model's context).
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// Sample i draws from a generator seeded with seed + i.
    pub seed: u64,
    /// `n_stop` strings that end a trace (not part of its text); may be NULL when
    /// `n_stop` is 0.
    pub stop: *const *const c_char,
    pub n_stop: usize,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Adapter id; NULL: the runtime's default adapter; "base": no adapter.
    pub adapter: *const c_char,
    /// Selection rule among the traces: "greedy", "majority", "borda:0.5",
    /// "max:self_certainty", "weighted:logprob", "deepconf:bottom10:2048:10"; NULL: none.
    pub selection: *const c_char,
    /// A verifier ("math", "exact", "choice" or one registered with
    /// `verity_register_verifier`) and the reference it checks against; NULL: none. Its
    /// reward is recorded as feedback on each trace.
    pub verifier: *const c_char,
    pub reference: *const c_char,
    /// Record this many top alternatives per token (0..=VERITY_MAX_TOP_LOGPROBS).
    pub top_logprobs: usize,
}

/// The defaults: n = 1, 256 tokens, greedy, no stop strings, the default adapter, no
/// selection, no verifier. `prompt` is NULL and must be set.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_generate_default_params() -> verity_generate_params {
    let r = Request::text("");
    verity_generate_params {
        prompt: std::ptr::null(),
        chat: false,
        n: r.n,
        max_tokens: r.max_tokens,
        temperature: r.sampling.temperature,
        top_p: r.sampling.top_p,
        top_k: r.sampling.top_k,
        min_p: r.sampling.min_p,
        seed: r.sampling.seed,
        stop: std::ptr::null(),
        n_stop: 0,
        ignore_eos: r.ignore_eos,
        adapter: std::ptr::null(),
        selection: std::ptr::null(),
        verifier: std::ptr::null(),
        reference: std::ptr::null(),
        top_logprobs: r.top_logprobs,
    }
}

unsafe fn generate_request(
    params: *const verity_generate_params,
) -> std::result::Result<GenerateRequest, Fail> {
    let p = params
        .as_ref()
        .ok_or_else(|| Fail::new(VERITY_ERR_NULL_POINTER, "params is NULL"))?;
    let text = arg_str(p.prompt, "params.prompt")?.to_string();
    let range = |v: usize, lo: usize, hi: usize, what: &str| -> Outcome {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(Fail::new(
                VERITY_ERR_OUT_OF_RANGE,
                format!("{what} is {v}; it must be in {lo}..={hi}"),
            ))
        }
    };
    range(p.n, 1, VERITY_MAX_SAMPLES, "params.n")?;
    range(p.max_tokens, 1, 1 << 24, "params.max_tokens")?;
    range(p.n_stop, 0, VERITY_MAX_STOP_STRINGS, "params.n_stop")?;
    range(
        p.top_logprobs,
        0,
        VERITY_MAX_TOP_LOGPROBS,
        "params.top_logprobs",
    )?;
    let mut stop = Vec::with_capacity(p.n_stop);
    if p.n_stop > 0 {
        if p.stop.is_null() {
            return Err(Fail::new(
                VERITY_ERR_NULL_POINTER,
                "params.stop is NULL but params.n_stop > 0",
            ));
        }
        for i in 0..p.n_stop {
            stop.push(arg_str(*p.stop.add(i), &format!("params.stop[{i}]"))?.to_string());
        }
    }
    let prompt = if p.chat {
        Prompt::Chat(vec![ChatMessage::new("user", text)])
    } else {
        Prompt::Text(text)
    };
    let mut request = Request::new(prompt);
    request.n = p.n;
    request.max_tokens = p.max_tokens;
    request.sampling.temperature = p.temperature;
    request.sampling.top_p = p.top_p;
    request.sampling.top_k = p.top_k;
    request.sampling.min_p = p.min_p;
    request.sampling.seed = p.seed;
    request.stop = stop;
    request.ignore_eos = p.ignore_eos;
    request.top_logprobs = p.top_logprobs;
    request.adapter = opt_str(p.adapter, "params.adapter")?.map(str::to_string);
    let selection = match opt_str(p.selection, "params.selection")? {
        Some(rule) => Some(rule.parse().map_err(|e: crate::select::ParseRuleError| {
            Fail::new(VERITY_ERR_INVALID_ARGUMENT, e.to_string())
        })?),
        None => None,
    };
    let verifier = opt_str(p.verifier, "params.verifier")?;
    let reference = opt_str(p.reference, "params.reference")?;
    let verify = match (verifier, reference) {
        (Some(v), Some(r)) => Some((v.to_string(), r.to_string())),
        (None, None) => None,
        _ => {
            return Err(Fail::new(
                VERITY_ERR_INVALID_ARGUMENT,
                "params.verifier and params.reference go together: set both or neither",
            ))
        }
    };
    // Checked here so that a bad request fails before any work.
    request.validate()?;
    Ok(GenerateRequest {
        request,
        selection,
        verify,
    })
}

/// Statistics of one generated token, from the logits of the step that produced it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct verity_token_stats {
    pub logprob: f32,
    pub entropy: f32,
    pub self_certainty: f32,
    /// DeepConf token confidence.
    pub confidence: f32,
}

/// Called for every generated token of a streaming request, on the thread that called
/// `verity_generate_stream`: the sample's index, the token id, the text it completed (may
/// be empty while a character or a possible stop string is incomplete; `text_len` bytes,
/// NUL-terminated), its statistics, and the caller's `user_data`. Return 0 to go on,
/// anything else to cancel the request. Pointers are valid during the call only. It must
/// not unwind (no C++ exceptions, no longjmp).
pub type verity_token_callback = Option<
    unsafe extern "C" fn(
        trace: usize,
        token: i32,
        text: *const c_char,
        text_len: usize,
        stats: *const verity_token_stats,
        user_data: *mut c_void,
    ) -> c_int,
>;

/// Generates `params->n` traces of a prompt, scores them, applies the selection rule and
/// the verifier, and records the traces for feedback. Blocks until done. On success
/// `*out` is a new result; free it with `verity_result_free`.
///
/// Thread safety: any thread; concurrent calls on one runtime are batched together.
#[no_mangle]
pub unsafe extern "C" fn verity_generate(
    rt: *const verity_runtime,
    params: *const verity_generate_params,
    out: *mut *mut verity_result,
) -> verity_status {
    verity_generate_stream(rt, params, None, std::ptr::null_mut(), out)
}

/// `verity_generate` calling `callback` (may be NULL) for every token as it is generated.
/// When the callback returns nonzero the request is cancelled: the call returns
/// `VERITY_ERR_CANCELLED` *and* sets `*out` to the result so far (traces ended as
/// `VERITY_FINISH_ABORTED` where they were cut), which must be freed like any other.
///
/// Thread safety: any thread; the callback runs on the calling thread.
#[no_mangle]
pub unsafe extern "C" fn verity_generate_stream(
    rt: *const verity_runtime,
    params: *const verity_generate_params,
    callback: verity_token_callback,
    user_data: *mut c_void,
    out: *mut *mut verity_result,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let out = self::out(out, "out")?;
        let request = generate_request(params)?;
        let mut generation = rt.submit(request)?;
        let mut cancelled = false;
        let completion = loop {
            match generation.blocking_next() {
                Some(Event::Token {
                    index,
                    token,
                    text,
                    stats,
                }) => {
                    let Some(callback) = callback else { continue };
                    if cancelled {
                        continue;
                    }
                    let len = text.len();
                    let mut bytes = text.into_bytes();
                    bytes.push(0);
                    let stats = verity_token_stats {
                        logprob: stats.logprob,
                        entropy: stats.entropy,
                        self_certainty: stats.self_certainty,
                        confidence: stats.confidence,
                    };
                    let stop = callback(
                        index,
                        token as i32,
                        bytes.as_ptr().cast(),
                        len,
                        &stats,
                        user_data,
                    );
                    if stop != 0 {
                        cancelled = true;
                        generation.abort();
                    }
                }
                Some(Event::Done(completion)) => break completion,
                Some(Event::Error(e)) => {
                    return Err(Fail::new(VERITY_ERR_INTERNAL, e));
                }
                None => {
                    return Err(Fail::new(
                        VERITY_ERR_INTERNAL,
                        "the engine stopped before the request finished",
                    ))
                }
            }
        };
        let result = generation.finish(completion);
        *out = new_handle(Object::Result(Arc::new(ResultData::new(result)))) as *mut verity_result;
        if cancelled {
            Err(Fail::new(
                VERITY_ERR_CANCELLED,
                "the token callback cancelled the request; *out holds the traces so far",
            ))
        } else {
            Ok(())
        }
    })
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// Why a trace ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum verity_finish_reason {
    /// End-of-generation token, stop token or stop string.
    VERITY_FINISH_STOP = 0,
    /// max_tokens (or the context) reached.
    VERITY_FINISH_LENGTH = 1,
    /// Cancelled by the caller.
    VERITY_FINISH_ABORTED = 2,
    /// Stopped early for low confidence; keeps what it generated.
    VERITY_FINISH_ABORTED_LOW_CONFIDENCE = 3,
}

/// Text with a trailing NUL, for handing out as a C string with its length.
struct CText(Vec<u8>);

impl CText {
    fn new(s: &str) -> Self {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        CText(bytes)
    }
    fn ptr(&self) -> *const c_char {
        self.0.as_ptr().cast()
    }
    fn len(&self) -> usize {
        self.0.len() - 1
    }
}

struct TraceData {
    text: CText,
    answer: Option<CText>,
    tokens: Vec<i32>,
    logprob: Vec<f32>,
    entropy: Vec<f32>,
    self_certainty: Vec<f32>,
    confidence: Vec<f32>,
    /// Per token: offsets into `top_ids`/`top_logprobs`.
    top_start: Vec<usize>,
    top_ids: Vec<i32>,
    top_logprobs: Vec<f32>,
    /// `GeneratedTrace::scores` in its (alphabetical) order, names as C strings.
    scores: Vec<(CText, f64)>,
}

/// A result with everything C callers read laid out as C arrays and strings.
struct ResultData {
    result: GenerateResult,
    traces: Vec<TraceData>,
    answer: Option<CText>,
    adapter: Option<CText>,
    selection: Option<CText>,
    votes: Vec<CText>,
}

impl ResultData {
    fn new(result: GenerateResult) -> Self {
        let traces = result
            .traces
            .iter()
            .map(|t| {
                let stats = &t.trace.stats;
                let mut top_start = Vec::with_capacity(t.trace.top_logprobs.len() + 1);
                let mut top_ids = Vec::new();
                let mut top_logprobs = Vec::new();
                for alternatives in &t.trace.top_logprobs {
                    top_start.push(top_ids.len());
                    for &(id, lp) in alternatives {
                        top_ids.push(id as i32);
                        top_logprobs.push(lp);
                    }
                }
                top_start.push(top_ids.len());
                TraceData {
                    text: CText::new(&t.trace.text),
                    answer: t.answer.as_deref().map(CText::new),
                    tokens: t.trace.tokens.iter().map(|&id| id as i32).collect(),
                    logprob: stats.iter().map(|s| s.logprob).collect(),
                    entropy: stats.iter().map(|s| s.entropy).collect(),
                    self_certainty: stats.iter().map(|s| s.self_certainty).collect(),
                    confidence: stats.iter().map(|s| s.confidence).collect(),
                    top_start,
                    top_ids,
                    top_logprobs,
                    scores: t.scores.iter().map(|(k, v)| (CText::new(k), *v)).collect(),
                }
            })
            .collect();
        ResultData {
            traces,
            answer: result.answer.as_deref().map(CText::new),
            adapter: result.adapter.as_deref().map(CText::new),
            selection: result.selection.as_deref().map(CText::new),
            votes: result.votes.iter().map(|v| CText::new(&v.answer)).collect(),
            result,
        }
    }

    fn trace(
        &self,
        i: usize,
    ) -> std::result::Result<(&crate::runtime::GeneratedTrace, &TraceData), Fail> {
        index_in(i, self.traces.len(), "trace index")?;
        Ok((&self.result.traces[i], &self.traces[i]))
    }
}

fn opt_ptr(t: &Option<CText>) -> *const c_char {
    t.as_ref().map_or(std::ptr::null(), CText::ptr)
}

/// Frees a result. NULL is accepted and does nothing. Pointers obtained from it become
/// invalid.
///
/// Thread safety: any thread, once no other thread reads the result.
#[no_mangle]
pub extern "C" fn verity_result_free(res: *mut verity_result) -> verity_status {
    ffi_call(|| {
        if res.is_null() {
            return Ok(());
        }
        free_handle(res as usize, "result", |o| matches!(o, Object::Result(_)))
    })
}

/// The number of traces (the request's n).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_n_traces(
    res: *const verity_result,
    n: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        *out(n, "n")? = r.traces.len();
        Ok(())
    })
}

/// Request-level facts: the request id, the prompt's length in tokens, the adapter it
/// decoded with (NULL: the base model) and the selection rule as text (NULL: none). Any
/// output pointer may be NULL to skip it.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_info(
    res: *const verity_result,
    request_id: *mut u64,
    prompt_tokens: *mut usize,
    adapter: *mut *const c_char,
    selection: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        if let Some(v) = request_id.as_mut() {
            *v = r.result.request_id;
        }
        if let Some(v) = prompt_tokens.as_mut() {
            *v = r.result.prompt_tokens;
        }
        if let Some(v) = adapter.as_mut() {
            *v = opt_ptr(&r.adapter);
        }
        if let Some(v) = selection.as_mut() {
            *v = opt_ptr(&r.selection);
        }
        Ok(())
    })
}

/// Trace `i`'s text (`*len` bytes, NUL-terminated; `len` may be NULL).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_text(
    res: *const verity_result,
    i: usize,
    text: *mut *const c_char,
    len: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let text = out(text, "text")?;
        let (_, t) = r.trace(i)?;
        *text = t.text.ptr();
        if let Some(len) = len.as_mut() {
            *len = t.text.len();
        }
        Ok(())
    })
}

/// Trace `i`'s generated token ids (an end-of-generation token that ended it included).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_tokens(
    res: *const verity_result,
    i: usize,
    tokens: *mut *const i32,
    n: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let tokens = out(tokens, "tokens")?;
        let n = out(n, "n")?;
        let (_, t) = r.trace(i)?;
        *tokens = t.tokens.as_ptr();
        *n = t.tokens.len();
        Ok(())
    })
}

/// Per-token statistics of a trace: four arrays of `n` floats (one per generated token).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_trace_stats {
    pub n: usize,
    pub logprob: *const f32,
    pub entropy: *const f32,
    pub self_certainty: *const f32,
    pub confidence: *const f32,
}

/// Trace `i`'s per-token statistics.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_stats(
    res: *const verity_result,
    i: usize,
    stats: *mut verity_trace_stats,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let stats = out(stats, "stats")?;
        let (_, t) = r.trace(i)?;
        *stats = verity_trace_stats {
            n: t.logprob.len(),
            logprob: t.logprob.as_ptr(),
            entropy: t.entropy.as_ptr(),
            self_certainty: t.self_certainty.as_ptr(),
            confidence: t.confidence.as_ptr(),
        };
        Ok(())
    })
}

/// The top alternatives recorded for token `pos` of trace `i` (when the request asked
/// for `top_logprobs`): `*n` token ids and their log-probs, most likely first.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_top_logprobs(
    res: *const verity_result,
    i: usize,
    pos: usize,
    ids: *mut *const i32,
    logprobs: *mut *const f32,
    n: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let ids = out(ids, "ids")?;
        let logprobs = out(logprobs, "logprobs")?;
        let n = out(n, "n")?;
        let (_, t) = r.trace(i)?;
        let recorded = t.top_start.len() - 1;
        if recorded == 0 {
            return Err(Fail::new(
                VERITY_ERR_NOT_FOUND,
                "no top log-probs were recorded (set params.top_logprobs)",
            ));
        }
        index_in(pos, recorded, "token position")?;
        let (start, end) = (t.top_start[pos], t.top_start[pos + 1]);
        *ids = t.top_ids[start..].as_ptr();
        *logprobs = t.top_logprobs[start..].as_ptr();
        *n = end - start;
        Ok(())
    })
}

/// Why trace `i` ended.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_finish_reason(
    res: *const verity_result,
    i: usize,
    reason: *mut verity_finish_reason,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let reason = out(reason, "reason")?;
        let (g, _) = r.trace(i)?;
        *reason = match g.trace.finish {
            FinishReason::Stop => verity_finish_reason::VERITY_FINISH_STOP,
            FinishReason::Length => verity_finish_reason::VERITY_FINISH_LENGTH,
            FinishReason::Aborted => verity_finish_reason::VERITY_FINISH_ABORTED,
            FinishReason::AbortedLowConfidence => {
                verity_finish_reason::VERITY_FINISH_ABORTED_LOW_CONFIDENCE
            }
        };
        Ok(())
    })
}

/// Trace `i`'s id, under which `verity_feedback` reports a reward for it.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_id(
    res: *const verity_result,
    i: usize,
    id: *mut u64,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let id = out(id, "id")?;
        let (g, _) = r.trace(i)?;
        *id = g.id;
        Ok(())
    })
}

/// Trace `i`'s extracted final answer (`\boxed{}`, "The answer is", the last number, ...);
/// `*answer` is NULL when it has none.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_answer(
    res: *const verity_result,
    i: usize,
    answer: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let answer = out(answer, "answer")?;
        let (_, t) = r.trace(i)?;
        *answer = opt_ptr(&t.answer);
        Ok(())
    })
}

/// The number of scores trace `i` has (see `verity_result_trace_score_at`).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_n_scores(
    res: *const verity_result,
    i: usize,
    n: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let n = out(n, "n")?;
        let (_, t) = r.trace(i)?;
        *n = t.scores.len();
        Ok(())
    })
}

/// Score `k` of trace `i` (by name, in alphabetical order): its name and value.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_score_at(
    res: *const verity_result,
    i: usize,
    k: usize,
    name: *mut *const c_char,
    value: *mut f64,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let name = out(name, "name")?;
        let value = out(value, "value")?;
        let (_, t) = r.trace(i)?;
        index_in(k, t.scores.len(), "score index")?;
        *name = t.scores[k].0.ptr();
        *value = t.scores[k].1;
        Ok(())
    })
}

/// Trace `i`'s score `name` ("self_certainty", "logprob", "entropy",
/// "lowest_group:16", and whatever the selection rule used). `VERITY_ERR_NOT_FOUND` when
/// the trace has no such score (not computed, or undefined for it, e.g. an empty trace).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_score(
    res: *const verity_result,
    i: usize,
    name: *const c_char,
    value: *mut f64,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let name = arg_str(name, "name")?;
        let value = out(value, "value")?;
        let (g, _) = r.trace(i)?;
        *value = *g.scores.get(name).ok_or_else(|| {
            let known: Vec<&str> = g.scores.keys().map(String::as_str).collect();
            Fail::new(
                VERITY_ERR_NOT_FOUND,
                format!(
                    "trace {i} has no score '{name}' (it has: {})",
                    known.join(", ")
                ),
            )
        })?;
        Ok(())
    })
}

/// The verifier's reward for trace `i`; NaN when the request named no verifier.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_reward(
    res: *const verity_result,
    i: usize,
    reward: *mut f64,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let reward = out(reward, "reward")?;
        let (g, _) = r.trace(i)?;
        *reward = g.reward.unwrap_or(f64::NAN);
        Ok(())
    })
}

/// The index of the trace the selection rule chose. `VERITY_ERR_NOT_FOUND` when the
/// request had no selection rule or no trace had an answer to vote with.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_selected(
    res: *const verity_result,
    index: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let index = out(index, "index")?;
        *index = r.result.selected.ok_or_else(|| {
            Fail::new(
                VERITY_ERR_NOT_FOUND,
                if r.result.selection.is_none() {
                    "the request had no selection rule"
                } else {
                    "no trace was selected (none had an answer)"
                },
            )
        })?;
        Ok(())
    })
}

/// The selected answer; `*answer` is NULL when nothing was selected.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_answer(
    res: *const verity_result,
    answer: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        *out(answer, "answer")? = opt_ptr(&r.answer);
        Ok(())
    })
}

/// The number of rows in the selection's vote table (0 for rules that do not vote).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_n_votes(
    res: *const verity_result,
    n: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        *out(n, "n")? = r.votes.len();
        Ok(())
    })
}

/// Row `i` of the vote table (by weight, descending): the answer, its pooled weight and
/// how many traces voted for it. `weight` and `count` may be NULL.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_vote(
    res: *const verity_result,
    i: usize,
    answer: *mut *const c_char,
    weight: *mut f64,
    count: *mut usize,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let answer = out(answer, "answer")?;
        index_in(i, r.votes.len(), "vote index")?;
        *answer = r.votes[i].ptr();
        if let Some(w) = weight.as_mut() {
            *w = r.result.votes[i].weight;
        }
        if let Some(c) = count.as_mut() {
            *c = r.result.votes[i].count;
        }
        Ok(())
    })
}

/// The whole result as JSON (`*json` in thread-local storage): the same fields the HTTP
/// server returns, with every trace's tokens, statistics and scores.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_json(
    res: *const verity_result,
    json: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        let json = out(json, "json")?;
        let text = serde_json::to_string(&r.result)
            .map_err(|e| Fail::new(VERITY_ERR_INTERNAL, e.to_string()))?;
        *json = scratch(text);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Verifiers from the host
// ---------------------------------------------------------------------------------------

/// A host verifier: gets a trace's text and the request's reference (NUL-terminated
/// UTF-8; any NUL inside the text is dropped) and the `user_data` it was registered
/// with; returns the reward (1 = correct; a non-finite value records no reward). It is
/// called from whichever thread finishes a request, possibly several at once: it must
/// be thread-safe, and must not unwind (no C++ exceptions, no longjmp).
pub type verity_verifier_fn = Option<
    unsafe extern "C" fn(
        text: *const c_char,
        reference: *const c_char,
        user_data: *mut c_void,
    ) -> f64,
>;

struct HostVerifier {
    callback: unsafe extern "C" fn(*const c_char, *const c_char, *mut c_void) -> f64,
    user_data: *mut c_void,
}

// SAFETY: the registration contract makes the callback and its user data thread-safe.
unsafe impl Send for HostVerifier {}
unsafe impl Sync for HostVerifier {}

impl Verifier for HostVerifier {
    fn verify(&self, completion: &str, reference: &str) -> Verdict {
        let text = c_string_lossy(completion.to_string());
        let reference = c_string_lossy(reference.to_string());
        // SAFETY: per the registration contract.
        let reward = unsafe { (self.callback)(text.as_ptr(), reference.as_ptr(), self.user_data) };
        Verdict {
            reward,
            reason: None,
        }
    }
}

/// Registers (or replaces) a verifier that requests can name in
/// `verity_generate_params.verifier`. `user_data` must stay valid while the runtime may
/// call the verifier (until it is replaced or the runtime is freed).
///
/// Thread safety: any thread; see `verity_verifier_fn` for the callback's.
#[no_mangle]
pub unsafe extern "C" fn verity_register_verifier(
    rt: *const verity_runtime,
    name: *const c_char,
    callback: verity_verifier_fn,
    user_data: *mut c_void,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let name = arg_str(name, "name")?;
        let callback =
            callback.ok_or_else(|| Fail::new(VERITY_ERR_NULL_POINTER, "callback is NULL"))?;
        rt.register_verifier(
            name,
            Arc::new(HostVerifier {
                callback,
                user_data,
            }),
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Feedback and learning
// ---------------------------------------------------------------------------------------

/// Records a reward (any finite number; 1 = good) for a finished trace, by the id from
/// `verity_result_trace_id`. `VERITY_ERR_NOT_FOUND` for an unknown, already trained-on
/// or forgotten trace.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_feedback(
    rt: *const verity_runtime,
    trace_id: u64,
    reward: f64,
) -> verity_status {
    ffi_call(|| {
        runtime_of(rt)?.feedback(trace_id, reward)?;
        Ok(())
    })
}

/// What a learning step did.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_learn_report {
    pub step: u64,
    /// The learning adapter's version after the step (unchanged if nothing was applied).
    pub version: u64,
    pub applied: bool,
    /// True when nothing was applied; `skipped_reason` says why (thread-local storage,
    /// valid until the next call on the thread); NULL otherwise.
    pub skipped: bool,
    pub skipped_reason: *const c_char,
    pub loss: f64,
    pub reward_mean: f64,
    pub grad_norm: f64,
    pub groups_used: usize,
    pub groups_skipped: usize,
    pub tokens: usize,
    pub train_seconds: f64,
}

/// One GRPO step of the learning adapter on every rewarded trace not yet trained on
/// (with none pending the report says it was skipped). `out` may be NULL. Blocks for the
/// step; decoding goes on meanwhile and uses the new weights from its next step.
///
/// Thread safety: any thread; steps are serialized.
#[no_mangle]
pub unsafe extern "C" fn verity_learn_step(
    rt: *const verity_runtime,
    out: *mut verity_learn_report,
) -> verity_status {
    ffi_call(|| {
        let report = runtime_of(rt)?.learn_step()?;
        if let Some(out) = out.as_mut() {
            *out = verity_learn_report {
                step: report.step,
                version: report.version,
                applied: report.applied,
                skipped: report.skipped.is_some(),
                skipped_reason: report.skipped.map_or(std::ptr::null(), scratch),
                loss: report.loss,
                reward_mean: report.reward_mean,
                grad_norm: report.grad_norm,
                groups_used: report.groups_used,
                groups_skipped: report.groups_skipped,
                tokens: report.tokens,
                train_seconds: report.train_time.as_secs_f64(),
            };
        }
        Ok(())
    })
}

/// Starts learning in the background: a step whenever `min_traces` rewarded traces are
/// pending (0: the runtime's `learn_min_traces`). Idempotent.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_learning_start(
    rt: *const verity_runtime,
    min_traces: usize,
) -> verity_status {
    ffi_call(|| {
        let min = (min_traces > 0).then_some(min_traces);
        runtime_of(rt)?.start_learning(min)?;
        Ok(())
    })
}

/// Stops the background learner after its current step (blocks until then).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_learning_stop(rt: *const verity_runtime) -> verity_status {
    ffi_call(|| {
        runtime_of(rt)?.stop_learning();
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------

/// The id of the adapter the learner updates ("learned" unless configured), in
/// thread-local storage.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_learning_adapter(
    rt: *const verity_runtime,
    id: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        *out(id, "id")? = scratch(rt.config().learn_adapter.clone());
        Ok(())
    })
}

/// The version of a loaded adapter (0 until its first update).
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_adapter_version(
    rt: *const verity_runtime,
    id: *const c_char,
    version: *mut u64,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let id = arg_str(id, "id")?;
        let version = out(version, "version")?;
        *version = rt.adapter_version(id)?;
        Ok(())
    })
}

/// Saves adapter `id` as a new version in PEFT format under `dir/id/vN` (`dir` NULL: the
/// runtime's `adapter_dir`). `path` (may be NULL) receives the folder written, in
/// thread-local storage.
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_adapter_save(
    rt: *const verity_runtime,
    id: *const c_char,
    dir: *const c_char,
    path: *mut *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let id = arg_str(id, "id")?;
        let dir = opt_str(dir, "dir")?;
        let written = rt.adapter_save(id, dir.map(Path::new))?;
        if let Some(path) = path.as_mut() {
            *path = scratch(written.display().to_string());
        }
        Ok(())
    })
}

/// Loads a PEFT adapter folder under `id` (replacing one of that id; loading into the
/// learning adapter's id makes the learner continue from it).
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_adapter_load(
    rt: *const verity_runtime,
    id: *const c_char,
    dir: *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let id = arg_str(id, "id")?;
        let dir = arg_str(dir, "dir")?;
        rt.adapter_load(id, Path::new(dir))?;
        Ok(())
    })
}

/// Makes `id` the adapter of requests that name none; NULL or "base" selects the base
/// model.
///
/// Thread safety: any thread; requests already running keep their adapter.
#[no_mangle]
pub unsafe extern "C" fn verity_adapter_select(
    rt: *const verity_runtime,
    id: *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let id = opt_str(id, "id")?;
        rt.adapter_select(id)?;
        Ok(())
    })
}

/// Unloads an adapter (not the learning one).
///
/// Thread safety: any thread.
#[no_mangle]
pub unsafe extern "C" fn verity_adapter_remove(
    rt: *const verity_runtime,
    id: *const c_char,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let id = arg_str(id, "id")?;
        rt.adapter_remove(id)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_and_bogus_handles_are_errors() {
        let mut n = 0usize;
        unsafe {
            assert_eq!(
                verity_result_n_traces(std::ptr::null(), &mut n),
                VERITY_ERR_NULL_POINTER
            );
            let bogus = 0x4241 as *const verity_result; // ids are multiples of 16
            assert_eq!(
                verity_result_n_traces(bogus, &mut n),
                VERITY_ERR_INVALID_HANDLE
            );
            let msg = CStr::from_ptr(verity_last_error()).to_str().unwrap();
            assert!(msg.contains("not a live result handle"), "{msg}");
        }
        assert_eq!(verity_runtime_free(std::ptr::null_mut()), VERITY_OK);
        assert_eq!(unsafe { CStr::from_ptr(verity_last_error()) }, c"");
    }

    #[test]
    fn panics_become_status_codes() {
        let status = ffi_call(|| panic!("boom"));
        assert_eq!(status, VERITY_ERR_PANIC);
        let msg = unsafe { CStr::from_ptr(verity_last_error()) };
        assert!(msg.to_str().unwrap().contains("boom"));
    }

    #[test]
    fn status_names_cover_every_code() {
        for code in 0..=12 {
            let name = unsafe { CStr::from_ptr(verity_status_name(code)) };
            assert_ne!(name, c"VERITY_UNKNOWN_STATUS", "{code}");
        }
    }
}
