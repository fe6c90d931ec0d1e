//! AVX2 + FMA micro-kernels: the tiles of the AVX-512 module, narrowed to 8 lanes and 16 vector
//! registers (Zen 2/3, Haswell and later without AVX-512). Callers guarantee the CPU has AVX2
//! and FMA and that all indices are in bounds (checked in the safe wrappers of `kernels`).
//!
//! Register budget (16 ymm): `nn` 6×2 accumulators + 2 loads + 1 broadcast; `conv` 5×2
//! accumulators + 2 loads + 1 broadcast; `dk` 4×3 accumulators + 3 loads (dz read as the FMA's
//! memory operand); `nt` 4×3 accumulators + 3 loads. Tile shapes were chosen on measurement
//! (`cargo run --release --example kernel_timing`, Zen 3): a 4×3 conv tile (12 accumulators,
//! 3 loads and a broadcast: all 16 registers) ran at half the speed of 5×2 (≈ 45 against
//! ≈ 93 GFLOP/s on one core); for `dk` 4×3 beat 5×2, 3×3 and 6×2 (≈ 85 against 74–79).
//! Where AVX-512VL gives the same 8-lane code 32 registers, `dk` takes 5×3 tiles (`DkRegs`):
//! on Zen 4, whose kernel gradient runs here, 82.5–83.5 against 85.7–87.4 µs per chunk of 8
//! digits (7×3: 82.2–83.1).
//!
//! The conv kernels leave out products whose image operand is an exact zero (the slot's blank
//! rows, its [`super::Ink`]; then per group of three taps the 8-position blocks that `tap_groups`
//! finds blank): for a bias-free network these add `±0`, which changes no sum.
// Register tiles are indexed by constant loop counters that unroll; iterators would hide that.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

/// Rows of C per `nn` tile (one broadcast of A each) and 8-lane vectors of C per row.
const NN_MR: usize = 6;
const NN_NV: usize = 2;
/// Depth of one pass over k: B's `NN_KC × 16` panel stays in L1 while every row tile uses it.
const NN_KC: usize = 128;
/// How far ahead along B's row `nn` prefetches (floats): two column tiles.
const NN_PF: usize = 2 * NN_NV * 8;
/// Rows of A and of B per `nt` tile: 4×3 = 12 dot products at once.
const NT_MR: usize = 4;
const NT_NR: usize = 3;
/// Maps and taps of the kernel-gradient tile.
const CD_MR: usize = 4;
const CD_NR: usize = 3;
/// Maps of the kernel-gradient tile with AVX-512VL's 32 ymm registers (see `DkRegs`).
const CD_MR_VL: usize = 5;
/// Rows (kernels) and position vectors of the forward conv tile.
const CF_MR: usize = 5;
const CF_NV: usize = 2;

/// Lanes `0..w` of an 8-lane vector, as the all-ones lanes of an integer mask.
#[target_feature(enable = "avx2")]
#[inline]
fn mask(w: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(w.min(8) as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Lanes `0..w` of a 4-lane vector, as the all-ones lanes of an integer mask.
#[target_feature(enable = "avx2")]
#[inline]
fn mask4(w: usize) -> __m128i {
    _mm_cmpgt_epi32(_mm_set1_epi32(w.min(4) as i32), _mm_setr_epi32(0, 1, 2, 3))
}

/// The sum of the 8 lanes, always in the same order: halves, then pairs, then the last two.
#[target_feature(enable = "avx2")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// One `MR × NV·8` tile of C = A·B; when `MASKED` the last vector holds only the lanes of `last`.
/// When `IDX` the depth runs over the indices `kidx[0..k]` instead of `0..k`.
///
/// # Safety
/// AVX2 and FMA present; A rows i < MR at a + i·ars (+ p·acs), B rows p at b + p·ldb
/// with the tile's columns, for p < k (or p = kidx[..k]), and C rows at c + i·ldc, all in
/// bounds for the tile's width.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn nn_tile<const MR: usize, const NV: usize, const MASKED: bool, const IDX: bool>(
    kidx: *const u32,
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    last: __m256i,
    acc: bool,
    pf: bool,
) {
    let mut t = [[_mm256_setzero_ps(); NV]; MR];
    for q in 0..k {
        // SAFETY (all pointer arithmetic below): within the tile's bounds, per the contract;
        // masked lanes are not read.
        unsafe {
            let p = if IDX { *kidx.add(q) as usize } else { q };
            let brow = b.add(p * ldb);
            // The same row of the next column tiles, fetched ahead by the first row tile: B's
            // rows lie `ldb` apart, too many streams for the hardware prefetcher (a hint; it
            // never faults).
            if pf {
                _mm_prefetch::<_MM_HINT_T0>(brow.wrapping_add(NN_PF) as *const i8);
            }
            let mut bv = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = if MASKED && v + 1 == NV {
                    _mm256_maskload_ps(brow.add(8 * v), last)
                } else {
                    _mm256_loadu_ps(brow.add(8 * v))
                };
            }
            for i in 0..MR {
                let av = _mm256_set1_ps(*a.add(i * ars + p * acs));
                for v in 0..NV {
                    t[i][v] = _mm256_fmadd_ps(av, bv[v], t[i][v]);
                }
            }
        }
    }
    for i in 0..MR {
        for v in 0..NV {
            // SAFETY: C's tile rows and columns are in bounds, per the contract.
            unsafe {
                let dst = c.add(i * ldc + 8 * v);
                if MASKED && v + 1 == NV {
                    let r = if acc {
                        _mm256_add_ps(_mm256_maskload_ps(dst, last), t[i][v])
                    } else {
                        t[i][v]
                    };
                    _mm256_maskstore_ps(dst, last, r);
                } else {
                    let r = if acc {
                        _mm256_add_ps(_mm256_loadu_ps(dst), t[i][v])
                    } else {
                        t[i][v]
                    };
                    _mm256_storeu_ps(dst, r);
                }
            }
        }
    }
}

