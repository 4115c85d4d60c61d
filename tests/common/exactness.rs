//! The exactness test of speculative sampling: the first two tokens' joint distribution by
//! enumeration, and Pearson's chi-square statistic of sampled pairs against it.

use multitoken::decode::head::Head;
use multitoken::decode::kv_cache::CachedBackbone;
use multitoken::model::{ModelConfig, ModelParams};
use multitoken::tensor::Tensor;

/// Exact probabilities of the first two new tokens sampled at `temperature`, by enumeration
/// with the reference decoder (each next-token distribution p tempered into p^(1/T), normalised).
pub fn exact_pair_distribution(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, prompt: &[u32], temperature: f64) -> Vec<f64> {
    let v = config.vocab_size;
    let next = |context: &[u32]| -> Vec<f64> {
        let mut backbone = CachedBackbone::new(config, params);
        let h = backbone.forward(context);
        let state = Head::new(config, params).states(&h[h.len() - config.n_embd..], 1).unwrap().remove(0);
        let probs: Vec<f64> = state.next_token_probs().iter().map(|&x| x as f64).collect();
        let largest = probs.iter().copied().fold(0.0, f64::max);
        let tempered: Vec<f64> = probs.iter().map(|p| (p / largest).powf(1.0 / temperature)).collect();
        let total: f64 = tempered.iter().sum();
        tempered.iter().map(|p| p / total).collect()
    };
    let first = next(prompt);
    let mut joint = vec![0.0; v * v];
    for a in 0..v {
        let mut context = prompt.to_vec();
        context.push(a as u32);
        for (b, p) in next(&context).iter().enumerate() {
            joint[a * v + b] = first[a] * p;
        }
    }
    joint
}

/// Pearson's statistic of observed counts against expected probabilities, cells with expected
/// count under 5 pooled; returns (statistic, degrees of freedom).
pub fn chi_square(counts: &[usize], probs: &[f64]) -> (f64, usize) {
    let total: usize = counts.iter().sum();
    let (mut statistic, mut cells) = (0.0, 0);
    let (mut pooled_observed, mut pooled_expected) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        let expected = p * total as f64;
        if expected < 5.0 {
            pooled_observed += c as f64;
            pooled_expected += expected;
        } else {
            statistic += (c as f64 - expected).powi(2) / expected;
            cells += 1;
        }
    }
    if pooled_expected > 0.0 {
        statistic += (pooled_observed - pooled_expected).powi(2) / pooled_expected.max(1e-9);
        cells += 1;
    }
    (statistic, cells - 1)
}

/// The chi-square critical value at significance 0.001 (Wilson–Hilferty approximation).
pub fn critical_value(df: usize) -> f64 {
    let (k, z) = (df as f64, 3.090);
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}
