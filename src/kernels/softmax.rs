//! Softmax of one row, in place: `p_j = exp(x_j − max x) / Σ_k exp(x_k − max x)`.
//! Returns the row's log-sum-exp, `max x + ln Σ_k exp(x_k − max x)`, which losses need.

use super::simd::F32x8;
use super::Float;

/// The row becomes its softmax; returns its log-sum-exp. The reference for any float type.
pub fn softmax_row_scalar<T: Float>(row: &mut [T]) -> T {
    let max = row.iter().copied().fold(T::neg_infinity(), T::max);
    let mut sum = T::zero();
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = T::one() / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    max + sum.ln()
}

/// [`softmax_row_scalar`] for f32, with the vector loop where the CPU has one.
pub fn softmax_row_f32(row: &mut [f32]) -> f32 {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { softmax_row_simd(row) };
    }
    softmax_row_scalar(row)
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn softmax_row_simd(row: &mut [f32]) -> f32 {
    let lanes = row.len() / 8 * 8;
    let ptr = row.as_mut_ptr();
    let mut vmax = F32x8::splat(f32::NEG_INFINITY);
    for i in (0..lanes).step_by(8) {
        vmax = vmax.max(F32x8::load(ptr.add(i)));
    }
    let max = row[lanes..].iter().copied().fold(vmax.max_lane(), f32::max);
    let vm = F32x8::splat(max);
    let mut vsum = F32x8::zero();
    for i in (0..lanes).step_by(8) {
        let e = (F32x8::load(ptr.add(i)) - vm).exp();
        e.store(ptr.add(i));
        vsum = vsum + e;
    }
    let mut sum = vsum.sum();
    for x in row[lanes..].iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = F32x8::splat(1.0 / sum);
    // the pointer again: the loop over the tail above borrowed the row anew
    let ptr = row.as_mut_ptr();
    for i in (0..lanes).step_by(8) {
        (F32x8::load(ptr.add(i)) * inv).store(ptr.add(i));
    }
    for x in row[lanes..].iter_mut() {
        *x /= sum;
    }
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn simd_softmax_agrees_with_scalar_reference() {
        let mut rng = Rng::new(2);
        for len in [1, 7, 8, 9, 64, 131] {
            let x: Vec<f32> = (0..len).map(|_| (rng.normal() * 5.0) as f32).collect();
            let (mut fast, mut reference) = (x.clone(), x.clone());
            let lse_fast = softmax_row_f32(&mut fast);
            let lse_reference = softmax_row_scalar(&mut reference);
            assert!((lse_fast - lse_reference).abs() < 1e-5);
            let worst = fast.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-6, "softmax of length {len} differs by {worst}");
            assert!((fast.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn a_nan_in_the_row_is_not_hidden() {
        for at in [0, 3, 9, 16] {
            let mut row: Vec<f32> = (0..17).map(|i| i as f32 * 0.1).collect();
            row[at] = f32::NAN;
            assert!(softmax_row_f32(&mut row).is_nan(), "a NaN at {at} vanished");
        }
    }
}
