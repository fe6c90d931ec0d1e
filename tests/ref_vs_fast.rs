//! The batched f32 path against the f64 reference: per-image probabilities, and the batch
//! gradient against the sum of per-image reference gradients (norm-wise relative error ≤ 1e-5),
//! for every activation and pooling, on awkward batch sizes; and bit-for-bit determinism across
//! thread counts.

mod common;

use mnistconv::fast::{self, Workspace};
use mnistconv::mnist::embedded;
use mnistconv::{Activation, Grads, NetConfig, Pooling, reference};

fn check(cfg: &NetConfig, batch: usize, seed: u64) {
    let data = embedded::train();
    let p = common::params(cfg, seed);
    let p64 = p.map(f64::from);
    // An awkward, non-contiguous selection of images.
    let idx: Vec<usize> = (0..batch)
        .map(|i| (i * 37 + seed as usize * 11) % data.len())
        .collect();
    let mut ws = Workspace::new(cfg, batch);
    let mut g = Grads::<f32>::zeros(cfg);
    let st = fast::forward_backward(cfg, &p, &data.images, &data.labels, &idx, &mut ws, &mut g);

    let mut want = Grads::<f64>::zeros(cfg);
    let mut loss = 0.0;
    for (e, &i) in idx.iter().enumerate() {
        let a = reference::forward(cfg, &p64, &data.image_f64(i), usize::from(data.labels[i]));
        let b = reference::backward(cfg, &p64, &a);
        for ((_, w), (_, gt)) in want.tensors_mut().into_iter().zip(b.grads.tensors()) {
            for (x, y) in w.iter_mut().zip(gt) {
                *x += y;
            }
        }
        for (pf, pr) in ws.probs(e).iter().zip(&a.y) {
            assert!(
                (f64::from(*pf) - pr).abs() < 1e-5,
                "probabilities differ: {pf} vs {pr}"
            );
        }
        loss += a.loss;
    }
    assert!(
        (st.loss_sum - loss).abs() <= 1e-4 * loss.max(1.0),
        "loss {} vs {loss}",
        st.loss_sum
    );
    // fast gives the batch mean; the reference sum is B times that.
    let got = g.map(|v| f64::from(v) * batch as f64);
    for ((name, a), (_, b)) in got.tensors().into_iter().zip(want.tensors()) {
        let e = common::norm_rel_error(name, a, b);
        assert!(
            e <= 1e-5,
            "{} batch {batch}: {name} norm-wise relative error {e:.3e} > 1e-5",
            mnistconv::gradcheck::variant_name(cfg)
        );
    }
}

#[test]
fn default_network_matches_reference_on_awkward_batches() {
    for (b, seed) in [(1, 1), (7, 2), (100, 3), (257, 4)] {
        check(&NetConfig::default(), b, seed);
    }
}

#[test]
fn every_activation_and_pooling_with_bias_matches_reference() {
    for act in Activation::ALL {
        for pooling in Pooling::ALL {
            let cfg = NetConfig {
                conv_act: act,
                act,
                pooling,
                bias: true,
                ..NetConfig::default()
            };
            check(&cfg, 19, 5);
        }
    }
}

#[test]
fn other_sizes_match_reference() {
    let cfg = NetConfig {
        ksize: 5,
        n_kernels: 6,
        pool: 4,
        hidden: 33,
        bias: true,
        ..NetConfig::default()
    };
    check(&cfg, 23, 6);
}

