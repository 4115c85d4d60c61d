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

/// The `--model` presets (docs/cli.md, "Model presets"): (name, C, L, H, n_positions). The
/// last four are the shapes of the published GPT-2 models (124M, 355M, 774M and 1.5B
/// parameters at V = 50257).
pub const PRESETS: [(&str, usize, usize, usize, usize); 7] = [
    ("tiny", 64, 2, 4, 128),
    ("small", 256, 4, 4, 256),
    ("base", 768, 12, 12, 1024),
    ("gpt2", 768, 12, 12, 1024),
    ("gpt2-medium", 1024, 24, 16, 1024),
    ("gpt2-large", 1280, 36, 20, 1024),
    ("gpt2-xl", 1600, 48, 25, 1024),
];

/// Sizes that replace a preset's (`--n-embd`, `--n-layer`, `--n-head`, `--n-positions`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeOverrides {
    /// C
    pub n_embd: Option<usize>,
    /// L
    pub n_layer: Option<usize>,
    /// H
    pub n_head: Option<usize>,
    /// P
    pub n_positions: Option<usize>,
}

impl ShapeOverrides {
    /// Whether any size is given.
    pub fn any(&self) -> bool {
        self.n_embd.is_some() || self.n_layer.is_some() || self.n_head.is_some() || self.n_positions.is_some()
    }
}

/// The largest size of each dimension this program accepts, in the order of
/// `ModelConfig`'s fields: every published GPT-2 (V 50257, P 1024, C up to 1600, L up to 48,
/// H up to 25) fits with room to spare, and nothing read from a file or a flag can ask for more.
pub const LIMITS: [(&str, usize); 7] = [
    ("vocabulary size", MAX_VOCAB_SIZE),
    ("n_positions", 1 << 16),
    ("n_embd", 16_384),
    ("n_layer", 256),
    ("n_head", 256),
    ("horizon n", 64),
    ("rank r", 256),
];

/// The largest vocabulary (and so the largest tokenizer, and V in a token file's header).
pub const MAX_VOCAB_SIZE: usize = 1 << 20;

/// The most parameters a model may have: 8·10⁹ (32 GB in f32), five times GPT-2 XL's 1.56·10⁹.
pub const MAX_PARAMETERS: u128 = 8_000_000_000;

impl ModelConfig {
    /// The `--model` preset `name` with the given V, n and r, validated.
    pub fn preset(name: &str, vocab_size: usize, horizon: usize, rank: usize) -> Result<Self> {
        Self::shaped(name, &ShapeOverrides::default(), vocab_size, horizon, rank)
    }

    /// The preset `name` with some of its sizes replaced, validated: a shape that cannot work
    /// is refused here, before anything is allocated.
    pub fn shaped(name: &str, overrides: &ShapeOverrides, vocab_size: usize, horizon: usize, rank: usize) -> Result<Self> {
        let Some(&(_, n_embd, n_layer, n_head, n_positions)) = PRESETS.iter().find(|p| p.0 == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            return invalid!("unknown model preset '{name}' (choose one of {})", names.join(", "));
        };
        let config = ModelConfig {
            vocab_size,
            n_positions: overrides.n_positions.unwrap_or(n_positions),
            n_embd: overrides.n_embd.unwrap_or(n_embd),
            n_layer: overrides.n_layer.unwrap_or(n_layer),
            n_head: overrides.n_head.unwrap_or(n_head),
            horizon,
            rank,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the shape is usable and within [`LIMITS`]: V of 2 or more, positive sizes,
    /// H dividing C, n and r at least 1, and no more than [`MAX_PARAMETERS`] parameters. Every
    /// size read from a file or a flag passes through here before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size < 2 {
            return invalid!("vocabulary size {} is too small (need at least 2)", self.vocab_size);
        }
        let sizes = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.n_head, self.horizon, self.rank];
        for ((name, limit), value) in LIMITS.into_iter().zip(sizes) {
            if value == 0 {
                return invalid!("{name} must be positive");
            }
            if value > limit {
                return invalid!("{name} {value} is larger than this program allows ({limit})");
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return invalid!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head);
        }
        let parameters = self.parameter_count();
        if parameters > MAX_PARAMETERS {
            return invalid!(
                "this shape has {parameters} parameters, more than this program allows ({MAX_PARAMETERS}); choose a smaller model"
            );
        }
        Ok(())
    }

    /// The number of parameters: embeddings, blocks, final LayerNorm and the head. Exact for
    /// any shape within [`LIMITS`] (computed in 128 bits).
    pub fn parameter_count(&self) -> u128 {
        let [v, p, c, l, r, n] = [self.vocab_size, self.n_positions, self.n_embd, self.n_layer, self.rank, self.horizon].map(|x| x as u128);
        // per block: c_attn C·3C + 3C, c_proj C·C + C, c_fc C·4C + 4C, mlp c_proj 4C·C + C, two LayerNorms 4C
        let block = 12 * c * c + 13 * c;
        let head = if self.has_head() { r * n * c * c + r * c + r } else { 0 };
        v * c + p * c + l * block + 2 * c + head
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ModelParams;

    #[test]
    fn the_parameter_count_is_the_sum_of_the_parameters_shapes() {
        for (horizon, rank) in [(1, 1), (3, 2)] {
            let config = ModelConfig::preset("tiny", 300, horizon, rank).unwrap();
            let mut total = 0u128;
            ModelParams::<()>::build(&config, |spec| {
                total += spec.shape.iter().product::<usize>() as u128;
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(config.parameter_count(), total);
        }
    }

    #[test]
    fn sizes_past_the_limits_are_refused_before_anything_is_allocated() {
        let gpt2_xl = ModelConfig { vocab_size: 50257, n_positions: 1024, n_embd: 1600, n_layer: 48, n_head: 25, horizon: 4, rank: 8 };
        gpt2_xl.validate().unwrap();
        let refused = |config: ModelConfig, expected: &str| {
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
        };
        refused(ModelConfig { n_layer: 1_000_000_000, ..gpt2_xl.clone() }, "n_layer 1000000000 is larger");
        refused(ModelConfig { vocab_size: u32::MAX as usize, ..gpt2_xl.clone() }, "vocabulary size");
        refused(ModelConfig { rank: 1_000_000, ..gpt2_xl.clone() }, "rank r");
        refused(ModelConfig { horizon: 0, ..gpt2_xl.clone() }, "must be positive");
        // each size within its limit, together too many: the count, not an overflow
        refused(ModelConfig { n_embd: 16_384, n_head: 128, n_layer: 256, ..gpt2_xl.clone() }, "parameters");
        refused(ModelConfig { n_embd: usize::MAX, ..gpt2_xl }, "n_embd");
    }
}