/// `C = A·B` over the depth `0..k`, or over the indices `kidx` when given (then `k` is their
/// count).
///
/// # Safety
/// AVX2 and FMA present and every index in bounds (see `gemm_nn`, `gemm_nn_at`).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn nn(
    m: usize,
    n: usize,
    kidx: Option<&[u32]>,
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut p0 = 0;
    while p0 < k {
        let kc = (k - p0).min(NN_KC);
        // Later passes over k add to what the earlier ones stored.
        let acc = acc || p0 > 0;
        let mut j = 0;
        while j < n {
            let w = (n - j).min(NN_NV * 8);
            let nv = w.div_ceil(8);
            let tail = w - 8 * (nv - 1);
            let last = mask(tail);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(NN_MR);
                // SAFETY: the tile covers rows i..i+mr < m, columns j..j+w ≤ n and depth
                // p0..p0+kc ≤ k, all in bounds.
                unsafe {
                    // With indices, the tile reads A and B at the indexed depths from their
                    // starts; without, at depth p0..p0+kc.
                    let (ap, bp, cp, ki) = match kidx {
                        Some(ks) => (
                            a.add(i * ars),
                            b.add(j),
                            c.add(i * ldc + j),
                            ks[p0..].as_ptr(),
                        ),
                        None => (
                            a.add(i * ars + p0 * acs),
                            b.add(p0 * ldb + j),
                            c.add(i * ldc + j),
                            std::ptr::null(),
                        ),
                    };
                    macro_rules! go {
                        ($($mr:literal),*) => {
                            match (mr, nv, tail == 8, kidx.is_some()) {
                                $(
                                    ($mr, 1, true, false) => nn_tile::<$mr, 1, false, false>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 2, true, false) => nn_tile::<$mr, 2, false, false>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 1, false, false) => nn_tile::<$mr, 1, true, false>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 2, false, false) => nn_tile::<$mr, 2, true, false>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 1, true, true) => nn_tile::<$mr, 1, false, true>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 2, true, true) => nn_tile::<$mr, 2, false, true>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 1, false, true) => nn_tile::<$mr, 1, true, true>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    ($mr, 2, false, true) => nn_tile::<$mr, 2, true, true>(ki, kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                )*
                                _ => unreachable!("tile {mr}×{nv}"),
                            }
                        };
                    }
                    go!(1, 2, 3, 4, 5, 6);
                }
                i += mr;
            }
            j += w;
        }
        p0 += kc;
    }
}

/// 8-lane vectors of C per `csr` tile: a 64-column panel, whose rows of B (≤ 128 × 256 bytes
/// for the default net) stay in L1 while every row of A uses them.
const CSR_NV: usize = 8;

/// One row of `C = A·B` over `NV` vectors of columns, A's row given by its kept entries
/// `col/val[e0..e1]`; when `MASKED` the last vector holds only the lanes of `last`.
///
/// # Safety
/// AVX2 and FMA present; b + col[e]·ldb + the tile's columns readable for e in e0..e1;
/// c + the tile's columns writable.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn csr_tile<const NV: usize, const MASKED: bool>(
    (e0, e1): (usize, usize),
    col: *const u32,
    val: *const f32,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    last: __m256i,
) {
    let mut t = [_mm256_setzero_ps(); NV];
    for e in e0..e1 {
        // SAFETY: per the contract.
        unsafe {
            let brow = b.add(*col.add(e) as usize * ldb);
            let av = _mm256_set1_ps(*val.add(e));
            for v in 0..NV {
                let bv = if MASKED && v + 1 == NV {
                    _mm256_maskload_ps(brow.add(8 * v), last)
                } else {
                    _mm256_loadu_ps(brow.add(8 * v))
                };
                t[v] = _mm256_fmadd_ps(av, bv, t[v]);
            }
        }
    }
    for v in 0..NV {
        // SAFETY: per the contract.
        unsafe {
            if MASKED && v + 1 == NV {
                _mm256_maskstore_ps(c.add(8 * v), last, t[v]);
            } else {
                _mm256_storeu_ps(c.add(8 * v), t[v]);
            }
        }
    }
}

/// `C (m×n) = A·B`, A sparse by rows (row i's entries at `first + i·stride .. ends[i]` of
/// `col`/`val`), B row-major:
/// column panels of `CSR_NV` vectors, every row of A per panel; while one panel runs, the
/// `used` rows of B are fetched for the next (rows 8 KB apart for the default net: more
/// streams than the hardware prefetcher follows).
///
/// # Safety
/// AVX2 and FMA present; ends holds m offsets into col/val, each ≥ its row's start; b + col[e]·ldb + j
/// and b + used[u]·ldb + j readable for j < n; c + i·ldc + j writable for i < m, j < n.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn csr(
    m: usize,
    n: usize,
    (ends, first, stride): (*const usize, usize, usize),
    col: *const u32,
    val: *const f32,
    b: *const f32,
    ldb: usize,
    used: &[u32],
    c: *mut f32,
    ldc: usize,
) {
    let mut j = 0;
    while j < n {
        let w = (n - j).min(CSR_NV * 8);
        let nv = w.div_ceil(8);
        let tail = w - 8 * (nv - 1);
        let last = mask(tail);
        if j + w < n {
            for &p in used {
                let next = b.wrapping_add(p as usize * ldb + j + w);
                for l in 0..(n - j - w).min(CSR_NV * 8).div_ceil(16) {
                    // A hint: it never faults, so the address need not be in bounds.
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(16 * l) as *const i8);
                }
            }
        }
        for i in 0..m {
            // SAFETY: per the contract (row i < m, columns j..j+w ≤ n).
            unsafe {
                let es = (first + i * stride, *ends.add(i));
                let (bp, cp) = (b.add(j), c.add(i * ldc + j));
                macro_rules! go {
                    ($($nv:literal),*) => {
                        match (nv, tail == 8) {
                            $(
                                ($nv, true) => csr_tile::<$nv, false>(es, col, val, bp, ldb, cp, last),
                                ($nv, false) => csr_tile::<$nv, true>(es, col, val, bp, ldb, cp, last),
                            )*
                            _ => unreachable!("tile {nv}"),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6, 7, 8);
            }
        }
        j += w;
    }
}

/// One `MR × NV·8` tile of the wide conv: rows n of `k` (broadcast), positions q..q+8·NV of `x`
/// shifted by each tap's offset.
///
/// # Safety
/// AVX2 and FMA present; k rows i < MR hold kk floats at k + i·kk; x + off[p] + 8·NV floats are
/// readable for every p; out rows i at out + i·wq hold 8·NV writable floats.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_tile<const MR: usize, const NV: usize>(
    kk: usize,
    k: *const f32,
    bias: &[f32],
    relu: bool,
    x: *const f32,
    offs: &[usize],
    out: *mut f32,
    wq: usize,
) {
    let mut t = [[_mm256_setzero_ps(); NV]; MR];
    for (p, &off) in offs.iter().enumerate().take(kk) {
        // SAFETY: per the contract.
        unsafe {
            let src = x.add(off);
            let mut bv = [_mm256_setzero_ps(); NV];
            for v in 0..NV {
                bv[v] = _mm256_loadu_ps(src.add(8 * v));
            }
            for i in 0..MR {
                let av = _mm256_set1_ps(*k.add(i * kk + p));
                for v in 0..NV {
                    t[i][v] = _mm256_fmadd_ps(av, bv[v], t[i][v]);
                }
            }
        }
    }
    for i in 0..MR {
        let b = _mm256_set1_ps(bias.get(i).copied().unwrap_or(0.0));
        for v in 0..NV {
            let mut r = _mm256_add_ps(t[i][v], b);
            if relu {
                r = _mm256_max_ps(r, _mm256_setzero_ps());
            }
            // SAFETY: per the contract.
            unsafe { _mm256_storeu_ps(out.add(i * wq + 8 * v), r) };
        }
    }
}

