//! The only module with `unsafe`: the f32 matrix products the batched path is built on.
//!
//! Two shapes of product cover every layer:
//! - [`gemm_nn`]: `C (m×n) = A (m×k) · B (k×n)`, `A` strided (read one scalar at a time and
//!   broadcast), `B` and `C` row-major. Used where the long dimension `n` can run along SIMD lanes
//!   (conv forward over positions, `∂J/∂w⁽⁻¹⁾` and `∂L/∂y⁽⁻²⁾` over the 2000 inputs).
//! - [`gemm_nt`]: `C (m×n) = A (m×k) · Bᵀ` with `B` given as `n×k`, both row-major: dot products
//!   along the contiguous `k` (dense forward over the 2000 inputs, kernel gradient over positions).
//!
//! Two sparse variants serve the products with `∂L/∂v⁽⁻¹⁾`, most of whose entries are exact
//! zeros behind the hidden ReLU: [`gemm_nn_at`] (the depths where A has a nonzero) and
//! [`gemm_csr`] (A stored by rows without its zeros, [`Csr`]). They run the AVX2 kernels where
//! the CPU has them and plain loops otherwise.
//!
//! Each has four implementations with one contract, chosen at run time ([`backend`]): a
//! hand-written AVX-512 kernel (register-tiled, masked tails, FMA) when the CPU has AVX-512F; the
//! same tiles narrowed to AVX2 + FMA (`kernels/avx2.rs`, 8 lanes, 16 registers) when it has those; a
//! portable path through the `matrixmultiply` crate otherwise; and the plain loops
//! [`gemm_nn_naive`] / [`gemm_nt_naive`] that tests hold the others to. The conv, pooling and
//! elementwise kernels follow the same pattern, with plain loops as their portable path.
//!
//! Every output element is computed by one fixed sequence of operations whatever the tiling, so
//! splitting `m` among threads never changes a result.

/// Which implementation the kernels of this module use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Hand-written AVX-512F kernels (16 lanes, 32 registers).
    Avx512,
    /// Hand-written AVX2 + FMA kernels (8 lanes, 16 registers): the same tiles, narrower.
    Avx2,
    /// The `matrixmultiply` crate (its own run-time SIMD dispatch) for the products, plain
    /// loops for the rest.
    Portable,
}

impl Backend {
    /// Every backend, fastest first.
    pub const ALL: [Backend; 3] = [Backend::Avx512, Backend::Avx2, Backend::Portable];

    /// The backend that runs when `self` is asked for: one this CPU cannot run falls back to
    /// `Portable`.
    pub fn resolve(self) -> Backend {
        match self {
            Backend::Avx512 if has_avx512() => Backend::Avx512,
            Backend::Avx2 if has_avx2_fma() => Backend::Avx2,
            _ => Backend::Portable,
        }
    }

    /// The backends this CPU can run (tests hold each of them to the plain loops).
    pub fn available() -> Vec<Backend> {
        Backend::ALL
            .into_iter()
            .filter(|b| b.resolve() == *b)
            .collect()
    }
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

/// Whether this CPU also has AVX-512BW and VL (byte-masked loads).
pub fn has_avx512bw_vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512F and VL (AVX-512 instructions on 8-lane vectors, and 32 of them).
pub fn has_avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX2 and FMA.
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The implementation chosen for this CPU: AVX-512F if present, else AVX2 + FMA, else portable.
/// `MNISTCONV_KERNELS=avx2` or `=portable` asks for a narrower one (for comparisons); `=avx512`
/// also keeps the kernel gradient on AVX-512 where [`dk_backend`] would pick AVX2.
pub fn backend() -> Backend {
    use std::sync::OnceLock;
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let want = match kernels_asked().as_deref() {
            Some("portable") => Backend::Portable,
            Some("avx2") => Backend::Avx2,
            _ => Backend::Avx512,
        };
        Backend::ALL
            .into_iter()
            .skip_while(|b| *b != want)
            .find(|b| b.resolve() == *b)
            .unwrap_or(Backend::Portable)
    })
}

/// What `MNISTCONV_KERNELS` asks for, if it is set.
fn kernels_asked() -> Option<String> {
    std::env::var("MNISTCONV_KERNELS").ok()
}

/// The backend of the kernel gradient ([`conv_wide_dk`]): [`backend`], except on a CPU that
/// runs 512-bit FMAs as two 256-bit halves (AMD Zen 4, family 19h) where AVX-512 is chosen:
/// there both widths do the same multiply-adds per cycle, and the AVX2 kernel, which skips
/// zeros by 8-position blocks per tap group rather than by rows (with it, 11.8 % of a training
/// step's multiply-adds on MNIST are skipped, against 5.7 %), is the faster (a chunk of 8
/// digits 87 against 97 µs, `examples/kernel_timing`; training 2–3.5 % faster).
/// `MNISTCONV_KERNELS=avx512` keeps AVX-512 here too. Fixed per machine, so results stay the
/// same for any thread count.
pub fn dk_backend() -> Backend {
    use std::sync::OnceLock;
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(|| {
        let asked_avx512 = kernels_asked().as_deref() == Some("avx512");
        match backend() {
            Backend::Avx512 if half_rate_avx512() && !asked_avx512 => Backend::Avx2,
            be => be,
        }
    })
}

/// Whether this CPU splits 512-bit FMAs into two 256-bit halves: AMD family 19h (Zen 4; Zen 3,
/// also 19h, has no AVX-512, and Zen 5, 1Ah, runs them whole).
pub fn half_rate_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Leaf 0: the vendor string; leaf 1: the family (both exist on every x86_64 CPU).
        let (v, f) = (__cpuid(0), __cpuid(1));
        let amd = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"AuthenticAMD");
        // Family: the base family (bits 8–11) plus, when that is 0xF, the extended (20–27).
        let base = (f.eax >> 8) & 0xF;
        let family = if base == 0xF {
            base + ((f.eax >> 20) & 0xFF)
        } else {
            base
        };
        amd && family == 0x19 && has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Handles a product with nothing to multiply (`m`, `n` or `k` zero): with `k = 0`, `C = A·B` is
/// zero (or, accumulating, unchanged). Returns whether it was such a product.
fn empty_product(m: usize, n: usize, k: usize, c: &mut [f32], ldc: usize, acc: bool) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        if !acc {
            (0..m).for_each(|i| c[i * ldc..i * ldc + n].fill(0.0));
        }
        return true;
    }
    false
}

/// Panics unless every index the product touches lies inside its slice and C's rows do not overlap.
#[allow(clippy::too_many_arguments)]
fn check_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
) {
    assert!(
        ldb >= n && ldc >= n,
        "gemm_nn: ldb {ldb}, ldc {ldc} must be ≥ n {n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() >= (m - 1) * ldc + n,
        "gemm_nn: C {m}×{n} (ldc {ldc}) needs {} elements, has {}",
        (m - 1) * ldc + n,
        c.len()
    );
    check_nn_ab(m, n, k, a, ars, acs, b, ldb);
}

/// [`check_nn`] for A and B only.
#[allow(clippy::too_many_arguments)]
fn check_nn_ab(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
) {
    assert!(ldb >= n, "gemm_nn: ldb {ldb} must be ≥ n {n}");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let ea = (m - 1) * ars + (k - 1) * acs + 1;
    assert!(
        a.len() >= ea,
        "gemm_nn: A {m}×{k} (rs {ars}, cs {acs}) needs {ea} elements, has {}",
        a.len()
    );
    let eb = (k - 1) * ldb + n;
    assert!(
        b.len() >= eb,
        "gemm_nn: B {k}×{n} (ldb {ldb}) needs {eb} elements, has {}",
        b.len()
    );
}

#[allow(clippy::too_many_arguments)]
fn check_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
) {
    assert!(
        lda >= k && ldb >= k && ldc >= n,
        "gemm_nt: lda {lda}, ldb {ldb} must be ≥ k {k}, ldc {ldc} ≥ n {n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() >= (m - 1) * ldc + n,
        "gemm_nt: C {m}×{n} (ldc {ldc}) needs {} elements, has {}",
        (m - 1) * ldc + n,
        c.len()
    );
    if k == 0 {
        return;
    }
    assert!(
        a.len() >= (m - 1) * lda + k,
        "gemm_nt: A {m}×{k} (lda {lda}) needs {} elements, has {}",
        (m - 1) * lda + k,
        a.len()
    );
    assert!(
        b.len() >= (n - 1) * ldb + k,
        "gemm_nt: B {n}×{k} (ldb {ldb}) needs {} elements, has {}",
        (n - 1) * ldb + k,
        b.len()
    );
}

/// `C = A·B` (or `C += A·B` when `acc`), `A` (m×k) at `a[i·ars + p·acs]`, `B` (k×n) at
/// `b[p·ldb + j]`, `C` (m×n) at `c[i·ldc + j]`.
///
/// # Panics
/// If a matrix reaches outside its slice, or `ldb`/`ldc` < `n`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    gemm_nn_on(backend(), m, n, k, a, ars, acs, b, ldb, c, ldc, acc)
}

/// [`gemm_nn`] on a chosen backend (tests and benchmarks compare them). A backend the CPU
/// cannot run falls back to `Portable` ([`Backend::resolve`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_on(
    be: Backend,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    check_nn(m, n, k, a, ars, acs, b, ldb, c, ldc);
    if empty_product(m, n, k, c, ldc, acc) {
        return;
    }
    // SAFETY: `check_nn` asserted that every index of A, B and C the product touches lies
    // inside its slice, with ldc ≥ n so that C's rows do not overlap; `c` is an exclusive
    // borrow, so no other reference aliases the written memory.
    unsafe { nn_unchecked(be, m, n, k, a, ars, acs, b, ldb, c.as_mut_ptr(), ldc, acc) }
}

/// [`gemm_nn_on`] into columns of a matrix that other threads write other columns of: C
/// (m×`c.width()`) is `c`, whose rows lie `c`'s stride apart.
///
/// # Panics
/// If A or B reaches outside its slice, `ldb` < the width, or `m` exceeds `c`'s rows.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_cols(
    m: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut ColsMut,
    acc: bool,
) {
    let n = c.width;
    assert!(m <= c.rows, "gemm_nn: C has {} rows, needs {m}", c.rows);
    check_nn_ab(m, n, k, a, ars, acs, b, ldb);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            (0..m).for_each(|i| c.row(i).fill(0.0));
        }
        return;
    }
    // SAFETY: A and B were checked as in `gemm_nn_on`; C's element (i, j), i < m ≤ rows,
    // j < width, is at ptr + i·ld + j, inside the matrix `c` borrows exclusively (its
    // constructor checked rows·ld elements), with ld ≥ width so that rows do not overlap.
    unsafe { nn_unchecked(backend(), m, n, k, a, ars, acs, b, ldb, c.ptr, c.ld, acc) }
}

/// Columns `c0..c0 + width` of every row of a row-major matrix (`rows` rows `ld` apart),
/// borrowed exclusively. [`ColsMut::split_at`] cuts it into blocks that share no element, so
/// that threads can each own some columns of every row: a product `A·B` whose threads split
/// the columns of `B` (and `C`) reads only their share of `B`.
#[derive(Debug)]
pub struct ColsMut<'a> {
    /// element (0, c0)
    ptr: *mut f32,
    rows: usize,
    ld: usize,
    width: usize,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: a ColsMut is an exclusive borrow of its elements, like the `&mut [f32]` it was made
// from, and no other ColsMut or reference reaches them; sending it to another thread is
// sending that borrow.
unsafe impl Send for ColsMut<'_> {}

impl<'a> ColsMut<'a> {
    /// All of the `rows × ld` matrix in `m`.
    ///
    /// # Panics
    /// If `m` holds fewer than `rows·ld` elements.
    pub fn new(m: &'a mut [f32], rows: usize, ld: usize) -> Self {
        assert!(m.len() >= rows * ld, "columns: matrix too short");
        ColsMut {
            ptr: m.as_mut_ptr(),
            rows,
            ld,
            width: ld,
            _borrow: std::marker::PhantomData,
        }
    }
    /// The first `at` columns and the rest.
    ///
    /// # Panics
    /// If `at` is past the width.
    pub fn split_at(self, at: usize) -> (ColsMut<'a>, ColsMut<'a>) {
        assert!(at <= self.width, "columns: split at {at} of {}", self.width);
        let right = ColsMut {
            // SAFETY: at ≤ width ≤ ld, so the pointer stays within (or one past) row 0.
            ptr: unsafe { self.ptr.add(at) },
            width: self.width - at,
            ..self
        };
        (ColsMut { width: at, ..self }, right)
    }
    /// Columns `c0..c1` of the block, borrowed.
    ///
    /// # Panics
    /// If `c0 > c1` or `c1` is past the width.
    pub fn sub(&mut self, c0: usize, c1: usize) -> ColsMut<'_> {
        assert!(
            c0 <= c1 && c1 <= self.width,
            "columns: {c0}..{c1} of {}",
            self.width
        );
        ColsMut {
            // SAFETY: c0 ≤ width ≤ ld, so the pointer stays within (or one past) row 0.
            ptr: unsafe { self.ptr.add(c0) },
            rows: self.rows,
            ld: self.ld,
            width: c1 - c0,
            _borrow: std::marker::PhantomData,
        }
    }
    /// The block's part of row `i`.
    ///
    /// # Panics
    /// If `i` is not a row.
    pub fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "columns: row {i} of {}", self.rows);
        // SAFETY: row i's columns c0..c0 + width lie in the borrowed matrix (rows·ld elements,
        // width ≤ ld), belong to this block only, and `&mut self` keeps the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ld), self.width) }
    }
    /// Columns in the block.
    pub fn width(&self) -> usize {
        self.width
    }
}

