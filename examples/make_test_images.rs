//! Writes the pictures `tests/predict_images.rs` classifies: real handwritten digits from the
//! embedded MNIST sample's test split, redrawn as a user might supply them (dark ink on a light
//! page, enlarged, off-centre, PNG or JPEG), plus a blank page and a file that is not an image.
//!
//!     cargo run --release --example make_test_images
use image::{GrayImage, ImageFormat, Luma, imageops};
use mnistconv::mnist::embedded;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = embedded::test();
    let first = |digit: u8| {
        data.labels
            .iter()
            .position(|&l| l == digit)
            .expect("digit present")
    };
    let digit = |i: usize| GrayImage::from_raw(28, 28, data.image(i).to_vec()).expect("28×28");
    // (name, label, scale, dark ink on light paper, canvas w×h, position)
    let specs = [
        ("two_dark_on_light.png", 2u8, 5, true, (400, 260), (210, 50)),
        (
            "four_light_on_dark_corner.jpg",
            4,
            3,
            false,
            (300, 300),
            (10, 190),
        ),
        ("seven_dark_on_light.jpg", 7, 4, true, (240, 320), (30, 150)),
        (
            "nine_small_off_centre.png",
            9,
            2,
            false,
            (100, 80),
            (60, 10),
        ),
    ];
    let dir = std::path::Path::new("tests/images");
    for (name, label, scale, dark, (w, h), (x, y)) in specs {
        let i = first(label);
        let mut d = imageops::resize(
            &digit(i),
            28 * scale,
            28 * scale,
            imageops::FilterType::Triangle,
        );
        let (bg, mut page) = if dark {
            (245u8, GrayImage::from_pixel(w, h, Luma([245])))
        } else {
            (8, GrayImage::from_pixel(w, h, Luma([8])))
        };
        if dark {
            imageops::invert(&mut d);
            // ink 255 → 0 (black), background 0 → 255; bring paper to the page's grey.
            for p in d.pixels_mut() {
                p[0] = p[0].min(bg);
            }
        } else {
            for p in d.pixels_mut() {
                p[0] = p[0].max(bg);
            }
        }
        imageops::overlay(&mut page, &d, i64::from(x), i64::from(y));
        let format = if name.ends_with(".jpg") {
            ImageFormat::Jpeg
        } else {
            ImageFormat::Png
        };
        page.save_with_format(dir.join(name), format)?;
        println!("{name}: test-split image {i}, label {label}");
    }
    GrayImage::from_pixel(64, 64, Luma([255]))
        .save_with_format(dir.join("blank.png"), ImageFormat::Png)?;
    std::fs::write(
        dir.join("not_an_image.png"),
        b"this is a text file, not a picture\n",
    )?;
    Ok(())
}
