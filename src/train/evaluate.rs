//! Losses without gradients: on validation batches during training, and on a whole text
//! (`multitoken eval`, docs/cli.md).

use crate::autograd::Tape;
use crate::data::Batch;
use crate::error::Result;
use crate::model::loss::head_loss;
use crate::model::{gpt2, model_loss, ModelConfig, ModelParams};
use crate::ops::CpHeadStats;
use crate::tensor::Tensor;

/// Mean losses over a set of scored positions.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Losses {
    /// mean −log p(y_0..y_{n−1})
    pub joint_loss: f64,
    /// the next-token loss, equal to `head_losses[0]`
    pub ntp_loss: f64,
    /// mean −log p(y_s) for s = 0..n−1
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
struct Mean {
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
    fn add(&mut self, stats: &CpHeadStats, count: usize) {
        let weight = count as f64;
        self.joint += stats.joint_loss * weight;
        self.entropy += stats.gate_entropy * weight;
        add_weighted(&mut self.heads, &stats.head_losses, weight);
        add_weighted(&mut self.fraction, &stats.expert_fraction, weight);
        add_weighted(&mut self.weight, &stats.expert_weight, weight);
        self.count += count;
    }

    /// The running sums, flat: joint, entropy, count, then the heads', fractions' and weights'.
    fn to_sums(&self) -> Vec<f64> {
        let scalars = [self.joint, self.entropy, self.count as f64];
        scalars.into_iter().chain(self.heads.iter().chain(&self.fraction).chain(&self.weight).copied()).collect()
    }

    /// Replaces the running sums by `sums`, laid out as [`Mean::to_sums`] lays out this one's.
    fn set_sums(&mut self, sums: &[f64]) {
        let (heads, fractions) = (self.heads.len(), self.fraction.len());
        (self.joint, self.entropy, self.count) = (sums[0], sums[1], sums[2].round() as usize);
        let rest = &sums[3..];
        self.heads.copy_from_slice(&rest[..heads]);
        self.fraction.copy_from_slice(&rest[heads..heads + fractions]);
        self.weight.copy_from_slice(&rest[heads + fractions..]);
    }

    fn finish(self) -> Losses {
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

/// Mean losses over batches, on the device where `params` live.
pub fn evaluate_batches(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, batches: &[Batch]) -> Result<Losses> {
    let mut mean = Mean::default();
    for batch in batches {
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let out = model_loss(&mut tape, config, &vars, batch, 0.0)?;
        mean.add(&out.stats, batch.inputs.len());
    }
    Ok(mean.finish())
}

/// [`evaluate_batches`] shared out among the `world` ranks of a data-parallel run: this rank
/// scores its shard of every batch ([`Batch::shard`]), and `all_sum` adds up every rank's sums
/// in place (an all-reduce), so that each rank returns the losses of the whole batches, as one
/// device would have scored them but for the order of the sums.
pub fn evaluate_batch_shards(
    config: &ModelConfig,
    params: &ModelParams<Tensor<f32>>,
    batches: &[Batch],
    (rank, world): (usize, usize),
    all_sum: &mut dyn FnMut(&mut [f64]) -> Result<()>,
) -> Result<Losses> {
    let mut mean = Mean::default();
    for batch in batches {
        let shard = batch.shard(rank, world);
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let out = model_loss(&mut tape, config, &vars, &shard, 0.0)?;
        mean.add(&out.stats, shard.inputs.len());
    }
    let mut sums = mean.to_sums();
    all_sum(&mut sums)?;
    mean.set_sums(&sums);
    Ok(mean.finish())
}

/// One window of `eval` (docs/cli.md, `eval`): input tokens `start..end`, of which the first
/// `scored` positions are scored, with their targets (scored, n).
pub struct ScoringWindow<'a> {
    /// the window's input tokens (at most n_positions)
    pub inputs: &'a [u32],
    /// how many of its first positions are scored
    pub scored: usize,
    /// (scored, n): the targets x_{t+1..t+n} of each scored position t
    pub targets: Vec<u32>,
}

/// The windows of a token stream x_0..x_{N−1}: n_positions input positions each, no context
/// carried between them, every position t with t + n ≤ N − 1 scored once.
pub fn scoring_windows(tokens: &[u32], horizon: usize, window: usize) -> Vec<ScoringWindow<'_>> {
    let total = tokens.len();
    if total <= horizon {
        return Vec::new();
    }
    let last_scored = total - 1 - horizon; // largest t with t + n ≤ N − 1
    (0..=last_scored)
        .step_by(window)
        .map(|start| {
            let end = (start + window).min(total);
            let scored = (last_scored + 1 - start).min(end - start);
            let targets = (start..start + scored).flat_map(|t| tokens[t + 1..t + 1 + horizon].iter().copied()).collect();
            ScoringWindow { inputs: &tokens[start..end], scored, targets }
        })
        .collect()
}

