//! Residual connection: `out = a + b` (same shape).

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

pub fn add<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    let (left, right) = (tape.value(a), tape.value(b));
    assert_eq!(left.shape(), right.shape(), "add: shapes differ");
    let out = match place("add", &[left, right])? {
        Place::Cpu => {
            let mut out = left.clone();
            out.add_assign(right)?;
            out
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(left.len())?;
            gpu.add(on_gpu(left), on_gpu(right), out.view())?;
            Tensor::from_cuda(&gpu, out, left.shape())
        }
    };
    Ok(tape.record("residual", out, &[a, b], |grad, _| {
        // out = a + b  ⇒  da = db = dout
        Ok(vec![Some(grad.clone()), Some(grad.clone())])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn add_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let (a, b) = (Tensor::randn(&[3, 5], 1.0, &mut rng), Tensor::randn(&[3, 5], 1.0, &mut rng));
        assert!(check_op(&[a, b], |tape, v| add(tape, v[0], v[1])).unwrap().max_relative_error < 1e-6);
    }

    #[test]
    fn a_var_used_twice_gets_both_gradients() {
        let x = Tensor::randn(&[4], 1.0, &mut Rng::new(2));
        assert!(check_op(&[x], |tape, v| add(tape, v[0], v[0])).unwrap().max_relative_error < 1e-6);
    }
}
