//! The batched f32 path used for training and inference.
//!
//! Same formulas as [`crate::reference`], laid out for throughput on the kernels of
//! [`crate::kernels`]. Shapes for a batch of `B` images (`KK = ks²` taps, `N` kernels,
//! `F = flat`, `H = hidden`, `C = classes`). The conv layer uses the "wide" layout of
//! [`crate::kernels::Wide`]: each image is kept as `ks` column-shifted copies so that every tap
//! reads one contiguous run of it (no im2col copy), and maps are stored compactly, position
//! `(r, c)` at `r·conv + c`, `WQ` = conv² rounded up to 16 positions per map (400 by default).
//!
//! Everything an image needs except the weight gradients of the dense layers is local to that
//! image, so the batch is cut into chunks of `m ≤ CHUNK` images ([`chunk_at`]: balanced for two
//! threads, fixed by the batch size) and each chunk goes all the way
//! forward and back to its kernel gradient while its maps are still in the core's cache:
//! ```text
//! A. per chunk:  x     (m, slot)     u8 → [0, 1], as ks column-shifted copies
//!                z     (m, N, WQ)    = x ⋆ k (+ bk), in place y_m3 = act(z)    conv_wide
//!                y2    (m, F)        = pool(y_m3), flattened (n, r, c)         y⁽⁻²⁾
//!                y1    (m, H)        = φ(y2 · w_m1ᵀ (+ b_m1))                  gemm_nt
//!                p     (m, C)        = softmax(y1 · wᵀ (+ b))                  gemm_nt
//!  training:     dv    (m, C)        = (p − d) / B                             ∂L/∂v (eq. 1)
//!                dv1   (m, H)        = (dv · w) ⊙ φ'(y1)                       gemm_nn
//!                dy2   (m, F)        = dv1 · w_m1                              gemm_nn_at (eq. 4)
//!                dz    (m, N, WQ)    = repool(dy2) ⊙ act'(y_m3), 0 at junk     (eq. 5)
//!                dk_c  (N, KK)       = Σ_e x_e ⋆ dz_e                          conv_wide_dk (eq. 6)
//! B. whole batch: dw_m1 (H, F)       = dv1ᵀ · y2, columns split over threads   gemm_nn_cols (eq. 3)
//!                (train_step: each thread's task then updates its columns of w_m1 by SGD;
//!                on AVX2 behind a ReLU, rows split over threads, sparse dv1ᵀ: gemm_csr)
//!                dw    (C, H)        = dvᵀ · y1                                gemm_nn (eq. 2)
//!                dk                  = Σ_c dk_c in chunk order
//! ```
//! Behind a ReLU φ most of `dv1` is exact zeros (62 % on a trained net; a unit with `v⁽⁻¹⁾ ≤ 0`
//! passes no gradient), and both products with it leave them out: `dy2` skips the rows of
//! `w_m1` for units that no image of the chunk uses ([`crate::kernels::gemm_nn_at`]), and
//! `dw_m1` takes `dv1ᵀ` as a sparse matrix ([`crate::kernels::Csr`]). A left-out term adds
//! `±0`, so on the AVX2 kernels the bits are those of the dense products. With another φ,
//! and on the AVX-512 backend (whose dense products ran faster than the AVX2 sparse ones),
//! both stay dense.
//!
//! Determinism: chunk boundaries depend only on the batch size, every output element of a
//! product is computed by one fixed sequence of operations whichever thread runs it, and the only
//! cross-chunk sums (`dk`, `dbk`, biases, loss) are taken in chunk order. So a result is
//! bit-for-bit the same for any number of threads on a given machine.

use crate::config::{Activation, NetConfig, Pooling};
use crate::kernels::{
    Aligned, Backend, ColsMut, Csr, Ink, Wide, backend, conv_wide_dk_on, conv_wide_fused_on,
    dk_backend, gemm_csr, gemm_nn, gemm_nn_at, gemm_nn_cols, gemm_nt, mean_pool2,
    mean_repool2_relu, nonzero_cols, prefetch, prefetch_write, relu_in_place,
};
use crate::params::{Grads, Params};
use rayon::prelude::*;
use std::sync::Mutex;

/// Images per chunk: the unit of parallel work and of the fixed `dk` reduction order. Each
/// chunk streams `w⁽⁻¹⁾` (800 KB) twice, forward and back, so larger chunks stream it less
/// per image, as long as their maps stay in the core's L2: 8 images (two maps of 256 KB each)
/// trained 1.5–3 % faster than 4 on the 2 MB L2 of the AVX-512 machine (one thread per core,
/// both binaries at once, 4 pairs).
pub const CHUNK: usize = 8;

