//! Feedback and learning: rewards for finished traces, GRPO steps of the learning adapter
//! on demand (`verity_learn_report`), and the background learner.

use std::ffi::c_char;

use super::handles::{runtime_of, verity_runtime};
use super::verity_status;
use super::{ffi_call, scratch};

/// Records a reward (a finite number within ±1e6; 1 = good) for a finished trace, by the id from
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
    /// The learner's step number.
    pub step: u64,
    /// The learning adapter's version after the step (unchanged if nothing was applied).
    pub version: u64,
    /// The adapter changed (false when the step was skipped).
    pub applied: bool,
    /// True when nothing was applied; `skipped_reason` says why (thread-local storage,
    /// valid until the next call on the thread); NULL otherwise.
    pub skipped: bool,
    /// Why nothing was applied, or NULL; valid until the next call on this thread.
    pub skipped_reason: *const c_char,
    /// The policy loss of the step.
    pub loss: f64,
    /// Mean reward of the traces trained on.
    pub reward_mean: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Groups that carried a signal (rewards not all equal).
    pub groups_used: usize,
    /// Groups dropped for carrying none.
    pub groups_skipped: usize,
    /// Completion tokens trained on.
    pub tokens: usize,
    /// Wall time of the step.
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
