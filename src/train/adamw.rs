//! The AdamW optimizer over a model's parameters, with global-norm gradient clipping.
//! The update itself is `ops::optimizer::adamw_update` (eq. A1 of docs/math.md), on the device
//! where the parameters live.

use crate::error::Result;
use crate::kernels::adamw::AdamWStep;
use crate::ops::optimizer;
use crate::tensor::{Device, Float, Tensor};

/// AdamW's constants; the learning rate comes with each step, from the schedule.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β1, the decay of the first moment m
    pub beta1: f64,
    /// β2, the decay of the second moment v
    pub beta2: f64,
    /// ε, added to √v̂ in the denominator
    pub eps: f64,
    /// decoupled weight decay per unit of learning rate, on matrices only
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

impl AdamWConfig {
    /// Checks the constants: β1 and β2 in [0, 1), ε positive, weight decay non-negative, all
    /// finite.
    pub fn validate(&self) -> Result<()> {
        let unit = |b: f64| (0.0..1.0).contains(&b);
        if !(unit(self.beta1) && unit(self.beta2)) {
            return crate::invalid!("AdamW's betas ({}, {}) must lie in [0, 1)", self.beta1, self.beta2);
        }
        if !(self.eps > 0.0 && self.eps.is_finite() && self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return crate::invalid!(
                "AdamW's eps ({}) must be positive and its weight decay ({}) non-negative",
                self.eps,
                self.weight_decay
            );
        }
        Ok(())
    }
}

/// Optimizer state: first and second moments per parameter tensor, and the step count.
#[derive(Clone, Debug)]
pub struct AdamW<T: Float> {
    /// the constants
    pub config: AdamWConfig,
    /// exp_avg, one per parameter, in the parameters' order
    pub m: Vec<Tensor<T>>,
    /// exp_avg_sq
    pub v: Vec<Tensor<T>>,
    /// updates taken so far
    pub t: u64,
}

impl<T: Float> AdamW<T> {
    /// A fresh optimizer (zero moments, t = 0) for parameters of the given shapes, on the CPU.
    pub fn new(config: AdamWConfig, params: &[&Tensor<T>]) -> Self {
        let zeros = || params.iter().map(|p| Tensor::zeros(p.shape())).collect();
        AdamW { config, m: zeros(), v: zeros(), t: 0 }
    }

    /// The same state with its moments on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let moved = |moments: &[Tensor<T>]| moments.iter().map(|t| t.to_device(device)).collect::<Result<Vec<_>>>();
        Ok(AdamW { config: self.config, m: moved(&self.m)?, v: moved(&self.v)?, t: self.t })
    }

    /// One update, each gradient multiplied by `grad_scale` first (see [`clip_scale`]).
    /// Parameters without a gradient (frozen) are left alone. Weight decay applies to matrices
    /// only (two or more dimensions), as in GPT-2 training practice.
    pub fn step(&mut self, params: &mut [&mut Tensor<T>], grads: &[Option<&Tensor<T>>], lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let step = AdamWStep { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay, t: self.t, grad_scale };
        optimizer::adamw_update(params, grads, &mut self.m, &mut self.v, &step)
    }
}

/// The global L2 norm of the gradients, in f64.
pub fn grad_norm<T: Float>(grads: &[Option<Tensor<T>>]) -> Result<f64> {
    let present: Vec<&Tensor<T>> = grads.iter().flatten().collect();
    Ok(optimizer::sum_of_squares(&present)?.sqrt())
}

/// What global-norm clipping multiplies the gradients by: PyTorch's `clip_grad_norm_`, factor
/// `max_norm / (norm + 1e-6)` when that is below 1, else 1.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        factor
    } else {
        1.0
    }
}
