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
