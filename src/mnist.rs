//! IDX files (the MNIST format): magic 2051 for images (`u32` count, rows, cols, then bytes),
//! 2049 for labels (`u32` count, then bytes), big-endian, optionally gzip-compressed (detected by
//! the magic bytes `1f 8b`, not the file name). Pixels stay `u8` in memory.

use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Magic number of an IDX image file (`0x00000803`: unsigned bytes, 3 dimensions).
pub const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX label file (`0x00000801`: unsigned bytes, 1 dimension).
pub const LABELS_MAGIC: u32 = 2049;
/// The most items a file may claim, so that a corrupt header cannot make us allocate wildly.
const MAX_ITEMS: u64 = 1 << 31;

/// A set of images with their labels, pixels as stored (0..=255).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Pixels, `[n, rows, cols]` row-major.
    pub images: Vec<u8>,
    /// Labels, `[n]`.
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let p = self.pixels();
        &self.images[i * p..(i + 1) * p]
    }
    /// Image `i` scaled to [0, 1] in f64 (for the reference path).
    pub fn image_f64(&self, i: usize) -> Vec<f64> {
        self.image(i)
            .iter()
            .map(|&v| f64::from(v) / 255.0)
            .collect()
    }
    /// Images `range` as a new dataset.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Dataset {
        let p = self.pixels();
        Dataset {
            images: self.images[range.start * p..range.end * p].to_vec(),
            labels: self.labels[range].to_vec(),
            rows: self.rows,
            cols: self.cols,
        }
    }

    /// A fingerprint of the images and labels (FNV-1a, 64 bits), to tell whether a resumed run
    /// is given the data it started on.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in self.images.iter().chain(&self.labels) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!(
            "{} images {}×{}, fnv1a {h:016x}",
            self.len(),
            self.rows,
            self.cols
        )
    }

    /// Checks that the data fits a network taking `img×img` images and `classes` classes.
    pub fn check_fits(&self, img: usize, classes: usize, what: &str) -> Result<()> {
        if self.rows != img || self.cols != img {
            return Err(Error::Data(format!(
                "{what}: images are {}×{}, the model takes {img}×{img}",
                self.rows, self.cols
            )));
        }
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| usize::from(**l) >= classes)
        {
            return Err(Error::Data(format!(
                "{what}: label {l} of image {i} is not below the model's {classes} classes"
            )));
        }
        Ok(())
    }
}

/// Which files of a data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// `train-*`
    Train,
    /// `t10k-*`
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Candidate file names for one split and kind, in both naming styles, each with and without `.gz`.
fn candidates(split: Split, kind: &str) -> Vec<String> {
    let dim = if kind == "images" { 3 } else { 1 };
    let p = split.prefix();
    let mut v = Vec::new();
    for base in [
        format!("{p}-{kind}-idx{dim}-ubyte"),
        format!("{p}-{kind}.idx{dim}-ubyte"),
    ] {
        v.push(format!("{base}.gz"));
        v.push(base);
    }
    v
}

/// Finds the file of `split`'s `kind` ("images" or "labels") in `dir`.
pub fn find_file(dir: &Path, split: Split, kind: &str) -> Result<PathBuf> {
    let names = candidates(split, kind);
    for n in &names {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::MissingFile {
        dir: dir.to_path_buf(),
        what: format!("{} {kind}", split.prefix()),
        tried: names.join(", "),
    })
}

/// Whether `dir` has both files of `split`.
pub fn has_split(dir: &Path, split: Split) -> bool {
    find_file(dir, split, "images").is_ok() && find_file(dir, split, "labels").is_ok()
}

/// Loads one split (images and labels) from a data directory and checks that they match.
pub fn load_split(dir: &Path, split: Split) -> Result<Dataset> {
    let ip = find_file(dir, split, "images")?;
    let lp = find_file(dir, split, "labels")?;
    let (images, n, rows, cols) = read_images(&ip)?;
    let labels = read_labels(&lp)?;
    if labels.len() != n {
        return Err(Error::idx(
            &lp,
            format!(
                "{} labels, but {} has {n} images",
                labels.len(),
                ip.display()
            ),
        ));
    }
    Ok(Dataset {
        images,
        labels,
        rows,
        cols,
    })
}

