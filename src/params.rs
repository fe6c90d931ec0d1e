//! The trainable tensors, stored as flat vectors in the layout of the equivalent PyTorch
//! module's `state_dict` (weights `[out, in]`), and their initialisation.
//!
//! | field  | derivation   | checkpoint name | shape                    |
//! |--------|--------------|-----------------|--------------------------|
//! | `k`    | `k_{n,i,j}`  | `conv.weight`   | `[n_kernels, 1, ks, ks]` |
//! | `bk`   | (bias)       | `conv.bias`     | `[n_kernels]`            |
//! | `w_m1` | `w⁽⁻¹⁾`      | `fc1.weight`    | `[hidden, flat]`         |
//! | `b_m1` | (bias)       | `fc1.bias`      | `[hidden]`               |
//! | `w`    | `w`          | `fc2.weight`    | `[classes, hidden]`      |
//! | `b`    | (bias)       | `fc2.bias`      | `[classes]`              |
//!
//! Gradients use the same type ([`Grads`]); bias vectors are empty when biases are off.

use crate::config::NetConfig;
use crate::kernels::Aligned;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};

/// The network's parameters (or gradients), generic over the float type: `f32` for training,
/// `f64` for the reference path.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    /// Kernels `k`: `[n_kernels, ks, ks]` (n, i, j).
    pub k: Aligned<T>,
    /// Conv biases: `[n_kernels]`, or empty.
    pub bk: Aligned<T>,
    /// `w⁽⁻¹⁾`: `[hidden, flat]`.
    pub w_m1: Aligned<T>,
    /// Hidden biases: `[hidden]`, or empty.
    pub b_m1: Aligned<T>,
    /// `w`: `[classes, hidden]`.
    pub w: Aligned<T>,
    /// Output biases: `[classes]`, or empty.
    pub b: Aligned<T>,
}

/// Gradients have the parameters' type and layout.
pub type Grads<T> = Params<T>;

/// How to draw the initial weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The MATLAB MnistConv code the document follows: `k ~ 0.01·N(0,1)`,
    /// `w⁽⁻¹⁾ ~ U(−1,1)·√6/√(360+2000)` (sic: 360, not the fan-in), `w ~ U(−1,1)·√6/√(10+100)`.
    Book,
    /// He (Kaiming) normal: each weight `~ N(0, 2/fan_in)`, suited to ReLU. Biases 0.
    He,
}

impl<T: Copy + Default> Params<T> {
    /// All-zero tensors of the right sizes (`Grads::zeros` before accumulating with `+=`).
    pub fn zeros(cfg: &NetConfig) -> Self {
        let z = |n: usize| Aligned::zeroed(n);
        let nb = |n: usize| if cfg.bias { n } else { 0 };
        Params {
            k: z(cfg.n_kernels * cfg.ksize * cfg.ksize),
            bk: z(nb(cfg.n_kernels)),
            w_m1: z(cfg.hidden * cfg.flat()),
            b_m1: z(nb(cfg.hidden)),
            w: z(cfg.classes * cfg.hidden),
            b: z(nb(cfg.classes)),
        }
    }

    /// Applies `f` to every element, giving a new tensor set (e.g. to change precision).
    pub fn map<U: Copy + Default>(&self, f: impl Fn(T) -> U + Copy) -> Params<U> {
        let m = |v: &Aligned<T>| v.iter().map(|&x| f(x)).collect();
        Params {
            k: m(&self.k),
            bk: m(&self.bk),
            w_m1: m(&self.w_m1),
            b_m1: m(&self.b_m1),
            w: m(&self.w),
            b: m(&self.b),
        }
    }

