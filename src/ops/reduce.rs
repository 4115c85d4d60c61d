//! Sums.
//!
//! - `sum(x)`, `mean(x)`: every element, to a scalar (shape `[]`) on x's device; backward: the
//!   upstream gradient (over the count, for the mean) in every element.
//! - `sum_axis(x, k)`, `mean_axis(x, k)`: along axis k, which the result drops; backward: the
//!   upstream gradient repeated along k.
//! - `weighted_sum(x, w) = Σ_i x_i w_i` with fixed weights `w` (a CPU tensor): a CPU scalar from
//!   any tensor; backward `dx = w`. Gradient checks use it to turn an op's output into a loss.
//!
//! On the CPU `ndarray`'s sums; on a GPU `sum_axis` of `general.cu`, a block per result element
//! adding in a fixed order.

use ndarray::Axis;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::invalid;
use crate::tensor::{Float, Tensor};

/// `Σ x`, a scalar.
pub fn sum<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    reduce(tape, x, None, 1.0, "sum")
}

/// `Σ x / |x|`, a scalar.
pub fn mean<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let n = tape.value(x).len();
    reduce(tape, x, None, 1.0 / n.max(1) as f64, "mean")
}

/// The sums along `axis`, which the result drops.
pub fn sum_axis<T: Float>(tape: &mut Tape<T>, x: Var, axis: usize) -> Result<Var> {
    reduce(tape, x, Some(axis), 1.0, "sum_axis")
}

/// The means along `axis`, which the result drops.
pub fn mean_axis<T: Float>(tape: &mut Tape<T>, x: Var, axis: usize) -> Result<Var> {
    let shape = tape.value(x).shape().to_vec();
    let Some(&length) = shape.get(axis) else { return invalid!("mean_axis: axis {axis} of a tensor of shape {shape:?}") };
    reduce(tape, x, Some(axis), 1.0 / length.max(1) as f64, "mean_axis")
}

/// `scale · Σ` over every element (`axis` None) or along `axis`.
fn reduce<T: Float>(tape: &mut Tape<T>, x: Var, axis: Option<usize>, scale: f64, op: &'static str) -> Result<Var> {
    let input = tape.value(x).clone();
    let shape = input.shape().to_vec();
    // the (outer, along, inner) view of x, and the result's shape
    let (view, out_shape) = match axis {
        None => ((1, input.len(), 1), vec![]),
        Some(k) if k < shape.len() => {
            let (outer, inner) = (shape[..k].iter().product(), shape[k + 1..].iter().product());
            let mut out_shape = shape.clone();
            out_shape.remove(k);
            ((outer, shape[k], inner), out_shape)
        }
        Some(k) => return invalid!("{op}: axis {k} of a tensor of shape {shape:?}"),
    };
    let placed = place(op, &[&input])?;
    let out = match &placed {
        Place::Cpu => {
            let factor = T::of(scale);
            match axis {
                None => Tensor::scalar(input.array().sum() * factor),
                Some(k) => Tensor::from_array(input.array().sum_axis(Axis(k)).mapv(|v| v * factor)),
            }
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(view.0 * view.2)?;
            gpu.sum_axis(on_gpu(&input), out.view(), view, scale as f32)?;
            Tensor::from_cuda(gpu, out, &out_shape)
        }
    };
    drop(input);
    Ok(tape.record(op, out, &[x], move |grad, _| {
        // every summed element gets the gradient of its sum
        let dx = match &placed {
            Place::Cpu => {
                let (outer, along, inner) = view;
                let g = grad.data();
                let factor = T::of(scale);
                let mut dx = Vec::with_capacity(outer * along * inner);
                for o in 0..outer {
                    for _ in 0..along {
                        dx.extend(g[o * inner..(o + 1) * inner].iter().map(|&v| v * factor));
                    }
                }
                Tensor::from_vec(&shape, dx)
            }
            Place::Cuda(gpu) => {
                let dx = gpu.alloc::<f32>(shape.iter().product())?;
                gpu.expand_axis(on_gpu(grad), dx.view(), view, scale as f32)?;
                Tensor::from_cuda(gpu, dx, &shape)
            }
        };
        Ok(vec![Some(dx)])
    }))
}