/// Scratch for one chunk in flight (one per worker thread); its contents never outlive the chunk,
/// so which thread's scratch a chunk uses cannot change a result.
#[derive(Clone, Debug)]
struct Scratch {
    /// (m, slot) pixels / 255, zero-padded slots (slots and maps aligned: every vector the conv
    /// kernels load at a multiple of 16 floats lies in one cache line)
    xf: Aligned,
    /// (m) where each slot's nonzeros lie, as `fill` found them
    ink: Vec<Ink>,
    /// (m, N, WQ) conv maps y_m3
    z: Aligned,
    /// (m, N, WQ) ∂L/∂conv_pre, zero at the junk positions
    dz: Aligned,
    /// (m, F) ∂L/∂y⁽⁻²⁾ / B
    dy2: Aligned,
    /// (m, F) max-pool arg-max (index into z), empty for mean pooling
    argmax: Vec<u32>,
    /// the hidden units that some image of the chunk uses (∂L/∂v⁽⁻¹⁾ ≠ 0)
    live: Vec<u32>,
    /// (H, DW1_PASS) one pass of `∂J/∂w⁽⁻¹⁾`'s columns in `train_step` (see `dw1_cols`)
    pass: Aligned,
}

impl Scratch {
    fn new(cfg: &NetConfig) -> Self {
        let w = wide(cfg);
        let maps = CHUNK * cfg.n_kernels * w.wq();
        Scratch {
            xf: Aligned::zeroed(CHUNK * w.slot()),
            ink: Vec::with_capacity(CHUNK),
            z: Aligned::zeroed(maps),
            dz: Aligned::zeroed(maps),
            dy2: Aligned::zeroed(CHUNK * cfg.flat()),
            argmax: vec![
                0;
                if cfg.pooling == Pooling::Max {
                    CHUNK * cfg.flat()
                } else {
                    0
                }
            ],
            live: Vec::with_capacity(cfg.hidden),
            pass: Aligned::zeroed(cfg.hidden * DW1_PASS),
        }
    }
}

/// What a chunk leaves behind for the batch.
#[derive(Clone, Debug)]
struct ChunkOut {
    /// (N, KK) the chunk's kernel gradient
    dk: Vec<f32>,
    /// (N) the chunk's conv-bias gradient
    dbk: Vec<f32>,
    loss: f64,
    correct: usize,
}

fn wide(cfg: &NetConfig) -> Wide {
    Wide {
        img: cfg.img,
        ks: cfg.ksize,
    }
}

/// Reusable buffers for batched passes of up to `max_batch` images; nothing is allocated per
/// batch once the workspace has seen the thread pool it runs in.
#[derive(Debug)]
pub struct Workspace {
    cfg: NetConfig,
    max_batch: usize,
    scratch: Vec<Mutex<Scratch>>,
    outs: Vec<ChunkOut>,
    /// (B, F) y⁽⁻²⁾ (aligned, as `w⁽⁻¹⁾` is: the hidden layer's products load both in whole
    /// cache lines)
    y2: Aligned,
    /// (B, H) y⁽⁻¹⁾
    y1: Vec<f32>,
    /// (B, C) probabilities y
    p: Vec<f32>,
    /// (B, C) ∂L/∂v / B
    dv: Vec<f32>,
    /// (B, H) ∂L/∂v⁽⁻¹⁾ / B
    dv1: Vec<f32>,
    /// (H, B) its transpose without the zeros
    dv1t: Csr,
}

impl Workspace {
    /// Buffers for batches of up to `max_batch` images.
    pub fn new(cfg: &NetConfig, max_batch: usize) -> Self {
        let b = max_batch.max(1);
        let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
        let kk = cfg.ksize * cfg.ksize;
        let out = ChunkOut {
            dk: vec![0.0; cfg.n_kernels * kk],
            dbk: vec![0.0; if cfg.bias { cfg.n_kernels } else { 0 }],
            loss: 0.0,
            correct: 0,
        };
        Workspace {
            cfg: *cfg,
            max_batch: b,
            scratch: Vec::new(),
            outs: vec![out; b.div_ceil(CHUNK) + 1],
            y2: Aligned::zeroed(b * f),
            y1: vec![0.0; b * h],
            p: vec![0.0; b * c],
            dv: vec![0.0; b * c],
            dv1: vec![0.0; b * h],
            dv1t: Csr::with_capacity(h, b),
        }
    }
    /// Probabilities `y` of the last forward pass for batch image `i`.
    pub fn probs(&self, i: usize) -> &[f32] {
        let c = self.cfg.classes;
        &self.p[i * c..(i + 1) * c]
    }
    /// The largest batch these buffers take.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// What one batch measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    /// Sum of the per-image losses `−log y_label`.
    pub loss_sum: f64,
    /// Images classified correctly (before any update).
    pub correct: usize,
}

/// Forward and backward over a batch: writes the mean gradient `(1/B) Σ_e ∂L_e/∂θ` into `grads`
/// (overwritten). `images` is `[*, img²]` u8, `labels` `[*]`; `idx` picks the batch's images.
///
/// # Panics
/// If the batch is larger than the workspace, or an index or label is out of range (caller bugs).
pub fn forward_backward(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    labels: &[u8],
    idx: &[usize],
    ws: &mut Workspace,
    grads: &mut Grads<f32>,
) -> BatchStats {
    if idx.is_empty() {
        return BatchStats::default();
    }
    let stats = run_chunks(cfg, p, images, Some(labels), idx, ws, true);
    dense_grads(cfg, idx.len(), ws, grads, None);
    stats
}

