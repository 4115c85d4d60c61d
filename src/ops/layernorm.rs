//! LayerNorm over the last dimension, with weight and bias (eps = 1e-5).
//!
//! forward:  `out = norm · w + b`, `norm = (x − mean) · rstd`   (docs/math.md, eq. LN1)
//! backward: `dx = rstd · (dnorm − mean(dnorm) − norm · mean(dnorm · norm))`, `dnorm = dout · w`,
//!           `dw = Σ_rows dout · norm`, `db = Σ_rows dout`   (eq. LN2)

use std::sync::Arc;

use multitoken_cuda::{Buffer, Gpu, ProductPrecision};
use rayon::prelude::*;

use super::{on_gpu, place, Place, ROWS_PER_TASK};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// x (N, C), weight (C), bias (C) → out (N, C)
pub fn layernorm<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Var) -> Result<Var> {
    let input = tape.value(x).clone();
    let (w, b) = (tape.value(weight).clone(), tape.value(bias).clone());
    let c = w.len();
    assert_eq!(input.shape().last(), Some(&c), "layernorm: weight width differs from x's");
    match place("layernorm", &[&input, &w, &b])? {
        Place::Cpu => Ok(layernorm_cpu(tape, [x, weight, bias], input, w, b)),
        Place::Cuda(gpu) => layernorm_cuda(tape, [x, weight, bias], &gpu, input, w, b),
    }
}

fn layernorm_cuda<T: Float>(
    tape: &mut Tape<T>,
    vars: [Var; 3],
    gpu: &Arc<Gpu>,
    input: Tensor<T>,
    w: Tensor<T>,
    b: Tensor<T>,
) -> Result<Var> {
    let c = w.len();
    let rows = input.len() / c;
    let (out, mean, rstd) = (gpu.alloc::<f32>(input.len())?, gpu.alloc::<f32>(rows)?, gpu.alloc::<f32>(rows)?);
    // in bf16 training the output's rounding is written with it, for the product that reads it
    let rounded = if gpu.precision == ProductPrecision::Bf16 { Some(gpu.alloc::<u16>(input.len())?) } else { None };
    let (x, gain, shift) = (on_gpu(&input), on_gpu(&w), on_gpu(&b));
    gpu.layernorm_forward_rounding(x, gain, shift, out.view(), rounded.as_ref().map(|r| r.view()), mean.view(), rstd.view())?;
    let out = Tensor::from_cuda_with_rounding(gpu, out, rounded, input.shape());
    let gpu = gpu.clone();
    Ok(tape.record("layernorm", out, &vars, move |grad, _| {
        let [dx, dw, db]: [Buffer<f32>; 3] = [gpu.alloc(input.len())?, gpu.alloc(c)?, gpu.alloc(c)?];
        let (x, g) = (on_gpu(&input), on_gpu(grad));
        gpu.layernorm_backward(x, g, on_gpu(&w), mean.view(), rstd.view(), dx.view(), dw.view(), db.view())?;
        Ok(vec![
            Some(Tensor::from_cuda(&gpu, dx, input.shape())),
            Some(Tensor::from_cuda(&gpu, dw, &[c])),
            Some(Tensor::from_cuda(&gpu, db, &[c])),
        ])
    }))
}

fn layernorm_cpu<T: Float>(tape: &mut Tape<T>, vars: [Var; 3], input: Tensor<T>, w: Tensor<T>, b: Tensor<T>) -> Var {
    let c = w.len();
    let rows = input.len() / c;
    let mut out = vec![T::zero(); input.len()];
    // mean and rstd of each row, kept for the backward pass
    let mut stats = vec![(T::zero(), T::zero()); rows];
    out.par_chunks_mut(c)
        .zip(input.data().par_chunks(c))
        .zip(stats.par_iter_mut())
        .for_each(|((o, xr), s)| *s = T::layernorm_row(xr, w.data(), b.data(), o));
    let out = Tensor::from_vec(input.shape(), out);
    tape.record("layernorm", out, &vars, move |grad, _| {
        let mut dx = vec![T::zero(); input.len()];
        // Each task: dx for its rows, and its partial sums of dw and db.
        let partials: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(c * ROWS_PER_TASK)
            .zip(input.data().par_chunks(c * ROWS_PER_TASK))
            .zip(grad.data().par_chunks(c * ROWS_PER_TASK))
            .zip(stats.par_chunks(ROWS_PER_TASK))
            .map(|(((dx_block, x_block), g_block), stat_block)| {
                let (mut dw, mut db) = (vec![T::zero(); c], vec![T::zero(); c]);
                for (((dx_row, x_row), g_row), &(mean, rstd)) in
                    dx_block.chunks_mut(c).zip(x_block.chunks(c)).zip(g_block.chunks(c)).zip(stat_block)
                {
                    T::layernorm_backward_row(x_row, g_row, w.data(), mean, rstd, dx_row, &mut dw, &mut db);
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![T::zero(); c], vec![T::zero(); c]);
        for (pw, pb) in partials {
            for j in 0..c {
                dw[j] += pw[j];
                db[j] += pb[j];
            }
        }
        Ok(vec![Some(Tensor::from_vec(input.shape(), dx)), Some(Tensor::from_vec(&[c], dw)), Some(Tensor::from_vec(&[c], db))])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn layernorm_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let x = Tensor::randn(&[5, 8], 1.5, &mut rng);
        let w = Tensor::randn(&[8], 1.0, &mut rng);
        let b = Tensor::randn(&[8], 1.0, &mut rng);
        assert!(check_op(&[x, w, b], |tape, v| layernorm(tape, v[0], v[1], v[2])).unwrap().max_relative_error < 1e-6);
    }

    #[test]
    fn layernorm_rows_have_zero_mean_and_unit_variance_before_the_affine() {
        let mut tape = Tape::<f64>::inference();
        let x = tape.leaf(Tensor::randn(&[3, 16], 3.0, &mut Rng::new(2)), false);
        let w = tape.leaf(Tensor::full(&[16], 1.0), false);
        let b = tape.leaf(Tensor::zeros(&[16]), false);
        let out = layernorm(&mut tape, x, w, b).unwrap();
        for row in tape.value(out).data().chunks(16) {
            let mean: f64 = row.iter().sum::<f64>() / 16.0;
            let var: f64 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 16.0;
            assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
        }
    }
}
