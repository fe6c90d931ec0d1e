//! Resuming: a run continued from any checkpoint ends with the weights of the run never
//! interrupted, bit for bit — in the library, and across a process killed with SIGKILL.

use mnistconv::mnist::embedded;
use mnistconv::train::{self, Event, TrainConfig, TrainState};
use mnistconv::{NetConfig, Params};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn resumed_from_any_checkpoint_equals_uninterrupted() {
    let cfg = NetConfig::default();
    let data = embedded::train().slice(0..700);
    for tc in [
        TrainConfig {
            epochs: 3,
            batch: 50,
            ..TrainConfig::default_recipe()
        },
        TrainConfig {
            epochs: 2,
            batch: 64,
            ..TrainConfig::book()
        },
    ] {
        let init = Params::init(&cfg, tc.init, tc.seed);
        let mut snaps: Vec<TrainState> = Vec::new();
        let mut full = TrainState::new(&cfg, init.clone());
        train::train_from(&cfg, &tc, &mut full, &data, None, None, 4, |ev| {
            if let Event::Checkpoint(s) = ev {
                snaps.push(s.clone());
            }
            Ok(())
        })
        .unwrap();
        assert!(
            snaps.len() >= 3 * tc.epochs,
            "mid-epoch and epoch-end checkpoints: {}",
            snaps.len()
        );
        assert!(snaps.iter().any(|s| s.step > 0) && snaps.iter().any(|s| s.step == 0));
        // Without checkpoints the same.
        let mut plain = init.clone();
        train::train(&cfg, &tc, &mut plain, &data, None, None, |_| Ok(())).unwrap();
        assert_eq!(plain, full.params);
        for snap in snaps.iter().step_by(3) {
            let mut s = snap.clone();
            let h = train::train_from(&cfg, &tc, &mut s, &data, None, None, 0, |_| Ok(())).unwrap();
            assert_eq!(
                s.params, full.params,
                "resumed from epoch {} step {}",
                snap.epoch, snap.step
            );
            assert_eq!(h.len(), tc.epochs);
        }
    }
}

