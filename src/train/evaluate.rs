//! Losses without gradients: on validation batches during training, and on a whole text
//! (`multitoken eval`, SPEC.md section 5).

use crate::autograd::Tape;
use crate::model::loss::head_loss;
use crate::model::{gpt2, model_loss, Batch, ModelConfig, ModelParams};
use crate::tensor::Tensor;

/// Mean losses over a set of scored positions.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Losses {
    pub joint_loss: f64,
    pub ntp_loss: f64,
    pub head_losses: Vec<f64>,
    /// positions scored
    pub tokens: usize,
}

/// Accumulates position-weighted means.
#[derive(Default)]
struct Mean {
    joint: f64,
    heads: Vec<f64>,
    count: usize,
}

impl Mean {
    fn add(&mut self, joint: f64, heads: &[f64], count: usize) {
        self.heads.resize(heads.len(), 0.0);
        self.joint += joint * count as f64;
        for (total, h) in self.heads.iter_mut().zip(heads) {
            *total += h * count as f64;
        }
        self.count += count;
    }

    fn finish(self) -> Losses {
        let n = self.count.max(1) as f64;
        let head_losses: Vec<f64> = self.heads.iter().map(|h| h / n).collect();
        Losses {
            joint_loss: self.joint / n,
            ntp_loss: head_losses.first().copied().unwrap_or(f64::NAN),
            head_losses,
            tokens: self.count,
        }
    }
}

pub fn evaluate_batches(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, batches: &[Batch]) -> Losses {
    let mut mean = Mean::default();
    for batch in batches {
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let out = model_loss(&mut tape, config, &vars, batch);
        mean.add(out.joint_loss, &out.head_losses, batch.inputs.len());
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
        let targets: Vec<u32> = (start..start + scored)
            .flat_map(|t| tokens[t + 1..t + 1 + n].iter().copied())
            .collect();
        let out = head_loss(&mut tape, config, &vars, h, &targets);
        mean.add(out.joint_loss, &out.head_losses, scored);
    }
    mean.finish()
}
