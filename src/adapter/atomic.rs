//! Crash-safe replacement of a folder or a file, and reading a folder that may be replaced
//! meanwhile. Knows nothing of what the folder holds: its caller names the files it may
//! contain ([`Contents`]) and writes them ([`FolderWriter`]).
//!
//! A folder `DIR` is replaced by writing the new contents into a temporary sibling
//! (`DIR.tmp-<pid>-<n>`), syncing it, and renaming it over the destination; an existing
//! destination is first renamed aside (`DIR.old-<pid>-<n>`) and removed once the new one is
//! in place. A crash at any point therefore leaves a complete old or a complete new version:
//! [`read_consistent`] reads the set-aside old one if the crash came between the two renames,
//! and the next replace (or [`recover`]) puts things back in order and removes what the crash
//! left behind. A file is replaced the same way, without the step aside ([`replace_file`]).
//!
//! One writer per destination at a time: replaces within a process are serialized by
//! [`lock`], but two processes writing the same destination at once are not supported.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// Serializes the replaces of this process (recovery must not see another thread's
/// temporary folder as stale).
static LOCK: Mutex<()> = Mutex::new(());
/// Makes temporary names unique within this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Proof that this thread holds the process-wide replace lock (see [`lock`]).
pub(super) struct Locked {
    _guard: MutexGuard<'static, ()>,
}

/// Takes the process-wide replace lock; the functions that write pass it on, so that a
/// caller can make several replaces one step (a version folder, then the file naming it).
pub(super) fn lock() -> Locked {
    Locked {
        _guard: LOCK.lock().unwrap_or_else(|e| e.into_inner()),
    }
}

/// What a replaceable folder may hold.
pub(super) struct Contents<'a> {
    /// For error messages, e.g. "a PEFT adapter".
    pub what: &'a str,
    /// The only entries, all plain files, an existing destination may have for a replace
    /// to delete it; anything else makes the replace an error, so that a wrong path cannot
    /// delete unrelated data.
    pub files: &'a [&'a str],
}

/// The points of a folder replace after the new contents are written.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step<'a> {
    /// The new contents and the temporary folder holding them synced.
    Synced(&'a Path),
    /// The previous destination renamed aside to this path; the new one not yet in place.
    OldMovedAside(&'a Path),
    /// The new version renamed into place (an error from here on is reported, but the new
    /// version stays); the old one not yet removed.
    Committed(&'a Path),
}

/// Fills the temporary folder of a replace.
pub(super) trait FolderWriter {
    /// Writes the new contents into the fresh, empty folder `tmp`, each file synced.
    fn write(&mut self, tmp: &Path) -> Result<()>;

    /// Called at each [`Step`] (tests make a replace fail or crash there); an error aborts
    /// the replace as a failure of that step would.
    fn step(&mut self, _step: Step<'_>) -> std::io::Result<()> {
        Ok(())
    }
}

/// Replaces the folder `dir` (or creates it, and its parent) with what `writer` writes.
/// An existing `dir` must hold nothing but `contents.files`.
pub(super) fn replace_dir(
    lock: &Locked,
    dir: &Path,
    contents: &Contents<'_>,
    writer: &mut dyn FolderWriter,
) -> Result<()> {
    let (parent, name) = split_dir(dir)?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    recover_locked(lock, dir)?;
    let replace = match fs::symlink_metadata(dir) {
        Ok(_) => {
            check_replaceable(dir, contents)?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(dir, e)),
    };

    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tmp = parent.join(format!("{name}.tmp-{pid}-{n}"));
    if let Err(e) = write_tmp(&tmp, writer) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let aside = parent.join(format!("{name}.old-{pid}-{n}"));
    if replace {
        let moved = fs::rename(dir, &aside)
            .map_err(|e| Error::io(dir, e))
            .and_then(|()| sync_dir(&parent))
            .and_then(|()| {
                writer
                    .step(Step::OldMovedAside(&aside))
                    .map_err(|e| Error::io(dir, e))
            });
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
    let committed = writer
        .step(Step::Committed(dir))
        .map_err(|e| Error::io(dir, e));
    if replace {
        remove_dir_if_present(&aside)?;
        sync_dir(&parent)?;
    }
    committed
}

/// Creates `tmp`, has `writer` fill it and syncs it.
fn write_tmp(tmp: &Path, writer: &mut dyn FolderWriter) -> Result<()> {
    fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    writer.write(tmp)?;
    sync_dir(tmp)?;
    writer
        .step(Step::Synced(tmp))
        .map_err(|e| Error::io(tmp, e))
}

/// Refuses to replace anything but a folder holding (some of) `contents.files`.
fn check_replaceable(dir: &Path, contents: &Contents<'_>) -> Result<()> {
    let meta = fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a folder; not replacing it with {}",
            dir.display(),
            contents.what
        )));
    }
    let mut foreign = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let known = contents.files.iter().any(|f| name == *f);
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !known || !is_file {
            foreign.push(name.to_string_lossy().into_owned());
        }
    }
    if !foreign.is_empty() {
        foreign.sort();
        return Err(Error::InvalidArgument(format!(
            "{} holds more than {} ({}); not replacing it",
            dir.display(),
            contents.what,
            foreign.join(", ")
        )));
    }
    Ok(())
}