    /// The tensors with their checkpoint names, in a fixed order (biases only when present).
    pub fn tensors(&self) -> Vec<(&'static str, &[T])> {
        let all: [(&'static str, &[T]); 6] = [
            ("conv.weight", &self.k),
            ("conv.bias", &self.bk),
            ("fc1.weight", &self.w_m1),
            ("fc1.bias", &self.b_m1),
            ("fc2.weight", &self.w),
            ("fc2.bias", &self.b),
        ];
        all.into_iter().filter(|(_, t)| !t.is_empty()).collect()
    }

    /// Mutable access to the tensors, in the order of [`Params::tensors`].
    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Aligned<T>)> {
        let all: [(&'static str, &mut Aligned<T>); 6] = [
            ("conv.weight", &mut self.k),
            ("conv.bias", &mut self.bk),
            ("fc1.weight", &mut self.w_m1),
            ("fc1.bias", &mut self.b_m1),
            ("fc2.weight", &mut self.w),
            ("fc2.bias", &mut self.b),
        ];
        all.into_iter().filter(|(_, t)| !t.is_empty()).collect()
    }
}

/// The PyTorch `state_dict` shape of each tensor, by checkpoint name.
pub fn tensor_shape(cfg: &NetConfig, name: &str) -> Option<Vec<usize>> {
    Some(match name {
        "conv.weight" => vec![cfg.n_kernels, 1, cfg.ksize, cfg.ksize],
        "conv.bias" => vec![cfg.n_kernels],
        "fc1.weight" => vec![cfg.hidden, cfg.flat()],
        "fc1.bias" => vec![cfg.hidden],
        "fc2.weight" => vec![cfg.classes, cfg.hidden],
        "fc2.bias" => vec![cfg.classes],
        _ => return None,
    })
}

impl Params<f32> {
    /// Draws initial weights with `init`, reproducibly from `seed` (PCG-64).
    pub fn init(cfg: &NetConfig, init: Init, seed: u64) -> Self {
        Params::<f64>::init_f64(cfg, init, seed).map(|x| x as f32)
    }
}

impl Params<f64> {
    /// As [`Params::init`], in f64.
    pub fn init_f64(cfg: &NetConfig, init: Init, seed: u64) -> Self {
        let mut rng = Pcg64::seed_from_u64(seed);
        let mut p = Params::<f64>::zeros(cfg);
        let ks2 = (cfg.ksize * cfg.ksize) as f64;
        match init {
            Init::Book => {
                normal(&mut rng, &mut p.k, 0.01);
                uniform(
                    &mut rng,
                    &mut p.w_m1,
                    6f64.sqrt() / (360.0f64 + 2000.0).sqrt(),
                );
                uniform(&mut rng, &mut p.w, 6f64.sqrt() / (10.0f64 + 100.0).sqrt());
            }
            Init::He => {
                normal(&mut rng, &mut p.k, (2.0 / ks2).sqrt());
                normal(&mut rng, &mut p.w_m1, (2.0 / cfg.flat() as f64).sqrt());
                normal(&mut rng, &mut p.w, (2.0 / cfg.hidden as f64).sqrt());
            }
        }
        p
    }
}

fn normal(rng: &mut Pcg64, v: &mut [f64], std: f64) {
    for x in v {
        let z: f64 = StandardNormal.sample(rng);
        *x = std * z;
    }
}

fn uniform(rng: &mut Pcg64, v: &mut [f64], scale: f64) {
    for x in v {
        *x = scale * rng.random_range(-1.0..1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_reproducible_and_seed_dependent() {
        let cfg = NetConfig::default();
        let a = Params::init(&cfg, Init::He, 7);
        assert_eq!(a, Params::init(&cfg, Init::He, 7));
        assert_ne!(a, Params::init(&cfg, Init::He, 8));
        assert_eq!(a.tensors().len(), 3);
    }

    #[test]
    fn book_init_scales() {
        let cfg = NetConfig::default();
        let p = Params::init(&cfg, Init::Book, 1);
        let bound = (6f32).sqrt() / (2360f32).sqrt();
        assert!(p.w_m1.iter().all(|x| x.abs() <= bound));
        let std = (p.k.iter().map(|x| x * x).sum::<f32>() / p.k.len() as f32).sqrt();
        assert!((std - 0.01).abs() < 0.002, "{std}");
    }
}
