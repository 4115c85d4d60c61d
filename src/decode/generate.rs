//! Plain autoregressive generation: each new token runs the backbone over the whole context
//! (the last n_positions tokens). Simple and obviously correct; the reference that faster
//! decoders are compared against.

use std::time::Instant;

use super::sampling::{self, SamplingConfig};
use crate::autograd::Tape;
use crate::error::Result;
use crate::invalid;
use crate::model::{gpt2, ModelConfig, ModelParams};
use crate::ops::cp_head;
use crate::tensor::{Rng, Tensor};

#[derive(Clone, Debug)]
pub struct Generation {
    /// the new token ids
    pub tokens: Vec<u32>,
    /// backbone passes spent on decoding (prefill not counted)
    pub forward_passes: usize,
    pub elapsed_s: f64,
}

impl Generation {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens.len() as f64 / self.elapsed_s.max(1e-9)
    }

    /// New tokens per decoding pass.
    pub fn mean_accepted(&self) -> f64 {
        self.tokens.len() as f64 / self.forward_passes.max(1) as f64
    }
}

/// Next-token log-probabilities (the head's horizon-0 marginal) at the last position of `context`.
pub fn next_token_log_probs(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, context: &[u32]) -> Vec<f32> {
    let mut tape = Tape::inference();
    let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
    let h = gpt2::hidden_states(&mut tape, config, &vars, context, context.len());
    let c = config.n_embd;
    let last = &tape.value(h).data()[(context.len() - 1) * c..];
    let head = params.head.as_ref();
    let gate = head.filter(|_| config.rank > 1).map(|p| (&p.gate_weight, &p.gate_bias));
    cp_head::next_token_log_probs(last, &params.wte, head.map(|p| &p.expand_weight), gate, config.horizon, config.rank)
}

/// Generates `max_new_tokens` after `prompt`.
pub fn generate(
    config: &ModelConfig,
    params: &ModelParams<Tensor<f32>>,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &SamplingConfig,
    seed: u64,
) -> Result<Generation> {
    if prompt.is_empty() {
        return invalid!("the prompt is empty: give at least one character of text");
    }
    sampling.validate()?;
    let mut rng = Rng::new(seed);
    let mut sequence = prompt.to_vec();
    let started = Instant::now();
    for _ in 0..max_new_tokens {
        let context = &sequence[sequence.len().saturating_sub(config.n_positions)..];
        let logits = next_token_log_probs(config, params, context);
        let next =
            if sampling.greedy { sampling::argmax(&logits) } else { sampling::draw(&sampling::distribution(&logits, sampling), &mut rng) };
        sequence.push(next);
    }
    Ok(Generation { tokens: sequence[prompt.len()..].to_vec(), forward_passes: max_new_tokens, elapsed_s: started.elapsed().as_secs_f64() })
}
