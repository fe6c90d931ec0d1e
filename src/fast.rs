//! The batched f32 path used for training and inference.
//!
//! Same formulas as [`crate::reference`], laid out for throughput on the products of
//! [`crate::kernels`]. Shapes for a batch of `B` images (`P = conv²` positions, `KK = ks²` taps,
//! `N` kernels, `F = flat`, `H = hidden`, `C = classes`); the conv layer works on chunks of
//! `m ≤ CHUNK` images (`Q = m·P`) so its im2col buffers stay in the core's L2 cache:
//! ```text
//! 1. per chunk:   cols (KK, Q)  im2col: cols[i·ks + j][e·P + r·conv + c] = x_e[r+i][c+j]
//!                 z    (N, Q)   = k · cols (+ bk), in place y_m3 = act(z)      gemm_nn
//!                 y2   (m, F)   = pool(y_m3), flattened (n, r, c)              y⁽⁻²⁾
//! 2. row blocks:  y1   (B, H)   = φ(y2 · w_m1ᵀ (+ b_m1))                       gemm_nn on w_m1ᵀ
//!                 p    (B, C)   = softmax(y1 · wᵀ (+ b))                       gemm_nt
//!                 dv   (B, C)   = (p − d) / B                                  ∂L/∂v (eq. 1)
//!                 dv1  (B, H)   = (dv · w) ⊙ φ'(y1)                            gemm_nn
//! 3. in parallel: dw_m1 (H, F)  = dv1ᵀ · y2, rows split                        gemm_nn (eq. 3)
//!                 dy2  (B, F)   = dv1 · w_m1, rows split                       gemm_nn (eq. 4)
//!                 dw   (C, H)   = dvᵀ · y1                                     gemm_nn (eq. 2)
//! 4. per chunk:   dz   (N, Q)   = repool(dy2) ⊙ act'(y_m3)                     (eq. 5)
//!                 cols_n (Q, KK) im2col again, position-major
//!                 dk_chunk (N, KK) = dz · cols_n                               gemm_nn (eq. 6)
//!    then dk = Σ dk_chunk in chunk order.
//! ```
//! For one image (latency), step 2 uses dot products against `w_m1` directly instead of its
//! transpose.
//!
//! Determinism: chunk and row-block boundaries depend only on the batch size, every output element
//! of a product is computed by one fixed sequence of operations whichever thread runs it, and the
//! only cross-chunk sums (`dk`, `dbk`) are taken in chunk order. So a result is bit-for-bit the
//! same for any number of threads on a given machine.

use crate::config::{Activation, NetConfig, Pooling};
use crate::kernels::{gemm_nn, gemm_nt, im2col_n, im2col_t};
use crate::params::{Grads, Params};
use rayon::prelude::*;

/// Images per conv chunk: the unit of parallel conv work and of the fixed `dk` reduction order.
pub const CHUNK: usize = 4;
/// Images per row block of the dense layers.
const ROWS: usize = 12;

/// Scratch for one conv chunk (im2col buffers), reused.
#[derive(Clone, Debug)]
struct ChunkBuf {
    /// (KK, Q) im2col for the forward conv, + 16 floats of slack
    cols: Vec<f32>,
    /// (Q, KKp) im2col, position-major, taps padded with zeros to a multiple of 16, + slack
    cols_n: Vec<f32>,
    /// (N, Q) ∂L/∂conv_pre
    dz: Vec<f32>,
    /// (N, KKp) kernel gradient over the padded taps
    dk_pad: Vec<f32>,
    /// (N, KK) this chunk's kernel gradient
    dk: Vec<f32>,
    /// (N) this chunk's conv-bias gradient
    dbk: Vec<f32>,
}

impl ChunkBuf {
    fn new(cfg: &NetConfig) -> Self {
        let q = CHUNK * cfg.conv() * cfg.conv();
        let kk = cfg.ksize * cfg.ksize;
        let kkp = kk.next_multiple_of(16);
        ChunkBuf {
            cols: vec![0.0; kk * q + 16],
            cols_n: vec![0.0; q * kkp + 16],
            dz: vec![0.0; cfg.n_kernels * q],
            dk_pad: vec![0.0; cfg.n_kernels * kkp],
            dk: vec![0.0; cfg.n_kernels * kk],
            dbk: vec![0.0; if cfg.bias { cfg.n_kernels } else { 0 }],
        }
    }
}

