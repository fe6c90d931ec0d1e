//! Writing into a directory that cannot be written: one line naming the path, exit code 2, no
//! panic, and the file already there untouched.
//!
//! The tests often run as root (here, and in CI containers), and root ignores permission bits,
//! so `chmod 0555` alone proves nothing. Each way of making a directory really read-only is
//! tried, and every one that works is used:
//!
//! * `chmod 0555` — for an ordinary user;
//! * `chattr +i` — an immutable directory, even for root (needs CAP_LINUX_IMMUTABLE and a file
//!   system with the flag: ext4, xfs, btrfs, tmpfs);
//! * a read-only bind mount in a private mount namespace (`unshare -m`, or `unshare -rm` as an
//!   ordinary user where user namespaces are allowed), wrapped around the command.
//!
//! Each is probed first: a write into the directory must fail. If none works on a machine, the
//! test says so on stderr and checks nothing (set `MNISTCONV_REQUIRE_READ_ONLY=1` to make that a
//! failure instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_mnistconv");

/// How the directory is made read-only.
enum Mechanism {
    Chmod,
    Immutable,
    /// The `unshare` flags (`-m` or `-rm`).
    Mount(&'static str),
}

impl Mechanism {
    fn name(&self) -> String {
        match self {
            Mechanism::Chmod => "chmod 0555".into(),
            Mechanism::Immutable => "chattr +i".into(),
            Mechanism::Mount(f) => format!("read-only bind mount (unshare {f})"),
        }
    }

    /// A command running `prog args` with `dir` read-only.
    fn command(&self, dir: &Path, prog: &str) -> Command {
        match self {
            Mechanism::Chmod | Mechanism::Immutable => Command::new(prog),
            Mechanism::Mount(flags) => {
                let mut c = Command::new("unshare");
                c.args([
                    *flags,
                    "sh",
                    "-c",
                    // Exit 97 if the mount cannot be made, so a probe cannot mistake it for a
                    // refused write.
                    r#"mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" || exit 97; exec "$@""#,
                ])
                .arg(dir)
                .arg(prog);
                c
            }
        }
    }

    /// Makes `dir` read-only (for the in-process mechanisms), then checks that a file cannot be
    /// created in it, and that the failure is the directory's. `false` if this mechanism does
    /// not work here (and `dir` is left as it was).
    fn apply_and_probe(&self, dir: &Path) -> bool {
        let probe = dir.join("probe");
        let ok = match self {
            Mechanism::Chmod => {
                set_mode(dir, 0o555);
                std::fs::write(&probe, b"x").is_err()
            }
            Mechanism::Immutable => {
                let set = Command::new("chattr")
                    .arg("+i")
                    .arg(dir)
                    .output()
                    .is_ok_and(|o| o.status.success());
                set && std::fs::write(&probe, b"x").is_err()
            }
            Mechanism::Mount(_) => {
                let o = self.command(dir, "touch").arg(&probe).output();
                o.is_ok_and(|o| {
                    o.status.code() == Some(1)
                        && String::from_utf8_lossy(&o.stderr).contains("Read-only file system")
                })
            }
        };
        let ok = ok && !probe.exists();
        if !ok {
            self.undo(dir);
            let _ = std::fs::remove_file(&probe);
        }
        ok
    }