/// One `MR × 2` conv tile over the blocks at positions `q0` and `q1` (8 each), visiting the tap
/// groups set in `groups` (group g: taps `CD_NR·g ..+CD_NR`), whose reads may be nonzero there.
///
/// # Safety
/// AVX2 and FMA present; k rows i < MR hold kk floats at k + i·kk; x + off[p] + q + 8 readable
/// for q ∈ {q0, q1} and every p of a set group (< kk ≤ offs.len()); out rows i·wq + q .. +8
/// writable.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_pair<const MR: usize>(
    kk: usize,
    k: *const f32,
    bias: &[f32],
    relu: bool,
    x: *const f32,
    offs: &[usize],
    mut groups: u64,
    (q0, q1): (usize, usize),
    out: *mut f32,
    wq: usize,
) {
    let mut t = [[_mm256_setzero_ps(); 2]; MR];
    while groups != 0 {
        let p0 = CD_NR * groups.trailing_zeros() as usize;
        groups &= groups - 1;
        for p in p0..p0 + CD_NR {
            // SAFETY: per the contract (p < kk ≤ offs.len()).
            unsafe {
                let src = x.add(*offs.get_unchecked(p));
                let (b0, b1) = (_mm256_loadu_ps(src.add(q0)), _mm256_loadu_ps(src.add(q1)));
                for i in 0..MR {
                    let av = _mm256_set1_ps(*k.add(i * kk + p));
                    t[i][0] = _mm256_fmadd_ps(av, b0, t[i][0]);
                    t[i][1] = _mm256_fmadd_ps(av, b1, t[i][1]);
                }
            }
        }
    }
    for i in 0..MR {
        let b = _mm256_set1_ps(bias.get(i).copied().unwrap_or(0.0));
        for (v, q) in [q0, q1].into_iter().enumerate() {
            let mut r = _mm256_add_ps(t[i][v], b);
            if relu {
                r = _mm256_max_ps(r, _mm256_setzero_ps());
            }
            // SAFETY: per the contract.
            unsafe { _mm256_storeu_ps(out.add(i * wq + q), r) };
        }
    }
}

