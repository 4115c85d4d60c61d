//! One LayerNorm row: `out = (x − mean) · rstd · weight + bias`,
//! `rstd = 1 / √(var + 1e-5)` with the biased variance (docs/math.md, eq. LN1), and its backward:
//! `dx = rstd · (dnorm − mean(dnorm) − norm · mean(dnorm · norm))`, `dnorm = dout · weight`,
//! `dweight += dout · norm`, `dbias += dout`   (eq. LN2)

use super::simd::F32x8;
use super::Float;

/// ε, added to the variance before the square root (GPT-2's `layer_norm_epsilon`).
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

/// [`forward_row_scalar`] for f32, with the vector loop where the CPU has one.
pub fn forward_row_f32(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) -> (f32, f32) {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { forward_row_simd(x, weight, bias, out) };
    }
    forward_row_scalar(x, weight, bias, out)
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn forward_row_simd(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) -> (f32, f32) {
    let c = x.len();
    assert!(weight.len() == c && bias.len() == c && out.len() == c);
    let lanes = c / 8 * 8;
    let mut vsum = F32x8::zero();
    for i in (0..lanes).step_by(8) {
        vsum = vsum + F32x8::load(x.as_ptr().add(i));
    }
    let mean = (vsum.sum() + x[lanes..].iter().sum::<f32>()) / c as f32;
    let vmean = F32x8::splat(mean);
    let mut vvar = F32x8::zero();
    for i in (0..lanes).step_by(8) {
        let d = F32x8::load(x.as_ptr().add(i)) - vmean;
        vvar = d.mul_add(d, vvar);
    }
    let var = (vvar.sum() + x[lanes..].iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()) / c as f32;
    let rstd = 1.0 / (var + EPS as f32).sqrt();
    let vrstd = F32x8::splat(rstd);
    for i in (0..lanes).step_by(8) {
        let norm = (F32x8::load(x.as_ptr().add(i)) - vmean) * vrstd;
        norm.mul_add(F32x8::load(weight.as_ptr().add(i)), F32x8::load(bias.as_ptr().add(i))).store(out.as_mut_ptr().add(i));
    }
    for i in lanes..c {
        out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
    }
    (mean, rstd)
}

/// The backward of one row (LN2), given the forward's `mean` and `rstd`: writes `dx`, adds
/// into `dweight` and `dbias`. The reference for any float type.
#[allow(clippy::too_many_arguments)]
pub fn backward_row_scalar<T: Float>(
    x: &[T],
    dout: &[T],
    weight: &[T],
    mean: T,
    rstd: T,
    dx: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
) {
    let c = x.len();
    let (mut dnorm_mean, mut dnorm_norm_mean) = (T::zero(), T::zero());
    for j in 0..c {
        let norm = (x[j] - mean) * rstd;
        let dnorm = dout[j] * weight[j];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
        dweight[j] += dout[j] * norm;
        dbias[j] += dout[j];
    }
    let inv_c = T::one() / T::of(c as f64);
    dnorm_mean *= inv_c;
    dnorm_norm_mean *= inv_c;
    for j in 0..c {
        let norm = (x[j] - mean) * rstd;
        let dnorm = dout[j] * weight[j];
        dx[j] = rstd * (dnorm - dnorm_mean - norm * dnorm_norm_mean);
    }
}

/// [`backward_row_scalar`] for f32, with the vector loop where the CPU has one and C is a
/// multiple of 8.
#[allow(clippy::too_many_arguments)]
pub fn backward_row_f32(
    x: &[f32],
    dout: &[f32],
    weight: &[f32],
    mean: f32,
    rstd: f32,
    dx: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
) {
    if super::simd_available() && x.len().is_multiple_of(8) {
        // SAFETY: the vector unit was detected above.
        return unsafe { backward_row_simd(x, dout, weight, mean, rstd, dx, dweight, dbias) };
    }
    backward_row_scalar(x, dout, weight, mean, rstd, dx, dweight, dbias)
}

/// Rows whose width is a multiple of 8 (every preset's C).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_row_simd(
    x: &[f32],
    dout: &[f32],
    weight: &[f32],
    mean: f32,
    rstd: f32,
    dx: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
) {
    let c = x.len();
    assert!(c.is_multiple_of(8) && dout.len() == c && weight.len() == c && dx.len() == c && dweight.len() == c && dbias.len() == c);
    let (vmean, vrstd) = (F32x8::splat(mean), F32x8::splat(rstd));
    let (mut sum_dnorm, mut sum_dnorm_norm) = (F32x8::zero(), F32x8::zero());
    for j in (0..c).step_by(8) {
        let norm = (F32x8::load(x.as_ptr().add(j)) - vmean) * vrstd;
        let g = F32x8::load(dout.as_ptr().add(j));
        let dnorm = g * F32x8::load(weight.as_ptr().add(j));
        sum_dnorm = sum_dnorm + dnorm;
        sum_dnorm_norm = dnorm.mul_add(norm, sum_dnorm_norm);
        g.mul_add(norm, F32x8::load(dweight.as_ptr().add(j))).store(dweight.as_mut_ptr().add(j));
        (g + F32x8::load(dbias.as_ptr().add(j))).store(dbias.as_mut_ptr().add(j));
    }
    let inv_c = 1.0 / c as f32;
    let dnorm_mean = F32x8::splat(sum_dnorm.sum() * inv_c);
    let dnorm_norm_mean = F32x8::splat(sum_dnorm_norm.sum() * inv_c);
    for j in (0..c).step_by(8) {
        let norm = (F32x8::load(x.as_ptr().add(j)) - vmean) * vrstd;
        let dnorm = F32x8::load(dout.as_ptr().add(j)) * F32x8::load(weight.as_ptr().add(j));
        let centered = norm.neg_mul_add(dnorm_norm_mean, dnorm - dnorm_mean);
        (vrstd * centered).store(dx.as_mut_ptr().add(j));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

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

    #[test]
    fn simd_layernorm_backward_agrees_with_scalar_reference() {
        let mut rng = Rng::new(4);
        let c = 64;
        let gen = |rng: &mut Rng| (0..c).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let (x, g, w) = (gen(&mut rng), gen(&mut rng), gen(&mut rng));
        let (mean, rstd) = forward_row_scalar(&x, &w, &w, &mut vec![0.0; c]);
        let (mut dx1, mut dw1, mut db1) = (vec![0.0; c], vec![0.5; c], vec![0.5; c]);
        let (mut dx2, mut dw2, mut db2) = (vec![0.0; c], vec![0.5; c], vec![0.5; c]);
        backward_row_f32(&x, &g, &w, mean, rstd, &mut dx1, &mut dw1, &mut db1);
        backward_row_scalar(&x, &g, &w, mean, rstd, &mut dx2, &mut dw2, &mut db2);
        for (a, b) in [(&dx1, &dx2), (&dw1, &dw2), (&db1, &db2)] {
            let worst = a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "layernorm backward differs by {worst}");
        }
    }
}
