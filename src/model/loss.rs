//! The training objective on a batch: backbone, then the multi-token head (docs/math.md, "The CP head").

use super::config::ModelConfig;
use super::gpt2;
use super::params::ModelParams;
use crate::autograd::{Tape, Var};
use crate::ops::{self, CpHeadStats, CpHeadVars};
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
        Batch { inputs, targets, seq, horizon }
    }

    pub fn rows(&self) -> usize {
        self.inputs.len() / self.seq
    }
}

/// What one evaluation of the objective gives.
pub struct LossOutput {
    /// The scalar that training minimises: `joint_loss + λ·aux` (just `joint_loss` when r = 1).
    pub objective: Var,
    /// joint, per-horizon and load-balancing numbers
    pub stats: CpHeadStats,
}

impl LossOutput {
    pub fn joint_loss(&self) -> f64 {
        self.stats.joint_loss
    }

    /// −log p(y_0): the next-token loss
    pub fn ntp_loss(&self) -> f64 {
        self.stats.head_losses[0]
    }
}

/// The whole model's objective on a batch.
pub fn model_loss<T: Float>(
    tape: &mut Tape<T>,
    config: &ModelConfig,
    params: &ModelParams<Var>,
    batch: &Batch,
    aux_coef: f64,
) -> LossOutput {
    let h = gpt2::hidden_states(tape, config, params, &batch.inputs, batch.seq);
    head_loss(tape, config, params, h, &batch.targets, aux_coef)
}

/// The head's objective from hidden states h (N, C) and targets (N, n).
pub fn head_loss<T: Float>(
    tape: &mut Tape<T>,
    config: &ModelConfig,
    params: &ModelParams<Var>,
    h: Var,
    targets: &[u32],
    aux_coef: f64,
) -> LossOutput {
    let head = params.head.as_ref();
    let vars = CpHeadVars {
        hidden: h,
        wte: params.wte,
        expand: head.map(|p| p.expand_weight),
        gate: head.filter(|_| config.rank > 1).map(|p| (p.gate_weight, p.gate_bias)),
    };
    let (objective, stats) = ops::cp_head(tape, vars, targets, config.horizon, config.rank, aux_coef);
    LossOutput { objective, stats }
}
