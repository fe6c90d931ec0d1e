//! The only module with `unsafe`: the f32 matrix products the batched path is built on.
//!
//! Two shapes of product cover every layer:
//! - [`gemm_nn`]: `C (m×n) = A (m×k) · B (k×n)`, `A` strided (read one scalar at a time and
//!   broadcast), `B` and `C` row-major. Used where the long dimension `n` can run along SIMD lanes
//!   (conv forward over positions, `∂J/∂w⁽⁻¹⁾` and `∂L/∂y⁽⁻²⁾` over the 2000 inputs).
//! - [`gemm_nt`]: `C (m×n) = A (m×k) · Bᵀ` with `B` given as `n×k`, both row-major: dot products
//!   along the contiguous `k` (dense forward over the 2000 inputs, kernel gradient over positions).
//!
//! Each has three implementations with one contract: a hand-written AVX-512 kernel (register-tiled,
//! masked tails, FMA), chosen at run time when the CPU has AVX-512F; a portable path through the
//! `matrixmultiply` crate otherwise; and the plain loops [`gemm_nn_naive`] / [`gemm_nt_naive`]
//! that tests hold the others to.
//!
//! Every output element is computed by one fixed sequence of operations whatever the tiling, so
//! splitting `m` among threads never changes a result.

/// Which implementation [`gemm_nn`] and [`gemm_nt`] use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Hand-written AVX-512F kernels.
    Avx512,
    /// The `matrixmultiply` crate (its own run-time SIMD dispatch).
    Portable,
}

/// Whether this CPU has AVX-512F (cached by std after the first call).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The implementation chosen for this CPU (AVX-512F if present), unless `MNISTCONV_KERNELS=portable`.
pub fn backend() -> Backend {
    use std::sync::OnceLock;
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let forced = std::env::var("MNISTCONV_KERNELS").map(|v| v == "portable").unwrap_or(false);
        if !forced && has_avx512() { Backend::Avx512 } else { Backend::Portable }
    })
}

/// Panics unless every index the product touches lies inside its slice and C's rows do not overlap.
#[allow(clippy::too_many_arguments)]
fn check_nn(m: usize, n: usize, k: usize, a: &[f32], ars: usize, acs: usize, b: &[f32], ldb: usize, c: &[f32], ldc: usize) {
    assert!(ldb >= n && ldc >= n, "gemm_nn: ldb {ldb}, ldc {ldc} must be ≥ n {n}");
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nn: C {m}×{n} (ldc {ldc}) needs {} elements, has {}", (m - 1) * ldc + n, c.len());
    if k == 0 {
        return;
    }
    let ea = (m - 1) * ars + (k - 1) * acs + 1;
    assert!(a.len() >= ea, "gemm_nn: A {m}×{k} (rs {ars}, cs {acs}) needs {ea} elements, has {}", a.len());
    let eb = (k - 1) * ldb + n;
    assert!(b.len() >= eb, "gemm_nn: B {k}×{n} (ldb {ldb}) needs {eb} elements, has {}", b.len());
}

#[allow(clippy::too_many_arguments)]
fn check_nt(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &[f32], ldc: usize) {
    assert!(lda >= k && ldb >= k && ldc >= n, "gemm_nt: lda {lda}, ldb {ldb} must be ≥ k {k}, ldc {ldc} ≥ n {n}");
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nt: C {m}×{n} (ldc {ldc}) needs {} elements, has {}", (m - 1) * ldc + n, c.len());
    if k == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "gemm_nt: A {m}×{k} (lda {lda}) needs {} elements, has {}", (m - 1) * lda + k, a.len());
    assert!(b.len() >= (n - 1) * ldb + k, "gemm_nt: B {n}×{k} (ldb {ldb}) needs {} elements, has {}", (n - 1) * ldb + k, b.len());
}

/// `C = A·B` (or `C += A·B` when `acc`), `A` (m×k) at `a[i·ars + p·acs]`, `B` (k×n) at
/// `b[p·ldb + j]`, `C` (m×n) at `c[i·ldc + j]`.
///
/// # Panics
/// If a matrix reaches outside its slice, or `ldb`/`ldc` < `n`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], ars: usize, acs: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    gemm_nn_on(backend(), m, n, k, a, ars, acs, b, ldb, c, ldc, acc)
}

