//! The batched f32 path used for training and inference: im2col + GEMM for the conv and its
//! kernel gradient, GEMM for the dense layers, rayon over fixed chunks of the batch.
//!
//! Same formulas as [`crate::reference`], laid out for throughput. For a chunk of `m` images
//! (`P = conv²` positions, `KK = ks²` kernel taps, `N` kernels, `F = flat`, `H = hidden`,
//! `C = classes`):
//! ```text
//! cols  (m·P, KK)   im2col: cols[e·P + r·conv + c][i·ks + j] = x_e[r+i][c+j]
//! z     (N, m·P)    = k (N, KK) · colsᵀ (+ bk)          conv_pre, then in place y_m3 = act(z)
//! y2    (m, F)      = pool(y_m3), flattened (n, r, c)   y⁽⁻²⁾
//! y1    (m, H)      = φ(y2 · w_m1ᵀ (+ b_m1))            y⁽⁻¹⁾
//! p     (m, C)      = softmax(y1 · wᵀ (+ b))            y
//! dv    (m, C)      = (p − d) / B                       ∂L/∂v, mean over the batch
//! dw    (C, H)     += dvᵀ · y1                          ∂J/∂w = (y − d) y⁽⁻¹⁾ᵀ
//! dv1   (m, H)      = (dv · w) ⊙ φ'(y1)                 ∂L/∂v⁽⁻¹⁾
//! dw_m1 (H, F)     += dv1ᵀ · y2                         ∂J/∂w⁽⁻¹⁾
//! dy2   (m, F)      = dv1 · w_m1                        ∂L/∂y⁽⁻²⁾
//! dz    (N, m·P)    = repool(dy2) ⊙ act'(y_m3)          ∂L/∂conv_pre
//! dk    (N, KK)    += dz · cols                         ∂J/∂k = x ⋆ dz
//! ```
//! Determinism: a batch is cut into chunks whose size depends only on the batch size; each chunk's
//! gradient goes to its own buffer and the buffers are summed in chunk order. So the result is
//! bit-for-bit the same for any number of threads.

use crate::config::{NetConfig, Pooling};
use crate::kernels::{Layout, gemm};
use crate::params::{Grads, Params};
use rayon::prelude::*;

/// Images per chunk: the unit of parallel work and of the fixed reduction order.
pub const CHUNK: usize = 16;

/// Buffers for one chunk of up to [`CHUNK`] images, allocated once and reused.
#[derive(Clone, Debug)]
pub struct ChunkWork {
    cols: Vec<f32>,
    z: Vec<f32>,
    y2: Vec<f32>,
    argmax: Vec<u32>,
    y1: Vec<f32>,
    p: Vec<f32>,
    dv: Vec<f32>,
    dv1: Vec<f32>,
    dy2: Vec<f32>,
    dz: Vec<f32>,
    /// This chunk's gradient (sum over its images of `∂L/∂θ`, divided by the batch size).
    pub grads: Grads<f32>,
    /// Sum of this chunk's per-image losses.
    pub loss: f64,
    /// How many of this chunk's images were classified correctly.
    pub correct: usize,
}

impl ChunkWork {
    fn new(cfg: &NetConfig) -> Self {
        let m = CHUNK;
        let (kk, pp, n, f, h, c) = (
            cfg.ksize * cfg.ksize,
            cfg.conv() * cfg.conv(),
            cfg.n_kernels,
            cfg.flat(),
            cfg.hidden,
            cfg.classes,
        );
        ChunkWork {
            cols: vec![0.0; m * pp * kk],
            z: vec![0.0; n * m * pp],
            y2: vec![0.0; m * f],
            argmax: vec![
                0;
                if cfg.pooling == Pooling::Max {
                    m * f
                } else {
                    0
                }
            ],
            y1: vec![0.0; m * h],
            p: vec![0.0; m * c],
            dv: vec![0.0; m * c],
            dv1: vec![0.0; m * h],
            dy2: vec![0.0; m * f],
            dz: vec![0.0; n * m * pp],
            grads: Grads::zeros(cfg),
            loss: 0.0,
            correct: 0,
        }
    }
}