    fn undo(&self, dir: &Path) {
        match self {
            Mechanism::Chmod => set_mode(dir, 0o755),
            Mechanism::Immutable => {
                let _ = Command::new("chattr").arg("-i").arg(dir).output();
            }
            Mechanism::Mount(_) => {}
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Undoes the mechanism even if an assertion fails, so the directory can be removed.
struct Guard<'a>(&'a Mechanism, &'a Path);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.undo(self.1);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The files of `dir` with their bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn writing_into_a_read_only_directory_is_one_clear_error_and_keeps_the_old_file() {
    let base = std::env::temp_dir().join(format!("mnistconv-ro-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // A model to start from (also the "previous" files of the read-only directory).
    let model = base.join("model.safetensors");
    let o = Command::new(BIN)
        .args([
            "train", "--epochs", "1", "--limit", "200", "--quiet", "--out",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ck_src = base.join("ck");
    let o = Command::new(BIN)
        .args(["train", "--epochs", "1", "--limit", "200", "--quiet"])
        .arg("--checkpoint-dir")
        .arg(&ck_src)
        .arg("--out")
        .arg(base.join("unused.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let old_ckpt = std::fs::read_dir(&ck_src)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    let mut used = Vec::new();
    for mech in [
        Mechanism::Chmod,
        Mechanism::Immutable,
        Mechanism::Mount("-m"),
        Mechanism::Mount("-rm"),
    ] {
        let ro = base.join(format!("ro-{}", used.len()));
        std::fs::create_dir_all(&ro).unwrap();
        let old_model = ro.join("model.safetensors");
        std::fs::copy(&model, &old_model).unwrap();
        std::fs::write(ro.join("trace.safetensors"), b"the previous trace").unwrap();
        std::fs::write(ro.join("model.onnx"), b"the previous export").unwrap();
        std::fs::copy(&old_ckpt, ro.join(old_ckpt.file_name().unwrap())).unwrap();
        let before = snapshot(&ro);
        if !mech.apply_and_probe(&ro) {
            eprintln!("{}: does not make a read-only directory here", mech.name());
            std::fs::remove_dir_all(&ro).unwrap();
            continue;
        }
        let _guard = Guard(&mech, &ro);
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let elsewhere = base.join("elsewhere.safetensors");
        // (what, arguments, the path the error must name)
        let cases: Vec<(&str, Vec<String>, PathBuf)> = vec![
            (
                "train --out (over a previous model)",
                [
                    "train", "--epochs", "1", "--limit", "200", "--quiet", "--out",
                ]
                .map(String::from)
                .into_iter()
                .chain([s(&old_model)])
                .collect(),
                old_model.clone(),
            ),
            (
                "train --out (a new file)",
                [
                    "train", "--epochs", "1", "--limit", "200", "--quiet", "--out",
                ]
                .map(String::from)
                .into_iter()
                .chain([s(&ro.join("new.safetensors"))])
                .collect(),
                ro.join("new.safetensors"),
            ),
            (
                "train --checkpoint-dir (holding a previous checkpoint)",
                ["train", "--epochs", "1", "--limit", "200", "--quiet"]
                    .map(String::from)
                    .into_iter()
                    .chain([
                        "--checkpoint-dir".into(),
                        s(&ro),
                        "--out".into(),
                        s(&elsewhere),
                    ])
                    .collect(),
                ro.clone(),
            ),
            (
                "train --checkpoint-dir (a new subdirectory)",
                ["train", "--epochs", "1", "--limit", "200", "--quiet"]
                    .map(String::from)
                    .into_iter()
                    .chain([
                        "--checkpoint-dir".into(),
                        s(&ro.join("sub")),
                        "--out".into(),
                        s(&elsewhere),
                    ])
                    .collect(),
                ro.join("sub"),
            ),
            (
                "train --resume (a read-only checkpoint directory)",
                ["train", "--epochs", "2", "--limit", "200", "--quiet"]
                    .map(String::from)
                    .into_iter()
                    .chain(["--resume".into(), s(&ro), "--out".into(), s(&elsewhere)])
                    .collect(),
                ro.clone(),
            ),
            (
                "explain --out (over a previous trace)",
                ["explain", "--index", "4", "--out"]
                    .map(String::from)
                    .into_iter()
                    .chain([s(&ro.join("trace.safetensors"))])
                    .collect(),
                ro.join("trace.safetensors"),
            ),
            (
                "export --onnx (over a previous export)",
                ["export", "--model"]
                    .map(String::from)
                    .into_iter()
                    .chain([s(&model), "--onnx".into(), s(&ro.join("model.onnx"))])
                    .collect(),
                ro.join("model.onnx"),
            ),
        ];
        for (what, args, named) in cases {
            let o = mech.command(&ro, BIN).args(&args).output().unwrap();
            let e = stderr(&o);
            let ctx = format!("{} / {what}", mech.name());
            assert_eq!(o.status.code(), Some(2), "{ctx}: {e}");
            assert!(!e.contains("panicked"), "{ctx}: {e}");
            assert_eq!(e.trim().lines().count(), 1, "{ctx}: one line: {e}");
            let line = e.trim();
            assert!(
                line.starts_with(&format!("error: {}: ", named.display())),
                "{ctx}: names {}: {e}",
                named.display()
            );
            assert!(
                [
                    "Read-only file system",
                    "Permission denied",
                    "Operation not permitted"
                ]
                .iter()
                .any(|m| line.contains(m)),
                "{ctx}: says why: {e}"
            );
            assert!(!elsewhere.exists(), "{ctx}: nothing trained and saved");
            assert_eq!(snapshot(&ro), before, "{ctx}: the directory is untouched");
        }
        eprintln!("{}: read-only, every write refused cleanly", mech.name());
        used.push(mech.name());
        drop(_guard);
        std::fs::remove_dir_all(&ro).unwrap();
    }
    std::fs::remove_dir_all(&base).unwrap();
    eprintln!("read-only mechanisms used: {used:?}");
    if used.is_empty() {
        eprintln!(
            "SKIPPED: no way to make a read-only directory on this machine (root without \
             CAP_LINUX_IMMUTABLE and without mount namespaces)"
        );
        assert!(
            std::env::var_os("MNISTCONV_REQUIRE_READ_ONLY").is_none(),
            "MNISTCONV_REQUIRE_READ_ONLY is set"
        );
    }
}
