//! The C ABI over [`Runtime`](crate::runtime::Runtime), after llama.cpp's `llama.h`
//! (DESIGN.md, "C ABI conventions"). The header `bindings/c/verity.h` is generated from
//! this module's files by cbindgen (`VERITY_BLESS=1 cargo test --release --test ffi_header`
//! rewrites it).
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
//!
//! One file per object, as llama.cpp has one source per object behind one header:
//! - `mod.rs` (this file): status codes, the last error, panic catching, argument checks;
//! - `handles.rs`: the opaque handle types and the registry of live handles;
//! - `runtime.rs`: runtime parameters, creation and freeing, model name, statistics;
//! - `generate.rs`: generation parameters and the (streaming) generate calls;
//! - `result.rs`: the result object and its getters;
//! - `verifier.rs`: verifiers implemented by the host;
//! - `learn.rs`: feedback and learning steps;
//! - `adapter.rs`: LoRA adapters (the learning adapter's id, versions, save, load, select,
//!   remove).
#![allow(non_camel_case_types)]
// Every function's safety contract is the module's (above): valid pointers as declared.
#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Error;

// cbindgen reads this file and then the files of these modules in the order they are
// declared here, which makes the order of the header's functions: keep it (the blank lines
// keep rustfmt from sorting the declarations).
mod handles;

mod runtime;

mod generate;

mod result;

mod verifier;

mod learn;

mod adapter;

pub use adapter::*;
pub use generate::*;
pub use handles::*;
pub use learn::*;
pub use result::*;
pub use runtime::*;
pub use verifier::*;

// ---------------------------------------------------------------------------------------
// Status codes and errors
// ---------------------------------------------------------------------------------------

/// What every call returns. `VERITY_OK` is 0; on anything else `verity_last_error()`
/// says what went wrong.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum verity_status {
    /// Success.
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
    /// A tensor operation or other internal step failed (a decode step, a thread).
    VERITY_ERR_INTERNAL = 12,
    /// The runtime is shutting down or has stopped; nothing was done.
    VERITY_ERR_UNAVAILABLE = 13,
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

/// The one mapping from the library's errors to C status codes.
pub fn status_of(e: &Error) -> verity_status {
    match e {
        Error::Io { .. } => VERITY_ERR_IO,
        Error::BadModelFile { .. }
        | Error::UnsupportedArchitecture(_)
        | Error::Config(_)
        | Error::Weight { .. }
        | Error::Tokenizer(_)
        | Error::ChatTemplate(_) => VERITY_ERR_MODEL,
        Error::PromptTooLong { .. } | Error::PromptTooLarge { .. } | Error::InvalidArgument(_) => {
            VERITY_ERR_INVALID_ARGUMENT
        }
        Error::OutOfRange(_) => VERITY_ERR_OUT_OF_RANGE,
        Error::NotFound(_) => VERITY_ERR_NOT_FOUND,
        Error::Busy(_) => VERITY_ERR_BUSY,
        Error::Unavailable(_) => VERITY_ERR_UNAVAILABLE,
        Error::Internal(_) | Error::Candle(_) => VERITY_ERR_INTERNAL,
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::new(status_of(&e), e.to_string())
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
        13 => c"VERITY_ERR_UNAVAILABLE",
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
