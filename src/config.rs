//! The network's shape: one validated struct, [`NetConfig`], from which every size is derived.
//!
//! Defaults are the design document's "architecture 1":
//! `x` 28×28 → 20 kernels 9×9 → `y⁽⁻³⁾` 20×20×20 → 2×2 pool → `y⁽⁻²⁾` 20×10×10 = 2000
//! → `w⁽⁻¹⁾` 100×2000 → `y⁽⁻¹⁾` 100 → `w` 10×100 → `v`, `y` 10. No biases.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// An element-wise activation, used for the conv maps and for the hidden layer φ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(0, v)`; derivative `1[v > 0]` (0 at the kink).
    #[default]
    Relu,
    /// `1 / (1 + e^−v)`; derivative `y (1 − y)`.
    Sigmoid,
    /// `tanh v`; derivative `1 − y²`.
    Tanh,
}

impl Activation {
    /// All supported activations, for tests and the gradient check.
    pub const ALL: [Activation; 3] = [Activation::Relu, Activation::Sigmoid, Activation::Tanh];

    /// `y = φ(v)` in f64.
    #[inline]
    pub fn f64(self, v: f64) -> f64 {
        match self {
            Activation::Relu => v.max(0.0),
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::Tanh => v.tanh(),
        }
    }

    /// `φ'(v)` written in terms of the output `y = φ(v)` (f64). For ReLU `y > 0 ⇔ v > 0`,
    /// so no pre-activation needs to be stored.
    #[inline]
    pub fn deriv_from_output_f64(self, y: f64) -> f64 {
        match self {
            Activation::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => y * (1.0 - y),
            Activation::Tanh => 1.0 - y * y,
        }
    }

    /// `y = φ(v)` in f32.
    #[inline]
    pub fn f32(self, v: f32) -> f32 {
        match self {
            Activation::Relu => v.max(0.0),
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::Tanh => v.tanh(),
        }
    }

    /// `φ'(v)` from `y = φ(v)` in f32.
    #[inline]
    pub fn deriv_from_output_f32(self, y: f32) -> f32 {
        match self {
            Activation::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => y * (1.0 - y),
            Activation::Tanh => 1.0 - y * y,
        }
    }

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
        }
    }
}

/// How a `pool×pool` window of `y⁽⁻³⁾` becomes one value of `y⁽⁻²⁾`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The window's mean (the document's). Backward: spread, divided by `pool²`.
    #[default]
    Mean,
    /// The window's maximum. Backward: routed to the arg-max (first one on ties).
    Max,
}

impl Pooling {
    /// Both poolings.
    pub const ALL: [Pooling; 2] = [Pooling::Mean, Pooling::Max];

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Max => "max",
        }
    }
}

/// The architecture. Build with [`NetConfig::default`] and change fields, then [`NetConfig::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetConfig {
    /// Side of the square input image (28).
    pub img: usize,
    /// Side of each square kernel (9).
    pub ksize: usize,
    /// Number of kernels, i.e. of conv maps (20).
    pub n_kernels: usize,
    /// Side of the square pooling window, also its stride (2).
    pub pool: usize,
    /// Width of the hidden fully connected layer (100).
    pub hidden: usize,
    /// Number of classes (10).
    pub classes: usize,
    /// Activation applied to the conv maps, giving `y⁽⁻³⁾` (ReLU).
    pub conv_act: Activation,
    /// φ, the hidden layer's activation, giving `y⁽⁻¹⁾` (ReLU).
    pub act: Activation,
    /// Pooling (mean).
    pub pooling: Pooling,
    /// Biases on the conv and both dense layers (off: the document has none).
    pub bias: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            img: 28,
            ksize: 9,
            n_kernels: 20,
            pool: 2,
            hidden: 100,
            classes: 10,
            conv_act: Activation::Relu,
            act: Activation::Relu,
            pooling: Pooling::Mean,
            bias: false,
        }
    }
}

impl NetConfig {
    /// Side of a conv map: `img − ksize + 1` (valid correlation, stride 1). 20 by default.
    pub fn conv(&self) -> usize {
        self.img + 1 - self.ksize
    }
    /// Side of a pooled map: `conv / pool`. 10 by default.
    pub fn pooled(&self) -> usize {
        self.conv() / self.pool
    }
    /// Length of `y⁽⁻²⁾` flattened (n, row, col): `n_kernels · pooled²`. 2000 by default.
    pub fn flat(&self) -> usize {
        self.n_kernels * self.pooled() * self.pooled()
    }
    /// Pixels per image: `img²`.
    pub fn pixels(&self) -> usize {
        self.img * self.img
    }
    /// Total number of trainable parameters (202,620 by default, bias-free).
    pub fn n_params(&self) -> usize {
        let b = usize::from(self.bias);
        self.n_kernels * (self.ksize * self.ksize + b)
            + self.hidden * (self.flat() + b)
            + self.classes * (self.hidden + b)
    }

    /// Checks that the sizes make a network: every size positive, the kernel fits the image,
    /// the pool divides the conv map, and nothing is absurdly large.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("img", self.img),
            ("ksize", self.ksize),
            ("n_kernels", self.n_kernels),
            ("pool", self.pool),
            ("hidden", self.hidden),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.classes < 2 {
            return bad(format!("classes must be at least 2, got {}", self.classes));
        }
        if self.img > 1024
            || self.n_kernels > 4096
            || self.hidden > 1 << 16
            || self.classes > 1 << 16
        {
            return bad(
                "sizes too large (img ≤ 1024, n_kernels ≤ 4096, hidden and classes ≤ 65536)".into(),
            );
        }
        if self.ksize > self.img {
            return bad(format!(
                "kernel size {} is larger than the image ({})",
                self.ksize, self.img
            ));
        }
        let conv = self.conv();
        if !conv.is_multiple_of(self.pool) {
            return bad(format!(
                "pool size {} does not divide the conv map side {} (= img {} − ksize {} + 1)",
                self.pool, conv, self.img, self.ksize
            ));
        }
        if self.n_params() > 1 << 30 {
            return bad(format!("{} parameters is too many", self.n_params()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_sizes_are_the_documents() {
        let c = NetConfig::default();
        c.validate().unwrap();
        assert_eq!((c.conv(), c.pooled(), c.flat()), (20, 10, 2000));
        assert_eq!(c.n_params(), 1620 + 200_000 + 1000);
    }

    #[test]
    fn pool_must_divide_conv_map() {
        let c = NetConfig {
            pool: 3,
            ..NetConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("does not divide"), "{e}");
    }

    #[test]
    fn kernel_larger_than_image_is_rejected() {
        let c = NetConfig {
            ksize: 29,
            ..NetConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
