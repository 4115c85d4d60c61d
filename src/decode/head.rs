//! The multi-token head at decoding time: its distributions at a hidden state, the next-token
//! marginal, and the draft conditionals of self-speculative decoding (SPEC.md section 3).

use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::gemm::{matmul, Layout};
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// The vocabulary-sized part of the head, wherever it runs: for requests (hidden row h (C),
/// horizon s), `P[α,s](v) = softmax(wte · W[α,s] h)` for every α, laid out (r, V), one vector
/// per request. The CPU computes it in [`Head`]; `cuda::decode` on the GPU, all requests in one
/// round trip.
pub trait HeadProducts<T> {
    fn probabilities(&self, requests: &[(&[T], usize)]) -> Result<Vec<Vec<T>>>;
}

/// The head's distributions at one hidden state h.
#[derive(Clone, Debug)]
pub struct HeadState<T> {
    /// the hidden state itself (C), kept so that more horizons can be computed later
    pub hidden: Vec<T>,
    /// w (r), the gate's mixture weights
    pub weights: Vec<T>,
    /// for each horizon s, once computed: P[α,s](v) laid out (r, V). Decoding works in
    /// probabilities, not logs: mixtures are then sums, with no exp or log per token.
    probs: Vec<Option<Vec<T>>>,
    pub vocab: usize,
}

/// Computes head distributions with batched products: all requested (state, α, s) rows go
/// through one unembedding product.
pub struct Head<'a, T: Float> {
    pub config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    /// the expanders regrouped by horizon: for each s, the (r·C, C) matrix of W[α,s] for all α,
    /// so that every z[α,s] of a state comes out of one product
    expand_by_horizon: Vec<Vec<T>>,
    /// the products on another device, when not on the CPU
    device: Option<&'a dyn HeadProducts<T>>,
}

impl<'a, T: Float> Head<'a, T> {
    pub fn new(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>) -> Self {
        let (c, r, n) = (config.n_embd, config.rank, config.horizon);
        let expand_by_horizon = match &params.head {
            Some(head) => (0..n)
                .map(|s| (0..r).flat_map(|alpha| head.expand_weight.data()[(alpha * n + s) * c * c..][..c * c].iter().copied()).collect())
                .collect(),
            None => Vec::new(),
        };
        Head { config, params, expand_by_horizon, device: None }
    }

    /// A head whose vocabulary-sized products run on `device` (the gate stays on the host).
    pub fn with_device(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>, device: &'a dyn HeadProducts<T>) -> Self {
        Head { config, params, expand_by_horizon: Vec::new(), device: Some(device) }
    }

    /// Whether the products run on another device, where one batched round trip beats several
    /// small ones even if some of its rows go unused.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// States for each row of `hidden` (m, C), with horizons 0..`horizons` filled.
    pub fn states(&self, hidden: &[T], horizons: usize) -> Result<Vec<HeadState<T>>> {
        let (c, v, n) = (self.config.n_embd, self.config.vocab_size, self.config.horizon);
        let mut states: Vec<HeadState<T>> =
            hidden.chunks(c).map(|h| HeadState { hidden: h.to_vec(), weights: self.gate(h), probs: vec![None; n], vocab: v }).collect();
        let mut refs: Vec<&mut HeadState<T>> = states.iter_mut().collect();
        self.fill(&mut refs, horizons)?;
        Ok(states)
    }

