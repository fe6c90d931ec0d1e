//! Per-layer micro-benchmarks, reference (f64, loops) vs fast (f32, SIMD kernels), and the whole
//! network per image for several batch sizes and thread counts. `cargo bench` runs them; each line
//! is the median of several timed rounds, per image. (A plain harness keeps the dependency tree
//! small; the numbers are medians, never asserted.)

use mnistconv::fast::{self, Workspace};
use mnistconv::kernels::{self, Wide};
use mnistconv::mnist::embedded;
use mnistconv::{Grads, Init, NetConfig, Params, reference};
use std::hint::black_box;
use std::time::Instant;

/// Median over 7 rounds of the time per call, in µs; each round runs `f` for about 50 ms.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.05 / once) as usize).clamp(1, 100_000);
    let mut v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64 * 1e6
        })
        .collect();
    mnistconv::bench::median(&mut v)
}

fn row(layer: &str, reference_us: f64, fast_us: f64) {
    println!(
        "{layer:<34} {reference_us:>12.2} {fast_us:>12.2} {:>9.1}×",
        reference_us / fast_us
    );
}

fn main() {
    // `cargo bench -- <filter>` passes arguments; `cargo test --benches` passes --bench. Ignore both.
    let cfg = NetConfig::default();
    let data = embedded::train();
    let p = Params::init(&cfg, Init::He, 1);
    let p64 = p.map(f64::from);
    let x64 = data.image_f64(0);
    let label = usize::from(data.labels[0]);
    let a = reference::forward(&cfg, &p64, &x64, label);
    let bp = reference::backward(&cfg, &p64, &a);

    println!(
        "per image, µs (median)             {:>12} {:>12} {:>10}",
        "reference", "fast", "speed-up"
    );
    let w = Wide { img: 28, ks: 9 };
    let mut xs = vec![0.0f32; w.slot()];
    w.fill(data.image(0), &mut xs);
    let mut z = vec![0.0f32; 20 * w.wq()];
    row(
        "conv forward (x ⋆ k)",
        time(|| {
            black_box(reference::conv_forward(&cfg, &x64, &p64.k, &[]));
        }),
        time(|| kernels::conv_wide(w, &p.k, 20, &xs, 1, &mut z)),
    );
    let mut dk = vec![0.0f32; 20 * 81];
    let mut dk64 = vec![0.0f64; 20 * 81];
    row(
        "conv backward (∂J/∂k = x ⋆ δ)",
        time(|| reference::conv_backward_kernels(&cfg, &x64, &bp.dconv_pre, &mut dk64, &mut [])),
        time(|| kernels::conv_wide_dk(w, &z, 20, &xs, 1, &mut dk)),
    );
    let mut y2 = vec![0.0f32; 2000];
    row(
        "mean pool forward",
        time(|| {
            black_box(reference::pool_forward(&cfg, &a.y_m3));
        }),
        time(|| {
            for n in 0..20 {
                kernels::mean_pool2(
                    &z[n * w.wq()..(n + 1) * w.wq()],
                    20,
                    10,
                    &mut y2[n * 100..(n + 1) * 100],
                );
            }
        }),
    );
    let mut dz = vec![0.0f32; 20 * w.wq()];
    row(
        "re-pool + ReLU' backward",
        time(|| {
            let d = reference::pool_backward(&cfg, &bp.dy_m2, &a.argmax);
            black_box(reference::act_backward(cfg.conv_act, &a.y_m3, &d));
        }),
        time(|| {
            for n in 0..20 {
                let m = n * w.wq()..(n + 1) * w.wq();
                kernels::mean_repool2_relu(
                    &y2[n * 100..(n + 1) * 100],
                    &z[m.clone()],
                    20,
                    10,
                    &mut dz[m],
                );
            }
        }),
    );
    // Dense layers: the fast path runs them over a batch of 100; per-image time is that / 100.
    let b = 100;
    let y2b = vec![0.01f32; b * 2000];
    let mut w1t = vec![0.0f32; 2000 * 100];
    for i in 0..100 {
        for j in 0..2000 {
            w1t[j * 100 + i] = p.w_m1[i * 2000 + j];
        }
    }
    let mut y1 = vec![0.0f32; b * 100];
    row(
        "fc1 forward (w⁽⁻¹⁾ y⁽⁻²⁾), batch 100",
        time(|| {
            black_box(reference::dense_forward(&p64.w_m1, &[], &a.y_m2));
        }),
        time(|| kernels::gemm_nn(b, 100, 2000, &y2b, 2000, 1, &w1t, 100, &mut y1, 100, false))
            / b as f64,
    );
    let dv1 = vec![0.01f32; b * 100];
    let mut dw1 = vec![0.0f32; 100 * 2000];
    let mut dy2 = vec![0.0f32; b * 2000];
    let mut dw1_64 = vec![0.0f64; 100 * 2000];
    row(
        "fc1 backward (∂J/∂w⁽⁻¹⁾, ∂L/∂y⁽⁻²⁾)",
        time(|| {
            black_box(reference::dense_backward(
                &p64.w_m1,
                &a.y_m2,
                &bp.dv_m1,
                &mut dw1_64,
                &mut [],
            ));
        }),
        time(|| {
            kernels::gemm_nn(
                100, 2000, b, &dv1, 1, 100, &y2b, 2000, &mut dw1, 2000, false,
            );
            kernels::gemm_nn(
                b, 2000, 100, &dv1, 100, 1, &p.w_m1, 2000, &mut dy2, 2000, false,
            );
        }) / b as f64,
    );

    let ref_step = time(|| {
        let a = reference::forward(&cfg, &p64, &x64, label);
        black_box(reference::backward(&cfg, &p64, &a));
    });
    println!("\nwhole training step, per image, µs (reference: {ref_step:.1})");
    let threads_all = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    for batch in [1, 64, 256] {
        for threads in [1, threads_all] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let idx: Vec<usize> = (0..batch).collect();
            let mut ws = Workspace::new(&cfg, batch);
            let mut g = Grads::<f32>::zeros(&cfg);
            let t = pool.install(|| {
                time(|| {
                    fast::forward_backward(
                        &cfg,
                        &p,
                        &data.images,
                        &data.labels,
                        &idx,
                        &mut ws,
                        &mut g,
                    );
                })
            }) / batch as f64;
            println!(
                "  fast, batch {batch:>3}, {threads} thread(s): {t:>8.2}   ({:.0}× the reference)",
                ref_step / t
            );
        }
    }
}
