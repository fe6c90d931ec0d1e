//! The conv kernels on dense slots and on MNIST digits, timed in alternation in one process
//! (minimum over 40 rounds, µs per image, one thread): how much skipping the blank background
//! saves. As in training: slots and maps in aligned buffers, each slot's ink as `fill` gave it.
use mnistconv::kernels::*;
use std::time::Instant;
fn main() {
    let m = 4;
    let w = Wide { img: 28, ks: 9 };
    let be = backend();
    let mut x = Aligned::zeroed(m * w.slot());
    x.fill(0.5);
    let dense = vec![w.ink(&x[..w.slot()]); m];
    let digits = mnistconv::mnist::embedded::train();
    let mut xd = Aligned::zeroed(m * w.slot());
    let mut inks = Vec::new();
    for (e, slot) in xd.chunks_exact_mut(w.slot()).enumerate() {
        inks.push(w.fill(digits.image((e * 997 + 13) % digits.len()), slot));
    }
    let k = vec![0.1f32; 20 * 81];
    let mut z = Aligned::zeroed(m * 20 * w.wq());
    let mut dk = vec![0.0f32; 20 * 81];
    let mut best = [f64::INFINITY; 4];
    for _ in 0..40 {
        for (v, best) in best.iter_mut().enumerate() {
            let (xs, ink) = if v % 2 == 0 {
                (&x, &dense)
            } else {
                (&xd, &inks)
            };
            let t = Instant::now();
            for _ in 0..100 {
                if v < 2 {
                    conv_wide_fused_on(be, w, &k, &[], true, 20, xs, Some(ink), m, &mut z)
                } else {
                    conv_wide_dk_on(be, w, &z, 20, xs, Some(ink), m, &mut dk)
                }
            }
            *best = best.min(t.elapsed().as_secs_f64() / 100.0 / m as f64 * 1e6);
        }
    }
    println!(
        "{be:?}: fwd dense {:.2} digits {:.2} | dk dense {:.2} digits {:.2} µs/img",
        best[0], best[1], best[2], best[3]
    );
}
