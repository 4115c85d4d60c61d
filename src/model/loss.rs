//! The training objective on a batch: backbone, then the head's losses (SPEC.md section 2).

use super::config::ModelConfig;
use super::gpt2;
use super::params::ModelParams;
use crate::autograd::{Tape, Var};
use crate::ops;
use crate::tensor::Float;

/// A batch of B rows: inputs x_0..x_{T−1} and, for each position t, its n targets x_{t+1..t+n}.
#[derive(Clone, Debug)]
pub struct Batch {
    /// (B·T)
    pub inputs: Vec<u32>,
    /// (B·T, n): targets[t·n + s] = y_s at position t
    pub targets: Vec<u32>,
    pub seq: usize,
    pub horizon: usize,
}

impl Batch {
    /// Cuts rows of `T + n` tokens into inputs and targets.
    pub fn from_rows(rows: &[&[u32]], seq: usize, horizon: usize) -> Self {
        let mut inputs = Vec::with_capacity(rows.len() * seq);
        let mut targets = Vec::with_capacity(rows.len() * seq * horizon);
        for row in rows {
            assert_eq!(row.len(), seq + horizon, "a training row holds T + n tokens");
            inputs.extend_from_slice(&row[..seq]);
            for t in 0..seq {
                targets.extend_from_slice(&row[t + 1..t + 1 + horizon]);
            }
        }
        Batch {
            inputs,
            targets,
            seq,
            horizon,
        }
    }

    pub fn rows(&self) -> usize {
        self.inputs.len() / self.seq
    }
}

/// What one evaluation of the objective gives.
pub struct LossOutput {
    /// The scalar that training minimises: `joint_loss + λ·aux`.
    pub objective: Var,
    /// mean −log p(y_0..y_{n−1})
    pub joint_loss: f64,
    /// mean −log p(y_s), s = 0..n−1; `head_losses[0]` is the next-token loss
    pub head_losses: Vec<f64>,
}

impl LossOutput {
    pub fn ntp_loss(&self) -> f64 {
        self.head_losses[0]
    }
}

/// The whole model's objective on a batch.
pub fn model_loss<T: Float>(tape: &mut Tape<T>, config: &ModelConfig, params: &ModelParams<Var>, batch: &Batch) -> LossOutput {
    let h = gpt2::hidden_states(tape, config, params, &batch.inputs, batch.seq);
    head_loss(tape, config, params, h, &batch.targets)
}

/// The head's objective from hidden states h (N, C) and targets (N, n).
pub fn head_loss<T: Float>(tape: &mut Tape<T>, config: &ModelConfig, params: &ModelParams<Var>, h: Var, targets: &[u32]) -> LossOutput {
    assert!(!config.has_head(), "the multi-token head is not built yet");
    let logits = gpt2::next_token_logits(tape, params, h);
    let objective = ops::cross_entropy(tape, logits, targets);
    let loss = tape.value(objective).item().as_f64();
    LossOutput {
        objective,
        joint_loss: loss,
        head_losses: vec![loss],
    }
}
