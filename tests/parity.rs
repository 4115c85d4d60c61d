//! Parity with the PyTorch twin (reference/model.py): the fixtures hold weights, a batch, the
//! twin's logits, losses and every gradient, and 5 AdamW steps; this model must reproduce them.

mod common;

use common::{load_fixture, report};
use multitoken::autograd::Tape;
use multitoken::data::Batch;
use multitoken::model::{gpt2, model_loss};
use multitoken::tensor::Tensor;
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{train_step, StepConfig};

fn batch_of(fixture: &common::Fixture, inputs: &str, targets: &str, index: Option<usize>) -> Batch {
    let (shape, ids) = &fixture.ids[inputs];
    let (_, target_ids) = &fixture.ids[targets];
    let n = fixture.config().horizon;
    let seq = shape[shape.len() - 1];
    let rows = shape[shape.len() - 2];
    let per_batch = rows * seq;
    let at = index.unwrap_or(0);
    Batch {
        inputs: ids[at * per_batch..(at + 1) * per_batch].to_vec(),
        targets: target_ids[at * per_batch * n..(at + 1) * per_batch * n].to_vec(),
        seq,
        horizon: n,
    }
}

/// Forward, losses and every gradient against the twin, in f64.
fn check_forward_and_gradients(name: &str) {
    let fixture = load_fixture(name);
    let config = fixture.config();
    let params = fixture.params("param.");
    let batch = batch_of(&fixture, "inputs", "targets", None);

    let mut tape = Tape::new();
    let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| true);
    let h = gpt2::hidden_states(&mut tape, &config, &vars, &batch.inputs, batch.seq).unwrap();
    let hidden = tape.value(h).clone();
    let mut worst = report("hidden", &hidden.reshape(fixture.tensors["hidden"].shape()), &fixture.tensors["hidden"]);
    let out = model_loss(&mut tape, &config, &vars, &batch, fixture.meta_f64("aux_coef")).unwrap();
    let scalar = |x: f64| Tensor::from_vec(&[1], vec![x]);
    worst = worst.max(report("objective", &scalar(tape.value(out.objective).item()), &fixture.tensors["objective"]));
    worst = worst.max(report("joint_loss", &scalar(out.joint_loss()), &fixture.tensors["joint_loss"]));
    let head_losses = Tensor::from_vec(&[config.horizon], out.stats.head_losses.clone());
    worst = worst.max(report("head_losses", &head_losses, &fixture.tensors["head_losses"]));
    worst = worst.max(report("aux", &scalar(out.stats.aux), &fixture.tensors["aux"]));
    let grads = tape.backward(out.objective).unwrap();
    for (param_name, var) in vars.named() {
        let grad =
            grads.get(*var).cloned().unwrap_or_else(|| Tensor::zeros(params.named().iter().find(|p| p.0 == param_name).unwrap().1.shape()));
        worst = worst.max(report(&format!("grad.{param_name}"), &grad, &fixture.tensors[&format!("grad.{param_name}")]));
    }
    println!("{name}: worst difference {worst:.2e}");
    assert!(worst < 1e-10, "{name}: differs from PyTorch by {worst:e}");
}

/// Five AdamW steps (with clipping) against torch.optim.AdamW, in f64.
fn check_adamw_steps(name: &str) {
    let fixture = load_fixture(name);
    let config = fixture.config();
    let mut params = fixture.params("param.");
    let refs: Vec<&Tensor<f64>> = params.named().into_iter().map(|(_, t)| t).collect();
    let mut optimizer = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }, &refs);
    let lr = fixture.meta_f64("lr");
    let expected = &fixture.tensors["adamw.objectives"];
    let mut worst: f64 = 0.0;
    for step in 0..5 {
        let batch = batch_of(&fixture, "adamw.inputs", "adamw.targets", Some(step));
        let step_config = StepConfig { lr, grad_clip: 1.0, aux_coef: fixture.meta_f64("aux_coef") };
        let (objective, _) = train_step(&config, &mut params, &mut optimizer, &batch, step_config, &|_| true).unwrap();
        let diff = (objective - expected.data()[step]).abs();
        println!("step {step}: objective {objective:.12} torch {:.12} diff {diff:.2e}", expected.data()[step]);
        worst = worst.max(diff);
    }
    let after = fixture.params("adamw.param.");
    for ((param_name, ours), (_, theirs)) in params.named().into_iter().zip(after.named()) {
        worst = worst.max(report(&format!("after 5 steps: {param_name}"), ours, theirs));
    }
    assert!(worst < 1e-9, "{name}: AdamW steps differ from PyTorch by {worst:e}");
}

#[test]
fn gpt2_logits_losses_and_gradients_match_pytorch() {
    check_forward_and_gradients("gpt2");
    let fixture = load_fixture("gpt2");
    let config = fixture.config();
    let params = fixture.params("param.");
    let batch = batch_of(&fixture, "inputs", "targets", None);
    let mut tape = Tape::inference();
    let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| false);
    let h = gpt2::hidden_states(&mut tape, &config, &vars, &batch.inputs, batch.seq).unwrap();
    let logits = gpt2::next_token_logits(&mut tape, &vars, h).unwrap();
    let expected = &fixture.tensors["logits"];
    assert!(report("logits", &tape.value(logits).reshape(expected.shape()), expected) < 1e-10);
}

#[test]
fn gpt2_adamw_steps_match_pytorch() {
    check_adamw_steps("gpt2");
}

#[test]
fn cp_head_n3_r4_losses_and_gradients_match_pytorch() {
    check_forward_and_gradients("cp_head_n3_r4");
}

#[test]
fn cp_head_n3_r1_losses_and_gradients_match_pytorch() {
    check_forward_and_gradients("cp_head_n3_r1");
}

#[test]
fn cp_head_adamw_steps_match_pytorch() {
    check_adamw_steps("cp_head_n3_r4");
}

#[test]
fn f32_training_path_matches_pytorch_to_single_precision() {
    let fixture = load_fixture("gpt2");
    let config = fixture.config();
    let params = fixture.params("param.").map(&config, |_, t| t.cast::<f32>());
    let batch = batch_of(&fixture, "inputs", "targets", None);
    let mut tape = Tape::new();
    let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| true);
    let out = model_loss(&mut tape, &config, &vars, &batch, fixture.meta_f64("aux_coef")).unwrap();
    let loss = tape.value(out.objective).item() as f64;
    let expected = fixture.tensors["objective"].item();
    assert!((loss - expected).abs() / expected < 1e-5, "f32 loss {loss} vs torch {expected}");
    let grads = tape.backward(out.objective).unwrap();
    for (name, var) in vars.named() {
        let ours = grads.get(*var).unwrap().cast::<f64>();
        let theirs = &fixture.tensors[&format!("grad.{name}")];
        let scale = theirs.data().iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-6);
        assert!(ours.max_abs_diff(theirs) / scale < 1e-3, "f32 gradient of {name} differs");
    }
}
