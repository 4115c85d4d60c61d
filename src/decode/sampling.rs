//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

use crate::error::Result;
use crate::invalid;
use crate::tensor::{Float, Rng};

/// How the next token is chosen: greedy, or sampled with temperature, top-k and top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// always the most likely token; the other fields are then ignored
    pub greedy: bool,
    /// > 0; divides the logits
    pub temperature: f64,
    /// keep the k most likely tokens (0: all)
    pub top_k: usize,
    /// keep the smallest set of most likely tokens whose probability reaches p (1: all)
    pub top_p: f64,
}

impl SamplingConfig {
    /// Greedy decoding (argmax).
    pub fn greedy() -> Self {
        SamplingConfig { greedy: true, temperature: 1.0, top_k: 0, top_p: 1.0 }
    }

    /// Checks the temperature is positive and finite and top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return invalid!("--temperature must be a positive number (use --greedy for argmax decoding)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid!("--top-p must be in (0, 1]");
        }
        Ok(())
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax<T: Float>(logits: &[T]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The distribution a sampler draws from: softmax(logits / temperature), restricted to the
/// top-k and then the top-p nucleus, renormalised. For greedy decoding, a point mass on the argmax.
pub fn distribution<T: Float>(logits: &[T], config: &SamplingConfig) -> Vec<f64> {
    let mut probs = vec![0.0; logits.len()];
    if config.greedy {
        probs[argmax(logits) as usize] = 1.0;
        return probs;
    }
    let max = logits.iter().copied().fold(T::neg_infinity(), T::max).as_f64();
    for (p, &x) in probs.iter_mut().zip(logits) {
        *p = ((x.as_f64() - max) / config.temperature).exp();
    }
    if config.top_k > 0 || config.top_p < 1.0 {
        // most likely first, the lower index first among equals
        let more_likely = |&a: &usize, &b: &usize| probs[b].total_cmp(&probs[a]).then(a.cmp(&b));
        let mut order: Vec<usize> = (0..probs.len()).collect();
        let keep_k = if config.top_k > 0 { config.top_k.min(order.len()) } else { order.len() };
        if keep_k < order.len() {
            // only the k most likely need an order: gather them in front in linear time, then
            // sort just those (the whole vocabulary's sort cost more than the rest of a step)
            order.select_nth_unstable_by(keep_k, more_likely);
        }
        order[..keep_k].sort_unstable_by(more_likely);
        let total: f64 = probs.iter().sum();
        let (mut kept, mut mass) = (0, 0.0);
        for &i in &order[..keep_k] {
            kept += 1;
            mass += probs[i] / total;
            if mass >= config.top_p {
                break;
            }
        }
        for &i in &order[kept..] {
            probs[i] = 0.0;
        }
    }
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    probs
}

/// [`distribution`] from probabilities instead of logits (zeros stay zero).
pub fn distribution_from_probs<T: Float>(probs: &[T], config: &SamplingConfig) -> Vec<f64> {
    if !config.greedy && 0 < config.top_k && config.top_k < probs.len() && config.top_p >= 1.0 {
        return top_k_from_probs(probs, config);
    }
    if config.greedy || config.temperature != 1.0 || config.top_k > 0 || config.top_p < 1.0 {
        let logits: Vec<f64> = probs.iter().map(|p| p.as_f64().ln()).collect();
        return distribution(&logits, config);
    }
    let total: f64 = probs.iter().map(|p| p.as_f64()).sum();
    probs.iter().map(|p| p.as_f64() / total).collect()
}

/// Top-k without a nucleus, from probabilities: the k most likely tokens are found on the
/// probabilities themselves (tempering keeps their order), and only those k are tempered, the
/// same arithmetic as [`distribution`] on their logarithms. A speculative step samples several
/// of these; tempering the whole vocabulary for each cost more than the step's backbone pass.
fn top_k_from_probs<T: Float>(probs: &[T], config: &SamplingConfig) -> Vec<f64> {
    let more_likely = |&a: &usize, &b: &usize| probs[b].as_f64().total_cmp(&probs[a].as_f64()).then(a.cmp(&b));
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.select_nth_unstable_by(config.top_k, more_likely);
    let kept = &order[..config.top_k];
    let max = kept.iter().map(|&i| probs[i].as_f64().ln()).fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0; probs.len()];
    for &i in kept {
        out[i] = ((probs[i].as_f64().ln() - max) / config.temperature).exp();
    }
    let total: f64 = out.iter().sum();
    out.iter_mut().for_each(|p| *p /= total);
    out
}

