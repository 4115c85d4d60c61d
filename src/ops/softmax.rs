//! Softmax and log-softmax along the last axis.
//!
//! forward:  `y = softmax(x)`, `p_j = e^{x_j} / Σ_k e^{x_k}`; `log_softmax(x) = x − lse(x)`
//! backward: softmax `dx = y ⊙ (g − Σ g⊙y)`; log-softmax `dx = g − softmax(x) · Σ g`
//!
//! A row at a time: on the CPU `kernels::softmax` (its SIMD loop), on a GPU a block per row.

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// Softmax along the last axis.
pub fn softmax<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    rows(tape, x, false)
}

/// Log-softmax along the last axis.
pub fn log_softmax<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    rows(tape, x, true)
}

fn rows<T: Float>(tape: &mut Tape<T>, x: Var, log: bool) -> Result<Var> {
    let input = tape.value(x).clone();
    let v = input.shape().last().copied().unwrap_or(1).max(1);
    let op = if log { "log_softmax" } else { "softmax" };
    let placed = place(op, &[&input])?;
    let out = match &placed {
        Place::Cpu => {
            let mut y = input.data().to_vec();
            for (row, x) in y.chunks_mut(v).zip(input.data().chunks(v)) {
                let lse = T::softmax_row(row);
                if log {
                    row.iter_mut().zip(x).for_each(|(out, &xi)| *out = xi - lse);
                }
            }
            Tensor::from_vec(input.shape(), y)
        }
        Place::Cuda(gpu) => {
            let y = gpu.alloc::<f32>(input.len())?;
            if log {
                gpu.log_softmax_rows(on_gpu(&input), y.view(), v)?;
            } else {
                gpu.copy(on_gpu(&input), y.view())?;
                gpu.softmax_rows(y.view(), v)?;
            }
            Tensor::from_cuda(gpu, y, input.shape())
        }
    };
    let y = out.clone();
    let shape = input.shape().to_vec();
    drop(input);
    Ok(tape.record(op, out, &[x], move |grad, _| {
        let dx = match &placed {
            Place::Cpu => {
                let mut dx = vec![T::zero(); y.len()];
                for ((d, y), g) in dx.chunks_mut(v).zip(y.data().chunks(v)).zip(grad.data().chunks(v)) {
                    if log {
                        let total: T = g.iter().copied().sum();
                        d.iter_mut().zip(y.iter().zip(g)).for_each(|(d, (&yi, &gi))| *d = gi - yi.exp() * total);
                    } else {
                        let dot: T = g.iter().zip(y).map(|(&gi, &yi)| gi * yi).sum();
                        d.iter_mut().zip(y.iter().zip(g)).for_each(|(d, (&yi, &gi))| *d = yi * (gi - dot));
                    }
                }
                Tensor::from_vec(&shape, dx)
            }
            Place::Cuda(gpu) => {
                let dx = gpu.alloc::<f32>(y.len())?;
                gpu.softmax_backward_rows(on_gpu(&y), on_gpu(grad), dx.view(), v, log)?;
                Tensor::from_cuda(gpu, dx, &shape)
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
    fn softmax_and_log_softmax_gradients_match_finite_differences() {
        let x = Tensor::<f64>::randn(&[2, 3, 5], 2.0, &mut Rng::new(1));
        check_op(std::slice::from_ref(&x), |tape, v| softmax(tape, v[0])).unwrap().assert_below(1e-6, "softmax");
        check_op(std::slice::from_ref(&x), |tape, v| log_softmax(tape, v[0])).unwrap().assert_below(1e-6, "log_softmax");
    }

    #[test]
    fn rows_of_probabilities_sum_to_one_and_their_logs_agree() {
        let mut tape = Tape::<f64>::inference();
        let x = tape.leaf(Tensor::randn(&[4, 7], 3.0, &mut Rng::new(2)), false);
        let (p, log_p) = (softmax(&mut tape, x).unwrap(), log_softmax(&mut tape, x).unwrap());
        for (row, log_row) in tape.value(p).data().chunks(7).zip(tape.value(log_p).data().chunks(7)) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            assert!(row.iter().zip(log_row).all(|(p, l)| (p.ln() - l).abs() < 1e-12));
        }
    }
}