/// SGD with momentum and weight decay: per element `m = α·(g + λ·w) + β·m; w = w − m`, with
/// the decay `λ` on weights only (not on biases).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate `α`.
    pub lr: f32,
    /// Momentum `β`.
    pub momentum: f32,
    /// Weight decay `λ`.
    pub weight_decay: f32,
}

impl Sgd {
    /// One tensor's update, `decay` its `λ` (0 for a bias).
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], decay: f32) {
        let (lr, beta) = (self.lr, self.momentum);
        for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
            *m = lr * (g + decay * *w) + beta * *m;
            *w -= *m;
        }
    }

    /// Every tensor of `p` but `w⁽⁻¹⁾`, which [`train_step`] updates where its gradient rows
    /// are made.
    fn apply_small(&self, p: &mut Params<f32>, g: &Grads<f32>, m: &mut Grads<f32>) {
        let wd = self.weight_decay;
        self.apply(&mut p.k, &g.k, &mut m.k, wd);
        self.apply(&mut p.bk, &g.bk, &mut m.bk, 0.0);
        self.apply(&mut p.b_m1, &g.b_m1, &mut m.b_m1, 0.0);
        self.apply(&mut p.w, &g.w, &mut m.w, wd);
        self.apply(&mut p.b, &g.b, &mut m.b, 0.0);
    }
}

/// One training step: [`forward_backward`] (the mean gradient into `grads`), then `opt` on
/// every tensor with the momenta `mom`; when the batch's loss is not finite, only the forward
/// pass runs and nothing is updated (the caller reports the divergence). The same bits as
/// `forward_backward` followed by [`Sgd::apply`] on each tensor, but `w⁽⁻¹⁾`'s update is
/// fused into the tasks that make its gradient: each task updates its block of `w⁽⁻¹⁾` and of
/// its momentum pass by pass while the pass's gradient is in its core's cache, one task per
/// thread (see `dw1_cols`). That gradient is never stored whole: `grads.w_m1` is left as it
/// was (every other tensor's gradient is in `grads`). A separate pass over `w⁽⁻¹⁾` (200,000
/// weights, read and written by both cores' chunks and gradient tasks) ran 2.5 times slower
/// on two threads than on one, the cores trading its cache lines.
///
/// # Panics
/// As [`forward_backward`], or if `p`, `mom` and `grads` are not of `cfg`'s sizes.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    cfg: &NetConfig,
    p: &mut Params<f32>,
    mom: &mut Grads<f32>,
    opt: Sgd,
    images: &[u8],
    labels: &[u8],
    idx: &[usize],
    ws: &mut Workspace,
    grads: &mut Grads<f32>,
) -> BatchStats {
    if idx.is_empty() {
        return BatchStats::default();
    }
    let stats = run_chunks(cfg, p, images, Some(labels), idx, ws, true);
    if !stats.loss_sum.is_finite() {
        return stats;
    }
    let update = Some((&mut p.w_m1[..], &mut mom.w_m1[..], opt));
    dense_grads(cfg, idx.len(), ws, grads, update);
    opt.apply_small(p, grads, mom);
    stats
}

/// Columns of `∂J/∂w⁽⁻¹⁾` per pass of [`dw1_cols`]'s fused update: three of the AVX-512
/// product's 48-column tiles. The passes, with the next one's lines fetched ahead, took the
/// update from 0.145–0.185 s of two threads' time per epoch to a share of the product's, and
/// the step 172 against 188 ms (medians of 9 epochs, alternating in one process).
const DW1_PASS: usize = 144;