/// Reusable buffers for batched passes of up to `max_batch` images; nothing is allocated per batch.
#[derive(Clone, Debug)]
pub struct Workspace {
    cfg: NetConfig,
    max_batch: usize,
    chunks: Vec<ChunkBuf>,
    /// (B, img²) pixels / 255, + 16 floats of slack
    xf: Vec<f32>,
    /// (B, N, P) conv maps y_m3, chunk by chunk: chunk c holds (N, Q) at c·CHUNK·N·P
    z: Vec<f32>,
    /// (B, F) max-pool arg-max (index into the chunk's z), empty for mean pooling
    argmax: Vec<u32>,
    /// (B, F) y⁽⁻²⁾
    y2: Vec<f32>,
    /// (F, H) w_m1ᵀ, refreshed from the parameters at each batched call
    w1t: Vec<f32>,
    /// (B, H) y⁽⁻¹⁾
    y1: Vec<f32>,
    /// (B, C) probabilities y
    p: Vec<f32>,
    /// (B, C) ∂L/∂v / B
    dv: Vec<f32>,
    /// (B, H) ∂L/∂v⁽⁻¹⁾ / B
    dv1: Vec<f32>,
    /// (B, F) ∂L/∂y⁽⁻²⁾ / B
    dy2: Vec<f32>,
    /// per row block: (loss sum, correct)
    scores: Vec<(f64, usize)>,
}

