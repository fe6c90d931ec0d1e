//! `download` against a local HTTP server on 127.0.0.1 started by the test: a 404 falls through to
//! the next mirror, a corrupted file is rejected, a stalled connection times out, files already
//! present and valid are kept, and nothing half-written is ever left.

use mnistconv::download::{FileSpec, Outcome, download, verify};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves `fixtures/mnist-sample` under /good/, 404 under /missing/, wrong bytes under /corrupt/,
/// and never answers under /stall/ (holds the connection 5 s). Stops after `max` connections.
fn serve(max: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in l.incoming().take(max) {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                if r.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let name = path.rsplit('/').next().unwrap_or("").to_string();
                let (status, body): (&str, Vec<u8>) = if path.starts_with("/good/") {
                    match std::fs::read(Path::new("fixtures/mnist-sample").join(&name)) {
                        Ok(b) => ("200 OK", b),
                        Err(_) => ("404 Not Found", b"no".to_vec()),
                    }
                } else if path.starts_with("/corrupt/") {
                    ("200 OK", vec![0x1f, 0x8b, 1, 2, 3, 4, 5])
                } else if path.starts_with("/stall/") {
                    std::thread::sleep(Duration::from_secs(5));
                    return;
                } else {
                    ("404 Not Found", b"not here".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            });
        }
    });
    format!("http://{addr}")
}

fn fixture_specs() -> Vec<FileSpec> {
    [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    .iter()
    .map(|n| {
        let gz = std::fs::read(Path::new("fixtures/mnist-sample").join(n)).unwrap();
        let raw = {
            use std::io::Read;
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut v)
                .unwrap();
            v
        };
        FileSpec {
            name: n.to_string(),
            sha256_gz: hex(Sha256::digest(&gz)),
            sha256_raw: hex(Sha256::digest(&raw)),
        }
    })
    .collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mnistconv-dl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn falls_through_404_and_corrupt_mirrors_then_keeps_valid_files() {
    let base = serve(64);
    let specs = fixture_specs();
    let dir = tmp("fall");
    let mirrors = [
        format!("{base}/missing"),
        format!("{base}/corrupt"),
        format!("{base}/good"),
    ];
    let mut log = Vec::new();
    let got = download(&specs, &mirrors, &dir, Duration::from_secs(5), |l| {
        log.push(l.to_string())
    })
    .unwrap();
    assert_eq!(got.len(), 4);
    for (path, o) in &got {
        assert!(
            matches!(o, Outcome::Fetched(u) if u.contains("/good/")),
            "{o:?}"
        );
        assert!(path.exists());
    }
    let log = log.join("\n");
    assert!(log.contains("404"), "{log}");
    assert!(log.contains("SHA-256 does not match"), "{log}");
    // The files load as the sample they are.
    let d = mnistconv::mnist::load_split(&dir, mnistconv::mnist::Split::Train).unwrap();
    assert_eq!(d.len(), 5000);
    // Second run: everything present and valid, nothing fetched.
    let again = download(&specs, &mirrors, &dir, Duration::from_secs(5), |_| {}).unwrap();
    assert!(again.iter().all(|(_, o)| matches!(o, Outcome::Present)));
    // A damaged file is fetched again.
    std::fs::write(dir.join(&specs[1].name), b"damaged").unwrap();
    let again = download(&specs, &mirrors, &dir, Duration::from_secs(5), |_| {}).unwrap();
    assert!(matches!(again[1].1, Outcome::Fetched(_)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stalled_mirror_times_out() {
    let base = serve(16);
    let specs = &fixture_specs()[1..2];
    let dir = tmp("stall");
    let t0 = Instant::now();
    let got = download(
        specs,
        &[format!("{base}/stall"), format!("{base}/good")],
        &dir,
        Duration::from_millis(300),
        |_| {},
    )
    .unwrap();
    assert!(matches!(&got[0].1, Outcome::Fetched(u) if u.contains("/good/")));
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_good_mirror_is_an_error_and_writes_nothing() {
    let base = serve(16);
    let specs = &fixture_specs()[..1];
    let dir = tmp("none");
    let e = download(
        specs,
        &[format!("{base}/missing"), format!("{base}/corrupt")],
        &dir,
        Duration::from_secs(2),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("could not download train-images-idx3-ubyte.gz")
            && e.contains("checksum mismatch"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no partial file left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn recompressed_files_are_accepted_by_their_content() {
    let spec = &fixture_specs()[1];
    let gz = std::fs::read(Path::new("fixtures/mnist-sample").join(&spec.name)).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&raw).unwrap();
    let other = e.finish().unwrap();
    assert_ne!(other, gz);
    assert!(verify(spec, &other));
    assert!(!verify(spec, b"garbage"));
    // The shared training set is Debian-style re-compressed MNIST: its content hash is MNIST's.
    let shared = Path::new("../shared/data/mnist/train-labels-idx1-ubyte.gz");
    if let Ok(b) = std::fs::read(shared) {
        assert!(verify(&mnistconv::download::mnist_files()[1], &b));
    }
}
