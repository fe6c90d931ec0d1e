//! Property: any bytes, plain or gzip, give `Ok` with consistent sizes or an `Err`; never a panic,
//! never an allocation beyond what the input can fill.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mnistconv::mnist::{parse_images, parse_labels};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let p = Path::new("fuzz");
    if let Ok((px, n, rows, cols)) = parse_images(data, p) {
        assert_eq!(px.len(), n * rows * cols);
    }
    if let Ok(l) = parse_labels(data, p) {
        assert!(l.len() <= data.len());
    }
    // The same bytes as the content of a gzip stream, and as a (likely broken) gzip stream.
    let _ = parse_images(flate2::read::GzDecoder::new(data), p);
    let _ = parse_labels(flate2::read::GzDecoder::new(data), p);
});
