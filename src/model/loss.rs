//! The training objective on a batch: backbone, then the multi-token head (docs/math.md, "The CP head").

use super::config::ModelConfig;
use super::gpt2;
use super::params::ModelParams;
use crate::autograd::{Tape, Var};
use crate::data::Batch;
use crate::error::Result;
use crate::ops::{self, CpHeadStats, CpHeadVars};
use crate::tensor::Float;

/// What one evaluation of the objective gives.
pub struct LossOutput {
    /// The scalar that training minimises: `joint_loss + λ·aux` (just `joint_loss` when r = 1).
    pub objective: Var,
    /// joint, per-horizon and load-balancing numbers
    pub stats: CpHeadStats,
}

impl LossOutput {
    /// The joint loss: −log p(y_0..y_{n−1}), the mean over positions.
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
) -> Result<LossOutput> {
    let h = gpt2::hidden_states(tape, config, params, &batch.inputs, batch.seq)?;
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
) -> Result<LossOutput> {
    let head = params.head.as_ref();
    let vars = CpHeadVars {
        hidden: h,
        wte: params.wte,
        expand: head.map(|p| p.expand_weight),
        gate: head.filter(|_| config.rank > 1).map(|p| (p.gate_weight, p.gate_bias)),
    };
    let (objective, stats) = ops::cp_head(tape, vars, targets, config.horizon, config.rank, aux_coef)?;
    Ok(LossOutput { objective, stats })
}
