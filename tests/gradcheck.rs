//! The hand-derived gradients against finite differences, and proof that the check can fail.

use mnistconv::gradcheck::{self, TOLERANCE, check_gradients};
use mnistconv::mnist::embedded;
use mnistconv::{Init, NetConfig, Params, reference};

#[test]
fn every_variant_passes() {
    let data = embedded::test();
    for (v, cfg) in gradcheck::variants().iter().enumerate() {
        let i = 3 + 5 * v;
        let r = gradcheck::check_variant(
            cfg,
            &data.image_f64(i),
            usize::from(data.labels[i]),
            15,
            100 + v as u64,
        );
        for t in &r.tensors {
            eprintln!(
                "{:<28} {:<12} {:>3} checked {:>2} kinks  {:.2e}",
                r.variant, t.tensor, t.checked, t.kinks, t.max_rel_error
            );
            assert!(t.passed(TOLERANCE), "{} {}: {:?}", r.variant, t.tensor, t);
        }
    }
}

/// A kernel gradient built with a classic mistake (re-pooling without the 1/4 of mean pooling)
/// must be caught, and so must a sign error in the output layer.
#[test]
fn a_wrong_gradient_is_caught() {
    let cfg = NetConfig::default();
    let data = embedded::test();
    let x = data.image_f64(0);
    let l = usize::from(data.labels[0]);
    let p = Params::init_f64(&cfg, Init::He, 4);
    let a = reference::forward(&cfg, &p, &x, l);
    let b = reference::backward(&cfg, &p, &a);

    let ok = check_gradients(&cfg, &p, &x, l, &b.grads, 10, 1);
    assert!(ok.iter().all(|t| t.passed(TOLERANCE)));

    let mut wrong = b.grads.clone();
    wrong.k.iter_mut().for_each(|g| *g *= 4.0); // forgot the /4 of the re-pooling
    wrong.w.iter_mut().for_each(|g| *g = -*g); // d − y instead of y − d
    let r = check_gradients(&cfg, &p, &x, l, &wrong, 10, 1);
    assert!(
        !r[0].passed(TOLERANCE) && r[0].max_rel_error > 0.5,
        "{:?}",
        r[0]
    );
    assert!(r[1].passed(TOLERANCE), "{:?}", r[1]);
    assert!(
        !r[2].passed(TOLERANCE) && r[2].max_rel_error > 1.0,
        "{:?}",
        r[2]
    );
}

/// A conv pre-activation placed 1e-5 above 0, then perturbed by ±2e-4 through its bias, crosses
/// the ReLU kink: that coordinate is reported as a kink, not counted as a pass.
#[test]
fn kinks_are_reported_not_passed() {
    let cfg = NetConfig {
        bias: true,
        ..NetConfig::default()
    };
    let data = embedded::test();
    let x = data.image_f64(1);
    let l = usize::from(data.labels[1]);
    let mut p = Params::init_f64(&cfg, Init::He, 5);
    let pre = reference::conv_forward(&cfg, &x, &p.k, &p.bk);
    let n = 3;
    let conv = cfg.conv();
    // Put the largest pre-activation of map n at +1e-5; the others move down with it.
    let top = pre[n * conv * conv..(n + 1) * conv * conv]
        .iter()
        .cloned()
        .fold(f64::MIN, f64::max);
    p.bk[n] -= top - 1e-5;
    let a = reference::forward(&cfg, &p, &x, l);
    let g = reference::backward(&cfg, &p, &a).grads;
    let r = check_gradients(&cfg, &p, &x, l, &g, 20, 1);
    let bias = r.iter().find(|t| t.tensor == "conv.bias").unwrap();
    assert!(bias.kinks >= 1, "{bias:?}");
    assert_eq!(bias.kinks + bias.checked, 20);
    assert!(bias.passed(TOLERANCE), "{bias:?}");
}
