//! One LayerNorm row: `out = (x − mean) · rstd · weight + bias`,
//! `rstd = 1 / √(var + 1e-5)` with the biased variance (docs/math.md, eq. LN1).

use crate::tensor::Float;

pub const EPS: f64 = 1e-5;

/// Returns `(mean, rstd)`, which the backward pass reuses.
pub fn forward_row_scalar<T: Float>(x: &[T], weight: &[T], bias: &[T], out: &mut [T]) -> (T, T) {
    let n = T::of(x.len() as f64);
    let mean = x.iter().copied().sum::<T>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
    let rstd = T::one() / (var + T::of(EPS)).sqrt();
    for i in 0..x.len() {
        out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
    }
    (mean, rstd)
}

pub fn forward_row_f32(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        // SAFETY: AVX2 and FMA were detected above.
        return unsafe { forward_row_avx2(x, weight, bias, out) };
    }
    forward_row_scalar(x, weight, bias, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_row_avx2(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) -> (f32, f32) {
    use super::simd;
    use std::arch::x86_64::*;
    let c = x.len();
    assert!(weight.len() == c && bias.len() == c && out.len() == c);
    let lanes = c / 8 * 8;
    let mut vsum = _mm256_setzero_ps();
    for i in (0..lanes).step_by(8) {
        vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(x.as_ptr().add(i)));
    }
    let mean = (simd::hsum(vsum) + x[lanes..].iter().sum::<f32>()) / c as f32;
    let vmean = _mm256_set1_ps(mean);
    let mut vvar = _mm256_setzero_ps();
    for i in (0..lanes).step_by(8) {
        let d = _mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vmean);
        vvar = _mm256_fmadd_ps(d, d, vvar);
    }
    let var = (simd::hsum(vvar) + x[lanes..].iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()) / c as f32;
    let rstd = 1.0 / (var + EPS as f32).sqrt();
    let vrstd = _mm256_set1_ps(rstd);
    for i in (0..lanes).step_by(8) {
        let norm = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vmean), vrstd);
        let y = _mm256_fmadd_ps(norm, _mm256_loadu_ps(weight.as_ptr().add(i)), _mm256_loadu_ps(bias.as_ptr().add(i)));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
    }
    for i in lanes..c {
        out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
    }
    (mean, rstd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Rng;

    #[test]
    fn simd_layernorm_agrees_with_scalar_reference() {
        let mut rng = Rng::new(3);
        for c in [5, 64, 77] {
            let gen = |rng: &mut Rng| (0..c).map(|_| (rng.normal() * 2.0 + 0.5) as f32).collect::<Vec<f32>>();
            let (x, w, b) = (gen(&mut rng), gen(&mut rng), gen(&mut rng));
            let (mut fast, mut reference) = (vec![0.0; c], vec![0.0; c]);
            let (m1, r1) = forward_row_f32(&x, &w, &b, &mut fast);
            let (m2, r2) = forward_row_scalar(&x, &w, &b, &mut reference);
            assert!((m1 - m2).abs() < 1e-5 && (r1 - r2).abs() < 1e-5 * r2);
            let worst = fast.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "layernorm of width {c} differs by {worst}");
        }
    }
}
