//! The fuzz targets' properties, run on stable over the committed corpus seeds (which include the
//! inputs the fuzzer found problems with), so they stay regression tests without a fuzzer.

use mnistconv::Params;
use mnistconv::checkpoint::from_bytes;
use mnistconv::mnist::{parse_images, parse_labels};
use mnistconv::preprocess::{center_of_mass, gray_from_bytes, mnist_normalize};
use std::path::Path;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new("fuzz/corpus").join(target);
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    assert!(!v.is_empty(), "no seeds in {}", dir.display());
    // Every seed cut short at a few places too.
    let cuts: Vec<Vec<u8>> = v
        .iter()
        .flat_map(|s| {
            [s.len() / 3, s.len() / 2, s.len().saturating_sub(1)].map(|k| s[..k].to_vec())
        })
        .collect();
    v.extend(cuts);
    v
}

#[test]
fn idx_parse_property() {
    for data in seeds("idx_parse") {
        let p = Path::new("seed");
        if let Ok((px, n, rows, cols)) = parse_images(&data[..], p) {
            assert_eq!(px.len(), n * rows * cols);
        }
        if let Ok(l) = parse_labels(&data[..], p) {
            assert!(l.len() <= data.len());
        }
        let _ = parse_images(flate2::read::GzDecoder::new(&data[..]), p);
    }
}

#[test]
fn checkpoint_load_property() {
    for data in seeds("checkpoint_load") {
        if let Ok(m) = from_bytes(&data, Path::new("seed")) {
            let want = Params::<f32>::zeros(&m.cfg);
            for ((_, a), (_, b)) in m.params.tensors().into_iter().zip(want.tensors()) {
                assert_eq!(a.len(), b.len());
            }
        }
    }
}

#[test]
fn preprocess_property() {
    let mut normalised = 0;
    for data in seeds("preprocess") {
        let Ok(img) = gray_from_bytes(&data, "seed") else {
            continue;
        };
        let Ok(px) = mnist_normalize(&img, "seed") else {
            continue;
        };
        normalised += 1;
        assert_eq!(px.len(), 784);
        if let Some((r, c)) = center_of_mass(&px, 28) {
            assert!(
                (r - 13.5).abs() <= 6.5 && (c - 13.5).abs() <= 6.5,
                "{r} {c}"
            );
        }
    }
    assert!(normalised >= 4);
}
