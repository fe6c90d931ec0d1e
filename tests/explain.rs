//! `explain`: the trace's parameter gradients are the training path's, every printed check is
//! real (a corrupted factor is flagged), and the trace file holds every quantity.

use mnistconv::explain::{self, Stage, check_factor, loss_from};
use mnistconv::fast::{self, Workspace};
use mnistconv::mnist::embedded;
use mnistconv::{Grads, Init, NetConfig, Params, Pooling};

#[test]
fn trace_gradients_equal_the_training_path() {
    let data = embedded::test();
    for cfg in [
        NetConfig::default(),
        NetConfig {
            bias: true,
            pooling: Pooling::Max,
            ..NetConfig::default()
        },
    ] {
        let p = Params::init(&cfg, Init::He, 3);
        for i in [0, 17] {
            let t = explain::trace(
                &cfg,
                &p.map(f64::from),
                &data.image_f64(i),
                usize::from(data.labels[i]),
                2,
                1,
            );
            let mut ws = Workspace::new(&cfg, 1);
            let mut g = Grads::<f32>::zeros(&cfg);
            fast::forward_backward(&cfg, &p, &data.images, &data.labels, &[i], &mut ws, &mut g);
            for ((name, fast), (_, refg)) in g.tensors().into_iter().zip(t.back.grads.tensors()) {
                let num: f64 = fast
                    .iter()
                    .zip(refg)
                    .map(|(a, b)| (f64::from(*a) - b).powi(2))
                    .sum();
                let den: f64 = refg.iter().map(|b| b * b).sum();
                let e = (num / den.max(1e-300)).sqrt();
                assert!(e <= 1e-5, "image {i} {name}: relative error {e:.2e}");
            }
            assert!(
                t.factors.iter().all(|f| f.check.passed()),
                "{:?}",
                t.factors
            );
            assert!(t.factors.iter().map(|f| f.check.checked).sum::<usize>() > 10);
        }
    }
}

/// Each factor's check compares against its own finite differences: a factor computed with a
/// classic mistake fails it.
#[test]
fn a_corrupted_factor_is_flagged() {
    let cfg = NetConfig::default();
    let data = embedded::test();
    let p = Params::init_f64(&cfg, Init::He, 5);
    let t = explain::trace(
        &cfg,
        &p,
        &data.image_f64(3),
        usize::from(data.labels[3]),
        8,
        1,
    );
    let (a, b) = (&t.acts, &t.back);
    let d = a.d.clone();
    let (cfg, p, d) = (&cfg, &p, &d);
    let from = |s: Stage| move |v: &[f64]| loss_from(cfg, p, d, s, v);

    // Re-pooling without the ¼ of mean pooling.
    let wrong: Vec<f64> = b.dy_m3.iter().map(|v| 4.0 * v).collect();
    let c = check_factor(&a.y_m3, &wrong, 8, 7, from(Stage::Y3));
    assert!(!c.passed() && c.max_rel_error > 0.5, "{c:?}");
    assert!(check_factor(&a.y_m3, &b.dy_m3, 8, 7, from(Stage::Y3)).passed());

    // ∂L/∂v as d − y (sign error).
    let wrong: Vec<f64> = b.dv.iter().map(|v| -v).collect();
    assert!(!check_factor(&a.v, &wrong, 8, 7, from(Stage::V)).passed());

    // ∂L/∂y⁽⁻²⁾ through w⁽⁻¹⁾ instead of w⁽⁻¹⁾ᵀ is not even the right length; through a
    // shuffled w⁽⁻¹⁾ᵀ it is wrong everywhere.
    let mut wrong = b.dy_m2.clone();
    wrong.rotate_left(1);
    assert!(!check_factor(&a.y_m2, &wrong, 8, 7, from(Stage::Y2)).passed());
}

#[test]
fn the_trace_file_holds_every_quantity() {
    let cfg = NetConfig {
        bias: true,
        ..NetConfig::default()
    };
    let data = embedded::test();
    let p = Params::init_f64(&cfg, Init::He, 2);
    let t = explain::trace(&cfg, &p, &data.image_f64(0), 1, 2, 1);
    let path = std::env::temp_dir().join(format!(
        "mnistconv-trace-{}.safetensors",
        std::process::id()
    ));
    t.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: &[(&str, &[usize])] = &[
        ("x", &[28, 28]),
        ("d", &[10]),
        ("conv_pre", &[20, 20, 20]),
        ("y3", &[20, 20, 20]),
        ("y2", &[20, 10, 10]),
        ("v1", &[100]),
        ("y1", &[100]),
        ("v", &[10]),
        ("y", &[10]),
        ("loss", &[1]),
        ("dL_dv", &[10]),
        ("dL_dy1", &[100]),
        ("dL_dv1", &[100]),
        ("dL_dy2", &[20, 10, 10]),
        ("dL_dy3", &[20, 20, 20]),
        ("dL_dconv_pre", &[20, 20, 20]),
        ("grad.conv.weight", &[20, 1, 9, 9]),
        ("grad.conv.bias", &[20]),
        ("grad.fc1.weight", &[100, 2000]),
        ("grad.fc1.bias", &[100]),
        ("grad.fc2.weight", &[10, 100]),
        ("grad.fc2.bias", &[10]),
    ];
    for (name, shape) in want {
        let v = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("trace lacks {name}"));
        assert_eq!(v.shape(), *shape, "{name}");
        assert_eq!(v.dtype(), safetensors::Dtype::F64, "{name}");
    }
    // The loss in the file is the loss of the trace.
    let l = f64::from_le_bytes(st.tensor("loss").unwrap().data().try_into().unwrap());
    assert_eq!(l, t.acts.loss);
    std::fs::remove_file(&path).unwrap();
}
