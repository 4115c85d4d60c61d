//! Mean cross-entropy from logits: `loss = mean_i (logsumexp(ℓ_i) − ℓ_i[y_i])`.
//!
//! backward: `dℓ_i = (softmax(ℓ_i) − onehot(y_i)) · dloss / N`   (docs/math.md, eq. X1)

use rayon::prelude::*;

use crate::autograd::{Tape, Var};
use crate::tensor::{Float, Tensor};

/// logsumexp of one row, stable.
pub(crate) fn logsumexp<T: Float>(row: &[T]) -> T {
    let max = row.iter().copied().fold(T::neg_infinity(), T::max);
    max + row.iter().map(|&x| (x - max).exp()).sum::<T>().ln()
}

/// logits (N, V), targets (N) → scalar mean loss
pub fn cross_entropy<T: Float>(tape: &mut Tape<T>, logits: Var, targets: &[u32]) -> Var {
    let scores = tape.value(logits).clone();
    let v = *scores.shape().last().unwrap();
    let n = scores.len() / v;
    assert_eq!(targets.len(), n, "cross_entropy: one target per row");
    let lse: Vec<T> = scores.data().par_chunks(v).map(logsumexp).collect();
    let total: f64 = scores.data().chunks(v).zip(&lse).zip(targets).map(|((row, &l), &y)| (l - row[y as usize]).as_f64()).sum();
    let loss = Tensor::scalar(T::of(total / n as f64));
    let targets = targets.to_vec();
    tape.record(loss, &[logits], move |grad, _| {
        let scale = grad.item() / T::of(n as f64);
        let mut d = vec![T::zero(); scores.len()];
        d.par_chunks_mut(v).zip(scores.data().par_chunks(v)).zip(lse.par_iter().zip(targets.par_iter())).for_each(|((drow, row), (&l, &y))| {
            for (dj, &x) in drow.iter_mut().zip(row) {
                *dj = (x - l).exp() * scale;
            }
            drow[y as usize] -= scale;
        });
        vec![Some(Tensor::from_vec(scores.shape(), d))]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, GradcheckOptions};
    use crate::tensor::Rng;

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let logits = Tensor::randn(&[4, 6], 2.0, &mut Rng::new(1));
        let report = gradcheck(&[logits], |tape, v| cross_entropy(tape, v[0], &[0, 5, 3, 3]), &GradcheckOptions::default());
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn uniform_logits_give_log_vocabulary_size() {
        let mut tape = Tape::<f64>::inference();
        let logits = tape.leaf(Tensor::zeros(&[3, 10]), false);
        let loss = cross_entropy(&mut tape, logits, &[1, 2, 9]);
        assert!((tape.value(loss).item() - 10f64.ln()).abs() < 1e-12);
    }
}
