//! Elementwise functions and arithmetic, the ops a model is composed from by hand.
//!
//! Functions, `y = f(x)`, backward `dx = dy · f'(x)`:
//! ```text
//! neg: −x       exp: eˣ (f' = y)       log: ln x (f' = 1/x)       tanh (f' = 1 − y²)
//! relu: max(x, 0) (f' = 1 for x > 0, else 0)      sigmoid: 1/(1 + e⁻ˣ) (f' = y(1 − y))
//! powf: xᵖ (f' = p xᵖ⁻¹)      scale: c·x (f' = c)
//! ```
//! Arithmetic, `out = a ∘ b`, with one operand broadcast when it is a row (its shape the other's
//! last dimensions) or a scalar (one element):
//! ```text
//! add: da = g, db = g      sub: da = g, db = −g      mul: da = g·b, db = g·a
//! div: da = g/b, db = −g·a/b²
//! ```
//! A broadcast operand's gradient is summed over its repeats (`reduce_to`, the one place that
//! undoes broadcasting). On the CPU the arithmetic is `ndarray`'s, broadcasting included; on a
//! GPU, `unary_*` and `binary_*` of `general.cu`.

use multitoken_cuda::{Binary, Unary};
use ndarray::{ArrayD, Axis, IxDyn, Zip};

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::invalid;
use crate::tensor::{Float, Tensor};

/// An elementwise function.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Function {
    Neg,
    Exp,
    Log,
    Tanh,
    Relu,
    Sigmoid,
    Pow(f64),
    Scale(f64),
}

impl Function {
    fn value<T: Float>(self, x: T) -> T {
        match self {
            Function::Neg => -x,
            Function::Exp => x.exp(),
            Function::Log => x.ln(),
            Function::Tanh => x.tanh(),
            Function::Relu => x.max(T::zero()),
            Function::Sigmoid => T::one() / (T::one() + (-x).exp()),
            Function::Pow(p) => x.powf(T::of(p)),
            Function::Scale(c) => x * T::of(c),
        }
    }

    /// f'(x), given x and y = f(x).
    fn slope<T: Float>(self, x: T, y: T) -> T {
        match self {
            Function::Neg => -T::one(),
            Function::Exp => y,
            Function::Log => T::one() / x,
            Function::Tanh => T::one() - y * y,
            Function::Relu => {
                if x > T::zero() {
                    T::one()
                } else {
                    T::zero()
                }
            }
            Function::Sigmoid => y * (T::one() - y),
            // xᵖ with p = 0 is the constant 1, slope 0 also at x = 0 (where 0·0⁻¹ would be NaN)
            Function::Pow(0.0) => T::zero(),
            Function::Pow(p) => T::of(p) * x.powf(T::of(p - 1.0)),
            Function::Scale(c) => T::of(c),
        }
    }

    fn on_gpu(self) -> Unary {
        match self {
            Function::Neg => Unary::Neg,
            Function::Exp => Unary::Exp,
            Function::Log => Unary::Log,
            Function::Tanh => Unary::Tanh,
            Function::Relu => Unary::Relu,
            Function::Sigmoid => Unary::Sigmoid,
            Function::Pow(p) => Unary::Pow(p as f32),
            Function::Scale(c) => Unary::Scale(c as f32),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Function::Neg => "neg",
            Function::Exp => "exp",
            Function::Log => "log",
            Function::Tanh => "tanh",
            Function::Relu => "relu",
            Function::Sigmoid => "sigmoid",
            Function::Pow(_) => "powf",
            Function::Scale(_) => "scale",
        }
    }
}

/// `−x`
pub fn neg<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Neg)
}

/// `eˣ`
pub fn exp<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Exp)
}

/// `ln x`
pub fn log<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Log)
}

/// `tanh x`
pub fn tanh<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Tanh)
}

/// `max(x, 0)`
pub fn relu<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Relu)
}

/// `1 / (1 + e⁻ˣ)`
pub fn sigmoid<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    apply(tape, x, Function::Sigmoid)
}

/// `xᵖ` for a constant p. Its domain is x > 0 unless p is a whole number; outside it the value
/// is NaN, as is the slope at x = 0 for 0 < p < 1 (infinite) times an upstream gradient of 0.
pub fn powf<T: Float>(tape: &mut Tape<T>, x: Var, p: f64) -> Result<Var> {
    apply(tape, x, Function::Pow(p))
}

