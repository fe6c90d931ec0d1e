//! Writing files so that a crash or a full disk never leaves a half-written file behind.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: to a temporary file in the same directory, flushed to
/// disk (fsync), then renamed over `path`. On any error the temporary file is removed and
/// whatever `path` held before is untouched.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, bytes, &|_| {})
}

/// As [`atomic_write`], calling `at(stage)` at the stages `"before-temp"`, `"mid-temp"` (half the
/// bytes written to the temporary file) and `"before-rename"` (all written and synced), for
/// [`fault_pause`].
pub(crate) fn atomic_write_with(path: &Path, bytes: &[u8], at: &dyn Fn(&str)) -> Result<()> {
    // A path that names something other than a regular file (a device such as /dev/full or
    // /dev/stdout, a pipe) is written in place: renaming over it would replace the device.
    if is_special(path)? {
        let r = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
            f.write_all(bytes)?;
            f.flush()
        })();
        return r.map_err(|e| Error::io(path, e));
    }
    let (dir, tmp) = temp_path(path);
    let result = (|| {
        at("before-temp");
        let mut f = std::fs::File::create(&tmp)?;
        let (first, rest) = bytes.split_at(bytes.len() / 2);
        f.write_all(first)?;
        at("mid-temp");
        f.write_all(rest)?;
        f.sync_all()?;
        drop(f);
        at("before-rename");
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

/// The directory of `path`, and the temporary file [`atomic_write`] writes there.
fn temp_path(path: &Path) -> (&Path, std::path::PathBuf) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}{TEMP_INFIX}{}", std::process::id()));
    (dir, tmp)
}

/// Whether `path` exists as something other than a regular file or a directory (a device, a
/// pipe), which is written in place; a directory is an error naming `path`.
fn is_special(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        )),
        Ok(m) => Ok(!m.is_file()),
        Err(_) => Ok(false),
    }
}

/// Checks, before a long computation, that [`atomic_write`] could write `path`, by creating
/// and removing the temporary file it would use (a device or other non-regular file, written in
/// place, is not checked). The error names `path`, as [`atomic_write`]'s would.
pub fn check_writable(path: &Path) -> Result<()> {
    if is_special(path)? {
        return Ok(());
    }
    let (_, tmp) = temp_path(path);
    std::fs::File::create(&tmp).map_err(|e| Error::io(path, e))?;
    std::fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))
}

/// Creates `dir` if needed and checks that files can be written in it (as [`check_writable`]);
/// the error names `dir`.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".write-check{TEMP_INFIX}{}", std::process::id()));
    std::fs::File::create(&probe).map_err(|e| Error::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))
}

/// A temporary file of [`atomic_write`] is `.NAME.tmpPID` beside `NAME`.
const TEMP_INFIX: &str = ".tmp";

/// If `file_name` is a temporary file of [`atomic_write`] (`.NAME.tmpPID`), the `NAME` it was
/// to become.
pub fn temp_target(file_name: &str) -> Option<&str> {
    let (name, pid) = file_name.strip_prefix('.')?.rsplit_once(TEMP_INFIX)?;
    (!name.is_empty() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// The environment variable of the fault-injection hook (see `fault_pause` in this module).
pub const FAULT_PAUSE_VAR: &str = "MNISTCONV_FAULT_PAUSE";

/// Fault injection, for the tests that kill a run in the middle of writing a checkpoint.
///
/// When `MNISTCONV_FAULT_PAUSE` is `STAGE@N` (or `STAGE`, meaning `STAGE@1`) and this is the
/// `N`-th training checkpoint this process writes (`write`, 1-based), reaching `stage` prints
/// `mnistconv: fault pause at STAGE, checkpoint write N` on stderr and sleeps 60 s (then goes
/// on), so that a test can SIGKILL the process there. The stages, in order: `before-temp`,
/// `mid-temp` (half the bytes in the temporary file), `before-rename` (temporary file complete
/// and synced), `after-rename-before-prune` (the new checkpoint in place, the older ones not yet
/// removed). With the variable unset (or naming another stage or write) it does nothing.
pub(crate) fn fault_pause(stage: &str, write: usize) {
    let Some(v) = std::env::var_os(FAULT_PAUSE_VAR) else {
        return;
    };
    let v = v.to_string_lossy();
    let (want, n) = match v.split_once('@') {
        Some((s, n)) => (s, n.parse::<usize>().ok()),
        None => (&*v, Some(1)),
    };
    if want == stage && n == Some(write) {
        eprintln!("mnistconv: fault pause at {stage}, checkpoint write {write}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
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
        assert_eq!(temp_target(".f.bin.tmp123"), Some("f.bin"));
        for not in ["f.bin", ".f.bin", ".f.bin.tmp", ".f.bin.tmp12x", "..tmp1"] {
            assert_eq!(temp_target(not), None, "{not}");
        }
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