/// The conv over block pairs (b, b + 5), blocks of 8 positions in runs of 10 (b mod 10 < 5):
/// two rows apart in the default 20-wide maps, so their reads tend to be blank together, and
/// each pair visits only the tap groups whose reads in one of its blocks hold a nonzero (the
/// kernel gradient's masks, see `tap_groups`; over the embedded MNIST sample 20 % of the
/// products are skipped so, by `skipped_share`, against 12 % by blank rows alone). Returns false, having written nothing, when the layout
/// does not allow it (the masks cannot be made, wq/8 is not a multiple of 10, or more than 64
/// tap groups).
///
/// # Safety
/// As `conv_fwd`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn conv_fwd_paired(
    n_k: usize,
    kk: usize,
    k: *const f32,
    bias: &[f32],
    relu: bool,
    x: *const f32,
    offs: &[usize],
    ink: super::Ink,
    (conv, ks): (usize, usize),
    wq: usize,
    out: *mut f32,
) -> bool {
    let (nb, ng) = (wq / 8, kk / CD_NR);
    if nb % 10 != 0 || ng > 64 {
        return false;
    }
    let mut masks = [0u64; super::MAX_TAPS / CD_NR + 1];
    // SAFETY: per the contract (the slot holds every copy's window).
    if !unsafe { tap_groups(x, offs, ink, (conv, ks), wq, &mut masks) } {
        return false;
    }
    let pairs = pair_groups(&masks[..ng], nb);
    for (pi, &groups) in pairs.iter().enumerate().take(nb / 2) {
        let b = 10 * (pi / 5) + pi % 5;
        let qs = (8 * b, 8 * (b + 5));
        let mut i = 0;
        while i < n_k {
            let mr = (n_k - i).min(CF_MR);
            let bias = if bias.is_empty() {
                bias
            } else {
                &bias[i..i + mr]
            };
            // SAFETY: rows i..i+mr < n_k; positions qs.0 + 8, qs.1 + 8 ≤ wq; groups < ng.
            unsafe {
                let (kp, op) = (k.add(i * kk), out.add(i * wq));
                macro_rules! go {
                    ($($mr:literal),*) => {
                        match mr {
                            $($mr => conv_pair::<$mr>(kk, kp, bias, relu, x, offs, groups, qs, op, wq),)*
                            _ => unreachable!("tile {mr}"),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5);
            }
            i += mr;
        }
    }
    true
}

/// `pairs[5·r10 + r]`: the tap groups (bits) whose masks have block 10·r10 + r or that + 5,
/// for `nb` blocks (a multiple of 10): the groups `conv_fwd_paired` visits for that pair.
fn pair_groups(masks: &[u64], nb: usize) -> [u64; 32] {
    let mut pairs = [0u64; 32];
    for (g, &m) in masks.iter().enumerate() {
        let m = m | (m >> 5);
        for r10 in 0..nb / 10 {
            let mut bits = (m >> (10 * r10)) & 0x1F;
            while bits != 0 {
                pairs[5 * r10 + bits.trailing_zeros() as usize] |= 1 << g;
                bits &= bits - 1;
            }
        }
    }
    pairs
}

/// The taps of a tile run over the tap rows whose reads may be nonzero (`ink`, for `shape` =
/// (conv, ks), tap `p = i·ks + j` at offset `off[p]`); the others would add exact zeros.
///
/// # Safety
/// AVX2 and FMA present; `k` (n_k, kk), `x` readable at every q + off[p] (q < wq), `out`
/// (n_k, wq) writable; wq a multiple of 8; kk = ks².
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn conv_fwd(
    n_k: usize,
    kk: usize,
    k: *const f32,
    bias: &[f32],
    relu: bool,
    x: *const f32,
    offs: &[usize],
    ink: super::Ink,
    (conv, ks): (usize, usize),
    wq: usize,
    out: *mut f32,
) {
    // SAFETY: per the contract.
    if unsafe { conv_fwd_paired(n_k, kk, k, bias, relu, x, offs, ink, (conv, ks), wq, out) } {
        return;
    }
    let nvt = wq / 8;
    let mut v0 = 0;
    while v0 < nvt {
        let nv = (nvt - v0).min(CF_NV);
        let (ilo, ihi) = ink.tap_rows(8 * v0, 8 * nv, conv, ks);
        let (plo, phi) = (ilo * ks, ihi * ks);
        let offs = &offs[plo..phi];
        let mut i = 0;
        while i < n_k {
            let mr = (n_k - i).min(CF_MR);
            // SAFETY: rows i..i+mr < n_k, positions 8·v0 .. 8·(v0+nv) ≤ wq.
            unsafe {
                let (kp, xp, op) = (k.add(i * kk + plo), x.add(8 * v0), out.add(i * wq + 8 * v0));
                let bias = if bias.is_empty() {
                    bias
                } else {
                    &bias[i..i + mr]
                };
                macro_rules! go {
                    ($($mr:literal),*) => {
                        match (mr, nv) {
                            $(
                                ($mr, 1) => conv_tile::<$mr, 1>(kk, kp, bias, relu, xp, offs, op, wq),
                                ($mr, 2) => conv_tile::<$mr, 2>(kk, kp, bias, relu, xp, offs, op, wq),
                                ($mr, 3) => conv_tile::<$mr, 3>(kk, kp, bias, relu, xp, offs, op, wq),
                                ($mr, 4) => conv_tile::<$mr, 4>(kk, kp, bias, relu, xp, offs, op, wq),
                                ($mr, 5) => conv_tile::<$mr, 5>(kk, kp, bias, relu, xp, offs, op, wq),
                                ($mr, 6) => conv_tile::<$mr, 6>(kk, kp, bias, relu, xp, offs, op, wq),
                            )*
                            _ => unreachable!("tile {mr}×{nv}"),
                        }
                    };
                }
                go!(1, 2, 3, 4, 5, 6);
            }
            i += mr;
        }
        v0 += nv;
    }
}

/// One `MR × NR` tile of the kernel gradient: MR maps of dz against NR shifted copies of x,
/// summed over all m images and wq positions, reduced across lanes once at the end.
///
/// # Safety
/// AVX2 and FMA present; dz rows (e·n_k + i)·wq .. +wq and x at e·xs + off[p] .. +wq readable
/// for e < m, i < MR, p in the tile; dk + i·kk + p writable.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn dk_tile<R: DkRegs, const MR: usize, const NR: usize>(
    n_k: usize,
    kk: usize,
    dz: *const f32,
    x: *const f32,
    xs: usize,
    m: usize,
    offs: &[usize],
    wq: usize,
    blocks: &[Blocks],
    dk: *mut f32,
    add: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    for (e, &span) in blocks.iter().enumerate().take(m) {
        // SAFETY: per the contract.
        unsafe {
            R::image::<MR, NR>(
                dz.add(e * n_k * wq),
                x.add(e * xs),
                offs,
                wq,
                span,
                &mut acc,
            )
        };
    }
    for i in 0..MR {
        for j in 0..NR {
            // SAFETY: per the contract.
            unsafe {
                let d = dk.add(i * kk + j);
                *d = if add {
                    *d + hsum(acc[i][j])
                } else {
                    hsum(acc[i][j])
                };
            }
        }
    }
}

/// The 8-position blocks of one image that a `dk` tile visits: a range, or the set bits of a
/// mask (block b = positions 8b..8b+8), outside which every product of the tile is an exact
/// zero.
#[derive(Clone, Copy, Debug)]
pub(super) enum Blocks {
    Range(usize, usize),
    Mask(u64),
}

/// The register file that a `dk` tile's image loop is compiled for, and the tile's rows (maps)
/// that fill it: 16 ymm registers (AVX2) hold 4×3 accumulators and 3 loads; with AVX-512VL
/// the same 8-lane code has 32, and 5×3 tiles read each copy of x once for 5 maps, not 4. A
/// tile's shape changes no sum (every element is the same sequence of FMAs and one lane sum),
/// so both give the same bits.
pub(super) trait DkRegs {
    /// Maps per tile.
    const MR: usize;
    /// One image's share of a tile, as `dk_image`.
    ///
    /// # Safety
    /// As `dk_image`, with the register file's features present.
    unsafe fn image<const MR: usize, const NR: usize>(
        dz: *const f32,
        x: *const f32,
        offs: &[usize],
        wq: usize,
        blocks: Blocks,
        acc: &mut [[__m256; NR]; MR],
    );
}

/// 16 ymm registers: AVX2 and FMA.
pub(super) struct Ymm16;
/// 32 ymm registers: AVX2, FMA, AVX-512F and VL.
pub(super) struct Ymm32;

macro_rules! dk_image_for {
    ($regs:ty, $mr:expr, $features:literal, $name:ident) => {
        /// One image's share of a `dk_tile`: the accumulators live in registers over the
        /// image's blocks (those where one of the tile's taps may read a nonzero; elsewhere
        /// every product is an exact zero).
        ///
        /// # Safety
        /// The features present; dz rows i·wq .. +wq (i < MR) and x + offs[j] .. +wq (j < NR)
        /// readable; a range lies within 0..wq in multiples of 8, a mask has no bit at or past
        /// wq/8.
        #[target_feature(enable = $features)]
        #[inline(never)]
        unsafe fn $name<const MR: usize, const NR: usize>(
            dz: *const f32,
            x: *const f32,
            offs: &[usize],
            wq: usize,
            blocks: Blocks,
            acc: &mut [[__m256; NR]; MR],
        ) {
            let mut t = *acc;
            let mut xp = [x; NR];
            for j in 0..NR {
                // SAFETY: per the contract.
                xp[j] = unsafe { x.add(offs[j]) };
            }
            // Positions q..q+8 of every map row and tap of the tile.
            let mut step = |q: usize| {
                // SAFETY: per the contract (q + 8 ≤ wq).
                unsafe {
                    let mut xv = [_mm256_setzero_ps(); NR];
                    for j in 0..NR {
                        xv[j] = _mm256_loadu_ps(xp[j].add(q));
                    }
                    for i in 0..MR {
                        let dv = _mm256_loadu_ps(dz.add(i * wq + q));
                        for j in 0..NR {
                            t[i][j] = _mm256_fmadd_ps(dv, xv[j], t[i][j]);
                        }
                    }
                }
            };
            match blocks {
                Blocks::Range(mut q, end) => {
                    debug_assert!(q <= end && end <= wq && q % 8 == 0 && end % 8 == 0);
                    while q < end {
                        step(q);
                        q += 8;
                    }
                }
                Blocks::Mask(mut bits) => {
                    debug_assert!(wq >= 512 || bits >> (wq / 8) == 0);
                    while bits != 0 {
                        step(8 * bits.trailing_zeros() as usize);
                        bits &= bits - 1;
                    }
                }
            }
            *acc = t;
        }

        impl DkRegs for $regs {
            const MR: usize = $mr;
            unsafe fn image<const MR: usize, const NR: usize>(
                dz: *const f32,
                x: *const f32,
                offs: &[usize],
                wq: usize,
                blocks: Blocks,
                acc: &mut [[__m256; NR]; MR],
            ) {
                // SAFETY: per the contract.
                unsafe { $name::<MR, NR>(dz, x, offs, wq, blocks, acc) }
            }
        }
    };
}
dk_image_for!(Ymm16, CD_MR, "avx2,fma", dk_image);
dk_image_for!(Ymm32, CD_MR_VL, "avx2,fma,avx512f,avx512vl", dk_image_vl);

/// One bit per byte of `t`: bit k set when byte k is nonzero.
#[inline]
fn nonzero_bytes(mut t: u64) -> u64 {
    t |= t >> 4;
    t |= t >> 2;
    t |= t >> 1;
    (t & 0x0101_0101_0101_0101).wrapping_mul(0x0102_0408_1020_4080) >> 56
}

/// Bit b of `masks[g]`: some tap of group g (taps `CD_NR·g ..` of one tap row i, copies
/// j..j + CD_NR) reads a nonzero (NaN counts, −0 does not) at positions 8b..8b+8, i.e. in the
/// floats `i·conv + 8b ..+8` of those copies' windows. Per group of copies, the floats that
/// meet `ink` (all others are zero) are OR-ed across the copies and tested 8 at a time into one
/// byte each (`nz[u]`: bit k for float 8u + k); then per phase φ = (i·conv) mod 8 the bytes are
/// realigned to blocks starting at 8u + φ, and row i's mask is that shifted by ⌊i·conv/8⌋.
/// Returns false, with `masks` untouched, when the layout does not fit: a map of more than 64
/// blocks, a window of more than 128, or `ks` not a multiple of `CD_NR`.
///
/// # Safety
/// AVX2 present; copy j's window, x + off[j] .. + (ks − 1)·conv + wq, readable for j < ks.
#[target_feature(enable = "avx2")]
unsafe fn tap_groups(
    x: *const f32,
    offs: &[usize],
    ink: super::Ink,
    (conv, ks): (usize, usize),
    wq: usize,
    masks: &mut [u64],
) -> bool {
    let (nb, win) = (wq / 8, (ks - 1) * conv + wq);
    if nb > 64 || win > 8 * 128 || ks % CD_NR != 0 {
        return false;
    }
    let keep = if nb == 64 { u64::MAX } else { (1u64 << nb) - 1 };
    let (lo, hi) = ink.range();
    let (ulo, uhi) = (lo / 8, hi.div_ceil(8).min(win.div_ceil(8)));
    let signless = _mm256_set1_epi32(0x7fff_ffff);
    let mut nz = [0u8; 8 * 128 / 8 + 16];
    for j0 in (0..ks).step_by(CD_NR) {
        nz.fill(0);
        for u in ulo..uhi {
            nz[u] = if 8 * u + 8 <= win {
                // SAFETY: floats 8u .. 8u + 8 ≤ win of copies j0 .. j0 + CD_NR.
                unsafe {
                    let mut v = _mm256_loadu_si256(x.add(offs[j0] + 8 * u) as *const __m256i);
                    for j in j0 + 1..j0 + CD_NR {
                        let w = _mm256_loadu_si256(x.add(offs[j] + 8 * u) as *const __m256i);
                        v = _mm256_or_si256(v, w);
                    }
                    let zero =
                        _mm256_cmpeq_epi32(_mm256_and_si256(v, signless), _mm256_setzero_si256());
                    !(_mm256_movemask_ps(_mm256_castsi256_ps(zero)) as u8)
                }
            } else {
                0xFF // a last, partial block: taken as nonzero
            };
        }
        let mut phase: [Option<u128>; 8] = [None; 8];
        for i in 0..ks {
            let (phi, u0) = ((i * conv) % 8, i * conv / 8);
            let bits = *phase[phi].get_or_insert_with(|| {
                let rep = |b: u64| b * 0x0101_0101_0101_0101;
                let mut s = 0u128;
                for w in 0..win.div_ceil(64) {
                    let word = |o: usize| {
                        u64::from_le_bytes(
                            nz[8 * w + o..8 * w + o + 8].try_into().unwrap_or([0xFF; 8]),
                        )
                    };
                    let t = if phi == 0 {
                        word(0)
                    } else {
                        ((word(0) >> phi) & rep(0xFF >> phi))
                            | ((word(1) << (8 - phi)) & rep((0xFF << (8 - phi)) & 0xFF))
                    };
                    s |= u128::from(nonzero_bytes(t)) << (8 * w);
                }
                s
            });
            masks[(i * ks + j0) / CD_NR] = ((bits >> u0) as u64) & keep;
        }
    }
    true
}

/// Each image's positions run over the span where the tile's taps may read a nonzero (`ink(e)`
/// for image e, `shape` = (conv, ks), tap `p = i·ks + j`).
///
/// # Safety
/// As `dk_tile`, for all n < n_k and p < kk; wq a multiple of 8; kk = ks².
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn conv_dk<R: DkRegs>(
    n_k: usize,
    kk: usize,
    dz: *const f32,
    x: *const f32,
    xs: usize,
    m: usize,
    offs: &[usize],
    ink: &dyn Fn(usize) -> super::Ink,
    (conv, ks): (usize, usize),
    wq: usize,
    dk: *mut f32,
) {
    // DK_IMAGES images at a time (their maps stay in L1 while every tap tile reads them), map
    // tiles outer; the group's sums are reduced across lanes once and added to dk.
    const DK_IMAGES: usize = 2;
    for e in (0..m).step_by(DK_IMAGES) {
        let me = DK_IMAGES.min(m - e);
        let mut inks = [ink(e); DK_IMAGES];
        for (d, v) in inks.iter_mut().enumerate().take(me).skip(1) {
            *v = ink(e + d);
        }
        // SAFETY: image e < m starts inside dz and x.
        let (dz, x, add) = unsafe { (dz.add(e * n_k * wq), x.add(e * xs), e > 0) };
        let mut masks = [[0u64; super::MAX_TAPS / CD_NR + 1]; DK_IMAGES];
        let mut masked = [false; DK_IMAGES];
        for d in 0..me {
            // SAFETY: image e + d's slot holds every copy's window.
            masked[d] =
                unsafe { tap_groups(x.add(d * xs), offs, inks[d], (conv, ks), wq, &mut masks[d]) };
        }
        let mut i = 0;
        while i < n_k {
            let mr = (n_k - i).min(R::MR);
            let mut p = 0;
            while p < kk {
                let nr = (kk - p).min(CD_NR);
                let mut spans = [Blocks::Range(0, 0); DK_IMAGES];
                for d in 0..me {
                    spans[d] = if masked[d] {
                        Blocks::Mask(masks[d][p / CD_NR])
                    } else {
                        let (a, b) = inks[d].span(p / ks, (p + nr - 1) / ks, conv, wq, 8);
                        Blocks::Range(a, b)
                    };
                }
                let spans = &spans[..me];
                // SAFETY: maps i..i+mr < n_k and taps p..p+nr ≤ kk of images e..e+me are in
                // bounds; each span lies within 0..wq in multiples of 8.
                unsafe {
                    let (dzp, dkp, o) = (dz.add(i * wq), dk.add(i * kk + p), &offs[p..p + nr]);
                    macro_rules! go {
                        ($($mr:literal),*) => {
                            match (mr, nr) {
                                $(
                                    ($mr, 1) => dk_tile::<R, $mr, 1>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                    ($mr, 2) => dk_tile::<R, $mr, 2>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                    ($mr, 3) => dk_tile::<R, $mr, 3>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                    ($mr, 4) => dk_tile::<R, $mr, 4>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                )*
                                _ => unreachable!("tile {mr}×{nr}"),
                            }
                        };
                    }
                    go!(1, 2, 3, 4, 5, 6);
                }
                p += nr;
            }
            i += mr;
        }
    }
}

/// The shares of `conv_fwd`'s and of `conv_dk`'s multiply-adds that they skip for one slot
/// with this ink, on their tiles: (forward, kernel gradient).
///
/// # Safety
/// AVX2 present; `slot` holds every tap's reads at `offs`.
#[target_feature(enable = "avx2")]
pub unsafe fn skipped_share(
    slot: &[f32],
    offs: &[usize],
    ink: super::Ink,
    (conv, ks): (usize, usize),
    wq: usize,
) -> (f64, f64) {
    let (kk, nvt) = (ks * ks, wq / 8);
    let mut masks = [0u64; super::MAX_TAPS / CD_NR + 1];
    // SAFETY: per the contract.
    let masked = unsafe { tap_groups(slot.as_ptr(), offs, ink, (conv, ks), wq, &mut masks) };
    let mut fwd = 0;
    let ng = kk / CD_NR;
    if masked && nvt % 10 == 0 && ng <= 64 {
        // As conv_fwd_paired: per pair of blocks, the tap groups it does not visit.
        for groups in pair_groups(&masks[..ng], nvt).iter().take(nvt / 2) {
            fwd += (ng - groups.count_ones() as usize) * CD_NR * 16;
        }
    } else {
        for v0 in (0..nvt).step_by(CF_NV) {
            let nv = (nvt - v0).min(CF_NV);
            let (ilo, ihi) = ink.tap_rows(8 * v0, 8 * nv, conv, ks);
            fwd += (ks - (ihi - ilo)) * ks * 8 * nv;
        }
    }
    let mut dk = 0;
    for p in (0..kk).step_by(CD_NR) {
        let nr = (kk - p).min(CD_NR);
        let visited = if masked {
            8 * masks[p / CD_NR].count_ones() as usize
        } else {
            let (a, b) = ink.span(p / ks, (p + nr - 1) / ks, conv, wq, 8);
            b - a
        };
        dk += nr * (wq - visited);
    }
    let all = (kk * wq) as f64;
    (fwd as f64 / all, dk as f64 / all)
}

/// Eight u8 pixels at `src` as f32 / 255.
///
/// # Safety
/// AVX2 present; 8 bytes readable at src.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn eight(src: *const u8, scale: __m256) -> __m256 {
    // SAFETY: per the contract (an unaligned 8-byte load).
    let b = unsafe { _mm_loadl_epi64(src as *const __m128i) };
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), scale)
}

