//! GELU, tanh approximation, elementwise; the math is in `kernels::gelu` (and, on the GPU,
//! `gelu_forward` / `gelu_backward` of `elementwise.cu`).

use rayon::prelude::*;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

const CHUNK: usize = 1 << 14;

/// `gelu(x) = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, elementwise (docs/math.md, eq. G1).
pub fn gelu<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let input = tape.value(x).clone();
    let placed = place("gelu", &[&input])?;
    let out = match &placed {
        Place::Cpu => {
            let mut out = vec![T::zero(); input.len()];
            out.par_chunks_mut(CHUNK).zip(input.data().par_chunks(CHUNK)).for_each(|(o, i)| T::gelu_forward(i, o));
            Tensor::from_vec(input.shape(), out)
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(input.len())?;
            gpu.gelu_forward(on_gpu(&input), out.view())?;
            Tensor::from_cuda(gpu, out, input.shape())
        }
    };
    Ok(tape.record("gelu", out, &[x], move |grad, _| {
        // dx = dout · gelu'(x)   (docs/math.md, eq. G2)
        let dx = match &placed {
            Place::Cpu => {
                let mut dx = vec![T::zero(); input.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(input.data().par_chunks(CHUNK).zip(grad.data().par_chunks(CHUNK)))
                    .for_each(|(d, (i, g))| T::gelu_backward(i, g, d));
                Tensor::from_vec(input.shape(), dx)
            }
            Place::Cuda(gpu) => {
                let dx = gpu.alloc::<f32>(input.len())?;
                gpu.gelu_backward(on_gpu(&input), on_gpu(grad), dx.view())?;
                Tensor::from_cuda(gpu, dx, input.shape())
            }
        };
        Ok(vec![Some(dx)])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[6, 7], 2.0, &mut Rng::new(1));
        assert!(check_op(&[x], |tape, v| gelu(tape, v[0])).unwrap().max_relative_error < 1e-6);
    }
}
