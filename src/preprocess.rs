//! Turning an ordinary picture of a digit into what the network was trained on, the way MNIST
//! itself was made: grey-scale; light background inverted (decided from the border); cropped to
//! the ink's bounding box; the longer side scaled to 20 px keeping the aspect ratio (anti-aliased);
//! pasted into 28×28 so that the centre of mass of the ink sits at the centre (as near as it can
//! without cutting a stroke off: within 6.5 px for the most lopsided picture).

use crate::error::{Error, Result};
use image::{GrayImage, ImageReader, imageops};
use std::path::Path;

/// The largest picture `predict` decodes (checked from the header, before decoding).
pub const MAX_SIDE: u32 = 8192;
/// The most pixels `predict` decodes.
pub const MAX_PIXELS: u64 = 40_000_000;

/// Reads an image file as grey levels, refusing huge ones before decoding them.
pub fn read_gray(path: &Path) -> Result<GrayImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    gray_from_bytes(&bytes, &path.display().to_string())
}

/// Decodes image bytes (PNG or JPEG) as grey levels, refusing huge images before decoding them;
/// `what` names the source in errors.
pub fn gray_from_bytes(bytes: &[u8], what: &str) -> Result<GrayImage> {
    let bad = |r: String| Error::Data(format!("{what}: {r}"));
    let reader = || {
        ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(format!("not a readable image ({e})")))
    };
    let r = reader()?;
    if r.format().is_none() {
        return Err(bad("not an image this tool reads (PNG or JPEG)".into()));
    }
    let (w, h) = r
        .into_dimensions()
        .map_err(|e| bad(format!("not a readable image ({e})")))?;
    if w == 0 || h == 0 {
        return Err(bad("the image is empty (0 pixels)".into()));
    }
    if w > MAX_SIDE || h > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(bad(format!(
            "the image is {w}×{h}, larger than this tool decodes ({MAX_SIDE}×{MAX_SIDE}, {MAX_PIXELS} pixels)"
        )));
    }
    // The limits guard the decoder too (e.g. a header that lies about its size).
    let mut r = reader()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_PIXELS * 8);
    r.limits(limits);
    let img = r
        .decode()
        .map_err(|e| bad(format!("cannot decode ({e})")))?;
    Ok(img.to_luma8())
}