/// The `ks` column-shifted f32 copies of one u8 image (see `Wide::fill`): full runs of 8 pixels
/// in vectors, the rest of each row one at a time, with the same `f32::from(p) · (1/255)`.
///
/// # Safety
/// AVX2 present; bounds as checked in `Wide::fill`.
#[target_feature(enable = "avx2")]
pub unsafe fn fill_shifted(x: *const u8, img: usize, ks: usize, conv: usize, out: *mut f32) {
    let scale = _mm256_set1_ps(1.0 / 255.0);
    let js = img * conv;
    let full = conv / 8 * 8;
    for j in 0..ks {
        for rr in 0..img {
            // SAFETY: per the contract: reads x[rr·img + j + c], c < conv ≤ img − j; writes
            // out[j·js + rr·conv + c], c < conv.
            unsafe {
                let src = x.add(rr * img + j);
                let dst = out.add(j * js + rr * conv);
                let mut c = 0;
                while c < full {
                    _mm256_storeu_ps(dst.add(c), eight(src.add(c), scale));
                    c += 8;
                }
                if c + 4 <= conv {
                    // Four more pixels (the default layout's rows of 20 end so).
                    let b = _mm_cvtsi32_si128((src.add(c) as *const i32).read_unaligned());
                    let f = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(b));
                    _mm_storeu_ps(dst.add(c), _mm_mul_ps(f, _mm256_castps256_ps128(scale)));
                    c += 4;
                }
                while c < conv {
                    *dst.add(c) = f32::from(*src.add(c)) * (1.0 / 255.0);
                    c += 1;
                }
            }
        }
    }
}

