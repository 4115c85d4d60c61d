//! Residual connection: `out = a + b` (same shape).

use crate::autograd::{Tape, Var};
use crate::tensor::Float;

pub fn add<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Var {
    let mut out = tape.value(a).clone();
    out.add_assign(tape.value(b));
    tape.record("residual", out, &[a, b], |grad, _| {
        // out = a + b  ⇒  da = db = dout
        vec![Some(grad.clone()), Some(grad.clone())]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;
    use crate::tensor::Tensor;

    #[test]
    fn add_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let (a, b) = (Tensor::randn(&[3, 5], 1.0, &mut rng), Tensor::randn(&[3, 5], 1.0, &mut rng));
        assert!(check_op(&[a, b], |tape, v| add(tape, v[0], v[1])).max_relative_error < 1e-6);
    }

    #[test]
    fn a_var_used_twice_gets_both_gradients() {
        let x = Tensor::randn(&[4], 1.0, &mut Rng::new(2));
        assert!(check_op(&[x], |tape, v| add(tape, v[0], v[0])).max_relative_error < 1e-6);
    }
}