#[test]
fn killed_with_sigkill_then_resumed_equals_uninterrupted() {
    let bin = env!("CARGO_BIN_EXE_mnistconv");
    let d = std::env::temp_dir().join(format!("mnistconv-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ck = d.join("ck");
    let common = [
        "train",
        "--epochs",
        "6",
        "--limit",
        "3000",
        "--batch",
        "50",
        "--threads",
        "1",
    ];
    // The run to be killed: checkpoints every 7 steps; killed once one mid-epoch checkpoint of
    // epoch ≥ 2 exists, i.e. in the middle of the run (and possibly in the middle of a write).
    let mut child = Command::new(bin)
        .args(common)
        .args([
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--checkpoint-every",
            "7",
            "--quiet",
            "--out",
        ])
        .arg(d.join("killed.safetensors"))
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let late = std::fs::read_dir(&ck)
            .map(|r| {
                r.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("ckpt-e0002-s0000")
                })
            })
            .unwrap_or(false);
        if late || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before it could be killed"
    );
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        !d.join("killed.safetensors").exists(),
        "the killed run never finished"
    );

    let o = Command::new(bin)
        .args(common)
        .args(["--resume", ck.to_str().unwrap(), "--out"])
        .arg(d.join("resumed.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resuming from"));
    let o = Command::new(bin)
        .args(common)
        .arg("--out")
        .arg(d.join("straight.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let a = mnistconv::checkpoint::load(&d.join("resumed.safetensors")).unwrap();
    let b = mnistconv::checkpoint::load(&d.join("straight.safetensors")).unwrap();
    assert_eq!(
        a.params, b.params,
        "resumed weights differ from the uninterrupted run's"
    );

    // Other data than the checkpoint's is refused.
    let o = Command::new(bin)
        .args([
            "train",
            "--limit",
            "2000",
            "--resume",
            ck.to_str().unwrap(),
            "--out",
        ])
        .arg(d.join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("other training data"));
    std::fs::remove_dir_all(&d).unwrap();
}

/// The run of the kill-during-a-write test: 400 images, 8 steps of 50 per epoch, 3 epochs, one
/// thread. With `--checkpoint-every 3` it writes its checkpoints in this order (write 9 is the
/// last epoch end, after which only the model is left to save).
const SMALL_RUN: [&str; 9] = [
    "train",
    "--epochs",
    "3",
    "--limit",
    "400",
    "--batch",
    "50",
    "--threads",
    "1",
];
const WRITES: [&str; 9] = [
    "ckpt-e0001-s000003.safetensors",
    "ckpt-e0001-s000006.safetensors",
    "ckpt-e0002-s000000.safetensors",
    "ckpt-e0002-s000003.safetensors",
    "ckpt-e0002-s000006.safetensors",
    "ckpt-e0003-s000000.safetensors",
    "ckpt-e0003-s000003.safetensors",
    "ckpt-e0003-s000006.safetensors",
    "ckpt-e0004-s000000.safetensors",
];

/// What a checkpoint directory holds: complete checkpoints and temporary files, sorted.
fn listing(dir: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let (temps, done): (Vec<String>, Vec<String>) =
        names.into_iter().partition(|n| n.starts_with('.'));
    (done, temps)
}

fn weight_bits(path: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let m = mnistconv::checkpoint::load(path).unwrap();
    m.params
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// A run killed (SIGKILL) at chosen moments of a checkpoint write — before the temporary file,
/// with half of it written, with all of it written but not renamed, after the rename but before
/// the oldest checkpoint is pruned — at mid-epoch and epoch-end checkpoints, and at the last
/// one: the complete checkpoints stay intact and loadable, the unfinished temporary file is
/// never read and is removed by `--resume`, and the resumed run ends with the uninterrupted
/// run's weights, bit for bit. Killed during its first write, there is nothing to resume, and
/// `--resume` says so. The pause comes from the `MNISTCONV_FAULT_PAUSE` hook.
#[test]
fn killed_during_a_checkpoint_write_then_resumed_equals_uninterrupted() {
    use std::io::BufRead;
    let bin = env!("CARGO_BIN_EXE_mnistconv");
    let d = std::env::temp_dir().join(format!("mnistconv-killwrite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let straight = d.join("straight.safetensors");
    let o = Command::new(bin)
        .args(SMALL_RUN)
        .arg("--out")
        .arg(&straight)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = weight_bits(&straight);

    #[derive(Debug, PartialEq)]
    enum Temp {
        None,
        Partial,
        Whole,
    }
    /// (stage, write number, complete checkpoints left by the kill, temporary file, resumed from)
    type Case = (&'static str, usize, &'static [usize], Temp, Option<usize>);
    let cases: [Case; 7] = [
        ("before-temp", 5, &[3, 4], Temp::None, Some(4)),
        ("mid-temp", 5, &[3, 4], Temp::Partial, Some(4)),
        ("before-rename", 4, &[2, 3], Temp::Whole, Some(3)),
        (
            "after-rename-before-prune",
            6,
            &[4, 5, 6],
            Temp::None,
            Some(6),
        ),
        ("mid-temp", 3, &[1, 2], Temp::Partial, Some(2)),
        (
            "after-rename-before-prune",
            9,
            &[7, 8, 9],
            Temp::None,
            Some(9),
        ),
        ("mid-temp", 1, &[], Temp::Partial, None),
    ];
    for (stage, write, complete, temp, from) in cases {
        let what = format!("{stage}@{write}");
        let ck = d.join(format!("ck-{stage}-{write}"));
        let t0 = Instant::now();
        let mut child = Command::new(bin)
            .args(SMALL_RUN)
            .args(["--checkpoint-every", "3", "--quiet", "--checkpoint-dir"])
            .arg(&ck)
            .arg("--out")
            .arg(d.join("killed.safetensors"))
            .env("MNISTCONV_FAULT_PAUSE", &what)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            format!("mnistconv: fault pause at {stage}, checkpoint write {write}"),
            "{what}: the run did not pause there"
        );
        child.kill().unwrap(); // SIGKILL, at that very moment of the write
        child.wait().unwrap();
        assert!(!d.join("killed.safetensors").exists(), "{what}");

        // What the kill left: the complete checkpoints, intact, and maybe a temporary file.
        let (done, temps) = listing(&ck);
        let expect: Vec<String> = complete
            .iter()
            .map(|&w| WRITES[w - 1].to_string())
            .collect();
        assert_eq!(done, expect, "{what}: complete checkpoints");
        for n in &done {
            mnistconv::checkpoint::load_training(&ck.join(n))
                .unwrap_or_else(|e| panic!("{what}: {n} is not intact: {e}"));
        }
        let temp_found = match temps.as_slice() {
            [] => Temp::None,
            [t] => {
                assert!(t.starts_with(&format!(".{}.tmp", WRITES[write - 1])), "{t}");
                let whole = mnistconv::checkpoint::load_training(&ck.join(t)).is_ok();
                if whole { Temp::Whole } else { Temp::Partial }
            }
            more => panic!("{what}: several temporary files {more:?}"),
        };
        assert_eq!(temp_found, temp, "{what}: temporary file");
        if temp == Temp::Partial {
            let len = std::fs::metadata(ck.join(&temps[0])).unwrap().len();
            assert!(len > 0, "{what}: half written, not empty");
            for n in &done {
                let whole = std::fs::metadata(ck.join(n)).unwrap().len();
                assert!(
                    len < whole,
                    "{what}: {len} bytes is not part of a checkpoint"
                );
            }
        }

        // Resume, from the newest complete checkpoint, with the temporary file removed.
        let o = Command::new(bin)
            .args(SMALL_RUN)
            .args(["--checkpoint-every", "3", "--resume"])
            .arg(&ck)
            .arg("--out")
            .arg(d.join("resumed.safetensors"))
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        if let Some(t) = temps.first() {
            assert!(
                err.contains(&format!("note: removed {}", ck.join(t).display())),
                "{what}: {err}"
            );
        }
        assert!(listing(&ck).1.is_empty(), "{what}: temporary file left");
        let Some(from) = from else {
            assert_eq!(o.status.code(), Some(2), "{what}: {err}");
            assert!(
                err.contains("no complete training checkpoint"),
                "{what}: {err}"
            );
            eprintln!("{what}: nothing to resume, said so ({:?})", t0.elapsed());
            continue;
        };
        assert!(o.status.success(), "{what}: {err}");
        assert!(
            out.contains(&format!(
                "resuming from {}",
                ck.join(WRITES[from - 1]).display()
            )),
            "{what}: {out}"
        );
        assert_eq!(
            weight_bits(&d.join("resumed.safetensors")),
            want,
            "{what}: resumed weights differ from the uninterrupted run's"
        );
        // Back to the two newest (unless resumed at the very end, with nothing left to write).
        if from < WRITES.len() {
            assert_eq!(listing(&ck).0, WRITES[7..].to_vec(), "{what}: pruned");
        }
        std::fs::remove_file(d.join("resumed.safetensors")).unwrap();
        eprintln!(
            "{what}: resumed from write {from}, same weights ({:?})",
            t0.elapsed()
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}
