//! Mini-batch SGD with momentum over the batched f32 path, and evaluation.
//!
//! The update is the MATLAB MnistConv code's: `m = α·∂J + β·m; W = W − m`, where `∂J` is the
//! mean gradient over the batch (plus `λ·W` for the weights when weight decay `λ` is set).

use crate::checkpoint::Model;
use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::fast::{self, Sgd, Workspace};
use crate::kernels;
use crate::mnist::Dataset;
use crate::params::{Grads, Init, Params};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// A named set of training choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The MATLAB MnistConv setup the document follows (see [`TrainConfig::book`]).
    Book,
    /// The project's own recipe (see [`TrainConfig::default_recipe`]).
    Default,
}

/// Learning-rate schedule over the whole run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `α` throughout.
    Constant,
    /// Cosine decay per step from `α` to 0: `α_t = α · ½(1 + cos(π t / T))`.
    Cosine,
}

/// Everything that decides a training run, besides the architecture and the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Which recipe these values came from.
    pub recipe: Recipe,
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per mini-batch.
    pub batch: usize,
    /// Learning rate `α`.
    pub lr: f32,
    /// Momentum `β`, in [0, 1).
    pub momentum: f32,
    /// L2 weight decay `λ` on the weights (not the biases).
    pub weight_decay: f32,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Whether the momentum buffers are zeroed at each epoch start (the book's code does).
    pub momentum_reset: bool,
    /// Whether to shuffle the training images each epoch.
    pub shuffle: bool,
    /// Random translation of each training image by up to this many pixels (0: none).
    pub shift: usize,
    /// Weight initialisation.
    pub init: Init,
    /// Seed for initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Worker threads (0: all cores).
    pub threads: usize,
}

impl TrainConfig {
    /// The book recipe: batch 100, `α` 0.01, `β` 0.95, momentum reset each epoch, no shuffling,
    /// MATLAB initialisation, 3 epochs.
    pub fn book() -> Self {
        TrainConfig {
            recipe: Recipe::Book,
            epochs: 3,
            batch: 100,
            lr: 0.01,
            momentum: 0.95,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            momentum_reset: true,
            shuffle: false,
            shift: 0,
            init: Init::Book,
            seed: 1,
            threads: 0,
        }
    }

    /// The project's recipe for the document's network: He initialisation, batch 100,
    /// `α` 0.05 with cosine decay, `β` 0.9, weight decay 5e-4, shuffling, and random shifts of up
    /// to 1 pixel, for 40 epochs. See `docs/training.md` for how it was chosen.
    pub fn default_recipe() -> Self {
        TrainConfig {
            recipe: Recipe::Default,
            epochs: 40,
            batch: 100,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: Schedule::Cosine,
            momentum_reset: false,
            shuffle: true,
            shift: 1,
            init: Init::He,
            seed: 1,
            threads: 0,
        }
    }

    /// The recipe's values.
    pub fn for_recipe(r: Recipe) -> Self {
        match r {
            Recipe::Book => Self::book(),
            Recipe::Default => Self::default_recipe(),
        }
    }

    /// Rejects values that cannot train.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if self.batch == 0 {
            return bad("batch must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("learning rate must be a positive number");
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad("momentum must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight decay must be ≥ 0");
        }
        if self.shift > 8 {
            return bad("shift must be at most 8 pixels");
        }
        Ok(())
    }

    /// The learning rate at step `t` of `total`.
    pub fn lr_at(&self, t: usize, total: usize) -> f32 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let f = t as f64 / total.max(1) as f64;
                (f64::from(self.lr) * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())) as f32
            }
        }
    }
}

/// What one epoch measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch (measured before each step's update).
    pub train_loss: f64,
    /// Training accuracy over the epoch (before each step's update).
    pub train_accuracy: f64,
    /// Accuracy on the validation split, if any.
    pub val_accuracy: Option<f64>,
    /// Accuracy on the test split, if any.
    pub test_accuracy: Option<f64>,
    /// Seconds spent in the training steps of this epoch (evaluation excluded).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f32,
}

