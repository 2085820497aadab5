//! Numbered versions of a named adapter: `ROOT/NAME/v1`, `v2`, … (PEFT folders, each
//! written atomically) and a `LATEST` file, itself replaced atomically, holding the number
//! of the newest complete one.

use std::fs;
use std::path::{Path, PathBuf};

use super::atomic;
use super::save::save_locked;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::lora::LoraAdapter;

/// Holds the newest version number under `ROOT/NAME` (see [`save_versioned`]).
pub const LATEST_FILE: &str = "LATEST";

/// Writes `ROOT/NAME/v{N}`, N one more than the highest version there, then points
/// `ROOT/NAME/LATEST` at it (replaced atomically). Returns the new version's folder.
/// `base_model_name_or_path` is written as `null`; see [`save_versioned_for_base`].
///
/// Takes the adapter's Vars read lock while it reads the weights, as
/// [`save_peft`](super::save_peft) does: the caller must not hold it.
pub fn save_versioned(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    root: &Path,
    name: &str,
) -> Result<PathBuf> {
    save_versioned_for_base(adapter, config, root, name, "")
}

/// [`save_versioned`] recording `base_model_name` in `adapter_config.json`. Takes the
/// adapter's Vars read lock itself: the caller must not hold it.
pub fn save_versioned_for_base(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    root: &Path,
    name: &str,
    base_model_name: &str,
) -> Result<PathBuf> {
    let lock = atomic::lock();
    let base = adapter_root(root, name)?;
    fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    let latest_path = base.join(LATEST_FILE);
    atomic::remove_stale_file_temps(&lock, &latest_path)?;
    let highest = versions(&base)?.last().copied().unwrap_or(0);
    let latest = read_latest(&base)?.unwrap_or(0);
    let version = highest.max(latest) + 1;
    let dir = base.join(format!("v{version}"));
    save_locked(&lock, adapter, config, &dir, base_model_name, &mut |_| {
        Ok(())
    })?;
    atomic::replace_file(&lock, &latest_path, format!("{version}\n").as_bytes())?;
    Ok(dir)
}

/// The version `ROOT/NAME/LATEST` names, `None` if nothing was saved there yet.
pub fn latest_version(root: &Path, name: &str) -> Result<Option<u64>> {
    read_latest(&adapter_root(root, name)?)
}

/// The folder of version `version` of adapter `name` under `root`.
pub fn version_dir(root: &Path, name: &str, version: u64) -> Result<PathBuf> {
    Ok(adapter_root(root, name)?.join(format!("v{version}")))
}

fn adapter_root(root: &Path, name: &str) -> Result<PathBuf> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && Path::new(name).components().count() == 1;
    if !plain {
        return Err(Error::InvalidArgument(format!(
            "adapter name '{name}' must be a single, plain folder name"
        )));
    }
    Ok(root.join(name))
}

/// The version numbers of the `v{N}` folders under `base`, ascending.
fn versions(base: &Path) -> Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(base).map_err(|e| Error::io(base, e))? {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        let file_name = entry.file_name();
        let Some(v) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            found.push(v);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn read_latest(base: &Path) -> Result<Option<u64>> {
    let path = base.join(LATEST_FILE);
    let text = match crate::files::read_to_string(&path, 64) {
        Ok(text) => text,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let v = text.trim().parse::<u64>().map_err(|_| {
        Error::bad_file(
            &path,
            format!("expected a version number, found {:?}", text.trim()),
        )
    })?;
    Ok(Some(v))
}
