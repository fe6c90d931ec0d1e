//! Gradient check: the hand-derived gradients of [`crate::reference::backward`] against central
//! finite differences of the loss, in f64.
//!
//! The numeric derivative is the fourth-order central difference
//! `(8(L(θ+h) − L(θ−h)) − (L(θ+2h) − L(θ−2h))) / 12h`, whose truncation error (`O(h⁴)`) is far
//! below the rounding error of `L` for `h = 1e-4`. The error reported per coordinate is
//! `|a − n| / max(|a|, |n|, 1e-8)`.
//!
//! A coordinate whose perturbation moves some ReLU pre-activation across 0 or changes a max-pool
//! arg-max is not differentiable there; it is reported as a *kink* and not counted as a pass.

use crate::config::{Activation, NetConfig};
use crate::params::{Grads, Params};
use crate::reference;
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_pcg::Pcg64;
use serde::Serialize;

/// The step `h` of the finite differences.
pub const STEP: f64 = 1e-4;
/// The pass threshold on the max relative error.
pub const TOLERANCE: f64 = 1e-6;

/// The result for one parameter tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorCheck {
    /// Checkpoint name of the tensor (`conv.weight`, …).
    pub tensor: String,
    /// Coordinates compared.
    pub checked: usize,
    /// Coordinates skipped because a perturbation crossed a ReLU kink or max-pool tie.
    pub kinks: usize,
    /// Largest relative error over the compared coordinates.
    pub max_rel_error: f64,
    /// The worst coordinate: (flat index, analytic, numeric).
    pub worst: Option<(usize, f64, f64)>,
}

impl TensorCheck {
    /// Whether the tensor passes (and something was compared).
    pub fn passed(&self, tol: f64) -> bool {
        self.checked > 0 && self.max_rel_error <= tol
    }
}

/// The relative error `|a − n| / max(|a|, |n|, 1e-8)`.
pub fn rel_error(a: f64, n: f64) -> f64 {
    (a - n).abs() / a.abs().max(n.abs()).max(1e-8)
}

/// Which side of every kink the forward pass is on: ReLU signs (where ReLU is used) and max-pool
/// arg-maxes. Two points with the same signature lie on one smooth piece of the loss.
fn signature(cfg: &NetConfig, a: &reference::Activations) -> (Vec<bool>, Vec<usize>) {
    let mut s = Vec::new();
    if cfg.conv_act == Activation::Relu {
        s.extend(a.conv_pre.iter().map(|&v| v > 0.0));
    }
    if cfg.act == Activation::Relu {
        s.extend(a.v_m1.iter().map(|&v| v > 0.0));
    }
    (s, a.argmax.clone())
}

/// Checks `grads` (the analytic gradients for image `x`, `label`) against finite differences on
/// up to `samples` coordinates of each tensor, drawn with `seed`.
pub fn check_gradients(
    cfg: &NetConfig,
    params: &Params<f64>,
    x: &[f64],
    label: usize,
    grads: &Grads<f64>,
    samples: usize,
    seed: u64,
) -> Vec<TensorCheck> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let base = signature(cfg, &reference::forward(cfg, params, x, label));
    let mut p = params.clone();
    let names: Vec<&'static str> = params.tensors().iter().map(|t| t.0).collect();
    let analytic: Vec<Vec<f64>> = grads.tensors().iter().map(|t| t.1.to_vec()).collect();
    let mut out = Vec::new();
    for (t, name) in names.iter().enumerate() {
        let len = analytic[t].len();
        let coords = sample(&mut rng, len, samples.min(len)).into_vec();
        let mut tc = TensorCheck {
            tensor: name.to_string(),
            checked: 0,
            kinks: 0,
            max_rel_error: 0.0,
            worst: None,
        };
        for &ci in &coords {
            let orig = p.tensors()[t].1[ci];
            let mut eval = |delta: f64| {
                p.tensors_mut()[t].1[ci] = orig + delta;
                let a = reference::forward(cfg, &p, x, label);
                (a.loss, signature(cfg, &a) != base)
            };
            let h = STEP;
            let (lp2, k1) = eval(2.0 * h);
            let (lp1, k2) = eval(h);
            let (lm1, k3) = eval(-h);
            let (lm2, k4) = eval(-2.0 * h);
            p.tensors_mut()[t].1[ci] = orig;
            if k1 || k2 || k3 || k4 {
                tc.kinks += 1;
                continue;
            }
            // Differences first, so equal losses give exactly 0.
            let numeric = (8.0 * (lp1 - lm1) - (lp2 - lm2)) / (12.0 * h);
            let a = analytic[t][ci];
            let e = rel_error(a, numeric);
            tc.checked += 1;
            if e > tc.max_rel_error || tc.worst.is_none() {
                tc.max_rel_error = tc.max_rel_error.max(e);
                tc.worst = Some((ci, a, numeric));
            }
        }
        out.push(tc);
    }
    out
}

/// One network variant checked, with its tensors' results.
#[derive(Clone, Debug, Serialize)]
pub struct VariantCheck {
    /// The configuration checked.
    pub config: NetConfig,
    /// Label of the variant, e.g. `relu/mean/bias`.
    pub variant: String,
    /// Per-tensor results.
    pub tensors: Vec<TensorCheck>,
}

/// The variants the `gradcheck` command covers: the document's network, and every activation
/// (for both the conv maps and φ) with every pooling, biases on so that every tensor is checked.
pub fn variants() -> Vec<NetConfig> {
    let mut v = vec![NetConfig::default()];
    for act in Activation::ALL {
        for pooling in crate::config::Pooling::ALL {
            v.push(NetConfig {
                conv_act: act,
                act,
                pooling,
                bias: true,
                ..NetConfig::default()
            });
        }
    }
    v
}

/// Name of a variant: `conv_act/φ/pooling/bias|nobias`.
pub fn variant_name(cfg: &NetConfig) -> String {
    format!(
        "{}/{}/{}/{}",
        cfg.conv_act.name(),
        cfg.act.name(),
        cfg.pooling.name(),
        if cfg.bias { "bias" } else { "nobias" }
    )
}

/// Runs the check for one variant on one image with He-initialised weights from `seed`.
/// Biases, which start at 0, get small random values so their gradients are exercised generally.
pub fn check_variant(
    cfg: &NetConfig,
    x: &[f64],
    label: usize,
    samples: usize,
    seed: u64,
) -> VariantCheck {
    let mut params = Params::init_f64(cfg, crate::params::Init::He, seed);
    let mut i = 0u64;
    for b in [&mut params.bk, &mut params.b_m1, &mut params.b] {
        for v in b.iter_mut() {
            i += 1;
            *v = 0.05 * ((i * 2654435761 % 1000) as f64 / 500.0 - 1.0);
        }
    }
    let a = reference::forward(cfg, &params, x, label);
    let g = reference::backward(cfg, &params, &a).grads;
    VariantCheck {
        config: *cfg,
        variant: variant_name(cfg),
        tensors: check_gradients(cfg, &params, x, label, &g, samples, seed ^ 0x9e37),
    }
}
