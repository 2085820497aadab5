//! LoRA adapters on disk, in the layout Hugging Face PEFT reads and writes: a folder with
//! `adapter_config.json` and `adapter_model.safetensors`, tensors named
//! `base_model.model.model.layers.{N}.self_attn.q_proj.lora_A.weight` (r × in) and
//! `….lora_B.weight` (out × r).
//!
//! Saves are atomic. Both files are written into a temporary sibling folder
//! (`DIR.tmp-<pid>-<n>`), synced, and renamed over the destination; an existing destination is
//! first renamed aside (`DIR.old-<pid>-<n>`) and removed once the new one is in place. A
//! crash at any point therefore leaves a complete old or a complete new version: [`load_peft`]
//! reads the set-aside old one if the crash came between the two renames, and the next save
//! (or [`recover`]) puts things back in order and removes what the crash left behind.
//!
//! [`save_versioned`] keeps numbered versions `ROOT/NAME/v1`, `v2`, … and a `LATEST` file,
//! itself replaced atomically, holding the number of the newest complete one.
//!
//! One writer per destination at a time: saves within a process are serialized, but two
//! processes saving into the same folder at once are not supported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::lora::{LoraAdapter, LoraPair, LoraSpec, LoraTarget};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Holds the newest version number under `ROOT/NAME` (see [`save_versioned`]).
pub const LATEST_FILE: &str = "LATEST";

/// The prefix PEFT puts before the base model's own key names.
const PEFT_PREFIX: &str = "base_model.model.";

/// Serializes the saves of this process (recovery must not see another thread's
/// temporary folder as stale).
static SAVE_LOCK: Mutex<()> = Mutex::new(());
/// Makes temporary names unique within this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// PEFT's key of one LoRA tensor, e.g.
/// `base_model.model.model.layers.3.mlp.down_proj.lora_B.weight`.
pub fn peft_key(layer: usize, target: LoraTarget, b: bool) -> String {
    let ab = if b { "lora_B" } else { "lora_A" };
    format!(
        "{PEFT_PREFIX}model.layers.{layer}.{}.{ab}.weight",
        target.module_path()
    )
}

