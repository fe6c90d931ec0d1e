//! `explain`: every quantity of the derivation for one image, and a finite-difference check of
//! each factor of the chain rule, on the f64 reference path.
//!
//! Each factor `∂L/∂Q` is checked by perturbing `Q` itself and running the network forward from
//! there ([`loss_from`]); `φ'` is checked against the difference quotient of `φ`; the parameter
//! gradients by perturbing the parameters. A coordinate whose perturbation crosses a ReLU kink or
//! changes a max-pool choice is reported as a kink, not counted.

use crate::config::{Activation, NetConfig};
use crate::gradcheck::{self, rel_error};
use crate::params::Params;
use crate::reference::{self, Activations, Backprop};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_pcg::Pcg64;
use serde::Serialize;

/// Where a forward pass restarts from, with that quantity given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// From the conv output before its activation.
    ConvPre,
    /// From `y⁽⁻³⁾`.
    Y3,
    /// From `y⁽⁻²⁾`.
    Y2,
    /// From `v⁽⁻¹⁾`.
    V1,
    /// From `y⁽⁻¹⁾`.
    Y1,
    /// From the logits `v`.
    V,
}

/// The loss `L` computed from `value` at `stage` onwards (the layers before it are not run).
/// Also returns the kink signature of the layers it ran (ReLU signs and max-pool choices).
pub fn loss_from(
    cfg: &NetConfig,
    p: &Params<f64>,
    d: &[f64],
    stage: Stage,
    value: &[f64],
) -> (f64, Vec<usize>) {
    let mut sig = Vec::new();
    let relu_sig = |act: Activation, v: &[f64], sig: &mut Vec<usize>| {
        if act == Activation::Relu {
            sig.extend(v.iter().map(|&x| usize::from(x > 0.0)));
        }
    };
    let mut v = value.to_vec();
    let mut st = stage;
    loop {
        match st {
            Stage::ConvPre => {
                relu_sig(cfg.conv_act, &v, &mut sig);
                v = reference::act_forward(cfg.conv_act, &v);
                st = Stage::Y3;
            }
            Stage::Y3 => {
                let (y2, argmax) = reference::pool_forward(cfg, &v);
                sig.extend(argmax);
                v = y2;
                st = Stage::Y2;
            }
            Stage::Y2 => {
                v = reference::dense_forward(&p.w_m1, &p.b_m1, &v);
                st = Stage::V1;
            }
            Stage::V1 => {
                relu_sig(cfg.act, &v, &mut sig);
                v = reference::act_forward(cfg.act, &v);
                st = Stage::Y1;
            }
            Stage::Y1 => {
                v = reference::dense_forward(&p.w, &p.b, &v);
                st = Stage::V;
            }
            Stage::V => return (reference::softmax_xent_forward(&v, d).1, sig),
        }
    }
}

/// The finite-difference check of one factor.
#[derive(Clone, Debug, Serialize)]
pub struct FactorCheck {
    /// Coordinates compared.
    pub checked: usize,
    /// Coordinates skipped because a perturbation crossed a kink.
    pub kinks: usize,
    /// Largest `|a − n| / max(|a|, |n|, 1e-8)`.
    pub max_rel_error: f64,
}

impl FactorCheck {
    /// Whether no compared coordinate exceeded [`gradcheck::TOLERANCE`]. (When every sampled
    /// coordinate sat at a kink, nothing was compared: `checked` is 0 and that is what is shown.)
    pub fn passed(&self) -> bool {
        self.max_rel_error <= gradcheck::TOLERANCE
    }
}

/// Checks `analytic` (the claimed derivative of `f` at `x`) on up to `samples` coordinates with
/// the fourth-order central difference; `f` returns the value and a kink signature.
pub fn check_factor(
    x: &[f64],
    analytic: &[f64],
    samples: usize,
    seed: u64,
    mut f: impl FnMut(&[f64]) -> (f64, Vec<usize>),
) -> FactorCheck {
    let h = gradcheck::STEP;
    let mut rng = Pcg64::seed_from_u64(seed);
    let (_, base) = f(x);
    let mut xs = x.to_vec();
    let mut out = FactorCheck {
        checked: 0,
        kinks: 0,
        max_rel_error: 0.0,
    };
    for i in sample(&mut rng, x.len(), samples.min(x.len())).into_iter() {
        let mut at = |delta: f64| {
            xs[i] = x[i] + delta;
            let (l, s) = f(&xs);
            xs[i] = x[i];
            (l, s != base)
        };
        let ((p2, k1), (p1, k2), (m1, k3), (m2, k4)) = (at(2.0 * h), at(h), at(-h), at(-2.0 * h));
        if k1 || k2 || k3 || k4 {
            out.kinks += 1;
            continue;
        }
        let numeric = (8.0 * (p1 - m1) - (p2 - m2)) / (12.0 * h);
        out.checked += 1;
        out.max_rel_error = out.max_rel_error.max(rel_error(analytic[i], numeric));
    }
    out
}

