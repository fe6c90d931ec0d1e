//! Drives the `mnistconv` binary: training, evaluation, gradcheck, determinism, and the usage
//! errors (exit code 2, one clear line, no panic).

use std::process::Output;

mod common;
use common::{bin, run, stderr, stdout, tmpdir};

fn last_json(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    let line = out.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

#[test]
fn train_then_eval_on_the_embedded_sample() {
    let d = tmpdir("train");
    let model = d.join("m.safetensors");
    let m = model.to_str().unwrap();
    let o = run(&[
        "train", "--epochs", "3", "--limit", "3000", "--val", "500", "--out", m, "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    for k in [
        "epochs",
        "train_seconds",
        "images_per_second",
        "final_train_loss",
        "val_accuracy",
        "test_accuracy",
        "model",
    ] {
        assert!(j.get(k).is_some(), "missing {k} in {j}");
    }
    assert_eq!(j["epochs"], 3);
    let h = j["history"].as_array().unwrap();
    assert!(
        h[2]["train_loss"].as_f64() < h[0]["train_loss"].as_f64(),
        "loss falls: {j}"
    );
    assert!(j["val_accuracy"].as_f64().unwrap() > 0.85, "{j}");

    let o = run(&["eval", "--model", m, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = last_json(&o);
    assert_eq!(e["n"], 1000);
    assert!((e["accuracy"].as_f64().unwrap() - j["test_accuracy"].as_f64().unwrap()).abs() < 1e-12);
    let conf = e["confusion"].as_array().unwrap();
    let total: u64 = conf
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!((conf.len(), total), (10, 1000));
    assert_eq!(e["per_class"].as_array().unwrap().len(), 10);

    let o = run(&["eval", "--model", m]);
    assert!(stdout(&o).contains("confusion"), "{}", stdout(&o));
}

#[test]
fn same_seed_gives_the_same_weights_for_any_thread_count() {
    let d = tmpdir("det");
    let mut files = Vec::new();
    for (i, threads) in ["1", "2", "1"].iter().enumerate() {
        let p = d.join(format!("m{i}.safetensors"));
        let o = run(&[
            "train",
            "--epochs",
            "1",
            "--limit",
            "700",
            "--batch",
            "50",
            "--threads",
            threads,
            "--out",
            p.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        files.push(mnistconv::checkpoint::load(&p).unwrap().params);
    }
    assert!(
        files[0] == files[1] && files[1] == files[2],
        "weights differ between runs"
    );
    let p = d.join("other.safetensors");
    let o = run(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "700",
        "--batch",
        "50",
        "--seed",
        "2",
        "--out",
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert!(
        mnistconv::checkpoint::load(&p).unwrap().params != files[0],
        "another seed gives other weights"
    );
}

#[test]
fn book_recipe_runs_bias_free() {
    let d = tmpdir("book");
    let p = d.join("b.safetensors");
    let o = run(&[
        "train",
        "--recipe",
        "book",
        "--epochs",
        "1",
        "--limit",
        "1000",
        "--out",
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("recipe Book"));
    let o = run(&[
        "train",
        "--recipe",
        "book",
        "--bias",
        "--out",
        p.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn gradcheck_passes_and_reports_every_tensor() {
    let o = run(&["gradcheck", "--samples", "4", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    assert_eq!(j["passed"], true);
    let v = j["variants"].as_array().unwrap();
    assert_eq!(v.len(), 7);
    assert_eq!(v[0]["tensors"].as_array().unwrap().len(), 3);
    assert_eq!(v[1]["tensors"].as_array().unwrap().len(), 6);
}

#[test]
fn bad_usage_exits_2_with_one_clear_line() {
    let d = tmpdir("bad");
    let out = d.join("never.safetensors");
    let o_ = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["train", "--batch", "0", "--out", o_], "batch"),
        (&["train", "--epochs", "0", "--out", o_], "epochs"),
        (&["train", "--lr", "-1", "--out", o_], "learning rate"),
        (&["train", "--lr", "NaN", "--out", o_], "learning rate"),
        (&["train", "--momentum", "1", "--out", o_], "momentum"),
        (&["train", "--threads", "0", "--out", o_], "threads"),
        (&["train", "--val", "5000", "--out", o_], "--val"),
        (&["train", "--pool", "3", "--out", o_], "does not divide"),
        (
            &["train", "--data", "/nonexistent-dir", "--out", o_],
            "train images",
        ),
        (
            &["eval", "--model", "/nonexistent.safetensors"],
            "nonexistent.safetensors",
        ),
        (&["train", "--no-such-flag"], "no-such-flag"),
    ];
    for (args, needle) in cases {
        let o = run(args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(
            e.contains(needle),
            "{args:?}: message should mention {needle:?}: {e}"
        );
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    assert!(!out.exists(), "no model written by a failed run");
}

#[test]
fn eval_rejects_a_model_of_another_shape_for_the_data() {
    let d = tmpdir("shape");
    // IDX files of 20×20 images.
    let imgs = mnistconv::mnist::write_images(3, 20, 20, &[7u8; 3 * 400]);
    std::fs::write(d.join("t10k-images-idx3-ubyte"), imgs).unwrap();
    std::fs::write(
        d.join("t10k-labels-idx1-ubyte"),
        mnistconv::mnist::write_labels(&[1, 2, 3]),
    )
    .unwrap();
    let m = d.join("m.safetensors");
    let o = run(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "200",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("20×20"), "{}", stderr(&o));
}

#[test]
fn reads_both_file_name_styles_plain_and_gzip() {
    use std::io::Write;
    let d = tmpdir("names");
    let px: Vec<u8> = (0..50 * 784).map(|i| (i % 251) as u8).collect();
    let labels: Vec<u8> = (0..50).map(|i| (i % 10) as u8).collect();
    // train-*: the dotted style, gzip-compressed; t10k-*: the dashed style, plain.
    let gz = |bytes: Vec<u8>| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&bytes).unwrap();
        e.finish().unwrap()
    };
    std::fs::write(
        d.join("train-images.idx3-ubyte.gz"),
        gz(mnistconv::mnist::write_images(50, 28, 28, &px)),
    )
    .unwrap();
    std::fs::write(
        d.join("train-labels.idx1-ubyte.gz"),
        gz(mnistconv::mnist::write_labels(&labels)),
    )
    .unwrap();
    std::fs::write(
        d.join("t10k-images-idx3-ubyte"),
        mnistconv::mnist::write_images(50, 28, 28, &px),
    )
    .unwrap();
    std::fs::write(
        d.join("t10k-labels-idx1-ubyte"),
        mnistconv::mnist::write_labels(&labels),
    )
    .unwrap();
    let train = mnistconv::mnist::load_split(&d, mnistconv::mnist::Split::Train).unwrap();
    let test = mnistconv::mnist::load_split(&d, mnistconv::mnist::Split::Test).unwrap();
    assert_eq!(train, test);
    assert_eq!(train.images, px);
    // A label file whose count differs from the images' is named in the error.
    std::fs::write(
        d.join("t10k-labels-idx1-ubyte"),
        mnistconv::mnist::write_labels(&labels[..49]),
    )
    .unwrap();
    let e = mnistconv::mnist::load_split(&d, mnistconv::mnist::Split::Test)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("49 labels"),
        "{e}"
    );
}

/// The portable kernels (what a CPU without AVX-512 runs) train the same network to the same
/// numbers, up to f32 rounding: the whole batched path, not only each kernel, works without SIMD.
#[test]
fn portable_kernels_train_the_same() {
    let d = tmpdir("portable");
    let mut losses = Vec::new();
    for kernels in ["portable", "auto"] {
        let p = d.join(format!("{kernels}.safetensors"));
        let o = bin()
            .args([
                "train",
                "--epochs",
                "2",
                "--limit",
                "600",
                "--batch",
                "50",
                "--json",
                "--out",
                p.to_str().unwrap(),
            ])
            .env("MNISTCONV_KERNELS", kernels)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        losses.push(last_json(&o)["final_train_loss"].as_f64().unwrap());
    }
    assert!(
        (losses[0] - losses[1]).abs() < 1e-3 * losses[1],
        "{losses:?}"
    );
}

#[test]
fn explain_walks_the_chain_and_every_check_passes() {
    let d = tmpdir("explain");
    let out = d.join("trace.safetensors");
    let o = run(&["explain", "--index", "4", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for f in ["∂L/∂v = y − d", "∂J/∂w⁽⁻¹⁾", "re-pool", "∂J/∂k = x ⋆"] {
        assert!(s.contains(f), "missing {f}: {s}");
    }
    assert!(out.exists());
    let o = run(&["explain", "--index", "4", "--json", "--label", "3"]);
    let j = last_json(&o);
    assert_eq!(j["passed"], true);
    assert_eq!(j["label"], 3);
    assert!(j["factors"].as_array().unwrap().len() >= 10);
    let o = run(&["explain", "--index", "999999"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Pictures as a user supplies them (tests/images, made by examples/make_test_images.rs from real
/// MNIST digits): dark on light, enlarged, off-centre, PNG and JPEG. A blank page, a file that is
/// not an image and one too large to decode are each a clear error for that file, while the others
/// are still answered.
#[test]
fn predict_on_pictures() {
    let d = tmpdir("pictures");
    let model = d.join("m.safetensors");
    let o = run(&["train", "--epochs", "3", "--out", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let huge = d.join("huge.png");
    image::GrayImage::new(9000, 2).save(&huge).unwrap();
    let raw = d.join("raw.png");
    let data = mnistconv::mnist::embedded::test();
    image::GrayImage::from_raw(28, 28, data.image(0).to_vec())
        .unwrap()
        .save(&raw)
        .unwrap();
    let pics = [
        ("tests/images/two_dark_on_light.png", 2),
        ("tests/images/four_light_on_dark_corner.jpg", 4),
        ("tests/images/seven_dark_on_light.jpg", 7),
        ("tests/images/nine_small_off_centre.png", 9),
    ];
    let mut args = vec!["predict", "--json", "--model", model.to_str().unwrap()];
    args.extend(pics.iter().map(|p| p.0));
    args.extend([
        "tests/images/blank.png",
        "tests/images/not_an_image.png",
        huge.to_str().unwrap(),
    ]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "a bad file makes the run exit 2");
    let e = stderr(&o);
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("blank.png: blank image"), "{e}");
    assert!(
        e.contains("not_an_image.png: not an image this tool reads"),
        "{e}"
    );
    assert!(
        e.contains("huge.png: the image is 9000×2, larger than"),
        "{e}"
    );
    let answers: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 4, "the good pictures are still answered");
    let right = answers
        .iter()
        .zip(&pics)
        .filter(|(a, p)| a["prediction"] == p.1)
        .count();
    assert!(right >= 3, "{right} of 4 right: {answers:?}");
    for a in &answers {
        let p: f64 = a["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-9 && a["top3"].as_array().unwrap().len() == 3);
    }
    // --raw: a 28×28 MNIST-style picture as it is; a picture of another size is refused.
    let o = run(&[
        "predict",
        "--raw",
        "--json",
        "--model",
        model.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(last_json(&o)["prediction"], u64::from(data.labels[0]));
    let o = run(&[
        "predict",
        "--raw",
        "--model",
        model.to_str().unwrap(),
        pics[0].0,
    ]);
    assert!(
        stderr(&o).contains("--raw needs a 28×28 image"),
        "{}",
        stderr(&o)
    );
}

/// Without a terminal, progress is a plain line on stderr every tenth of an epoch; --quiet leaves
/// only the final summary on stdout.
#[test]
fn progress_lines_and_quiet() {
    let d = tmpdir("progress");
    let m = d.join("m.safetensors");
    let o = run(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "2000",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().filter(|l| l.contains("step ")).collect();
    assert!(lines.len() >= 5, "{e}");
    assert!(
        lines[0].contains("epoch 1/1") && lines[0].contains("img/s") && lines[0].contains("eta"),
        "{e}"
    );
    assert!(stdout(&o).contains("epoch  1/1"));
    let o = run(&[
        "train",
        "--epochs",
        "1",
        "--limit",
        "2000",
        "--quiet",
        "--out",
        m.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(stderr(&o), "", "--quiet prints nothing on stderr");
    let out = stdout(&o);
    assert!(
        !out.contains("epoch  1/1") && out.contains("saved"),
        "{out}"
    );
}

#[test]
fn export_writes_an_onnx_graph_that_decodes() {
    use prost::Message;
    let d = tmpdir("onnx");
    let m = d.join("m.safetensors");
    assert!(
        run(&[
            "train",
            "--epochs",
            "1",
            "--limit",
            "300",
            "--bias",
            "--quiet",
            "--out",
            m.to_str().unwrap()
        ])
        .status
        .success()
    );
    let onnx = d.join("m.onnx");
    let o = run(&[
        "export",
        "--model",
        m.to_str().unwrap(),
        "--onnx",
        onnx.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = mnistconv::onnx::ModelProto::decode(&std::fs::read(&onnx).unwrap()[..])
        .unwrap()
        .graph
        .unwrap();
    assert_eq!(
        g.output.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["logits", "probabilities"]
    );
    assert_eq!(g.initializer.len(), 6);
    let o = run(&[
        "export",
        "--model",
        "/nonexistent.safetensors",
        "--onnx",
        onnx.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

/// A checkpoint that names its classes (as training on Fashion-MNIST writes one) has `predict`
/// name them; where Debian's Fashion-MNIST is installed, training on it is recognised.
#[test]
fn class_names_from_the_checkpoint() {
    let d = tmpdir("names");
    let cfg = mnistconv::NetConfig::default();
    let names: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    let model = mnistconv::Model {
        cfg,
        params: mnistconv::Params::init(&cfg, mnistconv::Init::He, 1),
        meta: [(
            "class_names".to_string(),
            serde_json::to_string(&names).unwrap(),
        )]
        .into(),
    };
    let m = d.join("m.safetensors");
    mnistconv::checkpoint::save(&m, &model).unwrap();
    let o = run(&["predict", "--model", m.to_str().unwrap(), "--index", "0"]);
    assert!(stdout(&o).contains("(label 6 class6)"), "{}", stdout(&o));
    let fashion = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    if fashion.exists() {
        let o = run(&[
            "train",
            "--data",
            fashion.to_str().unwrap(),
            "--epochs",
            "1",
            "--limit",
            "500",
            "--quiet",
            "--out",
            m.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o = run(&[
            "predict",
            "--model",
            m.to_str().unwrap(),
            "--data",
            fashion.to_str().unwrap(),
            "--index",
            "0",
        ]);
        assert!(
            stdout(&o).contains("(label 9 Ankle boot)"),
            "{}",
            stdout(&o)
        );
    } else {
        eprintln!("Fashion-MNIST not installed: its recognition is not exercised here");
    }
}

/// A learning rate that blows the weights up stops the run with exit 1, naming the epoch and
/// step and suggesting a lower rate; no model is written. A write to a full device reports it.
#[test]
fn divergence_and_a_full_disk_are_reported() {
    let d = tmpdir("diverge");
    let out = d.join("m.safetensors");
    let o = run(&[
        "train",
        "--lr",
        "1000",
        "--epochs",
        "1",
        "--limit",
        "500",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("diverged at epoch 1, step") && e.contains("--lr"),
        "{e}"
    );
    assert!(!out.exists());
    if std::path::Path::new("/dev/full").exists() {
        let o = run(&[
            "train",
            "--epochs",
            "1",
            "--limit",
            "200",
            "--quiet",
            "--out",
            "/dev/full",
        ]);
        assert_eq!(o.status.code(), Some(2));
        let e = stderr(&o);
        assert!(
            e.contains("/dev/full") && e.contains("No space left"),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    }
}

#[test]
fn bench_reports_medians_and_every_run() {
    // A tiny bench (300 images, 3 runs): the figures are meaningless, their consistency is not.
    let o = run(&[
        "bench",
        "--images",
        "300",
        "--runs",
        "3",
        "--threads",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = last_json(&o);
    assert_eq!(j["threads"], 2);
    assert_eq!(j["images"], 300);
    let runs: Vec<f64> = j["train_epoch_seconds_runs"]
        .as_array()
        .unwrap_or_else(|| panic!("no per-run epochs in {j}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 3, "{j}");
    assert!(runs.iter().all(|&t| t > 0.0), "{j}");
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(
        j["train_epoch_seconds"].as_f64(),
        Some(sorted[1]),
        "median of the runs"
    );
    let ips = j["train_images_per_second"].as_f64().unwrap();
    assert!((ips * sorted[1] - 300.0).abs() < 1e-6 * 300.0, "{j}");
    for k in [
        "infer_images_per_second",
        "latency_us",
        "fma_peak_gflops",
        "gemm_gflops",
    ] {
        assert!(j[k].as_f64().is_some_and(|v| v > 0.0), "{k} in {j}");
    }
    let share = j["skipped_share"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&share), "{j}");
}
