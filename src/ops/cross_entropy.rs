//! Mean cross-entropy from logits: `loss = mean_i (logsumexp(ℓ_i) − ℓ_i[y_i])`.
//!
//! backward: `dℓ_i = (softmax(ℓ_i) − onehot(y_i)) · dloss / N`   (docs/math.md, eq. X1)
//!
//! As in llm.c's fused classifier, the forward pass already computes `softmax(ℓ) − onehot(y)`
//! (it needs the softmax anyway) and keeps that instead of the logits: one pass over the
//! N×V matrix instead of two, and the same memory.

use multitoken_cuda::HeadShape;
use rayon::prelude::*;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// logits (N, V), targets (N) → scalar mean loss (on the CPU, as every loss)
pub fn cross_entropy<T: Float>(tape: &mut Tape<T>, logits: Var, targets: &[u32]) -> Result<Var> {
    let scores = tape.value(logits).clone();
    let v = *scores.shape().last().unwrap();
    let n = scores.len() / v;
    assert_eq!(targets.len(), n, "cross_entropy: one target per row");
    assert!(targets.iter().all(|&y| (y as usize) < v), "cross_entropy: a target outside the {v} classes");
    let shape = scores.shape().to_vec();
    match place("cross_entropy", &[&scores])? {
        Place::Cpu => {
            // d = softmax(ℓ) − onehot(y), row by row; the loss of row i is lse_i − ℓ_i[y_i]
            let mut d = scores.data().to_vec();
            let row_losses: Vec<f64> = d
                .par_chunks_mut(v)
                .zip(scores.data().par_chunks(v))
                .zip(targets.par_iter())
                .map(|((drow, row), &y)| {
                    let lse = T::softmax_row(drow);
                    drow[y as usize] -= T::one();
                    (lse - row[y as usize]).as_f64()
                })
                .collect();
            let loss = Tensor::scalar(T::of(row_losses.iter().sum::<f64>() / n as f64));
            drop(scores);
            Ok(tape.record("cross_entropy", loss, &[logits], move |grad, _| {
                let scale = grad.item() / T::of(n as f64);
                d.par_chunks_mut(1 << 14).for_each(|chunk| chunk.iter_mut().for_each(|x| *x *= scale));
                Ok(vec![Some(Tensor::from_vec(&shape, d))])
            }))
        }
        Place::Cuda(gpu) => {
            // the CP head's kernel with n = r = 1 is exactly this: log_p = ℓ[y] − lse, and in
            // place d = (softmax(ℓ) − onehot(y)) / N
            let d = gpu.duplicate(on_gpu(&scores))?;
            let (ids, log_w, log_p, posterior) = (gpu.upload(targets)?, gpu.zeros::<f32>(n)?, gpu.alloc::<f32>(n)?, gpu.alloc::<f32>(n)?);
            let one = HeadShape { horizon: 1, rank: 1 };
            gpu.head_position(d.view(), ids.view(), log_w.view(), log_p.view(), posterior.view(), v, one, 1.0 / n as f32, true)?;
            let loss = -gpu.download(log_p.view())?.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
            let d = Tensor::<T>::from_cuda(&gpu, d, &shape);
            Ok(tape.record("cross_entropy", Tensor::scalar(T::of(loss)), &[logits], move |grad, _| {
                let scale = grad.item();
                Ok(vec![Some(if scale == T::one() { d } else { d.scaled(scale)? })])
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, GradcheckOptions};
    use crate::tensor::Rng;

    fn logsumexp(row: &[f64]) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let logits = Tensor::randn(&[4, 6], 2.0, &mut Rng::new(1));
        let report = gradcheck(&[logits], |tape, v| cross_entropy(tape, v[0], &[0, 5, 3, 3]), &GradcheckOptions::default()).unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn uniform_logits_give_log_vocabulary_size() {
        let mut tape = Tape::<f64>::inference();
        let logits = tape.leaf(Tensor::zeros(&[3, 10]), false);
        let loss = cross_entropy(&mut tape, logits, &[1, 2, 9]).unwrap();
        assert!((tape.value(loss).item() - 10f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn cross_entropy_matches_log_sum_exp_definition() {
        let logits = Tensor::<f64>::randn(&[3, 5], 3.0, &mut Rng::new(2));
        let targets = [4, 0, 2];
        let expected: f64 = logits.data().chunks(5).zip(targets).map(|(row, y)| logsumexp(row) - row[y as usize]).sum::<f64>() / 3.0;
        let mut tape = Tape::inference();
        let l = tape.leaf(logits, false);
        let loss = cross_entropy(&mut tape, l, &targets).unwrap();
        assert!((tape.value(loss).item() - expected).abs() < 1e-12);
    }
}