/// # Safety
/// AVX2 and FMA present.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fma_loop(iters: usize) -> f32 {
    let mut t = [_mm256_setzero_ps(); 12];
    let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999_9));
    for _ in 0..iters {
        for v in t.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in t {
        s = _mm256_add_ps(s, v);
    }
    hsum(s)
}

/// Independent vectors in [`fma_loop`]'s body.
pub const FMA_LOOP_VECTORS: usize = 12;

/// # Safety
/// AVX2 present; `8·n` bytes readable at src and floats writable at dst.
#[target_feature(enable = "avx2")]
pub unsafe fn pixels(src: *const u8, dst: *mut f32, n: usize) {
    let scale = _mm256_set1_ps(1.0 / 255.0);
    for i in 0..n {
        // SAFETY: per the contract.
        unsafe { _mm256_storeu_ps(dst.add(8 * i), eight(src.add(8 * i), scale)) };
    }
}

/// # Safety
/// AVX2 present; `8·n` floats readable and writable at v.
#[target_feature(enable = "avx2")]
pub unsafe fn relu(v: *mut f32, n: usize) {
    let zero = _mm256_setzero_ps();
    for i in 0..n {
        // SAFETY: per the contract. max(x, 0) returns 0 for NaN, as f32::max does.
        unsafe {
            _mm256_storeu_ps(
                v.add(8 * i),
                _mm256_max_ps(_mm256_loadu_ps(v.add(8 * i)), zero),
            )
        };
    }
}

