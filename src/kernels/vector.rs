//! Dot products and `y += a·x` for the products with a few rows (m ≤ 16) that decoding runs, where
//! a GEMM's packing would copy the whole weight matrix to use each element a handful of times.

use super::simd::F32x8;
use super::Float;

/// `Σ_i a_i b_i` over the shorter of the two: the reference for any float type.
pub fn dot_scalar<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

/// `y += alpha · x` with one fused multiply-add per element, as the SIMD version does.
pub fn axpy_scalar<T: Float>(alpha: T, x: &[T], y: &mut [T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = alpha.mul_add(xi, *yi);
    }
}

/// [`dot_scalar`] for f32, with the vector loop where the CPU has one.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { dot_simd(a, b) };
    }
    dot_scalar(a, b)
}

/// [`axpy_scalar`] for f32, with the vector loop where the CPU has one.
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { axpy_simd(alpha, x, y) };
    }
    axpy_scalar(alpha, x, y)
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn dot_simd(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (F32x8::zero(), F32x8::zero());
    let pairs = n / 16 * 16;
    for i in (0..pairs).step_by(16) {
        acc0 = F32x8::load(a.as_ptr().add(i)).mul_add(F32x8::load(b.as_ptr().add(i)), acc0);
        acc1 = F32x8::load(a.as_ptr().add(i + 8)).mul_add(F32x8::load(b.as_ptr().add(i + 8)), acc1);
    }
    (acc0 + acc1).sum() + dot_scalar(&a[pairs..n], &b[pairs..n])
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn axpy_simd(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let lanes = n / 8 * 8;
    let va = F32x8::splat(alpha);
    for i in (0..lanes).step_by(8) {
        va.mul_add(F32x8::load(x.as_ptr().add(i)), F32x8::load(y.as_ptr().add(i))).store(y.as_mut_ptr().add(i));
    }
    axpy_scalar(alpha, &x[lanes..n], &mut y[lanes..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn simd_dot_and_axpy_agree_with_scalar_references() {
        let mut rng = Rng::new(8);
        for n in [3, 16, 33, 256] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            assert!((dot_f32(&a, &b) - dot_scalar(&a, &b)).abs() < 1e-4);
            let (mut y1, mut y2) = (b.clone(), b.clone());
            axpy_f32(0.7, &a, &mut y1);
            axpy_scalar(0.7, &a, &mut y2);
            assert!(y1.iter().zip(&y2).all(|(p, q)| (p - q).abs() < 1e-5));
        }
    }
}

/// `out[i][j] += Σ_p a[i,p] · b[p, j0 + j]` for the rows of `out` (b normal, row stride n).
/// Each output element adds its terms in order of p with one multiply-add each, whatever the
/// number of rows: a row's result does not depend on which rows run beside it.
pub fn rows_times_normal_scalar<T: Float>(a: &[T], k: usize, b: &[T], n: usize, j0: usize, out: &mut [&mut [T]]) {
    for p in 0..k {
        let piece = &b[p * n + j0..p * n + j0 + out[0].len()];
        for (i, row_out) in out.iter_mut().enumerate() {
            let x = a[i * k + p];
            for (o, &y) in row_out.iter_mut().zip(piece) {
                *o = x.mul_add(y, *o);
            }
        }
    }
}

/// `out[i][j] += dot(a[i,:], b[j0 + j, :])` (b transposed: its rows are the columns).
pub fn rows_times_transposed_scalar<T: Float>(a: &[T], k: usize, b: &[T], j0: usize, out: &mut [&mut [T]]) {
    for j in 0..out[0].len() {
        let column = &b[(j0 + j) * k..(j0 + j + 1) * k];
        for (i, row_out) in out.iter_mut().enumerate() {
            row_out[j] += dot_scalar(&a[i * k..(i + 1) * k], column);
        }
    }
}

/// [`rows_times_normal_scalar`] for f32, with the register-blocked vector loop where the CPU
/// has one.
pub fn rows_times_normal_f32(a: &[f32], k: usize, b: &[f32], n: usize, j0: usize, out: &mut [&mut [f32]]) {
    let width = check_rows(a, k, out);
    if out.is_empty() {
        return;
    }
    // the vector loops read b without bounds checks: its last row must reach column j0 + width
    assert!(k == 0 || j0 + width <= n && b.len() >= (k - 1) * n + j0 + width, "rows_times_normal: b too short");
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { rows_times_normal_simd(a, k, b, n, j0, out) };
    }
    rows_times_normal_scalar(a, k, b, n, j0, out)
}

/// [`rows_times_transposed_scalar`] for f32, with the vector loop where the CPU has one.
pub fn rows_times_transposed_f32(a: &[f32], k: usize, b: &[f32], j0: usize, out: &mut [&mut [f32]]) {
    let width = check_rows(a, k, out);
    if out.is_empty() {
        return;
    }
    assert!(b.len() >= (j0 + width) * k, "rows_times_transposed: b too short");
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { rows_times_transposed_simd(a, k, b, j0, out) };
    }
    rows_times_transposed_scalar(a, k, b, j0, out)
}

