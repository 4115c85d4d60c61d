//! The CP head against a known rank-4 mixture of products over n = 3 tokens
//! (src/experiments/ground_truth.rs; the full table is `cargo run --release --example ground_truth`).

use multitoken::experiments::ground_truth::{fit_head, GroundTruthConfig, Mixture};

#[test]
fn rank_four_reaches_the_true_entropy_and_rank_one_cannot() {
    let config = GroundTruthConfig { steps: 400, ..GroundTruthConfig::default() };
    let truth = Mixture::random(&config);
    let (entropy, bound) = (truth.entropy(), truth.rank_one_bound());
    assert!(bound - entropy > 0.3, "the mixture must be far from a product: gap {}", bound - entropy);

    let rank_one = fit_head(&truth, &config, 1, 0.0).unwrap();
    println!("entropy {entropy:.4}, rank-1 bound {bound:.4}, rank 1 reaches {:.4}", rank_one.joint_cross_entropy);
    assert!(rank_one.joint_cross_entropy >= bound - 1e-9, "no product of distributions beats the product of the marginals");

    let rank_four = fit_head(&truth, &config, 4, 0.0).unwrap();
    println!("rank 4 reaches {:.4}", rank_four.joint_cross_entropy);
    assert!(rank_four.joint_cross_entropy - entropy < 0.05, "rank 4 should come within 0.05 nats of the truth");
    assert!(rank_four.joint_cross_entropy >= entropy - 1e-9, "cross-entropy never beats entropy");
}

#[test]
fn load_balancing_spreads_routing_over_the_components() {
    let config = GroundTruthConfig { steps: 400, ..GroundTruthConfig::default() };
    let truth = Mixture::random(&config);
    let free = fit_head(&truth, &config, 8, 0.0).unwrap();
    let balanced = fit_head(&truth, &config, 8, 0.1).unwrap();
    let used = |f: &[f64]| f.iter().filter(|&&x| x > 0.0).count();
    println!("λ = 0: f {:?} aux {:.3}; λ = 0.1: f {:?} aux {:.3}", free.expert_fraction, free.aux, balanced.expert_fraction, balanced.aux);
    assert!(balanced.aux < free.aux, "the balancing term lowers aux");
    assert!(used(&balanced.expert_fraction) > used(&free.expert_fraction), "and routes to more components");
}
