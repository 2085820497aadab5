//! Opening the files a user names (model, tokenizer, configs, adapters) safely: each must be
//! a regular file (a FIFO would block the open forever, a device such as `/dev/zero` never
//! ends) no larger than its kind can be, so a wrong or hostile path costs an error naming
//! it, not a hang or all the memory.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Largest JSON configuration read (`config.json`, `adapter_config.json`,
/// `tokenizer_config.json` with its chat template, a runtime config).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Largest `tokenizer.json` read (the largest vocabularies in use are about 35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// Opens `path` for reading if it is a regular file (links followed) of at most
/// `max_bytes`; returns it with its size. The type is checked on the open file, so a path
/// swapped between a check and the open cannot slip through, and the open itself does not
/// wait for a FIFO's writer.
pub fn open_regular(path: &Path, max_bytes: u64) -> Result<(File, u64)> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::bad_file(
            path,
            format!("not a regular file (a {})", kind_of(&meta.file_type())),
        ));
    }
    if meta.len() > max_bytes {
        return Err(Error::bad_file(
            path,
            format!(
                "{} bytes, more than the {max_bytes} such a file can have",
                meta.len()
            ),
        ));
    }
    Ok((file, meta.len()))
}

/// Checks `path` as [`open_regular`] does, for files another library opens by name.
pub fn check_regular(path: &Path, max_bytes: u64) -> Result<u64> {
    open_regular(path, max_bytes).map(|(_, len)| len)
}

/// The bytes of a regular file of at most `max_bytes` (also if it grows while read).
pub fn read(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, max_bytes)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(Error::bad_file(
            path,
            format!("grew past {max_bytes} bytes while it was read"),
        ));
    }
    Ok(bytes)
}

/// The text of a regular UTF-8 file of at most `max_bytes`.
pub fn read_to_string(path: &Path, max_bytes: u64) -> Result<String> {
    String::from_utf8(read(path, max_bytes)?)
        .map_err(|e| Error::bad_file(path, format!("not UTF-8 text: {e}")))
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if t.is_dir() {
        "folder"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_their_bound_are_read() {
        let dir = std::env::temp_dir().join(format!("verity-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.json");
        std::fs::write(&file, b"{\"x\": 1}").unwrap();
        assert_eq!(read_to_string(&file, 8).unwrap(), "{\"x\": 1}");
        let err = read(&file, 7).unwrap_err().to_string();
        assert!(err.contains("8 bytes, more than the 7"), "{err}");
        let err = read(&dir, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("not a regular file (a folder)"), "{err}");
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&file, 8)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        #[cfg(unix)]
        {
            // A link to an endless device, and a FIFO nobody writes to: refused at once.
            let link = dir.join("zero");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let err = read(&link, u64::MAX).unwrap_err().to_string();
            assert!(err.contains("character device"), "{err}");
            let fifo = dir.join("fifo");
            let _ = std::fs::remove_file(&fifo);
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let err = read(&fifo, 1 << 20).unwrap_err().to_string();
            assert!(err.contains("FIFO"), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
