//! AdamW with PyTorch's semantics (`torch.optim.AdamW`, decoupled weight decay):
//! `p ← p·(1 − lr·wd)`, `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`,
//! `p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`   (docs/math.md, eq. A1)

use super::simd::F32x8;
use super::Float;

/// The constants of one update, shared by every parameter tensor of a step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// the learning rate of this step
    pub lr: f64,
    /// β1, the decay of the first moment
    pub beta1: f64,
    /// β2, the decay of the second moment
    pub beta2: f64,
    /// ε, added to the bias-corrected √v
    pub eps: f64,
    /// decoupled weight decay: parameters shrink by `lr · weight_decay` of themselves
    pub weight_decay: f64,
    /// 1-based step count, for bias correction.
    pub t: u64,
    /// Each gradient is multiplied by this first (global-norm clipping; 1 for none).
    pub grad_scale: f64,
}

impl AdamWStep {
    fn bias_corrections(&self) -> (f64, f64) {
        (1.0 - self.beta1.powi(self.t as i32), 1.0 - self.beta2.powi(self.t as i32))
    }
}

/// One AdamW update of `params` and its moments `m`, `v` from `grads`, element by element: the
/// reference for any float type.
pub fn update_scalar<T: Float>(params: &mut [T], grads: &[T], m: &mut [T], v: &mut [T], step: &AdamWStep) {
    let (bc1, bc2) = step.bias_corrections();
    let (b1, b2) = (T::of(step.beta1), T::of(step.beta2));
    let (one, decay, lr, eps) = (T::one(), T::of(1.0 - step.lr * step.weight_decay), T::of(step.lr), T::of(step.eps));
    let (bc1, bc2_sqrt, scale) = (T::of(bc1), T::of(bc2.sqrt()), T::of(step.grad_scale));
    for i in 0..params.len() {
        let g = grads[i] * scale;
        m[i] = b1 * m[i] + (one - b1) * g;
        v[i] = b2 * v[i] + (one - b2) * g * g;
        let denom = v[i].sqrt() / bc2_sqrt + eps;
        params[i] = params[i] * decay - lr * (m[i] / bc1) / denom;
    }
}

/// [`update_scalar`] for f32, with the vector loop where the CPU has one.
pub fn update_f32(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    if super::simd_available() {
        // SAFETY: the vector unit was detected above.
        return unsafe { update_simd(params, grads, m, v, step) };
    }
    update_scalar(params, grads, m, v, step)
}

#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn update_simd(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &AdamWStep) {
    let n = params.len();
    assert!(grads.len() == n && m.len() == n && v.len() == n);
    let (bc1, bc2) = step.bias_corrections();
    let lane = F32x8::zero();
    let constant = |value: f64| lane.splat_like(value as f32);
    let (b1, b2, one_b1, one_b2) = (constant(step.beta1), constant(step.beta2), constant(1.0 - step.beta1), constant(1.0 - step.beta2));
    let (decay, lr, eps) = (constant(1.0 - step.lr * step.weight_decay), constant(step.lr), constant(step.eps));
    let (bc1, bc2_sqrt, scale) = (constant(bc1), constant(bc2.sqrt()), constant(step.grad_scale));
    let lanes = n / 8 * 8;
    for i in (0..lanes).step_by(8) {
        let g = F32x8::load(grads.as_ptr().add(i)) * scale;
        let mi = b1 * F32x8::load(m.as_ptr().add(i)) + one_b1 * g;
        let vi = b2 * F32x8::load(v.as_ptr().add(i)) + one_b2 * g * g;
        mi.store(m.as_mut_ptr().add(i));
        vi.store(v.as_mut_ptr().add(i));
        let denom = vi.sqrt() / bc2_sqrt + eps;
        let update = lr * (mi / bc1) / denom;
        (F32x8::load(params.as_ptr().add(i)) * decay - update).store(params.as_mut_ptr().add(i));
    }
    update_scalar(&mut params[lanes..], &grads[lanes..], &mut m[lanes..], &mut v[lanes..], step);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn simd_adamw_agrees_with_scalar_reference() {
        let mut rng = Rng::new(4);
        let n = 1001;
        let gen = |rng: &mut Rng, s: f64| (0..n).map(|_| (rng.normal() * s) as f32).collect::<Vec<f32>>();
        let (p, g, m) = (gen(&mut rng, 1.0), gen(&mut rng, 0.1), gen(&mut rng, 0.01));
        let v: Vec<f32> = gen(&mut rng, 0.01).iter().map(|x| x * x).collect();
        let step = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7, grad_scale: 0.75 };
        let (mut p1, mut m1, mut v1) = (p.clone(), m.clone(), v.clone());
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        update_f32(&mut p1, &g, &mut m1, &mut v1, &step);
        update_scalar(&mut p2, &g, &mut m2, &mut v2, &step);
        for (a, b) in [(&p1, &p2), (&m1, &m2), (&v1, &v2)] {
            let worst = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() / y.abs().max(1e-3)).fold(0.0, f32::max);
            assert!(worst < 1e-5, "adamw differs by {worst}");
        }
    }
}
