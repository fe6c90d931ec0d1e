//! The batched f32 path used for training and inference.
//!
//! Same formulas as [`crate::reference`], laid out for throughput on the two products of
//! [`crate::kernels`]. For a batch of `B` images cut into chunks of `m ≤ CHUNK` (`P = conv²`
//! positions, `KK = ks²` taps, `N` kernels, `F = flat`, `H = hidden`, `C = classes`, `Q = m·P`):
//! ```text
//! phase 1, per chunk (threads over chunks):
//!   cols  (KK, Q)   im2col, transposed: cols[i·ks + j][e·P + r·conv + c] = x_e[r+i][c+j]
//!   z     (N, Q)    = k · cols (+ bk), then in place y_m3 = act(z)        gemm_nn
//!   y2    (m, F)    = pool(y_m3), flattened (n, r, c)                     y⁽⁻²⁾
//!   y1    (m, H)    = φ(y2 · w_m1ᵀ (+ b_m1))                              gemm_nt
//!   p     (m, C)    = softmax(y1 · wᵀ (+ b))                              gemm_nt
//!   dv    (m, C)    = (p − d) / B                                         ∂L/∂v (eq. 1)
//!   dv1   (m, H)    = (dv · w) ⊙ φ'(y1)                                   gemm_nn
//! phase 2, in parallel:
//!   dw_m1 (H, F)    = dv1ᵀ · y2 over the whole batch, rows split          gemm_nn (eq. 3)
//!   dw    (C, H)    = dvᵀ · y1                                            gemm_nn (eq. 2)
//!   per chunk: dy2 (m, F) = dv1 · w_m1                                    gemm_nn (eq. 4)
//!              dz  (N, Q) = repool(dy2) ⊙ act'(y_m3)                      (eq. 5)
//!              dk_chunk (N, KK) = dz · colsᵀ                              gemm_nt (eq. 6)
//! then dk = Σ dk_chunk in chunk order.
//! ```
//! Determinism: chunk boundaries depend only on the batch size, every output element of a
//! product is computed by one fixed sequence of operations whichever thread runs it, and the only
//! cross-chunk sums (`dk`, `dbk`) are taken in chunk order. So a result is bit-for-bit the same
//! for any number of threads on a given machine.

use crate::config::{Activation, NetConfig, Pooling};
use crate::kernels::{gemm_nn, gemm_nt, im2col_t};
use crate::params::{Grads, Params};
use rayon::prelude::*;

/// Images per chunk: the unit of parallel work and of the fixed reduction order.
pub const CHUNK: usize = 10;

/// Buffers for one chunk of up to [`CHUNK`] images.
#[derive(Clone, Debug)]
struct ChunkBuf {
    /// (m, img²) pixels / 255
    xf: Vec<f32>,
    /// (KK, Q) im2col, transposed
    cols: Vec<f32>,
    /// (N, Q) conv maps y_m3
    z: Vec<f32>,
    /// (N, Q) ∂L/∂conv_pre
    dz: Vec<f32>,
    /// (m, F) max-pool arg-max (index into z), empty for mean pooling
    argmax: Vec<u32>,
    /// (m, F) ∂L/∂y⁽⁻²⁾
    dy2: Vec<f32>,
    /// (N, KK) this chunk's kernel gradient
    dk: Vec<f32>,
    /// (N) this chunk's conv-bias gradient
    dbk: Vec<f32>,
    loss: f64,
    correct: usize,
}

impl ChunkBuf {
    fn new(cfg: &NetConfig) -> Self {
        let q = CHUNK * cfg.conv() * cfg.conv();
        let kk = cfg.ksize * cfg.ksize;
        ChunkBuf {
            xf: vec![0.0; CHUNK * cfg.pixels()],
            cols: vec![0.0; kk * q],
            z: vec![0.0; cfg.n_kernels * q],
            dz: vec![0.0; cfg.n_kernels * q],
            argmax: vec![0; if cfg.pooling == Pooling::Max { CHUNK * cfg.flat() } else { 0 }],
            dy2: vec![0.0; CHUNK * cfg.flat()],
            dk: vec![0.0; cfg.n_kernels * kk],
            dbk: vec![0.0; if cfg.bias { cfg.n_kernels } else { 0 }],
            loss: 0.0,
            correct: 0,
        }
    }
}

/// Reusable buffers for batched passes of up to `max_batch` images; nothing is allocated per batch.
#[derive(Clone, Debug)]
pub struct Workspace {
    cfg: NetConfig,
    max_batch: usize,
    chunks: Vec<ChunkBuf>,
    /// (B, F) y⁽⁻²⁾
    y2: Vec<f32>,
    /// (B, H) y⁽⁻¹⁾
    y1: Vec<f32>,
    /// (B, C) probabilities y
    p: Vec<f32>,
    /// (B, C) ∂L/∂v / B
    dv: Vec<f32>,
    /// (B, H) ∂L/∂v⁽⁻¹⁾ / B
    dv1: Vec<f32>,
}