/// `∂J/∂w⁽⁻¹⁾ = dv1ᵀ · y2` (eq. 3) for the columns `c0..` of `g` (of the `(H, F)` gradient),
/// `dv1` (B, H) and `y2` (B, F) the batch's rows; with `upd` = (the same columns of `w⁽⁻¹⁾` and
/// of its momentum, the optimiser), each row's SGD step follows while its gradient is in the
/// core's cache. Split into `blocks` blocks of whole 16-column vectors, in parallel.
///
/// A thread that owns some columns of every row reads only those columns of `y2` (half of
/// which the other core wrote); splitting the rows instead made each thread read all of `y2`.
/// On two threads this step took 171–174 against 205 ms per epoch, the chunks 14 ms more
/// (they then read `w⁽⁻¹⁾`'s other columns from the other core in bursts), and the epoch
/// 1.032 against 1.052 s (medians of 15 epochs each, the two alternating in one process).
#[allow(clippy::too_many_arguments)]
fn dw1_cols(
    b: usize,
    dv1: &[f32],
    y2: &[f32],
    c0: usize,
    mut g: ColsMut,
    upd: Option<(ColsMut, ColsMut, Sgd)>,
    scratch: &[Mutex<Scratch>],
    blocks: usize,
) {
    let (h, f, width) = (dv1.len() / b.max(1), y2.len() / b.max(1), g.width());
    let at = (width * (blocks / 2) / blocks.max(1)).next_multiple_of(16);
    if blocks <= 1 || at >= width {
        let Some((mut w, mut m, opt)) = upd else {
            gemm_nn_cols(h, b, dv1, 1, h, &y2[c0..], f, &mut g, false);
            return;
        };
        let slot = rayon::current_thread_index().unwrap_or(0) % scratch.len();
        let mut s = scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
        // In passes of DW1_PASS columns, each pass's gradient then its SGD step, with the next
        // pass's weights and momenta asked for meanwhile: the weights with intent to write
        // (the other core read them in the chunks, so each store would first have to take
        // the line back from it).
        let fetch = |w: &mut ColsMut, m: &mut ColsMut, j0: usize| {
            let j1 = (j0 + DW1_PASS).min(width);
            for i in (0..h).filter(|_| j0 < j1) {
                prefetch_write(&w.row(i)[j0..j1]);
                prefetch(&m.row(i)[j0..j1]);
            }
        };
        fetch(&mut w, &mut m, 0);
        for j0 in (0..width).step_by(DW1_PASS) {
            let j1 = (j0 + DW1_PASS).min(width);
            fetch(&mut w, &mut m, j1);
            // The pass's gradient (H, n) in the thread's scratch, not in `g`: 57 KB that stay
            // in cache, where `g`'s columns would be fetched from memory to be written.
            let n = j1 - j0;
            let gp = &mut s.pass[..h * n];
            gemm_nn(h, n, b, dv1, 1, h, &y2[c0 + j0..], f, gp, n, false);
            for (i, gr) in gp.chunks_exact(n).enumerate() {
                let (w, m) = (&mut w.row(i)[j0..j1], &mut m.row(i)[j0..j1]);
                opt.apply(w, gr, m, opt.weight_decay);
            }
        }
        return;
    }
    let (g0, g1) = g.split_at(at);
    let (u0, u1) = match upd {
        Some((w, m, opt)) => {
            let ((w0, w1), (m0, m1)) = (w.split_at(at), m.split_at(at));
            (Some((w0, m0, opt)), Some((w1, m1, opt)))
        }
        None => (None, None),
    };
    rayon::join(
        || dw1_cols(b, dv1, y2, c0, g0, u0, scratch, blocks / 2),
        || dw1_cols(b, dv1, y2, c0 + at, g1, u1, scratch, blocks - blocks / 2),
    );
}

/// Step B of a batch of `b` images whose chunks have run: the dense layers' weight gradients
/// from the workspace's rows, and `dk` as the chunks' sum in chunk order, into `grads`. With
/// `update` = (`w⁽⁻¹⁾`, its momentum, the optimiser), each `∂J/∂w⁽⁻¹⁾` task also updates the
/// rows of `w⁽⁻¹⁾` it made the gradient of.
fn dense_grads(
    cfg: &NetConfig,
    b: usize,
    ws: &mut Workspace,
    grads: &mut Grads<f32>,
    update: Option<(&mut [f32], &mut [f32], Sgd)>,
) {
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let (y2, y1, dv, dv1) = (
        &ws.y2[..b * f],
        &ws.y1[..b * h],
        &ws.dv[..b * c],
        &ws.dv1[..b * h],
    );
    let sparse = skips_dead_units(cfg);
    if sparse {
        ws.dv1t.gather(h, b, dv1, 1, h);
    }
    let (dv1t, scratch) = (&ws.dv1t, &ws.scratch[..]);
    let Grads {
        k: gk,
        bk: gbk,
        w_m1: gw1,
        b_m1: gb1,
        w: gw,
        b: gb,
    } = grads;
    // B. dense weight gradients over the whole batch.
    rayon::join(
        || {
            // dw_m1 (H, F) = dv1ᵀ · y2. Every element is one fixed sum, whatever the blocks.
            let threads = rayon::current_num_threads().max(1);
            if !sparse {
                // One block of columns per thread, each reading only its columns of y2.
                let g = ColsMut::new(gw1, h, f);
                let upd =
                    update.map(|(w, m, opt)| (ColsMut::new(w, h, f), ColsMut::new(m, h, f), opt));
                dw1_cols(b, dv1, y2, 0, g, upd, scratch, threads);
                return;
            }
            // Behind a ReLU on AVX2, without dv1's zeros: one block of rows per thread, each
            // streaming y2 once.
            let rows = h.div_ceil(threads).max(1);
            let grad_rows = |r0: usize, out: &mut [f32]| {
                gemm_csr(dv1t, r0..r0 + out.len() / f, f, y2, f, out, f);
            };
            match update {
                None => {
                    gw1.par_chunks_mut(rows * f)
                        .enumerate()
                        .for_each(|(t, out)| grad_rows(t * rows, out));
                }
                Some((w, m, opt)) => {
                    let wd = opt.weight_decay;
                    gw1.par_chunks_mut(rows * f)
                        .zip(w.par_chunks_mut(rows * f))
                        .zip(m.par_chunks_mut(rows * f))
                        .enumerate()
                        .for_each(|(t, ((out, w), m))| {
                            grad_rows(t * rows, out);
                            opt.apply(w, out, m, wd);
                        });
                }
            }
        },
        || {
            // dw (C, H) = dvᵀ · y1; biases: column sums of dv and dv1.
            gemm_nn(c, h, b, dv, 1, c, y1, h, gw, h, false);
            col_sums(dv, c, gb);
            col_sums(dv1, h, gb1);
        },
    );
    // dk = Σ_chunks dk_chunk, in chunk order.
    let outs = &ws.outs[..chunk_count(b)];
    gk.copy_from_slice(&outs[0].dk);
    gbk.copy_from_slice(&outs[0].dbk);
    for o in &outs[1..] {
        gk.iter_mut().zip(&o.dk).for_each(|(a, x)| *a += x);
        gbk.iter_mut().zip(&o.dbk).for_each(|(a, x)| *a += x);
    }
}