/// The product of [`gemm_nn_on`] once its arguments are checked.
///
/// # Safety
/// Every index of A (i·ars + p·acs), B (p·ldb + j) and C (i·ldc + j), i < m, j < n, p < k,
/// is in bounds of its allocation, C's rows do not overlap (ldc ≥ n), nothing else accesses C
/// meanwhile, and m, n, k > 0.
#[allow(clippy::too_many_arguments)]
unsafe fn nn_unchecked(
    be: Backend,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    cp: *mut f32,
    ldc: usize,
    acc: bool,
) {
    match be.resolve() {
        #[cfg(target_arch = "x86_64")]
        be @ (Backend::Avx512 | Backend::Avx2) => {
            let (ap, bp) = (a.as_ptr(), b.as_ptr());
            // SAFETY: `resolve` checked `is_x86_feature_detected!` for the backend's features
            // ("avx512f", or "avx2" and "fma"); the caller guarantees the bounds.
            unsafe {
                if be == Backend::Avx512 {
                    avx512::nn(m, n, k, ap, ars, acs, bp, ldb, cp, ldc, acc)
                } else {
                    avx2::nn(m, n, None, k, ap, ars, acs, bp, ldb, cp, ldc, acc)
                }
            }
        }
        _ => {
            // SAFETY: the caller bounded every index; matrixmultiply reads A and B and writes C
            // only at i·rs + j·cs for i < m, j < n, p < k, with the strides given.
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
                    cp,
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
pub fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    gemm_nt_on(backend(), m, n, k, a, lda, b, ldb, c, ldc, acc)
}

/// [`gemm_nt`] on a chosen backend; one the CPU cannot run falls back to `Portable`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_on(
    be: Backend,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    check_nt(m, n, k, a, lda, b, ldb, c, ldc);
    if empty_product(m, n, k, c, ldc, acc) {
        return;
    }
    match be.resolve() {
        #[cfg(target_arch = "x86_64")]
        be @ (Backend::Avx512 | Backend::Avx2) => {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            // SAFETY: `resolve` checked `is_x86_feature_detected!` for the backend's features
            // ("avx512f", or "avx2" and "fma"). `check_nt` asserted that A's rows
            // i·lda..i·lda+k (i < m), B's rows j·ldb..j·ldb+k (j < n) and C's elements
            // i·ldc + j (ldc ≥ n) lie inside the slices; `c` is an exclusive borrow.
            unsafe {
                if be == Backend::Avx512 {
                    avx512::nt(m, n, k, ap, lda, bp, ldb, cp, ldc, acc)
                } else {
                    avx2::nt(m, n, k, ap, lda, bp, ldb, cp, ldc, acc)
                }
            }
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

/// The depths `p < k` at which some row of the `m × k` matrix `a[i·ars + p·acs]` is not an exact
/// zero, increasing, into `out` (cleared first; no allocation within its capacity).
///
/// # Panics
/// If the matrix reaches outside `a`, or `k` does not fit in `u32`.
pub fn nonzero_cols(m: usize, k: usize, a: &[f32], ars: usize, acs: usize, out: &mut Vec<u32>) {
    assert!(
        u32::try_from(k).is_ok(),
        "nonzero_cols: {k} columns do not fit u32"
    );
    out.clear();
    if m == 0 {
        return;
    }
    for p in 0..k {
        if (0..m).any(|i| a[i * ars + p * acs] != 0.0) {
            out.push(p as u32);
        }
    }
}

/// [`gemm_nn`] over the depths `ks` only: `C = Σ_{p ∈ ks} A[:, p]·B[p, :]` (or `+=` when `acc`).
/// With `ks` the [`nonzero_cols`] of A it is `A·B` with the all-zero columns of A left out,
/// which on the AVX2 backend gives [`gemm_nn`]'s bits whenever B is finite (a left-out term
/// adds `±0`), and for `∂L/∂y⁽⁻²⁾ = ∂L/∂v⁽⁻¹⁾ · w⁽⁻¹⁾` behind a ReLU skips the rows of
/// `w⁽⁻¹⁾` for hidden units no image of the chunk uses.
///
/// # Panics
/// As [`gemm_nn`], for the depth `max(ks) + 1`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_at(
    m: usize,
    n: usize,
    ks: &[u32],
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    gemm_nn_at_on(backend(), m, n, ks, a, ars, acs, b, ldb, c, ldc, acc)
}

/// [`gemm_nn_at`] on a chosen backend (AVX-512 runs the AVX2 kernel).
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_at_on(
    be: Backend,
    m: usize,
    n: usize,
    ks: &[u32],
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
    let depth = ks.iter().max().map_or(0, |&p| p as usize + 1);
    check_nn(m, n, depth, a, ars, acs, b, ldb, c, ldc);
    if empty_product(m, n, ks.len(), c, ldc, acc) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(be.resolve(), Backend::Avx512 | Backend::Avx2) && has_avx2_fma() {
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        // SAFETY: AVX2 and FMA were detected. Every index in `ks` is below `depth`, for which
        // `check_nn` asserted that A (i·ars + p·acs, i < m), B (p·ldb + j, j < n) and C
        // (i·ldc + j, ldc ≥ n) lie inside their slices; `c` is an exclusive borrow.
        unsafe {
            avx2::nn(
                m,
                n,
                Some(ks),
                ks.len(),
                ap,
                ars,
                acs,
                bp,
                ldb,
                cp,
                ldc,
                acc,
            )
        };
        return;
    }
    let _ = be;
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        if !acc {
            row.fill(0.0);
        }
        for &p in ks {
            let (p, av) = (p as usize, a[i * ars + p as usize * acs]);
            row.iter_mut()
                .zip(&b[p * ldb..p * ldb + n])
                .for_each(|(o, &x)| *o += av * x);
        }
    }
}

/// A sparse matrix stored by rows: row `i`'s nonzeros are `val[i·s..end[i]]`, at the
/// increasing columns `col[i·s..end[i]]`, with the row stride `s = cols + 1` (one spare slot
/// per row lets [`Csr::gather`] write every entry and keep only the nonzeros, without a
/// branch). Built from a dense matrix by `gather`, which leaves out the exact zeros; the
/// buffers are kept, so rebuilding a matrix of at most the reserved size allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct Csr {
    rows: usize,
    cols: usize,
    end: Vec<usize>,
    col: Vec<u32>,
    val: Vec<f32>,
    /// The columns that some row uses, increasing (the rows of B a product reads).
    used: Vec<u32>,
    seen: Vec<bool>,
}

impl Csr {
    /// An empty matrix with room for `rows × cols` entries.
    pub fn with_capacity(rows: usize, cols: usize) -> Self {
        Csr {
            rows: 0,
            cols: 0,
            end: Vec::with_capacity(rows),
            col: Vec::with_capacity(rows * (cols + 1)),
            val: Vec::with_capacity(rows * (cols + 1)),
            used: Vec::with_capacity(cols),
            seen: Vec::with_capacity(cols),
        }
    }

    /// Floats between the starts of two rows.
    fn stride(&self) -> usize {
        self.cols + 1
    }

    /// Becomes the `m × k` matrix at `a[i·ars + p·acs]` without its exact zeros (`±0`; NaN is
    /// kept). In a product `Σ_p a_ip·b_pj` a left-out term adds `±0`, which changes no sum when
    /// B is finite. Reads `a` in memory order: by rows when `acs ≤ ars`, else by columns
    /// (each entry then lands at the end of its row).
    ///
    /// # Panics
    /// If the matrix reaches outside `a`, or `k` does not fit in `u32`.
    pub fn gather(&mut self, m: usize, k: usize, a: &[f32], ars: usize, acs: usize) {
        assert!(u32::try_from(k).is_ok(), "Csr: {k} columns do not fit u32");
        if m > 0 && k > 0 {
            let ea = (m - 1) * ars + (k - 1) * acs + 1;
            assert!(
                a.len() >= ea,
                "Csr: A {m}×{k} (strides {ars}, {acs}) needs {ea} elements, has {}",
                a.len()
            );
        }
        (self.rows, self.cols) = (m, k);
        let s = self.stride();
        self.col.resize(m * s, 0);
        self.val.resize(m * s, 0.0);
        self.end.clear();
        self.end.extend((0..m).map(|i| i * s));
        self.seen.clear();
        self.seen.resize(k, false);
        // Each entry is written at its row's end, which moves on only for a nonzero: no branch
        // to mispredict. A row has k + 1 slots, so the write after its last kept entry fits.
        let (end, col, val) = (&mut self.end[..], &mut self.col[..], &mut self.val[..]);
        if acs <= ars {
            for (i, e) in end.iter_mut().enumerate() {
                for p in 0..k {
                    let v = a[i * ars + p * acs];
                    (col[*e], val[*e]) = (p as u32, v);
                    let keep = v != 0.0;
                    self.seen[p] |= keep;
                    *e += usize::from(keep);
                }
            }
        } else {
            for p in 0..k {
                let mut any = false;
                for (i, e) in end.iter_mut().enumerate() {
                    let v = a[i * ars + p * acs];
                    (col[*e], val[*e]) = (p as u32, v);
                    let keep = v != 0.0;
                    any |= keep;
                    *e += usize::from(keep);
                }
                self.seen[p] = any;
            }
        }
        self.used.clear();
        self.used
            .extend((0..k as u32).filter(|&p| self.seen[p as usize]));
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Entries kept.
    pub fn nnz(&self) -> usize {
        (0..self.rows)
            .map(|i| self.end[i] - i * self.stride())
            .sum()
    }

    /// Row `i` as (columns, values).
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let r = i * self.stride()..self.end[i];
        (&self.col[r.clone()], &self.val[r])
    }
}

/// `C = A[rows]·B` for a sparse `A` ([`Csr`], `k` columns) and a dense `B` (k×n) at
/// `b[p·ldb + j]`; `C` row `i` (for A's row `rows.start + i`) at `c[i·ldc + j]`. Each output is
/// `Σ_p a_ip·b_pj` over the row's kept entries in column order, so on the AVX2 backend it
/// is bit-for-bit [`gemm_nn`]'s result for `k ≤ 128` whenever B is finite (the left-out terms
/// would add `±0`). Used where A is mostly zeros: the hidden layer's `∂L/∂v⁽⁻¹⁾` behind a ReLU.
///
/// # Panics
/// If `rows` is not within A, or B or C reach outside their slices, or `ldb`/`ldc` < `n`.
pub fn gemm_csr(
    a: &Csr,
    rows: std::ops::Range<usize>,
    n: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_csr_on(backend(), a, rows, n, b, ldb, c, ldc)
}

/// [`gemm_csr`] on a chosen backend (AVX-512 runs the AVX2 kernel; the fast path uses the
/// dense AVX-512 product instead, faster there).
#[allow(clippy::too_many_arguments)]
pub fn gemm_csr_on(
    be: Backend,
    a: &Csr,
    rows: std::ops::Range<usize>,
    n: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(
        rows.start <= rows.end && rows.end <= a.rows,
        "gemm_csr: rows {rows:?} of a {}-row matrix",
        a.rows
    );
    assert!(
        ldb >= n && ldc >= n,
        "gemm_csr: ldb {ldb}, ldc {ldc} must be ≥ n {n}"
    );
    let m = rows.len();
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c.len() >= (m - 1) * ldc + n,
        "gemm_csr: C {m}×{n} (ldc {ldc}) needs {} elements, has {}",
        (m - 1) * ldc + n,
        c.len()
    );
    if a.cols > 0 {
        assert!(
            b.len() >= (a.cols - 1) * ldb + n,
            "gemm_csr: B {}×{n} (ldb {ldb}) needs {} elements, has {}",
            a.cols,
            (a.cols - 1) * ldb + n,
            b.len()
        );
    }
    let stride = a.stride();
    #[cfg(target_arch = "x86_64")]
    if matches!(be.resolve(), Backend::Avx512 | Backend::Avx2) && has_avx2_fma() {
        // SAFETY: AVX2 and FMA were detected. `gather` made every column index < a.cols, and
        // B holds (a.cols − 1)·ldb + n floats (asserted), so every read b[p·ldb + j], j < n,
        // is in bounds; row r's entries lie at r·stride .. end[r] ≤ (r + 1)·stride of col/val
        // (built together, r < a.rows); the `used` rows are columns < a.cols too; C holds
        // (m − 1)·ldc + n floats with ldc ≥ n, an exclusive borrow.
        unsafe {
            avx2::csr(
                m,
                n,
                (a.end[rows.start..].as_ptr(), rows.start * stride, stride),
                a.col.as_ptr(),
                a.val.as_ptr(),
                b.as_ptr(),
                ldb,
                &a.used,
                c.as_mut_ptr(),
                ldc,
            )
        };
        return;
    }
    let _ = be;
    for i in 0..m {
        let out = &mut c[i * ldc..i * ldc + n];
        out.fill(0.0);
        let (cols, vals) = a.row(rows.start + i);
        for (&p, &v) in cols.iter().zip(vals) {
            let brow = &b[p as usize * ldb..p as usize * ldb + n];
            out.iter_mut().zip(brow).for_each(|(o, &x)| *o += v * x);
        }
    }
}

/// A buffer whose first element sits on a 64-byte boundary: one cache line, one AVX-512
/// vector. The SIMD kernels load vectors of 16 floats at multiples of 16 from the start of a
/// map, a slot or a matrix row, so on an aligned buffer (with rows a multiple of 64 bytes
/// long) those loads never straddle two lines; a `Vec` of this size comes from `mmap` 16 bytes
/// past a line. On the AVX-512 machine the kernel gradient of a chunk ran 18 % faster with
/// its maps aligned (36.4 against 43.0 µs), and the hidden layer's forward product of a chunk
/// of 8 images 33 % faster with `y⁽⁻²⁾` and `w⁽⁻¹⁾` aligned (23.8 against 35.4 µs). The
/// parameters ([`crate::params::Params`]) and the fast path's buffers are kept in it. Safe
/// code: a `Vec` with spare elements, used from its first aligned one.
#[derive(Default)]
pub struct Aligned<T = f32> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T> Aligned<T> {
    /// Bytes of the alignment.
    pub const ALIGN: usize = 64;
}

