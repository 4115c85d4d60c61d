//! Token plus position embedding: `x[b,t] = wte[tokens[b,t]] + wpe[position_offset + t]`.
//!
//! backward: `dwte[v] = Σ_{(b,t): tokens[b,t]=v} dx[b,t]`, `dwpe[p] = Σ_b dx[b, p − offset]`
//! (docs/math.md, eq. E1)

use crate::autograd::{Tape, Var};
use crate::tensor::{Float, Tensor};

/// wte (V, C), wpe (P, C), tokens (B·T) with `seq = T` → x (B·T, C).
/// Token ids must be below V and positions below P: callers check them where input enters.
pub fn embedding<T: Float>(tape: &mut Tape<T>, wte: Var, wpe: Var, tokens: &[u32], seq: usize, position_offset: usize) -> Var {
    let (table, positions) = (tape.value(wte).clone(), tape.value(wpe).clone());
    let (v, c) = (table.shape()[0], table.shape()[1]);
    assert!(tokens.len().is_multiple_of(seq), "embedding: {} tokens are not rows of {seq}", tokens.len());
    assert!(position_offset + seq <= positions.shape()[0], "embedding: position beyond n_positions");
    let mut out = vec![T::zero(); tokens.len() * c];
    for (i, (row, &token)) in out.chunks_mut(c).zip(tokens).enumerate() {
        let token = token as usize;
        assert!(token < v, "embedding: token {token} outside the vocabulary of {v}");
        let position = position_offset + i % seq;
        let (te, pe) = (&table.data()[token * c..][..c], &positions.data()[position * c..][..c]);
        for j in 0..c {
            row[j] = te[j] + pe[j];
        }
    }
    let tokens = tokens.to_vec();
    tape.record("embedding", Tensor::from_vec(&[tokens.len(), c], out), &[wte, wpe], move |grad, needs| {
        let (mut dwte, mut dwpe) = (needs[0].then(|| vec![T::zero(); table.len()]), needs[1].then(|| vec![T::zero(); positions.len()]));
        for (i, (g, &token)) in grad.data().chunks(c).zip(&tokens).enumerate() {
            if let Some(dwte) = &mut dwte {
                for (d, &gj) in dwte[token as usize * c..][..c].iter_mut().zip(g) {
                    *d += gj;
                }
            }
            if let Some(dwpe) = &mut dwpe {
                for (d, &gj) in dwpe[(position_offset + i % seq) * c..][..c].iter_mut().zip(g) {
                    *d += gj;
                }
            }
        }
        vec![dwte.map(|d| Tensor::from_vec(table.shape(), d)), dwpe.map(|d| Tensor::from_vec(positions.shape(), d))]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;
    use crate::tensor::Rng;

    #[test]
    fn embedding_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let wte = Tensor::randn(&[6, 4], 1.0, &mut rng);
        let wpe = Tensor::randn(&[5, 4], 1.0, &mut rng);
        // token 2 appears three times, so its row gathers three gradients
        let tokens = [2, 0, 2, 5, 2, 1];
        assert!(check_op(&[wte, wpe], |tape, v| embedding(tape, v[0], v[1], &tokens, 3, 1)).max_relative_error < 1e-6);
    }
}