fn open(path: &Path) -> Result<Box<dyn Read>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = std::io::BufReader::new(f);
    let gz = {
        use std::io::BufRead;
        let head = r.fill_buf().map_err(|e| Error::io(path, e))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    Ok(if gz {
        Box::new(GzDecoder::new(r))
    } else {
        Box::new(r)
    })
}

/// Reads an IDX image file (plain or gzip): `(pixels, n, rows, cols)`.
pub fn read_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    parse_images(open(path)?, path)
}

/// Reads an IDX label file (plain or gzip).
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(open(path)?, path)
}

/// Parses IDX image bytes from any reader (already decompressed). `path` names the source in errors.
pub fn parse_images(mut r: impl Read, path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let h = read_header(&mut r, path, 4, IMAGES_MAGIC, "image")?;
    let (n, rows, cols) = (u64::from(h[1]), u64::from(h[2]), u64::from(h[3]));
    if rows == 0 || cols == 0 || rows > 4096 || cols > 4096 {
        return Err(Error::idx(
            path,
            format!("implausible image size {rows}×{cols}"),
        ));
    }
    let total = n
        .checked_mul(rows * cols)
        .filter(|&t| t <= MAX_ITEMS)
        .ok_or_else(|| {
            Error::idx(
                path,
                format!("header claims {n} images of {rows}×{cols}: too large"),
            )
        })?;
    let data = read_exact_bounded(r, total, path, &format!("{n} images of {rows}×{cols}"))?;
    Ok((data, n as usize, rows as usize, cols as usize))
}

/// Parses IDX label bytes from any reader (already decompressed).
pub fn parse_labels(mut r: impl Read, path: &Path) -> Result<Vec<u8>> {
    let h = read_header(&mut r, path, 2, LABELS_MAGIC, "label")?;
    let n = u64::from(h[1]);
    if n > MAX_ITEMS {
        return Err(Error::idx(
            path,
            format!("header claims {n} labels: too large"),
        ));
    }
    read_exact_bounded(r, n, path, &format!("{n} labels"))
}

fn bad_magic(path: &Path, got: u32, want: u32, what: &str) -> Error {
    let hint = match got {
        IMAGES_MAGIC => " (this is an image file)",
        LABELS_MAGIC => " (this is a label file)",
        _ => "",
    };
    Error::idx(
        path,
        format!("not an IDX {what} file: magic number {got}, expected {want}{hint}"),
    )
}

/// Reads the magic number (checked first, so a wrong file type is named as such) and then the
/// rest of a `words`-word header.
fn read_header(
    r: &mut impl Read,
    path: &Path,
    words: usize,
    magic: u32,
    what: &str,
) -> Result<Vec<u32>> {
    let mut buf = vec![0u8; 4 * words];
    let got = read_full(r, &mut buf[..4], path)?;
    if got == 0 {
        return Err(Error::idx(path, "empty file"));
    }
    if got == 4 {
        let m = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if m != magic {
            return Err(bad_magic(path, m, magic, what));
        }
    }
    let got = got
        + if got == 4 {
            read_full(r, &mut buf[4..], path)?
        } else {
            0
        };
    if got < buf.len() {
        return Err(Error::idx(
            path,
            format!("header cut short: {got} of {} bytes", buf.len()),
        ));
    }
    Ok(buf
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Reads as much as possible into `buf`, returning the count; decompression errors become Idx errors.
fn read_full(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(path, e)),
        }
    }
    Ok(got)
}

fn read_error(path: &Path, e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::InvalidInput
        | std::io::ErrorKind::InvalidData
        | std::io::ErrorKind::UnexpectedEof => Error::idx(path, format!("corrupt gzip data: {e}")),
        _ => Error::io(path, e),
    }
}

