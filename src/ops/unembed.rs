//! Tied unembedding: `logits = h · wteᵀ` (no bias), the token embedding read backwards.
//!
//! backward: `dh = dlogits · wte`, `dwte = dlogitsᵀ · h`   (docs/math.md, eq. U1)

use multitoken_cuda::Operand;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::kernels::gemm::{matmul, Layout};
use crate::tensor::{Float, Tensor};

/// h (N, C), wte (V, C) → logits (N, V)
pub fn unembed<T: Float>(tape: &mut Tape<T>, h: Var, wte: Var) -> Result<Var> {
    let hidden = tape.value(h).clone();
    let table = tape.value(wte).clone();
    let (v, c) = (table.shape()[0], table.shape()[1]);
    let n = hidden.len() / c;
    let placed = place("unembed", &[&hidden, &table])?;
    let logits = match &placed {
        Place::Cpu => {
            let mut logits = vec![T::zero(); n * v];
            matmul(hidden.data(), Layout::Normal, table.data(), Layout::Transposed, &mut logits, n, c, v, false);
            Tensor::from_vec(&[n, v], logits)
        }
        Place::Cuda(gpu) => {
            let logits = gpu.alloc::<f32>(n * v)?;
            gpu.matmul(Operand::normal(on_gpu(&hidden)), Operand::transposed(on_gpu(&table)), logits.view(), n, c, v, false)?;
            Tensor::from_cuda(gpu, logits, &[n, v])
        }
    };
    Ok(tape.record("unembed", logits, &[h, wte], move |grad, needs| match &placed {
        Place::Cpu => {
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
            Ok(vec![dh, dwte])
        }
        Place::Cuda(gpu) => {
            let g = on_gpu(grad);
            let mut grads = vec![None, None];
            if needs[0] {
                let dh = gpu.alloc::<f32>(n * c)?;
                gpu.matmul(Operand::normal(g), Operand::normal(on_gpu(&table)), dh.view(), n, v, c, false)?;
                grads[0] = Some(Tensor::from_cuda(gpu, dh, hidden.shape()));
            }
            if needs[1] {
                let dwte = gpu.alloc::<f32>(v * c)?;
                gpu.matmul(Operand::transposed(g), Operand::normal(on_gpu(&hidden)), dwte.view(), v, n, c, false)?;
                grads[1] = Some(Tensor::from_cuda(gpu, dwte, &[v, c]));
            }
            Ok(grads)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn unembed_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let h = Tensor::randn(&[5, 4], 1.0, &mut rng);
        let wte = Tensor::randn(&[7, 4], 1.0, &mut rng);
        assert!(check_op(&[h, wte], |tape, v| unembed(tape, v[0], v[1])).unwrap().max_relative_error < 1e-6);
    }
}
