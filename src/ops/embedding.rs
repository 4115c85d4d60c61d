//! Token plus position embedding: `x[b,t] = wte[tokens[b,t]] + wpe[position_offset + t]`.
//!
//! backward: `dwte[v] = Σ_{(b,t): tokens[b,t]=v} dx[b,t]`, `dwpe[p] = Σ_b dx[b, p − offset]`
//! (docs/math.md, eq. E1)

use multitoken_cuda::TokenGroups;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// wte (V, C), wpe (P, C), tokens (B·T) with `seq = T` → x (B·T, C).
/// Token ids must be below V and positions below P: callers check them where input enters.
pub fn embedding<T: Float>(tape: &mut Tape<T>, wte: Var, wpe: Var, tokens: &[u32], seq: usize, position_offset: usize) -> Result<Var> {
    let (table, positions) = (tape.value(wte).clone(), tape.value(wpe).clone());
    let (v, c) = (table.shape()[0], table.shape()[1]);
    assert!(seq > 0 && tokens.len().is_multiple_of(seq), "embedding: {} tokens are not rows of {seq}", tokens.len());
    assert!(position_offset + seq <= positions.shape()[0], "embedding: position beyond n_positions");
    if let Some(token) = tokens.iter().find(|&&t| t as usize >= v) {
        panic!("embedding: token {token} outside the vocabulary of {v}");
    }
    let placed = place("embedding", &[&table, &positions])?;
    let out = match &placed {
        Place::Cpu => {
            let mut out = vec![T::zero(); tokens.len() * c];
            for (i, (row, &token)) in out.chunks_mut(c).zip(tokens).enumerate() {
                let position = position_offset + i % seq;
                let (te, pe) = (&table.data()[token as usize * c..][..c], &positions.data()[position * c..][..c]);
                for j in 0..c {
                    row[j] = te[j] + pe[j];
                }
            }
            Tensor::from_vec(&[tokens.len(), c], out)
        }
        Place::Cuda(gpu) => {
            let (ids, out) = (gpu.upload(tokens)?, gpu.alloc::<f32>(tokens.len() * c)?);
            gpu.embedding_forward(ids.view(), on_gpu(&table), on_gpu(&positions), out.view(), seq, position_offset, c)?;
            Tensor::from_cuda(gpu, out, &[tokens.len(), c])
        }
    };
    let tokens = tokens.to_vec();
    Ok(tape.record("embedding", out, &[wte, wpe], move |grad, needs| match &placed {
        Place::Cpu => {
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
            Ok(vec![dwte.map(|d| Tensor::from_vec(table.shape(), d)), dwpe.map(|d| Tensor::from_vec(positions.shape(), d))])
        }
        Place::Cuda(gpu) => {
            // rows grouped by token on the host, so that each row of dwte adds in a fixed order
            let (dwte, dwpe) = (gpu.zeros::<f32>(table.len())?, gpu.zeros::<f32>(positions.len())?);
            gpu.embedding_backward(&TokenGroups::new(&tokens), on_gpu(grad), dwte.view(), dwpe.view(), seq, position_offset, c)?;
            let dwte = needs[0].then(|| Tensor::from_cuda(gpu, dwte, table.shape()));
            let dwpe = needs[1].then(|| Tensor::from_cuda(gpu, dwpe, positions.shape()));
            Ok(vec![dwte, dwpe])
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn embedding_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let wte = Tensor::randn(&[6, 4], 1.0, &mut rng);
        let wpe = Tensor::randn(&[5, 4], 1.0, &mut rng);
        // token 2 appears three times, so its row gathers three gradients
        let tokens = [2, 0, 2, 5, 2, 1];
        assert!(check_op(&[wte, wpe], |tape, v| embedding(tape, v[0], v[1], &tokens, 3, 1)).unwrap().max_relative_error < 1e-6);
    }
}