/// MNIST's normalisation of a grey picture into 28×28 pixels (0..=255, ink bright).
///
/// # Errors
/// If the picture has no ink.
pub fn mnist_normalize(img: &GrayImage, what: &str) -> Result<Vec<u8>> {
    let (w, h) = img.dimensions();
    // Light background → invert, so that ink is bright as in MNIST. Decided from the border.
    let border: Vec<u8> = (0..w)
        .flat_map(|x| [img.get_pixel(x, 0)[0], img.get_pixel(x, h - 1)[0]])
        .chain((0..h).flat_map(|y| [img.get_pixel(0, y)[0], img.get_pixel(w - 1, y)[0]]))
        .collect();
    let bg = border.iter().map(|&v| f64::from(v)).sum::<f64>() / border.len() as f64;
    let invert = bg > 127.0;
    let mut g = img.clone();
    if invert {
        imageops::invert(&mut g);
    }
    // Ink: clearly brighter than the (now dark) background.
    let bg = if invert { 255.0 - bg } else { bg };
    let thresh = (bg + 40.0).min(250.0) as u8;
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (x, y, p) in g.enumerate_pixels() {
        if p[0] > thresh {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    if x0 > x1 {
        return Err(Error::Data(format!("{what}: blank image (no ink found)")));
    }
    // Background to 0, ink kept, then crop to the ink's bounding box.
    for p in g.pixels_mut() {
        p[0] = p[0].saturating_sub(bg.round() as u8);
    }
    let crop = imageops::crop_imm(&g, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image();
    // Longer side to 20 px, aspect ratio kept, anti-aliased.
    let (cw, ch) = crop.dimensions();
    let scale = 20.0 / f64::from(cw.max(ch));
    let (nw, nh) = (
        ((f64::from(cw) * scale).round() as u32).clamp(1, 20),
        ((f64::from(ch) * scale).round() as u32).clamp(1, 20),
    );
    let small = imageops::resize(&crop, nw, nh, imageops::FilterType::Triangle);
    // Centre of mass of the ink, placed at the centre of the 28×28 field.
    let (mut sx, mut sy, mut s) = (0.0, 0.0, 0.0);
    for (x, y, p) in small.enumerate_pixels() {
        let v = f64::from(p[0]);
        sx += v * f64::from(x);
        sy += v * f64::from(y);
        s += v;
    }
    if s == 0.0 {
        return Err(Error::Data(format!(
            "{what}: blank image (no ink left after scaling)"
        )));
    }
    let (cx, cy) = (sx / s, sy / s);
    // The shift that puts the centre of mass at the centre, limited so the whole box stays in
    // the field: no stroke is cut off (MNIST's own procedure could clip a lopsided digit).
    let fit = |c: f64, n: u32| ((13.5 - c).round() as i64).clamp(0, 28 - i64::from(n));
    let (ox, oy) = (fit(cx, nw), fit(cy, nh));
    let mut out = vec![0u8; 28 * 28];
    for (x, y, p) in small.enumerate_pixels() {
        let (tx, ty) = (i64::from(x) + ox, i64::from(y) + oy);
        if (0..28).contains(&tx) && (0..28).contains(&ty) {
            out[(ty * 28 + tx) as usize] = p[0];
        }
    }
    Ok(out)
}

/// An image that is already 28×28 MNIST-style (bright ink on dark), taken as it is.
pub fn raw_28(img: &GrayImage, what: &str) -> Result<Vec<u8>> {
    if img.dimensions() != (28, 28) {
        let (w, h) = img.dimensions();
        return Err(Error::Data(format!(
            "{what}: --raw needs a 28×28 image, this one is {w}×{h}"
        )));
    }
    Ok(img.as_raw().clone())
}

/// The centre of mass of an image's intensity, `(row, col)`, or `None` if it is blank.
pub fn center_of_mass(px: &[u8], side: usize) -> Option<(f64, f64)> {
    let (mut r, mut c, mut s) = (0.0, 0.0, 0.0);
    for (i, &v) in px.iter().enumerate() {
        let v = f64::from(v);
        r += v * (i / side) as f64;
        c += v * (i % side) as f64;
        s += v;
    }
    (s > 0.0).then(|| (r / s, c / s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canvas(w: u32, h: u32, bg: u8) -> GrayImage {
        GrayImage::from_pixel(w, h, image::Luma([bg]))
    }

    #[test]
    fn dark_on_light_off_centre_stroke_is_normalised() {
        // A thick dark vertical bar, off-centre on a white 200×120 canvas.
        let mut img = canvas(200, 120, 250);
        for y in 20..100 {
            for x in 150..160 {
                img.put_pixel(x, y, image::Luma([10]));
            }
        }
        let out = mnist_normalize(&img, "bar").unwrap();
        assert_eq!(out.len(), 784);
        let (r, c) = center_of_mass(&out, 28).unwrap();
        assert!(
            (r - 13.5).abs() < 1.0 && (c - 13.5).abs() < 1.0,
            "centre of mass at {r}, {c}"
        );
        // The bar is 80 px tall: 20 px after scaling, ink bright, background 0.
        let rows_with_ink = (0..28)
            .filter(|&y| out[y * 28..(y + 1) * 28].iter().any(|&v| v > 100))
            .count();
        assert!((19..=21).contains(&rows_with_ink), "{rows_with_ink}");
        assert_eq!(out[0], 0);
    }

    /// Ink all at one edge of its box: the box is kept whole (nothing cut off), the centre of mass
    /// as near the centre as that allows. (A case the fuzzer found.)
    #[test]
    fn lopsided_ink_is_not_cut_off() {
        let mut img = canvas(100, 100, 0);
        for y in 0..100 {
            img.put_pixel(99, y, image::Luma([255])); // a heavy right edge
            if y % 20 == 0 {
                img.put_pixel(0, y, image::Luma([120])); // faint dots on the left edge
            }
        }
        let out = mnist_normalize(&img, "lopsided").unwrap();
        let cols: Vec<usize> = (0..28)
            .filter(|&c| (0..28).any(|r| out[r * 28 + c] > 0))
            .collect();
        assert!(
            cols.last().unwrap() - cols.first().unwrap() >= 19,
            "both edges kept: {cols:?}"
        );
        let (r, c) = center_of_mass(&out, 28).unwrap();
        assert!(
            (r - 13.5).abs() <= 6.5 && (c - 13.5).abs() <= 6.5,
            "{r} {c}"
        );
    }

    #[test]
    fn blank_is_an_error() {
        let e = mnist_normalize(&canvas(50, 50, 255), "white.png")
            .unwrap_err()
            .to_string();
        assert!(e.contains("white.png") && e.contains("blank"), "{e}");
        assert!(mnist_normalize(&canvas(50, 50, 0), "black.png").is_err());
    }
}
