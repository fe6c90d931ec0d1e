//! The only module with `unsafe`: the f32 matrix multiply the batched path is built on.
//!
//! [`gemm`] checks every bound, then hands the work to the `matrixmultiply` crate (packed,
//! cache-blocked, with run-time SIMD dispatch). [`gemm_naive`] is the plain triple loop with the
//! same contract; tests hold the two together.

/// A strided matrix view: element `(i, j)` is at `i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl Layout {
    /// Row-major `rows × cols` (`rs = cols`, `cs = 1`).
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Layout {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `cols × rows` matrix, seen as `rows × cols`.
    pub fn transposed(rows: usize, cols: usize) -> Self {
        Layout {
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }
    /// One past the largest index touched, 0 for an empty matrix.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
    fn check(&self, len: usize, what: &str) {
        assert!(
            self.extent() <= len,
            "gemm: {what} {}×{} (rs {}, cs {}) needs {} elements, slice has {len}",
            self.rows,
            self.cols,
            self.rs,
            self.cs,
            self.extent()
        );
    }
}

/// `C = α·A·B + β·C` for strided f32 matrices, `A: m×k`, `B: k×n`, `C: m×n`.
/// When `β == 0`, `C` is overwritten (its old contents, even NaN, are ignored).
///
/// # Panics
/// If a layout reaches outside its slice, if the inner dimensions differ, or if `C`'s layout
/// could make two elements share memory.
#[allow(clippy::too_many_arguments)] // the BLAS signature: (α, A, B, β, C) with layouts
pub fn gemm(
    alpha: f32,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    beta: f32,
    c: &mut [f32],
    lc: Layout,
) {
    check_shapes(a, la, b, lb, c, lc);
    let (m, k, n) = (la.rows, la.cols, lb.cols);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: `check_shapes` asserted that every index `i*rs + j*cs` of A (m×k), B (k×n) and
    // C (m×n) lies inside its slice, and that C's elements are distinct (one of its strides is
    // 1 and the other at least the extent of that dimension), so the writes through `c` stay in
    // bounds and never alias each other; `a` and `b` are shared borrows that Rust guarantees do
    // not overlap the exclusive borrow `c`. The strides fit `isize` because they index slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            la.rs as isize,
            la.cs as isize,
            b.as_ptr(),
            lb.rs as isize,
            lb.cs as isize,
            beta,
            c.as_mut_ptr(),
            lc.rs as isize,
            lc.cs as isize,
        );
    }
}

/// The reference for [`gemm`]: the plain triple loop, summing over `k` in order.
#[allow(clippy::too_many_arguments)]
pub fn gemm_naive(
    alpha: f32,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    beta: f32,
    c: &mut [f32],
    lc: Layout,
) {
    check_shapes(a, la, b, lb, c, lc);
    for i in 0..la.rows {
        for j in 0..lb.cols {
            let mut s = 0.0f32;
            for p in 0..la.cols {
                s += a[i * la.rs + p * la.cs] * b[p * lb.rs + j * lb.cs];
            }
            let cij = &mut c[i * lc.rs + j * lc.cs];
            *cij = if beta == 0.0 {
                alpha * s
            } else {
                alpha * s + beta * *cij
            };
        }
    }
}

fn check_shapes(a: &[f32], la: Layout, b: &[f32], lb: Layout, c: &[f32], lc: Layout) {
    assert_eq!(
        la.cols, lb.rows,
        "gemm: inner dimensions differ ({} vs {})",
        la.cols, lb.rows
    );
    assert!(
        lc.rows == la.rows && lc.cols == lb.cols,
        "gemm: C is {}×{}, A·B is {}×{}",
        lc.rows,
        lc.cols,
        la.rows,
        lb.cols
    );
    la.check(a.len(), "A");
    lb.check(b.len(), "B");
    lc.check(c.len(), "C");
    let distinct = (lc.cs == 1 && (lc.rows <= 1 || lc.rs >= lc.cols))
        || (lc.rs == 1 && (lc.cols <= 1 || lc.cs >= lc.rows))
        || lc.rows * lc.cols <= 1;
    assert!(
        distinct,
        "gemm: C layout (rs {}, cs {}) overlaps itself",
        lc.rs, lc.cs
    );
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

    #[test]
    fn gemm_matches_naive_on_all_transpositions_and_awkward_sizes() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 81, 20),
            (13, 5, 33),
            (100, 2000, 10),
            (3, 0, 4),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let a = rand_vec(m * k, 1);
                    let b = rand_vec(k * n, 2);
                    let la = if ta {
                        Layout::transposed(m, k)
                    } else {
                        Layout::row_major(m, k)
                    };
                    let lb = if tb {
                        Layout::transposed(k, n)
                    } else {
                        Layout::row_major(k, n)
                    };
                    let lc = Layout::row_major(m, n);
                    let c0 = rand_vec(m * n, 3);
                    for beta in [0.0, 1.0] {
                        let (mut c1, mut c2) = (c0.clone(), c0.clone());
                        gemm(0.5, &a, la, &b, lb, beta, &mut c1, lc);
                        gemm_naive(0.5, &a, la, &b, lb, beta, &mut c2, lc);
                        for (x, y) in c1.iter().zip(&c2) {
                            assert!(
                                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "{m}x{k}x{n} {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "needs")]
    fn out_of_bounds_layout_panics() {
        let mut c = vec![0.0; 4];
        gemm(
            1.0,
            &[0.0; 3],
            Layout::row_major(2, 2),
            &[0.0; 4],
            Layout::row_major(2, 2),
            0.0,
            &mut c,
            Layout::row_major(2, 2),
        );
    }
}