/// Forward only; probabilities are then in [`Workspace::probs`]. With `labels`, the stats count
/// the loss and the correct predictions.
pub fn forward_batch(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    labels: Option<&[u8]>,
    idx: &[usize],
    ws: &mut Workspace,
) -> BatchStats {
    if idx.is_empty() {
        return BatchStats::default();
    }
    run_chunks(cfg, p, images, labels, idx, ws, false)
}

/// Step A for every chunk of the batch, in parallel (one chunk runs on the calling thread).
fn run_chunks(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    labels: Option<&[u8]>,
    idx: &[usize],
    ws: &mut Workspace,
    train: bool,
) -> BatchStats {
    let b = idx.len();
    assert!(b <= ws.max_batch, "batch {b} > workspace {}", ws.max_batch);
    assert_eq!(ws.cfg, *cfg, "workspace built for another configuration");
    if train {
        assert!(labels.is_some(), "training needs labels");
    }
    let nthreads = rayon::current_num_threads().max(1);
    while ws.scratch.len() < nthreads {
        ws.scratch.push(Mutex::new(Scratch::new(cfg)));
    }
    let nch = chunk_count(b);
    let ctx = Ctx {
        cfg,
        p,
        images,
        labels,
        idx,
        scratch: &ws.scratch,
        train,
        scale: 1.0 / b as f32,
    };
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let rows = Rows {
        outs: &mut ws.outs[..nch],
        y2: &mut ws.y2[..b * f],
        y1: &mut ws.y1[..b * h],
        pr: &mut ws.p[..b * c],
        dv: &mut ws.dv[..b * c],
        dv1: &mut ws.dv1[..b * h],
    };
    run_span(&ctx, 0, nch, rows);
    ws.outs[..nch]
        .iter()
        .fold(BatchStats::default(), |s, o| BatchStats {
            loss_sum: s.loss_sum + o.loss,
            correct: s.correct + o.correct,
        })
}

/// Chunks in a batch of `b` images: `⌈b / CHUNK⌉`, made even (when that is odd and the last
/// chunk holds at least 2 images) by halving the last chunk, see [`chunk_at`].
pub fn chunk_count(b: usize) -> usize {
    let n = b.div_ceil(CHUNK);
    if n > 1 && n % 2 == 1 && b - CHUNK * (n - 1) >= 2 {
        n + 1
    } else {
        n
    }
}

/// Chunk `c` of a batch of `b` images as (first image, images). Chunks hold `CHUNK` images in
/// order, except that when [`chunk_count`] halved the last one, its halves sit in the middle
/// (chunk `t`) and at the end (chunk `2t + 1`): the two halves of the chunk list, which two
/// threads take, then hold the same number of images (50 and 50 for a batch of 100, not 56
/// and 44). Depends only on `b`, never on the threads.
pub fn chunk_at(b: usize, c: usize) -> (usize, usize) {
    let n = b.div_ceil(CHUNK);
    if chunk_count(b) == n {
        return (c * CHUNK, CHUNK.min(b - c * CHUNK));
    }
    let (t, r) = ((n - 1) / 2, b - CHUNK * (n - 1));
    match c {
        _ if c < t => (c * CHUNK, CHUNK),
        _ if c == t => (t * CHUNK, r.div_ceil(2)),
        _ if c <= 2 * t => (r.div_ceil(2) + (c - 1) * CHUNK, CHUNK),
        _ => (b - r / 2, r / 2),
    }
}

/// What every chunk of a batch reads.
struct Ctx<'a> {
    cfg: &'a NetConfig,
    p: &'a Params<f32>,
    images: &'a [u8],
    labels: Option<&'a [u8]>,
    idx: &'a [usize],
    scratch: &'a [Mutex<Scratch>],
    train: bool,
    scale: f32,
}

/// The rows of the batch buffers that a run of chunks writes.
struct Rows<'a> {
    outs: &'a mut [ChunkOut],
    y2: &'a mut [f32],
    y1: &'a mut [f32],
    pr: &'a mut [f32],
    dv: &'a mut [f32],
    dv1: &'a mut [f32],
}

impl<'a> Rows<'a> {
    /// Splits after `chunks` chunks holding `images` images.
    fn split(self, cfg: &NetConfig, chunks: usize, images: usize) -> (Rows<'a>, Rows<'a>) {
        let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
        let (o0, o1) = self.outs.split_at_mut(chunks);
        let (y20, y21) = self.y2.split_at_mut(images * f);
        let (y10, y11) = self.y1.split_at_mut(images * h);
        let (p0, p1) = self.pr.split_at_mut(images * c);
        let (d0, d1) = self.dv.split_at_mut(images * c);
        let (e0, e1) = self.dv1.split_at_mut(images * h);
        (
            Rows {
                outs: o0,
                y2: y20,
                y1: y10,
                pr: p0,
                dv: d0,
                dv1: e0,
            },
            Rows {
                outs: o1,
                y2: y21,
                y1: y11,
                pr: p1,
                dv: d1,
                dv1: e1,
            },
        )
    }
}