impl<T: Copy + Default> Aligned<T> {
    /// `len` default values (zeros), aligned.
    pub fn zeroed(len: usize) -> Self {
        Self::from_fn(len, |_| T::default())
    }

    /// A copy of `v`, aligned.
    pub fn from_slice(v: &[T]) -> Self {
        Self::from_fn(v.len(), |i| v[i])
    }

    /// Element `i` is `f(i)`.
    fn from_fn(len: usize, f: impl FnMut(usize) -> T) -> Self {
        // Enough spare elements to reach a boundary from any address that is a multiple of
        // the element's size (and at least one, so that a zero-sized type cannot divide by 0).
        let spare = (Self::ALIGN / std::mem::size_of::<T>().max(1)).max(1) - 1;
        let mut buf = vec![T::default(); len + spare];
        let start = buf.as_ptr().align_offset(Self::ALIGN).min(spare);
        buf[start..start + len]
            .iter_mut()
            .zip((0..len).map(f))
            .for_each(|(d, v)| *d = v);
        Aligned { buf, start, len }
    }
}

impl<T: Clone> Clone for Aligned<T> {
    /// A new buffer with the same contents, aligned afresh: its offset into its own `Vec` may
    /// differ, so the contents are rotated into place.
    fn clone(&self) -> Self {
        let mut buf = self.buf.clone();
        let (old, len) = (self.start, self.len);
        let start = buf.as_ptr().align_offset(Self::ALIGN).min(buf.len() - len);
        if start > old {
            buf[old..start + len].rotate_right(start - old);
        } else {
            buf[start..old + len].rotate_left(old - start);
        }
        Aligned { buf, start, len }
    }
}

impl<'a, T> IntoIterator for &'a Aligned<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a, T> IntoIterator for &'a mut Aligned<T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

impl<T: PartialEq> PartialEq for Aligned<T> {
    /// Equal contents (wherever each buffer starts).
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Aligned<T> {
    /// As the slice of its contents.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: Copy + Default> From<Vec<T>> for Aligned<T> {
    fn from(v: Vec<T>) -> Self {
        Self::from_slice(&v)
    }
}

impl<T: Copy + Default> FromIterator<T> for Aligned<T> {
    fn from_iter<I: IntoIterator<Item = T>>(it: I) -> Self {
        Self::from_slice(&it.into_iter().collect::<Vec<T>>())
    }
}

/// Most taps the SIMD conv kernels take (16×16); larger kernels use the plain loops.
const MAX_TAPS: usize = 256;

/// The conv layer's layout. Each image is stored as `ks` column-shifted copies
/// `X_j[rr][c] = x[rr][c + j]` (`rr < img`, `c < conv`), one after the other, so that tap
/// `(i, j)` of every output position `q = r·conv + c` reads `X_j[q + i·conv]`: one contiguous run
/// per tap, with no im2col copy and no wasted positions. Maps are stored compactly, `r·conv + c`,
/// padded to a multiple of 16 positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wide {
    /// Image side.
    pub img: usize,
    /// Kernel side.
    pub ks: usize,
}

impl Wide {
    /// Side of the valid output map.
    pub fn conv(&self) -> usize {
        self.img + 1 - self.ks
    }
    /// Positions per map, `conv²` rounded up to a multiple of 16 (the extra ones are junk).
    pub fn wq(&self) -> usize {
        (self.conv() * self.conv()).next_multiple_of(16)
    }
    /// Floats per column-shifted copy: `img` rows of `conv`.
    fn js(&self) -> usize {
        self.img * self.conv()
    }
    /// Offset of tap `p = i·ks + j`: copy `j`, row `i`.
    pub fn off(&self, p: usize) -> usize {
        (p % self.ks) * self.js() + (p / self.ks) * self.conv()
    }
    /// Floats per image slot: every read `q + off(p)`, `q < wq`, falls inside it.
    pub fn slot(&self) -> usize {
        (self.off(self.ks * self.ks - 1) + self.wq()).next_multiple_of(16)
    }
    /// Writes image `x` (img×img pixels, 0..=255) into its slot as the `ks` column-shifted
    /// copies, scaled to [0, 1]; the slot's tail is zeroed. Returns where the slot's nonzeros
    /// lie (its [`Ink`], from the image's blank top and bottom rows), for the conv kernels.
    ///
    /// # Panics
    /// If `x` or `slot` is too short.
    pub fn fill(&self, x: &[u8], slot: &mut [f32]) -> Ink {
        self.fill_on(backend(), x, slot)
    }
    /// [`Wide::fill`] on a chosen backend (the result is the same on every one).
    ///
    /// # Panics
    /// If `x` or `slot` is too short.
    pub fn fill_on(&self, be: Backend, x: &[u8], slot: &mut [f32]) -> Ink {
        self.write_slot(be, x, slot);
        self.ink_of_rows(x)
    }
    /// The [`Ink`] of the slot that `fill` writes for image `x`: every copy's row `rr` holds
    /// pixels of image row `rr` only, so outside the inked rows `[top, bottom]` every copy's
    /// window is zero; except that a window longer than its copy (wq > conv²) runs into the
    /// next copies, so its end is kept whole.
    fn ink_of_rows(&self, x: &[u8]) -> Ink {
        let (img, conv) = (self.img, self.conv());
        let inked = |r: &[u8]| r.iter().fold(0, |a, &b| a | b) != 0;
        let rows = x[..img * img].chunks_exact(img);
        let Some(top) = rows.clone().position(inked) else {
            return Ink { lo: 0, hi: 0 };
        };
        let bottom = rows.clone().rposition(inked).unwrap_or(top);
        let mut hi = (bottom + 1) * conv;
        if self.window() > self.js() {
            hi = self.window();
        }
        Ink { lo: top * conv, hi }
    }
    fn write_slot(&self, be: Backend, x: &[u8], slot: &mut [f32]) {
        // The backend that runs: one this CPU lacks is `Portable`.
        let be = be.resolve();
        let (img, conv, js) = (self.img, self.conv(), self.js());
        let slot = &mut slot[..self.slot()];
        assert!(
            x.len() >= img * img,
            "fill: image has {} pixels, needs {}",
            x.len(),
            img * img
        );
        #[cfg(target_arch = "x86_64")]
        if be == Backend::Avx512 && conv <= 32 && has_avx512bw_vl() {
            // SAFETY: AVX-512F, BW and VL were detected. Reads x[rr·img + j + c] for rr < img, c < conv,
            // j < ks (so j + c < img): within x; lanes past conv are masked off. Writes
            // slot[j·js + rr·conv + c], c < conv: below ks·js ≤ slot.len().
            unsafe { avx512::fill_shifted(x.as_ptr(), img, self.ks, conv, slot.as_mut_ptr()) };
            slot[self.ks * js..].fill(0.0);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if be != Backend::Portable && has_avx2_fma() {
            // SAFETY: AVX2 was detected. Reads x[rr·img + j + c] for rr < img, c < conv, j < ks
            // (so j + c < img, and a vector of 8 is read only where c + 8 ≤ conv): within x.
            // Writes slot[j·js + rr·conv + c], c < conv: below ks·js ≤ slot.len().
            unsafe { avx2::fill_shifted(x.as_ptr(), img, self.ks, conv, slot.as_mut_ptr()) };
            slot[self.ks * js..].fill(0.0);
            return;
        }
        for j in 0..self.ks {
            for rr in 0..img {
                let dst = &mut slot[j * js + rr * conv..j * js + (rr + 1) * conv];
                for (d, &s) in dst.iter_mut().zip(&x[rr * img + j..rr * img + j + conv]) {
                    *d = f32::from(s) * (1.0 / 255.0);
                }
            }
        }
        slot[self.ks * js..].fill(0.0);
    }
    /// Every tap's offset, on the stack (the SIMD path takes kernels of up to 16×16).
    fn offsets(&self) -> [usize; MAX_TAPS] {
        let mut o = [0; MAX_TAPS];
        for (p, v) in o.iter_mut().enumerate().take(self.ks * self.ks) {
            *v = self.off(p);
        }
        o
    }
    /// Floats of one column-shifted copy that the taps read: `(ks − 1)·conv + wq` from the
    /// copy's start (for the last copy this runs into the slot's tail).
    fn window(&self) -> usize {
        (self.ks - 1) * self.conv() + self.wq()
    }
    /// Where the nonzero floats of one image slot lie, as seen by the taps: tap `(i, j)` at
    /// position `q` reads float `q + i·conv` of copy `j`'s window, and every window's floats
    /// outside `[lo, hi)` are zero (NaN counts as nonzero). Found in blocks of 8, so the range
    /// may be a little wider than the ink; it is never narrower. For a slot that [`Wide::fill`]
    /// wrote, the ink it returned is cheaper.
    ///
    /// # Panics
    /// If `slot` is shorter than [`Wide::slot`].
    pub fn ink(&self, slot: &[f32]) -> Ink {
        let (js, win) = (self.js(), self.window());
        let (mut lo, mut hi) = (usize::MAX, 0);
        // A block is nonzero when any float's bits other than the sign are set (−0 is zero,
        // NaN is not): a branch-free OR that compiles to vector code.
        let nonzero = |c: &[f32]| c.iter().fold(0, |a, v| a | (v.to_bits() << 1)) != 0;
        for j in 0..self.ks {
            let w = &slot[j * js..j * js + win];
            if let Some(f) = w.chunks(8).position(nonzero) {
                lo = lo.min(8 * f);
                let l = w.chunks(8).rposition(nonzero).unwrap_or(f);
                hi = hi.max((8 * (l + 1)).min(win));
            }
        }
        if lo >= hi {
            return Ink { lo: 0, hi: 0 };
        }
        Ink { lo, hi }
    }
    fn check(&self) {
        assert!(
            self.ks >= 1 && self.ks <= self.img,
            "conv: kernel {} for image {}",
            self.ks,
            self.img
        );
    }
}

/// The span of one image slot's nonzero floats in the taps' reads (see [`Wide::ink`]): outside
/// `[lo, hi)` every read is an exact zero, whose products the SIMD conv kernels skip. With a
/// bias-free network, MNIST's blank top and bottom rows make about a ninth of the conv's and
/// of its kernel gradient's multiply-adds such products; the AVX2 kernel gradient also skips,
/// per tap group, the 8-position blocks whose reads are all zero (with the rows, 29 % of it on
/// MNIST). The AVX-512 kernels skip by rows only, in their coarser tiles (80 positions for the
/// conv, 16-position blocks for its kernel gradient): 5.8 % of a training step on MNIST.
/// Skipping them changes no sum that has a nonzero term (adding `±0` to it is exact); for
/// finite weights it changes nothing at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ink {
    lo: usize,
    hi: usize,
}

impl Ink {
    /// `[lo, hi)`: outside it every window float is zero (empty when lo ≥ hi).
    pub(crate) fn range(self) -> (usize, usize) {
        (self.lo, self.hi)
    }
    /// Tap rows `i` (half-open, `< ks`) whose reads for positions `q0..q0 + len` may be nonzero:
    /// `q0 + i·conv < hi` and `q0 + len + i·conv > lo`.
    fn tap_rows(self, q0: usize, len: usize, conv: usize, ks: usize) -> (usize, usize) {
        if self.lo >= self.hi || self.hi <= q0 {
            return (0, 0);
        }
        let ihi = (self.hi - q0).div_ceil(conv).min(ks);
        let ilo = (self.lo + 1).saturating_sub(q0 + len).div_ceil(conv);
        (ilo.min(ihi), ihi)
    }
    /// Positions `q` (half-open, multiples of `step`, within `wq`) at which some tap row
    /// `i ∈ [imin, imax]` may read a nonzero: `lo ≤ q + i·conv < hi`.
    fn span(self, imin: usize, imax: usize, conv: usize, wq: usize, step: usize) -> (usize, usize) {
        if self.lo >= self.hi || self.hi <= imin * conv {
            return (0, 0);
        }
        let end = (self.hi - imin * conv).next_multiple_of(step).min(wq);
        let start = (self.lo.saturating_sub(imax * conv) / step * step).min(end);
        (start, end)
    }
}

/// The shares of the conv's and of its kernel gradient's multiply-adds (`wq` positions × `ks²`
/// taps per map) that backend `be` skips as exact zeros for `slot`, whose ink is `ink`:
/// (forward, kernel gradient). The AVX2 kernels skip by tap-group masks and block pairs, the
/// AVX-512 ones by the ink's rows alone (per tile of `avx512::CONV_NV` vectors and per tap
/// tile); the plain loops skip nothing (both 0).
///
/// # Panics
/// If `slot` is shorter than [`Wide::slot`].
pub fn skipped_share(be: Backend, w: Wide, slot: &[f32], ink: Ink) -> (f64, f64) {
    let slot = &slot[..w.slot()];
    let (kk, wq, conv, ks) = (w.ks * w.ks, w.wq(), w.conv(), w.ks);
    #[cfg(target_arch = "x86_64")]
    if be.resolve() == Backend::Avx512 && kk <= MAX_TAPS {
        // The tiles of `avx512::conv_fwd` and `avx512::conv_dk`, and the taps each skips.
        let (mut fwd, mut dk) = (0, 0);
        let nvt = wq / 16;
        for v0 in (0..nvt).step_by(avx512::CONV_NV) {
            let nv = (nvt - v0).min(avx512::CONV_NV);
            let (ilo, ihi) = ink.tap_rows(16 * v0, 16 * nv, conv, ks);
            fwd += (kk - (ihi - ilo) * ks) * 16 * nv;
        }
        for p in (0..kk).step_by(avx512::DK_NR) {
            let nr = (kk - p).min(avx512::DK_NR);
            let (a, b) = ink.span(p / ks, (p + nr - 1) / ks, conv, wq, 16);
            dk += (wq - (b - a)) * nr;
        }
        let all = (kk * wq) as f64;
        return (fwd as f64 / all, dk as f64 / all);
    }
    #[cfg(target_arch = "x86_64")]
    if be.resolve() == Backend::Avx2 && kk <= MAX_TAPS {
        let offs = w.offsets();
        // SAFETY: `resolve` detected AVX2; every tap's reads `off(p) + q`, q < wq, lie in the
        // slot (the definition of `slot`), whose length was checked above.
        return unsafe {
            avx2::skipped_share(slot, &offs[..w.ks * w.ks], ink, (w.conv(), w.ks), w.wq())
        };
    }
    let _ = (be, w, slot, ink);
    (0.0, 0.0)
}