/// Reads exactly `len` bytes without trusting `len` for the allocation: the buffer grows only
/// as data arrives, so a header that lies about its size cannot make us allocate gigabytes.
fn read_exact_bounded(r: impl Read, len: u64, path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(len.min(1 << 20) as usize);
    r.take(len + 1)
        .read_to_end(&mut data)
        .map_err(|e| read_error(path, e))?;
    let got = data.len() as u64;
    if got < len {
        return Err(Error::idx(
            path,
            format!("data cut short: header promises {what} ({len} bytes), file has {got}"),
        ));
    }
    if got > len {
        return Err(Error::idx(
            path,
            format!("trailing bytes after the {what} the header promises"),
        ));
    }
    Ok(data)
}

/// Writes images as an IDX file (uncompressed), e.g. for tests.
pub fn write_images(n: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + pixels.len());
    for w in [IMAGES_MAGIC, n as u32, rows as u32, cols as u32] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

/// Writes labels as an IDX file (uncompressed).
pub fn write_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + labels.len());
    for w in [LABELS_MAGIC, labels.len() as u32] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v.extend_from_slice(labels);
    v
}

/// The sample committed in the repository (5,000 MNIST training images as `train-*`, 1,000 more
/// from the end of the MNIST training set as `t10k-*`), embedded in the binary so that
/// `mnistconv train` works with no data at all. See `fixtures/README.md` for provenance.
pub mod embedded {
    use super::*;

    const TRAIN_IMAGES: &[u8] =
        include_bytes!("../fixtures/mnist-sample/train-images-idx3-ubyte.gz");
    const TRAIN_LABELS: &[u8] =
        include_bytes!("../fixtures/mnist-sample/train-labels-idx1-ubyte.gz");
    const TEST_IMAGES: &[u8] = include_bytes!("../fixtures/mnist-sample/t10k-images-idx3-ubyte.gz");
    const TEST_LABELS: &[u8] = include_bytes!("../fixtures/mnist-sample/t10k-labels-idx1-ubyte.gz");

    fn load(images: &[u8], labels: &[u8], name: &str) -> Dataset {
        let p = Path::new(name);
        let (images, _, rows, cols) =
            parse_images(GzDecoder::new(images), p).expect("embedded fixture is valid");
        let labels = parse_labels(GzDecoder::new(labels), p).expect("embedded fixture is valid");
        Dataset {
            images,
            labels,
            rows,
            cols,
        }
    }

    /// The embedded sample's `train` split (5,000 images).
    pub fn train() -> Dataset {
        load(TRAIN_IMAGES, TRAIN_LABELS, "<embedded train sample>")
    }
    /// The embedded sample's `t10k` split (1,000 images, from the MNIST training set).
    pub fn test() -> Dataset {
        load(TEST_IMAGES, TEST_LABELS, "<embedded test sample>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_plain() {
        let px: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        let bytes = write_images(2, 3, 4, &px);
        let (got, n, r, c) = parse_images(&bytes[..], Path::new("x")).unwrap();
        assert_eq!((got, n, r, c), (px, 2, 3, 4));
        assert_eq!(
            parse_labels(&write_labels(&[3, 1])[..], Path::new("y")).unwrap(),
            vec![3, 1]
        );
    }

    #[test]
    fn lying_header_does_not_allocate_and_is_rejected() {
        // 4 billion images claimed by a 16-byte header.
        let bytes = write_images(4_000_000_000, 28, 28, &[]);
        let e = parse_images(&bytes[..], Path::new("big"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large"), "{e}");
        let bytes = write_images(1000, 28, 28, &[0; 100]);
        let e = parse_images(&bytes[..], Path::new("short"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cut short"), "{e}");
    }

    #[test]
    fn wrong_magic_says_which_file_it_is() {
        let e = parse_images(&write_labels(&[1])[..], Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("label file"), "{e}");
        let e = parse_labels(&[][..], Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn embedded_sample_loads() {
        let d = embedded::train();
        assert_eq!((d.len(), d.rows, d.cols), (5000, 28, 28));
        assert_eq!(embedded::test().len(), 1000);
        d.check_fits(28, 10, "sample").unwrap();
        assert!(d.check_fits(28, 5, "sample").is_err());
    }
}
