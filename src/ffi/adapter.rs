//! LoRA adapters: the learning adapter's id, an adapter's version, and saving, loading,
//! selecting (as the default of requests that name none) and removing adapters.

use std::ffi::c_char;
use std::path::Path;

use super::handles::{runtime_of, verity_runtime};
use super::verity_status;
use super::{arg_str, ffi_call, opt_str, out, scratch};

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
