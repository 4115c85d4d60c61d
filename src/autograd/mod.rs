//! Reverse-mode automatic differentiation on a define-by-run tape.
//!
//! Reading guide (the whole engine is this file):
//! - A [`Tape`] records, in order, every value computed (`values`) and, for each op whose
//!   inputs need gradients, a `Step`: which vars went in, which came out, and a closure
//!   holding the op's backward rule together with whatever the forward saved for it.
//! - A [`Var`] is just an index into `values`. Leaves (parameters, inputs) are added with
//!   [`Tape::leaf`]; ops add their output with [`Tape::record`].
//! - [`Tape::backward`] walks the steps in reverse. Each rule receives the gradient of its
//!   output and returns one gradient per input; the engine adds them into a store keyed by
//!   var id ([`Gradients`]). Gradients of intermediates are freed as soon as they are used.
//!
//! Ops themselves live in `ops/`, one file each, forward and backward side by side. The tape
//! does not know where tensors live: an op runs its CPU or its GPU kernel, and its rule the
//! matching backward; a GPU's failure (out of memory, say) comes back as an error from the op
//! or from `backward`.

mod profile;

pub use profile::{profile_report, profiling_enabled};

use std::time::Instant;

use crate::error::Result;
use crate::tensor::{Float, Tensor};

/// A point in a tape's record ([`Tape::mark`]).
#[derive(Clone, Copy, Debug)]
pub struct Mark(usize);

/// A handle to a value on a tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(usize);

impl Var {
    /// The index of the value on its tape.
    pub fn id(self) -> usize {
        self.0
    }
}

/// An op's backward rule: given the gradient of the output and which inputs need a
/// gradient, return the gradient of each input (`None` where not needed).
pub type BackwardRule<T> = Box<dyn FnOnce(&Tensor<T>, &[bool]) -> Result<Vec<Option<Tensor<T>>>>>;

struct Step<T: Float> {
    op: &'static str,
    inputs: Vec<Var>,
    output: Var,
    rule: BackwardRule<T>,
}