/// The `adapter_config.json` PEFT would write for `spec` (keys sorted, as PEFT writes them).
/// An empty `base_model_name` is written as `null`.
pub fn peft_config_json(spec: &LoraSpec, base_model_name: &str) -> Value {
    let mut targets: Vec<&str> = Vec::new();
    for t in &spec.targets {
        if !targets.contains(&t.module_name()) {
            targets.push(t.module_name());
        }
    }
    // PEFT's `lora_alpha` is an int; write integral values as integers.
    let alpha: Value = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 9.0e15 {
        Value::from(spec.alpha as i64)
    } else {
        Value::from(spec.alpha)
    };
    let base = if base_model_name.is_empty() {
        Value::Null
    } else {
        Value::from(base_model_name)
    };
    serde_json::json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// Writes `adapter` as a PEFT LoRA folder at `dir` (created, or replaced atomically).
///
/// An existing `dir` is replaced only if it holds nothing but the two adapter files; any
/// other content makes this an error, so that a wrong path cannot delete unrelated data.
/// Tensors are stored as f32. An empty `base_model_name` is written as `null`.
pub fn save_peft(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
) -> Result<()> {
    save_peft_with(adapter, config, dir, base_model_name, &mut |_| Ok(()))
}

/// The points of a save at which the test hook of [`save_peft_with`] is called.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum SaveStep<'a> {
    /// `adapter_config.json` written into the temporary folder, not yet synced.
    ConfigWritten(&'a Path),
    /// `adapter_model.safetensors` written into the temporary folder, not yet synced.
    TensorsWritten(&'a Path),
    /// Both files and the temporary folder synced.
    Synced(&'a Path),
    /// The previous destination renamed aside to this path; the new one not yet in place.
    OldMovedAside(&'a Path),
    /// The new version renamed into place (an error from here on is reported, but the new
    /// version stays); the old one not yet removed.
    Committed(&'a Path),
}

/// [`save_peft`] with a hook called at each [`SaveStep`], for tests that make a save fail
/// (the hook returns an error) or crash (the hook aborts the process) part-way.
#[doc(hidden)]
pub fn save_peft_with(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
    hook: &mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
) -> Result<()> {
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    save_locked(adapter, config, dir, base_model_name, hook)
}

fn save_locked(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
    hook: &mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
) -> Result<()> {
    check_adapter(adapter, config)?;
    let (parent, name) = split_dir(dir)?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    recover_locked(dir)?;
    let replace = match fs::symlink_metadata(dir) {
        Ok(_) => {
            check_replaceable(dir)?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dir, e)),
    };

    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tmp = parent.join(format!("{name}.tmp-{pid}-{n}"));
    if let Err(e) = write_tmp(adapter, &tmp, base_model_name, hook) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let aside = parent.join(format!("{name}.old-{pid}-{n}"));
    if replace {
        let moved = fs::rename(dir, &aside)
            .map_err(|e| Error::io(dir, e))
            .and_then(|()| sync_dir(&parent))
            .and_then(|()| hook(SaveStep::OldMovedAside(&aside)).map_err(|e| Error::io(dir, e)));
        if let Err(e) = moved {
            if fs::symlink_metadata(&aside).is_ok() {
                let _ = fs::rename(&aside, dir);
                let _ = sync_dir(&parent);
            }
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    if let Err(e) = fs::rename(&tmp, dir) {
        if replace {
            let _ = fs::rename(&aside, dir);
        }
        let _ = sync_dir(&parent);
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    sync_dir(&parent)?;
    let committed = hook(SaveStep::Committed(dir)).map_err(|e| Error::io(dir, e));
    if replace {
        remove_dir_if_present(&aside)?;
        sync_dir(&parent)?;
    }
    committed
}

/// An adapter saved for `config` must fit it: PEFT checks the shapes when it loads.
fn check_adapter(adapter: &LoraAdapter, config: &ModelConfig) -> Result<()> {
    if adapter.num_layers() != config.num_layers {
        return Err(Error::InvalidArgument(format!(
            "the adapter has {} layers, the model config {}",
            adapter.num_layers(),
            config.num_layers
        )));
    }
    let rank = adapter.spec.rank;
    for (layer, target, pair) in adapter.pairs() {
        let (fan_in, fan_out) = target.dims(config);
        let checks = [
            (false, pair.a.as_tensor(), [rank, fan_in]),
            (true, pair.b.as_tensor(), [fan_out, rank]),
        ];
        for (b, t, want) in checks {
            if t.dims() != want {
                return Err(Error::InvalidArgument(format!(
                    "'{}' has shape {:?}, but the model config needs {want:?}",
                    peft_key(layer, target, b),
                    t.dims()
                )));
            }
        }
    }
    Ok(())
}

/// Writes and syncs both files into the fresh folder `tmp`.
fn write_tmp(
    adapter: &LoraAdapter,
    tmp: &Path,
    base_model_name: &str,
    hook: &mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
) -> Result<()> {
    fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;

    let config_path = tmp.join(ADAPTER_CONFIG_FILE);
    let json = peft_config_json(&adapter.spec, base_model_name);
    let mut text = serde_json::to_string_pretty(&json)
        .map_err(|e| Error::InvalidArgument(format!("cannot serialize adapter config: {e}")))?;
    text.push('\n');
    let mut file = File::create(&config_path).map_err(|e| Error::io(&config_path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::io(&config_path, e))?;
    hook(SaveStep::ConfigWritten(&config_path)).map_err(|e| Error::io(&config_path, e))?;
    file.sync_all().map_err(|e| Error::io(&config_path, e))?;
    drop(file);

    let weights_path = tmp.join(ADAPTER_WEIGHTS_FILE);
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (layer, target, pair) in adapter.pairs() {
        for (b, var) in [(false, &pair.a), (true, &pair.b)] {
            let t = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            tensors.insert(peft_key(layer, target, b), t);
        }
    }
    candle_core::safetensors::save(&tensors, &weights_path)
        .map_err(|e| Error::bad_file(&weights_path, format!("cannot write safetensors: {e}")))?;
    hook(SaveStep::TensorsWritten(&weights_path)).map_err(|e| Error::io(&weights_path, e))?;
    sync_file(&weights_path)?;
    sync_dir(tmp)?;
    hook(SaveStep::Synced(tmp)).map_err(|e| Error::io(tmp, e))?;
    Ok(())
}

/// Refuses to replace anything but a folder holding (some of) the two adapter files.
fn check_replaceable(dir: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a folder; not replacing it with an adapter",
            dir.display()
        )));
    }
    let mut foreign = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let known = name == ADAPTER_CONFIG_FILE || name == ADAPTER_WEIGHTS_FILE;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !known || !is_file {
            foreign.push(name.to_string_lossy().into_owned());
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        return Err(Error::InvalidArgument(format!(
            "{} holds more than a PEFT adapter ({}); not replacing it",
            dir.display(),
            foreign.join(", ")
        )));
    }
    Ok(())
}

/// Finishes or rolls back a save of `dir` that a crash interrupted: puts a set-aside old
/// version back if no new one reached `dir`, and removes set-aside old versions and the
/// temporary folders of processes that no longer run. Saves do this themselves first.
pub fn recover(dir: &Path) -> Result<()> {
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    recover_locked(dir)
}

fn recover_locked(dir: &Path) -> Result<()> {
    let (parent, _) = split_dir(dir)?;
    let leftovers = leftovers(dir)?;
    let exists = match fs::symlink_metadata(dir) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut olds: Vec<&Leftover> = leftovers.iter().filter(|l| !l.tmp).collect();
    if !exists {
        // A crash between "old aside" and "new in place": the old version comes back.
        if let Some(newest) = newest(&olds) {
            fs::rename(&newest.path, dir).map_err(|e| Error::io(&newest.path, e))?;
            sync_dir(&parent)?;
            olds.retain(|l| l.path != newest.path);
        }
    }
    let mut removed = false;
    for old in olds {
        remove_dir_if_present(&old.path)?;
        removed = true;
    }
    let me = std::process::id();
    for tmp in leftovers.iter().filter(|l| l.tmp) {
        // Saves of this process hold SAVE_LOCK, so its own temporaries are stale too.
        if tmp.pid == me || !process_alive(tmp.pid) {
            remove_dir_if_present(&tmp.path)?;
            removed = true;
        }
    }
    if removed {
        sync_dir(&parent)?;
    }
    Ok(())
}

struct Leftover {
    path: PathBuf,
    tmp: bool,
    pid: u32,
}

/// `DIR.tmp-<pid>-<n>` and `DIR.old-<pid>-<n>` beside `dir`.
fn leftovers(dir: &Path) -> Result<Vec<Leftover>> {
    let (parent, name) = split_dir(dir)?;
    let entries = match fs::read_dir(&parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&parent, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&parent, e))?;
        let file_name = entry.file_name();
        let Some(entry_name) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = entry_name
            .strip_prefix(name.as_str())
            .and_then(|r| r.strip_prefix('.'))
        else {
            continue;
        };
        let (tmp, rest) = if let Some(r) = rest.strip_prefix("tmp-") {
            (true, r)
        } else if let Some(r) = rest.strip_prefix("old-") {
            (false, r)
        } else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else {
            continue;
        };
        found.push(Leftover {
            path: entry.path(),
            tmp,
            pid,
        });
    }
    Ok(found)
}

/// The most recently modified of `candidates` (ties: the greatest path).
fn newest<'a>(candidates: &[&'a Leftover]) -> Option<&'a Leftover> {
    candidates.iter().copied().max_by_key(|l| {
        let modified = fs::symlink_metadata(&l.path)
            .and_then(|m| m.modified())
            .ok();
        (modified, l.path.clone())
    })
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