/// Scores a token stream as `eval` does (docs/cli.md; see [`scoring_windows`]).
/// On the device where `params` live.
pub fn evaluate_tokens(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, tokens: &[u32]) -> Result<Losses> {
    let mut mean = Mean::default();
    for window in scoring_windows(tokens, config.horizon, config.n_positions) {
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let h = gpt2::hidden_states(&mut tape, config, &vars, window.inputs, window.inputs.len())?;
        // keep the rows of scored positions only
        let rows = tape.value(h).rows(0, window.scored);
        let h = tape.leaf(rows, false);
        let out = head_loss(&mut tape, config, &vars, h, &window.targets, 0.0)?;
        mean.add(&out.stats, window.scored);
    }
    Ok(mean.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_shared_out_among_ranks_equals_validation_on_one() {
        use crate::data::batches::validation_batches;
        let config = ModelConfig::preset("tiny", 64, 3, 2).unwrap();
        let params = gpt2::init_params::<f32>(&config, &mut crate::tensor::Rng::new(7));
        let tokens: Vec<u32> = (0..4000u32).map(|i| (i * 7 + i / 13) % 64).collect();
        let batches = validation_batches(&tokens[..], 4, 16, config.horizon, 3).unwrap();
        let whole = evaluate_batches(&config, &params, &batches).unwrap();
        // each rank's sums, as an all-reduce would see them
        let sums_of = |rank| {
            let mut seen = Vec::new();
            evaluate_batch_shards(&config, &params, &batches, (rank, 2), &mut |sums| {
                seen = sums.to_vec();
                Ok(())
            })
            .unwrap();
            seen
        };
        let others = sums_of(1);
        assert_ne!(others, sums_of(0), "the ranks score different rows");
        let shared = evaluate_batch_shards(&config, &params, &batches, (0, 2), &mut |sums| {
            sums.iter_mut().zip(&others).for_each(|(mine, theirs)| *mine += theirs);
            Ok(())
        })
        .unwrap();
        assert_eq!(shared.tokens, whole.tokens);
        let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} against {b}");
        close(shared.joint_loss, whole.joint_loss);
        close(shared.gate_entropy, whole.gate_entropy);
        close(shared.aux, whole.aux);
        for (a, b) in shared
            .head_losses
            .iter()
            .chain(&shared.expert_fraction)
            .chain(&shared.expert_weight)
            .zip(whole.head_losses.iter().chain(&whole.expert_fraction).chain(&whole.expert_weight))
        {
            close(*a, *b);
        }
    }

    #[test]
    fn scoring_windows_score_every_position_with_all_its_targets_once() {
        let tokens: Vec<u32> = (0..23).collect();
        for (horizon, window) in [(1, 8), (3, 8), (3, 5), (2, 30)] {
            let windows = scoring_windows(&tokens, horizon, window);
            let mut next = 0; // the next position to be scored
            for w in &windows {
                assert!(w.inputs.len() <= window && w.scored <= w.inputs.len());
                let start = w.inputs[0] as usize;
                assert_eq!(start, next, "windows are consecutive and do not overlap");
                for t in 0..w.scored {
                    let expected: Vec<u32> = (1..=horizon).map(|s| (start + t + s) as u32).collect();
                    assert_eq!(&w.targets[t * horizon..(t + 1) * horizon], expected.as_slice());
                }
                next += w.scored;
            }
            assert_eq!(next, tokens.len() - horizon, "positions t with t + n ≤ N − 1, all of them");
        }
        assert!(scoring_windows(&tokens[..2], 2, 8).is_empty());
    }
}
