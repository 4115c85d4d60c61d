//! GELU with the tanh approximation (GPT-2's `gelu_new`):
//! `gelu(x) = ½ x (1 + tanh(u))`, `u = √(2/π) (x + 0.044715 x³)`   (docs/math.md, eq. G1)
//! `gelu'(x) = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²)`, `t = tanh(u)`   (eq. G2)

use super::Float;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const CUBIC: f64 = 0.044715;

pub fn forward_scalar<T: Float>(x: &[T], out: &mut [T]) {
    let (s, c, half, one) = (T::of(SQRT_2_OVER_PI), T::of(CUBIC), T::of(0.5), T::one());
    for (o, &xi) in out.iter_mut().zip(x) {
        let u = s * (xi + c * xi * xi * xi);
        *o = half * xi * (one + u.tanh());
    }
}

pub fn backward_scalar<T: Float>(x: &[T], dout: &[T], dx: &mut [T]) {
    let (s, c, half, one, three) = (T::of(SQRT_2_OVER_PI), T::of(CUBIC), T::of(0.5), T::one(), T::of(3.0));
    for ((d, &xi), &g) in dx.iter_mut().zip(x).zip(dout) {
        let u = s * (xi + c * xi * xi * xi);
        let t = u.tanh();
        let local = half * (one + t) + half * xi * (one - t * t) * s * (one + three * c * xi * xi);
        *d += g * local;
    }
}

pub fn forward_f32(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        // SAFETY: AVX2 and FMA were detected above.
        return unsafe { forward_avx2(x, out) };
    }
    forward_scalar(x, out)
}

pub fn backward_f32(x: &[f32], dout: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd_available() {
        // SAFETY: AVX2 and FMA were detected above.
        return unsafe { backward_avx2(x, dout, dx) };
    }
    backward_scalar(x, dout, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), out.len());
    let lanes = x.len() / 8 * 8;
    let (s, c, half, one) = (_mm256_set1_ps(SQRT_2_OVER_PI as f32), _mm256_set1_ps(CUBIC as f32), _mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    for i in (0..lanes).step_by(8) {
        let xi = _mm256_loadu_ps(x.as_ptr().add(i));
        let x3 = _mm256_mul_ps(_mm256_mul_ps(xi, xi), xi);
        let u = _mm256_mul_ps(s, _mm256_fmadd_ps(c, x3, xi));
        let t = super::simd::tanh(u);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(half, xi), _mm256_add_ps(one, t)));
    }
    forward_scalar(&x[lanes..], &mut out[lanes..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2(x: &[f32], dout: &[f32], dx: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(x.len() == dout.len() && x.len() == dx.len());
    let lanes = x.len() / 8 * 8;
    let (s, c, half, one, c3) = (
        _mm256_set1_ps(SQRT_2_OVER_PI as f32),
        _mm256_set1_ps(CUBIC as f32),
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(3.0 * CUBIC as f32),
    );
    for i in (0..lanes).step_by(8) {
        let xi = _mm256_loadu_ps(x.as_ptr().add(i));
        let x2 = _mm256_mul_ps(xi, xi);
        let u = _mm256_mul_ps(s, _mm256_fmadd_ps(_mm256_mul_ps(c, x2), xi, xi));
        let t = super::simd::tanh(u);
        let sech2 = _mm256_fnmadd_ps(t, t, one);
        let du = _mm256_mul_ps(s, _mm256_fmadd_ps(c3, x2, one));
        let local = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(half, xi), sech2), du, _mm256_mul_ps(half, _mm256_add_ps(one, t)));
        let g = _mm256_loadu_ps(dout.as_ptr().add(i));
        let d = _mm256_loadu_ps(dx.as_ptr().add(i));
        _mm256_storeu_ps(dx.as_mut_ptr().add(i), _mm256_fmadd_ps(g, local, d));
    }
    backward_scalar(&x[lanes..], &dout[lanes..], &mut dx[lanes..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn simd_gelu_agrees_with_scalar_reference() {
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..1003).map(|_| (rng.normal() * 4.0) as f32).collect();
        let dout: Vec<f32> = (0..1003).map(|_| rng.normal() as f32).collect();
        let (mut fast, mut reference) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        forward_f32(&x, &mut fast);
        forward_scalar(&x, &mut reference);
        let worst = fast.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 2e-6, "gelu forward differs by {worst}");
        let (mut fast, mut reference) = (vec![0.5; x.len()], vec![0.5; x.len()]);
        backward_f32(&x, &dout, &mut fast);
        backward_scalar(&x, &dout, &mut reference);
        let worst = fast.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 5e-6, "gelu backward differs by {worst}");
    }
}
