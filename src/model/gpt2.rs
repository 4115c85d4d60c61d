//! The GPT-2 backbone (docs/math.md, "The model"), built from `ops`: the one place where the
//! model's forward pass is written, for training and evaluation on every device (decoding's
//! cached pass is `decode::pass`).

use super::config::ModelConfig;
use super::params::{Init, ModelParams};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::ops;
use crate::tensor::{Float, Rng, Tensor};

/// Fresh parameters, initialised as docs/math.md, "The model", says.
pub fn init_params<T: Float>(config: &ModelConfig, rng: &mut Rng) -> ModelParams<Tensor<T>> {
    let result: std::result::Result<_, std::convert::Infallible> = ModelParams::build(config, |spec| {
        Ok(match spec.init {
            Init::Normal(std) => Tensor::randn(spec.shape, std, rng),
            Init::Zeros => Tensor::zeros(spec.shape),
            Init::Ones => Tensor::full(spec.shape, T::one()),
            Init::IdentityPlusNoise(std) => {
                // shape (r, n, C, C): one C×C matrix per (α, s)
                let c = spec.shape[spec.shape.len() - 1];
                let mut t = Tensor::randn(spec.shape, std, rng);
                for matrix in t.data_mut().chunks_mut(c * c) {
                    for i in 0..c {
                        matrix[i * c + i] += T::one();
                    }
                }
                t
            }
        })
    });
    match result {
        Ok(params) => params,
        Err(never) => match never {},
    }
}

/// Puts every parameter on the tape; `trainable(name)` says which ones get gradients.
pub fn params_on_tape<T: Float>(
    tape: &mut Tape<T>,
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    trainable: impl Fn(&str) -> bool,
) -> ModelParams<Var> {
    params.map(config, |name, tensor| tape.leaf(tensor.clone(), trainable(name)))
}

/// The final hidden states `h = ln_f(x)` after all blocks.
/// tokens (B·T) with `seq = T` → h (B·T, C)
pub fn hidden_states<T: Float>(
    tape: &mut Tape<T>,
    config: &ModelConfig,
    params: &ModelParams<Var>,
    tokens: &[u32],
    seq: usize,
) -> Result<Var> {
    let mut x = ops::embedding(tape, params.wte, params.wpe, tokens, seq, 0)?;
    for block in &params.blocks {
        let block_start = tape.mark();
        // x += attn(ln_1(x))
        let a = ops::layernorm(tape, x, block.ln_1_weight, block.ln_1_bias)?;
        let qkv = ops::linear(tape, a, block.attn_c_attn_weight, Some(block.attn_c_attn_bias))?;
        let attended = ops::causal_self_attention(tape, qkv, seq, config.n_head)?;
        x = ops::linear_residual(tape, attended, block.attn_c_proj_weight, block.attn_c_proj_bias, x)?;
        // x += mlp(ln_2(x))
        let m = ops::layernorm(tape, x, block.ln_2_weight, block.ln_2_bias)?;
        let activated = ops::linear_gelu(tape, m, block.mlp_c_fc_weight, block.mlp_c_fc_bias)?;
        x = ops::linear_residual(tape, activated, block.mlp_c_proj_weight, block.mlp_c_proj_bias, x)?;
        // the block's intermediates live on only where a backward rule saved them
        tape.release_since(block_start, &[x]);
    }
    ops::layernorm(tape, x, params.ln_f_weight, params.ln_f_bias)
}

/// Next-token logits `h · wteᵀ` for the given hidden states: h (N, C) → (N, V)
pub fn next_token_logits<T: Float>(tape: &mut Tape<T>, params: &ModelParams<Var>, h: Var) -> Result<Var> {
    ops::unembed(tape, h, params.wte)
}
