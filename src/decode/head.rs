//! The multi-token head at decoding time: its distributions at a hidden state, the next-token
//! marginal, and the draft conditionals of self-speculative decoding (docs/decoding.md).

use crate::error::Result;
use crate::kernels::team::{together, SharedRows, Team};
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// The vocabulary-sized part of the head, wherever it runs: for requests (hidden row h (C),
/// horizon s), `P[α,s](v) = softmax(wte · W[α,s] h)` for every α, laid out (r, V), one vector
/// per request. The CPU computes it in [`Head`]; `decode::cuda` on the GPU, all requests in one
/// round trip.
pub trait HeadProducts<T> {
    /// For each request (h (C), horizon s): `P[α,s]` for every α, laid out (r, V).
    fn probabilities(&self, requests: &[(&[T], usize)]) -> Result<Vec<Vec<T>>>;

    /// `P[α,s]` of the one component α, for each horizon s of `horizons` at h (C): V each, the
    /// top-component draft's, from α's rows alone.
    fn component_probabilities(&self, hidden: &[T], alpha: usize, horizons: std::ops::Range<usize>, vocab: usize) -> Result<Vec<Vec<T>>>;
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
    /// V, the length of each distribution
    pub vocab: usize,
}

/// One expander product of `cpu_probabilities`: hidden rows (rows, C) against the stacked
/// W[α,t] from horizon `horizon` on, into `out` (rows, width), a block of z.
struct ExpanderRun<T> {
    hidden: Vec<T>,
    rows: usize,
    horizon: usize,
    out: SharedRows<T>,
}

/// Computes head distributions with batched products: all requested (state, α, s) rows go
/// through one unembedding product.
pub struct Head<'a, T: Float> {
    /// the model's shape: C, V, n, r
    pub config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    /// the expanders regrouped by horizon, (n·r·C, C): rows s·r·C.. are W[α,s] for every α, so
    /// that the z[α,s] of one horizon for several states, or of several horizons for one
    /// state, come out of one product; empty without expanders
    expand_by_horizon: Vec<T>,
    /// the products on another device, when not on the CPU
    device: Option<&'a dyn HeadProducts<T>>,
}

