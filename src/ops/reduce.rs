//! `weighted_sum(x, w) = Σ_i x_i w_i`: a scalar from any tensor, with fixed weights `w`.
//! Gradient checks use it to turn an op's output into a loss.

use crate::autograd::{Tape, Var};
use crate::tensor::{Float, Tensor};

pub fn weighted_sum<T: Float>(tape: &mut Tape<T>, x: Var, weights: &Tensor<T>) -> Var {
    let value = tape.value(x);
    assert_eq!(value.shape(), weights.shape(), "weighted_sum: weights must match x");
    let total: T = value.data().iter().zip(weights.data()).map(|(&a, &b)| a * b).sum();
    let weights = weights.clone();
    tape.record("reduce", Tensor::scalar(total), &[x], move |grad, _| {
        // d/dx_i (Σ x w) = w_i
        let g = grad.item();
        let dx: Vec<T> = weights.data().iter().map(|&w| w * g).collect();
        vec![Some(Tensor::from_vec(weights.shape(), dx))]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;

    #[test]
    fn weighted_sum_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
        assert!(check_op(&[x], |_, v| v[0]).max_relative_error < 1e-6);
    }
}