    /// Fills every horizon below `horizons` that a state lacks, in one batched pass.
    pub fn fill(&self, states: &mut [&mut HeadState<T>], horizons: usize) -> Result<()> {
        let (v, r) = (self.config.vocab_size, self.config.rank);
        // (state, s) pairs still missing, grouped by s; each needs r rows (α = 0..r)
        let missing: Vec<(usize, usize)> =
            (0..horizons).flat_map(|s| (0..states.len()).map(move |i| (i, s))).filter(|&(i, s)| states[i].probs[s].is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let requests: Vec<(&[T], usize)> = missing.iter().map(|&(i, s)| (states[i].hidden.as_slice(), s)).collect();
        let probs = match self.device {
            Some(device) => device.probabilities(&requests)?,
            None => self.cpu_probabilities(&requests),
        };
        for (block, &(i, s)) in probs.into_iter().zip(&missing) {
            debug_assert_eq!(block.len(), r * v);
            states[i].probs[s] = Some(block);
        }
        Ok(())
    }

    /// P[α,s] for (hidden row, s) requests on the CPU, (r, V) per request: z rows
    /// z[α,s] = W[α,s] h (or h itself without expanders), one product per run of requests with
    /// the same horizon, then one unembedding product for all and a softmax per row.
    fn cpu_probabilities(&self, requests: &[(&[T], usize)]) -> Vec<Vec<T>> {
        let (c, v, r) = (self.config.n_embd, self.config.vocab_size, self.config.rank);
        let mut z = vec![T::zero(); requests.len() * r * c];
        let mut first = 0;
        while first < requests.len() {
            let s = requests[first].1;
            let count = requests[first..].iter().take_while(|p| p.1 == s).count();
            let hidden: Vec<T> = requests[first..first + count].iter().flat_map(|&(h, _)| h.iter().copied()).collect();
            let out = &mut z[first * r * c..(first + count) * r * c];
            match self.expand_by_horizon.get(s) {
                Some(w) => matmul(&hidden, Layout::Normal, w, Layout::Transposed, out, count, c, r * c, false),
                None => out.copy_from_slice(&hidden),
            }
            first += count;
        }
        let rows = requests.len() * r;
        let mut logits = vec![T::zero(); rows * v];
        matmul(&z, Layout::Normal, self.params.wte.data(), Layout::Transposed, &mut logits, rows, c, v, false);
        if rows * v >= 1 << 16 {
            logits.par_chunks_mut(v).for_each(|row| {
                T::softmax_row(row);
            });
        } else {
            logits.chunks_mut(v).for_each(|row| {
                T::softmax_row(row);
            });
        }
        logits.chunks(r * v).map(<[T]>::to_vec).collect()
    }

    /// w = softmax(G h + g); [1] when r = 1.
    fn gate(&self, h: &[T]) -> Vec<T> {
        let (c, r) = (self.config.n_embd, self.config.rank);
        match &self.params.head {
            Some(head) if r > 1 => {
                let mut a: Vec<T> =
                    (0..r).map(|alpha| head.gate_bias.data()[alpha] + T::dot(&head.gate_weight.data()[alpha * c..][..c], h)).collect();
                T::softmax_row(&mut a);
                a
            }
            _ => vec![T::one()],
        }
    }
}

/// The CPU's products behind the device interface: a reference for devices, and a stand-in
/// with which the host side of device decoding is tested where no device is.
impl<T: Float> HeadProducts<T> for Head<'_, T> {
    fn probabilities(&self, requests: &[(&[T], usize)]) -> Result<Vec<Vec<T>>> {
        match self.device {
            Some(device) => device.probabilities(requests),
            None => Ok(self.cpu_probabilities(requests)),
        }
    }
}

impl<T: Float> HeadState<T> {
    /// P[α,s](·); horizon s must have been filled.
    pub fn prob(&self, alpha: usize, s: usize) -> &[T] {
        let block = self.probs[s].as_ref().expect("horizon not computed");
        &block[alpha * self.vocab..][..self.vocab]
    }

    /// The next-token marginal `Σ_α w[α] P[α,0](v)` (SPEC.md section 2).
    pub fn next_token_probs(&self) -> Vec<T> {
        let mut out = vec![T::zero(); self.vocab];
        for (alpha, &w) in self.weights.iter().enumerate() {
            T::axpy(w, self.prob(alpha, 0), &mut out);
        }
        out
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
        let state = Head::new(&config, &params).states(hidden.data(), 3).unwrap().remove(0);
        let marginal = state.next_token_probs();
        assert!((marginal.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // −log p(y_0) from the training op at the same hidden state
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| false);
        let h = tape.leaf(hidden, false);
        let out = head_loss(&mut tape, &config, &vars, h, &[7, 2, 5], 0.0);
        assert!((-marginal[7].ln() - out.stats.head_losses[0]).abs() < 1e-12);
        // and every horizon's distribution is normalised
        for alpha in 0..4 {
            for s in 0..3 {
                assert!((state.prob(alpha, s).iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }
}