/// One factor of the chain, as `explain` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Factor {
    /// Name in the trace file (`dL_dv`, `grad.fc1.weight`, …).
    pub name: String,
    /// The formula in the document's notation.
    pub formula: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Euclidean norm.
    pub norm: f64,
    /// The first few values.
    pub head: Vec<f64>,
    /// Its finite-difference check.
    pub check: FactorCheck,
}

/// Every quantity for one image: the forward intermediates, the backward factors, and the checks.
#[derive(Clone, Debug)]
pub struct Trace {
    /// The architecture.
    pub cfg: NetConfig,
    /// The forward pass.
    pub acts: Activations,
    /// The backward pass.
    pub back: Backprop,
    /// `φ'(v⁽⁻¹⁾)`.
    pub dphi: Vec<f64>,
    /// The chain, in the document's order, with checks.
    pub factors: Vec<Factor>,
}

/// Runs the reference path on image `x` with target `label` and checks every factor on up to
/// `samples` coordinates each.
pub fn trace(
    cfg: &NetConfig,
    p: &Params<f64>,
    x: &[f64],
    label: usize,
    samples: usize,
    seed: u64,
) -> Trace {
    let a = reference::forward(cfg, p, x, label);
    let b = reference::backward(cfg, p, &a);
    let dphi: Vec<f64> = a
        .y_m1
        .iter()
        .map(|&y| cfg.act.deriv_from_output_f64(y))
        .collect();
    let (n, c, pd) = (cfg.n_kernels, cfg.conv(), cfg.pooled());
    let d = a.d.clone();
    let d = &d;
    let from = |stage: Stage| move |v: &[f64]| loss_from(cfg, p, d, stage, v);
    let param = |t: usize| {
        move |v: &[f64]| {
            let mut q = p.clone();
            q.tensors_mut()[t].1.copy_from_slice(v);
            let r = reference::forward(cfg, &q, x, label);
            let mut sig: Vec<usize> = Vec::new();
            if cfg.conv_act == Activation::Relu {
                sig.extend(r.conv_pre.iter().map(|&v| usize::from(v > 0.0)));
            }
            if cfg.act == Activation::Relu {
                sig.extend(r.v_m1.iter().map(|&v| usize::from(v > 0.0)));
            }
            sig.extend(r.argmax);
            (r.loss, sig)
        }
    };
    let tensor_index = |name: &str| {
        p.tensors()
            .iter()
            .position(|t| t.0 == name)
            .expect("tensor")
    };
    let mut f = Vec::new();
    let mut push = |name: &str, formula: &str, shape: Vec<usize>, v: &[f64], check: FactorCheck| {
        f.push(Factor {
            name: name.into(),
            formula: formula.into(),
            shape,
            norm: v.iter().map(|x| x * x).sum::<f64>().sqrt(),
            head: v.iter().take(4).copied().collect(),
            check,
        });
    };
    let s = samples;
    push(
        "dL_dv",
        "∂L/∂v = y − d",
        vec![cfg.classes],
        &b.dv,
        check_factor(&a.v, &b.dv, s, seed, from(Stage::V)),
    );
    let t = tensor_index("fc2.weight");
    push(
        "grad.fc2.weight",
        "∂J/∂w = (y − d) y⁽⁻¹⁾ᵀ",
        vec![cfg.classes, cfg.hidden],
        &b.grads.w,
        check_factor(&p.w, &b.grads.w, s, seed + 1, param(t)),
    );
    push(
        "dL_dy1",
        "∂L/∂y⁽⁻¹⁾ = wᵀ (y − d)",
        vec![cfg.hidden],
        &b.dy_m1,
        check_factor(&a.y_m1, &b.dy_m1, s, seed + 2, from(Stage::Y1)),
    );
    let act = cfg.act;
    push("dphi_dv1", "φ'(v⁽⁻¹⁾)", vec![cfg.hidden], &dphi, {
        // φ' against the difference quotient of φ, element by element (the sum of φ over
        // coordinates has φ' as its gradient), with ReLU kinks reported.
        check_factor(&a.v_m1, &dphi, s, seed + 3, move |v: &[f64]| {
            let sig = if act == Activation::Relu {
                v.iter().map(|&x| usize::from(x > 0.0)).collect()
            } else {
                Vec::new()
            };
            (v.iter().map(|&x| act.f64(x)).sum(), sig)
        })
    });
    push(
        "dL_dv1",
        "∂L/∂v⁽⁻¹⁾ = ∂L/∂y⁽⁻¹⁾ ⊙ φ'(v⁽⁻¹⁾)",
        vec![cfg.hidden],
        &b.dv_m1,
        check_factor(&a.v_m1, &b.dv_m1, s, seed + 4, from(Stage::V1)),
    );
    let t = tensor_index("fc1.weight");
    push(
        "grad.fc1.weight",
        "∂J/∂w⁽⁻¹⁾ = ∂L/∂v⁽⁻¹⁾ y⁽⁻²⁾ᵀ",
        vec![cfg.hidden, cfg.flat()],
        &b.grads.w_m1,
        check_factor(&p.w_m1, &b.grads.w_m1, s, seed + 5, param(t)),
    );
    push(
        "dL_dy2",
        "∂L/∂y⁽⁻²⁾ = w⁽⁻¹⁾ᵀ ∂L/∂v⁽⁻¹⁾, reshaped",
        vec![n, pd, pd],
        &b.dy_m2,
        check_factor(&a.y_m2, &b.dy_m2, s, seed + 6, from(Stage::Y2)),
    );
    push(
        "dL_dy3",
        "∂L/∂y⁽⁻³⁾ = re-pool(∂L/∂y⁽⁻²⁾)",
        vec![n, c, c],
        &b.dy_m3,
        check_factor(&a.y_m3, &b.dy_m3, s, seed + 7, from(Stage::Y3)),
    );
    push(
        "dL_dconv_pre",
        "∂L/∂conv = ∂L/∂y⁽⁻³⁾ ⊙ act'(conv)",
        vec![n, c, c],
        &b.dconv_pre,
        check_factor(&a.conv_pre, &b.dconv_pre, s, seed + 8, from(Stage::ConvPre)),
    );
    let t = tensor_index("conv.weight");
    push(
        "grad.conv.weight",
        "∂J/∂k = x ⋆ ∂L/∂conv",
        vec![n, 1, cfg.ksize, cfg.ksize],
        &b.grads.k,
        check_factor(&p.k, &b.grads.k, s, seed + 9, param(t)),
    );
    for (name, formula, g, pv) in [
        ("grad.fc2.bias", "∂J/∂b = y − d", &b.grads.b, &p.b),
        (
            "grad.fc1.bias",
            "∂J/∂b⁽⁻¹⁾ = ∂L/∂v⁽⁻¹⁾",
            &b.grads.b_m1,
            &p.b_m1,
        ),
        ("grad.conv.bias", "∂J/∂b_k = Σ ∂L/∂conv", &b.grads.bk, &p.bk),
    ] {
        if !g.is_empty() {
            let t = tensor_index(&name[5..]);
            push(
                name,
                formula,
                vec![g.len()],
                g,
                check_factor(pv, g, s, seed + 10, param(t)),
            );
        }
    }
    Trace {
        cfg: *cfg,
        acts: a,
        back: b,
        dphi,
        factors: f,
    }
}

