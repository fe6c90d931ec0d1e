//! Property: any bytes give a 28×28 picture with its centre of mass within 6.5 px of the centre
//! (exactly centred unless that would cut a stroke off), or an `Err`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mnistconv::preprocess::{center_of_mass, gray_from_bytes, mnist_normalize};

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = gray_from_bytes(data, "fuzz") {
        if let Ok(px) = mnist_normalize(&img, "fuzz") {
            assert_eq!(px.len(), 784);
            if let Some((r, c)) = center_of_mass(&px, 28) {
                assert!((r - 13.5).abs() <= 6.5 && (c - 13.5).abs() <= 6.5, "{r} {c}");
            }
        }
    }
});