/// The SIMD forward convolutions' shared signature (`avx512::conv_fwd`, `avx2::conv_fwd`).
#[cfg(target_arch = "x86_64")]
type ConvFwd = unsafe fn(
    usize,
    usize,
    *const f32,
    &[f32],
    bool,
    *const f32,
    &[usize],
    Ink,
    (usize, usize),
    usize,
    *mut f32,
);

/// Forward convolution (cross-correlation) of `m` images in the wide layout:
/// `out[e][n][q] = Σ_p k[n][p] · x[e·slot + q + off(p)]` for `q < wq`, `k` (n_k, ks²).
/// `x` holds `m` slots of [`Wide::slot`] floats; `out` is (m, n_k, wq).
///
/// # Panics
/// If a slice is too short.
pub fn conv_wide(w: Wide, k: &[f32], n_k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    conv_wide_fused(w, k, &[], false, n_k, x, m, out)
}

/// [`conv_wide`] with its epilogue fused in: `out = act(x ⋆ k + bias)` where `bias` (n_k) may be
/// empty (no bias) and `act` is ReLU when `relu`, else the identity. Saves a pass over the maps.
///
/// # Panics
/// If a slice is too short, or `bias` is neither empty nor n_k long.
#[allow(clippy::too_many_arguments)]
pub fn conv_wide_fused(
    w: Wide,
    k: &[f32],
    bias: &[f32],
    relu: bool,
    n_k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    conv_wide_fused_on(backend(), w, k, bias, relu, n_k, x, None, m, out)
}

/// [`conv_wide_fused`] on a chosen backend, with each slot's [`Ink`] as [`Wide::fill`] returned
/// it (`inks[e]` for slot `e`; `None`: found by [`Wide::ink`]). An ink narrower than its slot's
/// nonzeros gives wrong sums (the products it leaves out are not zero).
///
/// # Panics
/// As [`conv_wide_fused`], or if `inks` has fewer than `m` entries.
#[allow(clippy::too_many_arguments)]
pub fn conv_wide_fused_on(
    be: Backend,
    w: Wide,
    k: &[f32],
    bias: &[f32],
    relu: bool,
    n_k: usize,
    x: &[f32],
    inks: Option<&[Ink]>,
    m: usize,
    out: &mut [f32],
) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    w.check();
    assert!(
        bias.is_empty() || bias.len() == n_k,
        "conv: {} biases for {n_k} kernels",
        bias.len()
    );
    let (kk, wq, xs) = (w.ks * w.ks, w.wq(), w.slot());
    assert!(k.len() >= n_k * kk, "conv: k too short");
    assert!(
        x.len() >= m * xs,
        "conv: x has {} floats, needs {}",
        x.len(),
        m * xs
    );
    assert!(out.len() >= m * n_k * wq, "conv: out too short");
    assert!(inks.is_none_or(|v| v.len() >= m), "conv: too few inks");
    #[cfg(target_arch = "x86_64")]
    if be != Backend::Portable && kk <= MAX_TAPS {
        let offs = w.offsets();
        let offs = &offs[..kk];
        for e in 0..m {
            let (xp, op) = (x[e * xs..].as_ptr(), out[e * n_k * wq..].as_mut_ptr());
            // SAFETY: `resolve` detected the backend's features (AVX-512F, or AVX2 and FMA).
            // Reads: k[n·kk + p] (n < n_k, p < kk), and x[e·xs + q + off(p)] for q < wq, which
            // is < e·xs + xs by the definition of `slot` and within x by the assertion. Writes:
            // out[(e·n_k + n)·wq + q], q < wq, within out. wq is a multiple of 16 (and of 8).
            unsafe {
                let ink = inks.map_or_else(|| w.ink(&x[e * xs..(e + 1) * xs]), |v| v[e]);
                let shape = (w.conv(), w.ks);
                let conv_fwd: ConvFwd = if be == Backend::Avx512 {
                    avx512::conv_fwd
                } else {
                    avx2::conv_fwd
                };
                conv_fwd(
                    n_k,
                    kk,
                    k.as_ptr(),
                    bias,
                    relu,
                    xp,
                    offs,
                    ink,
                    shape,
                    wq,
                    op,
                )
            };
        }
        return;
    }
    conv_wide_fused_naive(w, k, bias, relu, n_k, x, m, out);
}

/// The plain-loop [`conv_wide`].
pub fn conv_wide_naive(w: Wide, k: &[f32], n_k: usize, x: &[f32], m: usize, out: &mut [f32]) {
    conv_wide_fused_naive(w, k, &[], false, n_k, x, m, out)
}

/// The plain-loop [`conv_wide_fused`], also the fallback.
#[allow(clippy::too_many_arguments)]
pub fn conv_wide_fused_naive(
    w: Wide,
    k: &[f32],
    bias: &[f32],
    relu: bool,
    n_k: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let (kk, wq, xs) = (w.ks * w.ks, w.wq(), w.slot());
    for e in 0..m {
        for n in 0..n_k {
            for q in 0..wq {
                let s: f32 = (0..kk)
                    .map(|p| k[n * kk + p] * x[e * xs + q + w.off(p)])
                    .sum::<f32>()
                    + bias.get(n).copied().unwrap_or(0.0);
                out[(e * n_k + n) * wq + q] = if relu { s.max(0.0) } else { s };
            }
        }
    }
}

/// Kernel gradient in the wide layout, summed over `m` images:
/// `dk[n][p] = Σ_e Σ_q dz[e][n][q] · x[e·slot + q + off(p)]`, `dz` (m, n_k, wq) with zeros at the
/// junk positions, `dk` (n_k, ks²) overwritten.
///
/// # Panics
/// If a slice is too short.
pub fn conv_wide_dk(w: Wide, dz: &[f32], n_k: usize, x: &[f32], m: usize, dk: &mut [f32]) {
    conv_wide_dk_on(dk_backend(), w, dz, n_k, x, None, m, dk)
}

/// [`conv_wide_dk`] on a chosen backend, with the slots' inks as in [`conv_wide_fused_on`].
///
/// # Panics
/// As [`conv_wide_dk`], or if `inks` has fewer than `m` entries.
#[allow(clippy::too_many_arguments)]
pub fn conv_wide_dk_on(
    be: Backend,
    w: Wide,
    dz: &[f32],
    n_k: usize,
    x: &[f32],
    inks: Option<&[Ink]>,
    m: usize,
    dk: &mut [f32],
) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    w.check();
    let (kk, wq, xs) = (w.ks * w.ks, w.wq(), w.slot());
    assert!(dz.len() >= m * n_k * wq, "conv dk: dz too short");
    assert!(x.len() >= m * xs, "conv dk: x too short");
    assert!(dk.len() >= n_k * kk, "conv dk: dk too short");
    assert!(inks.is_none_or(|v| v.len() >= m), "conv dk: too few inks");
    #[cfg(target_arch = "x86_64")]
    if be != Backend::Portable && kk <= MAX_TAPS {
        let offs = w.offsets();
        let offs = &offs[..kk];
        let (dzp, xp, dkp) = (dz.as_ptr(), x.as_ptr(), dk.as_mut_ptr());
        // SAFETY: `resolve` detected the backend's features (AVX-512F, or AVX2 and FMA), and
        // `has_avx512vl` the 32-register variant's. Reads dz[(e·n_k + n)·wq + q] and
        // x[e·xs + q + off(p)] for e < m, n < n_k, q < wq, p < kk, all within the slices
        // (assertions above and the definition of `slot`); writes dk[n·kk + p], within dk.
        unsafe {
            let ink = |e: usize| inks.map_or_else(|| w.ink(&x[e * xs..(e + 1) * xs]), |v| v[e]);
            let shape = (w.conv(), w.ks);
            if be == Backend::Avx512 {
                avx512::conv_dk(n_k, kk, dzp, xp, xs, m, offs, &ink, shape, wq, dkp)
            } else if has_avx512vl() {
                // The AVX2 kernel with AVX-512VL's 32 ymm registers: wider tiles, same bits.
                avx2::conv_dk::<avx2::Ymm32>(n_k, kk, dzp, xp, xs, m, offs, &ink, shape, wq, dkp)
            } else {
                avx2::conv_dk::<avx2::Ymm16>(n_k, kk, dzp, xp, xs, m, offs, &ink, shape, wq, dkp)
            }
        };
        return;
    }
    conv_wide_dk_naive(w, dz, n_k, x, m, dk);
}

/// The plain-loop [`conv_wide_dk`], also the fallback.
pub fn conv_wide_dk_naive(w: Wide, dz: &[f32], n_k: usize, x: &[f32], m: usize, dk: &mut [f32]) {
    let (kk, wq, xs) = (w.ks * w.ks, w.wq(), w.slot());
    for n in 0..n_k {
        for p in 0..kk {
            let mut s = 0.0f32;
            for e in 0..m {
                for q in 0..wq {
                    s += dz[(e * n_k + n) * wq + q] * x[e * xs + q + w.off(p)];
                }
            }
            dk[n * kk + p] = s;
        }
    }
}

/// `dst[i] = src[i] / 255` (as `f32::from(src[i]) * (1/255)`), the batch's pixels.
///
/// # Panics
/// If `dst` is shorter than `src`.
pub fn pixels_to_f32(src: &[u8], dst: &mut [f32]) {
    pixels_to_f32_on(backend(), src, dst)
}

/// [`pixels_to_f32`] on a chosen backend (the result is the same on every one).
///
/// # Panics
/// If `dst` is shorter than `src`.
pub fn pixels_to_f32_on(be: Backend, src: &[u8], dst: &mut [f32]) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    assert!(dst.len() >= src.len(), "pixels: dst too short");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        done = src.len() / 8 * 8;
        // SAFETY: AVX2 was detected; reads src[..done] and writes dst[..done], done ≤ both lengths.
        unsafe { avx2::pixels(src.as_ptr(), dst.as_mut_ptr(), done / 8) };
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx512 {
        done = src.len() / 16 * 16;
        // SAFETY: AVX-512F was detected; reads src[..done] and writes dst[..done], done ≤ both lengths.
        unsafe { avx512::pixels(src.as_ptr(), dst.as_mut_ptr(), done / 16) };
    }
    for (d, &s) in dst[done..src.len()].iter_mut().zip(&src[done..]) {
        *d = f32::from(s) * (1.0 / 255.0);
    }
}

/// ReLU in place: `v = max(v, 0)`.
pub fn relu_in_place(v: &mut [f32]) {
    relu_in_place_on(backend(), v)
}

/// [`relu_in_place`] on a chosen backend (the result is the same on every one).
pub fn relu_in_place_on(be: Backend, v: &mut [f32]) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        done = v.len() / 8 * 8;
        // SAFETY: AVX2 was detected; reads and writes v[..done].
        unsafe { avx2::relu(v.as_mut_ptr(), done / 8) };
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx512 {
        done = v.len() / 16 * 16;
        // SAFETY: AVX-512F was detected; reads and writes v[..done].
        unsafe { avx512::relu(v.as_mut_ptr(), done / 16) };
    }
    for x in &mut v[done..] {
        *x = x.max(0.0);
    }
}

/// 2×2 mean pooling of one map in the wide layout (`map`: rows of stride `img`, `2·pooled`
/// valid columns each), into `out` (pooled, pooled):
/// `out[r][c] = ((a0 + b0) + (a1 + b1)) · ¼` with `a`, `b` the window's top and bottom pairs.
///
/// # Panics
/// If a slice is too short.
pub fn mean_pool2(map: &[f32], img: usize, pooled: usize, out: &mut [f32]) {
    mean_pool2_on(backend(), map, img, pooled, out)
}