impl Trace {
    /// Every quantity with its name and shape, as written to the trace file.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f64])> {
        let cfg = &self.cfg;
        let (n, c, pd, img) = (cfg.n_kernels, cfg.conv(), cfg.pooled(), cfg.img);
        let (a, b) = (&self.acts, &self.back);
        let mut t: Vec<(String, Vec<usize>, &[f64])> = vec![
            ("x".into(), vec![img, img], &a.x),
            ("d".into(), vec![cfg.classes], &a.d),
            ("conv_pre".into(), vec![n, c, c], &a.conv_pre),
            ("y3".into(), vec![n, c, c], &a.y_m3),
            ("y2".into(), vec![n, pd, pd], &a.y_m2),
            ("v1".into(), vec![cfg.hidden], &a.v_m1),
            ("y1".into(), vec![cfg.hidden], &a.y_m1),
            ("v".into(), vec![cfg.classes], &a.v),
            ("y".into(), vec![cfg.classes], &a.y),
            ("loss".into(), vec![1], std::slice::from_ref(&a.loss)),
            ("dL_dv".into(), vec![cfg.classes], &b.dv),
            ("dL_dy1".into(), vec![cfg.hidden], &b.dy_m1),
            ("dphi_dv1".into(), vec![cfg.hidden], &self.dphi),
            ("dL_dv1".into(), vec![cfg.hidden], &b.dv_m1),
            ("dL_dy2".into(), vec![n, pd, pd], &b.dy_m2),
            ("dL_dy3".into(), vec![n, c, c], &b.dy_m3),
            ("dL_dconv_pre".into(), vec![n, c, c], &b.dconv_pre),
        ];
        for (name, g) in b.grads.tensors() {
            let shape = crate::params::tensor_shape(cfg, name).expect("known tensor");
            t.push((format!("grad.{name}"), shape, g));
        }
        t
    }

    /// The trace as a safetensors file (f64), written atomically.
    pub fn save(&self, path: &std::path::Path) -> crate::Result<()> {
        use safetensors::{Dtype, tensor::TensorView};
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .tensors()
            .into_iter()
            .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F64, s.clone(), b).expect("sizes agree"),
                )
            })
            .collect();
        let meta = [(
            "config".to_string(),
            serde_json::to_string(&self.cfg).expect("serialises"),
        )]
        .into();
        let out = safetensors::serialize(views, Some(meta)).map_err(|e| {
            crate::Error::Data(format!(
                "{}: cannot serialise the trace: {e}",
                path.display()
            ))
        })?;
        crate::fsutil::atomic_write(path, &out)
    }
}