/// A rayon pool with `threads` workers (0: one per core).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Config(format!("cannot start {threads} threads: {e}")))
}

/// Seed for epoch `e`'s shuffle and augmentation, derived from the run's seed.
fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Copies image `src` into `dst`, translated by `(dy, dx)` pixels, filling with 0 (background).
fn shift_image(src: &[u8], dst: &mut [u8], side: usize, dy: isize, dx: isize) {
    dst.fill(0);
    let s = side as isize;
    // Columns that stay inside the image, for every row.
    let (c0, c1) = (dx.max(0), (s + dx).min(s));
    if c0 >= c1 {
        return;
    }
    for r in 0..s {
        let sr = r - dy;
        if (0..s).contains(&sr) {
            let (r, sr) = (r as usize, sr as usize);
            let (c0, c1) = (c0 as usize, c1 as usize);
            let from = (c0 as isize - dx) as usize;
            dst[r * side + c0..r * side + c1]
                .copy_from_slice(&src[sr * side + from..sr * side + from + (c1 - c0)]);
        }
    }
}

/// Progress within an epoch, reported after every step.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepStats {
    /// 1-based epoch.
    pub epoch: usize,
    /// Steps done in this epoch.
    pub step: usize,
    /// Steps in an epoch.
    pub steps: usize,
    /// Mean loss over this epoch's steps so far.
    pub loss: f64,
    /// Training accuracy over this epoch's steps so far.
    pub accuracy: f64,
    /// Images per second so far in this epoch.
    pub images_per_second: f64,
}

/// Where a training run stands: enough to continue it exactly (with the same data, config and
/// seed, a resumed run ends with the same weights, bit for bit, as one never interrupted).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// The weights.
    pub params: Params<f32>,
    /// The momentum buffers `m`.
    pub mom: Grads<f32>,
    /// 1-based epoch the next step belongs to.
    pub epoch: usize,
    /// Steps of that epoch already done.
    pub step: usize,
    /// Sum of the losses of those steps.
    pub loss_sum: f64,
    /// Correct predictions of those steps.
    pub correct: usize,
    /// Seconds spent in those steps.
    pub seconds: f64,
    /// The epochs finished so far.
    pub history: Vec<EpochStats>,
}

impl TrainState {
    /// The start of a run from initial weights.
    pub fn new(cfg: &NetConfig, params: Params<f32>) -> Self {
        TrainState {
            params,
            mom: Grads::zeros(cfg),
            epoch: 1,
            step: 0,
            loss_sum: 0.0,
            correct: 0,
            seconds: 0.0,
            history: Vec::new(),
        }
    }
}