/// The width of `out`'s rows, after checking that they are equal and that `a` holds as many
/// rows of k: the vector loops index both without bounds checks.
fn check_rows(a: &[f32], k: usize, out: &[&mut [f32]]) -> usize {
    let width = out.first().map_or(0, |row| row.len());
    assert!(out.iter().all(|row| row.len() == width), "rows of out differ in width");
    assert!(a.len() >= out.len() * k, "a holds fewer rows than out");
    width
}

/// Register-blocked: up to 4 rows × 16 columns of accumulators stay in registers while p runs.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn rows_times_normal_simd(a: &[f32], k: usize, b: &[f32], n: usize, j0: usize, out: &mut [&mut [f32]]) {
    let width = out[0].len();
    if out.len() == 1 {
        // one row: stream b row by row (sequential memory beats register blocking here)
        for p in 0..k {
            axpy_simd(a[p], &b[p * n + j0..p * n + j0 + width], out[0]);
        }
        return;
    }
    let blocked = width / 16 * 16;
    let mut i0 = 0;
    while i0 < out.len() {
        let rows = (out.len() - i0).min(4);
        let group = &mut out[i0..i0 + rows];
        let a_rows = &a[i0 * k..(i0 + rows) * k];
        match rows {
            1 => normal_block::<1>(a_rows, k, b, n, j0, blocked, group),
            2 => normal_block::<2>(a_rows, k, b, n, j0, blocked, group),
            3 => normal_block::<3>(a_rows, k, b, n, j0, blocked, group),
            _ => normal_block::<4>(a_rows, k, b, n, j0, blocked, group),
        }
        i0 += rows;
    }
    if blocked < width {
        let mut tails: Vec<&mut [f32]> = out.iter_mut().map(|row| &mut row[blocked..]).collect();
        rows_times_normal_scalar(a, k, b, n, j0 + blocked, &mut tails);
    }
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn normal_block<const R: usize>(a: &[f32], k: usize, b: &[f32], n: usize, j0: usize, blocked: usize, out: &mut [&mut [f32]]) {
    for j in (0..blocked).step_by(16) {
        let mut acc = [[F32x8::zero(); 2]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            row[0] = F32x8::load(out[r].as_ptr().add(j));
            row[1] = F32x8::load(out[r].as_ptr().add(j + 8));
        }
        let mut b_ptr = b.as_ptr().add(j0 + j);
        for p in 0..k {
            let (b0, b1) = (F32x8::load(b_ptr), F32x8::load(b_ptr.add(8)));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = F32x8::splat(*a.get_unchecked(r * k + p));
                row[0] = x.mul_add(b0, row[0]);
                row[1] = x.mul_add(b1, row[1]);
            }
            b_ptr = b_ptr.add(n);
        }
        for (r, row) in acc.iter().enumerate() {
            row[0].store(out[r].as_mut_ptr().add(j));
            row[1].store(out[r].as_mut_ptr().add(j + 8));
        }
    }
}

/// Register-blocked: a few columns of b against up to 4 rows of a at a time (4 × 2 or 2 × 4
/// dot products, 8 lanes each, in registers), so each row of b is read from memory once per
/// group of 4 rows. Each dot product is reduced the same way whatever the row count.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn rows_times_transposed_simd(a: &[f32], k: usize, b: &[f32], j0: usize, out: &mut [&mut [f32]]) {
    let width = out[0].len();
    let mut i0 = 0;
    while i0 < out.len() {
        let rows = (out.len() - i0).min(4);
        let a_rows = &a[i0 * k..(i0 + rows) * k];
        let group = &mut out[i0..i0 + rows];
        match rows {
            1 => transposed_block::<1, 4>(a_rows, k, b, j0, width, group),
            2 => transposed_block::<2, 4>(a_rows, k, b, j0, width, group),
            3 => transposed_block::<3, 2>(a_rows, k, b, j0, width, group),
            _ => transposed_block::<4, 2>(a_rows, k, b, j0, width, group),
        }
        i0 += rows;
    }
}