/// [`mean_pool2`] on a chosen backend (the result is the same on every one).
///
/// # Panics
/// If a slice is too short.
pub fn mean_pool2_on(be: Backend, map: &[f32], img: usize, pooled: usize, out: &mut [f32]) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    assert!(
        2 * pooled <= img,
        "pool: {pooled} pooled columns do not fit rows of {img}"
    );
    assert!(
        pooled == 0 || map.len() >= (2 * pooled - 1) * img + 2 * pooled,
        "pool: map too short"
    );
    assert!(out.len() >= pooled * pooled, "pool: out too short");
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        // SAFETY: AVX2 was detected; reads map rows 0..2·pooled, columns 0..2·pooled (within
        // the length checked above) and writes out[..pooled²].
        unsafe { avx2::mean_pool2(map.as_ptr(), img, pooled, out.as_mut_ptr()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx512 && pooled <= 16 {
        // SAFETY: AVX-512F was detected; reads map rows 0..2·pooled, columns 0..2·pooled (masked
        // loads, within the length checked above) and writes out[..pooled²] (masked stores).
        unsafe { avx512::mean_pool2(map.as_ptr(), img, pooled, out.as_mut_ptr()) };
        return;
    }
    for r in 0..pooled {
        for c in 0..pooled {
            let (a, b) = (
                &map[2 * r * img + 2 * c..],
                &map[(2 * r + 1) * img + 2 * c..],
            );
            out[r * pooled + c] = ((a[0] + b[0]) + (a[1] + b[1])) * 0.25;
        }
    }
}

/// Backward of [`mean_pool2`] through a ReLU: `dz[r][c] = g[r/2][c/2] · ¼` where `y[r][c] > 0`,
/// else 0, for the `2·pooled` valid rows and columns of a wide-layout map (stride `img`).
///
/// # Panics
/// If a slice is too short.
pub fn mean_repool2_relu(g: &[f32], y: &[f32], img: usize, pooled: usize, dz: &mut [f32]) {
    mean_repool2_relu_on(backend(), g, y, img, pooled, dz)
}

/// [`mean_repool2_relu`] on a chosen backend (the result is the same on every one).
///
/// # Panics
/// If a slice is too short.
pub fn mean_repool2_relu_on(
    be: Backend,
    g: &[f32],
    y: &[f32],
    img: usize,
    pooled: usize,
    dz: &mut [f32],
) {
    // The backend that runs: one this CPU lacks is `Portable`.
    let be = be.resolve();
    let conv = 2 * pooled;
    assert!(
        conv <= img,
        "repool: {pooled} pooled columns do not fit rows of {img}"
    );
    assert!(g.len() >= pooled * pooled, "repool: g too short");
    assert!(
        pooled == 0 || (y.len().min(dz.len()) >= (conv - 1) * img + conv),
        "repool: map too short"
    );
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx2 {
        // SAFETY: AVX2 was detected; reads g[..pooled²] and y rows 0..conv, columns 0..conv,
        // writes the same positions of dz, all within the lengths checked above.
        unsafe { avx2::mean_repool2_relu(g.as_ptr(), y.as_ptr(), img, pooled, dz.as_mut_ptr()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx512 && pooled <= 16 {
        // SAFETY: AVX-512F was detected; reads g[..pooled²] and y rows 0..conv, columns 0..conv,
        // writes the same positions of dz, all within the lengths checked above (masked tails).
        unsafe { avx512::mean_repool2_relu(g.as_ptr(), y.as_ptr(), img, pooled, dz.as_mut_ptr()) };
        return;
    }
    for r in 0..conv {
        for c in 0..conv {
            let v = g[(r / 2) * pooled + c / 2] * 0.25;
            dz[r * img + c] = if y[r * img + c] > 0.0 { v } else { 0.0 };
        }
    }
}

/// Asks the cache for every 64-byte line of `data` (a hint: nothing is read into registers, and
/// nothing happens on targets without a prefetch instruction). The training loop's images lie
/// at random in tens of megabytes; fetching a batch's images ahead hides their memory latency.
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks((64 / std::mem::size_of::<T>().max(1)).max(1)) {
        // SAFETY: a prefetch is a hint that never faults and writes nothing; the address is
        // inside `data` anyway. SSE, which has it, is part of every x86_64 CPU.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks for every 64-byte line of `data` with intent to write (PREFETCHW): a line that another
/// core holds is taken from it now, while the caller computes, rather than when it is stored to.
pub fn prefetch_write<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks((64 / std::mem::size_of::<T>().max(1)).max(1)) {
        // SAFETY: a prefetch is a hint that never faults and writes nothing; CPUs without
        // PREFETCHW run its opcode (0F 0D /1) as a no-op.
        unsafe {
            std::arch::asm!(
                "prefetchw [{}]",
                in(reg) line.as_ptr(),
                options(nostack, preserves_flags, readonly)
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// A register-only loop of independent FMAs (`iters` rounds of one vector per register), to measure the
/// arithmetic ceiling; returns the FLOPs it did (2 per multiply-add, per lane).
pub fn fma_loop(iters: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if backend() == Backend::Avx512 {
        // SAFETY: AVX-512F was detected; the loop touches no memory.
        let s = unsafe { avx512::fma_loop(iters) };
        std::hint::black_box(s);
        return (iters * 16 * 16 * 2) as f64;
    }
    #[cfg(target_arch = "x86_64")]
    if backend() == Backend::Avx2 {
        // SAFETY: AVX2 and FMA were detected; the loop touches no memory.
        let s = unsafe { avx2::fma_loop(iters) };
        std::hint::black_box(s);
        return (iters * avx2::FMA_LOOP_VECTORS * 8 * 2) as f64;
    }
    let mut acc = [0.0f32; 64];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(1.000_000_1, 0.999_999_9);
        }
    }
    std::hint::black_box(acc);
    (iters * 64 * 2) as f64
}

/// The reference for [`gemm_nn`]: plain loops, summing over `p` in order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_naive(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
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
pub fn gemm_nt_naive(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    acc: bool,
) {
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
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F micro-kernels. Callers guarantee the CPU has AVX-512F and that all indices are in
    //! bounds (checked in the safe wrappers above).
    // Register tiles are indexed by constant loop counters that unroll; iterators would hide that.
    #![allow(clippy::needless_range_loop)]
    use std::arch::x86_64::*;

    /// Rows of C per `nn` tile (one broadcast of A each) and 16-lane vectors of C per row:
    /// 8 × 3 = 24 accumulators, so that a chunk's 8 images are one row tile (B's rows loaded
    /// once, not for a tile of 6 and again for one of 2). `∂L/∂y⁽⁻²⁾` of 8 images 20.0 against
    /// 23.2 µs, `∂J/∂w⁽⁻¹⁾` of a batch 270 against 298 µs, against 6 × 4.
    const NN_MR: usize = 8;
    const NN_NV: usize = 3;
    /// Depth of one pass over k: B's `NN_KC × 48` panel stays in L1 while every row tile uses it.
    const NN_KC: usize = 128;
    /// Rows of A and of B per `nt` tile: 4×6 = 24 dot products at once, 4 + 6 loads a step
    /// (hidden layer of a chunk 26.7 against 28.0 µs for 4×4, medians of 6).
    const NT_MR: usize = 4;
    const NT_NR: usize = 6;
    /// Depth of one pass of `nt`: a chunk's 8 rows of `y⁽⁻²⁾` over 1024 inputs are 32 KB, in
    /// L1 while `w⁽⁻¹⁾` passes (hidden layer of a chunk 25.9 against 27.2 µs unblocked, 27.8 with
    /// 512, medians of 5).
    const NT_KC: usize = 1024;
    /// 16-lane vectors of positions per conv tile (5 rows of 5 kernels: 25 accumulators).
    pub(super) const CONV_NV: usize = 5;
    /// Maps and taps per kernel-gradient tile: 5 × 5 = 25 accumulators, 5 + 5 loads each
    /// step (a chunk's kernel gradient 39.7 against 43.8 µs for 5 × 4, medians of 5 and 8;
    /// 4 × 6 ran as 5 × 5).
    pub(super) const DK_MR: usize = 5;
    pub(super) const DK_NR: usize = 5;

    /// Lanes `0..w` of a 16-lane vector.
    #[inline(always)]
    fn mask(w: usize) -> __mmask16 {
        if w >= 16 {
            0xffff
        } else {
            ((1u32 << w) - 1) as __mmask16
        }
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
        pf: bool,
    ) {
        let mut t = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..k {
            // SAFETY (all pointer arithmetic below): within the tile's bounds, per the contract.
            unsafe {
                let brow = b.add(p * ldb);
                // The same row of the next column tile (NN_NV lines), fetched ahead by the
                // first row tile: B's rows lie `ldb` apart, too many streams for the hardware
                // prefetcher (a hint; it never faults).
                if pf {
                    for l in 0..NN_NV {
                        let ahead = brow.wrapping_add(16 * NN_NV + 16 * l);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
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
                    let r = if acc {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), t[i][v])
                    } else {
                        t[i][v]
                    };
                    _mm512_mask_storeu_ps(dst, m, r);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F present and every index in bounds (see `gemm_nn`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn nn(
        m: usize,
        n: usize,
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
                let w = (n - j).min(NN_NV * 16);
                let nv = w.div_ceil(16);
                let last = mask(w - 16 * (nv - 1));
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(NN_MR);
                    // SAFETY: the tile covers rows i..i+mr < m, columns j..j+w ≤ n and depth
                    // p0..p0+kc ≤ k, all in bounds.
                    unsafe {
                        let (ap, bp, cp) = (
                            a.add(i * ars + p0 * acs),
                            b.add(p0 * ldb + j),
                            c.add(i * ldc + j),
                        );
                        macro_rules! go {
                            ($($mr:literal),*) => {
                                match (mr, nv) {
                                    $(
                                        ($mr, 1) => nn_tile::<$mr, 1>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                        ($mr, 2) => nn_tile::<$mr, 2>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                        ($mr, 3) => nn_tile::<$mr, 3>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                        ($mr, 4) => nn_tile::<$mr, 4>(kc, ap, ars, acs, bp, ldb, cp, ldc, last, acc, i == 0),
                                    )*
                                    _ => unreachable!("tile {mr}×{nv}"),
                                }
                            };
                        }
                        go!(1, 2, 3, 4, 5, 6, 7, 8);
                    }
                    i += mr;
                }
                j += w;
            }
            p0 += kc;
        }
    }

    /// One `MR × NV·16` tile of the wide conv: rows n of `k` (broadcast), positions q..q+16·NV
    /// of `x` shifted by each tap's offset.
    ///
    /// # Safety
    /// AVX-512F present; k rows i < MR hold kk floats at k + i·kk; x + off[p] + 16·NV floats are
    /// readable for every p; out rows i at out + i·wq hold 16·NV writable floats.
    #[target_feature(enable = "avx512f")]
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
        let mut t = [[_mm512_setzero_ps(); NV]; MR];
        for (p, &off) in offs.iter().enumerate().take(kk) {
            // SAFETY: per the contract.
            unsafe {
                let src = x.add(off);
                let mut bv = [_mm512_setzero_ps(); NV];
                for v in 0..NV {
                    bv[v] = _mm512_loadu_ps(src.add(16 * v));
                }
                for i in 0..MR {
                    let av = _mm512_set1_ps(*k.add(i * kk + p));
                    for v in 0..NV {
                        t[i][v] = _mm512_fmadd_ps(av, bv[v], t[i][v]);
                    }
                }
            }
        }
        for i in 0..MR {
            let b = _mm512_set1_ps(bias.get(i).copied().unwrap_or(0.0));
            for v in 0..NV {
                let mut r = _mm512_add_ps(t[i][v], b);
                if relu {
                    r = _mm512_max_ps(r, _mm512_setzero_ps());
                }
                // SAFETY: per the contract.
                unsafe { _mm512_storeu_ps(out.add(i * wq + 16 * v), r) };
            }
        }
    }

    /// The taps of a tile run over the tap rows whose reads may be nonzero (`ink`, for `shape`
    /// = (conv, ks), tap `p = i·ks + j` at offset `off[p]`); the others would add exact zeros.
    ///
    /// # Safety
    /// AVX-512F present; `k` (n_k, kk), `x` readable at every q + off[p] (q < wq), `out` (n_k, wq)
    /// writable; wq a multiple of 16; kk = ks².
    #[target_feature(enable = "avx512f")]
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
        let nvt = wq / 16;
        let mut v0 = 0;
        while v0 < nvt {
            let nv = (nvt - v0).min(CONV_NV);
            let (ilo, ihi) = ink.tap_rows(16 * v0, 16 * nv, conv, ks);
            let (plo, phi) = (ilo * ks, ihi * ks);
            let offs = &offs[plo..phi];
            let mut i = 0;
            while i < n_k {
                // 5×5 = 25 accumulators of 32 registers: five rows fit 20 kernels exactly, and
                // five vectors 560 wide positions (35 vectors) exactly.
                let mr = (n_k - i).min(5);
                // SAFETY: rows i..i+mr < n_k, positions 16·v0 .. 16·(v0+nv) ≤ wq.
                unsafe {
                    let (kp, xp, op) = (
                        k.add(i * kk + plo),
                        x.add(16 * v0),
                        out.add(i * wq + 16 * v0),
                    );
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
                                )*
                                _ => unreachable!("tile {mr}×{nv}"),
                            }
                        };
                    }
                    go!(1, 2, 3, 4, 5);
                }
                i += mr;
            }
            v0 += nv;
        }
    }

    /// One `MR × NR` tile of the kernel gradient: MR maps of dz against NR shifted copies of x,
    /// summed over all m images and, per image e, the positions `spans[e]` (outside which every
    /// product of the tile is an exact zero), reduced across lanes once at the end.
    ///
    /// # Safety
    /// AVX-512F present; dz rows (e·n_k + i)·wq .. +wq and x at e·xs + off[p] .. +wq readable for
    /// e < m, i < MR, p in the tile; dk + i·kk + p writable; each span within 0..wq in
    /// multiples of 16.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dk_tile<const MR: usize, const NR: usize>(
        n_k: usize,
        kk: usize,
        dz: *const f32,
        x: *const f32,
        xs: usize,
        m: usize,
        offs: &[usize],
        wq: usize,
        spans: &[(usize, usize)],
        dk: *mut f32,
        add: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        // SAFETY: per the contract.
        unsafe { dk_images::<MR, NR>(dz, x, (n_k * wq, xs), offs, wq, &spans[..m], &mut acc) };
        // SAFETY: per the contract (taps p..p + NR of maps i < MR).
        unsafe { store_lane_sums(&acc, dk, kk, add) };
    }

    /// Writes the lane sums of a tile's accumulators, `Σ t[i][j]` at `dst + i·ld + j`, or adds
    /// them there when `add`: four neighbours at a time by one transposing tree, the rest one
    /// by one.
    ///
    /// # Safety
    /// AVX-512F present; `dst + i·ld + j` readable and writable for i < MR, j < NR.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store_lane_sums<const MR: usize, const NR: usize>(
        t: &[[__m512; NR]; MR],
        dst: *mut f32,
        ld: usize,
        add: bool,
    ) {
        for i in 0..MR {
            let mut j0 = 0;
            while j0 + 4 <= NR {
                let s = lane_sums4(t[i][j0], t[i][j0 + 1], t[i][j0 + 2], t[i][j0 + 3]);
                // SAFETY: per the contract (j0..j0 + 4 of row i).
                unsafe {
                    let d = dst.add(i * ld + j0);
                    let s = if add {
                        _mm_add_ps(_mm_loadu_ps(d), s)
                    } else {
                        s
                    };
                    _mm_storeu_ps(d, s);
                }
                j0 += 4;
            }
            for j in j0..NR {
                let s = _mm512_reduce_add_ps(t[i][j]);
                // SAFETY: per the contract.
                unsafe {
                    let d = dst.add(i * ld + j);
                    *d = if add { *d + s } else { s };
                }
            }
        }
    }

    /// The lane sums of four vectors, `[Σa, Σb, Σc, Σd]`: a transposing tree (8 shuffles and 5
    /// adds) instead of four reductions of one vector each (16 and 16).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn lane_sums4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        // Per 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Per block: [Σa, Σb, Σc, Σd] over the block's four lanes.
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let q = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
        );
        // The four blocks summed.
        let h = _mm256_add_ps(
            _mm512_castps512_ps256(q),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(q))),
        );
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    /// The images' share of a `dk_tile`: the accumulators come in and go out through memory
    /// once, and live in registers over each image e's positions `spans[e]`; image e's maps
    /// start at dz + e·dzs, its slot at x + e·xs.
    ///
    /// # Safety
    /// AVX-512F present; for each image, dz rows i·wq .. +wq (i < MR) and x + offs[j] .. +wq
    /// (j < NR) readable; each span q0 ≤ q1 ≤ wq, multiples of 16.
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn dk_images<const MR: usize, const NR: usize>(
        dz: *const f32,
        x: *const f32,
        (dzs, xs): (usize, usize),
        offs: &[usize],
        wq: usize,
        spans: &[(usize, usize)],
        acc: &mut [[__m512; NR]; MR],
    ) {
        let mut t = *acc;
        for (e, &(q0, q1)) in spans.iter().enumerate() {
            debug_assert!(q0 <= q1 && q1 <= wq && q0 % 16 == 0 && q1 % 16 == 0);
            // SAFETY: per the contract.
            let (dz, x) = unsafe { (dz.add(e * dzs), x.add(e * xs)) };
            let mut xp = [x; NR];
            for j in 0..NR {
                // SAFETY: per the contract.
                xp[j] = unsafe { x.add(offs[j]) };
            }
            let mut q = q0;
            while q < q1 {
                // SAFETY: per the contract.
                unsafe {
                    let mut xv = [_mm512_setzero_ps(); NR];
                    for j in 0..NR {
                        xv[j] = _mm512_loadu_ps(xp[j].add(q));
                    }
                    for i in 0..MR {
                        let dv = _mm512_loadu_ps(dz.add(i * wq + q));
                        for j in 0..NR {
                            t[i][j] = _mm512_fmadd_ps(dv, xv[j], t[i][j]);
                        }
                    }
                }
                q += 16;
            }
        }
        *acc = t;
    }

    /// Each image's positions run over the span where the tile's taps may read a nonzero
    /// (`ink(e)` for image e, `shape` = (conv, ks), tap `p = i·ks + j`).
    ///
    /// # Safety
    /// As `dk_tile`, for all n < n_k and p < kk; wq a multiple of 16; kk = ks².
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conv_dk(
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
        // DK_IMAGES images at a time (their maps stay in L1 while every tap tile reads them),
        // map tiles outer; the group's sums are reduced across lanes once and added to dk.
        const DK_IMAGES: usize = 2;
        for e in (0..m).step_by(DK_IMAGES) {
            let me = DK_IMAGES.min(m - e);
            let (dz, x, add) = (
                unsafe { dz.add(e * n_k * wq) },
                unsafe { x.add(e * xs) },
                e > 0,
            );
            let mut inks = [ink(e); DK_IMAGES];
            for (d, v) in inks.iter_mut().enumerate().take(me).skip(1) {
                *v = ink(e + d);
            }
            let mut i = 0;
            while i < n_k {
                let mr = (n_k - i).min(DK_MR);
                let mut p = 0;
                while p < kk {
                    let nr = (kk - p).min(DK_NR);
                    let mut spans = [(0, 0); DK_IMAGES];
                    for (sp, ink) in spans.iter_mut().zip(&inks).take(me) {
                        *sp = ink.span(p / ks, (p + nr - 1) / ks, conv, wq, 16);
                    }
                    let spans = &spans[..me];
                    // SAFETY: maps i..i+mr < n_k and taps p..p+nr ≤ kk of images e..e+me are in
                    // bounds; each span lies within 0..wq in multiples of 16.
                    unsafe {
                        let (dzp, dkp, o) = (dz.add(i * wq), dk.add(i * kk + p), &offs[p..p + nr]);
                        macro_rules! go {
                            ($($mr:literal),*) => {
                                match (mr, nr) {
                                    $(
                                        ($mr, 1) => dk_tile::<$mr, 1>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                        ($mr, 2) => dk_tile::<$mr, 2>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                        ($mr, 3) => dk_tile::<$mr, 3>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                        ($mr, 4) => dk_tile::<$mr, 4>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                        ($mr, 5) => dk_tile::<$mr, 5>(n_k, kk, dzp, x, xs, me, o, wq, spans, dkp, add),
                                    )*
                                    _ => unreachable!("tile {mr}×{nr}"),
                                }
                            };
                        }
                        go!(1, 2, 3, 4, 5);
                    }
                    p += nr;
                }
                i += mr;
            }
        }
    }

    /// The `ks` column-shifted f32 copies of one u8 image (see `Wide::fill`).
    ///
    /// # Safety
    /// AVX-512F, BW and VL present, `conv ≤ 32`; bounds as checked in `Wide::fill`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn fill_shifted(x: *const u8, img: usize, ks: usize, conv: usize, out: *mut f32) {
        let scale = _mm512_set1_ps(1.0 / 255.0);
        let (m0, m1) = (mask(conv.min(16)), mask(conv.saturating_sub(16)));
        let js = img * conv;
        for j in 0..ks {
            for rr in 0..img {
                // SAFETY: per the contract; masked lanes are neither read nor written.
                unsafe {
                    let src = x.add(rr * img + j);
                    let dst = out.add(j * js + rr * conv);
                    let b0 = _mm_maskz_loadu_epi8(m0, src as *const i8);
                    let v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b0)), scale);
                    _mm512_mask_storeu_ps(dst, m0, v0);
                    if m1 != 0 {
                        let b1 = _mm_maskz_loadu_epi8(m1, src.add(16) as *const i8);
                        let v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b1)), scale);
                        _mm512_mask_storeu_ps(dst.add(16), m1, v1);
                    }
                }
            }
        }
    }

    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_loop(iters: usize) -> f32 {
        let mut t = [_mm512_setzero_ps(); 16];
        let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999_9));
        for _ in 0..iters {
            for v in t.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in t {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// # Safety
    /// AVX-512F present; `16·n` bytes readable at src and floats writable at dst.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pixels(src: *const u8, dst: *mut f32, n: usize) {
        let scale = _mm512_set1_ps(1.0 / 255.0);
        for i in 0..n {
            // SAFETY: per the contract.
            unsafe {
                let b = _mm_loadu_si128(src.add(16 * i) as *const __m128i);
                let v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
                _mm512_storeu_ps(dst.add(16 * i), _mm512_mul_ps(v, scale));
            }
        }
    }

    /// # Safety
    /// AVX-512F present; `16·n` floats readable and writable at v.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn relu(v: *mut f32, n: usize) {
        let zero = _mm512_setzero_ps();
        for i in 0..n {
            // SAFETY: per the contract. max(x, 0) returns 0 for NaN, as f32::max does.
            unsafe {
                _mm512_storeu_ps(
                    v.add(16 * i),
                    _mm512_max_ps(_mm512_loadu_ps(v.add(16 * i)), zero),
                )
            };
        }
    }

    /// # Safety
    /// AVX-512F present, `pooled ≤ 16`; map rows 0..2·pooled (stride img) readable for 2·pooled
    /// columns, out writable for pooled² floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn mean_pool2(map: *const f32, img: usize, pooled: usize, out: *mut f32) {
        let w = 2 * pooled;
        let (m_lo, m_hi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let quarter = _mm512_set1_ps(0.25);
        for r in 0..pooled {
            // SAFETY: per the contract; lanes past 2·pooled are masked off.
            unsafe {
                let (a, b) = (map.add(2 * r * img), map.add((2 * r + 1) * img));
                let lo = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m_lo, a),
                    _mm512_maskz_loadu_ps(m_lo, b),
                );
                let hi = _mm512_add_ps(
                    _mm512_maskz_loadu_ps(m_hi, a.add(16)),
                    _mm512_maskz_loadu_ps(m_hi, b.add(16)),
                );
                let s = _mm512_add_ps(
                    _mm512_permutex2var_ps(lo, even, hi),
                    _mm512_permutex2var_ps(lo, odd, hi),
                );
                _mm512_mask_storeu_ps(out.add(r * pooled), mask(pooled), _mm512_mul_ps(s, quarter));
            }
        }
    }

    /// # Safety
    /// AVX-512F present, `pooled ≤ 16`; g has pooled² floats; y and dz rows 0..2·pooled
    /// (stride img) hold 2·pooled floats.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn mean_repool2_relu(
        g: *const f32,
        y: *const f32,
        img: usize,
        pooled: usize,
        dz: *mut f32,
    ) {
        let w = 2 * pooled;
        let (m_lo, m_hi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let dup_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
        let (quarter, zero) = (_mm512_set1_ps(0.25), _mm512_setzero_ps());
        for r in 0..w {
            // SAFETY: per the contract; lanes past 2·pooled (and g's past pooled) are masked off.
            unsafe {
                let gv = _mm512_mul_ps(
                    _mm512_maskz_loadu_ps(mask(pooled), g.add((r / 2) * pooled)),
                    quarter,
                );
                let (yr, dr) = (y.add(r * img), dz.add(r * img));
                let pos_lo =
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_maskz_loadu_ps(m_lo, yr), zero);
                let pos_hi =
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_maskz_loadu_ps(m_hi, yr.add(16)), zero);
                _mm512_mask_storeu_ps(
                    dr,
                    m_lo,
                    _mm512_maskz_mov_ps(pos_lo, _mm512_permutexvar_ps(dup_lo, gv)),
                );
                _mm512_mask_storeu_ps(
                    dr.add(16),
                    m_hi,
                    _mm512_maskz_mov_ps(pos_hi, _mm512_permutexvar_ps(dup_hi, gv)),
                );
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
        // SAFETY: C's tile is in bounds, per the contract.
        unsafe { store_lane_sums(&t, c, ldc, acc) };
    }

    /// # Safety
    /// AVX-512F present and every index in bounds (see `gemm_nt`).
    #[target_feature(enable = "avx512f")]
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
        // Blocks of NT_KC along k, so that A's rows for the block stay in L1 while every
        // tile of B's rows passes; B's row tile outer: loaded once from L2 for all of A's
        // rows. Later blocks add to what the earlier ones stored.
        let mut p0 = 0;
        while p0 < k {
            let kc = (k - p0).min(NT_KC);
            let acc = acc || p0 > 0;
            let mut j = 0;
            while j < n {
                let nr = (n - j).min(NT_NR);
                let mut i = 0;
                while i < m {
                    let mr = (m - i).min(NT_MR);
                    // SAFETY: the tile covers rows i..i+mr < m of A and C, rows j..j+nr < n of B,
                    // depth p0..p0+kc ≤ k.
                    unsafe {
                        let (ap, bp, cp) =
                            (a.add(i * lda + p0), b.add(j * ldb + p0), c.add(i * ldc + j));
                        let k = kc;
                        macro_rules! go {
                        ($($mr:literal),*) => {
                            match (mr, nr) {
                                $(
                                    ($mr, 1) => nt_tile::<$mr, 1>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                    ($mr, 2) => nt_tile::<$mr, 2>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                    ($mr, 3) => nt_tile::<$mr, 3>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                    ($mr, 4) => nt_tile::<$mr, 4>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                    ($mr, 5) => nt_tile::<$mr, 5>(k, ap, lda, bp, ldb, cp, ldc, acc),
                                    ($mr, 6) => nt_tile::<$mr, 6>(k, ap, lda, bp, ldb, cp, ldc, acc),
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
            p0 += kc;
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
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{what}: element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn kernel_gradient_backend_is_the_backend_or_avx2_on_half_rate_avx512() {
        let (be, dk) = (backend(), dk_backend());
        assert_eq!(dk.resolve(), dk, "{dk:?} runs here");
        let asked_avx512 = kernels_asked().as_deref() == Some("avx512");
        if be == Backend::Avx512 && half_rate_avx512() && !asked_avx512 {
            assert_eq!(dk, Backend::Avx2);
        } else {
            assert_eq!(dk, be);
        }
        // Half-rate AVX-512 implies AVX-512.
        assert!(!half_rate_avx512() || has_avx512());
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (7, 33, 81),
        (20, 4000, 81),
        (13, 2000, 100),
        (100, 100, 2000),
        (6, 64, 5),
        (5, 17, 16),
        (3, 4, 0),
    ];

    /// Column blocks written by `gemm_nn_cols` hold the bits `gemm_nn` writes there, whatever
    /// the cuts, with the other columns untouched; `k = 0` clears only the block.
    #[test]
    fn nn_into_column_blocks_is_nn() {
        for &(m, n, k) in SHAPES {
            let (ars, acs) = (1, m + 2);
            let a = rand_vec((m + 3) * (k + 3), 1);
            let b = rand_vec(k.max(1) * n, 2);
            let c0 = rand_vec(m * n, 3);
            for acc in [false, true] {
                let mut want = c0.clone();
                gemm_nn(m, n, k, &a, ars, acs, &b, n, &mut want, n, acc);
                for cuts in [vec![], vec![n / 2], vec![16.min(n), n - n / 3]] {
                    let mut got = c0.clone();
                    let mut rest = ColsMut::new(&mut got, m, n);
                    let mut blocks = Vec::new();
                    let mut done = 0;
                    for &at in &cuts {
                        let (l, r) = rest.split_at(at.max(done) - done);
                        blocks.push((done, l));
                        (done, rest) = (at.max(done), r);
                    }
                    blocks.push((done, rest));
                    std::thread::scope(|sc| {
                        for (j, mut blk) in blocks {
                            let (a, b) = (&a, &b);
                            sc.spawn(move || {
                                gemm_nn_cols(m, k, a, ars, acs, &b[j..], n, &mut blk, acc)
                            });
                        }
                    });
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "nn cols {m}x{n}x{k} {cuts:?} {acc}"
                    );
                }
                // The same in passes of 16 columns through `sub`.
                let mut got = c0.clone();
                let mut all = ColsMut::new(&mut got, m, n);
                for j0 in (0..n).step_by(16) {
                    let mut pass = all.sub(j0, (j0 + 16).min(n));
                    gemm_nn_cols(m, k, &a, ars, acs, &b[j0..], n, &mut pass, acc);
                }
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "nn cols in passes {m}x{n}x{k} {acc}"
                );
            }
        }
    }

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
                    for be in Backend::ALL {
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
                for be in Backend::ALL {
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

    /// The tap rows and position spans that the SIMD conv kernels keep contain every read of a
    /// nonzero, checked by brute force over small layouts and every ink range.
    #[test]
    fn ink_ranges_keep_every_nonzero_read() {
        for (conv, ks) in [(20usize, 9usize), (3, 3), (5, 2), (1, 4)] {
            let wq = (conv * conv).next_multiple_of(16);
            let win = (ks - 1) * conv + wq;
            for lo in 0..win {
                for hi in lo..=win {
                    let ink = Ink { lo, hi };
                    let nonzero = |t: usize| lo <= t && t < hi;
                    for q0 in (0..wq).step_by(8) {
                        // AVX2 tiles are 8 or 16 positions, AVX-512 ones 16 to 80.
                        for len in [8, 16, 32, 80].into_iter().filter(|l| q0 + l <= wq) {
                            let (ilo, ihi) = ink.tap_rows(q0, len, conv, ks);
                            assert!(ilo <= ihi && ihi <= ks);
                            for i in 0..ks {
                                let read = (q0..q0 + len).any(|q| nonzero(q + i * conv));
                                assert!(
                                    !read || (ilo..ihi).contains(&i),
                                    "{ink:?} q0 {q0} row {i}"
                                );
                            }
                        }
                    }
                    for imin in 0..ks {
                        for imax in imin..ks {
                            for step in [8, 16] {
                                let (a, b) = ink.span(imin, imax, conv, wq, step);
                                assert!(a <= b && b <= wq && a % step == 0 && b % step == 0);
                                for q in 0..wq {
                                    let read = (imin..=imax).any(|i| nonzero(q + i * conv));
                                    assert!(
                                        !read || (a..b).contains(&q),
                                        "{ink:?} rows {imin}..={imax} q {q} step {step}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn skipped_shares_run_from_none_to_all() {
        let w = Wide { img: 28, ks: 9 };
        let full = Ink {
            lo: 0,
            hi: w.window(),
        };
        let blank = Ink { lo: 0, hi: 0 };
        let mut pic = vec![0u8; 28 * 28];
        pic[10 * 28..18 * 28].fill(9);
        let mut slot = vec![0.0; w.slot()];
        let band = w.fill(&pic, &mut slot);
        let (blank_slot, full_slot) = (vec![0.0; w.slot()], vec![1.0; w.slot()]);
        for be in Backend::available() {
            assert_eq!(skipped_share(be, w, &full_slot, full), (0.0, 0.0), "{be:?}");
            let (f, d) = skipped_share(be, w, &slot, band);
            if be.resolve() == Backend::Avx2 {
                assert_eq!(skipped_share(be, w, &blank_slot, blank), (1.0, 1.0));
                // Rows 10..18 inked: a tap row i reads ink at position q when q/20 + i is
                // one of them. The tiles: forward, block pairs (b, b + 5), b mod 10 < 5;
                // gradient, single blocks of 8.
                let inked = |q: usize, i: usize| (10..18).contains(&(q / 20 + i));
                let share = |tiles: &[Vec<usize>]| {
                    let idle: usize = tiles
                        .iter()
                        .map(|t| {
                            let blank = |i: &usize| {
                                !t.iter().any(|&b| (8 * b..8 * b + 8).any(|q| inked(q, *i)))
                            };
                            t.len() * 8 * (0..9).filter(blank).count()
                        })
                        .sum();
                    idle as f64 / (400 * 9) as f64
                };
                let pairs: Vec<_> = (0..50)
                    .filter(|b| b % 10 < 5)
                    .map(|b| vec![b, b + 5])
                    .collect();
                let blocks: Vec<_> = (0..50).map(|b| vec![b]).collect();
                assert!(
                    (f - share(&pairs)).abs() < 1e-12,
                    "{f} vs {}",
                    share(&pairs)
                );
                assert!(
                    (d - share(&blocks)).abs() < 1e-12,
                    "{d} vs {}",
                    share(&blocks)
                );
            } else if be.resolve() == Backend::Avx512 {
                assert_eq!(skipped_share(be, w, &blank_slot, blank), (1.0, 1.0));
                // Forward: tiles of 80 positions (4 map rows), all taps of a tap row skipped
                // when none of its reads in the tile is inked. Gradient: tiles of DK_NR taps
                // (one or two tap rows), blocks of 16 positions none of whose reads is inked.
                let inked = |q: usize, i: usize| (10..18).contains(&(q / 20 + i));
                let fwd: usize = (0..5)
                    .map(|t| {
                        let blank = |i: &usize| !(80 * t..80 * t + 80).any(|q| inked(q, *i));
                        80 * 9 * (0..9).filter(blank).count()
                    })
                    .sum();
                let dk: usize = (0..81)
                    .step_by(avx512::DK_NR)
                    .map(|p| {
                        let nr = (81 - p).min(avx512::DK_NR);
                        let rows = p / 9..=(p + nr - 1) / 9;
                        let blank = |b: &usize| {
                            !(16 * b..16 * b + 16).any(|q| rows.clone().any(|i| inked(q, i)))
                        };
                        nr * 16 * (0..25).filter(blank).count()
                    })
                    .sum();
                let all = (400 * 81) as f64;
                assert_eq!((f, d), (fwd as f64 / all, dk as f64 / all));
                assert!(f > 0.0 && d > f, "{f} {d}");
            } else {
                assert_eq!((f, d), (0.0, 0.0), "{be:?}");
            }
        }
    }

    #[test]
    fn ink_is_where_the_slot_is_nonzero() {
        let w = Wide { img: 28, ks: 9 };
        let mut slot = vec![0.0; w.slot()];
        let empty = w.ink(&slot);
        assert!(empty.lo >= empty.hi, "{empty:?}");
        // One float of copy 3 at window position 250: the range holds it, in blocks of 8.
        slot[3 * w.js() + 250] = f32::NAN;
        assert_eq!(w.ink(&slot), Ink { lo: 248, hi: 256 });
        slot[w.js() + 17] = -1.0;
        assert_eq!(w.ink(&slot), Ink { lo: 16, hi: 256 });
    }

    /// The ink `fill` returns covers every nonzero of the slot it wrote (the scan's range), for
    /// pixels anywhere, blank images and windows that run into the next copy (wq > conv²).
    #[test]
    fn fill_ink_covers_the_slot() {
        for (img, ks) in [(28, 9), (12, 3), (7, 7), (13, 4), (5, 1)] {
            let w = Wide { img, ks };
            let mut slot = vec![0.0; w.slot()];
            let mut pic = vec![0u8; img * img];
            for a in 0..img * img {
                for b in [a, img * img - 1, (a * 5) % (img * img)] {
                    pic.fill(0);
                    pic[a] = 7;
                    pic[b] = 200;
                    let given = w.fill(&pic, &mut slot);
                    // Every nonzero of every copy's window, at its window position.
                    for j in 0..ks {
                        let win = &slot[j * w.js()..j * w.js() + w.window()];
                        for (t, _) in win.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                            assert!(
                                (given.lo..given.hi).contains(&t),
                                "{img}/{ks}: pixels {a}, {b}: copy {j} position {t} outside {given:?}"
                            );
                        }
                    }
                }
            }
            pic.fill(0);
            let blank = w.fill(&pic, &mut slot);
            assert_eq!(
                (blank, w.ink(&slot)),
                (Ink { lo: 0, hi: 0 }, Ink { lo: 0, hi: 0 })
            );
        }
    }

    /// Slots with blank rows, blank images, single pixels and floats in the slot's tail: the
    /// kernels that skip the exact-zero products equal the plain loops.
    #[test]
    fn sparse_slots_match_naive() {
        for (img, ks, n_k) in [(28, 9, 20), (12, 3, 2), (7, 7, 3), (13, 4, 5), (9, 2, 6)] {
            let w = Wide { img, ks };
            let (xs, wq, px) = (w.slot(), w.wq(), img * img);
            let m = 6;
            let mut x = vec![0.0; m * xs];
            let mut pic = vec![0u8; px];
            let mut inks = vec![Ink { lo: 0, hi: 0 }; m];
            for e in 0..m {
                pic.fill(0);
                match e {
                    // ink on rows a..b only
                    0 | 1 => {
                        let (a, b) = (img / 4 + e, img - img / 5);
                        for (i, v) in pic.iter_mut().enumerate().take(b * img).skip(a * img) {
                            *v = (i * 37 % 256) as u8;
                        }
                    }
                    2 => {} // blank
                    3 => pic[0] = 255,
                    4 => pic[px - 1] = 200,
                    _ => pic[(img / 2) * img + img / 3] = 99,
                }
                inks[e] = w.fill(&pic, &mut x[e * xs..(e + 1) * xs]);
            }
            // The last slot as raw floats: one value at the far end of the last copy's window.
            x[(m - 1) * xs + (ks - 1) * w.js() + w.window() - 1] = 0.75;
            inks[m - 1] = w.ink(&x[(m - 1) * xs..]);
            let k = rand_vec(n_k * ks * ks, 21);
            let (mut a, mut b) = (vec![0.0; m * n_k * wq], vec![0.0; m * n_k * wq]);
            conv_wide_naive(w, &k, n_k, &x, m, &mut b);
            let dz = rand_vec(m * n_k * wq, 22);
            let mut db = vec![0.0; n_k * ks * ks];
            conv_wide_dk_naive(w, &dz, n_k, &x, m, &mut db);
            for (be, given) in Backend::available()
                .into_iter()
                .flat_map(|be| [(be, None), (be, Some(&inks[..]))])
            {
                a.fill(f32::NAN);
                conv_wide_fused_on(be, w, &k, &[], false, n_k, &x, given, m, &mut a);
                close(&a, &b, &format!("sparse conv {img}/{ks} {be:?}"));
                let mut da = vec![f32::NAN; n_k * ks * ks];
                conv_wide_dk_on(be, w, &dz, n_k, &x, given, m, &mut da);
                close(&da, &db, &format!("sparse dk {img}/{ks} {be:?}"));
            }
        }
    }

    /// The AVX2 kernel gradient gives the same bits with AVX-512VL's 32 registers (5-map
    /// tiles) as with AVX2's 16 (4-map tiles): map counts that fill no tile evenly, digit-like
    /// and blank slots, one image and several.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_gradient_has_the_same_bits_with_32_registers() {
        if !(has_avx2_fma() && has_avx512vl()) {
            eprintln!("skipped: this CPU lacks AVX-512VL");
            return;
        }
        for (img, ks, n_k, m) in [
            (28, 9, 20, 8),
            (28, 9, 23, 3),
            (28, 9, 7, 1),
            (13, 3, 11, 5),
        ] {
            let w = Wide { img, ks };
            let (xs, wq, px) = (w.slot(), w.wq(), img * img);
            let mut x = vec![0.0; m * xs];
            let mut inks = Vec::new();
            for e in 0..m {
                // Ink on a band of rows (a different band per image), or none at all.
                let (a, b) = (e % 5, img - (e * 3) % 7);
                let pic: Vec<u8> = (0..px)
                    .map(|i| {
                        if e != 2 && (a * img..b * img).contains(&i) {
                            (i * 53 % 256) as u8
                        } else {
                            0
                        }
                    })
                    .collect();
                inks.push(w.fill(&pic, &mut x[e * xs..(e + 1) * xs]));
            }
            let dz = rand_vec(m * n_k * wq, 31);
            let offs = w.offsets();
            let kk = ks * ks;
            let run = |wide: bool| {
                let mut dk = vec![f32::NAN; n_k * kk];
                let ink = |e: usize| inks[e];
                let (dzp, xp, dkp) = (dz.as_ptr(), x.as_ptr(), dk.as_mut_ptr());
                // SAFETY: AVX2, FMA and (for the wide one) AVX-512VL were detected; the
                // buffers have m slots, m·n_k maps and n_k·kk taps, as `conv_wide_dk_on` checks.
                unsafe {
                    let (o, shape) = (&offs[..kk], (w.conv(), ks));
                    if wide {
                        avx2::conv_dk::<avx2::Ymm32>(
                            n_k, kk, dzp, xp, xs, m, o, &ink, shape, wq, dkp,
                        )
                    } else {
                        avx2::conv_dk::<avx2::Ymm16>(
                            n_k, kk, dzp, xp, xs, m, o, &ink, shape, wq, dkp,
                        )
                    }
                }
                dk
            };
            let (narrow, wide) = (run(false), run(true));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&narrow),
                bits(&wide),
                "{img}/{ks}, {n_k} maps, {m} images"
            );
            let mut naive = vec![0.0; n_k * kk];
            conv_wide_dk_naive(w, &dz, n_k, &x, m, &mut naive);
            close(&wide, &naive, "dk with 32 registers");
        }
    }

    #[test]
    fn wide_conv_and_kernel_gradient_match_naive() {
        for (m, img, ks, n_k) in [(3, 28, 9, 20), (2, 28, 5, 7), (1, 12, 3, 1), (2, 7, 7, 6)] {
            let w = Wide { img, ks };
            let mut x = vec![0.0; m * w.slot()];
            let px: Vec<u8> = (0..m * img * img).map(|i| (i * 7919 % 256) as u8).collect();
            for e in 0..m {
                w.fill(
                    &px[e * img * img..(e + 1) * img * img],
                    &mut x[e * w.slot()..(e + 1) * w.slot()],
                );
            }
            let k = rand_vec(n_k * ks * ks, 12);
            let mut a = vec![0.0; m * n_k * w.wq()];
            let mut b = a.clone();
            conv_wide_naive(w, &k, n_k, &x, m, &mut b);
            let bias = rand_vec(n_k, 14);
            for be in Backend::available() {
                conv_wide_fused_on(be, w, &k, &[], false, n_k, &x, None, m, &mut a);
                close(&a, &b, &format!("conv_wide {be:?}"));
                let mut fa = a.clone();
                conv_wide_fused_on(be, w, &k, &bias, true, n_k, &x, None, m, &mut fa);
                for (q, (fv, v)) in fa.iter().zip(&a).enumerate() {
                    let want = (v + bias[(q / w.wq()) % n_k]).max(0.0);
                    assert!(
                        (fv - want).abs() < 1e-5,
                        "fused conv {be:?} at {q}: {fv} vs {want}"
                    );
                }
            }
            conv_wide(w, &k, n_k, &x, m, &mut a);
            close(&a, &b, "conv_wide");
            // The valid outputs are the cross-correlation.
            let conv = w.conv();
            let (r, c, n) = (conv - 1, conv / 2, n_k - 1);
            let want: f32 = (0..ks * ks)
                .map(|p| {
                    k[n * ks * ks + p] * f32::from(px[(r + p / ks) * img + c + p % ks]) / 255.0
                })
                .sum();
            assert!((b[n * w.wq() + r * conv + c] - want).abs() < 1e-4);

            let mut dz = rand_vec(m * n_k * w.wq(), 13);
            for (q, v) in dz.iter_mut().enumerate() {
                if q % w.wq() >= conv * conv {
                    *v = 0.0; // junk positions carry no gradient
                }
            }
            let mut da = vec![0.0; n_k * ks * ks];
            let mut db = da.clone();
            conv_wide_dk_naive(w, &dz, n_k, &x, m, &mut db);
            for be in Backend::available() {
                da.fill(f32::NAN);
                conv_wide_dk_on(be, w, &dz, n_k, &x, None, m, &mut da);
                close(&da, &db, &format!("conv_wide_dk {be:?}"));
            }
            conv_wide_dk(w, &dz, n_k, &x, m, &mut da);
            close(&da, &db, "conv_wide_dk");
        }
    }

    #[test]
    fn fill_matches_its_definition() {
        for ((img, ks), be) in [
            (28, 9),
            (28, 5),
            (12, 3),
            (40, 7),
            (17, 8),
            (23, 2),
            (13, 1),
        ]
        .into_iter()
        .flat_map(|s| Backend::available().into_iter().map(move |b| (s, b)))
        {
            let w = Wide { img, ks };
            let x: Vec<u8> = (0..img * img).map(|i| (i * 31 % 256) as u8).collect();
            let mut slot = vec![9.0; w.slot()];
            w.fill_on(be, &x, &mut slot);
            let conv = w.conv();
            for p in 0..ks * ks {
                for q in 0..conv * conv {
                    let (i, j, r, c) = (p / ks, p % ks, q / conv, q % conv);
                    assert_eq!(
                        slot[w.off(p) + q],
                        f32::from(x[(r + i) * img + c + j]) * (1.0 / 255.0)
                    );
                }
            }
            assert!(slot[ks * img * conv..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn elementwise_kernels_match_plain_loops() {
        for be in Backend::available() {
            elementwise_on(be);
        }
    }

    /// The elementwise kernels of one backend, exactly equal to their definitions.
    fn elementwise_on(be: Backend) {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 256) as u8).collect();
        let mut a = vec![0.0; 1000];
        pixels_to_f32_on(be, &src, &mut a);
        for (x, &s) in a.iter().zip(&src) {
            assert_eq!(*x, f32::from(s) * (1.0 / 255.0));
        }
        let mut v = rand_vec(1001, 3);
        v[5] = f32::NAN;
        let want: Vec<f32> = v.iter().map(|x| x.max(0.0)).collect();
        relu_in_place_on(be, &mut v);
        assert_eq!(v, want, "{be:?}");
        for (img, pooled) in [
            (28, 10),
            (12, 6),
            (40, 16),
            (5, 1),
            (40, 20),
            (14, 7),
            (6, 3),
        ] {
            let map = rand_vec(2 * pooled * img, 4);
            let mut out = vec![0.0; pooled * pooled];
            mean_pool2_on(be, &map, img, pooled, &mut out);
            for r in 0..pooled {
                for c in 0..pooled {
                    let (a0, a1) = (map[2 * r * img + 2 * c], map[2 * r * img + 2 * c + 1]);
                    let (b0, b1) = (
                        map[(2 * r + 1) * img + 2 * c],
                        map[(2 * r + 1) * img + 2 * c + 1],
                    );
                    let want = ((a0 + b0) + (a1 + b1)) * 0.25;
                    assert_eq!(
                        out[r * pooled + c],
                        want,
                        "pool {be:?} {pooled} r {r} c {c}"
                    );
                }
            }
            let g = rand_vec(pooled * pooled, 5);
            let y = rand_vec(2 * pooled * img, 6);
            let mut dz = vec![7.0; 2 * pooled * img];
            mean_repool2_relu_on(be, &g, &y, img, pooled, &mut dz);
            for r in 0..2 * pooled {
                for c in 0..img {
                    let want = if c >= 2 * pooled {
                        7.0
                    } else if y[r * img + c] > 0.0 {
                        g[(r / 2) * pooled + c / 2] * 0.25
                    } else {
                        0.0
                    };
                    assert_eq!(dz[r * img + c], want, "repool {be:?} r {r} c {c}");
                }
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `rand_vec` with about `zeros` of its entries set to +0 or −0 (alternately).
    fn sparse_vec(n: usize, seed: u32, zeros: f32) -> Vec<f32> {
        let pick = rand_vec(n, seed ^ 0x5a5a);
        rand_vec(n, seed)
            .into_iter()
            .zip(pick)
            .enumerate()
            .map(|(i, (v, u))| {
                if (u + 1.0) / 2.0 < zeros {
                    if i % 2 == 0 { 0.0 } else { -0.0 }
                } else {
                    v
                }
            })
            .collect()
    }

    /// `Csr::gather` keeps exactly the entries that are not ±0 (NaN included), in column
    /// order, and `used` is the columns some row keeps.
    #[test]
    fn csr_keeps_exactly_the_nonzeros() {
        let (m, k) = (9, 23);
        let mut a = sparse_vec(m * k, 11, 0.7);
        a[5] = f32::NAN;
        a[k] = -0.0;
        let mut csr = Csr::with_capacity(m, k);
        for (ars, acs) in [(k, 1), (1, m)] {
            csr.gather(m, k, &a, ars, acs);
            assert_eq!((csr.rows(), csr.cols()), (m, k));
            let mut nnz = 0;
            let mut used = vec![false; k];
            for i in 0..m {
                let want: Vec<u32> = (0..k as u32)
                    .filter(|&p| a[i * ars + p as usize * acs] != 0.0)
                    .collect();
                let (cols, vals) = csr.row(i);
                assert_eq!(cols, &want[..], "row {i}");
                for (&p, &v) in cols.iter().zip(vals) {
                    assert_eq!(v.to_bits(), a[i * ars + p as usize * acs].to_bits());
                    used[p as usize] = true;
                }
                nnz += cols.len();
            }
            assert_eq!(csr.nnz(), nnz);
            let want_used: Vec<u32> = (0..k as u32).filter(|&p| used[p as usize]).collect();
            assert_eq!(csr.used, want_used);
            let mut live = Vec::new();
            nonzero_cols(m, k, &a, ars, acs, &mut live);
            assert_eq!(live, want_used);
        }
        // Rebuilding a smaller matrix in the same buffers forgets the old one.
        csr.gather(2, 3, &[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], 3, 1);
        assert_eq!(
            (csr.nnz(), csr.row(0).0, csr.row(1).0),
            (1, &[1u32][..], &[][..])
        );
    }

    /// The sparse products against the naive loops on the dense matrix, on every backend and
    /// row range; on AVX2 bit-for-bit the dense kernel's result (depth ≤ 128, B finite).
    #[test]
    fn sparse_products_match_dense() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (4, 2000, 100),
            (100, 130, 100),
            (7, 65, 5),
            (5, 17, 129),
            (3, 8, 0),
        ] {
            for zeros in [0.0, 0.62, 1.0] {
                let (ldb, ldc) = (n + 3, n + 1);
                let a = sparse_vec(m * k, (m + n + k) as u32, zeros);
                let b = rand_vec(k.max(1) * ldb, 2);
                let c0 = rand_vec(m * ldc, 3);
                for (ars, acs) in [(k, 1), (1, m)] {
                    let mut want = c0.clone();
                    gemm_nn_naive(m, n, k, &a, ars, acs, &b, ldb, &mut want, ldc, false);
                    let mut dense = c0.clone();
                    gemm_nn_on(
                        Backend::Avx2,
                        m,
                        n,
                        k,
                        &a,
                        ars,
                        acs,
                        &b,
                        ldb,
                        &mut dense,
                        ldc,
                        false,
                    );
                    let exact = Backend::Avx2.resolve() == Backend::Avx2 && k <= 128;
                    let mut csr = Csr::with_capacity(m, k);
                    csr.gather(m, k, &a, ars, acs);
                    let mut live = Vec::new();
                    nonzero_cols(m, k, &a, ars, acs, &mut live);
                    for be in Backend::ALL {
                        let what = format!("{m}x{n}x{k}, {zeros} zeros, {be:?}");
                        let mut got = c0.clone();
                        gemm_csr_on(be, &csr, 0..m, n, &b, ldb, &mut got, ldc);
                        close(&got, &want, &format!("csr {what}"));
                        if exact && be.resolve() != Backend::Portable {
                            assert!(bits(&got) == bits(&dense), "csr {what}: not the dense bits");
                        }
                        // A range of rows lands at C's start.
                        let (r0, r1) = (m / 3, m - m / 4);
                        if r1 > r0 {
                            let mut part = c0.clone();
                            gemm_csr_on(be, &csr, r0..r1, n, &b, ldb, &mut part, ldc);
                            for i in 0..r1 - r0 {
                                assert!(
                                    part[i * ldc..i * ldc + n]
                                        == got[(r0 + i) * ldc..(r0 + i) * ldc + n],
                                    "csr rows {r0}..{r1} {what}: row {i}"
                                );
                            }
                        }
                        for acc in [false, true] {
                            let mut want = c0.clone();
                            gemm_nn_naive(m, n, k, &a, ars, acs, &b, ldb, &mut want, ldc, acc);
                            let mut got = c0.clone();
                            gemm_nn_at_on(
                                be, m, n, &live, &a, ars, acs, &b, ldb, &mut got, ldc, acc,
                            );
                            close(&got, &want, &format!("nn_at {what} acc {acc}"));
                            if exact && !acc && be.resolve() != Backend::Portable {
                                assert!(
                                    bits(&got) == bits(&dense),
                                    "nn_at {what}: not the dense bits"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Depths that are not A's nonzero columns: exactly those terms are summed.
        let (m, n, k) = (5, 40, 300);
        let a = rand_vec(m * k, 21);
        let b = rand_vec(k * n, 22);
        let ks: Vec<u32> = (0..k as u32).filter(|p| p % 3 != 1).collect();
        let masked: Vec<f32> = (0..m * k)
            .map(|i| if (i % k) % 3 == 1 { 0.0 } else { a[i] })
            .collect();
        let mut want = vec![0.0; m * n];
        gemm_nn_naive(m, n, k, &masked, k, 1, &b, n, &mut want, n, false);
        for be in Backend::ALL {
            let mut got = vec![0.0; m * n];
            gemm_nn_at_on(be, m, n, &ks, &a, k, 1, &b, n, &mut got, n, false);
            close(&got, &want, &format!("nn_at over chosen depths {be:?}"));
        }
    }

    #[test]
    #[should_panic(expected = "needs")]
    fn sparse_product_out_of_bounds_panics() {
        let mut csr = Csr::with_capacity(2, 3);
        csr.gather(2, 3, &[1.0; 6], 3, 1);
        let mut c = vec![0.0; 8];
        gemm_csr(&csr, 0..2, 4, &[0.0; 11], 4, &mut c, 4);
    }

    #[test]
    fn aligned_buffers_start_on_a_line_and_clone_whole() {
        for len in [0, 1, 15, 16, 17, 1000, 32_000, 40_000] {
            let mut a = Aligned::<f32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert_eq!(a.as_ptr() as usize % 64, 0, "len {len}");
            assert!(a.iter().all(|&v| v == 0.0));
            for (i, v) in a.iter_mut().enumerate() {
                *v = i as f32;
            }
            let b = a.clone();
            assert_eq!(b.as_ptr() as usize % 64, 0);
            assert_eq!(&b[..], &a[..]);
            assert_eq!(b, a);
            let d: Aligned<f64> = a.iter().map(|&v| f64::from(v) * 0.5).collect();
            assert_eq!(d.as_ptr() as usize % 64, 0);
            assert!(d.iter().enumerate().all(|(i, &v)| v == i as f64 * 0.5));
            assert_eq!(format!("{:?}", Aligned::from(vec![1u8, 2])), "[1, 2]");
        }
    }

    #[test]
    #[should_panic(expected = "needs")]
    fn out_of_bounds_panics() {
        let mut c = vec![0.0; 4];
        gemm_nn(2, 2, 2, &[0.0; 3], 2, 1, &[0.0; 4], 2, &mut c, 2, false);
    }
}
