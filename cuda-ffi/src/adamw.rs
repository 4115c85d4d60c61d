//! `kernels/adamw.cu`: AdamW over every parameter tensor of a model in one launch.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::constants::{ADAMW_CHUNK, THREADS};
use crate::elementwise::first_blocks;
use crate::memory::{same_lengths, View};
use crate::{Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/adamw.cu");

kernel_table! {
    tensors: "adamw_tensors",
}

/// The constants of one AdamW update (PyTorch semantics; `t` counts from 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// the learning rate
    pub lr: f32,
    /// β1, the decay of the first moment
    pub beta1: f32,
    /// β2, the decay of the second moment
    pub beta2: f32,
    /// ε, added to the bias-corrected √v
    pub eps: f32,
    /// the step count, from 1, for the bias corrections
    pub t: u32,
    /// the gradient is multiplied by this first (global-norm clipping; 1 for none)
    pub grad_scale: f32,
}

/// One parameter tensor to update: the parameter, its gradient, its two moments (all of one
/// length), and its weight decay.
#[derive(Clone, Copy, Debug)]
pub struct AdamWSegment {
    /// the parameter, updated in place
    pub param: View<f32>,
    /// its gradient
    pub grad: View<f32>,
    /// the first moment, updated in place
    pub m: View<f32>,
    /// the second moment, updated in place
    pub v: View<f32>,
    /// decoupled weight decay for this tensor (0 for vectors and biases in GPT-2 practice)
    pub weight_decay: f32,
}

impl Gpu {
    /// One AdamW update of every segment, in one launch.
    pub fn adamw_update(&self, segments: &[AdamWSegment], step: AdamWStep) -> Result<()> {
        for s in segments {
            same_lengths("adamw_update", &[s.param, s.grad, s.m, s.v])?;
        }
        let first_block = first_blocks(segments.iter().map(|s| s.param.len()), ADAMW_CHUNK);
        let blocks = first_block[segments.len()] as usize;
        if blocks == 0 {
            return Ok(());
        }
        let table = |view: fn(&AdamWSegment) -> View<f32>| self.upload(&segments.iter().map(|s| view(s).ptr).collect::<Vec<u64>>());
        let (params, grads, ms, vs) = (table(|s| s.param)?, table(|s| s.grad)?, table(|s| s.m)?, table(|s| s.v)?);
        let lengths = self.upload(&segments.iter().map(|s| s.param.len() as i64).collect::<Vec<_>>())?;
        let decays = self.upload(&segments.iter().map(|s| s.weight_decay).collect::<Vec<_>>())?;
        let starts = self.upload(&first_block)?;
        let bias_correction1 = 1.0 - step.beta1.powi(step.t as i32);
        let bias_correction2_sqrt = (1.0 - step.beta2.powi(step.t as i32)).sqrt();
        let tensors = segments.len() as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.adamw.tensors);
        launch.arg(params.device_ptr()).arg(grads.device_ptr()).arg(ms.device_ptr()).arg(vs.device_ptr());
        launch.arg(lengths.device_ptr()).arg(decays.device_ptr()).arg(starts.device_ptr()).arg(&tensors);
        launch.arg(&step.grad_scale).arg(&step.lr).arg(&step.beta1).arg(&step.beta2).arg(&step.eps);
        launch.arg(&bias_correction1).arg(&bias_correction2_sqrt);
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: block b updates chunk b − first_block[s] of segment s, inside its length; the
        // four views of a segment hold that length (checked).
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}
