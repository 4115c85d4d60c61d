//! Write your own op: softplus, `y = ln(1 + eˣ)`, with its backward `dx = dy · σ(x)`, checked
//! against finite differences; then the same op with a deliberately wrong backward, which the
//! check catches, naming the coordinate where it is wrong.
//!
//! `cargo run --release --example own_op`
//!
//! Read it beside docs/tour.md, stop 3, and any file of src/ops/: an op reads its inputs' values
//! from the tape, computes its output, and records a rule that turns the output's gradient into
//! its inputs'.

use multitoken::autograd::{Tape, Var};
use multitoken::error::Result;
use multitoken::gradcheck::check_op;
use multitoken::tensor::{Rng, Tensor};
use ndarray::Zip;

/// softplus(x), elementwise. With `wrong`, the backward forgets that σ(x) = 1 / (1 + e⁻ˣ) and uses
/// e⁻ˣ / (1 + e⁻ˣ) = 1 − σ(x) instead: the kind of slip a sign error in a derivation makes.
fn softplus(tape: &mut Tape<f64>, x: Var, wrong: bool) -> Result<Var> {
    let input = tape.value(x).clone();
    // forward: ln(1 + eˣ), computed as max(x, 0) + ln(1 + e^−|x|) so that it does not overflow
    let out = Tensor::from_array(input.array().mapv(|v| v.max(0.0) + (-v.abs()).exp().ln_1p()));
    Ok(tape.record("softplus", out, &[x], move |grad, _| {
        // backward: dx = dy · σ(x); the rule keeps `input` (captured), as llm.c's forward keeps
        // what its backward needs
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let slope = |v: f64| if wrong { 1.0 - sigmoid(v) } else { sigmoid(v) };
        let dx = Zip::from(&input.array()).and(&grad.array()).map_collect(|&v, &g| g * slope(v));
        Ok(vec![Some(Tensor::from_array(dx))])
    }))
}

fn main() -> Result<()> {
    let x = Tensor::<f64>::randn(&[4, 6], 2.0, &mut Rng::new(1));
    // the check differentiates Σ softplus(x) ⊙ R for a random R, both ways
    let report = check_op(std::slice::from_ref(&x), |tape, v| softplus(tape, v[0], false))?;
    report.assert_below(1e-6, "softplus");
    println!("the right backward passes: max relative error {:.2e}", report.max_relative_error);
    let wrong = check_op(&[x], |tape, v| softplus(tape, v[0], true))?;
    println!("the wrong backward: {wrong}");
    assert!(wrong.max_relative_error > 1e-2, "the check should have caught the wrong backward");
    println!("caught: with report.assert_below(1e-6, ..) a test of this op would fail there");
    Ok(())
}