/// How far ahead of the block being multiplied `transposed_block` prefetches b (measured on the
/// decoding passes of `small`: 8 KiB takes 25–30 % off a 4-row pass, 15 % off a 1-row one).
const PREFETCH_BYTES: usize = 8192;

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn transposed_block<const R: usize, const CB: usize>(
    a: &[f32],
    k: usize,
    b: &[f32],
    j0: usize,
    width: usize,
    out: &mut [&mut [f32]],
) {
    let lanes = k / 8 * 8;
    let blocked = width / CB * CB;
    let prefetch_columns = (PREFETCH_BYTES / (4 * k.max(1))).max(CB);
    for j in (0..blocked).step_by(CB) {
        // no closures here: they would not inherit the target feature and stay calls
        let column_start = b.as_ptr().add((j0 + j) * k);
        let mut acc = [[F32x8::zero(); CB]; R];
        // the columns a few blocks on, a cache line at a time: the hardware prefetcher does
        // not see these short streams coming in time, and the loads below would wait on memory
        let ahead = column_start.wrapping_add(prefetch_columns * k);
        for p in (0..lanes).step_by(8) {
            if p % 16 == 0 {
                for c in 0..CB {
                    F32x8::prefetch(ahead.wrapping_add(c * k + p));
                }
            }
            let mut bv = [F32x8::zero(); CB];
            for (c, v) in bv.iter_mut().enumerate() {
                *v = F32x8::load(column_start.add(c * k + p));
            }
            for (r, row_acc) in acc.iter_mut().enumerate() {
                let x = F32x8::load(a.as_ptr().add(r * k + p));
                for c in 0..CB {
                    row_acc[c] = x.mul_add(bv[c], row_acc[c]);
                }
            }
        }
        for (r, row_acc) in acc.iter().enumerate() {
            let row = &a[r * k..(r + 1) * k];
            for (c, &lane_sums) in row_acc.iter().enumerate() {
                let column = &b[(j0 + j + c) * k..(j0 + j + c + 1) * k];
                out[r][j + c] += lane_sums.sum() + dot_scalar(&row[lanes..], &column[lanes..]);
            }
        }
    }
    for j in blocked..width {
        let column = &b[(j0 + j) * k..(j0 + j + 1) * k];
        for (r, row_out) in out.iter_mut().enumerate() {
            let row = &a[r * k..(r + 1) * k];
            let mut acc = F32x8::zero();
            for p in (0..lanes).step_by(8) {
                acc = F32x8::load(row.as_ptr().add(p)).mul_add(F32x8::load(column.as_ptr().add(p)), acc);
            }
            row_out[j] += acc.sum() + dot_scalar(&row[lanes..], &column[lanes..]);
        }
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn blocked_small_products_agree_with_scalar_references_and_do_not_depend_on_the_row_count() {
        let mut rng = Rng::new(9);
        let (k, n) = (37, 45);
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let a: Vec<f32> = (0..6 * k).map(|_| rng.normal() as f32).collect();
        let run = |m: usize, transposed: bool, fast: bool| -> Vec<f32> {
            let mut c = vec![0.5f32; m * n];
            let mut rows: Vec<&mut [f32]> = c.chunks_mut(n).collect();
            match (transposed, fast) {
                (false, true) => rows_times_normal_f32(&a[..m * k], k, &b, n, 0, &mut rows),
                (false, false) => rows_times_normal_scalar(&a[..m * k], k, &b, n, 0, &mut rows),
                (true, true) => rows_times_transposed_f32(&a[..m * k], k, &b[..n * k], 0, &mut rows),
                (true, false) => rows_times_transposed_scalar(&a[..m * k], k, &b[..n * k], 0, &mut rows),
            }
            c
        };
        for transposed in [false, true] {
            let all = run(6, transposed, true);
            let reference = run(6, transposed, false);
            assert!(all.iter().zip(&reference).all(|(x, y)| (x - y).abs() < 1e-4), "transposed {transposed}");
            // the first row alone gives bit-identical results to the first row of six
            assert_eq!(&run(1, transposed, true)[..], &all[..n]);
        }
    }

    #[test]
    #[should_panic(expected = "b too short")]
    fn a_short_b_is_refused_before_the_unchecked_loops() {
        let (k, n) = (8, 16);
        let (a, b) = (vec![1.0f32; k], vec![1.0f32; (k - 1) * n + 15]);
        let mut row = [0.0f32; 16];
        rows_times_normal_f32(&a, k, &b, n, 0, &mut [&mut row[..]]);
    }

    #[test]
    #[should_panic(expected = "rows of out differ")]
    fn rows_of_different_widths_are_refused() {
        let (a, b) = (vec![1.0f32; 16], vec![1.0f32; 8 * 16]);
        let (mut first, mut second) = (vec![0.0f32; 16], vec![0.0f32; 8]);
        rows_times_transposed_f32(&a, 8, &b, 0, &mut [&mut first[..], &mut second[..]]);
    }
}
