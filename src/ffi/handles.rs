//! The opaque handle types (`verity_runtime`, `verity_result`) and the registry of live
//! handles. A handle is an id, not an address: every call looks it up here, so a freed or
//! made-up handle is an error (`VERITY_ERR_INVALID_HANDLE`), never a crash, and ids are
//! never reused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::result::ResultData;
use super::verity_status::*;
use super::{Fail, Outcome};
use crate::runtime::Runtime;

/// A runtime: one model, its engine, adapters and learner. Opaque.
pub struct verity_runtime {
    _opaque: [u8; 0],
}

/// The outcome of one generate call: N traces, their statistics and scores, the
/// selection. Immutable. Opaque.
pub struct verity_result {
    _opaque: [u8; 0],
}

/// What a handle stands for.
pub(super) enum Object {
    Runtime(Arc<Runtime>),
    Result(Arc<ResultData>),
}

/// Live handles by id. Ids count up from 1 and are never reused.
static HANDLES: Mutex<BTreeMap<usize, Object>> = Mutex::new(BTreeMap::new());
static NEXT_HANDLE: AtomicUsize = AtomicUsize::new(1);

/// Handle values are ids spaced by 16, so they look like aligned pointers and are never
/// NULL; they are never dereferenced.
pub(super) fn new_handle(object: Object) -> usize {
    let id = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) << 4;
    HANDLES.lock().insert(id, object);
    id
}

pub(super) fn runtime_of(h: *const verity_runtime) -> std::result::Result<Arc<Runtime>, Fail> {
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

pub(super) fn result_of(h: *const verity_result) -> std::result::Result<Arc<ResultData>, Fail> {
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
pub(super) fn free_handle(h: usize, kind: &str, is_kind: fn(&Object) -> bool) -> Outcome {
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