/// Draws an index from a normalised distribution.
pub fn draw(probs: &[f64], rng: &mut Rng) -> u32 {
    let u = rng.uniform();
    let mut cumulative = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        cumulative += p;
        if u < cumulative {
            return i as u32;
        }
    }
    // rounding left u above the total: the last token with mass
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> SamplingConfig {
        SamplingConfig { greedy: false, temperature, top_k, top_p }
    }

    #[test]
    fn top_k_keeps_exactly_the_k_most_likely_tokens() {
        let probs = distribution(&[1.0f32, 3.0, 2.0, 0.0], &sampling(1.0, 2, 1.0));
        assert_eq!(probs[0], 0.0);
        assert_eq!(probs[3], 0.0);
        assert!((probs[1] + probs[2] - 1.0).abs() < 1e-12 && probs[1] > probs[2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus_reaching_p() {
        // softmax of ln(0.5), ln(0.3), ln(0.2): nucleus for p = 0.7 is {0, 1}
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let probs = distribution(&logits, &sampling(1.0, 0, 0.7));
        assert!((probs[0] - 0.625).abs() < 1e-6 && (probs[1] - 0.375).abs() < 1e-6 && probs[2] == 0.0);
    }

    #[test]
    fn top_k_and_top_p_keep_what_a_sort_of_the_whole_vocabulary_keeps() {
        // the reference: sort every token, most likely (then lowest index) first
        fn reference(logits: &[f64], config: &SamplingConfig) -> Vec<bool> {
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let probs: Vec<f64> = logits.iter().map(|x| ((x - max) / config.temperature).exp()).collect();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let total: f64 = probs.iter().sum();
            let keep_k = if config.top_k > 0 { config.top_k.min(order.len()) } else { order.len() };
            let (mut kept, mut mass) = (vec![false; probs.len()], 0.0);
            for &i in &order[..keep_k] {
                kept[i] = true;
                mass += probs[i] / total;
                if mass >= config.top_p {
                    break;
                }
            }
            kept
        }
        let mut rng = Rng::new(11);
        for trial in 0..200 {
            // few distinct values, so that ties straddle the cut
            let logits: Vec<f64> = (0..300).map(|_| (rng.below(12) as f64) * 0.5).collect();
            let config = sampling(0.7, [0, 1, 5, 50, 299, 300, 400][trial % 7], [1.0, 0.9, 0.3][trial % 3]);
            let kept: Vec<bool> = distribution(&logits, &config).iter().map(|&p| p > 0.0).collect();
            assert_eq!(kept, reference(&logits, &config), "trial {trial}: {config:?}");
        }
    }

    #[test]
    fn top_k_from_probabilities_gives_the_bits_of_the_general_path() {
        let mut rng = Rng::new(12);
        for trial in 0..100 {
            let weights: Vec<f64> = (0..500).map(|i| if i % 7 == 0 { 0.0 } else { rng.uniform() }).collect();
            let total: f64 = weights.iter().sum();
            let probs: Vec<f32> = weights.iter().map(|w| (w / total) as f32).collect();
            let config = sampling([0.8, 1.0, 1.7][trial % 3], [1, 3, 50, 499][trial % 4], 1.0);
            let logits: Vec<f64> = probs.iter().map(|p| (*p as f64).ln()).collect();
            assert_eq!(top_k_from_probs(&probs, &config), distribution(&logits, &config), "trial {trial}");
        }
    }

    #[test]
    fn low_temperature_approaches_greedy() {
        let probs = distribution(&[1.0f32, 1.5, 0.2], &sampling(0.01, 0, 1.0));
        assert!(probs[1] > 0.999);
    }

    #[test]
    fn draws_follow_the_distribution() {
        let mut rng = Rng::new(7);
        let probs = [0.1, 0.6, 0.3];
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[draw(&probs, &mut rng) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            assert!((*c as f64 / 30_000.0 - p).abs() < 0.01, "{counts:?}");
        }
    }
}
