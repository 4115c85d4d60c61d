//! The AdamW optimizer over a model's parameters, with global-norm gradient clipping.
//! The update itself is `kernels::adamw` (eq. A1 of docs/math.md).

use rayon::prelude::*;

use crate::kernels::adamw::AdamWStep;
use crate::tensor::{Float, Tensor};

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// Optimizer state: first and second moments per parameter tensor, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW<T: Float> {
    pub config: AdamWConfig,
    /// exp_avg, one per parameter, in the parameters' order
    pub m: Vec<Tensor<T>>,
    /// exp_avg_sq
    pub v: Vec<Tensor<T>>,
    /// updates taken so far
    pub t: u64,
}

const CHUNK: usize = 1 << 14;

impl<T: Float> AdamW<T> {
    pub fn new(config: AdamWConfig, params: &[&Tensor<T>]) -> Self {
        let zeros = || params.iter().map(|p| Tensor::zeros(p.shape())).collect();
        AdamW { config, m: zeros(), v: zeros(), t: 0 }
    }

    /// One update. Parameters without a gradient (frozen) are left alone. Weight decay applies
    /// to matrices only (two or more dimensions), as in GPT-2 training practice.
    pub fn step(&mut self, params: &mut [&mut Tensor<T>], grads: &[Option<&Tensor<T>>], lr: f64) {
        self.t += 1;
        for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let weight_decay = if param.shape().len() >= 2 { self.config.weight_decay } else { 0.0 };
            let step = AdamWStep { lr, beta1: self.config.beta1, beta2: self.config.beta2, eps: self.config.eps, weight_decay, t: self.t };
            param
                .data_mut()
                .par_chunks_mut(CHUNK)
                .zip(grad.data().par_chunks(CHUNK))
                .zip(self.m[i].data_mut().par_chunks_mut(CHUNK).zip(self.v[i].data_mut().par_chunks_mut(CHUNK)))
                .for_each(|((p, g), (m, v))| T::adamw_update(p, g, m, v, &step));
        }
    }
}

/// Scales the gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when that is below 1). Returns the
/// norm before clipping.
pub fn clip_grad_norm<T: Float>(grads: &mut [Option<Tensor<T>>], max_norm: f64) -> f64 {
    let norm = grads.iter().flatten().map(|g| g.sum_of_squares()).sum::<f64>().sqrt();
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        let factor = T::of(factor);
        for g in grads.iter_mut().flatten() {
            g.data_mut().par_iter_mut().for_each(|x| *x *= factor);
        }
    }
    norm
}
