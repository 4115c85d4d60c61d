//! Coarse differentiable ops, one per file, forward and backward side by side, each with its
//! f64 finite-difference gradient check. Every op takes vars on a [`Tape`], computes its output
//! and records the rule that differentiates it.
//!
//! Activations are 2-D `(N, C)` with `N = B·T` rows, unless a comment says otherwise.

pub mod attention;
pub mod cp_head;
pub mod cross_entropy;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod reduce;
pub mod residual;
pub mod unembed;

pub use attention::causal_self_attention;
pub use cp_head::{cp_head, CpHeadStats, CpHeadVars};
pub use cross_entropy::cross_entropy;
pub use embedding::embedding;
pub use gelu::gelu;
pub use layernorm::layernorm;
pub use linear::linear;
pub use reduce::weighted_sum;
pub use residual::add;
pub use unembed::unembed;

use rayon::prelude::*;

use crate::tensor::Float;

/// Rows handled by one parallel task. Fixed, not derived from the thread count, so that
/// reductions across tasks add in the same order on every machine.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Column sums of a row-major `(rows, cols)` matrix, deterministic under any thread count.
pub(crate) fn column_sums<T: Float>(x: &[T], cols: usize) -> Vec<T> {
    let partials: Vec<Vec<T>> = x
        .par_chunks(cols * ROWS_PER_TASK)
        .map(|block| {
            let mut sums = vec![T::zero(); cols];
            for row in block.chunks(cols) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v;
                }
            }
            sums
        })
        .collect();
    let mut total = vec![T::zero(); cols];
    for partial in partials {
        for (t, p) in total.iter_mut().zip(partial) {
            *t += p;
        }
    }
    total
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the per-op gradient checks.
    use crate::autograd::{Tape, Var};
    use crate::gradcheck::{gradcheck, GradcheckOptions, GradcheckReport};
    use crate::tensor::{Rng, Tensor};

    /// Checks an op with a non-scalar output by differentiating `Σ out ⊙ R` for a fixed random R.
    pub fn check_op(inputs: &[Tensor<f64>], op: impl Fn(&mut Tape<f64>, &[Var]) -> Var) -> GradcheckReport {
        let mut probe = Tape::inference();
        let vars: Vec<Var> = inputs.iter().map(|t| probe.leaf(t.clone(), false)).collect();
        let probe_out = op(&mut probe, &vars);
        let out_shape = probe.value(probe_out).shape().to_vec();
        let weights = Tensor::randn(&out_shape, 1.0, &mut Rng::new(99));
        let report = gradcheck(
            inputs,
            |tape, vars| {
                let out = op(tape, vars);
                crate::ops::weighted_sum(tape, out, &weights)
            },
            &GradcheckOptions::default(),
        );
        println!("{report}");
        report
    }
}
