//! Linear layer in GPT-2's Conv1D layout: `out = x · W + b`, W stored (in, out).
//!
//! backward: `dx = dout · Wᵀ`, `dW = xᵀ · dout`, `db = Σ_rows dout`   (docs/math.md, eq. L1)

use super::column_sums;
use crate::autograd::{Tape, Var};
use crate::kernels::gemm::{matmul, Layout};
use crate::tensor::{Float, Tensor};

/// x (N, Cin), weight (Cin, Cout), bias (Cout) → out (N, Cout)
pub fn linear<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Option<Var>) -> Var {
    let input = tape.value(x).clone();
    let w = tape.value(weight).clone();
    let (c_in, c_out) = (w.shape()[0], w.shape()[1]);
    assert_eq!(input.shape().last(), Some(&c_in), "linear: x width differs from the weight's input size");
    let n = input.len() / c_in;
    let mut out = vec![T::zero(); n * c_out];
    if let Some(bias) = bias {
        for row in out.chunks_mut(c_out) {
            row.copy_from_slice(tape.value(bias).data());
        }
    }
    matmul(input.data(), Layout::Normal, w.data(), Layout::Normal, &mut out, n, c_in, c_out, bias.is_some());
    let mut out_shape = input.shape().to_vec();
    *out_shape.last_mut().unwrap() = c_out;
    let out = Tensor::from_vec(&out_shape, out);
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    tape.record("linear", out, &inputs, move |grad, needs| {
        let dx = needs[0].then(|| {
            let mut dx = vec![T::zero(); n * c_in];
            matmul(grad.data(), Layout::Normal, w.data(), Layout::Transposed, &mut dx, n, c_out, c_in, false);
            Tensor::from_vec(input.shape(), dx)
        });
        let dw = needs[1].then(|| {
            let mut dw = vec![T::zero(); c_in * c_out];
            matmul(input.data(), Layout::Transposed, grad.data(), Layout::Normal, &mut dw, c_in, n, c_out, false);
            Tensor::from_vec(&[c_in, c_out], dw)
        });
        let mut grads = vec![dx, dw];
        if needs.len() == 3 {
            grads.push(needs[2].then(|| Tensor::from_vec(&[c_out], column_sums(grad.data(), c_out))));
        }
        grads
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;

    #[test]
    fn linear_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let x = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
        let w = Tensor::randn(&[4, 5], 1.0, &mut rng);
        let b = Tensor::randn(&[5], 1.0, &mut rng);
        assert!(check_op(&[x.clone(), w.clone(), b], |tape, v| linear(tape, v[0], v[1], Some(v[2]))).max_relative_error < 1e-6);
        assert!(check_op(&[x, w], |tape, v| linear(tape, v[0], v[1], None)).max_relative_error < 1e-6);
    }
}
