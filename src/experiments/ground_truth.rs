//! Ground truth for the CP head: targets drawn from a known mixture of products.
//!
//! A context token c (one of K) is followed by n tokens drawn from
//! `p(y | c) = Σ_β π_c[β] Π_s Q[β,s](y_s)`, a rank-R mixture whose weights depend on c. A CP head
//! reading a learned embedding of c can represent this exactly when its rank r ≥ R. With r = 1 it
//! is a product of marginals, whose best cross-entropy is `Σ_s H(Y_s | c)` (the product of the
//! true marginals minimises KL among products), above the true entropy `H(Y | c)` by the total
//! correlation: the rank-1 gap is provable, not a matter of training.
//!
//! Everything is evaluated exactly, by enumerating all V^n target tuples.

use serde::Serialize;

use crate::autograd::Tape;
use crate::error::Result;
use crate::kernels::softmax::softmax_row_scalar;
use crate::ops::{self, CpHeadVars};
use crate::tensor::{Rng, Tensor};
use crate::train::adamw::{clip_scale, grad_norm, AdamW, AdamWConfig};

/// The experiment's sizes and training settings.
#[derive(Clone, Debug, Serialize)]
pub struct GroundTruthConfig {
    /// V, the targets' vocabulary size
    pub vocab_size: usize,
    /// n, the tokens that follow a context
    pub horizon: usize,
    /// R, the components of the true mixture
    pub true_rank: usize,
    /// K, the number of context tokens
    pub contexts: usize,
    /// C, the width of the learned context embedding
    pub width: usize,
    /// training steps of each head
    pub steps: usize,
    /// samples (c, y) per step
    pub batch: usize,
    /// the peak learning rate (cosine decay to 5% of it)
    pub lr: f64,
    /// seeds the mixture, the sampling and the heads' initialisation
    pub seed: u64,
}

impl Default for GroundTruthConfig {
    fn default() -> Self {
        GroundTruthConfig { vocab_size: 8, horizon: 3, true_rank: 4, contexts: 8, width: 16, steps: 600, batch: 512, lr: 0.02, seed: 7 }
    }
}

/// The known distribution.
pub struct Mixture {
    /// n, the targets per context
    pub horizon: usize,
    /// V, the targets' vocabulary size
    pub vocab_size: usize,
    /// π_c (K × R)
    pub weights: Vec<Vec<f64>>,
    /// `Q[β][s]` (R × n × V)
    pub components: Vec<Vec<Vec<f64>>>,
}

impl Mixture {
    /// Peaked random components; context c puts 0.7 of its weight on component c mod R.
    pub fn random(config: &GroundTruthConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let components = (0..config.true_rank)
            .map(|_| {
                (0..config.horizon)
                    .map(|_| {
                        let mut row: Vec<f64> = (0..config.vocab_size).map(|_| 2.5 * rng.normal()).collect();
                        softmax_row_scalar(&mut row);
                        row
                    })
                    .collect()
            })
            .collect();
        let weights = (0..config.contexts)
            .map(|c| {
                let noise: Vec<f64> = (0..config.true_rank).map(|_| rng.uniform()).collect();
                let total: f64 = noise.iter().sum();
                (0..config.true_rank).map(|b| 0.3 * noise[b] / total + if b == c % config.true_rank { 0.7 } else { 0.0 }).collect()
            })
            .collect();
        Mixture { horizon: config.horizon, vocab_size: config.vocab_size, weights, components }
    }

    /// The tuple with index `i` (base-V digits, y_0 first).
    fn tuple(&self, mut i: usize) -> Vec<usize> {
        (0..self.horizon)
            .map(|_| {
                let y = i % self.vocab_size;
                i /= self.vocab_size;
                y
            })
            .collect()
    }

    fn tuples(&self) -> usize {
        self.vocab_size.pow(self.horizon as u32)
    }

    /// p(y | c) for every tuple.
    pub fn joint(&self, context: usize) -> Vec<f64> {
        (0..self.tuples())
            .map(|i| {
                let y = self.tuple(i);
                self.weights[context]
                    .iter()
                    .zip(&self.components)
                    .map(|(w, q)| w * y.iter().enumerate().map(|(s, &v)| q[s][v]).product::<f64>())
                    .sum()
            })
            .collect()
    }

    /// H(Y | c), averaged over contexts (uniform).
    pub fn entropy(&self) -> f64 {
        let k = self.weights.len();
        (0..k).map(|c| self.joint(c).iter().filter(|&&p| p > 0.0).map(|p| -p * p.ln()).sum::<f64>()).sum::<f64>() / k as f64
    }

    /// Σ_s H(Y_s | c), averaged over contexts: the best any rank-1 head can do.
    pub fn rank_one_bound(&self) -> f64 {
        let k = self.weights.len();
        let mut total = 0.0;
        for c in 0..k {
            for s in 0..self.horizon {
                for v in 0..self.vocab_size {
                    let p: f64 = self.weights[c].iter().zip(&self.components).map(|(w, q)| w * q[s][v]).sum();
                    if p > 0.0 {
                        total -= p * p.ln();
                    }
                }
            }
        }
        total / k as f64
    }

    /// Draws (context, y_0..y_{n−1}).
    pub fn sample(&self, rng: &mut Rng) -> (usize, Vec<u32>) {
        let context = rng.below(self.weights.len());
        let draw = |probs: &[f64], rng: &mut Rng| {
            let u = rng.uniform();
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if u < acc {
                    return i;
                }
            }
            probs.len() - 1
        };
        let component = draw(&self.weights[context], rng);
        let targets = (0..self.horizon).map(|s| draw(&self.components[component][s], rng) as u32).collect();
        (context, targets)
    }
}

