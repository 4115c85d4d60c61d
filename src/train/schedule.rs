//! Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio · lr`.

/// The learning rate for 0-based `step` of a run of `total_steps`.
pub fn learning_rate(step: u64, total_steps: u64, warmup_steps: u64, lr: f64, min_lr_ratio: f64) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps).max(1);
    let progress = ((step - warmup_steps) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_the_floor() {
        assert!((learning_rate(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        let rates: Vec<f64> = (10..100).map(|s| learning_rate(s, 100, 10, 1.0, 0.1)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
    }
}
