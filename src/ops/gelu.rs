//! GELU, tanh approximation, elementwise; the math is in `kernels::gelu` (and, on the GPU,
//! `gelu_forward` / `gelu_backward` of `elementwise.cu`, in bf16 training
//! `gelu_forward_keeping_bf16` / `gelu_backward_from_bf16`).

use multitoken_cuda::ProductPrecision;
use rayon::prelude::*;

use super::{on_gpu, place, Place, SavedInput};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Rounded, Tensor};

const CHUNK: usize = 1 << 14;

/// `gelu(x) = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`, elementwise (docs/math.md, eq. G1).
///
/// Training in bf16 on a GPU, the backward evaluates gelu' at x rounded to bf16, and only that
/// rounding is kept: half the bytes of x, the largest activation of a block. The output carries
/// its rounding too, which the next linear layer reads.
pub fn gelu<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let input = tape.value(x).clone();
    let placed = place("gelu", &[&input])?;
    let (out, saved_input) = match &placed {
        Place::Cpu => {
            let mut out = vec![T::zero(); input.len()];
            out.par_chunks_mut(CHUNK).zip(input.data().par_chunks(CHUNK)).for_each(|(o, i)| T::gelu_forward(i, o));
            (Tensor::from_vec(input.shape(), out), SavedInput::F32(input))
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(input.len())?;
            if gpu.precision == ProductPrecision::Bf16 {
                let (x_rounded, out_rounded) = (gpu.alloc::<u16>(input.len())?, gpu.alloc::<u16>(input.len())?);
                gpu.gelu_forward_keeping_bf16(on_gpu(&input), out.view(), x_rounded.view(), out_rounded.view())?;
                let saved = SavedInput::Bf16 { rounded: Rounded::new(x_rounded), shape: input.shape().to_vec() };
                (Tensor::from_cuda_with_rounding(gpu, out, Some(out_rounded), input.shape()), saved)
            } else {
                gpu.gelu_forward(on_gpu(&input), out.view())?;
                (Tensor::from_cuda(gpu, out, input.shape()), SavedInput::F32(input.clone()))
            }
        }
    };
    Ok(tape.record("gelu", out, &[x], move |grad, _| {
        // dx = dout · gelu'(x)   (docs/math.md, eq. G2)
        let dx = match (&placed, &saved_input) {
            (Place::Cpu, SavedInput::F32(input)) => {
                let mut dx = vec![T::zero(); input.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(input.data().par_chunks(CHUNK).zip(grad.data().par_chunks(CHUNK)))
                    .for_each(|(d, (i, g))| T::gelu_backward(i, g, d));
                Tensor::from_vec(input.shape(), dx)
            }
            (Place::Cpu, SavedInput::Bf16 { .. }) => unreachable!("the CPU keeps x in f32"),
            (Place::Cuda(gpu), SavedInput::F32(input)) => {
                let dx = gpu.alloc::<f32>(input.len())?;
                gpu.gelu_backward(on_gpu(input), on_gpu(grad), dx.view())?;
                Tensor::from_cuda(gpu, dx, input.shape())
            }
            (Place::Cuda(gpu), SavedInput::Bf16 { rounded, shape }) => {
                let dx = gpu.alloc::<f32>(grad.len())?;
                gpu.gelu_backward_from_bf16(rounded.view(), on_gpu(grad), dx.view())?;
                Tensor::from_cuda(gpu, dx, shape)
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
