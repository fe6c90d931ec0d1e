//! Throughput and latency measurements of the batched path (`mnistconv bench`), and the
//! machine's own arithmetic limits to compare them with. Timings are medians over runs.

use crate::config::NetConfig;
use crate::fast::{self, Workspace};
use crate::kernels;
use crate::mnist::Dataset;
use crate::params::{Init, Params};
use crate::train::{self, TrainConfig};
use serde::Serialize;
use std::time::Instant;

/// Multiply-adds per image of one forward pass of the network.
pub fn forward_macs(cfg: &NetConfig) -> f64 {
    let conv = (cfg.n_kernels * cfg.conv() * cfg.conv() * cfg.ksize * cfg.ksize) as f64;
    conv + (cfg.flat() * cfg.hidden + cfg.hidden * cfg.classes) as f64
}

/// Multiply-adds per image of one training step (forward, then backward: kernel gradient,
/// `∂J/∂w⁽⁻¹⁾`, back through `w⁽⁻¹⁾`, `∂J/∂w` and back through `w`; no gradient for the input).
pub fn train_macs(cfg: &NetConfig) -> f64 {
    let conv = (cfg.n_kernels * cfg.conv() * cfg.conv() * cfg.ksize * cfg.ksize) as f64;
    forward_macs(cfg) + conv + (2 * cfg.flat() * cfg.hidden + 2 * cfg.hidden * cfg.classes) as f64
}

/// The median of `v` (which it sorts).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Everything `mnistconv bench` reports.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Worker threads.
    pub threads: usize,
    /// SIMD kernels in use (and the kernel gradient's, when they differ: [`kernels::dk_backend`]).
    pub kernels: String,
    /// Images per training epoch.
    pub images: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Timed runs (medians are over these).
    pub runs: usize,
    /// Median seconds per training epoch.
    pub train_epoch_seconds: f64,
    /// Seconds of each timed epoch, in the order they ran (the spread shows the machine's noise).
    pub train_epoch_seconds_runs: Vec<f64>,
    /// Training images per second (median epoch).
    pub train_images_per_second: f64,
    /// Achieved training GFLOP/s (2 FLOP per multiply-add).
    pub train_gflops: f64,
    /// Batched inference images per second (median).
    pub infer_images_per_second: f64,
    /// Median latency of one image through the network, one thread, µs.
    pub latency_us: f64,
    /// Plain f32 GEMM (1024³, row blocks over the threads) GFLOP/s, median: the better of
    /// this crate's kernel and the `matrixmultiply` crate's (packed, cache-blocked).
    pub gemm_gflops: f64,
    /// The same GEMM with this crate's kernel ([`kernels::gemm_nn`]).
    pub gemm_own_gflops: f64,
    /// The same GEMM with `matrixmultiply` ([`kernels::Backend::Portable`]).
    pub gemm_matrixmultiply_gflops: f64,
    /// Register-only FMA loop over the threads, GFLOP/s: the arithmetic ceiling.
    pub fma_peak_gflops: f64,
    /// Share of a training step's multiply-adds (as counted in `train_gflops`) that the
    /// kernels skipped as exact zeros: the conv's and its kernel gradient's products with the
    /// bench images' blank background (measured on them, unshifted).
    pub skipped_share: f64,
    /// `train_gflops` less the skipped share: the arithmetic the machine actually did.
    pub train_gflops_executed: f64,
    /// `train_gflops / gemm_gflops`.
    pub fraction_of_gemm: f64,
    /// `train_gflops / fma_peak_gflops`.
    pub fraction_of_peak: f64,
    /// Peak resident memory of the process so far, MB (Linux `VmHWM`).
    pub peak_rss_mb: Option<f64>,
}

