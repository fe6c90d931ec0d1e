//! Helpers shared by the integration tests.
#![allow(dead_code)]

use mnistconv::{Init, NetConfig, Params};
use std::path::PathBuf;
use std::process::{Command, Output};

/// The `mnistconv` binary built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mnistconv"))
}

/// A fresh, empty directory for one test (named after the test binary's process).
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mnistconv-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the binary with `args` and waits for it.
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// He-initialised weights with small non-zero biases, so bias gradients are exercised.
pub fn params(cfg: &NetConfig, seed: u64) -> Params<f32> {
    let mut p = Params::init(cfg, Init::He, seed);
    let mut i = 0u32;
    for b in [&mut p.bk, &mut p.b_m1, &mut p.b] {
        for v in b.iter_mut() {
            i += 1;
            *v = 0.05 * ((i.wrapping_mul(2654435761) % 1000) as f32 / 500.0 - 1.0);
        }
    }
    p
}

/// `‖a − b‖ / ‖b‖`, and prints the first pairs and the largest difference, as llm.c's check_tensor.
pub fn norm_rel_error(name: &str, a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{name}: lengths differ");
    let (mut num, mut den, mut maxd) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
        maxd = maxd.max((x - y).abs());
    }
    let e = num.sqrt() / den.sqrt().max(1e-30);
    let pairs: Vec<String> = a
        .iter()
        .zip(b)
        .take(3)
        .map(|(x, y)| format!("{x:.6e}/{y:.6e}"))
        .collect();
    eprintln!(
        "{name:<12} rel {e:.2e}  max diff {maxd:.2e}  first {}",
        pairs.join(" ")
    );
    e
}

/// Runs `f` in a fresh rayon pool of `threads` threads.
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}