/// `c·x` for a constant c
pub fn scale<T: Float>(tape: &mut Tape<T>, x: Var, c: f64) -> Result<Var> {
    apply(tape, x, Function::Scale(c))
}

fn apply<T: Float>(tape: &mut Tape<T>, x: Var, f: Function) -> Result<Var> {
    let input = tape.value(x).clone();
    let placed = place(f.name(), &[&input])?;
    let out = match &placed {
        Place::Cpu => Tensor::from_array(input.array().mapv(|v| f.value(v))),
        Place::Cuda(gpu) => {
            let y = gpu.alloc::<f32>(input.len())?;
            gpu.unary_forward(f.on_gpu(), on_gpu(&input), y.view())?;
            Tensor::from_cuda(gpu, y, input.shape())
        }
    };
    let y = out.clone();
    Ok(tape.record(f.name(), out, &[x], move |grad, _| {
        let dx = match &placed {
            Place::Cpu => {
                Tensor::from_array(Zip::from(&input.array()).and(&y.array()).and(&grad.array()).map_collect(|&x, &y, &g| g * f.slope(x, y)))
            }
            Place::Cuda(gpu) => {
                let dx = gpu.alloc::<f32>(input.len())?;
                gpu.unary_backward(f.on_gpu(), on_gpu(&input), on_gpu(&y), on_gpu(grad), dx.view())?;
                Tensor::from_cuda(gpu, dx, input.shape())
            }
        };
        Ok(vec![Some(dx)])
    }))
}

/// `a + b`; either may be a row (the other's last dimensions) or a scalar (one element),
/// broadcast over the other, as NumPy does without size-1 axes (so no column broadcast).
///
/// ```
/// use multitoken::{autograd::Tape, ops, tensor::Tensor};
/// let mut tape = Tape::<f32>::new();
/// let x = tape.leaf(Tensor::from_vec(&[2, 3], vec![1., 2., 3., 4., 5., 6.]), true);
/// let bias = tape.leaf(Tensor::from_vec(&[3], vec![10., 20., 30.]), true);
/// let y = ops::add(&mut tape, x, bias)?; // the row is added to both rows of x
/// assert_eq!(tape.value(y).data(), &[11., 22., 33., 14., 25., 36.]);
/// let loss = ops::sum(&mut tape, y)?;
/// let grads = tape.backward(loss)?;
/// assert_eq!(grads.get(bias).unwrap().data(), &[2., 2., 2.]); // summed over its repeats
/// # Ok::<(), multitoken::error::Error>(())
/// ```
pub fn add<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    arithmetic(tape, a, b, Binary::Add)
}

/// `a − b`, broadcasting as [`add`].
pub fn sub<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    arithmetic(tape, a, b, Binary::Sub)
}

/// `a · b` elementwise, broadcasting as [`add`].
pub fn mul<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    arithmetic(tape, a, b, Binary::Mul)
}

/// `a / b` elementwise, broadcasting as [`add`].
pub fn div<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    arithmetic(tape, a, b, Binary::Div)
}

fn name(op: Binary) -> &'static str {
    match op {
        Binary::Add => "add",
        Binary::Sub => "sub",
        Binary::Mul => "mul",
        Binary::Div => "div",
    }
}

/// The shape of `a ∘ b`: the larger of the two when the other is equal to it, a scalar, or its
/// last dimensions (a row repeated over the leading ones).
fn broadcast_shape(op: &str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let elements = |shape: &[usize]| shape.iter().product::<usize>();
    let covers = |large: &[usize], small: &[usize]| elements(small) == 1 || large.ends_with(small);
    if a == b || (a.len() >= b.len() && covers(a, b)) {
        Ok(a.to_vec())
    } else if covers(b, a) && b.len() >= a.len() {
        Ok(b.to_vec())
    } else {
        invalid!("{op}: shapes {a:?} and {b:?} do not broadcast (one must be a scalar, or the other's last dimensions)")
    }
}

