//! `download`: fetch a data set's four `.gz` files from the usual public mirrors, in turn,
//! verify each one's SHA-256, and write it atomically. A file already present and valid is kept.
//!
//! The `.gz` bytes are checked against the hashes TFDS publishes; the same data re-compressed
//! (Debian's package, this project's `../shared/data`) differs in its `.gz` bytes, so a file whose
//! decompressed content has the known hash is accepted too.

use crate::error::{Error, Result};
use crate::fsutil::atomic_write;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One file of a data set and its known hashes (hex).
#[derive(Clone, Debug)]
pub struct FileSpec {
    /// File name, e.g. `train-images-idx3-ubyte.gz`.
    pub name: String,
    /// SHA-256 of the `.gz` file as published.
    pub sha256_gz: String,
    /// SHA-256 of its decompressed content.
    pub sha256_raw: String,
}

fn spec(name: &str, gz: &str, raw: &str) -> FileSpec {
    FileSpec {
        name: name.into(),
        sha256_gz: gz.into(),
        sha256_raw: raw.into(),
    }
}

/// MNIST's four files.
pub fn mnist_files() -> Vec<FileSpec> {
    vec![
        spec(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        spec(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        spec(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        spec(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    ]
}

/// Fashion-MNIST's four files.
pub fn fashion_files() -> Vec<FileSpec> {
    vec![
        spec(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        spec(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        spec(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        spec(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ]
}

/// The usual public mirrors, tried in this order: MNIST's PyTorch S3 mirror, the CVDF mirror
/// TFDS uses, then Yann LeCun's site; Fashion-MNIST's from Zalando.
pub fn mnist_mirrors() -> Vec<String> {
    vec![
        "https://ossci-datasets.s3.amazonaws.com/mnist/".into(),
        "https://storage.googleapis.com/cvdf-datasets/mnist/".into(),
        "http://yann.lecun.com/exdb/mnist/".into(),
    ]
}

/// Fashion-MNIST's mirror.
pub fn fashion_mirrors() -> Vec<String> {
    vec!["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/".into()]
}

/// The most a file may weigh (the largest is 26 MB).
const MAX_BYTES: u64 = 64 << 20;

/// SHA-256 of `bytes`, as lower-case hex (the form the hashes above are in).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(Sha256::digest(bytes))
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `bytes` are the file `spec` names: by the `.gz` hash, or by the decompressed content's.
pub fn verify(spec: &FileSpec, bytes: &[u8]) -> bool {
    if sha256_hex(bytes) == spec.sha256_gz {
        return true;
    }
    let mut raw = Sha256::new();
    let mut dec = flate2::read::GzDecoder::new(bytes).take(MAX_BYTES * 8);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    hex(raw.finalize()) == spec.sha256_raw
}

/// What happened to one file.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Already there and valid.
    Present,
    /// Downloaded from this URL.
    Fetched(String),
}

/// Fetches every file of `files` into `dir` from the first mirror that serves it intact; `log`
/// hears of each attempt. Each request gives up after `timeout` without progress.
pub fn download(
    files: &[FileSpec],
    mirrors: &[String],
    dir: &Path,
    timeout: Duration,
    mut log: impl FnMut(&str),
) -> Result<Vec<(PathBuf, Outcome)>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(timeout))
        .timeout_recv_response(Some(timeout))
        .timeout_recv_body(Some(timeout * 20))
        .build()
        .into();
    let mut out = Vec::new();
    for f in files {
        let path = dir.join(&f.name);
        if let Ok(bytes) = std::fs::read(&path) {
            if verify(f, &bytes) {
                log(&format!("{}: present and valid", path.display()));
                out.push((path, Outcome::Present));
                continue;
            }
            log(&format!(
                "{}: present but not valid; fetching it again",
                path.display()
            ));
        }
        let mut why = Vec::new();
        let mut got = None;
        for m in mirrors {
            let url = format!("{}/{}", m.trim_end_matches('/'), f.name);
            let bytes = agent
                .get(&url)
                .call()
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    let mut v = Vec::new();
                    r.body_mut()
                        .with_config()
                        .limit(MAX_BYTES)
                        .reader()
                        .read_to_end(&mut v)
                        .map_err(|e| e.to_string())
                        .map(|_| v)
                });
            match bytes {
                Ok(b) if verify(f, &b) => {
                    got = Some((b, url));
                    break;
                }
                Ok(b) => {
                    log(&format!(
                        "{url}: {} bytes, but the SHA-256 does not match; trying the next mirror",
                        b.len()
                    ));
                    why.push(format!("{url}: checksum mismatch"));
                }
                Err(e) => {
                    log(&format!("{url}: {e}; trying the next mirror"));
                    why.push(format!("{url}: {e}"));
                }
            }
        }
        let Some((bytes, url)) = got else {
            return Err(Error::Data(format!(
                "could not download {}: {}",
                f.name,
                why.join("; ")
            )));
        };
        atomic_write(&path, &bytes)?;
        log(&format!(
            "{}: {} bytes from {url}, SHA-256 verified",
            path.display(),
            bytes.len()
        ));
        out.push((path, Outcome::Fetched(url)));
    }
    Ok(out)
}
