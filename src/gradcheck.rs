//! Gradient checking by central finite differences in f64.
//!
//! For a scalar function `f` of some input tensors, the analytic gradient from
//! [`Tape::backward`] is compared, coordinate by coordinate, with the fourth-order central
//! difference `(−f(x+2ε) + 8f(x+ε) − 8f(x−ε) + f(x−2ε)) / 12ε` along `e_i`. Its truncation
//! error is O(ε⁴) rather than the two-point rule's O(ε²), so ε can be large enough (1e-3)
//! that rounding in f stays around 1e-13: the check can then demand agreement to 1e-6 and
//! still be about the gradient, not about noise. Public so that users can check ops of their own:
//!
//! ```
//! use multitoken::{gradcheck::{gradcheck, GradcheckOptions}, ops, tensor::{Rng, Tensor}};
//! let x = Tensor::<f64>::randn(&[3, 4], 1.0, &mut Rng::new(0));
//! let weights = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
//! let report = gradcheck(&[x], |tape, v| {
//!     let y = ops::gelu(tape, v[0])?;
//!     ops::weighted_sum(tape, y, &weights)
//! }, &GradcheckOptions::default())?;
//! assert!(report.max_relative_error < 1e-6, "{report}");
//! # Ok::<(), multitoken::error::Error>(())
//! ```
//!
//! An op with a tensor output is checked through [`check_op`], which makes it a scalar.

use std::fmt;

use crate::autograd::{Gradients, Tape, Var};
use crate::error::Result;
use crate::tensor::{Rng, Tensor};

/// How a gradient check is run; the default suits f64 ops of moderate size.
#[derive(Clone, Debug)]
pub struct GradcheckOptions {
    /// The finite-difference step.
    pub eps: f64,
    /// Check at most this many coordinates of each input, sampled at random (0: all of them).
    pub max_coordinates_per_input: usize,
    /// Seed for sampling coordinates.
    pub seed: u64,
    /// The error of a coordinate is `|analytic − numeric| / max(|analytic|, |numeric|, floor)`:
    /// relative for ordinary gradients, absolute (scaled by 1/floor) for near-zero ones, where
    /// a relative error would only measure rounding noise.
    pub floor: f64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions { eps: 1e-3, max_coordinates_per_input: 0, seed: 0, floor: 1e-4 }
    }
}

/// The worst disagreement found, and where.
#[derive(Clone, Debug, Default)]
pub struct GradcheckReport {
    /// the largest error over the checked coordinates (relative, or absolute near zero: see
    /// [`GradcheckOptions::floor`])
    pub max_relative_error: f64,
    /// the index of the input where it occurred
    pub worst_input: usize,
    /// the coordinate in that input, in row-major order
    pub worst_index: usize,
    /// the analytic derivative there
    pub worst_analytic: f64,
    /// the finite-difference derivative there
    pub worst_numeric: f64,
    /// coordinates compared, over all inputs
    pub coordinates_checked: usize,
}

impl GradcheckReport {
    /// Panics, naming `what`, the worst coordinate, its analytic and numeric derivatives and the
    /// tolerance, unless every checked coordinate's error is below `tolerance`: the assertion for
    /// a test of one's own op.
    #[track_caller]
    pub fn assert_below(&self, tolerance: f64, what: &str) {
        assert!(
            self.max_relative_error < tolerance,
            "{what}: gradient check failed: error {:.3e} above the tolerance {tolerance:.1e} at input {} index {} (analytic {:.9e}, numeric {:.9e}; {} coordinates checked)",
            self.max_relative_error,
            self.worst_input,
            self.worst_index,
            self.worst_analytic,
            self.worst_numeric,
            self.coordinates_checked
        );
    }
}

impl fmt::Display for GradcheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gradcheck: {} coordinates, max relative error {:.3e} at input {} index {} (analytic {:.9e}, numeric {:.9e})",
            self.coordinates_checked, self.max_relative_error, self.worst_input, self.worst_index, self.worst_analytic, self.worst_numeric
        )
    }
}

/// Compares analytic and numeric gradients of `loss(tape, inputs)` for every input tensor.
pub fn gradcheck(
    inputs: &[Tensor<f64>],
    loss: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>,
    options: &GradcheckOptions,
) -> Result<GradcheckReport> {
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone(), true)).collect();
    let out = loss(&mut tape, &vars)?;
    let grads = tape.backward(out)?;
    let analytic = gradients_of(inputs, &vars, &grads);
    let evaluate = |values: &[Tensor<f64>]| -> Result<f64> {
        let mut tape = Tape::inference();
        let vars: Vec<Var> = values.iter().map(|t| tape.leaf(t.clone(), false)).collect();
        let out = loss(&mut tape, &vars)?;
        Ok(tape.value(out).item())
    };
    compare_with_differences(inputs, &analytic, evaluate, options)
}