#[cfg(not(target_os = "linux"))]
fn process_alive(_pid: u32) -> bool {
    // Without a cheap portable check, assume it runs: its leftovers are kept.
    true
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// (parent folder, final component as UTF-8) of an adapter folder path.
fn split_dir(dir: &Path) -> Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "adapter folder '{}' needs a final UTF-8 name component",
                dir.display()
            ))
        })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string()))
}

fn sync_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Makes the entries of a folder (creations, renames) durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

/// Writes `ROOT/NAME/v{N}`, N one more than the highest version there, then points
/// `ROOT/NAME/LATEST` at it (replaced atomically). Returns the new version's folder.
/// `base_model_name_or_path` is written as `null`; see [`save_versioned_for_base`].
pub fn save_versioned(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    root: &Path,
    name: &str,
) -> Result<PathBuf> {
    save_versioned_for_base(adapter, config, root, name, "")
}

/// [`save_versioned`] recording `base_model_name` in `adapter_config.json`.
pub fn save_versioned_for_base(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    root: &Path,
    name: &str,
    base_model_name: &str,
) -> Result<PathBuf> {
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let base = adapter_root(root, name)?;
    fs::create_dir_all(&base).map_err(|e| Error::io(&base, e))?;
    remove_stale_latest_temps(&base)?;
    let highest = versions(&base)?.last().copied().unwrap_or(0);
    let latest = read_latest(&base)?.unwrap_or(0);
    let version = highest.max(latest) + 1;
    let dir = base.join(format!("v{version}"));
    save_locked(adapter, config, &dir, base_model_name, &mut |_| Ok(()))?;
    write_latest(&base, version)?;
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
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let v = text.trim().parse::<u64>().map_err(|_| {
        Error::bad_file(
            &path,
            format!("expected a version number, found {:?}", text.trim()),
        )
    })?;
    Ok(Some(v))
}