/// 2×2 mean pooling, 16 columns (8 outputs) per step, then 8 columns, then a masked rest:
/// `((a0 + b0) + (a1 + b1)) · ¼` as in the plain loop (the vertical sums first, then the
/// horizontal pair).
///
/// # Safety
/// AVX2 present; map rows 0..2·pooled (stride img) readable for 2·pooled columns, out writable
/// for pooled² floats.
#[target_feature(enable = "avx2")]
pub unsafe fn mean_pool2(map: *const f32, img: usize, pooled: usize, out: *mut f32) {
    let quarter = _mm256_set1_ps(0.25);
    for r in 0..pooled {
        // SAFETY: per the contract: columns below 2·pooled of rows 2r and 2r+1, outputs of row r.
        unsafe {
            let (a, b, o) = (
                map.add(2 * r * img),
                map.add((2 * r + 1) * img),
                out.add(r * pooled),
            );
            let mut c = 0;
            while c + 8 <= pooled {
                let lo =
                    _mm256_add_ps(_mm256_loadu_ps(a.add(2 * c)), _mm256_loadu_ps(b.add(2 * c)));
                let hi = _mm256_add_ps(
                    _mm256_loadu_ps(a.add(2 * c + 8)),
                    _mm256_loadu_ps(b.add(2 * c + 8)),
                );
                // hadd interleaves the 128-bit halves: [lo01 lo23 hi01 hi23 | lo45 lo67 hi45 hi67]
                let h = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                    _mm256_hadd_ps(lo, hi),
                )));
                _mm256_storeu_ps(o.add(c), _mm256_mul_ps(h, quarter));
                c += 8;
            }
            let q4 = _mm256_castps256_ps128(quarter);
            if c + 4 <= pooled {
                let lo = _mm_add_ps(_mm_loadu_ps(a.add(2 * c)), _mm_loadu_ps(b.add(2 * c)));
                let hi = _mm_add_ps(
                    _mm_loadu_ps(a.add(2 * c + 4)),
                    _mm_loadu_ps(b.add(2 * c + 4)),
                );
                _mm_storeu_ps(o.add(c), _mm_mul_ps(_mm_hadd_ps(lo, hi), q4));
                c += 4;
            }
            if c < pooled {
                // 1 to 3 outputs from 2 to 6 columns; masked lanes are neither read nor written.
                let r = pooled - c;
                let (ml, mh) = (mask4(2 * r), mask4((2 * r).saturating_sub(4)));
                let lo = _mm_add_ps(
                    _mm_maskload_ps(a.add(2 * c), ml),
                    _mm_maskload_ps(b.add(2 * c), ml),
                );
                let hi = _mm_add_ps(
                    _mm_maskload_ps(a.add(2 * c + 4), mh),
                    _mm_maskload_ps(b.add(2 * c + 4), mh),
                );
                // Stored lane by lane: a masked store is slow on AMD cores (microcoded).
                let v = _mm_mul_ps(_mm_hadd_ps(lo, hi), q4);
                if r >= 2 {
                    _mm_storel_epi64(o.add(c) as *mut __m128i, _mm_castps_si128(v));
                } else {
                    _mm_store_ss(o.add(c), v);
                }
                if r == 3 {
                    _mm_store_ss(o.add(c + 2), _mm_movehl_ps(v, v));
                }
            }
        }
    }
}