/// [`gemm_nn`] on a chosen backend (tests and benchmarks compare them). `Avx512` on a CPU
/// without AVX-512F falls back to `Portable`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_on(be: Backend, m: usize, n: usize, k: usize, a: &[f32], ars: usize, acs: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    check_nn(m, n, k, a, ars, acs, b, ldb, c, ldc);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
        }
        return;
    }
    match be {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 if has_avx512() => {
            // SAFETY: the guard checked `is_x86_feature_detected!("avx512f")`.
            // `check_nn` asserted that every index the kernel reads (A: i·ars + p·acs for i < m,
            // p < k; B: p·ldb + j for j < n) and writes (C: i·ldc + j, with ldc ≥ n so rows do not
            // overlap) lies inside the slices; `c` is an exclusive borrow, so no other reference
            // aliases the written memory.
            unsafe { avx512::nn(m, n, k, a.as_ptr(), ars, acs, b.as_ptr(), ldb, c.as_mut_ptr(), ldc, acc) }
        }
        _ => {
            // SAFETY: as above, `check_nn` bounded every index; matrixmultiply reads A and B and
            // writes C only at i·rs + j·cs for i < m, j < n, p < k, with the strides given.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    ars as isize,
                    acs as isize,
                    b.as_ptr(),
                    ldb as isize,
                    1,
                    if acc { 1.0 } else { 0.0 },
                    c.as_mut_ptr(),
                    ldc as isize,
                    1,
                )
            }
        }
    }
}

/// `C = A·Bᵀ` (or `+=` when `acc`), `A` (m×k) at `a[i·lda + p]`, `B` (n×k) at `b[j·ldb + p]`,
/// `C` (m×n) at `c[i·ldc + j]`: each output is a dot product along the contiguous `k`.
///
/// # Panics
/// If a matrix reaches outside its slice, or a leading dimension is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    gemm_nt_on(backend(), m, n, k, a, lda, b, ldb, c, ldc, acc)
}

/// [`gemm_nt`] on a chosen backend. `Avx512` on a CPU without AVX-512F falls back to `Portable`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_on(be: Backend, m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    check_nt(m, n, k, a, lda, b, ldb, c, ldc);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
        }
        return;
    }
    match be {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 if has_avx512() => {
            // SAFETY: the guard checked `is_x86_feature_detected!("avx512f")`. `check_nt` asserted that A's rows
            // i·lda..i·lda+k (i < m), B's rows j·ldb..j·ldb+k (j < n) and C's elements i·ldc + j
            // (ldc ≥ n) lie inside the slices; `c` is an exclusive borrow.
            unsafe { avx512::nt(m, n, k, a.as_ptr(), lda, b.as_ptr(), ldb, c.as_mut_ptr(), ldc, acc) }
        }
        _ => {
            // SAFETY: `check_nt` bounded every index; B (n×k, row-major) is read as the k×n
            // matrix Bᵀ with row stride 1 and column stride ldb, which touches the same elements.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    lda as isize,
                    1,
                    b.as_ptr(),
                    1,
                    ldb as isize,
                    if acc { 1.0 } else { 0.0 },
                    c.as_mut_ptr(),
                    ldc as isize,
                    1,
                )
            }
        }
    }
}

/// im2col, transposed, for `m` images of `img×img` f32 pixels (`x`: (m, img²)) and a `ks×ks`
/// valid correlation with `conv = img − ks + 1`: writes
/// `cols[(i·ks + j)·ldc + e·conv² + r·conv + c] = x[e][(r+i)·img + c + j]`, i.e. `cols` is
/// (ks², ldc) with the `m·conv²` output positions along each row.
///
/// # Panics
/// If `x` or `cols` is too short, or `ldc < m·conv²`.
pub fn im2col_t(x: &[f32], m: usize, img: usize, ks: usize, cols: &mut [f32], ldc: usize) {
    assert!(ks >= 1 && ks <= img, "im2col: kernel {ks} for image {img}");
    let conv = img + 1 - ks;
    let pp = conv * conv;
    assert!(x.len() >= m * img * img, "im2col: x has {} values, needs {}", x.len(), m * img * img);
    assert!(ldc >= m * pp, "im2col: ldc {ldc} < {}", m * pp);
    assert!(cols.len() >= (ks * ks - 1) * ldc + m * pp, "im2col: cols too short");
    #[cfg(target_arch = "x86_64")]
    if backend() == Backend::Avx512 {
        // SAFETY: `backend()` is Avx512 only when AVX-512F was detected. The assertions above
        // bound every read (x[e·img² + (r+i)·img + j + c], c < conv, is < m·img²) and every
        // write (cols[(i·ks+j)·ldc + e·pp + r·conv + c] < (ks²−1)·ldc + m·pp ≤ cols.len()).
        unsafe { avx512::im2col_t(x.as_ptr(), m, img, ks, cols.as_mut_ptr(), ldc) };
        return;
    }
    im2col_t_naive(x, m, img, ks, cols, ldc);
}

