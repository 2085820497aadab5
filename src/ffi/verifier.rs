//! Verifiers implemented by the host: a C callback registered under a name that requests
//! can give as `verity_generate_params.verifier`; its rewards are recorded as feedback.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::handles::{runtime_of, verity_runtime};
use super::verity_status::{self, *};
use super::{arg_str, c_string_lossy, ffi_call, Fail};
use crate::verify::{Verdict, Verifier};

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
