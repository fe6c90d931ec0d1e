//! # mnistconv
//!
//! The convolutional network "architecture 1" of the design document
//! (`docs/derivation.md`), with every gradient written by hand as the document derives it:
//!
//! ```text
//! x 28×28 → conv 20@9×9 → act → y⁽⁻³⁾ 20×20×20 → 2×2 pool → y⁽⁻²⁾ 2000 → w⁽⁻¹⁾ 100×2000 → φ
//!   → y⁽⁻¹⁾ 100 → w 10×100 → v 10 → softmax y → L = Σ −dᵢ log yᵢ
//! ```
//!
//! | derivation | code | shape |
//! |---|---|---|
//! | `x` | `x` | (28, 28) |
//! | `k_{n,i,j}` | [`Params::k`] | (20, 9, 9) |
//! | `y⁽⁻³⁾` | `y_m3` | (20, 20, 20) |
//! | `y⁽⁻²⁾` | `y_m2` | (2000) = (20, 10, 10) |
//! | `w⁽⁻¹⁾`, `v⁽⁻¹⁾`, `y⁽⁻¹⁾` | `w_m1`, `v_m1`, `y_m1` | (100, 2000), (100), (100) |
//! | `w`, `v`, `y` | `w`, `v`, `y` | (10, 100), (10), (10) |
//! | `∂L/∂·` | `dv`, `dy_m1`, `dw_m1`, `dk`, … | as the tensor |
//!
//! Two paths compute the same thing: [`reference`](mod@reference) (f64, one image, loops that read like the
//! formulas) and [`fast`] (f32, batched, im2col + GEMM). Tests hold them together, and
//! [`gradcheck`] holds the reference to finite differences.
//!
//! ```
//! use mnistconv::{NetConfig, Params, Init, reference};
//! let cfg = NetConfig::default();
//! let p = Params::init(&cfg, Init::He, 1).map(f64::from);
//! let x = vec![0.5; 28 * 28];
//! let a = reference::forward(&cfg, &p, &x, 3);
//! let b = reference::backward(&cfg, &p, &a);
//! assert_eq!(b.grads.k.len(), 20 * 9 * 9);
//! assert!((a.y.iter().sum::<f64>() - 1.0).abs() < 1e-12);
//! ```

//! ## Data → train → save → load → predict
//!
//! ```
//! use mnistconv::{checkpoint, mnist, train, Model, NetConfig, Params, TrainConfig};
//!
//! # fn main() -> mnistconv::Result<()> {
//! let data = mnist::embedded::train().slice(0..1000); // or mnist::load_split(dir, Split::Train)?
//! let cfg = NetConfig::default(); // the document's network
//! let tc = TrainConfig { epochs: 2, ..TrainConfig::default_recipe() };
//! let mut params = Params::init(&cfg, tc.init, tc.seed);
//! let history = train::train(&cfg, &tc, &mut params, &data, None, None, |_| Ok(()))?;
//! assert!(history[1].train_loss < history[0].train_loss);
//!
//! let path = std::env::temp_dir().join("mnistconv-doc-example.safetensors");
//! checkpoint::save(&path, &Model { cfg, params, meta: Default::default() })?;
//!
//! let model = checkpoint::load(&path)?;
//! let test = mnist::embedded::test().slice(0..200);
//! let predicted = train::predict(&model, &test, 0)?; // class of every image
//! let eval = train::evaluate(&model, &test, 0)?;      // accuracy, confusion, …
//! assert_eq!(predicted.len(), 200);
//! assert!(eval.accuracy > 0.7, "{}", eval.accuracy);
//! # std::fs::remove_file(&path).ok();
//! # Ok(())
//! # }
//! ```
//!
//! `examples/train_and_save.rs` and `examples/predict_pictures.rs` do the same from the command
//! line.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod download;
pub mod error;
pub mod explain;
pub mod fast;
pub mod fsutil;
pub mod gradcheck;
pub mod kernels;
pub mod mnist;
pub mod onnx;
pub mod params;
pub mod preprocess;
pub mod reference;
pub mod serve;
pub mod train;
pub mod viz;

pub use checkpoint::Model;
pub use config::{Activation, NetConfig, Pooling};
pub use error::{Error, Result};
pub use mnist::Dataset;
pub use params::{Grads, Init, Params};
pub use train::{Recipe, TrainConfig};