/// Peak resident set size of this process in MB, from `/proc/self/status` (Linux only).
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs the benchmark: `images` training images drawn cyclically from `data`, `runs` timed
/// epochs of the default recipe's optimiser with `batch`, then batched inference, one-image
/// latency and the machine's GEMM and FMA ceilings.
pub fn run(
    data: &Dataset,
    images: usize,
    batch: usize,
    runs: usize,
    threads: usize,
) -> crate::Result<BenchReport> {
    let cfg = NetConfig::default();
    data.check_fits(cfg.img, cfg.classes, "bench data")?;
    let pool = train::thread_pool(threads)?;
    let nthreads = pool.current_num_threads();
    let px = cfg.pixels();
    let n = images.max(batch);
    // The data as it is when it holds exactly the epoch's images (no second copy in memory),
    // else cycled to make them up.
    let cycled;
    let set = if n == data.len() {
        data
    } else {
        let mut imgs = Vec::with_capacity(n * px);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let j = i % data.len();
            imgs.extend_from_slice(data.image(j));
            labels.push(data.labels[j]);
        }
        cycled = Dataset {
            images: imgs,
            labels,
            rows: cfg.img,
            cols: cfg.img,
        };
        &cycled
    };
    let tc = TrainConfig {
        batch,
        threads,
        epochs: 1,
        ..TrainConfig::default_recipe()
    };

    // Training: whole epochs through the same loop `train` uses.
    let mut params = Params::init(&cfg, Init::He, 1);
    let mut epoch_secs = Vec::new();
    for _ in 0..runs {
        let h = train::train(&cfg, &tc, &mut params, set, None, None, |_| Ok(()))?;
        epoch_secs.push(h[0].seconds);
    }
    let train_epoch_seconds_runs = epoch_secs.clone();
    let train_epoch_seconds = median(&mut epoch_secs);
    let train_ips = n as f64 / train_epoch_seconds;

    // Batched inference over the same images, batches of 1000.
    let (infer_ips, latency_us) = pool.install(|| {
        let b = 1000.min(n);
        let mut ws = Workspace::new(&cfg, b);
        let idx: Vec<usize> = (0..n).collect();
        let mut t = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            for ids in idx.chunks(b) {
                fast::forward_batch(&cfg, &params, &set.images, None, ids, &mut ws);
            }
            t.push(n as f64 / t0.elapsed().as_secs_f64());
        }
        let ips = median(&mut t);
        // One image at a time, on this thread only (no hand-off to the pool).
        let mut ws1 = Workspace::new(&cfg, 1);
        let mut lat = Vec::new();
        for i in 0..2000.min(n) {
            let t0 = Instant::now();
            fast::forward_batch(&cfg, &params, &set.images, None, &[i], &mut ws1);
            lat.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        (ips, median(&mut lat))
    });

    let gemm_own = pool.install(|| gemm_gflops(kernels::backend(), runs));
    let gemm_mm = pool.install(|| gemm_gflops(kernels::Backend::Portable, runs));
    let gemm_gflops = gemm_own.max(gemm_mm);
    let fma_peak_gflops = pool.install(|| fma_peak(nthreads));
    let train_gflops = 2.0 * train_macs(&cfg) * train_ips / 1e9;
    let skipped_share = skipped_share(&cfg, set);
    Ok(BenchReport {
        threads: nthreads,
        kernels: match (kernels::backend(), kernels::dk_backend()) {
            (a, b) if a == b => format!("{a:?}"),
            (a, b) => format!("{a:?}, kernel gradient {b:?}"),
        },
        images: n,
        batch,
        runs,
        train_epoch_seconds,
        train_epoch_seconds_runs,
        train_images_per_second: train_ips,
        train_gflops,
        infer_images_per_second: infer_ips,
        latency_us,
        gemm_gflops,
        gemm_own_gflops: gemm_own,
        gemm_matrixmultiply_gflops: gemm_mm,
        fma_peak_gflops,
        skipped_share,
        train_gflops_executed: train_gflops * (1.0 - skipped_share),
        fraction_of_gemm: train_gflops / gemm_gflops,
        fraction_of_peak: train_gflops / fma_peak_gflops,
        peak_rss_mb: peak_rss_mb(),
    })
}

/// Share of a training step's multiply-adds ([`train_macs`]) that the kernels skip on `data`'s
/// images (the conv's and its kernel gradient's products with blank background), averaged over them.
pub fn skipped_share(cfg: &NetConfig, data: &Dataset) -> f64 {
    let w = kernels::Wide {
        img: cfg.img,
        ks: cfg.ksize,
    };
    let (be, dk_be) = (kernels::backend(), kernels::dk_backend());
    let mut slot = vec![0.0; w.slot()];
    let (mut fwd, mut dk) = (0.0, 0.0);
    for i in 0..data.len() {
        let ink = w.fill(data.image(i), &mut slot);
        let (f, d) = kernels::skipped_share(be, w, &slot, ink);
        fwd += f;
        // The kernel gradient's share on its own backend (a second count only if it differs).
        dk += if dk_be == be {
            d
        } else {
            kernels::skipped_share(dk_be, w, &slot, ink).1
        };
    }
    let n = data.len().max(1) as f64;
    // Per map the kernels compute wq positions (conv² of them useful) × ks² taps.
    let per_map = (w.wq() * cfg.ksize * cfg.ksize) as f64 * cfg.n_kernels as f64;
    (fwd + dk) / n * per_map / train_macs(cfg)
}

/// A plain 1024×1024×1024 f32 GEMM on backend `be`, rows split over the pool.
fn gemm_gflops(be: kernels::Backend, runs: usize) -> f64 {
    use rayon::prelude::*;
    let n = 1024;
    let a = vec![0.5f32; n * n];
    let b = vec![0.25f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut t = Vec::new();
    for _ in 0..runs.max(3) {
        let t0 = Instant::now();
        c.par_chunks_mut(64 * n).enumerate().for_each(|(i, rows)| {
            kernels::gemm_nn_on(
                be,
                rows.len() / n,
                n,
                n,
                &a[i * 64 * n..],
                n,
                1,
                &b,
                n,
                rows,
                n,
                false,
            );
        });
        t.push(2.0 * (n * n * n) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    median(&mut t)
}

/// FMA throughput with every thread of the pool busy (register-only loop), GFLOP/s.
fn fma_peak(threads: usize) -> f64 {
    use rayon::prelude::*;
    let iters = 20_000_000;
    let t0 = Instant::now();
    let flops: f64 = (0..threads)
        .into_par_iter()
        .map(|_| kernels::fma_loop(iters))
        .sum();
    flops / t0.elapsed().as_secs_f64() / 1e9
}