/// Chunks `c0..c1` of the batch: halved by chunk count and run on both sides of a
/// `rayon::join` until one chunk is left (which runs where it lands: a single chunk, e.g. one
/// image, never leaves the calling thread).
fn run_span(ctx: &Ctx, c0: usize, c1: usize, rows: Rows) {
    let b = ctx.idx.len();
    if c1 - c0 == 1 {
        let (start, len) = chunk_at(b, c0);
        let ids = &ctx.idx[start..start + len];
        let slot = rayon::current_thread_index().unwrap_or(0) % ctx.scratch.len();
        let mut s = ctx.scratch[slot].lock().unwrap_or_else(|e| e.into_inner());
        let Rows {
            outs,
            y2,
            y1,
            pr,
            dv,
            dv1,
        } = rows;
        chunk(
            ctx.cfg,
            ctx.p,
            ctx.images,
            ctx.labels,
            ids,
            &mut s,
            &mut outs[0],
            y2,
            y1,
            pr,
            dv,
            dv1,
            ctx.train,
            ctx.scale,
        );
        return;
    }
    let mid = c0 + (c1 - c0) / 2;
    let images = chunk_at(b, mid).0 - chunk_at(b, c0).0;
    let (left, right) = rows.split(ctx.cfg, mid - c0, images);
    rayon::join(
        || run_span(ctx, c0, mid, left),
        || run_span(ctx, mid, c1, right),
    );
}

/// Step A for one chunk of images `ids`: forward to the probabilities, the score, and (when
/// `train`) the way back to the chunk's kernel gradient. Row buffers are this chunk's rows.
#[allow(clippy::too_many_arguments)]
fn chunk(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    labels: Option<&[u8]>,
    ids: &[usize],
    s: &mut Scratch,
    out: &mut ChunkOut,
    y2: &mut [f32],
    y1: &mut [f32],
    pr: &mut [f32],
    dv: &mut [f32],
    dv1: &mut [f32],
    train: bool,
    scale: f32,
) {
    let m = ids.len();
    let w = wide(cfg);
    let (f, h, c, nk) = (cfg.flat(), cfg.hidden, cfg.classes, cfg.n_kernels);
    let (px, xs, wq) = (cfg.pixels(), w.slot(), w.wq());
    // x: (m, slot)
    s.ink.clear();
    for (dst, &id) in s.xf.chunks_exact_mut(xs).zip(ids) {
        s.ink.push(w.fill(&images[id * px..(id + 1) * px], dst));
    }
    let be = backend();
    // z: (m, N, WQ) = x ⋆ k, + bias, activation in place → y_m3
    // (bias and ReLU fused into the conv's store; other activations applied after)
    let relu = cfg.conv_act == Activation::Relu;
    conv_wide_fused_on(
        be,
        w,
        &p.k,
        &p.bk,
        relu,
        nk,
        &s.xf,
        Some(&s.ink),
        m,
        &mut s.z,
    );
    let z = &mut s.z[..m * nk * wq];
    if !relu {
        act_in_place(cfg.conv_act, z);
    }
    // y2: (m, F)
    pool_forward(cfg, m, z, y2, &mut s.argmax);
    // y1: (m, H) = φ(y2 · w_m1ᵀ + b_m1), dot products along the 2000 inputs
    gemm_nt(m, h, f, y2, f, &p.w_m1, f, y1, h, false);
    if !p.b_m1.is_empty() {
        for row in y1.chunks_exact_mut(h) {
            row.iter_mut().zip(&p.b_m1).for_each(|(v, b)| *v += b);
        }
    }
    act_in_place(cfg.act, y1);
    // p: (m, C) = softmax(y1 · wᵀ + b)
    gemm_nt(m, c, h, y1, h, &p.w, h, pr, c, false);
    for row in pr.chunks_exact_mut(c) {
        row.iter_mut().zip(&p.b).for_each(|(v, b)| *v += b);
        softmax_in_place(row);
    }
    (out.loss, out.correct) = match labels {
        Some(l) => score_rows(c, l, ids, pr),
        None => (0.0, 0),
    };
    if !train {
        return;
    }
    let labels = labels.expect("checked by the caller");
    output_backward(cfg, p, labels, ids, pr, y1, dv, dv1, scale);
    // dy2: (m, F) = dv1 · w_m1; behind a ReLU most of dv1 is zero, and its zeros are left out
    // (the rows of w_m1 for units no image of the chunk uses are not read)
    if skips_dead_units(cfg) {
        nonzero_cols(m, h, dv1, h, 1, &mut s.live);
        gemm_nn_at(m, f, &s.live, dv1, h, 1, &p.w_m1, f, &mut s.dy2, f, false);
    } else {
        gemm_nn(m, f, h, dv1, h, 1, &p.w_m1, f, &mut s.dy2, f, false);
    }
    // dz: (m, N, WQ) = repool(dy2) ⊙ act'(y_m3); dk_c = Σ_e x_e ⋆ dz_e (on the kernel
    // gradient's backend, which on Zen 4 is AVX2: kernels::dk_backend)
    pool_backward(cfg, m, &s.dy2, &s.argmax, &s.z, &mut s.dz);
    conv_wide_dk_on(
        dk_backend(),
        w,
        &s.dz,
        nk,
        &s.xf,
        Some(&s.ink),
        m,
        &mut out.dk,
    );
    for (n, b) in out.dbk.iter_mut().enumerate() {
        // Summed in f64: m·conv² terms (thousands), too many for a plain f32 sum. Junk is 0.
        *b = (0..m)
            .flat_map(|e| &s.dz[(e * nk + n) * wq..(e * nk + n + 1) * wq])
            .map(|&v| f64::from(v))
            .sum::<f64>() as f32;
    }
}