/// The record of one forward pass: every value computed, in order, and the backward rule of
/// each op whose inputs need a gradient. [`Tape::backward`] consumes it.
pub struct Tape<T: Float> {
    /// `None` once released ([`Tape::release_since`])
    values: Vec<Option<Tensor<T>>>,
    requires_grad: Vec<bool>,
    steps: Vec<Step<T>>,
    grad_enabled: bool,
    /// when profiling (MULTITOKEN_PROFILE=1): the end of the previous op, so the time since is this op's forward
    last_op_end: Option<Instant>,
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Float> Tape<T> {
    /// A tape that records backward rules.
    pub fn new() -> Self {
        Tape {
            values: Vec::new(),
            requires_grad: Vec::new(),
            steps: Vec::new(),
            grad_enabled: true,
            last_op_end: profiling_enabled().then(Instant::now),
        }
    }

    /// A tape for inference: ops compute values but record no backward rules.
    pub fn inference() -> Self {
        Tape { grad_enabled: false, ..Self::new() }
    }

    /// Adds a leaf value: a parameter (`requires_grad`) or a constant input.
    pub fn leaf(&mut self, value: Tensor<T>, requires_grad: bool) -> Var {
        self.values.push(Some(value));
        self.requires_grad.push(requires_grad && self.grad_enabled);
        if self.last_op_end.is_some() {
            self.last_op_end = Some(Instant::now());
        }
        Var(self.values.len() - 1)
    }

    /// The value of `var`.
    ///
    /// Panics when the value was released ([`Tape::release_since`]): the caller promised not to
    /// read it again.
    pub fn value(&self, var: Var) -> &Tensor<T> {
        self.values[var.0].as_ref().unwrap_or_else(|| panic!("value {} of the tape was read after it was released", var.0))
    }

    /// Where the tape stands now: [`Tape::release_since`] lets go of what is recorded after it.
    pub fn mark(&self) -> Mark {
        Mark(self.values.len())
    }

    /// Lets go of every value recorded since `mark` except those in `keep`: the forward pass
    /// will not read them again, as a function's locals go out of scope when it returns. A value
    /// that a backward rule saved lives on in the rule; the memory of the others is free for
    /// what the forward computes next. Without this, every intermediate of the forward is held
    /// until the backward pass begins. Reading a released value panics.
    pub fn release_since(&mut self, mark: Mark, keep: &[Var]) {
        for id in mark.0..self.values.len() {
            if !keep.iter().any(|var| var.0 == id) {
                self.values[id] = None;
            }
        }
    }

    /// Whether `var` needs a gradient: a leaf that asked for one, or an op output with such an
    /// input (always false on an inference tape).
    pub fn requires_grad(&self, var: Var) -> bool {
        self.requires_grad[var.0]
    }

    /// Adds the output of the op named `op`, computed from `inputs`, with the rule that
    /// differentiates it. The rule is kept only if some input needs a gradient.
    pub fn record(
        &mut self,
        op: &'static str,
        output: Tensor<T>,
        inputs: &[Var],
        rule: impl FnOnce(&Tensor<T>, &[bool]) -> Result<Vec<Option<Tensor<T>>>> + 'static,
    ) -> Var {
        if let Some(start) = self.last_op_end {
            // a GPU runs the op's kernels after the call returns: wait for them
            if let Some(cuda) = output.cuda() {
                let _ = cuda.gpu().synchronize();
            }
            profile::add_forward(op, start.elapsed());
            self.last_op_end = Some(Instant::now());
        }
        let needs_grad = inputs.iter().any(|v| self.requires_grad[v.0]);
        self.values.push(Some(output));
        self.requires_grad.push(needs_grad);
        let var = Var(self.values.len() - 1);
        if needs_grad {
            self.steps.push(Step { op, inputs: inputs.to_vec(), output: var, rule: Box::new(rule) });
        }
        var
    }

    /// Gradients of the scalar `loss` with respect to every leaf that requires them.
    /// Consumes the tape: activations are released as the walk passes them.
    pub fn backward(self, loss: Var) -> Result<Gradients<T>> {
        let seed = self.value(loss);
        if seed.len() != 1 {
            let shape = seed.shape();
            return crate::invalid!("backward: the loss has shape {shape:?}, not one element; reduce it first (ops::sum or ops::mean), or use backward_with_gradient");
        }
        let ones = Tensor::full_on(seed.shape(), T::one(), &seed.device())?;
        self.backward_with_gradient(loss, ones)
    }

    /// Gradients of `Σ output ⊙ gradient` with respect to every leaf that requires them: the
    /// backward pass started from any output, with `gradient` (of the output's shape, on its
    /// device) as the output's gradient. `backward` is this with a gradient of ones.
    pub fn backward_with_gradient(mut self, output: Var, gradient: Tensor<T>) -> Result<Gradients<T>> {
        if self.value(output).shape() != gradient.shape() {
            return crate::invalid!("backward: the gradient has shape {:?}, the output {:?}", gradient.shape(), self.value(output).shape());
        }
        let device = self.value(output).device();
        if gradient.device() != device {
            return crate::invalid!("backward: the output lives on {device} and its gradient on {}", gradient.device());
        }
        // Release the tape's hold on intermediate values: rules keep what they need, and
        // nothing else is read again. Leaves are kept (parameters, inputs).
        let produced: Vec<usize> = self.steps.iter().map(|s| s.output.0).collect();
        for id in produced {
            if id != output.0 {
                self.values[id] = None;
            }
        }
        let mut grads: Vec<Option<Tensor<T>>> = vec![None; self.values.len()];
        grads[output.0] = Some(gradient);
        while let Some(step) = self.steps.pop() {
            let Some(grad_output) = grads[step.output.0].take() else { continue };
            let needs: Vec<bool> = step.inputs.iter().map(|v| self.requires_grad[v.0]).collect();
            let start = self.last_op_end.map(|_| Instant::now());
            let input_grads = (step.rule)(&grad_output, &needs)?;
            if let Some(start) = start {
                if let Some(cuda) = grad_output.cuda() {
                    let _ = cuda.gpu().synchronize();
                }
                profile::add_backward(step.op, start.elapsed());
            }
            assert_eq!(input_grads.len(), step.inputs.len(), "a backward rule returned the wrong number of gradients");
            for ((input, grad), need) in step.inputs.iter().zip(input_grads).zip(needs) {
                let Some(grad) = grad.filter(|_| need) else { continue };
                match &mut grads[input.0] {
                    Some(total) => total.add_assign(&grad)?,
                    slot => *slot = Some(grad),
                }
            }
        }
        Ok(Gradients { grads })
    }
}

/// Gradients keyed by var id, as [`Tape::backward`] leaves them (leaves only).
pub struct Gradients<T: Float> {
    grads: Vec<Option<Tensor<T>>>,
}

impl<T: Float> Gradients<T> {
    /// The gradient of `var`, of its shape; `None` where it needs none or the loss does not depend
    /// on it.
    pub fn get(&self, var: Var) -> Option<&Tensor<T>> {
        self.grads.get(var.0).and_then(Option::as_ref)
    }