/// Checks an op with a tensor output: the gradient of `Σ out ⊙ R`, for a fixed random R of
/// the output's shape, against finite differences. The analytic side is the backward pass
/// started from the output with gradient R; the numeric side computes `Σ out ⊙ R` itself.
/// Prints the report, and returns it.
///
/// ```
/// use multitoken::{gradcheck::check_op, ops, tensor::{Rng, Tensor}};
/// let x = Tensor::<f64>::randn(&[4, 5], 1.0, &mut Rng::new(0));
/// let row = Tensor::<f64>::randn(&[5], 1.0, &mut Rng::new(1));
/// // softmax of x plus a row broadcast over x's rows: both inputs' gradients
/// let report = check_op(&[x, row], |tape, v| {
///     let shifted = ops::add(tape, v[0], v[1])?;
///     ops::softmax(tape, shifted)
/// })?;
/// report.assert_below(1e-6, "softmax(x + row)");
/// # Ok::<(), multitoken::error::Error>(())
/// ```
pub fn check_op(inputs: &[Tensor<f64>], op: impl Fn(&mut Tape<f64>, &[Var]) -> Result<Var>) -> Result<GradcheckReport> {
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.clone(), true)).collect();
    let out = op(&mut tape, &vars)?;
    let weights = Tensor::randn(tape.value(out).shape(), 1.0, &mut Rng::new(99));
    let grads = tape.backward_with_gradient(out, weights.clone())?;
    let analytic = gradients_of(inputs, &vars, &grads);
    let evaluate = |values: &[Tensor<f64>]| -> Result<f64> {
        let mut tape = Tape::inference();
        let vars: Vec<Var> = values.iter().map(|t| tape.leaf(t.clone(), false)).collect();
        let out = op(&mut tape, &vars)?;
        Ok(tape.value(out).data().iter().zip(weights.data()).map(|(a, b)| a * b).sum())
    };
    let report = compare_with_differences(inputs, &analytic, evaluate, &GradcheckOptions::default())?;
    println!("{report}");
    Ok(report)
}

/// Each input's gradient from the store (zeros where it got none).
fn gradients_of(inputs: &[Tensor<f64>], vars: &[Var], grads: &Gradients<f64>) -> Vec<Tensor<f64>> {
    vars.iter().zip(inputs).map(|(&var, input)| grads.get(var).cloned().unwrap_or_else(|| Tensor::zeros(input.shape()))).collect()
}

/// The worst disagreement between `analytic` and the fourth-order central differences of
/// `evaluate`, over the (sampled) coordinates of every input.
fn compare_with_differences(
    inputs: &[Tensor<f64>],
    analytic: &[Tensor<f64>],
    evaluate: impl Fn(&[Tensor<f64>]) -> Result<f64>,
    options: &GradcheckOptions,
) -> Result<GradcheckReport> {
    let mut rng = Rng::new(options.seed);
    let mut report = GradcheckReport::default();
    let mut values = inputs.to_vec();
    for (input, analytic) in analytic.iter().enumerate() {
        let count = inputs[input].len();
        let coordinates: Vec<usize> = if options.max_coordinates_per_input == 0 || count <= options.max_coordinates_per_input {
            (0..count).collect()
        } else {
            (0..options.max_coordinates_per_input).map(|_| rng.below(count)).collect()
        };
        for index in coordinates {
            let original = values[input].data()[index];
            let mut at = |offset: f64| {
                values[input].data_mut()[index] = original + offset;
                evaluate(&values)
            };
            let eps = options.eps;
            let numeric = (-at(2.0 * eps)? + 8.0 * at(eps)? - 8.0 * at(-eps)? + at(-2.0 * eps)?) / (12.0 * eps);
            values[input].data_mut()[index] = original;
            let a = analytic.data()[index];
            let error = (a - numeric).abs() / a.abs().max(numeric.abs()).max(options.floor);
            report.coordinates_checked += 1;
            if error > report.max_relative_error || error.is_nan() {
                report.max_relative_error = if error.is_nan() { f64::INFINITY } else { error };
                (report.worst_input, report.worst_index, report.worst_analytic, report.worst_numeric) = (input, index, a, numeric);
            }
        }
    }
    Ok(report)
}