/// Replaces `base/LATEST` atomically: temporary file, sync, rename, sync the folder.
fn write_latest(base: &Path, version: u64) -> Result<()> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = base.join(format!("{LATEST_FILE}.tmp-{}-{n}", std::process::id()));
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{version}\n").as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| {
            fs::rename(&tmp, base.join(LATEST_FILE))
                .map_err(|e| Error::io(base.join(LATEST_FILE), e))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(base)
}

fn remove_stale_latest_temps(base: &Path) -> Result<()> {
    let prefix = format!("{LATEST_FILE}.tmp-");
    let me = std::process::id();
    for entry in fs::read_dir(base).map_err(|e| Error::io(base, e))? {
        let entry = entry.map_err(|e| Error::io(base, e))?;
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !process_alive(pid) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
    }
    Ok(())
}

/// Reads a PEFT LoRA folder written by [`save_peft`] or by PEFT itself, checking it against
/// `config`, into an adapter whose tensors have `dtype` and live on `device`.
///
/// Accepted: `peft_type` `"LORA"`, `r > 0`, `use_rslora`, `target_modules` as a list of
/// module names (`"q_proj"`, or a path suffix such as `"self_attn.q_proj"`), `"all-linear"` or
/// a regular expression, `layers_to_transform` (missing layers get no update), and key names
/// with the adapter name inserted (`lora_A.default.weight`). Rejected with an error naming
/// what is wrong: other PEFT types, DoRA, per-module rank or alpha patterns, LoRA biases,
/// `modules_to_save`, modules verity does not have, A without B or B without A, layer indices
/// beyond the model, and tensors whose shape does not fit the model.
///
/// If `dir` is missing because a save was interrupted between its two renames, the complete
/// old version set aside beside it is read.
pub fn load_peft(
    dir: &Path,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter> {
    // A save may replace the folder while it is read: read both files again if the folder
    // changed under us or a file vanished (a rename in progress), so that the config and
    // the tensors always come from the same, complete version.
    let mut attempt = 0;
    let (folder, text, bytes) = loop {
        attempt += 1;
        let folder = resolve_dir(dir)?;
        let before = folder_identity(&folder);
        let read = fs::read_to_string(folder.join(ADAPTER_CONFIG_FILE))
            .map_err(|e| Error::io(folder.join(ADAPTER_CONFIG_FILE), e))
            .and_then(|text| {
                let path = folder.join(ADAPTER_WEIGHTS_FILE);
                let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
                Ok((text, bytes))
            });
        let vanished = matches!(
            &read,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        );
        if (vanished || folder_identity(&folder) != before) && attempt < 5 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let (text, bytes) = read?;
        break (folder, text, bytes);
    };
    let config_path = folder.join(ADAPTER_CONFIG_FILE);
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&config_path, format!("not valid JSON: {e}")))?;
    let (spec_base, listed) = parse_peft_config(&config_path, &json)?;

    let weights_path = folder.join(ADAPTER_WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::bad_file(&weights_path, format!("cannot read safetensors: {e}")))?;
    drop(bytes);
    if tensors.is_empty() {
        return Err(Error::bad_file(&weights_path, "holds no LoRA tensors"));
    }

    // Sort keys so that errors are reproducible.
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut unknown_modules = BTreeSet::new();
    let mut adapter_names = BTreeSet::new();
    // (layer, target) → (A, B) with their keys.
    type Slot = (Option<(String, Tensor)>, Option<(String, Tensor)>);
    let mut slots: BTreeMap<(usize, LoraTarget), Slot> = BTreeMap::new();
    for (key, tensor) in tensors {
        let parsed = match parse_key(&key) {
            Ok(parsed) => parsed,
            Err(KeyError::UnknownModule(module)) => {
                unknown_modules.insert(module);
                continue;
            }
            Err(KeyError::Unsupported) => {
                return Err(Error::bad_file(
                    &weights_path,
                    format!("tensor '{key}' is not a LoRA A or B weight verity can use"),
                ))
            }
        };
        adapter_names.insert(parsed.adapter_name.unwrap_or_default());
        let slot = slots.entry((parsed.layer, parsed.target)).or_default();
        let place = if parsed.b { &mut slot.1 } else { &mut slot.0 };
        if let Some((other, _)) = place {
            return Err(Error::bad_file(
                &weights_path,
                format!("tensors '{other}' and '{key}' are the same LoRA weight"),
            ));
        }
        *place = Some((key, tensor));
    }
    if !unknown_modules.is_empty() {
        let list: Vec<String> = unknown_modules.into_iter().collect();
        return Err(Error::bad_file(
            &weights_path,
            format!(
                "LoRA weights for modules verity does not have: {} (known: {})",
                list.join(", "),
                known_modules()
            ),
        ));
    }
    if adapter_names.len() > 1 {
        let list: Vec<String> = adapter_names
            .into_iter()
            .map(|n| if n.is_empty() { "(none)".into() } else { n })
            .collect();
        return Err(Error::bad_file(
            &weights_path,
            format!(
                "tensors of several adapters in one file: {}",
                list.join(", ")
            ),
        ));
    }

    // Which targets the config names, and which the tensors have.
    let present: BTreeSet<LoraTarget> = slots.keys().map(|&(_, t)| t).collect();
    let targets: Vec<LoraTarget> = match listed {
        Listed::Names(names) => {
            for t in &present {
                if !names.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} does not list",
                            t.module_name()
                        ),
                    ));
                }
            }
            for t in &names {
                if !present.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has no LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} lists",
                            t.module_name()
                        ),
                    ));
                }
            }
            names
        }
        Listed::Matching(matching) => {
            for t in &present {
                if !matching.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} does not match",
                            t.module_name()
                        ),
                    ));
                }
            }
            present.iter().copied().collect()
        }
    };
    let spec = LoraSpec {
        targets,
        ..spec_base
    };

    let mut pairs = Vec::with_capacity(slots.len());
    for ((layer, target), (a, b)) in slots {
        let name = target.module_name();
        if layer >= config.num_layers {
            let key = a.as_ref().or(b.as_ref()).map(|(k, _)| k.as_str());
            return Err(Error::bad_file(
                &weights_path,
                format!(
                    "tensor '{}' is for layer {layer}, but the model has {} layers",
                    key.unwrap_or_default(),
                    config.num_layers
                ),
            ));
        }
        let ((a_key, a), (b_key, b)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => {
                let (have, missing) = match (a, b) {
                    (Some((k, _)), _) => (k, "lora_B"),
                    (_, Some((k, _))) => (k, "lora_A"),
                    _ => (String::new(), "lora_A and lora_B"),
                };
                return Err(Error::bad_file(
                    &weights_path,
                    format!("layer {layer} {name} has '{have}' but no {missing} weight"),
                ));
            }
        };
        let (fan_in, fan_out) = target.dims(config);
        let expect = [
            (&a_key, &a, [spec.rank, fan_in], "rank × in_features"),
            (&b_key, &b, [fan_out, spec.rank], "out_features × rank"),
        ];
        for (key, t, want, what) in expect {
            if t.dims() != want {
                return Err(Error::bad_file(
                    &weights_path,
                    format!(
                        "tensor '{key}' has shape {:?}, but r = {} and the model config need {want:?} ({what} of {name})",
                        t.dims(),
                        spec.rank
                    ),
                ));
            }
        }
        let a = Var::from_tensor(&a.to_dtype(dtype)?.to_device(device)?)?;
        let b = Var::from_tensor(&b.to_dtype(dtype)?.to_device(device)?)?;
        pairs.push((layer, target, LoraPair { a, b }));
    }
    LoraAdapter::from_pairs(config, spec, pairs)
}

