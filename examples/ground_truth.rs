//! Fits CP heads of several ranks to a known rank-4 mixture of products over n = 3 tokens and
//! prints a markdown table (docs/results.md, "Ground truth").
//!
//! cargo run --release --example ground_truth

use multitoken::experiments::ground_truth::{fit_head, GroundTruthConfig, Mixture};

fn main() -> Result<(), multitoken::error::Error> {
    let config = GroundTruthConfig::default();
    let truth = Mixture::random(&config);
    println!("true entropy H(Y|c) = {:.4} nats; rank-1 bound Σ_s H(Y_s|c) = {:.4} nats", truth.entropy(), truth.rank_one_bound());
    println!("config: {}", serde_json::to_string(&config).unwrap());
    println!();
    println!("| rank r | λ | joint cross-entropy | − true entropy | expert fraction f | mean weight m | aux |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (rank, aux_coef) in [(1, 0.0), (2, 0.0), (4, 0.0), (4, 0.1), (8, 0.0), (8, 0.1)] {
        let fit = fit_head(&truth, &config, rank, aux_coef)?;
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ");
        println!(
            "| {rank} | {aux_coef} | {:.4} | {:+.4} | {} | {} | {:.3} |",
            fit.joint_cross_entropy,
            fit.joint_cross_entropy - truth.entropy(),
            fmt(&fit.expert_fraction),
            fmt(&fit.expert_weight),
            fit.aux
        );
    }
    Ok(())
}