/// Backward of [`mean_pool2`] through a ReLU, 8 columns per step, then 4, then the last 2.
///
/// # Safety
/// AVX2 present; g has pooled² floats; y and dz rows 0..2·pooled (stride img) hold 2·pooled
/// floats.
#[target_feature(enable = "avx2")]
pub unsafe fn mean_repool2_relu(
    g: *const f32,
    y: *const f32,
    img: usize,
    pooled: usize,
    dz: *mut f32,
) {
    let w = 2 * pooled;
    let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    let (quarter, zero) = (_mm256_set1_ps(0.25), _mm256_setzero_ps());
    for r in 0..w {
        // SAFETY: per the contract: g[(r/2)·pooled + c/2 ..+4] with c + 8 ≤ w stays in g's row;
        // y and dz columns below w.
        unsafe {
            let (gr, yr, dr) = (g.add((r / 2) * pooled), y.add(r * img), dz.add(r * img));
            let mut c = 0;
            while c + 8 <= w {
                let g4 = _mm_mul_ps(_mm_loadu_ps(gr.add(c / 2)), _mm256_castps256_ps128(quarter));
                let gv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(g4), dup);
                let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(yr.add(c)), zero);
                _mm256_storeu_ps(dr.add(c), _mm256_and_ps(pos, gv));
                c += 8;
            }
            let q4 = _mm256_castps256_ps128(quarter);
            if c + 4 <= w {
                // g[c/2], g[c/2 + 1] as one 8-byte load, each repeated twice.
                let g2 = _mm_castsi128_ps(_mm_loadl_epi64(gr.add(c / 2) as *const __m128i));
                let gv = _mm_mul_ps(_mm_unpacklo_ps(g2, g2), q4);
                let pos = _mm_cmpgt_ps(_mm_loadu_ps(yr.add(c)), _mm_setzero_ps());
                _mm_storeu_ps(dr.add(c), _mm_and_ps(pos, gv));
                c += 4;
            }
            while c < w {
                let v = *gr.add(c / 2) * 0.25;
                *dr.add(c) = if *yr.add(c) > 0.0 { v } else { 0.0 };
                c += 1;
            }
        }
    }
}

/// One `MR × NR` tile of dot products C = A·Bᵀ along k: full vectors, then a masked tail.
///
/// # Safety
/// AVX2 and FMA present; rows i < MR of A at a + i·lda and j < NR of B at b + j·ldb hold k
/// readable floats; C's tile at c + i·ldc + j is writable.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn nt_tile<const MR: usize, const NR: usize>(
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut t = [[_mm256_setzero_ps(); NR]; MR];
    let mut p = 0;
    while p + 8 <= k {
        // SAFETY: lanes p..p+8 ≤ k of each row are in bounds.
        unsafe {
            let mut bv = [_mm256_setzero_ps(); NR];
            for j in 0..NR {
                bv[j] = _mm256_loadu_ps(b.add(j * ldb + p));
            }
            for i in 0..MR {
                let av = _mm256_loadu_ps(a.add(i * lda + p));
                for j in 0..NR {
                    t[i][j] = _mm256_fmadd_ps(av, bv[j], t[i][j]);
                }
            }
        }
        p += 8;
    }
    if p < k {
        let m = mask(k - p);
        // SAFETY: lanes p..k of each row are in bounds; masked lanes are not read.
        unsafe {
            let mut bv = [_mm256_setzero_ps(); NR];
            for j in 0..NR {
                bv[j] = _mm256_maskload_ps(b.add(j * ldb + p), m);
            }
            for i in 0..MR {
                let av = _mm256_maskload_ps(a.add(i * lda + p), m);
                for j in 0..NR {
                    t[i][j] = _mm256_fmadd_ps(av, bv[j], t[i][j]);
                }
            }
        }
    }
    for i in 0..MR {
        for j in 0..NR {
            let s = hsum(t[i][j]);
            // SAFETY: C's tile is in bounds, per the contract.
            unsafe {
                let dst = c.add(i * ldc + j);
                *dst = if acc { *dst + s } else { s };
            }
        }
    }
}

/// # Safety
/// AVX2 and FMA present and every index in bounds (see `gemm_nt`).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    // B's row tile outer: it is loaded once from L2 while A's rows are reused from L1.
    let mut j = 0;
    while j < n {
        let nr = (n - j).min(NT_NR);
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(NT_MR);
            // SAFETY: the tile covers rows i..i+mr < m of A and C, rows j..j+nr < n of B.
            unsafe {
                let (ap, bp, cp) = (a.add(i * lda), b.add(j * ldb), c.add(i * ldc + j));
                macro_rules! go {
                    ($($mr:literal),*) => {
                        match (mr, nr) {
                            $(
                                ($mr, 1) => nt_tile::<$mr, 1>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                ($mr, 2) => nt_tile::<$mr, 2>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                ($mr, 3) => nt_tile::<$mr, 3>(k, ap, lda, bp, ldb, cp, ldc, acc),
                            )*
                            _ => unreachable!("tile {mr}×{nr}"),
                        }
                    };
                }
                go!(1, 2, 3, 4);
            }
            i += mr;
        }
        j += nr;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{Wide, has_avx2_fma};

    /// Every block that a tap group reads a nonzero in (NaN included, −0 not) has its bit set,
    /// for slots with a few values anywhere (and the ink that `Wide::ink` finds for them).
    #[test]
    fn tap_group_masks_hold_every_nonzero_read() {
        if !has_avx2_fma() {
            return;
        }
        for (img, ks) in [(28, 9), (24, 9), (12, 3), (16, 6), (9, 3)] {
            let w = Wide { img, ks };
            let (conv, kk, wq) = (w.conv(), ks * ks, w.wq());
            let offs: Vec<usize> = (0..kk).map(|p| w.off(p)).collect();
            let mut seed = 7u64;
            for round in 0..300 {
                let mut slot = vec![0.0f32; w.slot()];
                for _ in 0..1 + round % 5 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let at = (seed >> 33) as usize % slot.len();
                    slot[at] = [1.0, f32::NAN, -0.0, -2.5][(seed >> 20) as usize % 4];
                }
                let ink = w.ink(&slot);
                let mut masks = [0u64; crate::kernels::MAX_TAPS / CD_NR + 1];
                // SAFETY: AVX2 detected; the slot holds every copy's window.
                let ok =
                    unsafe { tap_groups(slot.as_ptr(), &offs, ink, (conv, ks), wq, &mut masks) };
                assert!(ok, "{img}/{ks}");
                for p0 in (0..kk).step_by(CD_NR) {
                    for b in 0..wq / 8 {
                        let read = (p0..p0 + CD_NR).any(|p| {
                            (0..8).any(|q| {
                                let v = slot[offs[p] + 8 * b + q];
                                v.to_bits() << 1 != 0
                            })
                        });
                        let bit = masks[p0 / CD_NR] >> b & 1 == 1;
                        assert!(
                            !read || bit,
                            "{img}/{ks} round {round}: taps {p0}.., block {b}"
                        );
                        // Exact where every window is whole blocks (no partial last one).
                        let win = (ks - 1) * conv + wq;
                        assert!(
                            win % 8 != 0 || read || !bit,
                            "{img}/{ks} round {round}: {p0}, {b} set"
                        );
                    }
                }
            }
        }
    }
}