/// The plain-loop [`im2col_t`], also the fallback without AVX-512.
pub fn im2col_t_naive(x: &[f32], m: usize, img: usize, ks: usize, cols: &mut [f32], ldc: usize) {
    let conv = img + 1 - ks;
    let pp = conv * conv;
    for i in 0..ks {
        for j in 0..ks {
            let row = &mut cols[(i * ks + j) * ldc..];
            for e in 0..m {
                for r in 0..conv {
                    for c in 0..conv {
                        row[e * pp + r * conv + c] = x[e * img * img + (r + i) * img + c + j];
                    }
                }
            }
        }
    }
}

/// im2col, position-major, for the kernel gradient: for `m` images (`x`: (m, img²)) writes
/// `cols[(e·conv² + r·conv + c)·ldc + i·ks + j] = x[e][(r+i)·img + c + j]`, i.e. `cols` is
/// (m·conv², ldc) with the `ks²` taps along each row. Columns `ks²..ldc` are left as they are
/// (keep them 0 so a product over the padded width adds nothing).
///
/// # Panics
/// If `x` or `cols` is too short, or `ldc < ks²`.
pub fn im2col_n(x: &[f32], m: usize, img: usize, ks: usize, cols: &mut [f32], ldc: usize) {
    assert!(ks >= 1 && ks <= img, "im2col: kernel {ks} for image {img}");
    let conv = img + 1 - ks;
    let rows = m * conv * conv;
    assert!(x.len() >= m * img * img, "im2col: x has {} values, needs {}", x.len(), m * img * img);
    assert!(ldc >= ks * ks, "im2col: ldc {ldc} < {}", ks * ks);
    assert!(rows == 0 || cols.len() >= (rows - 1) * ldc + ks * ks, "im2col: cols too short");
    #[cfg(target_arch = "x86_64")]
    if backend() == Backend::Avx512 && ks <= 16 && x.len() >= m * img * img + 16 && cols.len() >= rows * ldc + 16 {
        // SAFETY: AVX-512F was detected (`backend`). Each copy reads 16 floats from
        // x[e·img² + (r+i)·img + c] (≤ m·img² − 1, so ≤ x.len() − 16 + 15 with the 16 floats of
        // slack checked above) and writes 16 floats at cols[q·ldc + i·ks] (≤ (rows−1)·ldc + ks² − ks
        // + 15 < rows·ldc + 16 ≤ cols.len()). The 16 − ks extra floats written land on the next
        // tap(s) of the same row, which later copies overwrite, or in the row's padding / slack.
        unsafe { avx512::im2col_n(x.as_ptr(), m, img, ks, cols.as_mut_ptr(), ldc) };
        return;
    }
    im2col_n_naive(x, m, img, ks, cols, ldc);
}

/// The plain-loop [`im2col_n`], also the fallback.
pub fn im2col_n_naive(x: &[f32], m: usize, img: usize, ks: usize, cols: &mut [f32], ldc: usize) {
    let conv = img + 1 - ks;
    for e in 0..m {
        for r in 0..conv {
            for c in 0..conv {
                let q = (e * conv + r) * conv + c;
                for i in 0..ks {
                    for j in 0..ks {
                        cols[q * ldc + i * ks + j] = x[e * img * img + (r + i) * img + c + j];
                    }
                }
            }
        }
    }
}

/// The reference for [`gemm_nn`]: plain loops, summing over `p` in order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_naive(m: usize, n: usize, k: usize, a: &[f32], ars: usize, acs: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    check_nn(m, n, k, a, ars, acs, b, ldb, c, ldc);
    for i in 0..m {
        for j in 0..n {
            let s: f32 = (0..k).map(|p| a[i * ars + p * acs] * b[p * ldb + j]).sum();
            let cij = &mut c[i * ldc + j];
            *cij = if acc { *cij + s } else { s };
        }
    }
}