/// `grad`, of a broadcast result's shape, summed over the repeats of an operand of `shape`.
fn reduce_to<T: Float>(grad: Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
    if grad.shape() == shape {
        return Ok(grad);
    }
    let len: usize = shape.iter().product();
    if len == 0 || grad.is_empty() {
        // nothing was repeated, or the operand is empty: its gradient is zeros of its shape
        return Tensor::full_on(shape, T::zero(), &grad.device());
    }
    let repeats = grad.len() / len;
    match grad.cuda() {
        None => {
            let rows = grad.array().into_shape_with_order(IxDyn(&[repeats, len])).expect("a broadcast result is whole repeats");
            let summed = rows.sum_axis(Axis(0)).into_shape_with_order(IxDyn(shape)).expect("the operand's size");
            Ok(Tensor::from_array(summed))
        }
        Some(cuda) => {
            let gpu = cuda.gpu().clone();
            let sums = gpu.alloc::<f32>(len)?;
            gpu.column_sums(cuda.view(), sums.view(), false)?;
            Ok(Tensor::from_cuda(&gpu, sums, shape))
        }
    }
}

fn arithmetic<T: Float>(tape: &mut Tape<T>, a: Var, b: Var, op: Binary) -> Result<Var> {
    let (left, right) = (tape.value(a).clone(), tape.value(b).clone());
    let shape = broadcast_shape(name(op), left.shape(), right.shape())?;
    let placed = place(name(op), &[&left, &right])?;
    let out = match &placed {
        Place::Cpu => {
            let (x, y) = (left.array(), right.array());
            let out: ArrayD<T> = match op {
                Binary::Add => &x + &y,
                Binary::Sub => &x - &y,
                Binary::Mul => &x * &y,
                Binary::Div => &x / &y,
            };
            Tensor::from_array(out.into_shape_with_order(IxDyn(&shape)).expect("the broadcast shape"))
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(shape.iter().product())?;
            gpu.binary_forward(op, on_gpu(&left), on_gpu(&right), out.view())?;
            Tensor::from_cuda(gpu, out, &shape)
        }
    };
    Ok(tape.record(name(op), out, &[a, b], move |grad, needs| {
        // each operand's gradient at the result's full size, then summed back to its shape
        let (da, db) = match &placed {
            Place::Cpu => {
                let (g, x, y) = (grad.array(), left.array(), right.array());
                let full = |array: ArrayD<T>| Tensor::from_array(array.into_shape_with_order(IxDyn(&shape)).expect("the broadcast shape"));
                let da = needs[0].then(|| match op {
                    Binary::Add | Binary::Sub => grad.clone(),
                    Binary::Mul => full(&g * &y),
                    Binary::Div => full(&g / &y),
                });
                let db = needs[1].then(|| match op {
                    Binary::Add => grad.clone(),
                    Binary::Sub => full(g.mapv(|v| -v)),
                    Binary::Mul => full(&g * &x),
                    Binary::Div => full((&(&g * &x) / &(&y * &y)).mapv(|v| -v)),
                });
                (da, db)
            }
            Place::Cuda(gpu) => {
                let n = grad.len();
                let da = if needs[0] { Some(gpu.alloc::<f32>(n)?) } else { None };
                let db = if needs[1] { Some(gpu.alloc::<f32>(n)?) } else { None };
                gpu.binary_backward(
                    op,
                    on_gpu(grad),
                    on_gpu(&left),
                    on_gpu(&right),
                    da.as_ref().map(|d| d.view()),
                    db.as_ref().map(|d| d.view()),
                )?;
                (da.map(|d| Tensor::from_cuda(gpu, d, &shape)), db.map(|d| Tensor::from_cuda(gpu, d, &shape)))
            }
        };
        Ok(vec![da.map(|d| reduce_to(d, left.shape())).transpose()?, db.map(|d| reduce_to(d, right.shape())).transpose()?])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn every_function_s_gradient_matches_finite_differences() {
        let x = Tensor::<f64>::randn(&[4, 5], 1.0, &mut Rng::new(1));
        // log and fractional powers want positive inputs; relu's kink is avoided by the draw
        let positive = Tensor::from_array(x.array().mapv(|v| v.abs() + 0.5));
        for (f, input) in [
            (Function::Neg, &x),
            (Function::Exp, &x),
            (Function::Log, &positive),
            (Function::Tanh, &x),
            (Function::Relu, &x),
            (Function::Sigmoid, &x),
            (Function::Pow(2.0), &x),
            (Function::Pow(-1.5), &positive),
            (Function::Scale(-3.0), &x),
        ] {
            let report = check_op(std::slice::from_ref(input), |tape, v| apply(tape, v[0], f)).unwrap();
            report.assert_below(1e-6, f.name());
        }
    }

    #[test]
    fn every_function_computes_its_definition() {
        let mut tape = Tape::<f64>::inference();
        let x = tape.leaf(Tensor::from_vec(&[3], vec![-1.0, 0.5, 2.0]), false);
        let value = |tape: &Tape<f64>, v: Var| tape.value(v).data().to_vec();
        let r = relu(&mut tape, x).unwrap();
        assert_eq!(value(&tape, r), vec![0.0, 0.5, 2.0]);
        let s = sigmoid(&mut tape, x).unwrap();
        assert!((value(&tape, s)[0] - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-15);
        let p = powf(&mut tape, x, 3.0).unwrap();
        assert_eq!(value(&tape, p), vec![-1.0, 0.125, 8.0]);
    }

    #[test]
    fn arithmetic_gradients_match_finite_differences_with_and_without_broadcasting() {
        let mut rng = Rng::new(2);
        let a = Tensor::<f64>::randn(&[2, 3, 4], 1.0, &mut rng);
        let same = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
        let row = Tensor::randn(&[4], 1.0, &mut rng);
        let matrix_row = Tensor::randn(&[3, 4], 1.0, &mut rng);
        let scalar = Tensor::randn(&[], 1.0, &mut rng);
        let one_by_one = Tensor::randn(&[1, 1], 1.0, &mut rng);
        // away from zero, for div
        let away = |t: &Tensor<f64>| Tensor::from_array(t.array().mapv(|v| v.signum() * (v.abs() + 0.5)));
        for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
            for b in [&same, &row, &matrix_row, &scalar, &one_by_one] {
                let inputs = [a.clone(), away(b)];
                let report = check_op(&inputs, |tape, v| arithmetic(tape, v[0], v[1], op)).unwrap();
                report.assert_below(1e-6, &format!("{op:?} with b of shape {:?}", b.shape()));
                // and the broadcast operand first
                let report = check_op(&[away(b), a.clone()], |tape, v| arithmetic(tape, v[0], v[1], op)).unwrap();
                report.assert_below(1e-6, &format!("{op:?} with a of shape {:?}", b.shape()));
            }
        }
    }

    #[test]
    fn a_row_broadcasts_over_the_leading_dimensions_and_other_shapes_are_refused() {
        let mut tape = Tape::<f64>::inference();
        let a = tape.leaf(Tensor::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), false);
        let row = tape.leaf(Tensor::from_vec(&[3], vec![10.0, 20.0, 30.0]), false);
        let sum = add(&mut tape, a, row).unwrap();
        assert_eq!(tape.value(sum).data(), &[11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
        let column = tape.leaf(Tensor::from_vec(&[2], vec![1.0, 2.0]), false);
        let error = add(&mut tape, a, column).unwrap_err().to_string();
        assert!(error.contains("do not broadcast"), "{error}");
    }

    #[test]
    fn empty_tensors_broadcast_and_get_empty_or_zero_gradients() {
        let mut tape = Tape::<f64>::new();
        let empty = tape.leaf(Tensor::zeros(&[0, 3]), true);
        let row = tape.leaf(Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0]), true);
        let sum = add(&mut tape, empty, row).unwrap();
        assert_eq!(tape.value(sum).shape(), &[0, 3]);
        let total = super::super::sum(&mut tape, sum).unwrap();
        let grads = tape.backward(total).unwrap();
        assert_eq!(grads.get(row).unwrap().data(), &[0.0, 0.0, 0.0]);
        assert_eq!(grads.get(empty).unwrap().shape(), &[0, 3]);
    }

    #[test]
    fn the_zeroth_power_has_slope_zero_even_at_zero() {
        let mut tape = Tape::<f64>::new();
        let x = tape.leaf(Tensor::from_vec(&[3], vec![0.0, 1.0, -2.0]), true);
        let y = powf(&mut tape, x, 0.0).unwrap();
        assert_eq!(tape.value(y).data(), &[1.0, 1.0, 1.0]);
        let total = super::super::sum(&mut tape, y).unwrap();
        assert_eq!(tape.backward(total).unwrap().get(x).unwrap().data(), &[0.0, 0.0, 0.0]);
    }
}
