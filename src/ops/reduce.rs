//! `weighted_sum(x, w) = Σ_i x_i w_i`: a scalar from any tensor, with fixed weights `w` (a CPU
//! tensor). Gradient checks use it to turn an op's output into a loss. The scalar lives on the
//! CPU whatever device x is on, as every loss does.

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

pub fn weighted_sum<T: Float>(tape: &mut Tape<T>, x: Var, weights: &Tensor<T>) -> Result<Var> {
    let value = tape.value(x);
    assert_eq!(value.shape(), weights.shape(), "weighted_sum: weights must match x");
    let placed = place("weighted_sum", &[value])?;
    let (total, weights) = match &placed {
        Place::Cpu => (value.data().iter().zip(weights.data()).map(|(&a, &b)| a * b).sum(), weights.clone()),
        Place::Cuda(gpu) => {
            let weights = weights.to_device(&value.device())?;
            (T::of(gpu.dot(on_gpu(value), on_gpu(&weights))?), weights)
        }
    };
    Ok(tape.record("reduce", Tensor::scalar(total), &[x], move |grad, _| {
        // d/dx_i (Σ x w) = w_i
        let g = grad.item();
        let dx = match &placed {
            Place::Cpu => Tensor::from_vec(weights.shape(), weights.data().iter().map(|&w| w * g).collect()),
            Place::Cuda(gpu) => {
                let dx = gpu.alloc::<f32>(weights.len())?;
                gpu.scale(on_gpu(&weights), g.as_f64() as f32, dx.view())?;
                Tensor::from_cuda(gpu, dx, weights.shape())
            }
        };
        Ok(vec![Some(dx)])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn weighted_sum_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
        assert!(check_op(&[x], |_, v| Ok(v[0])).unwrap().max_relative_error < 1e-6);
    }
}
