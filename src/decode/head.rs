//! The multi-token head at decoding time: its distributions at a hidden state, the next-token
//! marginal, and the draft conditionals of self-speculative decoding (SPEC.md section 3).

use crate::kernels::gemm::{matmul, Layout};
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// The head's distributions at one hidden state h.
#[derive(Clone, Debug)]
pub struct HeadState<T> {
    /// the hidden state itself (C), kept so that more horizons can be computed later
    pub hidden: Vec<T>,
    /// log w (r)
    pub log_w: Vec<T>,
    /// log P[α,s](v), laid out (r, n, V); horizons s < `horizons` are filled
    pub log_p: Vec<T>,
    /// horizons filled so far
    pub horizons: usize,
    /// n and V, the layout of `log_p`
    pub horizon: usize,
    pub vocab: usize,
}

/// Computes head distributions with batched products: all requested (state, α, s) rows go
/// through one unembedding GEMM.
pub struct Head<'a, T: Float> {
    pub config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
}

impl<'a, T: Float> Head<'a, T> {
    pub fn new(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>) -> Self {
        Head { config, params }
    }

    /// States for each row of `hidden` (m, C), with horizons 0..`horizons` filled.
    pub fn states(&self, hidden: &[T], horizons: usize) -> Vec<HeadState<T>> {
        let (c, v, r, n) = (self.config.n_embd, self.config.vocab_size, self.config.rank, self.config.horizon);
        let mut states: Vec<HeadState<T>> = hidden
            .chunks(c)
            .map(|h| HeadState {
                hidden: h.to_vec(),
                log_w: self.log_gate(h),
                log_p: vec![T::zero(); r * n * v],
                horizons: 0,
                horizon: n,
                vocab: v,
            })
            .collect();
        let mut refs: Vec<&mut HeadState<T>> = states.iter_mut().collect();
        self.fill(&mut refs, horizons);
        states
    }

    /// Fills horizons `state.horizons..horizons` of every state (one batched pass).
    pub fn fill(&self, states: &mut [&mut HeadState<T>], horizons: usize) {
        let (c, v, r, n) = (self.config.n_embd, self.config.vocab_size, self.config.rank, self.config.horizon);
        // rows (state, α, s) still missing
        let mut rows: Vec<(usize, usize, usize)> = Vec::new();
        for (i, state) in states.iter().enumerate() {
            for alpha in 0..r {
                for s in state.horizons..horizons {
                    rows.push((i, alpha, s));
                }
            }
        }
        if rows.is_empty() {
            return;
        }
        // z[α,s] = W[α,s] h  (or h itself without expanders)
        let mut z = vec![T::zero(); rows.len() * c];
        for (row, &(i, alpha, s)) in z.chunks_mut(c).zip(&rows) {
            let h = &states[i].hidden;
            match &self.params.head {
                Some(head) => {
                    let w = &head.expand_weight.data()[(alpha * n + s) * c * c..][..c * c];
                    matmul(w, Layout::Normal, h, Layout::Normal, row, c, c, 1, false);
                }
                None => row.copy_from_slice(h),
            }
        }
        let mut logits = vec![T::zero(); rows.len() * v];
        matmul(&z, Layout::Normal, self.params.wte.data(), Layout::Transposed, &mut logits, rows.len(), c, v, false);
        for (logit_row, &(i, alpha, s)) in logits.chunks_mut(v).zip(&rows) {
            let lse = T::softmax_row(&mut logit_row.to_vec());
            let target = &mut states[i].log_p[(alpha * n + s) * v..][..v];
            for (t, &l) in target.iter_mut().zip(logit_row.iter()) {
                *t = l - lse;
            }
        }
        for state in states.iter_mut() {
            state.horizons = state.horizons.max(horizons);
        }
    }

    fn log_gate(&self, h: &[T]) -> Vec<T> {
        let (c, r) = (self.config.n_embd, self.config.rank);
        match (&self.params.head, r) {
            (Some(head), r) if r > 1 => {
                let mut a: Vec<T> =
                    (0..r).map(|alpha| head.gate_bias.data()[alpha] + dot(&head.gate_weight.data()[alpha * c..][..c], h)).collect();
                let lse = log_sum_exp(&a);
                a.iter_mut().for_each(|x| *x -= lse);
                a
            }
            _ => vec![T::zero()],
        }
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

pub(crate) fn log_sum_exp<T: Float>(x: &[T]) -> T {
    let max = x.iter().copied().fold(T::neg_infinity(), T::max);
    if max == T::neg_infinity() {
        return max;
    }
    max + x.iter().map(|&v| (v - max).exp()).sum::<T>().ln()
}

impl<T: Float> HeadState<T> {
    /// log P[α,s](·)
    pub fn log_p(&self, alpha: usize, s: usize) -> &[T] {
        &self.log_p[(alpha * self.horizon + s) * self.vocab..][..self.vocab]
    }

    /// The next-token marginal, `log Σ_α w[α] P[α,0](v)` (SPEC.md section 2).
    pub fn next_token_log_probs(&self) -> Vec<T> {
        assert!(self.horizons >= 1, "horizon 0 not computed");
        let r = self.log_w.len();
        if r == 1 {
            return self.log_p(0, 0).to_vec();
        }
        let mut terms = vec![T::zero(); r];
        (0..self.vocab)
            .map(|token| {
                for (alpha, term) in terms.iter_mut().enumerate() {
                    *term = self.log_w[alpha] + self.log_p(alpha, 0)[token];
                }
                log_sum_exp(&terms)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
    use crate::model::{gpt2, loss::head_loss};
    use crate::tensor::Rng;

    #[test]
    fn the_next_token_marginal_is_normalised_and_matches_the_horizon_zero_loss() {
        let config = ModelConfig { vocab_size: 11, n_positions: 8, n_embd: 8, n_layer: 1, n_head: 2, horizon: 3, rank: 4 };
        let mut rng = Rng::new(2);
        let mut params = gpt2::init_params::<f64>(&config, &mut rng);
        for t in params.values_mut() {
            let noise = Tensor::randn(t.shape(), 0.3, &mut rng);
            t.add_assign(&noise);
        }
        let hidden = Tensor::randn(&[1, 8], 1.0, &mut rng);
        let state = Head::new(&config, &params).states(hidden.data(), 3).remove(0);
        let marginal = state.next_token_log_probs();
        assert!((marginal.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
        // −log p(y_0) from the training op at the same hidden state
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| false);
        let h = tape.leaf(hidden, false);
        let out = head_loss(&mut tape, &config, &vars, h, &[7, 2, 5], 0.0);
        assert!((-marginal[7] - out.stats.head_losses[0]).abs() < 1e-12);
        // and every horizon's distribution is normalised
        for alpha in 0..4 {
            for s in 0..3 {
                assert!((state.log_p(alpha, s).iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }
}