/// The reference for [`gemm_nt`]: plain dot products.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_naive(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], ldb: usize, c: &mut [f32], ldc: usize, acc: bool) {
    check_nt(m, n, k, a, lda, b, ldb, c, ldc);
    for i in 0..m {
        for j in 0..n {
            let s: f32 = (0..k).map(|p| a[i * lda + p] * b[j * ldb + p]).sum();
            let cij = &mut c[i * ldc + j];
            *cij = if acc { *cij + s } else { s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F micro-kernels. Callers guarantee the CPU has AVX-512F and that all indices are in
    //! bounds (checked in the safe wrappers above).
    use std::arch::x86_64::*;

    /// Rows of C per `nn` tile (one broadcast of A each) and 16-lane vectors of C per row.
    const NN_MR: usize = 6;
    const NN_NV: usize = 4;
    /// Depth of one pass over k: B's `NN_KC × 64` panel stays in L1 while every row tile uses it.
    const NN_KC: usize = 128;
    /// Rows of A and of B per `nt` tile: 4×4 = 16 dot products at once.
    const NT_MR: usize = 4;
    const NT_NR: usize = 4;

    /// Lanes `0..w` of a 16-lane vector.
    #[inline(always)]
    fn mask(w: usize) -> __mmask16 {
        if w >= 16 { 0xffff } else { ((1u32 << w) - 1) as __mmask16 }
    }

    /// One `MR × NV·16` tile of C = A·B: `nv ≤ NV` vectors wide, the last `last` lanes wide.
    ///
    /// # Safety
    /// AVX-512F present; A rows i < MR at a + i·ars (+ p·acs, p < k), B rows p < k at b + p·ldb
    /// with the tile's columns, and C rows at c + i·ldc, all in bounds for the tile's width.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nn_tile<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        last: __mmask16,
        acc: bool,
    ) {
        let mut t = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..k {
            // SAFETY (all pointer arithmetic below): within the tile's bounds, per the contract.
            unsafe {
                let brow = b.add(p * ldb);
                let mut bv = [_mm512_setzero_ps(); NV];
                for v in 0..NV {
                    bv[v] = if v + 1 == NV {
                        _mm512_maskz_loadu_ps(last, brow.add(16 * v))
                    } else {
                        _mm512_loadu_ps(brow.add(16 * v))
                    };
                }
                for i in 0..MR {
                    let av = _mm512_set1_ps(*a.add(i * ars + p * acs));
                    for v in 0..NV {
                        t[i][v] = _mm512_fmadd_ps(av, bv[v], t[i][v]);
                    }
                }
            }
        }
        for i in 0..MR {
            for v in 0..NV {
                // SAFETY: C's tile rows and columns are in bounds, per the contract.
                unsafe {
                    let dst = c.add(i * ldc + 16 * v);
                    let m = if v + 1 == NV { last } else { 0xffff };
                    let r = if acc { _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), t[i][v]) } else { t[i][v] };
                    _mm512_mask_storeu_ps(dst, m, r);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F present and every index in bounds (see `gemm_nn`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn nn(m: usize, n: usize, k: usize, a: *const f32, ars: usize, acs: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, acc: bool) {
        let mut p0 = 0;
        while p0 < k {
            let kc = (k - p0).min(NN_KC);
            // Later passes over k add to what the earlier ones stored.
            let acc = acc || p0 > 0;
            let mut j = 0;
            while j < n {
                let w = (n - j).min(NN_NV * 16);
                let nv = w.div_ceil(16);
                let last = mask(w - 16 * (nv - 1));
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(NN_MR);
                    // SAFETY: the tile covers rows i..i+mr < m, columns j..j+w ≤ n and depth
                    // p0..p0+kc ≤ k, all in bounds.
                    unsafe {
                        let (ap, bp, cp) = (a.add(i * ars + p0 * acs), b.add(p0 * ldb + j), c.add(i * ldc + j));
                        macro_rules! go {
                            ($($mr:literal),*) => {
                                match (mr, nv) {
                                    $(
                                        ($mr, 1) => nn_tile::<$mr, 1>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc),
                                        ($mr, 2) => nn_tile::<$mr, 2>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc),
                                        ($mr, 3) => nn_tile::<$mr, 3>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc),
                                        ($mr, 4) => nn_tile::<$mr, 4>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc),
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

    /// See `super::im2col_t`: each output row segment of `conv` floats is copied with 16-lane
    /// (the last one masked) loads and stores.
    ///
    /// # Safety
    /// AVX-512F present; bounds as checked in `super::im2col_t`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn im2col_t(x: *const f32, m: usize, img: usize, ks: usize, cols: *mut f32, ldc: usize) {
        let conv = img + 1 - ks;
        let pp = conv * conv;
        let nv = conv.div_ceil(16);
        let last = mask(conv - 16 * (nv - 1));
        for i in 0..ks {
            for j in 0..ks {
                for e in 0..m {
                    for r in 0..conv {
                        // SAFETY: source row x[e][(r+i)·img + j ..+conv] and destination
                        // cols[(i·ks+j)·ldc + e·pp + r·conv ..+conv] are in bounds (see caller);
                        // the last vector is masked to the row's end.
                        unsafe {
                            let src = x.add(e * img * img + (r + i) * img + j);
                            let dst = cols.add((i * ks + j) * ldc + e * pp + r * conv);
                            for v in 0..nv {
                                let mk = if v + 1 == nv { last } else { 0xffff };
                                _mm512_mask_storeu_ps(dst.add(16 * v), mk, _mm512_maskz_loadu_ps(mk, src.add(16 * v)));
                            }
                        }
                    }
                }
            }
        }
    }

    /// See `super::im2col_n`: each tap row of `ks ≤ 16` floats is one full 16-float load and
    /// store (unmasked: masked stores cannot forward and were measured 3× slower here); taps are
    /// written in increasing order so each store's spill is overwritten by the next one.
    ///
    /// # Safety
    /// AVX-512F present, `ks ≤ 16`, and 16 floats of slack after x and cols (see caller).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn im2col_n(x: *const f32, m: usize, img: usize, ks: usize, cols: *mut f32, ldc: usize) {
        let conv = img + 1 - ks;
        for e in 0..m {
            for r in 0..conv {
                for c in 0..conv {
                    let q = (e * conv + r) * conv + c;
                    for i in 0..ks {
                        // SAFETY: reads 16 floats at x[e][(r+i)·img + c] and writes 16 at
                        // cols[q·ldc + i·ks], in bounds thanks to the slack (see caller).
                        unsafe {
                            let v = _mm512_loadu_ps(x.add(e * img * img + (r + i) * img + c));
                            _mm512_storeu_ps(cols.add(q * ldc + i * ks), v);
                        }
                    }
                }
            }
        }
    }

    /// One `MR × NR` tile of dot products C = A·Bᵀ along k.
    ///
    /// # Safety
    /// AVX-512F present; rows i < MR of A at a + i·lda and j < NR of B at b + j·ldb hold k
    /// readable floats; C's tile at c + i·ldc + j is writable.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn nt_tile<const MR: usize, const NR: usize>(k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, acc: bool) {
        let mut t = [[_mm512_setzero_ps(); NR]; MR];
        let mut p = 0;
        while p < k {
            let m = mask(k - p);
            // SAFETY: lanes p..min(p+16, k) of each row are in bounds; masked lanes are not read.
            unsafe {
                let mut bv = [_mm512_setzero_ps(); NR];
                for j in 0..NR {
                    bv[j] = _mm512_maskz_loadu_ps(m, b.add(j * ldb + p));
                }
                for i in 0..MR {
                    let av = _mm512_maskz_loadu_ps(m, a.add(i * lda + p));
                    for j in 0..NR {
                        t[i][j] = _mm512_fmadd_ps(av, bv[j], t[i][j]);
                    }
                }
            }
            p += 16;
        }
        for i in 0..MR {
            for j in 0..NR {
                let s = _mm512_reduce_add_ps(t[i][j]);
                // SAFETY: C's tile is in bounds, per the contract.
                unsafe {
                    let dst = c.add(i * ldc + j);
                    *dst = if acc { *dst + s } else { s };
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F present and every index in bounds (see `gemm_nt`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn nt(m: usize, n: usize, k: usize, a: *const f32, lda: usize, b: *const f32, ldb: usize, c: *mut f32, ldc: usize, acc: bool) {
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
                                    ($mr, 4) => nt_tile::<$mr, 4>(k, ap, lda, bp, ldb, cp, ldc, acc),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(x: &[f32], y: &[f32], what: &str) {
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what}: element {i}: {a} vs {b}");
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[(1, 1, 1), (7, 33, 81), (20, 4000, 81), (13, 2000, 100), (100, 100, 2000), (6, 64, 5), (5, 17, 16), (3, 4, 0)];

    /// The chosen kernel and the portable one against the naive loops, with padded leading
    /// dimensions, strided A, and both overwrite and accumulate.
    #[test]
    fn nn_matches_naive() {
        for &(m, n, k) in SHAPES {
            for (ars, acs) in [(k + 3, 1), (1, m + 2)] {
                let a = rand_vec((m + 3) * (k + 3), 1);
                let (ldb, ldc) = (n + 5, n + 1);
                let b = rand_vec(k.max(1) * ldb, 2);
                let c0 = rand_vec(m * ldc, 3);
                for acc in [false, true] {
                    let mut want = c0.clone();
                    gemm_nn_naive(m, n, k, &a, ars, acs, &b, ldb, &mut want, ldc, acc);
                    for be in [Backend::Avx512, Backend::Portable] {
                        let mut got = c0.clone();
                        gemm_nn_on(be, m, n, k, &a, ars, acs, &b, ldb, &mut got, ldc, acc);
                        close(&got, &want, &format!("nn {m}x{n}x{k} {be:?}"));
                    }
                }
            }
        }
    }

    #[test]
    fn nt_matches_naive() {
        for &(m, n, k) in SHAPES {
            let (lda, ldb, ldc) = (k + 1, k + 7, n + 2);
            let a = rand_vec(m * lda, 4);
            let b = rand_vec(n * ldb, 5);
            let c0 = rand_vec(m * ldc, 6);
            for acc in [false, true] {
                let mut want = c0.clone();
                gemm_nt_naive(m, n, k, &a, lda, &b, ldb, &mut want, ldc, acc);
                for be in [Backend::Avx512, Backend::Portable] {
                    let mut got = c0.clone();
                    gemm_nt_on(be, m, n, k, &a, lda, &b, ldb, &mut got, ldc, acc);
                    close(&got, &want, &format!("nt {m}x{n}x{k} {be:?}"));
                }
            }
        }
    }

    /// Each output is computed the same way whatever the tiling: a product split by rows gives
    /// bit-identical results (this is what makes training independent of the thread count).
    #[test]
    fn splitting_rows_changes_nothing() {
        let (m, n, k) = (37, 300, 90);
        let a = rand_vec(m * k, 7);
        let b = rand_vec(k * n, 8);
        let bt = rand_vec(n * k, 9);
        let mut whole = vec![0.0; m * n];
        gemm_nn(m, n, k, &a, k, 1, &b, n, &mut whole, n, false);
        let mut split = vec![0.0; m * n];
        let (top, bottom) = split.split_at_mut(11 * n);
        gemm_nn(11, n, k, &a, k, 1, &b, n, top, n, false);
        gemm_nn(m - 11, n, k, &a[11 * k..], k, 1, &b, n, bottom, n, false);
        assert_eq!(whole, split);
        gemm_nt(m, n, k, &a, k, &bt, k, &mut whole, n, false);
        let (top, bottom) = split.split_at_mut(5 * n);
        gemm_nt(5, n, k, &a, k, &bt, k, top, n, false);
        gemm_nt(m - 5, n, k, &a[5 * k..], k, &bt, k, bottom, n, false);
        assert_eq!(whole, split);
    }

    #[test]
    fn im2col_matches_naive() {
        for (m, img, ks) in [(3, 28, 9), (2, 28, 5), (1, 40, 3), (2, 7, 7)] {
            let x = rand_vec(m * img * img, 11);
            let conv = img + 1 - ks;
            let ldc = m * conv * conv + 3;
            let mut a = vec![0.0; ks * ks * ldc];
            let mut b = a.clone();
            im2col_t(&x, m, img, ks, &mut a, ldc);
            im2col_t_naive(&x, m, img, ks, &mut b, ldc);
            assert_eq!(a, b);
            let mut a = vec![0.0; m * conv * conv * 96];
            let mut b = a.clone();
            im2col_n(&x, m, img, ks, &mut a, 96);
            im2col_n_naive(&x, m, img, ks, &mut b, 96);
            assert_eq!(a, b);
        }
    }

    #[test]
    #[should_panic(expected = "needs")]
    fn out_of_bounds_panics() {
        let mut c = vec![0.0; 4];
        gemm_nn(2, 2, 2, &[0.0; 3], 2, 1, &[0.0; 4], 2, &mut c, 2, false);
    }
}