/// Which folder a path names now (a save replaces it by a new one): (device, inode).
#[cfg(unix)]
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn folder_identity(_dir: &Path) -> Option<(u64, u64)> {
    None
}

/// `dir`, or the old version set aside by a save that was interrupted between its renames.
fn resolve_dir(dir: &Path) -> Result<PathBuf> {
    match fs::symlink_metadata(dir) {
        Ok(_) => return Ok(dir.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dir, e)),
    }
    let leftovers = leftovers(dir).unwrap_or_default();
    let olds: Vec<&Leftover> = leftovers.iter().filter(|l| !l.tmp).collect();
    Ok(newest(&olds)
        .map(|l| l.path.clone())
        .unwrap_or_else(|| dir.to_path_buf()))
}

/// The target modules `adapter_config.json` names.
enum Listed {
    /// An explicit list: the file must have weights for exactly these.
    Names(Vec<LoraTarget>),
    /// A pattern (`"all-linear"`, a regular expression): weights must be among these.
    Matching(Vec<LoraTarget>),
}

/// Checks `adapter_config.json`; returns the spec (targets filled in later) and the targets.
fn parse_peft_config(path: &Path, json: &Value) -> Result<(LoraSpec, Listed)> {
    let bad = |reason: String| Error::bad_file(path, reason);
    if !json.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    match json.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(bad(format!(
                "peft_type is \"{other}\"; verity reads only LoRA adapters (\"LORA\")"
            )))
        }
        None => return Err(bad("missing peft_type (expected \"LORA\")".into())),
    }
    // Fields PEFT may leave out take PEFT's defaults.
    let rank = match json.get("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(format!("r must be a positive integer, found {v}")))?,
    };
    if rank == 0 {
        return Err(bad("r must be a positive integer, found 0".into()));
    }
    let rank = usize::try_from(rank).map_err(|_| bad(format!("r = {rank} is too large")))?;
    let alpha = match json.get("lora_alpha") {
        None => 8.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad(format!("lora_alpha must be a number, found {v}")))?,
    };
    let flag = |key: &str| -> Result<bool> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(format!("{key} must be true or false, found {v}"))),
        }
    };
    let use_rslora = flag("use_rslora")?;
    if flag("use_dora")? {
        return Err(bad("DoRA adapters (use_dora) are not supported".into()));
    }
    if flag("fan_in_fan_out")? {
        return Err(bad(
            "fan_in_fan_out adapters (transposed weights) are not supported".into(),
        ));
    }
    match json.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(bad(format!(
                "bias = {v}: LoRA biases are not supported (only \"none\")"
            )))
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        match json.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(bad(format!(
                    "{key} = {v}: per-module ranks and alphas are not supported"
                )))
            }
        }
    }
    match json.get("modules_to_save") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return Err(bad(format!(
                "modules_to_save = {v}: fully trained modules are not supported"
            )))
        }
    }

    let listed = match json.get("target_modules") {
        Some(Value::Array(items)) => {
            let mut targets = Vec::new();
            let mut unknown = Vec::new();
            for item in items {
                let Some(name) = item.as_str() else {
                    return Err(bad(format!(
                        "target_modules must hold strings, found {item}"
                    )));
                };
                match target_by_name(name) {
                    Some(t) if !targets.contains(&t) => targets.push(t),
                    Some(_) => {}
                    None => unknown.push(name.to_string()),
                }
            }
            if !unknown.is_empty() {
                return Err(bad(format!(
                    "target_modules names modules verity does not have: {} (known: {})",
                    unknown.join(", "),
                    known_modules()
                )));
            }
            if targets.is_empty() {
                return Err(bad("target_modules is empty".into()));
            }
            Listed::Names(targets)
        }
        Some(Value::String(s)) if s == "all-linear" => Listed::Matching(LoraTarget::ALL.to_vec()),
        Some(Value::String(pattern)) => {
            // PEFT full-matches a string against each module's name.
            let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                bad(format!(
                    "target_modules {pattern:?} is not a regular expression: {e}"
                ))
            })?;
            let matching: Vec<LoraTarget> = LoraTarget::ALL
                .into_iter()
                .filter(|t| re.is_match(&format!("model.layers.0.{}", t.module_path())))
                .collect();
            if matching.is_empty() {
                return Err(bad(format!(
                    "target_modules {pattern:?} matches none of verity's modules ({})",
                    known_modules()
                )));
            }
            Listed::Matching(matching)
        }
        None | Some(Value::Null) => {
            return Err(bad("missing target_modules".into()));
        }
        Some(v) => {
            return Err(bad(format!(
                "target_modules must be a list of names or a pattern, found {v}"
            )))
        }
    };
    let spec = LoraSpec {
        rank,
        alpha,
        targets: Vec::new(),
        use_rslora,
    };
    Ok((spec, listed))
}

