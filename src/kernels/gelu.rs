//! GELU with the tanh approximation (GPT-2's `gelu_new`):
//! `gelu(x) = ½ x (1 + tanh(u))`, `u = √(2/π) (x + 0.044715 x³)`   (docs/math.md, eq. G1)
//! `gelu'(x) = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²)`, `t = tanh(u)`   (eq. G2)

use super::simd::F32x8;
use super::Float;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const CUBIC: f64 = 0.044715;

/// `out = gelu(x)` element by element (G1): the reference for any float type.
pub fn forward_scalar<T: Float>(x: &[T], out: &mut [T]) {
    let (s, c, half, one) = (T::of(SQRT_2_OVER_PI), T::of(CUBIC), T::of(0.5), T::one());
    for (o, &xi) in out.iter_mut().zip(x) {
        let u = s * (xi + c * xi * xi * xi);
        *o = half * xi * (one + u.tanh());
    }
}

/// `dx += dout · gelu'(x)` element by element (G2): the reference for any float type.
pub fn backward_scalar<T: Float>(x: &[T], dout: &[T], dx: &mut [T]) {
    let (s, c, half, one, three) = (T::of(SQRT_2_OVER_PI), T::of(CUBIC), T::of(0.5), T::one(), T::of(3.0));
    for ((d, &xi), &g) in dx.iter_mut().zip(x).zip(dout) {
        let u = s * (xi + c * xi * xi * xi);
        let t = u.tanh();
        let local = half * (one + t) + half * xi * (one - t * t) * s * (one + three * c * xi * xi);
        *d += g * local;
    }
}

/// [`forward_scalar`] for f32, with the vector loop where the CPU has one.
pub fn forward_f32(x: &[f32], out: &mut [f32]) {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { forward_simd(x, out) };
    }
    forward_scalar(x, out)
}

/// [`backward_scalar`] for f32, with the vector loop where the CPU has one.
pub fn backward_f32(x: &[f32], dout: &[f32], dx: &mut [f32]) {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { backward_simd(x, dout, dx) };
    }
    backward_scalar(x, dout, dx)
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn forward_simd(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let lanes = x.len() / 8 * 8;
    let (s, c, half, one) = (F32x8::splat(SQRT_2_OVER_PI as f32), F32x8::splat(CUBIC as f32), F32x8::splat(0.5), F32x8::splat(1.0));
    for i in (0..lanes).step_by(8) {
        let xi = F32x8::load(x.as_ptr().add(i));
        let u = s * (c * xi * xi).mul_add(xi, xi);
        (half * xi * (one + u.tanh())).store(out.as_mut_ptr().add(i));
    }
    forward_scalar(&x[lanes..], &mut out[lanes..]);
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn backward_simd(x: &[f32], dout: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dout.len() && x.len() == dx.len());
    let lanes = x.len() / 8 * 8;
    let (s, c, half, one, c3) = (
        F32x8::splat(SQRT_2_OVER_PI as f32),
        F32x8::splat(CUBIC as f32),
        F32x8::splat(0.5),
        F32x8::splat(1.0),
        F32x8::splat(3.0 * CUBIC as f32),
    );
    for i in (0..lanes).step_by(8) {
        let xi = F32x8::load(x.as_ptr().add(i));
        let x2 = xi * xi;
        let t = (s * (c * x2).mul_add(xi, xi)).tanh();
        let sech2 = t.neg_mul_add(t, one);
        let du = s * c3.mul_add(x2, one);
        let local = (half * xi * sech2).mul_add(du, half * (one + t));
        let g = F32x8::load(dout.as_ptr().add(i));
        g.mul_add(local, F32x8::load(dx.as_ptr().add(i))).store(dx.as_mut_ptr().add(i));
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