    /// Moves a gradient out of the store.
    pub fn take(&mut self, var: Var) -> Option<Tensor<T>> {
        self.grads.get_mut(var.0).and_then(Option::take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;

    #[test]
    fn a_var_used_twice_gets_both_gradients() {
        let mut tape = Tape::<f64>::new();
        let x = tape.leaf(Tensor::from_vec(&[2], vec![3.0, -1.0]), true);
        let square = ops::mul(&mut tape, x, x).unwrap();
        let loss = ops::sum(&mut tape, square).unwrap();
        assert_eq!(tape.backward(loss).unwrap().get(x).unwrap().data(), &[6.0, -2.0]);
    }

    #[test]
    fn released_intermediates_still_give_their_gradients_and_may_not_be_read() {
        // y = tanh(x)·x: tanh's and mul's rules saved what they need before y's inputs went
        let mut tape = Tape::<f64>::new();
        let x = tape.leaf(Tensor::from_vec(&[2], vec![0.5, -2.0]), true);
        let start = tape.mark();
        let t = ops::tanh(&mut tape, x).unwrap();
        let y = ops::mul(&mut tape, t, x).unwrap();
        tape.release_since(start, &[y]);
        assert_eq!(tape.value(y).shape(), &[2]);
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tape.value(t).len()));
        assert!(read.is_err(), "a released value was read");
        let loss = ops::sum(&mut tape, y).unwrap();
        let gradient = tape.backward(loss).unwrap().get(x).unwrap().data().to_vec();
        for (g, v) in gradient.iter().zip([0.5f64, -2.0]) {
            let expected = v.tanh() + v * (1.0 - v.tanh().powi(2));
            assert!((g - expected).abs() < 1e-12, "{g} against {expected}");
        }
    }

    #[test]
    fn a_loss_that_is_not_a_scalar_or_a_gradient_of_another_shape_is_an_error() {
        let mut tape = Tape::<f64>::new();
        let x = tape.leaf(Tensor::zeros(&[2, 3]), true);
        let y = ops::tanh(&mut tape, x).unwrap();
        let error = tape.backward(y).err().expect("an error").to_string();
        assert!(error.contains("reduce it first"), "{error}");
        let mut tape = Tape::<f64>::new();
        let x = tape.leaf(Tensor::zeros(&[2, 3]), true);
        let y = ops::tanh(&mut tape, x).unwrap();
        let error = tape.backward_with_gradient(y, Tensor::zeros(&[3, 2])).err().expect("an error").to_string();
        assert!(error.contains("shape"), "{error}");
    }
}
