//! Bad input, through the binary: each case exits 2 with one line that names the file and the
//! problem, never panics, and leaves the output file as it was (issue: hardening).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnistconv-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Runs `mnistconv args…` and checks: exit 2, stderr one `error:` line naming `needle`s, no panic,
/// and `out` (if it existed) unchanged.
fn bad(args: &[&str], needles: &[&str], out: &Path) {
    let before = std::fs::read(out).ok();
    let o = Command::new(env!("CARGO_BIN_EXE_mnistconv"))
        .args(args)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert!(!e.contains("panicked"), "{args:?}: {e}");
    let first = e.lines().next().unwrap_or("");
    assert!(first.starts_with("error: "), "{args:?}: {e}");
    for n in needles {
        assert!(
            first.contains(n),
            "{args:?}: the error line should say {n:?}: {e}"
        );
    }
    assert_eq!(
        std::fs::read(out).ok(),
        before,
        "{args:?}: the output changed"
    );
}

fn images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [2051u32, n, rows, cols] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend(std::iter::repeat_n(7u8, (n * rows * cols) as usize));
    v
}

fn labels(l: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [2049u32, l.len() as u32] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(l);
    v
}

#[test]
fn malformed_idx_files() {
    let good_img = images(20, 28, 28);
    let good_lab = labels(&[1; 20]);
    let mut header_short = good_img.clone();
    header_short.truncate(10);
    let mut data_short = good_img.clone();
    data_short.truncate(16 + 100);
    let mut huge = Vec::new();
    for w in [2051u32, 4_000_000_000, 28, 28] {
        huge.extend_from_slice(&w.to_be_bytes());
    }
    let mut corrupt_gz = gz(&good_img);
    let mid = corrupt_gz.len() / 2;
    corrupt_gz[mid..mid + 8].copy_from_slice(&[0xff; 8]);
    // (name, images file, labels file, what the error line must say)
    type Case<'a> = (&'a str, Vec<u8>, Vec<u8>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "empty",
            vec![],
            good_lab.clone(),
            vec!["train-images-idx3-ubyte", "empty file"],
        ),
        (
            "magic",
            labels(&[1; 20]),
            good_lab.clone(),
            vec!["train-images-idx3-ubyte", "magic", "label file"],
        ),
        (
            "header",
            header_short,
            good_lab.clone(),
            vec!["train-images-idx3-ubyte", "header cut short"],
        ),
        (
            "data",
            data_short,
            good_lab.clone(),
            vec!["train-images-idx3-ubyte", "data cut short"],
        ),
        (
            "huge",
            huge,
            good_lab.clone(),
            vec!["train-images-idx3-ubyte", "too large"],
        ),
        (
            "gzip",
            corrupt_gz,
            good_lab.clone(),
            vec!["train-images-idx3-ubyte"],
        ),
        (
            "count",
            good_img.clone(),
            labels(&[1; 19]),
            vec!["train-labels-idx1-ubyte", "19 labels", "20 images"],
        ),
        (
            "label",
            good_img.clone(),
            labels(&[12; 20]),
            vec!["label 12", "10 classes"],
        ),
        (
            "size",
            images(20, 20, 20),
            good_lab.clone(),
            vec!["20×20", "28×28"],
        ),
    ];
    for (name, img, lab, needles) in cases {
        let d = tmpdir(name);
        std::fs::write(d.join("train-images-idx3-ubyte"), img).unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), lab).unwrap();
        let out = d.join("m.safetensors");
        std::fs::write(&out, b"previous model").unwrap();
        bad(
            &[
                "train",
                "--data",
                d.to_str().unwrap(),
                "--epochs",
                "1",
                "--out",
                out.to_str().unwrap(),
            ],
            &needles,
            &out,
        );
    }
    // A directory missing a file: which one, and how to get it.
    let d = tmpdir("missing");
    std::fs::write(d.join("train-images-idx3-ubyte"), images(20, 28, 28)).unwrap();
    let out = d.join("m.safetensors");
    bad(
        &[
            "train",
            "--data",
            d.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["no train labels file"],
        &out,
    );
    let o = Command::new(env!("CARGO_BIN_EXE_mnistconv"))
        .args(["train", "--data", d.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("mnistconv download"));
}

#[test]
fn malformed_checkpoints() {
    let d = tmpdir("ckpt");
    let good = d.join("good.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_mnistconv"))
        .args([
            "train",
            "--epochs",
            "1",
            "--limit",
            "200",
            "--quiet",
            "--out",
            good.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let bytes = std::fs::read(&good).unwrap();
    let mut nan = mnistconv::checkpoint::load(&good).unwrap();
    nan.params.w_m1[7] = f32::INFINITY;
    let nan_bytes = mnistconv::checkpoint::to_bytes(&nan).unwrap();
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "text",
            b"just some text, not a checkpoint".to_vec(),
            vec!["text.safetensors", "not a safetensors"],
        ),
        (
            "truncated",
            bytes[..bytes.len() / 2].to_vec(),
            vec!["truncated.safetensors", "not a safetensors"],
        ),
        (
            "empty",
            vec![],
            vec!["empty.safetensors", "not a safetensors"],
        ),
        (
            "inf",
            nan_bytes,
            vec!["inf.safetensors", "fc1.weight", "not finite"],
        ),
    ];
    for (name, b, needles) in cases {
        let p = d.join(format!("{name}.safetensors"));
        std::fs::write(&p, b).unwrap();
        let out = d.join("never.onnx");
        bad(&["eval", "--model", p.to_str().unwrap()], &needles, &out);
        bad(
            &[
                "export",
                "--model",
                p.to_str().unwrap(),
                "--onnx",
                out.to_str().unwrap(),
            ],
            &needles,
            &out,
        );
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let d = tmpdir("flags");
    let out = d.join("m.safetensors");
    for (args, needle) in [
        (vec!["train", "--batch", "0"], "batch"),
        (vec!["train", "--momentum", "-0.1"], "momentum"),
        (vec!["train", "--momentum", "NaN"], "momentum"),
        (vec!["train", "--weight-decay", "-1"], "weight decay"),
        (vec!["train", "--limit", "0"], "--limit"),
        (vec!["train", "--limit", "100", "--val", "100"], "--val"),
        (vec!["train", "--checkpoint-every", "5"], "--checkpoint-dir"),
        (
            vec!["explain", "--model", "x", "--seed", "3"],
            "cannot be used with",
        ),
        (
            vec!["predict", "--model", "x"],
            "either picture files or --index",
        ),
        (vec!["bench", "--threads", "0"], "at least 1"),
    ] {
        let mut a = args.clone();
        if a[0] == "train" {
            a.extend(["--out", out.to_str().unwrap()]);
        }
        bad(&a, &[needle], &out);
    }
}
