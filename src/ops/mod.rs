//! Differentiable ops, forward and backward side by side, each with its f64 finite-difference
//! gradient check: the model's coarse ops (a linear layer, attention, the whole CP head: one tape
//! entry each, with a hand-written backward) and the general ones a model is composed from by
//! hand (arithmetic with broadcasting, elementwise functions, sums, matrix products, softmax,
//! shapes). Every op takes vars on a [`Tape`](crate::autograd::Tape),
//! computes its output and records the rule that differentiates it.
//!
//! Each op runs where its inputs live (`place`): on the CPU through `kernels/`, on a GPU
//! through the launchers of `multitoken-cuda`, forward and backward alike; `tests/cuda.rs`
//! checks every op's GPU path against the op in f64 on the CPU.
//!
//! Activations are 2-D `(N, C)` with `N = B·T` rows, unless a comment says otherwise.

// the model's coarse ops
pub mod attention;
pub mod cp_head;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod unembed;
// the general ops a learner composes models from
pub mod elementwise;
pub mod matmul;
pub mod reduce;
pub mod shape;
pub mod softmax;
// outside the tape
pub mod optimizer;

pub use attention::causal_self_attention;
pub use cp_head::{cp_head, CpHeadStats, CpHeadVars};
pub use cross_entropy::cross_entropy;
pub use elementwise::{add, div, exp, log, mul, neg, powf, relu, scale, sigmoid, sub, tanh};
pub use embedding::embedding;
pub use gelu::gelu;
pub use layernorm::layernorm;
pub use linear::{linear, linear_gelu, linear_residual};
pub use matmul::matmul;
pub use reduce::{mean, mean_axis, sum, sum_axis, weighted_sum};
pub use shape::{reshape, transpose};
pub use softmax::{log_softmax, softmax};
pub use unembed::unembed;

use std::sync::Arc;

use multitoken_cuda::{Gpu, View};
use rayon::prelude::*;

use crate::error::Result;
use crate::tensor::{Float, Rounded, Tensor};

/// Where an op runs: where all of its inputs live.
pub(crate) enum Place {
    Cpu,
    Cuda(Arc<Gpu>),
}

/// Where `tensors` live, or an error when they do not all live on one device.
pub(crate) fn place<T: Float>(op: &str, tensors: &[&Tensor<T>]) -> Result<Place> {
    let device = tensors[0].device();
    if let Some(other) = tensors.iter().map(|t| t.device()).find(|d| *d != device) {
        return crate::invalid!("{op}: its inputs live on {device} and on {other}; move them to one device with to_device");
    }
    Ok(match device.gpu() {
        None => Place::Cpu,
        Some(gpu) => Place::Cuda(gpu.clone()),
    })
}

/// A GPU tensor's elements, for a kernel; the op has checked where it lives.
pub(crate) fn on_gpu<T: Float>(tensor: &Tensor<T>) -> View<f32> {
    tensor.cuda().expect("the op checked that its inputs live on the GPU").view()
}

/// What an op keeps of an input for its backward: the tensor itself or, training in bf16 on a
/// GPU where the backward reads that input only rounded to bf16 (a product's operand, GELU's
/// derivative), the rounding alone. Half the bytes are kept, and the f32 elements are free once
/// the forward is done with them ([`Tape::release_since`](crate::autograd::Tape::release_since)).
pub(crate) enum SavedInput<T: Float> {
    F32(Tensor<T>),
    Bf16 { rounded: Rounded, shape: Vec<usize> },
}

impl<T: Float> SavedInput<T> {
    /// The input's shape.
    pub(crate) fn shape(&self) -> &[usize] {
        match self {
            SavedInput::F32(input) => input.shape(),
            SavedInput::Bf16 { shape, .. } => shape,
        }
    }
}

/// Rows handled by one parallel task. Fixed, not derived from the thread count, so that
/// reductions across tasks add in the same order on every machine.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Column sums of a row-major `(rows, cols)` matrix, deterministic under any thread count.
pub(crate) fn column_sums<T: Float>(x: &[T], cols: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(cols * ROWS_PER_TASK)
        .map(|block| {
            let mut sums = vec![T::zero(); cols];
            for row in block.chunks(cols) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    let mut total = vec![T::zero(); cols];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}
