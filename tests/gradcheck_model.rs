//! The whole model's gradient, every parameter tensor, against central finite differences in f64.

use multitoken::data::Batch;
use multitoken::gradcheck::{gradcheck, GradcheckOptions};
use multitoken::model::{gpt2, loss::head_loss, params::ModelParams, ModelConfig};
use multitoken::tensor::{Rng, Tensor};

fn random_batch(config: &ModelConfig, rows: usize, seq: usize, rng: &mut Rng) -> Batch {
    let data: Vec<Vec<u32>> = (0..rows).map(|_| (0..seq + config.horizon).map(|_| rng.below(config.vocab_size) as u32).collect()).collect();
    let refs: Vec<&[u32]> = data.iter().map(Vec::as_slice).collect();
    Batch::from_rows(&refs, seq, config.horizon)
}

/// Gradchecks the objective with respect to every parameter tensor, `per_tensor` sampled coordinates each.
fn check_whole_model(config: &ModelConfig, per_tensor: usize) {
    let mut rng = Rng::new(11);
    let mut params = gpt2::init_params::<f64>(config, &mut rng);
    // Move LayerNorm weights and biases off their init (ones, zeros) so their gradients are generic.
    for tensor in params.values_mut() {
        if tensor.shape().len() == 1 {
            tensor.add_assign(&Tensor::randn(tensor.shape(), 0.1, &mut rng)).unwrap();
        }
    }
    let batch = random_batch(config, 2, 6, &mut rng);
    let names = params_names(config);
    let inputs: Vec<Tensor<f64>> = params.named().into_iter().map(|(_, t)| t.clone()).collect();
    let options = GradcheckOptions { max_coordinates_per_input: per_tensor, seed: 3, ..GradcheckOptions::default() };
    let report = gradcheck(
        &inputs,
        |tape, vars| {
            let mut iter = vars.iter().copied();
            let param_vars = ModelParams::build(config, |_| iter.next().ok_or(())).unwrap();
            let h = gpt2::hidden_states(tape, config, &param_vars, &batch.inputs, batch.seq)?;
            Ok(head_loss(tape, config, &param_vars, h, &batch.targets, 0.05)?.objective)
        },
        &options,
    )
    .unwrap();
    println!("{report} ({})", names[report.worst_input]);
    assert!(report.max_relative_error < 1e-6, "{report} in {}", names[report.worst_input]);
    let expected: usize = inputs.iter().map(|t| t.len().min(per_tensor)).sum();
    assert_eq!(report.coordinates_checked, expected, "every parameter tensor was checked");
}

fn params_names(config: &ModelConfig) -> Vec<String> {
    let result: Result<ModelParams<String>, ()> = ModelParams::build(config, |spec| Ok(spec.name.to_string()));
    result.unwrap().named().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn tiny_gpt2_gradient_matches_finite_differences_for_every_parameter() {
    let config = ModelConfig::preset("tiny", 48, 1, 1).unwrap();
    check_whole_model(&config, 12);
}

#[test]
fn tiny_model_with_the_cp_head_n3_r4_matches_finite_differences_for_every_parameter() {
    let config = ModelConfig::preset("tiny", 48, 3, 4).unwrap();
    check_whole_model(&config, 12);
}
