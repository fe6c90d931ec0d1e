//! Writing files so that a crash or a full disk never leaves a half-written file behind.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: to a temporary file in the same directory, flushed to
/// disk (fsync), then renamed over `path`. On any error the temporary file is removed and
/// whatever `path` held before is untouched.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    // A path that names something other than a regular file (a device such as /dev/full or
    // /dev/stdout, a pipe) is written in place: renaming over it would replace the device.
    if let Ok(m) = std::fs::metadata(path) {
        if m.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        if !m.is_file() {
            let r = (|| {
                let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
                f.write_all(bytes)?;
                f.flush()
            })();
            return r.map_err(|e| Error::io(path, e));
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort: not every platform can open a directory).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = std::env::temp_dir().join(format!("mnistconv-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.bin");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        let e = atomic_write(&dir.join("missing/x"), b"z")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A device is written in place, never replaced: /dev/full reports "no space", and stays
    /// a device.
    #[test]
    fn a_full_device_reports_the_error_and_stays_a_device() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let e = atomic_write(full, &[0u8; 1 << 16]).unwrap_err().to_string();
        assert!(
            e.contains("/dev/full") && e.to_lowercase().contains("space"),
            "{e}"
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::metadata(full)
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }
}
