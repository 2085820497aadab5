//! Adapter folders named by clients that must stay inside one root (the HTTP API's
//! `/v1/adapters`): relative paths of plain components, resolved through symbolic links
//! that must not lead out. Rust and C hosts name whatever folder they like.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// `requested` as a folder inside `root`. Refuses an empty path, a NUL byte, an absolute
/// path, `..` or `.` components, and a path whose existing part leaves `root` through a
/// symbolic link. Returns the path with its existing part resolved.
pub fn confine(root: &Path, requested: &Path) -> Result<PathBuf> {
    let shown = requested.display();
    if requested.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(
            "the adapter path is empty (name a folder inside the adapter root)".into(),
        ));
    }
    if requested.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(Error::InvalidArgument(
            "the adapter path holds a NUL byte".into(),
        ));
    }
    if !requested
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(Error::InvalidArgument(format!(
            "adapter path '{shown}' must be relative to the adapter root, without '..' or '.'"
        )));
    }
    let base = resolved(root);
    let path = resolved(&root.join(requested));
    if !path.starts_with(&base) {
        return Err(Error::InvalidArgument(format!(
            "adapter path '{shown}' leads out of the adapter root through a symbolic link"
        )));
    }
    Ok(path)
}

/// `p` with its longest existing prefix canonicalized (symbolic links followed) and the
/// rest, which does not exist yet, appended as given.
fn resolved(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest: Vec<OsString> = Vec::new();
    loop {
        if let Ok(mut canonical) = existing.canonicalize() {
            canonical.extend(rest.iter().rev());
            return canonical;
        }
        match existing.file_name() {
            Some(name) => rest.push(name.to_owned()),
            None => return p.to_path_buf(),
        }
        if !existing.pop() {
            return p.to_path_buf();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let root = std::env::temp_dir().join(format!("verity-confine-{}", std::process::id()));
        let outside = root.with_extension("outside");
        std::fs::create_dir_all(root.join("kept/v1")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let canonical = root.canonicalize().unwrap();
        // Existing and not-yet-existing folders inside the root.
        assert_eq!(
            confine(&root, Path::new("kept/v1")).unwrap(),
            canonical.join("kept/v1")
        );
        assert_eq!(
            confine(&root, Path::new("new/deeper")).unwrap(),
            canonical.join("new/deeper")
        );
        for bad in ["", "/", "/etc", "../x", "kept/../../x", "./kept", "a\0b"] {
            let err = confine(&root, Path::new(bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
        }
        // A link inside the root that points out of it, and paths through it.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
            for bad in ["escape", "escape/v1"] {
                let err = confine(&root, Path::new(bad)).unwrap_err();
                assert!(err.to_string().contains("symbolic link"), "{bad}: {err}");
            }
            // A link that stays inside is fine.
            std::os::unix::fs::symlink(root.join("kept"), root.join("alias")).unwrap();
            assert_eq!(
                confine(&root, Path::new("alias/v1")).unwrap(),
                canonical.join("kept/v1")
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
