//! The reference path: f64, one image at a time, plain loops that read like the derivation.
//! Never optimised; the batched f32 path ([`crate::fast`]) is tested against it.
//!
//! Each layer's forward is followed by its backward. Index letters follow the document:
//! `n` kernel, `i, j` kernel offsets, `r, c` map positions.
//!
//! Forward (default sizes):
//! ```text
//! x         (28, 28)
//! conv_pre  (20, 20, 20)  = x ⋆ k_n  (+ b_n)             valid cross-correlation
//! y_m3      (20, 20, 20)  = act(conv_pre)                  y⁽⁻³⁾
//! y_m2      (2000)        = pool(y_m3), flattened (n,r,c)  y⁽⁻²⁾
//! v_m1      (100)         = w_m1 · y_m2 (+ b_m1)           v⁽⁻¹⁾
//! y_m1      (100)         = φ(v_m1)                        y⁽⁻¹⁾
//! v         (10)          = w · y_m1 (+ b)
//! y         (10)          = softmax(v)
//! loss                    = Σ −d_i log y_i
//! ```

use crate::config::{Activation, NetConfig, Pooling};
use crate::params::{Grads, Params};

// ---------------------------------------------------------------------------------------------
// conv

/// Forward convolution as the document asks: MATLAB's `conv2(x, rot90(k, 2), 'valid')`, which is
/// the valid cross-correlation
/// `conv_pre[n][r][c] = Σ_{i,j} x[r+i][c+j] · k[n][i][j] (+ b_n)`.
///
/// # Shapes
/// `x`: (img, img); `k`: (n_kernels, ks, ks); `bk`: (n_kernels) or empty;
/// returns (n_kernels, conv, conv).
pub fn conv_forward(cfg: &NetConfig, x: &[f64], k: &[f64], bk: &[f64]) -> Vec<f64> {
    let (img, ks, conv) = (cfg.img, cfg.ksize, cfg.conv());
    let mut out = vec![0.0; cfg.n_kernels * conv * conv];
    for n in 0..cfg.n_kernels {
        for r in 0..conv {
            for c in 0..conv {
                let mut s = if bk.is_empty() { 0.0 } else { bk[n] };
                for i in 0..ks {
                    for j in 0..ks {
                        s += x[(r + i) * img + (c + j)] * k[(n * ks + i) * ks + j];
                    }
                }
                out[(n * conv + r) * conv + c] = s;
            }
        }
    }
    out
}

