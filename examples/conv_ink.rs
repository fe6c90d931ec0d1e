//! The conv kernels on dense slots and on MNIST digits, timed in alternation in one process
//! (minimum over 40 rounds, µs per image, one thread): how much skipping the blank background saves.
use mnistconv::kernels::*;
use std::time::Instant;
fn main() {
    let m = 4;
    let w = Wide { img: 28, ks: 9 };
    let x = vec![0.5f32; m * w.slot()];
    let digits = mnistconv::mnist::embedded::train();
    let mut xd = vec![0.0f32; m * w.slot()];
    for (e, slot) in xd.chunks_exact_mut(w.slot()).enumerate() {
        w.fill(digits.image((e * 997 + 13) % digits.len()), slot);
    }
    let k = vec![0.1f32; 20 * 81];
    let mut z = vec![0.0f32; m * 20 * w.wq()];
    let mut dk = vec![0.0f32; 20 * 81];
    let mut best = [f64::INFINITY; 4];
    for _ in 0..40 {
        for (v, best) in best.iter_mut().enumerate() {
            let xs = if v % 2 == 0 { &x } else { &xd };
            let t = Instant::now();
            for _ in 0..100 {
                if v < 2 {
                    conv_wide(w, &k, 20, xs, m, &mut z)
                } else {
                    conv_wide_dk(w, &z, 20, xs, m, &mut dk)
                }
            }
            *best = best.min(t.elapsed().as_secs_f64() / 100.0 / m as f64 * 1e6);
        }
    }
    println!(
        "fwd dense {:.2} digits {:.2} | dk dense {:.2} digits {:.2} µs/img",
        best[0], best[1], best[2], best[3]
    );
}
