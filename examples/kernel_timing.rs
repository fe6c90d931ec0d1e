//! Times the kernels on the default network's shapes, one thread (a quick look; `cargo bench` has the real benchmarks).
use mnistconv::kernels::*;
use std::time::Instant;

fn time(name: &str, flops: f64, mut f: impl FnMut()) {
    for _ in 0..10 {
        f();
    }
    // The minimum over rounds: the machine is shared, and noise only ever adds time.
    let reps = 300;
    let s = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "{name:<40} {:>8.2} µs {:>8.1} GFLOP/s",
        s * 1e6,
        flops / s / 1e9
    );
}

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let w = Wide { img: 28, ks: 9 };
    let x = vec![0.5f32; m * w.slot()];
    let k = vec![0.1f32; 20 * 81];
    let mut z = vec![0.0f32; m * 20 * w.wq()];
    let useful = 2.0 * 20.0 * 400.0 * 81.0 * m as f64;
    time("conv_wide fwd, m images (useful GFLOP/s)", useful, || {
        conv_wide(w, &k, 20, &x, m, &mut z)
    });
    let mut dk = vec![0.0f32; 20 * 81];
    time("conv_wide dk, m images (useful GFLOP/s)", useful, || {
        conv_wide_dk(w, &z, 20, &x, m, &mut dk)
    });
    // The same on MNIST digits (the embedded sample's first m), whose blank background the SIMD
    // kernels skip; GFLOP/s counted on the full, dense work, as above.
    let digits = mnistconv::mnist::embedded::train();
    let mut xd = vec![0.0f32; m * w.slot()];
    for (e, slot) in xd.chunks_exact_mut(w.slot()).enumerate() {
        w.fill(digits.image(e), slot);
    }
    time("conv_wide fwd, m MNIST digits", useful, || {
        conv_wide(w, &k, 20, &xd, m, &mut z)
    });
    time("conv_wide dk, m MNIST digits", useful, || {
        conv_wide_dk(w, &z, 20, &xd, m, &mut dk)
    });
    let b = 100;
    let y2 = vec![0.01f32; b * 2000];
    let w1t = vec![0.01f32; 2000 * 100];
    let w1 = vec![0.01f32; 2000 * 100];
    let mut y1 = vec![0.0f32; b * 100];
    time(
        "fc1 fwd nn 100x100x2000",
        2.0 * 100.0 * 100.0 * 2000.0,
        || gemm_nn(b, 100, 2000, &y2, 2000, 1, &w1t, 100, &mut y1, 100, false),
    );
    time(
        "fc1 fwd nt 100x100x2000",
        2.0 * 100.0 * 100.0 * 2000.0,
        || gemm_nt(b, 100, 2000, &y2, 2000, &w1, 2000, &mut y1, 100, false),
    );
    {
        let mut ya = Aligned::zeroed(8 * 2000);
        ya.fill(0.01);
        let mut wa = Aligned::zeroed(2000 * 100);
        wa.fill(0.01);
        let mut wta = Aligned::zeroed(2000 * 112);
        wta.fill(0.01);
        time("ALIGNED nt 8x100x2000", 2.0 * 8.0 * 100.0 * 2000.0, || {
            gemm_nt(8, 100, 2000, &ya, 2000, &wa, 2000, &mut y1, 100, false)
        });
        time(
            "ALIGNED nn 8x100x2000 on w1t ldb 100",
            2.0 * 8.0 * 100.0 * 2000.0,
            || gemm_nn(8, 100, 2000, &ya, 2000, 1, &wa, 100, &mut y1, 100, false),
        );
        time(
            "ALIGNED nn 8x100x2000 on w1t ldb 112",
            2.0 * 8.0 * 100.0 * 2000.0,
            || gemm_nn(8, 100, 2000, &ya, 2000, 1, &wta, 112, &mut y1, 100, false),
        );
        time(
            "ALIGNED dy2 nn 8x2000x100",
            2.0 * 8.0 * 100.0 * 2000.0,
            || gemm_nn(8, 2000, 100, &y1, 100, 1, &wa, 2000, &mut ya, 2000, false),
        );
    }
    time(
        "fc1 fwd nt 8x100x2000 (one chunk)",
        2.0 * 8.0 * 100.0 * 2000.0,
        || gemm_nt(8, 100, 2000, &y2, 2000, &w1, 2000, &mut y1, 100, false),
    );
    time(
        "fc1 fwd nn 8x100x2000 on w1t (one chunk)",
        2.0 * 8.0 * 100.0 * 2000.0,
        || gemm_nn(8, 100, 2000, &y2, 2000, 1, &w1t, 100, &mut y1, 100, false),
    );
    time(
        "fc1 fwd nt 4x100x2000 (one chunk)",
        2.0 * 4.0 * 100.0 * 2000.0,
        || gemm_nt(4, 100, 2000, &y2, 2000, &w1, 2000, &mut y1, 100, false),
    );
    time(
        "fc1 fwd nn 4x100x2000 on w1t (one chunk)",
        2.0 * 4.0 * 100.0 * 2000.0,
        || gemm_nn(4, 100, 2000, &y2, 2000, 1, &w1t, 100, &mut y1, 100, false),
    );
    let dv1c = vec![0.01f32; 4 * 100];
    let mut dy2c = vec![0.0f32; 4 * 2000];
    time(
        "dy2 nn 4x2000x100 (one chunk)",
        2.0 * 4.0 * 100.0 * 2000.0,
        || {
            gemm_nn(
                4, 2000, 100, &dv1c, 100, 1, &w1, 2000, &mut dy2c, 2000, false,
            )
        },
    );
    let dv1 = vec![0.01f32; b * 100];
    let mut dw1 = vec![0.0f32; 100 * 2000];
    time("dw1 nn 100x2000x100", 2.0 * 100.0 * 100.0 * 2000.0, || {
        gemm_nn(100, 2000, b, &dv1, 1, 100, &y2, 2000, &mut dw1, 2000, false)
    });
    let mut dy2 = vec![0.0f32; b * 2000];
    time("dy2 nn 100x2000x100", 2.0 * 100.0 * 100.0 * 2000.0, || {
        gemm_nn(b, 2000, 100, &dv1, 100, 1, &w1, 2000, &mut dy2, 2000, false)
    });
    // ∂L/∂v⁽⁻¹⁾ behind a ReLU, as measured on a trained net: 62 % zeros, 17 % of the units
    // never active. The sparse product leaves the zeros out (GFLOP/s counted on the dense work).
    let mut seed = 12345u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    let dead: Vec<bool> = (0..100).map(|_| rnd() < 0.17).collect();
    let dv1s: Vec<f32> = (0..b * 100)
        .map(|i| {
            if !dead[i % 100] && rnd() < 0.46 {
                0.01
            } else {
                0.0
            }
        })
        .collect();
    let mut csr = Csr::with_capacity(100, b);
    time(
        "dy2 csr 4x2000x100, 62 % zeros (one chunk)",
        2.0 * 4.0 * 100.0 * 2000.0,
        || {
            csr.gather(4, 100, &dv1s, 100, 1);
            gemm_csr(&csr, 0..4, 2000, &w1, 2000, &mut dy2c, 2000)
        },
    );
    let mut live = Vec::new();
    time(
        "dy2 nn_at 4x2000x100, the same zeros",
        2.0 * 4.0 * 100.0 * 2000.0,
        || {
            nonzero_cols(4, 100, &dv1s, 100, 1, &mut live);
            gemm_nn_at(
                4, 2000, &live, &dv1s, 100, 1, &w1, 2000, &mut dy2c, 2000, false,
            )
        },
    );
    time(
        "dy2 nn 4x2000x100, the same zeros",
        2.0 * 4.0 * 100.0 * 2000.0,
        || {
            gemm_nn(
                4, 2000, 100, &dv1s, 100, 1, &w1, 2000, &mut dy2c, 2000, false,
            )
        },
    );
    time(
        "dw1 csr 100x2000x100, 62 % zeros",
        2.0 * 100.0 * 100.0 * 2000.0,
        || {
            csr.gather(100, b, &dv1s, 1, 100);
            gemm_csr(&csr, 0..100, 2000, &y2, 2000, &mut dw1, 2000)
        },
    );
    time(
        "dw1 csr 25 of 100 rows",
        2.0 * 25.0 * 100.0 * 2000.0,
        || gemm_csr(&csr, 0..25, 2000, &y2, 2000, &mut dw1, 2000),
    );
    let nnz = csr.nnz() as f64 / 100.0 * 25.0;
    time(
        "dw1 csr 25 rows, 64 columns (in L1), real",
        2.0 * nnz * 64.0,
        || gemm_csr(&csr, 0..25, 64, &y2, 2000, &mut dw1, 2000),
    );
    time(
        "dw1 csr 25 rows, 64 columns, ldb 64, real",
        2.0 * nnz * 64.0,
        || gemm_csr(&csr, 0..25, 64, &y2, 64, &mut dw1, 2000),
    );
    time(
        "csr gather of dv1ᵀ, 100x100 (GFLOP/s meaningless)",
        1.0,
        || csr.gather(100, b, &dv1s, 1, 100),
    );
    // 2×2 mean pooling of 4 images' maps (80 maps of 20×20), GFLOP/s meaningless.
    let maps = vec![0.3f32; 80 * 400];
    let mut pooled = vec![0.0f32; 80 * 100];
    time("mean_pool2, 80 maps 20x20", 80.0 * 400.0, || {
        for (map, out) in maps.chunks_exact(400).zip(pooled.chunks_exact_mut(100)) {
            mean_pool2(map, 20, 10, out)
        }
    });
}