/// Whether the dense layers' backward products leave out the exact zeros of `∂L/∂v⁽⁻¹⁾`
/// (behind a ReLU φ). Only on the AVX2 backend: the sparse kernels are AVX2 code, and on an
/// AVX-512 machine the dense AVX-512 products ran faster than them (`examples/kernel_timing`:
/// `∂L/∂y⁽⁻²⁾` of a chunk 12.2 against 15.1 µs, `∂J/∂w⁽⁻¹⁾` of a batch 228 against 283 µs, with
/// 62 % zeros).
fn skips_dead_units(cfg: &NetConfig) -> bool {
    cfg.act == Activation::Relu && backend() == Backend::Avx2
}

/// Softmax of logits, in place. The max is subtracted first so `exp` cannot overflow; the
/// result is the same because the factor `e^−max` cancels in the ratio.
fn softmax_in_place(v: &mut [f32]) {
    let mx = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in v.iter_mut() {
        *x *= inv;
    }
}

/// Loss sum and correct count of rows whose forward pass is done. The loss is `−log y_label`,
/// floored at `1e-30` inside the log only to keep it finite.
fn score_rows(c: usize, labels: &[u8], ids: &[usize], pr: &[f32]) -> (f64, usize) {
    let (mut loss, mut correct) = (0.0, 0);
    for (e, &id) in ids.iter().enumerate() {
        let row = &pr[e * c..(e + 1) * c];
        let l = usize::from(labels[id]);
        loss -= f64::from(row[l].max(1e-30)).ln();
        if argmax(row) == l {
            correct += 1;
        }
    }
    (loss, correct)
}