#[test]
fn gradients_are_bit_identical_for_any_thread_count() {
    let cfg = NetConfig::default();
    let data = embedded::train();
    let p = common::params(&cfg, 9);
    let idx: Vec<usize> = (0..100).collect();
    let run = |threads: usize| {
        common::in_pool(threads, || {
            let mut ws = Workspace::new(&cfg, 100);
            let mut g = Grads::<f32>::zeros(&cfg);
            fast::forward_backward(&cfg, &p, &data.images, &data.labels, &idx, &mut ws, &mut g);
            g
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

/// The fused training step (`w⁽⁻¹⁾` updated inside its gradient tasks) gives the bits of
/// `forward_backward` followed by the optimiser on each tensor, for any thread count, with
/// and without biases, over three steps (so the momenta are not zero).
#[test]
fn fused_training_step_is_forward_backward_then_sgd() {
    let data = embedded::train();
    let opt = fast::Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    for bias in [false, true] {
        let cfg = NetConfig {
            bias,
            ..NetConfig::default()
        };
        for b in [7, 100] {
            let idx: Vec<usize> = (0..b).map(|i| (i * 13 + 5) % data.len()).collect();
            // Unfused: gradients, then every tensor's update in turn.
            let (mut p0, mut m0) = (common::params(&cfg, 3), Grads::<f32>::zeros(&cfg));
            let mut ws = Workspace::new(&cfg, b);
            let mut g = Grads::<f32>::zeros(&cfg);
            for _ in 0..3 {
                fast::forward_backward(
                    &cfg,
                    &p0,
                    &data.images,
                    &data.labels,
                    &idx,
                    &mut ws,
                    &mut g,
                );
                let tensors = p0.tensors_mut().into_iter().zip(m0.tensors_mut());
                for (((name, w), (_, m)), (_, gt)) in tensors.zip(g.tensors()) {
                    let decay = if name.ends_with("weight") {
                        opt.weight_decay
                    } else {
                        0.0
                    };
                    opt.apply(w, gt, m, decay);
                }
            }
            for threads in [1, 2, 3] {
                let (p, m) = common::in_pool(threads, || {
                    let (mut p, mut m) = (common::params(&cfg, 3), Grads::<f32>::zeros(&cfg));
                    let mut ws = Workspace::new(&cfg, b);
                    let mut g = Grads::<f32>::zeros(&cfg);
                    for _ in 0..3 {
                        fast::train_step(
                            &cfg,
                            &mut p,
                            &mut m,
                            opt,
                            &data.images,
                            &data.labels,
                            &idx,
                            &mut ws,
                            &mut g,
                        );
                    }
                    (p, m)
                });
                assert!(
                    p == p0 && m == m0,
                    "bias {bias}, batch {b}, {threads} threads"
                );
            }
        }
    }
}

/// The forward-only path (inference, `forward_batch`) against the reference's probabilities,
/// losses and predictions, for every activation and pooling and batch sizes from 1 to 257, and
/// bit-identical for any thread count.
#[test]
fn inference_matches_reference_for_small_and_large_batches() {
    let data = embedded::train();
    let mut cfgs = vec![NetConfig::default()];
    for act in Activation::ALL {
        for pooling in Pooling::ALL {
            cfgs.push(NetConfig {
                conv_act: act,
                act,
                pooling,
                bias: true,
                ..NetConfig::default()
            });
        }
    }
    for (v, cfg) in cfgs.iter().enumerate() {
        let p = common::params(cfg, 20 + v as u64);
        let p64 = p.map(f64::from);
        for batch in [1, 15, 16, 101, 257] {
            let idx: Vec<usize> = (0..batch).map(|i| (i * 53 + v) % data.len()).collect();
            let run = |threads: usize| {
                common::in_pool(threads, || {
                    let mut ws = Workspace::new(cfg, batch);
                    let st = fast::forward_batch(
                        cfg,
                        &p,
                        &data.images,
                        Some(&data.labels),
                        &idx,
                        &mut ws,
                    );
                    let probs: Vec<f32> = (0..batch).flat_map(|e| ws.probs(e).to_vec()).collect();
                    (probs, st.loss_sum, st.correct)
                })
            };
            let (probs, loss_sum, correct) = run(2);
            let (mut loss, mut right) = (0.0, 0);
            for (e, &i) in idx.iter().enumerate() {
                let l = usize::from(data.labels[i]);
                let a = reference::forward(cfg, &p64, &data.image_f64(i), l);
                let got = &probs[e * cfg.classes..(e + 1) * cfg.classes];
                for (pf, pr) in got.iter().zip(&a.y) {
                    assert!(
                        (f64::from(*pf) - pr).abs() < 1e-5,
                        "{} batch {batch}: probabilities differ: {pf} vs {pr}",
                        mnistconv::gradcheck::variant_name(cfg)
                    );
                }
                loss += a.loss;
                right += usize::from(fast::argmax(got) == l);
            }
            assert!(
                (loss_sum - loss).abs() <= 1e-4 * loss.max(1.0),
                "loss {loss_sum} vs {loss}"
            );
            assert_eq!(correct, right);
            let (p1, l1, c1) = run(1);
            assert_eq!(p1, probs, "batch {batch}: 1 vs 2 threads");
            assert_eq!((l1, c1), (loss_sum, correct));
            assert_eq!(run(3).0, probs, "batch {batch}: 3 vs 2 threads");
        }
    }
}
