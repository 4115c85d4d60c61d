//! Losses without gradients: on validation batches during training, and on a whole text
//! (`multitoken eval`, SPEC.md section 5).

use crate::autograd::Tape;
use crate::model::loss::head_loss;
use crate::model::{gpt2, model_loss, Batch, ModelConfig, ModelParams};
use crate::ops::CpHeadStats;
use crate::tensor::Tensor;

/// Mean losses over a set of scored positions.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Losses {
    pub joint_loss: f64,
    pub ntp_loss: f64,
    pub head_losses: Vec<f64>,
    /// positions scored
    pub tokens: usize,
    /// mean entropy of the gate (nats)
    pub gate_entropy: f64,
    /// fraction of positions whose most weighted component is α
    pub expert_fraction: Vec<f64>,
    /// mean gate weight of component α
    pub expert_weight: Vec<f64>,
    /// the load-balancing term r Σ f m (over all scored positions)
    pub aux: f64,
}

/// Accumulates position-weighted means of the head's statistics.
#[derive(Default)]
pub(crate) struct Mean {
    joint: f64,
    heads: Vec<f64>,
    entropy: f64,
    fraction: Vec<f64>,
    weight: Vec<f64>,
    count: usize,
}

fn add_weighted(total: &mut Vec<f64>, values: &[f64], weight: f64) {
    total.resize(values.len(), 0.0);
    for (t, v) in total.iter_mut().zip(values) {
        *t += v * weight;
    }
}

impl Mean {
    pub(crate) fn add(&mut self, stats: &CpHeadStats, count: usize) {
        let weight = count as f64;
        self.joint += stats.joint_loss * weight;
        self.entropy += stats.gate_entropy * weight;
        add_weighted(&mut self.heads, &stats.head_losses, weight);
        add_weighted(&mut self.fraction, &stats.expert_fraction, weight);
        add_weighted(&mut self.weight, &stats.expert_weight, weight);
        self.count += count;
    }

    pub(crate) fn finish(self) -> Losses {
        let n = self.count.max(1) as f64;
        let mean = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| x / n).collect() };
        let head_losses = mean(self.heads);
        let (expert_fraction, expert_weight) = (mean(self.fraction), mean(self.weight));
        let aux = expert_fraction.len() as f64 * expert_fraction.iter().zip(&expert_weight).map(|(f, m)| f * m).sum::<f64>();
        Losses {
            joint_loss: self.joint / n,
            ntp_loss: head_losses.first().copied().unwrap_or(f64::NAN),
            head_losses,
            tokens: self.count,
            gate_entropy: self.entropy / n,
            expert_fraction,
            expert_weight,
            aux,
        }
    }
}

pub fn evaluate_batches(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, batches: &[Batch]) -> Losses {
    let mut mean = Mean::default();
    for batch in batches {
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let out = model_loss(&mut tape, config, &vars, batch, 0.0);
        mean.add(&out.stats, batch.inputs.len());
    }
    mean.finish()
}

/// Scores a token stream x_0..x_{N−1} as SPEC.md's `eval` says: windows of n_positions input
/// positions, no context carried between windows, every position t with t + n ≤ N − 1 scored.
pub fn evaluate_tokens(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, tokens: &[u32]) -> Losses {
    let (n, window) = (config.horizon, config.n_positions);
    let mut mean = Mean::default();
    let total = tokens.len();
    if total <= n {
        return mean.finish();
    }
    let last_scored = total - 1 - n; // largest t with t + n ≤ N − 1
    for start in (0..=last_scored).step_by(window) {
        let end = (start + window).min(total);
        let scored = (last_scored + 1 - start).min(end - start);
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let h = gpt2::hidden_states(&mut tape, config, &vars, &tokens[start..end], end - start);
        // keep the rows of scored positions only
        let c = config.n_embd;
        let rows = Tensor::from_vec(&[scored, c], tape.value(h).data()[..scored * c].to_vec());
        let h = tape.leaf(rows, false);
        let targets: Vec<u32> = (start..start + scored).flat_map(|t| tokens[t + 1..t + 1 + n].iter().copied()).collect();
        let out = head_loss(&mut tape, config, &vars, h, &targets, 0.0);
        mean.add(&out.stats, scored);
    }
    mean.finish()
}