/// `dv = (y − d)/B` (eq. 1, as a batch mean) and `dv1 = (dv · w) ⊙ φ'(y1)` for one chunk.
#[allow(clippy::too_many_arguments)]
fn output_backward(
    cfg: &NetConfig,
    p: &Params<f32>,
    labels: &[u8],
    ids: &[usize],
    pr: &[f32],
    y1: &[f32],
    dv: &mut [f32],
    dv1: &mut [f32],
    scale: f32,
) {
    let (m, h, c) = (ids.len(), cfg.hidden, cfg.classes);
    for (e, &id) in ids.iter().enumerate() {
        let l = usize::from(labels[id]);
        for j in 0..c {
            let d = if j == l { 1.0 } else { 0.0 };
            dv[e * c + j] = (pr[e * c + j] - d) * scale;
        }
    }
    gemm_nn(m, h, c, dv, c, 1, &p.w, h, dv1, h, false);
    act_backward_in_place(cfg.act, &mut dv1[..m * h], y1);
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Pooling over a chunk's conv maps `y_m3` (m, N, WQ) (wide layout) into `y2` (m, F).
/// For max pooling, `amax` gets the index into `y_m3` of each chosen value (first on ties).
fn pool_forward(cfg: &NetConfig, m: usize, y_m3: &[f32], y2: &mut [f32], amax: &mut [u32]) {
    // Maps are stored compactly: row stride `conv`.
    let (img, ps, pooled, nk) = (cfg.conv(), cfg.pool, cfg.pooled(), cfg.n_kernels);
    let (wq, f, pp) = (wide(cfg).wq(), cfg.flat(), pooled * pooled);
    let inv = 1.0 / (ps * ps) as f32;
    for e in 0..m {
        for n in 0..nk {
            let map = (e * nk + n) * wq;
            let out = &mut y2[e * f + n * pp..e * f + (n + 1) * pp];
            match (cfg.pooling, ps) {
                (Pooling::Mean, 2) => mean_pool2(&y_m3[map..map + wq], img, pooled, out),
                (Pooling::Mean, _) => {
                    for r in 0..pooled {
                        for c in 0..pooled {
                            let mut s = 0.0;
                            for a in 0..ps {
                                for b in 0..ps {
                                    s += y_m3[map + (ps * r + a) * img + ps * c + b];
                                }
                            }
                            out[r * pooled + c] = s * inv;
                        }
                    }
                }
                (Pooling::Max, _) => {
                    for r in 0..pooled {
                        for c in 0..pooled {
                            let mut best = (f32::NEG_INFINITY, 0usize);
                            for a in 0..ps {
                                for b in 0..ps {
                                    let idx = map + (ps * r + a) * img + ps * c + b;
                                    if y_m3[idx] > best.0 {
                                        best = (y_m3[idx], idx);
                                    }
                                }
                            }
                            out[r * pooled + c] = best.0;
                            amax[e * f + n * pp + r * pooled + c] = best.1 as u32;
                        }
                    }
                }
            }
        }
    }
}

/// Re-pooling (backward of [`pool_forward`]) times the conv activation's derivative:
/// `dz[e][n][r][c] = dy2[e][n][r/p][c/p] / p² · act'(y_m3)` (mean), or routed to the arg-max (max).
/// Only valid positions are written; the junk positions of `dz` stay 0.
fn pool_backward(
    cfg: &NetConfig,
    m: usize,
    dy2: &[f32],
    amax: &[u32],
    y_m3: &[f32],
    dz: &mut [f32],
) {
    // Maps are stored compactly: row stride `conv`.
    let (img, ps, pooled, nk, conv) = (
        cfg.conv(),
        cfg.pool,
        cfg.pooled(),
        cfg.n_kernels,
        cfg.conv(),
    );
    let (wq, f, pp) = (wide(cfg).wq(), cfg.flat(), pooled * pooled);
    let dz = &mut dz[..m * nk * wq];
    match cfg.pooling {
        Pooling::Mean if ps == 2 && cfg.conv_act == Activation::Relu => {
            // The default network: re-pooling and ReLU' in one pass.
            for e in 0..m {
                for n in 0..nk {
                    let map = (e * nk + n) * wq;
                    let g = &dy2[e * f + n * pp..e * f + (n + 1) * pp];
                    mean_repool2_relu(g, &y_m3[map..map + wq], img, pooled, &mut dz[map..map + wq]);
                }
            }
            return;
        }
        Pooling::Mean => {
            let inv = 1.0 / (ps * ps) as f32;
            for e in 0..m {
                for n in 0..nk {
                    let map = (e * nk + n) * wq;
                    let g = &dy2[e * f + n * pp..e * f + (n + 1) * pp];
                    for r in 0..conv {
                        let gr = &g[(r / ps) * pooled..(r / ps + 1) * pooled];
                        let drow = &mut dz[map + r * img..map + r * img + conv];
                        if ps == 2 {
                            for (d, &gv) in drow.chunks_exact_mut(2).zip(gr) {
                                d[0] = gv * inv;
                                d[1] = gv * inv;
                            }
                        } else {
                            for (c, d) in drow.iter_mut().enumerate() {
                                *d = gr[c / ps] * inv;
                            }
                        }
                    }
                }
            }
        }
        Pooling::Max => {
            dz.fill(0.0);
            for e in 0..m {
                for o in 0..f {
                    dz[amax[e * f + o] as usize] = dy2[e * f + o];
                }
            }
        }
    }
    act_backward_in_place(cfg.conv_act, dz, y_m3);
}

/// `v = act(v)` element-wise, with the activation chosen once outside the loop.
fn act_in_place(act: Activation, v: &mut [f32]) {
    match act {
        Activation::Relu => relu_in_place(v),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = Activation::Sigmoid.f32(*x)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
    }
}

/// `g = g ⊙ act'(·)`, the derivative written from the activation's output `y`.
fn act_backward_in_place(act: Activation, g: &mut [f32], y: &[f32]) {
    match act {
        Activation::Relu => g
            .iter_mut()
            .zip(y)
            .for_each(|(g, &y)| *g = if y > 0.0 { *g } else { 0.0 }),
        Activation::Sigmoid => g.iter_mut().zip(y).for_each(|(g, &y)| *g *= y * (1.0 - y)),
        Activation::Tanh => g.iter_mut().zip(y).for_each(|(g, &y)| *g *= 1.0 - y * y),
    }
}

/// `out[j] = Σ_rows a[row][j]` for a row-major `a` with `cols` columns (no-op if `out` is empty).
fn col_sums(a: &[f32], cols: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    out.fill(0.0);
    for row in a.chunks_exact(cols) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks cover the batch in order, each of 1..=CHUNK images, and when the count was
    /// made even the two halves of the chunk list differ by at most one image.
    #[test]
    fn chunks_cover_the_batch_and_balance_two_threads() {
        for b in 1..=1100 {
            let n = chunk_count(b);
            assert!(
                n >= b.div_ceil(CHUNK) && n <= b.div_ceil(CHUNK) + 1,
                "b {b}: {n}"
            );
            let mut next = 0;
            for c in 0..n {
                let (start, len) = chunk_at(b, c);
                assert_eq!(start, next, "b {b} chunk {c}");
                assert!((1..=CHUNK).contains(&len), "b {b} chunk {c}: {len} images");
                next = start + len;
            }
            assert_eq!(next, b, "b {b}");
            if n > b.div_ceil(CHUNK) {
                let half = chunk_at(b, n / 2).0;
                assert!(
                    half.abs_diff(b - half) <= 1,
                    "b {b}: halves {half} and {}",
                    b - half
                );
            }
        }
        // A batch of 100 in chunks of 8: 12 whole and one of 4, halved to make 14; each
        // thread's half holds 50 images.
        assert_eq!(
            chunk_count(100),
            100usize.div_ceil(CHUNK).next_multiple_of(2)
        );
        assert_eq!(chunk_at(100, chunk_count(100) / 2).0, 50);
    }
}