/// A `target_modules` entry: the module name or a dotted suffix of its path.
fn target_by_name(name: &str) -> Option<LoraTarget> {
    LoraTarget::ALL.into_iter().find(|t| {
        let path = format!("model.layers.0.{}", t.module_path());
        name == t.module_name() || path.ends_with(&format!(".{name}"))
    })
}

fn known_modules() -> String {
    LoraTarget::ALL
        .iter()
        .map(|t| t.module_name())
        .collect::<Vec<_>>()
        .join(", ")
}

struct ParsedKey {
    layer: usize,
    target: LoraTarget,
    b: bool,
    adapter_name: Option<String>,
}

enum KeyError {
    /// A LoRA weight of a module verity does not have (named as in the key).
    UnknownModule(String),
    /// Not a LoRA A/B weight at all (DoRA magnitudes, biases, embeddings, …).
    Unsupported,
}

/// Parses `[base_model.model.]model.layers.{N}.{module_path}.lora_{A,B}[.{adapter}].weight`.
fn parse_key(key: &str) -> std::result::Result<ParsedKey, KeyError> {
    let body = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    // Split "<module>.lora_X[.<adapter>].weight".
    let (module, b, tail) = match (body.rfind(".lora_A."), body.rfind(".lora_B.")) {
        (Some(i), None) => (&body[..i], false, &body[i + ".lora_A.".len()..]),
        (None, Some(i)) => (&body[..i], true, &body[i + ".lora_B.".len()..]),
        _ => return Err(KeyError::Unsupported),
    };
    let adapter_name = match tail {
        "weight" => None,
        t => match t.strip_suffix(".weight") {
            Some(name) if !name.is_empty() && !name.contains('.') => Some(name.to_string()),
            _ => return Err(KeyError::Unsupported),
        },
    };
    let unknown = || {
        // Name the module without the layer prefix: "self_attn.rotary", "lm_head".
        let short = module
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .map(|(_, m)| m)
            .unwrap_or(module);
        KeyError::UnknownModule(short.to_string())
    };
    let Some(rest) = module.strip_prefix("model.layers.") else {
        return Err(unknown());
    };
    let Some((layer, path)) = rest.split_once('.') else {
        return Err(unknown());
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Err(unknown());
    };
    let Some(target) = LoraTarget::ALL
        .into_iter()
        .find(|t| t.module_path() == path)
    else {
        return Err(unknown());
    };
    Ok(ParsedKey {
        layer,
        target,
        b,
        adapter_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        let k = parse_key("base_model.model.model.layers.12.mlp.up_proj.lora_B.default.weight")
            .ok()
            .expect("parses");
        assert_eq!(
            (k.layer, k.target, k.b, k.adapter_name.as_deref()),
            (12, LoraTarget::Up, true, Some("default"))
        );
        let k = parse_key(&peft_key(3, LoraTarget::O, false))
            .ok()
            .expect("parses");
        assert_eq!((k.layer, k.target, k.b), (3, LoraTarget::O, false));
        assert!(matches!(
            parse_key("base_model.model.lm_head.lora_A.weight"),
            Err(KeyError::UnknownModule(m)) if m == "lm_head"
        ));
        assert!(matches!(
            parse_key("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"),
            Err(KeyError::UnknownModule(m)) if m == "self_attn.rotary"
        ));
        assert!(matches!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
            Err(KeyError::Unsupported)
        ));
    }

    #[test]
    fn target_names() {
        assert_eq!(target_by_name("q_proj"), Some(LoraTarget::Q));
        assert_eq!(target_by_name("mlp.down_proj"), Some(LoraTarget::Down));
        assert_eq!(target_by_name("proj"), None);
        assert_eq!(target_by_name("lm_head"), None);
    }
}