impl<'a, T: Float> Head<'a, T> {
    /// A head computed on the CPU from `params`' head weights (the expanders regrouped by horizon
    /// once, here).
    pub fn new(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>) -> Self {
        let (c, r, n) = (config.n_embd, config.rank, config.horizon);
        let expand_by_horizon = match &params.head {
            Some(head) => (0..n)
                .flat_map(|s| (0..r).flat_map(move |alpha| head.expand_weight.data()[(alpha * n + s) * c * c..][..c * c].iter().copied()))
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

    /// `P[α,s]` of one component α for the horizons `horizons` at hidden state h (C): V each, the
    /// top-component draft's distributions: n − 1 rows of the unembedding, not r·(n − 1).
    pub fn component_probabilities(&self, hidden: &[T], alpha: usize, horizons: std::ops::Range<usize>) -> Result<Vec<Vec<T>>> {
        let v = self.config.vocab_size;
        if let Some(device) = self.device {
            return device.component_probabilities(hidden, alpha, horizons, v);
        }
        let (c, r) = (self.config.n_embd, self.config.rank);
        let rows = horizons.len();
        // a horizon past 0 means n > 1, so n·r > 1 and the head has its expanders
        debug_assert!(!self.expand_by_horizon.is_empty() || rows == 0, "draft horizons without expanders");
        // z rows W[α,s] h for each horizon
        let mut z = vec![T::zero(); rows * c];
        let z_each: Vec<SharedRows<T>> = z.chunks_mut(c).map(|row| SharedRows::new(row, c)).collect();
        let expanders = &self.expand_by_horizon;
        let fill_z = |team: &Team| {
            for (out, s) in z_each.iter().zip(horizons.clone()) {
                // SAFETY: each thread writes its own columns of each z row
                unsafe { team.product_into_columns(hidden, &expanders[(s * r + alpha) * c * c..][..c * c], 1, c, out) };
            }
        };
        Ok(self.distributions_after(&mut z, fill_z, v))
    }

    /// softmax(z · wteᵀ) for the rows of z (·, C), once `fill_z` has written z, each thread of
    /// the team (`decode::team`) its own columns; on the host in blocks of `block`. The team
    /// then takes its columns of the unembedding product, then its rows of the softmax.
    fn distributions_after(&self, z: &mut [T], fill_z: impl Fn(&Team) + Sync, block: usize) -> Vec<Vec<T>> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let rows = z.len() / c;
        let mut logits = vec![T::zero(); rows * v];
        let (z_rows, logits_rows) = (SharedRows::new(z, c), SharedRows::new(&mut logits, v));
        let wte = self.params.wte.data();
        let pass = |team: &Team| {
            fill_z(team);
            // SAFETY: each thread writes its own columns of the logits, then its own rows of
            // them, with a barrier before anything written is read (z's, then the logits').
            unsafe {
                team.sync();
                team.product_into_columns(z_rows.read(), wte, rows, c, &logits_rows);
                team.sync();
                for row in team.share(rows, 1) {
                    T::softmax_row(logits_rows.row_mut(row));
                }
            }
        };
        // the few-row kernel on every thread, on a team of one too (`product_by_rows`): a
        // state's distributions come out the same whatever else is stacked with them
        together(pass);
        logits.chunks(block).map(<[T]>::to_vec).collect()
    }

    /// P[α,s] for (hidden row, s) requests on the CPU, (r, V) per request: z rows
    /// z[α,s] = W[α,s] h (or h itself without expanders), one product per run of requests with
    /// the same horizon or with consecutive horizons of one state, then one unembedding
    /// product for all and a softmax per row.
    fn cpu_probabilities(&self, requests: &[(&[T], usize)]) -> Vec<Vec<T>> {
        let (c, v, r) = (self.config.n_embd, self.config.vocab_size, self.config.rank);
        let block = r * c;
        let mut z = vec![T::zero(); requests.len() * block];
        let runs = self.expander_runs(requests, &mut z);
        let expanders = &self.expand_by_horizon;
        let fill_z = |team: &Team| {
            for run in &runs {
                let weight = &expanders[run.horizon * block * c..][..run.out.width() * c];
                // SAFETY: each thread writes its own columns of each run's z block
                unsafe { team.product_into_columns(&run.hidden, weight, run.rows, c, &run.out) };
            }
        };
        self.distributions_after(&mut z, fill_z, r * v)
    }

    /// The expander products the requests need, one per run of requests with the same horizon
    /// or with consecutive horizons of one state, each with the block of `z` it fills; without
    /// expanders, z is h and filled here.
    fn expander_runs(&self, requests: &[(&[T], usize)], z: &mut [T]) -> Vec<ExpanderRun<T>> {
        let block = self.config.rank * self.config.n_embd;
        if self.expand_by_horizon.is_empty() {
            for (out, &(h, _)) in z.chunks_mut(block).zip(requests) {
                out.copy_from_slice(h);
            }
            return Vec::new();
        }
        let mut runs = Vec::new();
        let mut first = 0;
        while first < requests.len() {
            let (h, s) = requests[first];
            // requests of one state share its hidden slice itself
            let one_state =
                requests[first..].iter().zip(s..).take_while(|&(&(other, t), next)| std::ptr::eq(other, h) && t == next).count();
            // (hidden rows, their count, requests served): h against the stacked W[α,t] of
            // horizons s..s + one_state gives one row, which is the run's z blocks side by side
            let (hidden, rows, count) = if one_state > 1 {
                (h.to_vec(), 1, one_state)
            } else {
                let one_horizon = requests[first..].iter().take_while(|p| p.1 == s).count();
                (requests[first..first + one_horizon].iter().flat_map(|&(h, _)| h.iter().copied()).collect(), one_horizon, one_horizon)
            };
            let out = SharedRows::new(&mut z[first * block..(first + count) * block], count / rows * block);
            runs.push(ExpanderRun { hidden, rows, horizon: s, out });
            first += count;
        }
        runs
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

    fn component_probabilities(&self, hidden: &[T], alpha: usize, horizons: std::ops::Range<usize>, _vocab: usize) -> Result<Vec<Vec<T>>> {
        Head::component_probabilities(self, hidden, alpha, horizons)
    }
}

impl<T: Float> HeadState<T> {
    /// P[α,s](·); horizon s must have been filled.
    pub fn prob(&self, alpha: usize, s: usize) -> &[T] {
        let block = self.probs[s].as_ref().expect("horizon not computed");
        &block[alpha * self.vocab..][..self.vocab]
    }

    /// The next-token marginal `Σ_α w[α] P[α,0](v)` (docs/math.md, "The CP head").
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
    fn the_marginals_are_normalised_and_match_the_training_loss_at_every_horizon() {
        let config = ModelConfig { vocab_size: 40, n_positions: 8, n_embd: 8, n_layer: 1, n_head: 2, horizon: 3, rank: 4 };
        let mut rng = Rng::new(2);
        let mut params = gpt2::init_params::<f64>(&config, &mut rng);
        for t in params.values_mut() {
            let noise = Tensor::randn(t.shape(), 0.3, &mut rng);
            t.add_assign(&noise).unwrap();
        }
        let hidden = Tensor::randn(&[1, 8], 1.0, &mut rng);
        // (V = 40: a team of threads splits the vocabulary, 16 columns at a time)
        // as decoding does: the next-token horizon first, the draft's horizons later
        let head = Head::new(&config, &params);
        let mut state = head.states(hidden.data(), 1).unwrap().remove(0);
        head.fill(&mut [&mut state], 3).unwrap();
        let marginal = state.next_token_probs();
        assert!((marginal.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // −log p(y_0) from the training op at the same hidden state
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| false);
        let h = tape.leaf(hidden, false);
        let targets = [7, 2, 5];
        let out = head_loss(&mut tape, &config, &vars, h, &targets, 0.0).unwrap();
        assert!((-marginal[7].ln() - out.stats.head_losses[0]).abs() < 1e-12);
        // every horizon's marginal Σ_α w[α] P[α,s](y_s) too (horizons 1 and 2 come out of one
        // stacked product)
        for (s, &y) in targets.iter().enumerate() {
            let p: f64 = (0..4).map(|alpha| state.weights[alpha] * state.prob(alpha, s)[y as usize]).sum();
            assert!((-p.ln() - out.stats.head_losses[s]).abs() < 1e-12, "horizon {s}");
        }
        // and every horizon's distribution is normalised
        for alpha in 0..4 {
            for s in 0..3 {
                assert!((state.prob(alpha, s).iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    /// The top-component draft's distributions, computed alone, are the component's blocks of
    /// the full computation, with three components and with one.
    #[test]
    fn stacked_states_get_the_bits_each_gets_alone() {
        // 6 states, r = 4: 24 rows of the unembedding at once, more than the few-row kernel's
        // 16; on one thread and on two, each state's distributions as when it is asked alone
        let config = ModelConfig { vocab_size: 40, n_positions: 8, n_embd: 32, n_layer: 1, n_head: 2, horizon: 3, rank: 4 };
        let mut rng = Rng::new(5);
        let params = gpt2::init_params::<f32>(&config, &mut rng);
        let hidden = Tensor::<f32>::randn(&[6, 32], 1.0, &mut rng);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let head = Head::new(&config, &params);
                let mut stacked = head.states(hidden.data(), 1).unwrap();
                head.fill(&mut stacked.iter_mut().collect::<Vec<_>>(), 3).unwrap();
                for (i, state) in stacked.iter().enumerate() {
                    let mut alone = head.states(&hidden.data()[i * 32..(i + 1) * 32], 3).unwrap().remove(0);
                    head.fill(&mut [&mut alone], 3).unwrap();
                    assert_eq!(state.probs, alone.probs, "state {i}, {threads} thread(s)");
                }
            });
        }
    }

    #[test]
    fn one_component_s_distributions_are_that_component_s_blocks() {
        for (rank, alpha) in [(3, 0), (3, 2), (1, 0)] {
            let config = ModelConfig { vocab_size: 40, n_positions: 8, n_embd: 8, n_layer: 1, n_head: 2, horizon: 3, rank };
            let mut rng = Rng::new(7);
            let params = gpt2::init_params::<f64>(&config, &mut rng);
            let hidden = Tensor::<f64>::randn(&[1, 8], 1.0, &mut rng);
            let head = Head::new(&config, &params);
            let mut state = head.states(hidden.data(), 3).unwrap().remove(0);
            head.fill(&mut [&mut state], 3).unwrap();
            let alone = head.component_probabilities(hidden.data(), alpha, 1..3).unwrap();
            for (s, probs) in (1..3).zip(&alone) {
                let full = state.prob(alpha, s);
                let worst = probs.iter().zip(full).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-14, "rank {rank}, component {alpha}, horizon {s}: {worst:e}");
            }
        }
    }
}