/// What [`train`] reports as it goes.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    /// A step is done.
    Step(StepStats),
    /// An epoch is done (and evaluated).
    Epoch(&'a EpochStats),
    /// A moment to save a checkpoint: after every `checkpoint_every` steps and at each epoch end.
    Checkpoint(&'a TrainState),
}

/// Trains `params` in place on `train` from the start; see [`train_from`].
pub fn train(
    cfg: &NetConfig,
    tc: &TrainConfig,
    params: &mut Params<f32>,
    train: &Dataset,
    val: Option<&Dataset>,
    test: Option<&Dataset>,
    on_event: impl FnMut(Event) -> Result<()> + Send,
) -> Result<Vec<EpochStats>> {
    let mut state = TrainState::new(cfg, params.clone());
    let r = train_from(cfg, tc, &mut state, train, val, test, 0, on_event);
    *params = state.params;
    r
}

/// Continues training from `state` to the end of `tc.epochs`, reporting each step and epoch to
/// `on_event`, and offering a checkpoint after every `checkpoint_every` steps (0: only at epoch
/// ends). Val/test accuracy are measured at each epoch end when those sets are given. An error
/// from `on_event` (e.g. a failed checkpoint write) stops the run. Stops with
/// [`Error::Diverged`] if the loss or a weight stops being finite. Returns the full history.
#[allow(clippy::too_many_arguments)]
pub fn train_from(
    cfg: &NetConfig,
    tc: &TrainConfig,
    state: &mut TrainState,
    train: &Dataset,
    val: Option<&Dataset>,
    test: Option<&Dataset>,
    checkpoint_every: usize,
    mut on_event: impl FnMut(Event) -> Result<()> + Send,
) -> Result<Vec<EpochStats>> {
    cfg.validate()?;
    tc.validate()?;
    train.check_fits(cfg.img, cfg.classes, "training data")?;
    if train.is_empty() {
        return Err(Error::Data("no training images".into()));
    }
    let pool = thread_pool(tc.threads)?;
    pool.install(|| {
        let n = train.len();
        let px = cfg.pixels();
        let batch = tc.batch.min(n);
        let steps_per_epoch = n.div_ceil(batch);
        let total_steps = steps_per_epoch * tc.epochs;
        let mut ws = Workspace::new(cfg, batch);
        let mut grads = Grads::<f32>::zeros(cfg);
        let mut order: Vec<usize> = (0..n).collect();
        let mut bimg = vec![0u8; batch * px];
        let mut blab = vec![0u8; batch];
        let mut shifts = vec![(0isize, 0isize); batch];
        let bidx: Vec<usize> = (0..batch).collect();
        let mut eval_ws = Workspace::new(cfg, EVAL_BATCH);
        while state.epoch <= tc.epochs {
            let epoch = state.epoch;
            let t0 = Instant::now();
            let mut rng = Pcg64::seed_from_u64(epoch_seed(tc.seed, epoch));
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            if tc.shuffle {
                for i in (1..n).rev() {
                    let j = rng.random_range(0..=i as u64) as usize;
                    order.swap(i, j);
                }
            }
            if tc.momentum_reset && state.step == 0 {
                for (_, m) in state.mom.tensors_mut() {
                    m.fill(0.0);
                }
            }
            let mut lr = tc.lr;
            for (s, ids) in order.chunks(batch).enumerate() {
                let b = ids.len();
                // The shifts are drawn in order from the epoch's generator, so a resumed run
                // draws (and discards) those of the steps already done.
                for (e, &id) in ids.iter().enumerate() {
                    if tc.shift > 0 {
                        let r = tc.shift as i32;
                        shifts[e] = (
                            rng.random_range(-r..=r) as isize,
                            rng.random_range(-r..=r) as isize,
                        );
                        blab[e] = train.labels[id];
                    }
                }
                if s < state.step {
                    continue;
                }
                // The batch's u8 images: read in place through `ids`, or, when augmenting,
                // shifted copies formed in parallel.
                let (images, labels, bids) = if tc.shift > 0 {
                    // In blocks of images whose sources are fetched first, so that their
                    // memory latencies overlap.
                    const BLOCK: usize = 10;
                    bimg[..b * px]
                        .par_chunks_mut(BLOCK * px)
                        .zip(ids.par_chunks(BLOCK).zip(shifts.par_chunks(BLOCK)))
                        .for_each(|(dst, (ids, shifts))| {
                            for &id in ids {
                                kernels::prefetch(&train.images[id * px..(id + 1) * px]);
                            }
                            for ((dst, &id), &(dy, dx)) in dst.chunks_mut(px).zip(ids).zip(shifts) {
                                let src = &train.images[id * px..(id + 1) * px];
                                shift_image(src, dst, cfg.img, dy, dx);
                            }
                        });
                    (&bimg[..], &blab[..], &bidx[..b])
                } else {
                    (&train.images[..], &train.labels[..], ids)
                };
                let global = (epoch - 1) * steps_per_epoch + s;
                lr = tc.lr_at(global, total_steps);
                let opt = Sgd {
                    lr,
                    momentum: tc.momentum,
                    weight_decay: tc.weight_decay,
                };
                // A batch whose loss is not finite leaves the weights as they were.
                let st = fast::train_step(
                    cfg,
                    &mut state.params,
                    &mut state.mom,
                    opt,
                    images,
                    labels,
                    bids,
                    &mut ws,
                    &mut grads,
                );
                if !st.loss_sum.is_finite() {
                    return Err(Error::Diverged {
                        epoch,
                        step: s + 1,
                        what: format!("the loss became {}", st.loss_sum),
                    });
                }
                state.step = s + 1;
                state.loss_sum += st.loss_sum;
                state.correct += st.correct;
                let seen = (s * batch + b) as f64;
                let seconds = state.seconds + t0.elapsed().as_secs_f64();
                on_event(Event::Step(StepStats {
                    epoch,
                    step: s + 1,
                    steps: steps_per_epoch,
                    loss: state.loss_sum / seen,
                    accuracy: state.correct as f64 / seen,
                    images_per_second: seen / seconds.max(1e-9),
                }))?;
                if checkpoint_every > 0
                    && (s + 1) % checkpoint_every == 0
                    && s + 1 < steps_per_epoch
                {
                    let mut snap = state.clone();
                    snap.seconds = seconds;
                    on_event(Event::Checkpoint(&snap))?;
                }
            }
            let seconds = state.seconds + t0.elapsed().as_secs_f64();
            if let Some(name) = first_non_finite(&state.params) {
                return Err(Error::Diverged {
                    epoch,
                    step: steps_per_epoch,
                    what: format!("weights of {name} are no longer finite"),
                });
            }
            let stats = EpochStats {
                epoch,
                train_loss: state.loss_sum / n as f64,
                train_accuracy: state.correct as f64 / n as f64,
                val_accuracy: val.map(|d| accuracy_in(cfg, &state.params, d, &mut eval_ws)),
                test_accuracy: test.map(|d| accuracy_in(cfg, &state.params, d, &mut eval_ws)),
                seconds,
                images_per_second: n as f64 / seconds,
                lr,
            };
            state.history.push(stats.clone());
            (
                state.epoch,
                state.step,
                state.loss_sum,
                state.correct,
                state.seconds,
            ) = (epoch + 1, 0, 0.0, 0, 0.0);
            on_event(Event::Epoch(&stats))?;
            on_event(Event::Checkpoint(state))?;
        }
        Ok(state.history.clone())
    })
}

fn first_non_finite(p: &Params<f32>) -> Option<&'static str> {
    p.tensors()
        .into_iter()
        .find(|(_, t)| t.iter().any(|v| !v.is_finite()))
        .map(|(n, _)| n)
}