/// Kernel gradient (document: `[∂J/∂k_n]₉ₓ₉ = [∂L/∂y⁽⁻³⁾]₂₀ₓ₂₀ * [x]₂₈ₓ₂₈`): the valid
/// cross-correlation of the input with the backprop map of kernel `n`,
/// `dk[n][i][j] += Σ_{r,c} x[r+i][c+j] · dconv_pre[n][r][c]`, and `dbk[n] += Σ_{r,c} dconv_pre[n][r][c]`.
/// `dconv_pre` is the re-pooled map already multiplied by the conv activation's derivative.
/// There is no `dx`: x is data. Accumulates (`+=`).
///
/// # Shapes
/// `x`: (img, img); `dconv_pre`: (n_kernels, conv, conv); `dk`: (n_kernels, ks, ks); `dbk`: (n_kernels) or empty.
pub fn conv_backward_kernels(
    cfg: &NetConfig,
    x: &[f64],
    dconv_pre: &[f64],
    dk: &mut [f64],
    dbk: &mut [f64],
) {
    let (img, ks, conv) = (cfg.img, cfg.ksize, cfg.conv());
    for n in 0..cfg.n_kernels {
        for i in 0..ks {
            for j in 0..ks {
                let mut s = 0.0;
                for r in 0..conv {
                    for c in 0..conv {
                        s += x[(r + i) * img + (c + j)] * dconv_pre[(n * conv + r) * conv + c];
                    }
                }
                dk[(n * ks + i) * ks + j] += s;
            }
        }
        if !dbk.is_empty() {
            dbk[n] += dconv_pre[n * conv * conv..(n + 1) * conv * conv]
                .iter()
                .sum::<f64>();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// activation

/// `y = act(v)` element-wise.
pub fn act_forward(act: Activation, v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| act.f64(x)).collect()
}

/// `dv = dy ⊙ act'(v)`, with `act'` written from the output `y`.
pub fn act_backward(act: Activation, y: &[f64], dy: &[f64]) -> Vec<f64> {
    y.iter()
        .zip(dy)
        .map(|(&y, &g)| g * act.deriv_from_output_f64(y))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// pool

/// Pooling of each `pool×pool` window of each map, flattened channel-major (n, r, c):
/// mean `y_m2[n][r][c] = (1/p²) Σ_{a,b} y_m3[n][p·r+a][p·c+b]`, or max.
/// Returns `(y_m2, argmax)`; `argmax[f]` is the index into `y_m3` of the chosen value
/// (first on ties) for max pooling, and empty for mean pooling.
///
/// # Shapes
/// `y_m3`: (n_kernels, conv, conv) → `y_m2`: (n_kernels, pooled, pooled) = (flat).
pub fn pool_forward(cfg: &NetConfig, y_m3: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let (conv, p, pooled) = (cfg.conv(), cfg.pool, cfg.pooled());
    let mut y_m2 = vec![0.0; cfg.flat()];
    let mut argmax = Vec::new();
    for n in 0..cfg.n_kernels {
        for r in 0..pooled {
            for c in 0..pooled {
                let mut sum = 0.0;
                let mut best = (f64::NEG_INFINITY, 0);
                for a in 0..p {
                    for b in 0..p {
                        let idx = (n * conv + p * r + a) * conv + p * c + b;
                        sum += y_m3[idx];
                        if y_m3[idx] > best.0 {
                            best = (y_m3[idx], idx);
                        }
                    }
                }
                let f = (n * pooled + r) * pooled + c;
                match cfg.pooling {
                    Pooling::Mean => y_m2[f] = sum / (p * p) as f64,
                    Pooling::Max => {
                        y_m2[f] = best.0;
                        argmax.push(best.1);
                    }
                }
            }
        }
    }
    (y_m2, argmax)
}

/// "Re-pooling": the 2000-vector `∂L/∂y⁽⁻²⁾`, read as twenty 10×10 maps, becomes twenty 20×20
/// maps `∂L/∂y⁽⁻³⁾`. Mean: `dy_m3[n][r][c] = dy_m2[n][r/p][c/p] / p²` (each value spread over its
/// window); max: the value goes to the window's arg-max, 0 elsewhere.
///
/// # Shapes
/// `dy_m2`: (flat) → (n_kernels, conv, conv).
pub fn pool_backward(cfg: &NetConfig, dy_m2: &[f64], argmax: &[usize]) -> Vec<f64> {
    let (conv, p, pooled) = (cfg.conv(), cfg.pool, cfg.pooled());
    let mut dy_m3 = vec![0.0; cfg.n_kernels * conv * conv];
    match cfg.pooling {
        Pooling::Mean => {
            for n in 0..cfg.n_kernels {
                for r in 0..conv {
                    for c in 0..conv {
                        dy_m3[(n * conv + r) * conv + c] =
                            dy_m2[(n * pooled + r / p) * pooled + c / p] / (p * p) as f64;
                    }
                }
            }
        }
        Pooling::Max => {
            for (f, &idx) in argmax.iter().enumerate() {
                dy_m3[idx] = dy_m2[f];
            }
        }
    }
    dy_m3
}

// ---------------------------------------------------------------------------------------------
// dense

/// Fully connected: `v_i = Σ_j w[i][j] x_j (+ b_i)`.
///
/// # Shapes
/// `w`: (out, in); `x`: (in); `b`: (out) or empty; returns (out).
pub fn dense_forward(w: &[f64], b: &[f64], x: &[f64]) -> Vec<f64> {
    let inp = x.len();
    let out = w.len() / inp;
    (0..out)
        .map(|i| {
            let s: f64 = (0..inp).map(|j| w[i * inp + j] * x[j]).sum();
            s + if b.is_empty() { 0.0 } else { b[i] }
        })
        .collect()
}

/// Backward of [`dense_forward`]: `∂J/∂w[i][j] += dv_i · x_j` (the document's `(y_i − d_i) x_j`
/// for the output layer), `∂J/∂b_i += dv_i`, and returns `dx_j = Σ_i w[i][j] dv_i` (`wᵀ dv`).
/// Accumulates into `dw`, `db`.
///
/// # Shapes
/// `w`, `dw`: (out, in); `x`: (in); `dv`: (out); `db`: (out) or empty; returns (in).
pub fn dense_backward(
    w: &[f64],
    x: &[f64],
    dv: &[f64],
    dw: &mut [f64],
    db: &mut [f64],
) -> Vec<f64> {
    let inp = x.len();
    let mut dx = vec![0.0; inp];
    for (i, &g) in dv.iter().enumerate() {
        for j in 0..inp {
            dw[i * inp + j] += g * x[j];
            dx[j] += w[i * inp + j] * g;
        }
        if !db.is_empty() {
            db[i] += g;
        }
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// softmax + cross-entropy

/// `y_i = exp v_i / Σ_n exp v_n` and `L = Σ_i −d_i log y_i`. The max of `v` is subtracted before
/// `exp` (it cancels in the ratio) so that large logits do not overflow; `log y_i` is taken as
/// `v_i − logsumexp(v)` so that a tiny `y_i` does not lose precision. Terms with `d_i = 0` add 0.
pub fn softmax_xent_forward(v: &[f64], d: &[f64]) -> (Vec<f64>, f64) {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = v.iter().map(|&vi| (vi - m).exp()).sum();
    let lse = m + sum.ln();
    let y = v.iter().map(|&vi| (vi - lse).exp()).collect();
    let loss = v
        .iter()
        .enumerate()
        .filter(|(i, _)| d[*i] != 0.0)
        .map(|(i, &vi)| {
            // log y_i. When v_i is the largest logit, y_i may be within 1e-12 of 1 and
            // `v_i − lse` would lose most digits; −ln(1 + Σ_{n≠i} e^(v_n − v_i)) keeps them.
            let log_yi = if vi == m {
                let rest: f64 = v
                    .iter()
                    .enumerate()
                    .filter(|(n, _)| *n != i)
                    .map(|(_, &vn)| (vn - vi).exp())
                    .sum();
                -rest.ln_1p()
            } else {
                vi - lse
            };
            -d[i] * log_yi
        })
        .sum();
    (y, loss)
}

/// The document's result for softmax followed by cross-entropy: `∂L/∂v_i = y_i − d_i`.
pub fn softmax_xent_backward(y: &[f64], d: &[f64]) -> Vec<f64> {
    y.iter().zip(d).map(|(yi, di)| yi - di).collect()
}

// ---------------------------------------------------------------------------------------------
// the network

/// Every intermediate of one forward pass (what backward, `explain` and the pictures need).
#[derive(Clone, Debug)]
pub struct Activations {
    /// Input, pixels in [0, 1]: (img, img).
    pub x: Vec<f64>,
    /// One-hot target: (classes).
    pub d: Vec<f64>,
    /// Conv output before its activation: (n_kernels, conv, conv).
    pub conv_pre: Vec<f64>,
    /// `y⁽⁻³⁾ = act(conv_pre)`: (n_kernels, conv, conv).
    pub y_m3: Vec<f64>,
    /// `y⁽⁻²⁾`, pooled and flattened (n, r, c): (flat).
    pub y_m2: Vec<f64>,
    /// Max pooling's chosen index into `y_m3` per pooled value: (flat), or empty for mean pooling.
    pub argmax: Vec<usize>,
    /// `v⁽⁻¹⁾`: (hidden).
    pub v_m1: Vec<f64>,
    /// `y⁽⁻¹⁾ = φ(v⁽⁻¹⁾)`: (hidden).
    pub y_m1: Vec<f64>,
    /// Logits `v`: (classes).
    pub v: Vec<f64>,
    /// Probabilities `y = softmax(v)`: (classes).
    pub y: Vec<f64>,
    /// `L = Σ −d_i log y_i`.
    pub loss: f64,
}

/// Every factor of the backward chain for one image, and the parameter gradients.
#[derive(Clone, Debug)]
pub struct Backprop {
    /// `∂L/∂v = y − d`: (classes).
    pub dv: Vec<f64>,
    /// `∂L/∂y⁽⁻¹⁾ = wᵀ (y − d)`: (hidden).
    pub dy_m1: Vec<f64>,
    /// `∂L/∂v⁽⁻¹⁾ = ∂L/∂y⁽⁻¹⁾ ⊙ φ'(v⁽⁻¹⁾)`: (hidden).
    pub dv_m1: Vec<f64>,
    /// `∂L/∂y⁽⁻²⁾ = w⁽⁻¹⁾ᵀ ∂L/∂v⁽⁻¹⁾`: (flat), i.e. (n_kernels, pooled, pooled).
    pub dy_m2: Vec<f64>,
    /// `∂L/∂y⁽⁻³⁾`, the re-pooled backprop maps: (n_kernels, conv, conv).
    pub dy_m3: Vec<f64>,
    /// `∂L/∂conv_pre = ∂L/∂y⁽⁻³⁾ ⊙ act'(conv_pre)`: (n_kernels, conv, conv).
    pub dconv_pre: Vec<f64>,
    /// `∂J/∂` every parameter.
    pub grads: Grads<f64>,
}

/// The one-hot vector `d` for `label`.
pub fn one_hot(classes: usize, label: usize) -> Vec<f64> {
    let mut d = vec![0.0; classes];
    d[label] = 1.0;
    d
}

/// The forward pass for one image `x` (pixels in [0, 1]) with target class `label`.
///
/// # Panics
/// If `x.len() != img²` or `label ≥ classes` (a caller's bug, not user input).
pub fn forward(cfg: &NetConfig, p: &Params<f64>, x: &[f64], label: usize) -> Activations {
    assert_eq!(
        x.len(),
        cfg.pixels(),
        "image has {} pixels, the network takes {}",
        x.len(),
        cfg.pixels()
    );
    assert!(
        label < cfg.classes,
        "label {label} ≥ classes {}",
        cfg.classes
    );
    let d = one_hot(cfg.classes, label);
    let conv_pre = conv_forward(cfg, x, &p.k, &p.bk); // (n, conv, conv)
    let y_m3 = act_forward(cfg.conv_act, &conv_pre); // (n, conv, conv)
    let (y_m2, argmax) = pool_forward(cfg, &y_m3); // (flat)
    let v_m1 = dense_forward(&p.w_m1, &p.b_m1, &y_m2); // (hidden)
    let y_m1 = act_forward(cfg.act, &v_m1); // (hidden)
    let v = dense_forward(&p.w, &p.b, &y_m1); // (classes)
    let (y, loss) = softmax_xent_forward(&v, &d); // (classes), scalar
    Activations {
        x: x.to_vec(),
        d,
        conv_pre,
        y_m3,
        y_m2,
        argmax,
        v_m1,
        y_m1,
        v,
        y,
        loss,
    }
}

/// The backward pass, the document's chain rule from the output to the kernels:
/// `∂L/∂v = y − d`; `∂J/∂w = (y − d) y⁽⁻¹⁾ᵀ`; `∂J/∂w⁽⁻¹⁾ = (wᵀ(y − d) ⊙ φ'(v⁽⁻¹⁾)) y⁽⁻²⁾ᵀ`;
/// `∂L/∂y⁽⁻²⁾ = w⁽⁻¹⁾ᵀ ∂L/∂v⁽⁻¹⁾`, re-pooled to `∂L/∂y⁽⁻³⁾`, times the conv activation's
/// derivative; `∂J/∂k_n = x ⋆ (that map)`. Gradients start from zero.
pub fn backward(cfg: &NetConfig, p: &Params<f64>, a: &Activations) -> Backprop {
    let mut g = Grads::<f64>::zeros(cfg);
    let dv = softmax_xent_backward(&a.y, &a.d); // (classes)
    let dy_m1 = dense_backward(&p.w, &a.y_m1, &dv, &mut g.w, &mut g.b); // (hidden)
    let dv_m1 = act_backward(cfg.act, &a.y_m1, &dy_m1); // (hidden)
    let dy_m2 = dense_backward(&p.w_m1, &a.y_m2, &dv_m1, &mut g.w_m1, &mut g.b_m1); // (flat)
    let dy_m3 = pool_backward(cfg, &dy_m2, &a.argmax); // (n, conv, conv)
    let dconv_pre = act_backward(cfg.conv_act, &a.y_m3, &dy_m3); // (n, conv, conv)
    conv_backward_kernels(cfg, &a.x, &dconv_pre, &mut g.k, &mut g.bk); // (n, ks, ks)
    Backprop {
        dv,
        dy_m1,
        dv_m1,
        dy_m2,
        dy_m3,
        dconv_pre,
        grads: g,
    }
}

/// The loss alone, for finite differences.
pub fn loss(cfg: &NetConfig, p: &Params<f64>, x: &[f64], label: usize) -> f64 {
    forward(cfg, p, x, label).loss
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4×4 image and an asymmetric 2×2 kernel, worked by hand. With cross-correlation
    /// (MATLAB `conv2(x, rot90(k,2), 'valid')`), out[r][c] = Σ x[r+i][c+j] k[i][j].
    #[test]
    fn forward_is_cross_correlation_with_unrotated_kernel() {
        let cfg = NetConfig {
            img: 4,
            ksize: 2,
            n_kernels: 1,
            pool: 3,
            hidden: 1,
            classes: 2,
            ..NetConfig::default()
        };
        #[rustfmt::skip]
        let x = [
            1.0, 2.0, 3.0, 4.0,
            5.0, 6.0, 7.0, 8.0,
            9.0, 10.0, 11.0, 12.0,
            13.0, 14.0, 15.0, 16.0,
        ];
        // k = [[1, 0], [0, 0]] picks the top-left pixel of each window: out = x[0..3][0..3].
        // A true convolution (flipped kernel) would pick the bottom-right one instead.
        let out = conv_forward(&cfg, &x, &[1.0, 0.0, 0.0, 0.0], &[]);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0, 10.0, 11.0]);
        // k = [[1, 2], [3, 4]]: out[0][0] = 1·1 + 2·2 + 5·3 + 6·4 = 44;
        // out[0][1] = 2·1 + 3·2 + 6·3 + 7·4 = 54; out[1][0] = 5 + 12 + 27 + 40 = 84.
        let out = conv_forward(&cfg, &x, &[1.0, 2.0, 3.0, 4.0], &[]);
        assert_eq!(&out[..4], &[44.0, 54.0, 64.0, 84.0]);
    }

    #[test]
    fn mean_pool_and_repool_by_hand() {
        let cfg = NetConfig {
            img: 4,
            ksize: 1,
            n_kernels: 1,
            pool: 2,
            hidden: 1,
            classes: 2,
            ..NetConfig::default()
        };
        #[rustfmt::skip]
        let m = [
            1.0, 3.0, 0.0, 4.0,
            5.0, 7.0, 8.0, 0.0,
            1.0, 1.0, 2.0, 2.0,
            1.0, 1.0, 2.0, 6.0,
        ];
        let (y, am) = pool_forward(&cfg, &m);
        assert_eq!(y, vec![4.0, 3.0, 1.0, 3.0]);
        assert!(am.is_empty());
        let back = pool_backward(&cfg, &[4.0, 8.0, 0.0, -4.0], &am);
        assert_eq!(&back[..4], &[1.0, 1.0, 2.0, 2.0]);
        assert_eq!(&back[12..], &[0.0, 0.0, -1.0, -1.0]);

        let cfg = NetConfig {
            pooling: Pooling::Max,
            ..cfg
        };
        let (y, am) = pool_forward(&cfg, &m);
        assert_eq!(y, vec![7.0, 8.0, 1.0, 6.0]);
        assert_eq!(am, vec![5, 6, 8, 15]); // first max on the tie of ones
        let back = pool_backward(&cfg, &[1.0, 2.0, 3.0, 4.0], &am);
        let mut want = vec![0.0; 16];
        want[5] = 1.0;
        want[6] = 2.0;
        want[8] = 3.0;
        want[15] = 4.0;
        assert_eq!(back, want);
    }

    #[test]
    fn softmax_xent_backward_is_y_minus_d() {
        let v = [1.0, -2.0, 0.5];
        let d = one_hot(3, 2);
        let (y, loss) = softmax_xent_forward(&v, &d);
        let z: f64 = v.iter().map(|v: &f64| v.exp()).sum();
        assert!((y[0] - 1f64.exp() / z).abs() < 1e-15);
        assert!((loss - (-(0.5f64.exp() / z).ln())).abs() < 1e-14);
        assert_eq!(softmax_xent_backward(&y, &d), vec![y[0], y[1], y[2] - 1.0]);
        // Huge logits do not overflow.
        let (y, loss) = softmax_xent_forward(&[1000.0, 0.0], &one_hot(2, 0));
        assert!(y[0] > 0.999 && loss.is_finite());
    }

    #[test]
    fn dense_backward_by_hand() {
        // w = [[1, 2, 3], [4, 5, 6]], x = [1, 0, -1], dv = [1, -1]
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let x = [1.0, 0.0, -1.0];
        assert_eq!(dense_forward(&w, &[], &x), vec![-2.0, -2.0]);
        let mut dw = [0.0; 6];
        let mut db = [0.0; 2];
        let dx = dense_backward(&w, &x, &[1.0, -1.0], &mut dw, &mut db);
        assert_eq!(dx, vec![-3.0, -3.0, -3.0]);
        assert_eq!(dw, [1.0, 0.0, -1.0, -1.0, 0.0, 1.0]);
        assert_eq!(db, [1.0, -1.0]);
    }
}