/// Finishes or rolls back a save of `dir` that a crash interrupted: puts a set-aside old
/// version back if no new one reached `dir`, and removes set-aside old versions and the
/// temporary folders of processes that no longer run. Saves do this themselves first.
pub fn recover(dir: &Path) -> Result<()> {
    recover_locked(&lock(), dir)
}

fn recover_locked(_lock: &Locked, dir: &Path) -> Result<()> {
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
        // Replaces of this process hold the lock, so its own temporaries are stale too.
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

/// Reads the folder `dir` with `read`, which a replace may swap out while it runs: reads
/// again if the folder changed under it or a file vanished (a rename in progress), so that
/// everything read comes from the same, complete version. If `dir` is missing because a
/// replace was interrupted between its two renames, the old version set aside beside it is
/// read. Returns the folder read and what `read` returned; an error, never a mixed read,
/// if the folder kept changing for [`READ_PATIENCE`].
pub(super) fn read_consistent<T>(
    dir: &Path,
    mut read: impl FnMut(&Path) -> Result<T>,
) -> Result<(PathBuf, T)> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    let mut missing = 0;
    loop {
        let folder = resolve_dir(dir)?;
        let before = folder_identity(&folder);
        let result = read(&folder);
        let vanished = matches!(
            &result,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        );
        let changed = folder_identity(&folder) != before;
        if !(vanished || changed) {
            return Ok((folder, result?));
        }
        // A file missing from a folder that did not change is most likely just missing:
        // a few quick tries, not the whole patience.
        missing += usize::from(vanished && !changed);
        if missing >= 5 {
            return Ok((folder, result?));
        }
        if started.elapsed() >= READ_PATIENCE {
            if changed {
                return Err(Error::Unavailable(format!(
                    "{} was replaced during every read for {} s",
                    dir.display(),
                    READ_PATIENCE.as_secs()
                )));
            }
            return Ok((folder, result?));
        }
        // (A replace is two renames: a busy writer or a descheduled reader may need
        // several tries.)
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
}

/// How long [`read_consistent`] keeps trying to read one whole version.
const READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Which folder a path names now (a replace puts a new one there): (device, inode).
#[cfg(unix)]
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn folder_identity(_dir: &Path) -> Option<(u64, u64)> {
    None
}

/// `dir`, or the old version set aside by a replace that was interrupted between its renames.
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

/// Replaces the file `path` with `bytes`: a temporary file `PATH.tmp-<pid>-<n>` beside it,
/// synced, renamed over it, and the folder synced.
pub(super) fn replace_file(_lock: &Locked, path: &Path, bytes: &[u8]) -> Result<()> {
    let (folder, name) = split_dir(path)?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = folder.join(format!("{name}.tmp-{}-{n}", std::process::id()));
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&folder)
}

/// Removes the temporary files that [`replace_file`] of `path` left in processes that no
/// longer run (or in this one, whose replaces hold the lock).
pub(super) fn remove_stale_file_temps(_lock: &Locked, path: &Path) -> Result<()> {
    let (folder, name) = split_dir(path)?;
    let prefix = format!("{name}.tmp-");
    let me = std::process::id();
    for entry in fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))? {
        let entry = entry.map_err(|e| Error::io(&folder, e))?;
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

/// (parent folder, final component as UTF-8) of a path to replace.
fn split_dir(path: &Path) -> Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "'{}' needs a final UTF-8 name component",
                path.display()
            ))
        })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string()))
}

/// Makes a written file durable.
pub(super) fn sync_file(path: &Path) -> Result<()> {
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