impl Workspace {
    /// Buffers for batches of up to `max_batch` images.
    pub fn new(cfg: &NetConfig, max_batch: usize) -> Self {
        let b = max_batch.max(1);
        let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
        Workspace {
            cfg: *cfg,
            max_batch: b,
            chunks: (0..b.div_ceil(CHUNK)).map(|_| ChunkBuf::new(cfg)).collect(),
            y2: vec![0.0; b * f],
            y1: vec![0.0; b * h],
            p: vec![0.0; b * c],
            dv: vec![0.0; b * c],
            dv1: vec![0.0; b * h],
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
    let b = idx.len();
    assert!(b <= ws.max_batch, "batch {b} > workspace {}", ws.max_batch);
    assert_eq!(ws.cfg, *cfg, "workspace built for another configuration");
    if b == 0 {
        return BatchStats::default();
    }
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let nch = b.div_ceil(CHUNK);
    let scale = 1.0 / b as f32;

    // Phase 1: forward, and the backward as far as ∂L/∂v⁽⁻¹⁾, per chunk.
    (
        ws.chunks[..nch].par_iter_mut(),
        ws.y2[..b * f].par_chunks_mut(CHUNK * f),
        ws.y1[..b * h].par_chunks_mut(CHUNK * h),
        ws.p[..b * c].par_chunks_mut(CHUNK * c),
        ws.dv[..b * c].par_chunks_mut(CHUNK * c),
        ws.dv1[..b * h].par_chunks_mut(CHUNK * h),
        idx.par_chunks(CHUNK),
    )
        .into_par_iter()
        .for_each(|(cb, y2, y1, pr, dv, dv1, ids)| {
            forward_chunk(cfg, p, images, ids, cb, y2, y1, pr);
            score_chunk(cfg, labels, ids, pr, cb);
            output_backward(cfg, p, labels, ids, pr, y1, dv, dv1, scale);
        });

    // Phase 2: the weight gradients of the dense layers over the whole batch, and each chunk's
    // way back to the kernels, all in parallel.
    let (y2, y1, dv, dv1) = (&ws.y2[..b * f], &ws.y1[..b * h], &ws.dv[..b * c], &ws.dv1[..b * h]);
    let chunks = &mut ws.chunks[..nch];
    let Grads { k: gk, bk: gbk, w_m1: gw1, b_m1: gb1, w: gw, b: gb } = grads;
    rayon::join(
        || {
            // dw_m1 (H, F) = dv1ᵀ · y2, 24 rows (a multiple of the kernel's 6-row tile) per task.
            const ROWS: usize = 24;
            gw1.par_chunks_mut(ROWS * f).enumerate().for_each(|(t, out)| {
                let rows = out.len() / f;
                gemm_nn(rows, f, b, &dv1[t * ROWS..], 1, h, y2, f, out, f, false);
            });
        },
        || {
            rayon::join(
                || {
                    chunks
                        .par_iter_mut()
                        .zip(dv1.par_chunks(CHUNK * h))
                        .for_each(|(cb, dv1c)| backward_chunk(cfg, p, dv1c, cb));
                },
                || {
                    // dw (C, H) = dvᵀ · y1; biases: column sums of dv and dv1.
                    gemm_nn(c, h, b, dv, 1, c, y1, h, gw, h, false);
                    col_sums(dv, c, gb);
                    col_sums(dv1, h, gb1);
                },
            );
        },
    );
    // dk = Σ_chunks dk_chunk, in chunk order.
    let mut stats = BatchStats::default();
    gk.copy_from_slice(&chunks[0].dk);
    gbk.copy_from_slice(&chunks[0].dbk);
    for (i, cb) in chunks.iter().enumerate() {
        if i > 0 {
            gk.iter_mut().zip(&cb.dk).for_each(|(a, x)| *a += x);
            gbk.iter_mut().zip(&cb.dbk).for_each(|(a, x)| *a += x);
        }
        stats.loss_sum += cb.loss;
        stats.correct += cb.correct;
    }
    stats
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
    let b = idx.len();
    assert!(b <= ws.max_batch, "batch {b} > workspace {}", ws.max_batch);
    assert_eq!(ws.cfg, *cfg, "workspace built for another configuration");
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let nch = b.div_ceil(CHUNK);
    let run = |(cb, y2, y1, pr, ids): (&mut ChunkBuf, &mut [f32], &mut [f32], &mut [f32], &[usize])| {
        forward_chunk(cfg, p, images, ids, cb, y2, y1, pr);
        match labels {
            Some(l) => score_chunk(cfg, l, ids, pr, cb),
            None => (cb.loss, cb.correct) = (0.0, 0),
        }
    };
    let parts = (
        ws.chunks[..nch].par_iter_mut(),
        ws.y2[..b * f].par_chunks_mut(CHUNK * f),
        ws.y1[..b * h].par_chunks_mut(CHUNK * h),
        ws.p[..b * c].par_chunks_mut(CHUNK * c),
        idx.par_chunks(CHUNK),
    );
    if nch == 1 {
        // One chunk (e.g. one image): no thread hand-off, for latency.
        let (cb, y2, y1, pr) = (&mut ws.chunks[0], &mut ws.y2[..b * f], &mut ws.y1[..b * h], &mut ws.p[..b * c]);
        run((cb, y2, y1, pr, idx));
    } else {
        parts.into_par_iter().for_each(run);
    }
    let mut s = BatchStats::default();
    for cb in &ws.chunks[..nch] {
        s.loss_sum += cb.loss;
        s.correct += cb.correct;
    }
    s
}

/// im2col + conv + activation + pooling + both dense layers + softmax for one chunk.
#[allow(clippy::too_many_arguments)]
fn forward_chunk(cfg: &NetConfig, p: &Params<f32>, images: &[u8], ids: &[usize], cb: &mut ChunkBuf, y2: &mut [f32], y1: &mut [f32], pr: &mut [f32]) {
    let m = ids.len();
    let (img, ks, conv) = (cfg.img, cfg.ksize, cfg.conv());
    let (kk, pp, nk, f, h, c) = (ks * ks, conv * conv, cfg.n_kernels, cfg.flat(), cfg.hidden, cfg.classes);
    let (px, q) = (img * img, m * pp);

    // xf: (m, img²), the batch is formed here: u8 → [0, 1]
    for (e, &id) in ids.iter().enumerate() {
        let src = &images[id * px..(id + 1) * px];
        for (d, &s) in cb.xf[e * px..(e + 1) * px].iter_mut().zip(src) {
            *d = f32::from(s) * (1.0 / 255.0);
        }
    }
    // cols: (KK, Q), cols[i·ks + j][e·P + r·conv + c] = x_e[r+i][c+j]
    im2col_t(&cb.xf, m, img, ks, &mut cb.cols, q);
    // z: (N, Q) = k (N, KK) · cols (KK, Q), + bias, activation in place → y_m3
    gemm_nn(nk, q, kk, &p.k, kk, 1, &cb.cols, q, &mut cb.z, q, false);
    if !p.bk.is_empty() {
        for (row, &bias) in cb.z[..nk * q].chunks_exact_mut(q).zip(&p.bk) {
            row.iter_mut().for_each(|v| *v += bias);
        }
    }
    act_in_place(cfg.conv_act, &mut cb.z[..nk * q]);
    // y2: (m, F)
    pool_forward(cfg, m, &cb.z, y2, &mut cb.argmax);
    // y1: (m, H) = φ(y2 · w_m1ᵀ + b_m1)
    gemm_nt(m, h, f, y2, f, &p.w_m1, f, y1, h, false);
    if !p.b_m1.is_empty() {
        for row in y1[..m * h].chunks_exact_mut(h) {
            row.iter_mut().zip(&p.b_m1).for_each(|(v, b)| *v += b);
        }
    }
    act_in_place(cfg.act, &mut y1[..m * h]);
    // p: (m, C) = softmax(y1 · wᵀ + b)
    gemm_nt(m, c, h, y1, h, &p.w, h, pr, c, false);
    for row in pr[..m * c].chunks_exact_mut(c) {
        for (v, bb) in row.iter_mut().zip(&p.b) {
            *v += bb;
        }
        softmax_in_place(row);
    }
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

/// Loss and correct count of a chunk whose forward pass is done. The loss is `−log y_label`,
/// floored at `1e-30` inside the log only to keep it finite.
fn score_chunk(cfg: &NetConfig, labels: &[u8], ids: &[usize], pr: &[f32], cb: &mut ChunkBuf) {
    let c = cfg.classes;
    cb.loss = 0.0;
    cb.correct = 0;
    for (e, &id) in ids.iter().enumerate() {
        let row = &pr[e * c..(e + 1) * c];
        let l = usize::from(labels[id]);
        cb.loss -= f64::from(row[l].max(1e-30)).ln();
        if argmax(row) == l {
            cb.correct += 1;
        }
    }
}

/// `dv = (y − d)/B` (eq. 1, as a batch mean) and `dv1 = (dv · w) ⊙ φ'(y1)` for one chunk.
#[allow(clippy::too_many_arguments)]
fn output_backward(cfg: &NetConfig, p: &Params<f32>, labels: &[u8], ids: &[usize], pr: &[f32], y1: &[f32], dv: &mut [f32], dv1: &mut [f32], scale: f32) {
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

/// For one chunk: `dy2 = dv1 · w_m1` (eq. 4), re-pooled and times `act'` (eq. 5) into `dz`, and
/// the chunk's kernel gradient `dk = dz · colsᵀ` (eq. 6).
fn backward_chunk(cfg: &NetConfig, p: &Params<f32>, dv1: &[f32], cb: &mut ChunkBuf) {
    let (h, f, nk) = (cfg.hidden, cfg.flat(), cfg.n_kernels);
    let m = dv1.len() / h;
    let (kk, q) = (cfg.ksize * cfg.ksize, m * cfg.conv() * cfg.conv());
    gemm_nn(m, f, h, dv1, h, 1, &p.w_m1, f, &mut cb.dy2, f, false);
    pool_backward(cfg, m, &cb.dy2, &cb.argmax, &cb.z, &mut cb.dz);
    gemm_nt(nk, kk, q, &cb.dz, q, &cb.cols, q, &mut cb.dk, kk, false);
    for (n, b) in cb.dbk.iter_mut().enumerate() {
        // Summed in f64: a map row has Q terms (thousands), too many for a plain f32 sum.
        *b = cb.dz[n * q..(n + 1) * q].iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
    }
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

/// Pooling over a chunk's conv maps `y_m3` (N, m, conv, conv) into `y2` (m, F).
fn pool_forward(cfg: &NetConfig, m: usize, y_m3: &[f32], y2: &mut [f32], amax: &mut [u32]) {
    let (conv, ps, pooled, nk) = (cfg.conv(), cfg.pool, cfg.pooled(), cfg.n_kernels);
    let (pp, f) = (conv * conv, cfg.flat());
    let inv = 1.0 / (ps * ps) as f32;
    for n in 0..nk {
        for e in 0..m {
            let map = (n * m + e) * pp;
            let out = &mut y2[e * f + n * pooled * pooled..e * f + (n + 1) * pooled * pooled];
            match cfg.pooling {
                Pooling::Mean => {
                    out.fill(0.0);
                    for r in 0..conv {
                        let row = &y_m3[map + r * conv..map + (r + 1) * conv];
                        let o = &mut out[(r / ps) * pooled..(r / ps + 1) * pooled];
                        for (o, win) in o.iter_mut().zip(row.chunks_exact(ps)) {
                            *o += win.iter().sum::<f32>();
                        }
                    }
                    out.iter_mut().for_each(|v| *v *= inv);
                }
                Pooling::Max => {
                    for r in 0..pooled {
                        for c in 0..pooled {
                            let mut best = (f32::NEG_INFINITY, 0usize);
                            for a in 0..ps {
                                for b in 0..ps {
                                    let idx = map + (ps * r + a) * conv + ps * c + b;
                                    if y_m3[idx] > best.0 {
                                        best = (y_m3[idx], idx);
                                    }
                                }
                            }
                            let o = (n * pooled + r) * pooled + c;
                            out[r * pooled + c] = best.0;
                            amax[e * f + o] = best.1 as u32;
                        }
                    }
                }
            }
        }
    }
}

/// Re-pooling (backward of [`pool_forward`]) times the conv activation's derivative:
/// `dz[n][e][r][c] = dy2[e][n][r/p][c/p] / p² · act'(y_m3)` (mean), or routed to the arg-max (max).
fn pool_backward(cfg: &NetConfig, m: usize, dy2: &[f32], amax: &[u32], y_m3: &[f32], dz: &mut [f32]) {
    let (conv, ps, pooled, nk) = (cfg.conv(), cfg.pool, cfg.pooled(), cfg.n_kernels);
    let (pp, f) = (conv * conv, cfg.flat());
    let dz = &mut dz[..nk * m * pp];
    match cfg.pooling {
        Pooling::Mean => {
            let inv = 1.0 / (ps * ps) as f32;
            for n in 0..nk {
                for e in 0..m {
                    let map = (n * m + e) * pp;
                    let g = &dy2[e * f + n * pooled * pooled..];
                    for r in 0..conv {
                        let gr = &g[(r / ps) * pooled..(r / ps + 1) * pooled];
                        let drow = &mut dz[map + r * conv..map + (r + 1) * conv];
                        for (win, &gv) in drow.chunks_exact_mut(ps).zip(gr) {
                            win.fill(gv * inv);
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
        Activation::Relu => v.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::Sigmoid => v.iter_mut().for_each(|x| *x = Activation::Sigmoid.f32(*x)),
        Activation::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
    }
}

/// `g = g ⊙ act'(·)`, the derivative written from the activation's output `y`.
fn act_backward_in_place(act: Activation, g: &mut [f32], y: &[f32]) {
    match act {
        Activation::Relu => g.iter_mut().zip(y).for_each(|(g, &y)| *g = if y > 0.0 { *g } else { 0.0 }),
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