/// Reusable state for batched forward/backward passes: one [`ChunkWork`] per chunk.
#[derive(Clone, Debug)]
pub struct Workspace {
    cfg: NetConfig,
    chunks: Vec<ChunkWork>,
}

impl Workspace {
    /// Buffers for batches of up to `max_batch` images.
    pub fn new(cfg: &NetConfig, max_batch: usize) -> Self {
        let n = max_batch.max(1).div_ceil(CHUNK);
        Workspace {
            cfg: *cfg,
            chunks: (0..n).map(|_| ChunkWork::new(cfg)).collect(),
        }
    }
    /// The per-chunk results of the last call.
    pub fn chunks(&self) -> &[ChunkWork] {
        &self.chunks
    }
    /// Probabilities `y` of the last forward pass for batch image `i`.
    pub fn probs(&self, i: usize) -> &[f32] {
        let c = self.cfg.classes;
        &self.chunks[i / CHUNK].p[(i % CHUNK) * c..(i % CHUNK + 1) * c]
    }
}

/// What one batch step measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchStats {
    /// Sum of the per-image losses.
    pub loss_sum: f64,
    /// Images classified correctly (before the update).
    pub correct: usize,
}

/// Forward and backward over a batch: writes the mean gradient `(1/B) Σ_e ∂L_e/∂θ` into `grads`
/// (overwritten, not accumulated). `images` is `[*, img²]` u8; `idx` picks the batch's images.
///
/// # Panics
/// If the workspace is too small for the batch or an index or label is out of range (caller bugs).
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
    assert!(
        b.div_ceil(CHUNK) <= ws.chunks.len(),
        "workspace for {} chunks, batch needs {}",
        ws.chunks.len(),
        b.div_ceil(CHUNK)
    );
    let scale = 1.0 / b as f32;
    ws.chunks
        .par_iter_mut()
        .zip(idx.par_chunks(CHUNK))
        .for_each(|(w, ids)| {
            forward_chunk(cfg, p, images, ids, w);
            backward_chunk(cfg, p, labels, ids, w, scale);
        });
    let used = b.div_ceil(CHUNK);
    let mut stats = BatchStats::default();
    // Fixed-order reduction: chunk 0, then 1, … — independent of the thread count.
    for (ci, w) in ws.chunks[..used].iter().enumerate() {
        for ((_, g), (_, wg)) in grads.tensors_mut().into_iter().zip(w.grads.tensors()) {
            if ci == 0 {
                g.copy_from_slice(wg);
            } else {
                for (a, &x) in g.iter_mut().zip(wg) {
                    *a += x;
                }
            }
        }
        stats.loss_sum += w.loss;
        stats.correct += w.correct;
    }
    stats
}

/// Forward only, over a batch; probabilities are then in [`Workspace::probs`]. If `labels` is
/// given, the returned stats count losses and correct predictions.
pub fn forward_batch(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    labels: Option<&[u8]>,
    idx: &[usize],
    ws: &mut Workspace,
) -> BatchStats {
    let b = idx.len();
    assert!(b.div_ceil(CHUNK) <= ws.chunks.len());
    ws.chunks
        .par_iter_mut()
        .zip(idx.par_chunks(CHUNK))
        .for_each(|(w, ids)| {
            forward_chunk(cfg, p, images, ids, w);
            match labels {
                Some(l) => score_chunk(cfg, l, ids, w),
                None => (w.loss, w.correct) = (0.0, 0),
            }
        });
    let mut s = BatchStats::default();
    for w in &ws.chunks[..b.div_ceil(CHUNK)] {
        s.loss_sum += w.loss;
        s.correct += w.correct;
    }
    s
}

