//! GELU, tanh approximation, elementwise; the math is in `kernels::gelu`.

use rayon::prelude::*;

use crate::autograd::{Tape, Var};
use crate::tensor::{Float, Tensor};

const CHUNK: usize = 1 << 14;

pub fn gelu<T: Float>(tape: &mut Tape<T>, x: Var) -> Var {
    let input = tape.value(x).clone();
    let mut out = vec![T::zero(); input.len()];
    out.par_chunks_mut(CHUNK).zip(input.data().par_chunks(CHUNK)).for_each(|(o, i)| T::gelu_forward(i, o));
    let out = Tensor::from_vec(input.shape(), out);
    tape.record("gelu", out, &[x], move |grad, _| {
        // dx = dout · gelu'(x)   (docs/math.md, eq. G2)
        let mut dx = vec![T::zero(); input.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(input.data().par_chunks(CHUNK).zip(grad.data().par_chunks(CHUNK)))
            .for_each(|(d, (i, g))| T::gelu_backward(i, g, d));
        vec![Some(Tensor::from_vec(input.shape(), dx))]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[6, 7], 2.0, &mut Rng::new(1));
        assert!(check_op(&[x], |tape, v| gelu(tape, v[0])).max_relative_error < 1e-6);
    }
}
