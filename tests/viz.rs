//! The pictures: `train --metrics/--plots`, `viz` and `explain --image`. Every PNG is decoded and
//! checked for its size and for content (not a blank page).

use std::path::Path;

mod common;
use common::{run, stderr, tmpdir};

const PICTURES: [&str; 6] = [
    "kernels.png",
    "feature_maps.png",
    "backprop_maps.png",
    "training.png",
    "confusion.png",
    "errors.png",
];

/// Decodes `path` and checks it is a real picture: at least 400×300, with ink (≥ 1% of the
/// pixels not white) and colour (≥ 5 distinct colours for the curves, 10 for the confusion
/// matrix, 50 for the maps). Returns the image.
fn check_png(path: &Path) -> image::RgbImage {
    let name = path.file_name().unwrap().to_string_lossy();
    let min_colours = match name.as_ref() {
        "training.png" => 5,
        "confusion.png" => 10,
        _ => 50,
    };
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{}: does not decode: {e}", path.display()))
        .to_rgb8();
    let (w, h) = img.dimensions();
    assert!(w >= 400 && h >= 300, "{}: only {w}×{h}", path.display());
    let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(
        ink as f64 > 0.01 * f64::from(w * h),
        "{}: nearly blank ({ink} of {} pixels not white)",
        path.display(),
        w * h
    );
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() >= min_colours,
        "{}: only {} colours",
        path.display(),
        colours.len()
    );
    img
}

#[test]
fn train_writes_metrics_and_plots_and_viz_redraws_them() {
    let d = tmpdir("train");
    let model = d.join("m.safetensors");
    let metrics = d.join("metrics.jsonl");
    let plots = d.join("plots");
    let o = run(&[
        "train",
        "--epochs",
        "2",
        "--val",
        "500",
        "--quiet",
        "--out",
        model.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // One JSON line per epoch, with what training.png is drawn from.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
        for k in [
            "train_loss",
            "train_accuracy",
            "val_accuracy",
            "test_accuracy",
            "seconds",
            "lr",
        ] {
            assert!(l[k].is_number(), "{k} missing in {l}");
        }
    }
    assert!(lines[1]["train_loss"].as_f64() < lines[0]["train_loss"].as_f64());

    let mut sizes = Vec::new();
    for p in PICTURES {
        sizes.push(check_png(&plots.join(p)).dimensions());
    }

    // `viz` on the same model and metrics draws the same pictures (the maps in the same layout;
    // the others' widths follow their captions).
    let out = d.join("viz");
    let o = run(&[
        "viz",
        "--model",
        model.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, (p, size)) in PICTURES.iter().zip(&sizes).enumerate() {
        let got = check_png(&out.join(p)).dimensions();
        if i < 3 {
            assert_eq!(got, *size, "{p}");
        }
    }
    // The kernels picture depends only on the weights: identical bytes.
    assert_eq!(
        std::fs::read(plots.join("kernels.png")).unwrap(),
        std::fs::read(out.join("kernels.png")).unwrap()
    );

    // `viz --metrics` alone redraws the curves.
    let only = d.join("only");
    let o = run(&[
        "viz",
        "--metrics",
        metrics.to_str().unwrap(),
        "--out",
        only.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_png(&only.join("training.png"));
    assert!(!only.join("kernels.png").exists());

    // A picture of the user's own, and another target class.
    let own = d.join("own");
    let o = run(&[
        "viz",
        "--model",
        model.to_str().unwrap(),
        "--image",
        "tests/images/seven_dark_on_light.jpg",
        "--label",
        "3",
        "--out",
        own.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_png(&own.join("feature_maps.png"));
    let a = check_png(&own.join("backprop_maps.png"));
    let b = image::open(plots.join("backprop_maps.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(
        a.as_raw(),
        b.as_raw(),
        "another image, another backward pass"
    );
}

#[test]
fn explain_takes_a_picture() {
    let d = tmpdir("explain");
    let model = d.join("m.safetensors");
    let o = run(&[
        "train",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trace = d.join("trace.safetensors");
    let o = run(&[
        "explain",
        "--model",
        model.to_str().unwrap(),
        "--image",
        "tests/images/seven_dark_on_light.jpg",
        "--json",
        "--out",
        trace.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(j["passed"], true);
    // Without --label the target is the predicted class: a 7, as `predict` says.
    assert_eq!(j["label"], 7, "{j}");
    assert!(
        j["image"]
            .as_str()
            .unwrap()
            .ends_with("seven_dark_on_light.jpg")
    );
    assert!(trace.exists());
    // The same preprocessing as `predict`: the traced input is predict's input.
    let o = run(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--json",
        "tests/images/seven_dark_on_light.jpg",
    ]);
    let p: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let (pv, jv) = (p["logits"].as_array().unwrap(), j["v"].as_array().unwrap());
    for (a, b) in pv.iter().zip(jv) {
        assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-9);
    }

    // Bad pictures and contradictory options: exit 2, one line, the file named.
    for (args, expect) in [
        (
            vec!["explain", "--image", "tests/images/blank.png"],
            "blank.png: blank image",
        ),
        (
            vec!["explain", "--image", "tests/images/not_an_image.png"],
            "not_an_image.png: not an image",
        ),
        (
            vec![
                "explain",
                "--image",
                "tests/images/nine_small_off_centre.png",
                "--index",
                "3",
            ],
            "cannot be used with",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
}

#[test]
fn viz_refuses_bad_metrics_and_missing_arguments() {
    let d = tmpdir("bad");
    let bad = d.join("metrics.jsonl");
    std::fs::write(&bad, "{\"epoch\":1}\n").unwrap();
    let o = run(&[
        "viz",
        "--metrics",
        bad.to_str().unwrap(),
        "--out",
        d.join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("metrics.jsonl: line 1: not an epoch's metrics"),
        "{e}"
    );
    assert!(!d.join("o").exists(), "nothing written");

    // Neither a model nor metrics: a usage error.
    let o = run(&["viz", "--out", d.join("o").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--model"), "{}", stderr(&o));
}