/// Images per batch when evaluating.
const EVAL_BATCH: usize = 500;

/// Accuracy on `data`, using the current thread pool and `ws` (for up to [`EVAL_BATCH`] images).
fn accuracy_in(cfg: &NetConfig, p: &Params<f32>, data: &Dataset, ws: &mut Workspace) -> f64 {
    let mut correct = 0;
    let mut idx = [0usize; EVAL_BATCH];
    for start in (0..data.len()).step_by(EVAL_BATCH) {
        let n = EVAL_BATCH.min(data.len() - start);
        idx.iter_mut().enumerate().for_each(|(i, v)| *v = start + i);
        correct +=
            fast::forward_batch(cfg, p, &data.images, Some(&data.labels), &idx[..n], ws).correct;
    }
    correct as f64 / data.len().max(1) as f64
}

/// Predicted class of every image, in the current thread pool.
fn predict_in(cfg: &NetConfig, p: &Params<f32>, data: &Dataset) -> Vec<usize> {
    let mut ws = Workspace::new(cfg, EVAL_BATCH);
    let mut out = Vec::with_capacity(data.len());
    let idx: Vec<usize> = (0..data.len()).collect();
    for ids in idx.chunks(EVAL_BATCH) {
        fast::forward_batch(cfg, p, &data.images, None, ids, &mut ws);
        out.extend((0..ids.len()).map(|i| fast::argmax(ws.probs(i))));
    }
    out
}

