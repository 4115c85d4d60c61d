//! Shapes: `reshape` (the same elements under another shape, no copy; backward: the gradient
//! reshaped back) and `transpose` (the last two axes swapped; backward: swapped back).
//!
//! On the CPU the transpose is `ndarray`'s swapped view made contiguous; on a GPU
//! `transpose_last` of `general.cu`.

use ndarray::IxDyn;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::invalid;
use crate::tensor::{Float, Tensor};

/// The same elements in row-major order under `shape` (of the same size).
pub fn reshape<T: Float>(tape: &mut Tape<T>, x: Var, shape: &[usize]) -> Result<Var> {
    let input = tape.value(x);
    let original = input.shape().to_vec();
    if shape.iter().product::<usize>() != input.len() {
        return invalid!("reshape: {original:?} has {} elements, {shape:?} holds {}", input.len(), shape.iter().product::<usize>());
    }
    let out = input.reshape(shape);
    Ok(tape.record("reshape", out, &[x], move |grad, _| Ok(vec![Some(grad.reshape(&original))])))
}

/// The last two axes swapped: x (…, r, c) → (…, c, r).
pub fn transpose<T: Float>(tape: &mut Tape<T>, x: Var) -> Result<Var> {
    let input = tape.value(x).clone();
    let shape = input.shape().to_vec();
    if shape.len() < 2 {
        return invalid!("transpose: a tensor of shape {shape:?} has fewer than two axes");
    }
    let placed = place("transpose", &[&input])?;
    let out = swap_last(&input, &placed)?;
    drop(input);
    Ok(tape.record("transpose", out, &[x], move |grad, _| Ok(vec![Some(swap_last(grad, &placed)?)])))
}

fn swap_last<T: Float>(x: &Tensor<T>, placed: &Place) -> Result<Tensor<T>> {
    let shape = x.shape();
    let (r, c) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let mut swapped = shape.to_vec();
    swapped.swap(shape.len() - 2, shape.len() - 1);
    match placed {
        Place::Cpu => {
            let mut view = x.array();
            view.swap_axes(shape.len() - 2, shape.len() - 1);
            Ok(Tensor::from_array(view.as_standard_layout().into_owned().into_shape_with_order(IxDyn(&swapped)).expect("the same size")))
        }
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(x.len())?;
            gpu.transpose_last(on_gpu(x), out.view(), (x.len() / (r * c).max(1), r, c))?;
            Ok(Tensor::from_cuda(gpu, out, &swapped))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn reshape_and_transpose_gradients_match_finite_differences() {
        let x = Tensor::<f64>::randn(&[2, 3, 4], 1.0, &mut Rng::new(1));
        check_op(std::slice::from_ref(&x), |tape, v| reshape(tape, v[0], &[6, 4])).unwrap().assert_below(1e-6, "reshape");
        check_op(std::slice::from_ref(&x), |tape, v| transpose(tape, v[0])).unwrap().assert_below(1e-6, "transpose");
    }

    #[test]
    fn transpose_swaps_the_last_two_axes() {
        let mut tape = Tape::<f64>::inference();
        let x = tape.leaf(Tensor::from_vec(&[1, 2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), false);
        let t = transpose(&mut tape, x).unwrap();
        assert_eq!((tape.value(t).shape(), tape.value(t).data()), (&[1, 3, 2][..], &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0][..]));
        assert!(reshape(&mut tape, x, &[4]).is_err());
    }
}