/// A trained head's exact scores.
#[derive(Clone, Debug, Serialize)]
pub struct HeadFit {
    /// r, the head's rank
    pub rank: usize,
    /// λ, the load-balancing coefficient it was trained with
    pub aux_coef: f64,
    /// E_c E_{y~p(·|c)} [−log q(y | c)], exact
    pub joint_cross_entropy: f64,
    /// `f[α]`: fraction of contexts whose most weighted component is α
    pub expert_fraction: Vec<f64>,
    /// `m[α]`: mean gate weight of component α over the contexts
    pub expert_weight: Vec<f64>,
    /// the load-balancing term `r Σ_α f[α] m[α]` (1 when perfectly balanced)
    pub aux: f64,
    /// mean entropy of the gate w over the contexts, in nats
    pub gate_entropy: f64,
}

/// Trains a rank-`rank` head (context embedding, wte, W, G, g) on samples of `truth`.
pub fn fit_head(truth: &Mixture, config: &GroundTruthConfig, rank: usize, aux_coef: f64) -> Result<HeadFit> {
    let (k, c, v, n) = (truth.weights.len(), config.width, config.vocab_size, config.horizon);
    let mut rng = Rng::new(config.seed ^ 0xABCD ^ rank as u64);
    // parameters: context embedding (K, C), wte (V, C), W (r, n, C, C), G (r, C), g (r)
    let mut params = vec![Tensor::<f64>::randn(&[k, c], 1.0, &mut rng), Tensor::randn(&[v, c], 0.3, &mut rng)];
    let mut expand = Tensor::randn(&[rank, n, c, c], 0.3, &mut rng);
    for m in expand.data_mut().chunks_mut(c * c) {
        (0..c).for_each(|i| m[i * c + i] += 1.0);
    }
    params.push(expand);
    if rank > 1 {
        params.push(Tensor::randn(&[rank, c], 0.1, &mut rng));
        params.push(Tensor::zeros(&[rank]));
    }
    let positions = Tensor::<f64>::zeros(&[1, c]);
    let refs: Vec<&Tensor<f64>> = params.iter().collect();
    let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }, &refs);

    let run_head = |tape: &mut Tape<f64>, params: &[Tensor<f64>], contexts: &[u32], targets: &[u32], trainable: bool, aux_coef: f64| {
        let vars: Vec<_> = params.iter().map(|p| tape.leaf(p.clone(), trainable)).collect();
        let wpe = tape.leaf(positions.clone(), false);
        let hidden = ops::embedding(tape, vars[0], wpe, contexts, 1, 0)?;
        let head = CpHeadVars { hidden, wte: vars[1], expand: Some(vars[2]), gate: (rank > 1).then(|| (vars[3], vars[4])) };
        let (objective, stats) = ops::cp_head(tape, head, targets, n, rank, aux_coef)?;
        Ok::<_, crate::error::Error>((vars, objective, stats))
    };

    for step in 0..config.steps {
        let samples: Vec<(usize, Vec<u32>)> = (0..config.batch).map(|_| truth.sample(&mut rng)).collect();
        let contexts: Vec<u32> = samples.iter().map(|s| s.0 as u32).collect();
        let targets: Vec<u32> = samples.iter().flat_map(|s| s.1.iter().copied()).collect();
        let mut tape = Tape::new();
        let (vars, objective, _) = run_head(&mut tape, &params, &contexts, &targets, true, aux_coef)?;
        let mut grads = tape.backward(objective)?;
        let grad_list: Vec<Option<Tensor<f64>>> = vars.iter().map(|v| grads.take(*v)).collect();
        let scale = clip_scale(grad_norm(&grad_list)?, 1.0);
        let grad_refs: Vec<Option<&Tensor<f64>>> = grad_list.iter().map(Option::as_ref).collect();
        let lr = config.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / config.steps as f64).cos());
        optimizer.step(&mut params.iter_mut().collect::<Vec<_>>(), &grad_refs, lr.max(config.lr * 0.05), scale)?;
    }

    // exact cross-entropy: every context, every tuple, weighted by the true p(y | c)
    let tuples = truth.tuples();
    let contexts: Vec<u32> = (0..k).flat_map(|ctx| std::iter::repeat_n(ctx as u32, tuples)).collect();
    let targets: Vec<u32> = (0..k).flat_map(|_| (0..tuples).flat_map(|i| truth.tuple(i).into_iter().map(|y| y as u32))).collect();
    let mut tape = Tape::inference();
    let mut joint_cross_entropy = 0.0;
    let mut stats = None;
    for ctx in 0..k {
        let range = ctx * tuples..(ctx + 1) * tuples;
        let targets = &targets[range.start * n..range.end * n];
        let p = truth.joint(ctx);
        for (i, &prob) in p.iter().enumerate() {
            let (_, _, one) =
                run_head(&mut tape, &params, &contexts[range.start + i..range.start + i + 1], &targets[i * n..(i + 1) * n], false, 0.0)?;
            joint_cross_entropy += prob * one.joint_loss / k as f64;
        }
    }
    // gate usage over one position per context
    let (_, _, usage) = run_head(&mut tape, &params, &(0..k as u32).collect::<Vec<_>>(), &vec![0; k * n], false, 0.0)?;
    stats.get_or_insert(usage);
    let usage = stats.unwrap();
    Ok(HeadFit {
        rank,
        aux_coef,
        joint_cross_entropy,
        expert_fraction: usage.expert_fraction,
        expert_weight: usage.expert_weight,
        aux: usage.aux,
        gate_entropy: usage.gate_entropy,
    })
}