impl Workspace {
    /// Buffers for batches of up to `max_batch` images.
    pub fn new(cfg: &NetConfig, max_batch: usize) -> Self {
        let b = max_batch.max(1);
        let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
        let maps = cfg.n_kernels * cfg.conv() * cfg.conv();
        Workspace {
            cfg: *cfg,
            max_batch: b,
            chunks: (0..b.div_ceil(CHUNK)).map(|_| ChunkBuf::new(cfg)).collect(),
            xf: vec![0.0; b * cfg.pixels() + 16],
            z: vec![0.0; b * maps],
            argmax: vec![0; if cfg.pooling == Pooling::Max { b * f } else { 0 }],
            y2: vec![0.0; b * f],
            w1t: vec![0.0; f * h],
            y1: vec![0.0; b * h],
            p: vec![0.0; b * c],
            dv: vec![0.0; b * c],
            dv1: vec![0.0; b * h],
            dy2: vec![0.0; b * f],
            scores: vec![(0.0, 0); b.div_ceil(ROWS)],
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
    if b == 0 {
        return BatchStats::default();
    }
    forward(cfg, p, images, Some(labels), idx, ws, true);
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let (y2, y1, dv, dv1) = (&ws.y2[..b * f], &ws.y1[..b * h], &ws.dv[..b * c], &ws.dv1[..b * h]);
    let Grads { k: gk, bk: gbk, w_m1: gw1, b_m1: gb1, w: gw, b: gb } = grads;

    // 3. dense weight gradients and ∂L/∂y⁽⁻²⁾, all row-split, in parallel.
    let dy2 = &mut ws.dy2[..b * f];
    rayon::join(
        || {
            // dw_m1 (H, F) = dv1ᵀ · y2: 24 rows (a multiple of the kernel's 6-row tile) per task.
            gw1.par_chunks_mut(24 * f).enumerate().for_each(|(t, out)| {
                gemm_nn(out.len() / f, f, b, &dv1[t * 24..], 1, h, y2, f, out, f, false);
            });
        },
        || {
            rayon::join(
                || {
                    // dy2 (B, F) = dv1 · w_m1
                    dy2.par_chunks_mut(ROWS * f).zip(dv1.par_chunks(ROWS * h)).for_each(|(out, d)| {
                        gemm_nn(d.len() / h, f, h, d, h, 1, &p.w_m1, f, out, f, false);
                    });
                },
                || {
                    // dw (C, H) = dvᵀ · y1; biases: column sums of dv and dv1.
                    gemm_nn(c, h, b, dv, 1, c, y1, h, gw, h, false);
                    col_sums(dv, c, gb);
                    col_sums(dv1, h, gb1);
                },
            )
        },
    );

    // 4. back to the kernels, per chunk.
    let nch = b.div_ceil(CHUNK);
    let maps = cfg.n_kernels * cfg.conv() * cfg.conv();
    let px = cfg.pixels();
    let (xf, z, argmax, dy2) = (&ws.xf, &ws.z, &ws.argmax, &ws.dy2);
    ws.chunks[..nch].par_iter_mut().enumerate().for_each(|(ci, cb)| {
        let e0 = ci * CHUNK;
        let m = CHUNK.min(b - e0);
        let am = if argmax.is_empty() { &argmax[..] } else { &argmax[e0 * f..(e0 + m) * f] };
        backward_chunk(cfg, m, &xf[e0 * px..], &z[e0 * maps..(e0 + m) * maps], am, &dy2[e0 * f..(e0 + m) * f], cb);
    });
    // dk = Σ_chunks dk_chunk, in chunk order.
    let chunks = &ws.chunks[..nch];
    gk.copy_from_slice(&chunks[0].dk);
    gbk.copy_from_slice(&chunks[0].dbk);
    for cb in &chunks[1..] {
        gk.iter_mut().zip(&cb.dk).for_each(|(a, x)| *a += x);
        gbk.iter_mut().zip(&cb.dbk).for_each(|(a, x)| *a += x);
    }
    ws.scores[..b.div_ceil(ROWS)].iter().fold(BatchStats::default(), |s, &(l, k)| BatchStats {
        loss_sum: s.loss_sum + l,
        correct: s.correct + k,
    })
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
    if b == 0 {
        return BatchStats::default();
    }
    forward(cfg, p, images, labels, idx, ws, false);
    ws.scores[..b.div_ceil(ROWS)].iter().fold(BatchStats::default(), |s, &(l, k)| BatchStats {
        loss_sum: s.loss_sum + l,
        correct: s.correct + k,
    })
}

/// Steps 1–2: the forward pass, scores, and (when `train`) `dv` and `dv1`.
fn forward(cfg: &NetConfig, p: &Params<f32>, images: &[u8], labels: Option<&[u8]>, idx: &[usize], ws: &mut Workspace, train: bool) {
    let b = idx.len();
    assert!(b <= ws.max_batch, "batch {b} > workspace {}", ws.max_batch);
    assert_eq!(ws.cfg, *cfg, "workspace built for another configuration");
    let (f, h, c) = (cfg.flat(), cfg.hidden, cfg.classes);
    let px = cfg.pixels();
    let maps = cfg.n_kernels * cfg.conv() * cfg.conv();
    let nch = b.div_ceil(CHUNK);

    // The batch is formed here: u8 → [0, 1].
    ws.xf[..b * px].par_chunks_mut(CHUNK * px).zip(idx.par_chunks(CHUNK)).for_each(|(xf, ids)| {
        for (dst, &id) in xf.chunks_exact_mut(px).zip(ids) {
            for (d, &s) in dst.iter_mut().zip(&images[id * px..(id + 1) * px]) {
                *d = f32::from(s) * (1.0 / 255.0);
            }
        }
    });

    // 1. conv, activation, pooling, per chunk.
    let xf = &ws.xf;
    let one = b == 1;
    let conv_part = |(ci, (cb, (z, (y2, am)))): (usize, (&mut ChunkBuf, (&mut [f32], (&mut [f32], &mut [u32]))))| {
        let m = CHUNK.min(b - ci * CHUNK);
        conv_forward_chunk(cfg, p, m, &xf[ci * CHUNK * px..], cb, z, y2, am);
    };
    let am_len = if ws.argmax.is_empty() { 0 } else { b * f };
    let am_step = if ws.argmax.is_empty() { 1 } else { CHUNK * f };
    if one {
        let am = if am_len == 0 { &mut ws.argmax[..0] } else { &mut ws.argmax[..f] };
        conv_part((0, (&mut ws.chunks[0], (&mut ws.z[..maps], (&mut ws.y2[..f], am)))));
    } else {
        let mut am_parts: Vec<&mut [u32]> = Vec::new();
        if am_len == 0 {
            am_parts.resize_with(nch, || &mut []);
        } else {
            am_parts.extend(ws.argmax[..am_len].chunks_mut(am_step));
        }
        ws.chunks[..nch]
            .par_iter_mut()
            .zip(ws.z[..b * maps].par_chunks_mut(CHUNK * maps).zip(ws.y2[..b * f].par_chunks_mut(CHUNK * f).zip(am_parts.into_par_iter())))
            .enumerate()
            .for_each(conv_part);
    }

    // 2. dense layers, output, scores and the output-side backward, per row block.
    if !one {
        transpose(&p.w_m1, h, f, &mut ws.w1t);
    }
    let (y2, w1t) = (&ws.y2, &ws.w1t);
    let scale = 1.0 / b as f32;
    let nrb = b.div_ceil(ROWS);
    (
        ws.y1[..b * h].par_chunks_mut(ROWS * h),
        ws.p[..b * c].par_chunks_mut(ROWS * c),
        ws.dv[..b * c].par_chunks_mut(ROWS * c),
        ws.dv1[..b * h].par_chunks_mut(ROWS * h),
        idx.par_chunks(ROWS),
        ws.scores[..nrb].par_iter_mut(),
    )
        .into_par_iter()
        .enumerate()
        .for_each(|(rb, (y1, pr, dv, dv1, ids, score))| {
            let m = ids.len();
            let y2 = &y2[rb * ROWS * f..(rb * ROWS + m) * f];
            // y1 (m, H) = φ(y2 · w_m1ᵀ + b_m1)
            if one {
                gemm_nt(m, h, f, y2, f, &p.w_m1, f, y1, h, false);
            } else {
                gemm_nn(m, h, f, y2, f, 1, w1t, h, y1, h, false);
            }
            if !p.b_m1.is_empty() {
                for row in y1.chunks_exact_mut(h) {
                    row.iter_mut().zip(&p.b_m1).for_each(|(v, b)| *v += b);
                }
            }
            act_in_place(cfg.act, y1);
            // p (m, C) = softmax(y1 · wᵀ + b)
            gemm_nt(m, c, h, y1, h, &p.w, h, pr, c, false);
            for row in pr.chunks_exact_mut(c) {
                row.iter_mut().zip(&p.b).for_each(|(v, b)| *v += b);
                softmax_in_place(row);
            }
            *score = match labels {
                Some(l) => score_rows(c, l, ids, pr),
                None => (0.0, 0),
            };
            if train {
                let l = labels.expect("training needs labels");
                output_backward(cfg, p, l, ids, pr, y1, dv, dv1, scale);
            }
        });
}

/// `out (cols, rows) = aᵀ` for a row-major `a` (rows, cols), in cache-sized blocks.
fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const T: usize = 32;
    for i0 in (0..rows).step_by(T) {
        for j0 in (0..cols).step_by(T) {
            for i in i0..(i0 + T).min(rows) {
                for j in j0..(j0 + T).min(cols) {
                    out[j * rows + i] = a[i * cols + j];
                }
            }
        }
    }
}

/// im2col + conv + activation + pooling for one chunk of `m` images whose pixels start at `xf`.
#[allow(clippy::too_many_arguments)]
fn conv_forward_chunk(cfg: &NetConfig, p: &Params<f32>, m: usize, xf: &[f32], cb: &mut ChunkBuf, z: &mut [f32], y2: &mut [f32], am: &mut [u32]) {
    let (img, ks, conv) = (cfg.img, cfg.ksize, cfg.conv());
    let (kk, nk) = (ks * ks, cfg.n_kernels);
    let q = m * conv * conv;
    // cols: (KK, Q)
    im2col_t(xf, m, img, ks, &mut cb.cols, q);
    // z: (N, Q) = k (N, KK) · cols (KK, Q), + bias, activation in place → y_m3
    gemm_nn(nk, q, kk, &p.k, kk, 1, &cb.cols, q, z, q, false);
    let z = &mut z[..nk * q];
    if !p.bk.is_empty() {
        for (row, &bias) in z.chunks_exact_mut(q).zip(&p.bk) {
            row.iter_mut().for_each(|v| *v += bias);
        }
    }
    act_in_place(cfg.conv_act, z);
    // y2: (m, F)
    pool_forward(cfg, m, z, y2, am);
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

/// For one chunk of `m` images: `dy2` re-pooled and times `act'` (eq. 5) into `dz`, and the
/// chunk's kernel gradient `dk = dz · cols_n` (eq. 6).
fn backward_chunk(cfg: &NetConfig, m: usize, xf: &[f32], z: &[f32], am: &[u32], dy2: &[f32], cb: &mut ChunkBuf) {
    let nk = cfg.n_kernels;
    let (kk, q) = (cfg.ksize * cfg.ksize, m * cfg.conv() * cfg.conv());
    let kkp = kk.next_multiple_of(16);
    pool_backward(cfg, m, dy2, am, z, &mut cb.dz);
    // dk (N, KKp) = dz (N, Q) · cols_n (Q, KKp): SIMD lanes over the taps, no horizontal sums.
    im2col_n(xf, m, cfg.img, cfg.ksize, &mut cb.cols_n, kkp);
    gemm_nn(nk, kkp, q, &cb.dz, q, 1, &cb.cols_n, kkp, &mut cb.dk_pad, kkp, false);
    for (d, s) in cb.dk.chunks_exact_mut(kk).zip(cb.dk_pad.chunks_exact(kkp)) {
        d.copy_from_slice(&s[..kk]);
    }
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
