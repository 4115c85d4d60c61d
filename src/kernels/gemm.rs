//! Matrix products through `matrixmultiply` (sgemm/dgemm), transposes expressed by strides,
//! with the output split into row (or column) blocks across the rayon pool.
//!
//! Splitting does not change any output element's summation order (each element's k-sum is
//! done by the same micro-kernel in the same order), so results are identical for every
//! thread count: training is bit-for-bit reproducible across `--threads`.

use rayon::prelude::*;

use super::Float;
use super::SharedMut;

/// How an operand is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Stored as written: an m×k operand is m rows of k.
    Normal,
    /// Stored transposed: an m×k operand is k rows of m.
    Transposed,
}

impl Layout {
    /// Row and column strides of a logical `rows × cols` operand stored this way.
    fn strides(self, rows: usize, cols: usize) -> (isize, isize) {
        match self {
            Layout::Normal => (cols as isize, 1),
            Layout::Transposed => (1, rows as isize),
        }
    }
}

/// Work below which splitting across threads costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 21;

/// `c (m,n) = a (m,k) · b (k,n)`, or `c += a · b` when `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(a: &[T], a_layout: Layout, b: &[T], b_layout: Layout, c: &mut [T], m: usize, k: usize, n: usize, accumulate: bool) {
    assert_eq!(a.len(), m * k, "matmul: a is not {m}×{k}");
    assert_eq!(b.len(), k * n, "matmul: b is not {k}×{n}");
    assert_eq!(c.len(), m * n, "matmul: c is not {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    if m <= FEW_ROWS && a_layout == Layout::Normal {
        return few_rows(a, b, b_layout, c, m, k, n, accumulate);
    }
    let (rsa, csa) = a_layout.strides(m, k);
    let (rsb, csb) = b_layout.strides(k, n);
    let beta = if accumulate { T::one() } else { T::zero() };
    let threads = rayon::current_num_threads();
    let flops = 2 * m * n * k;
    let c_ptr = SharedMut::new(c.as_mut_ptr());
    // Split the longer output dimension into blocks, a few per thread.
    let split_rows = m >= n;
    let extent = if split_rows { m } else { n };
    let blocks = if threads > 1 && flops >= PARALLEL_MIN_FLOPS { (threads * 2).min(extent.div_ceil(32)).max(1) } else { 1 };
    let block = extent.div_ceil(blocks);
    let run = |start: usize| {
        let end = (start + block).min(extent);
        // SAFETY: strides describe the slices checked above; blocks write disjoint parts of c.
        unsafe {
            if split_rows {
                T::gemm_raw(
                    end - start,
                    k,
                    n,
                    T::one(),
                    a.as_ptr().offset(start as isize * rsa),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    beta,
                    c_ptr.get().add(start * n),
                    n as isize,
                    1,
                );
            } else {
                T::gemm_raw(
                    m,
                    k,
                    end - start,
                    T::one(),
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr().offset(start as isize * csb),
                    rsb,
                    csb,
                    beta,
                    c_ptr.get().add(start),
                    n as isize,
                    1,
                );
            }
        }
    };
    if blocks == 1 {
        run(0);
    } else {
        (0..extent).step_by(block).collect::<Vec<_>>().into_par_iter().for_each(run);
    }
}

/// At most this many rows of A take the vector path (decoding's products).
pub(crate) const FEW_ROWS: usize = 16;

/// Output columns per parallel task on the vector path, at most: narrower outputs are split
/// into one task per thread, so that a 256-wide projection does not run on one core.
const COLUMNS_PER_TASK: usize = 256;

/// `c (m,n) (+)= a (m,k) · b (k,n)` for a few rows: each output element is a dot product with a
/// row of b (b transposed) or a sum of scaled rows of b (b normal); every element of b is read
/// once per call, as memory-bound decoding wants. Deterministic under any thread count.
#[allow(clippy::too_many_arguments)]
fn few_rows<T: Float>(a: &[T], b: &[T], b_layout: Layout, c: &mut [T], m: usize, k: usize, n: usize, accumulate: bool) {
    if !accumulate {
        c.iter_mut().for_each(|x| *x = T::zero());
    }
    let c_ptr = SharedMut::new(c.as_mut_ptr());
    let parallel = 2 * m * n * k >= PARALLEL_MIN_FLOPS / 2;
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    // a multiple of 16 columns, so that each task's register blocks stay whole
    let columns = n.div_ceil(threads).next_multiple_of(16).min(COLUMNS_PER_TASK);
    let tasks: Vec<usize> = (0..n).step_by(columns).collect();
    let work = |&j0: &usize| {
        let j1 = (j0 + columns).min(n);
        // SAFETY: tasks write disjoint column ranges [j0, j1) of c's rows.
        let mut out: Vec<&mut [T]> =
            (0..m).map(|i| unsafe { std::slice::from_raw_parts_mut(c_ptr.get().add(i * n + j0), j1 - j0) }).collect();
        match b_layout {
            Layout::Transposed => T::rows_times_transposed(a, k, b, j0, &mut out),
            Layout::Normal => T::rows_times_normal(a, k, b, n, j0, &mut out),
        }
    };
    if parallel && tasks.len() > 1 {
        tasks.par_iter().for_each(work);
    } else {
        tasks.iter().for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
        let mut t = vec![0.0; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = x[i * cols + j];
            }
        }
        t
    }

    #[test]
    fn matmul_matches_naive_product_for_every_layout_and_split() {
        let mut rng = Rng::new(5);
        // (8, 256, 300): few rows, enough work to split 300 columns into one task per thread
        for (m, k, n) in [(3, 4, 5), (200, 70, 300), (17, 300, 600), (1, 256, 1000), (4, 64, 700), (8, 256, 300)] {
            let a: Vec<f64> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f64> = (0..k * n).map(|_| rng.normal()).collect();
            let expected = naive(&a, &b, m, k, n);
            let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
            for (a_in, la) in [(&a, Layout::Normal), (&at, Layout::Transposed)] {
                for (b_in, lb) in [(&b, Layout::Normal), (&bt, Layout::Transposed)] {
                    let mut c = vec![1.0; m * n];
                    matmul(a_in, la, b_in, lb, &mut c, m, k, n, true);
                    let worst = c.iter().zip(&expected).map(|(x, y)| (x - 1.0 - y).abs()).fold(0.0, f64::max);
                    assert!(worst < 1e-10, "{m}×{k}×{n} {la:?} {lb:?}: {worst}");
                }
            }
        }
    }

    #[test]
    fn few_row_products_give_the_same_bits_on_any_number_of_threads() {
        let mut rng = Rng::new(6);
        let (m, k, n) = (8, 256, 300);
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let product = |threads: usize, layout: Layout| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut c = vec![0.0f32; m * n];
            pool.install(|| matmul(&a, Layout::Normal, &b, layout, &mut c, m, k, n, false));
            c
        };
        for layout in [Layout::Normal, Layout::Transposed] {
            let alone = product(1, layout);
            for threads in [2, 3, 7] {
                assert_eq!(product(threads, layout), alone, "{threads} threads, {layout:?}");
            }
        }
    }
}
