//! Tied unembedding: `logits = h · wteᵀ` (no bias), the token embedding read backwards.
//!
//! backward: `dh = dlogits · wte`, `dwte = dlogitsᵀ · h`   (docs/math.md, eq. U1)

use crate::autograd::{Tape, Var};
use crate::kernels::gemm::{matmul, Layout};
use crate::tensor::{Float, Tensor};

/// h (N, C), wte (V, C) → logits (N, V)
pub fn unembed<T: Float>(tape: &mut Tape<T>, h: Var, wte: Var) -> Var {
    let hidden = tape.value(h).clone();
    let table = tape.value(wte).clone();
    let (v, c) = (table.shape()[0], table.shape()[1]);
    let n = hidden.len() / c;
    let mut logits = vec![T::zero(); n * v];
    matmul(hidden.data(), Layout::Normal, table.data(), Layout::Transposed, &mut logits, n, c, v, false);
    tape.record("unembed", Tensor::from_vec(&[n, v], logits), &[h, wte], move |grad, needs| {
        let dh = needs[0].then(|| {
            let mut dh = vec![T::zero(); n * c];
            matmul(grad.data(), Layout::Normal, table.data(), Layout::Normal, &mut dh, n, v, c, false);
            Tensor::from_vec(hidden.shape(), dh)
        });
        let dwte = needs[1].then(|| {
            let mut dwte = vec![T::zero(); v * c];
            matmul(grad.data(), Layout::Transposed, hidden.data(), Layout::Normal, &mut dwte, v, n, c, false);
            Tensor::from_vec(&[v, c], dwte)
        });
        vec![dh, dwte]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;

    #[test]
    fn unembed_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let h = Tensor::randn(&[5, 4], 1.0, &mut rng);
        let wte = Tensor::randn(&[7, 4], 1.0, &mut rng);
        assert!(check_op(&[h, wte], |tape, v| unembed(tape, v[0], v[1])).max_relative_error < 1e-6);
    }
}