/// im2col + conv GEMM + activation + pooling + both dense layers + softmax for one chunk.
fn forward_chunk(
    cfg: &NetConfig,
    p: &Params<f32>,
    images: &[u8],
    ids: &[usize],
    w: &mut ChunkWork,
) {
    let m = ids.len();
    let (img, ks, conv) = (cfg.img, cfg.ksize, cfg.conv());
    let (kk, pp, nk, f, h, c) = (
        ks * ks,
        conv * conv,
        cfg.n_kernels,
        cfg.flat(),
        cfg.hidden,
        cfg.classes,
    );
    let px = img * img;

    // cols: (m·P, KK)
    for (e, &id) in ids.iter().enumerate() {
        let x = &images[id * px..(id + 1) * px];
        for r in 0..conv {
            for cc in 0..conv {
                let row = &mut w.cols[((e * pp) + r * conv + cc) * kk..][..kk];
                for i in 0..ks {
                    let src = &x[(r + i) * img + cc..][..ks];
                    for (d, &s) in row[i * ks..(i + 1) * ks].iter_mut().zip(src) {
                        *d = f32::from(s) * (1.0 / 255.0);
                    }
                }
            }
        }
    }
    // z: (N, m·P) = k (N, KK) · colsᵀ (KK, m·P)
    let mp = m * pp;
    gemm(
        1.0,
        &p.k,
        Layout::row_major(nk, kk),
        &w.cols,
        Layout::transposed(kk, mp),
        0.0,
        &mut w.z,
        Layout::row_major(nk, mp),
    );
    let z = &mut w.z[..nk * mp];
    for (n, row) in z.chunks_exact_mut(mp).enumerate() {
        let bias = if p.bk.is_empty() { 0.0 } else { p.bk[n] };
        for v in row {
            *v = cfg.conv_act.f32(*v + bias);
        }
    }
    // y2: (m, F), pooled, flattened (n, r, c) per image
    pool_forward(cfg, m, &w.z, &mut w.y2, &mut w.argmax);
    // y1: (m, H) = φ(y2 · w_m1ᵀ + b_m1)
    gemm(
        1.0,
        &w.y2,
        Layout::row_major(m, f),
        &p.w_m1,
        Layout::transposed(f, h),
        0.0,
        &mut w.y1,
        Layout::row_major(m, h),
    );
    for row in w.y1[..m * h].chunks_exact_mut(h) {
        for (j, v) in row.iter_mut().enumerate() {
            let bias = if p.b_m1.is_empty() { 0.0 } else { p.b_m1[j] };
            *v = cfg.act.f32(*v + bias);
        }
    }
    // p: (m, C) = softmax(y1 · wᵀ + b)
    gemm(
        1.0,
        &w.y1,
        Layout::row_major(m, h),
        &p.w,
        Layout::transposed(h, c),
        0.0,
        &mut w.p,
        Layout::row_major(m, c),
    );
    for row in w.p[..m * c].chunks_exact_mut(c) {
        if !p.b.is_empty() {
            for (v, &bb) in row.iter_mut().zip(&p.b) {
                *v += bb;
            }
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

/// Loss and correct count of a chunk whose forward pass is done. The loss is
/// `−log y_label`, floored at `1e-30` inside the log only to keep it finite.
fn score_chunk(cfg: &NetConfig, labels: &[u8], ids: &[usize], w: &mut ChunkWork) {
    let c = cfg.classes;
    w.loss = 0.0;
    w.correct = 0;
    for (e, &id) in ids.iter().enumerate() {
        let row = &w.p[e * c..(e + 1) * c];
        let l = usize::from(labels[id]);
        w.loss -= f64::from(row[l].max(1e-30)).ln();
        if argmax(row) == l {
            w.correct += 1;
        }
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
            for r in 0..pooled {
                for c in 0..pooled {
                    let o = e * f + (n * pooled + r) * pooled + c;
                    let mut sum = 0.0;
                    let mut best = (f32::NEG_INFINITY, 0usize);
                    for a in 0..ps {
                        for b in 0..ps {
                            let idx = map + (ps * r + a) * conv + ps * c + b;
                            let v = y_m3[idx];
                            sum += v;
                            if v > best.0 {
                                best = (v, idx);
                            }
                        }
                    }
                    match cfg.pooling {
                        Pooling::Mean => y2[o] = sum * inv,
                        Pooling::Max => {
                            y2[o] = best.0;
                            amax[o] = best.1 as u32;
                        }
                    }
                }
            }
        }
    }
}

/// Re-pooling (backward of [`pool_forward`]) times the conv activation's derivative:
/// `dz[n][e][r][c] = dy2[e][n][r/p][c/p] / p² · act'(y_m3)` (mean), or routed to the arg-max (max).
fn pool_backward(
    cfg: &NetConfig,
    m: usize,
    dy2: &[f32],
    amax: &[u32],
    y_m3: &[f32],
    dz: &mut [f32],
) {
    let (conv, ps, pooled, nk) = (cfg.conv(), cfg.pool, cfg.pooled(), cfg.n_kernels);
    let (pp, f) = (conv * conv, cfg.flat());
    let dz = &mut dz[..nk * m * pp];
    match cfg.pooling {
        Pooling::Mean => {
            let inv = 1.0 / (ps * ps) as f32;
            for n in 0..nk {
                for e in 0..m {
                    let map = (n * m + e) * pp;
                    for r in 0..conv {
                        for c in 0..conv {
                            dz[map + r * conv + c] =
                                dy2[e * f + (n * pooled + r / ps) * pooled + c / ps] * inv;
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
    for (g, &y) in dz.iter_mut().zip(y_m3) {
        *g *= cfg.conv_act.deriv_from_output_f32(y);
    }
}

/// Backward for one chunk whose forward is done; `scale = 1/B` makes the batch gradient a mean.
fn backward_chunk(
    cfg: &NetConfig,
    p: &Params<f32>,
    labels: &[u8],
    ids: &[usize],
    w: &mut ChunkWork,
    scale: f32,
) {
    let m = ids.len();
    let (ks, conv) = (cfg.ksize, cfg.conv());
    let (kk, pp, nk, f, h, c) = (
        ks * ks,
        conv * conv,
        cfg.n_kernels,
        cfg.flat(),
        cfg.hidden,
        cfg.classes,
    );
    score_chunk(cfg, labels, ids, w);
    // dv: (m, C) = (y − d) / B
    for (e, &id) in ids.iter().enumerate() {
        let l = usize::from(labels[id]);
        for j in 0..c {
            let d = if j == l { 1.0 } else { 0.0 };
            w.dv[e * c + j] = (w.p[e * c + j] - d) * scale;
        }
    }
    let g = &mut w.grads;
    // dw: (C, H) = dvᵀ · y1
    gemm(
        1.0,
        &w.dv,
        Layout::transposed(c, m),
        &w.y1,
        Layout::row_major(m, h),
        0.0,
        &mut g.w,
        Layout::row_major(c, h),
    );
    col_sums(&w.dv[..m * c], c, &mut g.b);
    // dv1: (m, H) = (dv · w) ⊙ φ'(y1)
    gemm(
        1.0,
        &w.dv,
        Layout::row_major(m, c),
        &p.w,
        Layout::row_major(c, h),
        0.0,
        &mut w.dv1,
        Layout::row_major(m, h),
    );
    for (d, &y) in w.dv1[..m * h].iter_mut().zip(&w.y1) {
        *d *= cfg.act.deriv_from_output_f32(y);
    }
    // dw_m1: (H, F) = dv1ᵀ · y2
    gemm(
        1.0,
        &w.dv1,
        Layout::transposed(h, m),
        &w.y2,
        Layout::row_major(m, f),
        0.0,
        &mut g.w_m1,
        Layout::row_major(h, f),
    );
    col_sums(&w.dv1[..m * h], h, &mut g.b_m1);
    // dy2: (m, F) = dv1 · w_m1
    gemm(
        1.0,
        &w.dv1,
        Layout::row_major(m, h),
        &p.w_m1,
        Layout::row_major(h, f),
        0.0,
        &mut w.dy2,
        Layout::row_major(m, f),
    );
    // dz: (N, m·P) = repool(dy2) ⊙ act'(y_m3)
    pool_backward(cfg, m, &w.dy2, &w.argmax, &w.z, &mut w.dz);
    // dk: (N, KK) = dz · cols
    let mp = m * pp;
    gemm(
        1.0,
        &w.dz,
        Layout::row_major(nk, mp),
        &w.cols,
        Layout::row_major(mp, kk),
        0.0,
        &mut g.k,
        Layout::row_major(nk, kk),
    );
    if !g.bk.is_empty() {
        for (n, b) in g.bk.iter_mut().enumerate() {
            // Summed in f64: a map row has m·P terms (thousands), too many for a plain f32 sum.
            *b = w.dz[n * mp..(n + 1) * mp]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>() as f32;
        }
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
