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
        Ok(vec![Some(weights.scaled(grad.item())?)])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, GradcheckOptions};
    use crate::tensor::Rng;

    #[test]
    fn weighted_sum_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
        let weights = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(2));
        let report = gradcheck(&[x], |tape, v| weighted_sum(tape, v[0], &weights), &GradcheckOptions::default()).unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn weighted_sum_is_the_dot_product_with_the_weights() {
        let (x, weights) = (Tensor::<f64>::from_vec(&[3], vec![1.0, -2.0, 0.5]), Tensor::from_vec(&[3], vec![4.0, 1.0, 2.0]));
        let mut tape = Tape::inference();
        let v = tape.leaf(x, false);
        let total = weighted_sum(&mut tape, v, &weights).unwrap();
        assert_eq!(tape.value(total).item(), 3.0);
    }
}
