//! What an optimizer does to whole tensors outside the tape, on each device: the global sum of
//! squares of the gradients (for clipping), and the AdamW update (eq. A1 of docs/math.md) of
//! every parameter in place. On a GPU each is one launch over all the tensors, as PyTorch's
//! fused AdamW; its sums run in a fixed order, so a step's result is the same on every run.

use multitoken_cuda::{AdamWSegment, AdamWStep as GpuStep};
use rayon::prelude::*;

use super::{place, Place};
use crate::error::Result;
use crate::kernels::adamw::AdamWStep;
use crate::tensor::{Float, Tensor};

const CHUNK: usize = 1 << 14;

/// `Σ_tensors Σ x²`, in f64.
pub fn sum_of_squares<T: Float>(tensors: &[&Tensor<T>]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    match place("sum_of_squares", tensors)? {
        Place::Cpu => Ok(tensors.iter().map(|t| t.sum_of_squares()).sum()),
        Place::Cuda(gpu) => {
            let views: Vec<_> = tensors.iter().map(|t| super::on_gpu(t)).collect();
            Ok(gpu.sums_of_squares(&views)?.into_iter().sum())
        }
    }
}

/// One AdamW update of `params[i]` from `grads[i]` (parameters without a gradient are left
/// alone) with moments `m[i]`, `v[i]`, all on one device. Weight decay applies to matrices only
/// (two or more dimensions), as in GPT-2 training practice; `step.weight_decay` is theirs.
pub fn adamw_update<T: Float>(
    params: &mut [&mut Tensor<T>],
    grads: &[Option<&Tensor<T>>],
    m: &mut [Tensor<T>],
    v: &mut [Tensor<T>],
    step: &AdamWStep,
) -> Result<()> {
    let decay_of = |param: &Tensor<T>| if param.shape().len() >= 2 { step.weight_decay } else { 0.0 };
    if params.is_empty() {
        return Ok(());
    }
    let mut tensors: Vec<&Tensor<T>> = params.iter().map(|p| &**p).collect();
    tensors.extend(grads.iter().flatten().copied().chain(m.iter()).chain(v.iter()));
    let placed = place("adamw_update", &tensors)?;
    drop(tensors);
    match placed {
        Place::Cpu => {
            for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
                let Some(grad) = grad else { continue };
                let step = AdamWStep { weight_decay: decay_of(param), ..*step };
                param
                    .data_mut()
                    .par_chunks_mut(CHUNK)
                    .zip(grad.data().par_chunks(CHUNK))
                    .zip(m[i].data_mut().par_chunks_mut(CHUNK).zip(v[i].data_mut().par_chunks_mut(CHUNK)))
                    .for_each(|((p, g), (m, v))| T::adamw_update(p, g, m, v, &step));
            }
            Ok(())
        }
        Place::Cuda(gpu) => {
            let mut segments = Vec::with_capacity(params.len());
            for ((param, grad), (m, v)) in params.iter_mut().zip(grads).zip(m.iter_mut().zip(v.iter_mut())) {
                let Some(grad) = grad else { continue };
                let weight_decay = decay_of(param) as f32;
                let writable = |t: &mut Tensor<T>| Ok::<_, crate::error::Error>(t.cuda_mut()?.expect("placed on the GPU above").view());
                let (param, grad) = (writable(param)?, super::on_gpu(grad));
                segments.push(AdamWSegment { param, grad, m: writable(m)?, v: writable(v)?, weight_decay });
            }
            let (lr, beta1, beta2, eps) = (step.lr as f32, step.beta1 as f32, step.beta2 as f32, step.eps as f32);
            let gpu_step = GpuStep { lr, beta1, beta2, eps, t: step.t as u32, grad_scale: step.grad_scale as f32 };
            Ok(gpu.adamw_update(&segments, gpu_step)?)
        }
    }
}
