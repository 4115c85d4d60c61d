//! Model shape: GPT-2's hyperparameters plus the multi-token head's horizon n and rank r.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::invalid;

/// A model's shape: GPT-2's hyperparameters and the head's horizon n and rank r. Saved with
/// every checkpoint as `config.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// V
    pub vocab_size: usize,
    /// P, the longest sequence the position table covers
    pub n_positions: usize,
    /// C
    pub n_embd: usize,
    /// L
    pub n_layer: usize,
    /// H
    pub n_head: usize,
    /// n, tokens predicted per position
    pub horizon: usize,
    /// r, mixture components of the CP head
    pub rank: usize,
}

/// The `--model` presets (docs/cli.md, "Model presets"): (name, C, L, H, n_positions).
pub const PRESETS: [(&str, usize, usize, usize, usize); 3] =
    [("tiny", 64, 2, 4, 128), ("small", 256, 4, 4, 256), ("base", 768, 12, 12, 1024)];

impl ModelConfig {
    /// The `--model` preset `name` with the given V, n and r, validated.
    pub fn preset(name: &str, vocab_size: usize, horizon: usize, rank: usize) -> Result<Self> {
        let Some(&(_, n_embd, n_layer, n_head, n_positions)) = PRESETS.iter().find(|p| p.0 == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            return invalid!("unknown model preset '{name}' (choose one of {})", names.join(", "));
        };
        let config = ModelConfig { vocab_size, n_positions, n_embd, n_layer, n_head, horizon, rank };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the shape is usable: V of 2 to 2³² − 1, positive sizes, H dividing C, n and r
    /// at least 1.
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size < 2 {
            return invalid!("vocabulary size {} is too small (need at least 2)", self.vocab_size);
        }
        if self.vocab_size > u32::MAX as usize {
            return invalid!("vocabulary size {} does not fit 32-bit token ids", self.vocab_size);
        }
        if self.n_embd == 0 || self.n_layer == 0 || self.n_head == 0 || self.n_positions == 0 {
            return invalid!("n_embd, n_layer, n_head and n_positions must all be positive");
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return invalid!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head);
        }
        if self.horizon == 0 || self.rank == 0 {
            return invalid!("--horizon and --rank must be at least 1");
        }
        Ok(())
    }

    /// Whether the model has head parameters (`mtp.*`): all but the plain GPT-2 case n = r = 1.
    pub fn has_head(&self) -> bool {
        self.horizon > 1 || self.rank > 1
    }

    /// hs = C / H, the width of one attention head.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }
}