/// `Σ x ⊙ weights`, a scalar, for constant `weights` of x's shape: with random weights, a way
/// to turn a tensor output into a loss (as gradient checks do).
pub fn weighted_sum<T: Float>(tape: &mut Tape<T>, x: Var, weights: &Tensor<T>) -> Result<Var> {
    let value = tape.value(x);
    if value.shape() != weights.shape() {
        return invalid!("weighted_sum: weights of shape {:?} for x of shape {:?}", weights.shape(), value.shape());
    }
    let placed = place("weighted_sum", &[value])?;
    let (total, weights) = match &placed {
        Place::Cpu => (value.data().iter().zip(weights.data()).map(|(&a, &b)| a * b).sum(), weights.clone()),
        Place::Cuda(gpu) => {
            let weights = weights.to_device(&value.device())?;
            (T::of(gpu.dot(on_gpu(value), on_gpu(&weights))?), weights)
        }
    };
    Ok(tape.record("reduce", Tensor::scalar(total), &[x], move |grad, _| {
        // d/dx_i (Σ x w) = w_i
        Ok(vec![Some(weights.scaled(grad.item())?)])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{check_op, gradcheck, GradcheckOptions};
    use crate::tensor::Rng;

    #[test]
    fn sums_and_means_match_finite_differences() {
        let x = Tensor::<f64>::randn(&[2, 3, 4], 1.0, &mut Rng::new(3));
        check_op(std::slice::from_ref(&x), |tape, v| sum(tape, v[0])).unwrap().assert_below(1e-6, "sum");
        check_op(std::slice::from_ref(&x), |tape, v| mean(tape, v[0])).unwrap().assert_below(1e-6, "mean");
        for axis in 0..3 {
            check_op(std::slice::from_ref(&x), |tape, v| sum_axis(tape, v[0], axis)).unwrap().assert_below(1e-6, "sum_axis");
            check_op(std::slice::from_ref(&x), |tape, v| mean_axis(tape, v[0], axis)).unwrap().assert_below(1e-6, "mean_axis");
        }
    }

    #[test]
    fn sums_drop_their_axis() {
        let mut tape = Tape::<f64>::inference();
        let x = tape.leaf(Tensor::from_vec(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), false);
        let rows = sum_axis(&mut tape, x, 1).unwrap();
        assert_eq!((tape.value(rows).shape(), tape.value(rows).data()), (&[2][..], &[6.0, 15.0][..]));
        let columns = mean_axis(&mut tape, x, 0).unwrap();
        assert_eq!(tape.value(columns).data(), &[2.5, 3.5, 4.5]);
        let all = mean(&mut tape, x).unwrap();
        assert_eq!((tape.value(all).shape().len(), tape.value(all).item()), (0, 3.5));
        assert!(sum_axis(&mut tape, x, 2).is_err());
    }

    #[test]
    fn weighted_sum_gradient_matches_finite_differences() {
        let x = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(1));
        let weights = Tensor::randn(&[3, 4], 1.0, &mut Rng::new(2));
        let report = gradcheck(&[x], |tape, v| weighted_sum(tape, v[0], &weights), &GradcheckOptions::default()).unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn weighted_sum_is_the_dot_product_with_the_weights() {
        let (x, weights) = (Tensor::<f64>::from_vec(&[3], vec![1.0, -2.0, 0.5]), Tensor::from_vec(&[3], vec![4.0, 1.0, 2.0]));
        let mut tape = Tape::inference();
        let v = tape.leaf(x, false);
        let total = weighted_sum(&mut tape, v, &weights).unwrap();
        assert_eq!(tape.value(total).item(), 3.0);
    }
}