/// Predicted class of every image of `data`, with `threads` workers (0: all cores).
pub fn predict(model: &Model, data: &Dataset, threads: usize) -> Result<Vec<usize>> {
    data.check_fits(model.cfg.img, model.cfg.classes, "data")?;
    Ok(thread_pool(threads)?.install(|| predict_in(&model.cfg, &model.params, data)))
}

/// Precision and recall of one class.
#[derive(Clone, Debug, Serialize)]
pub struct ClassStats {
    /// Of the images predicted as this class, the fraction that are (0 if none predicted).
    pub precision: f64,
    /// Of the images of this class, the fraction predicted as it (0 if none).
    pub recall: f64,
}

/// Accuracy, per-class precision and recall, and the confusion matrix (rows = true class).
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Number of images.
    pub n: usize,
    /// Per class.
    pub per_class: Vec<ClassStats>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

/// Scores predictions against labels.
pub fn evaluation(classes: usize, pred: &[usize], labels: &[u8]) -> Evaluation {
    let mut confusion = vec![vec![0u64; classes]; classes];
    for (&p, &l) in pred.iter().zip(labels) {
        confusion[usize::from(l)][p] += 1;
    }
    let n = pred.len();
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class = (0..classes)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let predicted: u64 = (0..classes).map(|t| confusion[t][c]).sum();
            let actual: u64 = confusion[c].iter().sum();
            ClassStats {
                precision: if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                },
                recall: if actual > 0 { tp / actual as f64 } else { 0.0 },
            }
        })
        .collect();
    Evaluation {
        accuracy: correct as f64 / n.max(1) as f64,
        n,
        per_class,
        confusion,
    }
}

/// Evaluates a model on a dataset.
pub fn evaluate(model: &Model, data: &Dataset, threads: usize) -> Result<Evaluation> {
    let pred = predict(model, data, threads)?;
    Ok(evaluation(model.cfg.classes, &pred, &data.labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_by_hand() {
        let e = evaluation(3, &[0, 1, 1, 2, 0], &[0, 1, 2, 2, 1]);
        assert_eq!(
            e.confusion,
            vec![vec![1, 0, 0], vec![1, 1, 0], vec![0, 1, 1]]
        );
        assert!((e.accuracy - 0.6).abs() < 1e-12);
        assert!((e.per_class[1].precision - 0.5).abs() < 1e-12);
        assert!((e.per_class[2].recall - 0.5).abs() < 1e-12);
    }

    #[test]
    fn shift_moves_pixels_and_fills_with_background() {
        let src: Vec<u8> = (1..=9).collect();
        let mut dst = vec![0; 9];
        shift_image(&src, &mut dst, 3, 1, -1);
        assert_eq!(dst, vec![0, 0, 0, 2, 3, 0, 5, 6, 0]);
    }

    #[test]
    fn cosine_schedule_ends_near_zero() {
        let tc = TrainConfig::default_recipe();
        assert_eq!(tc.lr_at(0, 100), tc.lr);
        assert!(tc.lr_at(99, 100) < tc.lr * 0.01);
        assert_eq!(TrainConfig::book().lr_at(50, 100), 0.01);
    }

    #[test]
    fn bad_values_are_rejected() {
        for tc in [
            TrainConfig {
                batch: 0,
                ..TrainConfig::book()
            },
            TrainConfig {
                epochs: 0,
                ..TrainConfig::book()
            },
            TrainConfig {
                lr: f32::NAN,
                ..TrainConfig::book()
            },
            TrainConfig {
                lr: -1.0,
                ..TrainConfig::book()
            },
            TrainConfig {
                momentum: 1.0,
                ..TrainConfig::book()
            },
        ] {
            assert!(tc.validate().is_err(), "{tc:?}");
        }
    }
}
