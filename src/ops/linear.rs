//! Linear layer in GPT-2's Conv1D layout: `out = x · W + b`, W stored (in, out); and the same on
//! a residual stream, `out = r + x · W + b`, as one op (the product's epilogue adds r on the GPU);
//! and GPT-2's MLP up to its projection, `gelu(x · W + b)`, one op in bf16 on a GPU (the
//! product's epilogue applies GELU), else the two.
//!
//! backward: `dx = dout · Wᵀ`, `dW = xᵀ · dout`, `db = Σ_rows dout`, `dr = dout`   (docs/math.md, eq. L1)

use std::sync::Arc;

use multitoken_cuda::{Gpu, Operand, ProductPrecision};

use super::{column_sums, on_gpu, place, Place, SavedInput};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::kernels::gemm::{matmul, Layout};
use crate::tensor::{Float, Rounded, Tensor};

/// x (N, Cin), weight (Cin, Cout), bias (Cout) → out (N, Cout)
pub fn linear<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Option<Var>) -> Result<Var> {
    linear_op(tape, x, weight, bias, None)
}

/// x (N, Cin), weight (Cin, Cout), bias (Cout), residual (N, Cout) → residual + x · weight + bias
pub fn linear_residual<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Var, residual: Var) -> Result<Var> {
    linear_op(tape, x, weight, Some(bias), Some(residual))
}

/// x (N, Cin), weight (Cin, Cout), bias (Cout) → gelu(x · weight + bias): `linear` then `gelu`,
/// except in bf16 on a GPU, where one product computes both and writes, in bf16 alone, what the
/// two would keep and pass on: the output's rounding (all the next product reads; the output's
/// f32 elements are that rounding widened) and the GELU's input's rounding (all its backward
/// reads). Elsewhere it records the two ops: the fused product is built for bf16, where it also
/// spares the separate passes that wrote those roundings.
pub fn linear_gelu<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Var) -> Result<Var> {
    match linear_gelu_in_bf16(tape, x, weight, bias)? {
        Some(out) => Ok(out),
        None => {
            let hidden = linear(tape, x, weight, Some(bias))?;
            super::gelu::gelu(tape, hidden)
        }
    }
}

/// [`linear_gelu`] as one product, where the inputs are on a GPU in bf16 and the product can
/// take the GELU epilogue ([`Gpu::fuses_linear_gelu`]); else `None`, having recorded nothing.
fn linear_gelu_in_bf16<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Var) -> Result<Option<Var>> {
    let (input, w, b) = (tape.value(x).clone(), tape.value(weight).clone(), tape.value(bias).clone());
    let (n, c_out, out_shape) = output_shape("linear_gelu", &input, &w);
    let gpu = match place("linear_gelu", &[&input, &w, &b])? {
        Place::Cuda(gpu) if gpu.fuses_linear_gelu(w.shape()[0], c_out) => gpu,
        _ => return Ok(None),
    };
    let x_rounded = input.cuda().expect("placed on the GPU").rounded_or_round()?;
    let (out_rounded, pre_rounded) = (gpu.alloc::<u16>(n * c_out)?, gpu.alloc::<u16>(n * c_out)?);
    let x_operand = Operand::normal(on_gpu(&input)).rounded(x_rounded.view());
    gpu.linear_gelu_bf16(x_operand, on_gpu(&w), on_gpu(&b), out_rounded.view(), pre_rounded.view())?;
    let out = gpu.alloc::<f32>(n * c_out)?;
    gpu.widen_bf16(out_rounded.view(), out.view())?;
    let out = Tensor::from_cuda_with_rounding(&gpu, out, Some(out_rounded), &out_shape);
    let saved_input = SavedInput::Bf16 { rounded: x_rounded, shape: input.shape().to_vec() };
    let pre_rounded = Rounded::new(pre_rounded);
    Ok(Some(tape.record("linear_gelu", out, &[x, weight, bias], move |grad, needs| {
        // d pre = dout · gelu'(pre), pre as its rounding   (docs/math.md, eq. G2); then the
        // linear layer's backward on it
        let d_pre = gpu.alloc::<f32>(grad.len())?;
        gpu.gelu_backward_from_bf16(pre_rounded.view(), on_gpu(grad), d_pre.view())?;
        let d_pre = Tensor::from_cuda(&gpu, d_pre, grad.shape());
        let (dx, dw, db) = linear_backward_cuda(&gpu, &saved_input, &w, &d_pre, needs, true)?;
        Ok(vec![dx, dw, db])
    })))
}

/// (rows, Cout, the output's shape) of x (…, Cin) times weight (Cin, Cout).
fn output_shape<T: Float>(op: &str, input: &Tensor<T>, w: &Tensor<T>) -> (usize, usize, Vec<usize>) {
    let (c_in, c_out) = (w.shape()[0], w.shape()[1]);
    assert_eq!(input.shape().last(), Some(&c_in), "{op}: x width differs from the weight's input size");
    let mut out_shape = input.shape().to_vec();
    *out_shape.last_mut().unwrap() = c_out;
    (input.len() / c_in, c_out, out_shape)
}

fn linear_op<T: Float>(tape: &mut Tape<T>, x: Var, weight: Var, bias: Option<Var>, residual: Option<Var>) -> Result<Var> {
    let input = tape.value(x).clone();
    let w = tape.value(weight).clone();
    let b = bias.map(|b| tape.value(b).clone());
    let r = residual.map(|r| tape.value(r).clone());
    let (c_in, c_out) = (w.shape()[0], w.shape()[1]);
    let (n, _, out_shape) = output_shape("linear", &input, &w);
    if let Some(r) = &r {
        assert_eq!(r.shape(), out_shape.as_slice(), "linear_residual: the residual differs from the output's shape");
    }
    let tensors: Vec<&Tensor<T>> = [Some(&input), Some(&w), b.as_ref(), r.as_ref()].into_iter().flatten().collect();
    let placed = place("linear", &tensors)?;
    // in bf16 the product reads x rounded, and so does the backward's dW = xᵀ·dout: round it
    // once (unless the kernel that wrote x did), and keep only the rounding for the backward
    let saved_input = match (&placed, input.cuda()) {
        (Place::Cuda(gpu), Some(x)) if gpu.precision == ProductPrecision::Bf16 => {
            SavedInput::Bf16 { rounded: x.rounded_or_round()?, shape: input.shape().to_vec() }
        }
        _ => SavedInput::F32(input.clone()),
    };
    let out = match &placed {
        Place::Cpu => {
            // out starts as r + b (or b, or 0), and the product is added to it
            let mut out = match &r {
                Some(r) => r.data().to_vec(),
                None => vec![T::zero(); n * c_out],
            };
            if let Some(b) = &b {
                for row in out.chunks_mut(c_out) {
                    row.iter_mut().zip(b.data()).for_each(|(o, &bias)| *o += bias);
                }
            }
            let accumulate = b.is_some() || r.is_some();
            matmul(input.data(), Layout::Normal, w.data(), Layout::Normal, &mut out, n, c_in, c_out, accumulate);
            Tensor::from_vec(&out_shape, out)
        }
        Place::Cuda(gpu) => {
            let x_operand = match &saved_input {
                SavedInput::Bf16 { rounded, .. } => Operand::normal(on_gpu(&input)).rounded(rounded.view()),
                SavedInput::F32(_) => Operand::normal(on_gpu(&input)),
            };
            let out = gpu.alloc::<f32>(n * c_out)?;
            match (&b, &r) {
                (Some(b), Some(r)) => gpu.linear_residual(x_operand, on_gpu(&w), on_gpu(b), on_gpu(r), out.view())?,
                (Some(b), None) => gpu.linear(x_operand, on_gpu(&w), on_gpu(b), out.view())?,
                (None, None) => gpu.matmul(x_operand, Operand::normal(on_gpu(&w)), out.view(), n, c_in, c_out, false)?,
                (None, Some(_)) => unreachable!("linear_residual always has a bias"),
            }
            Tensor::from_cuda(gpu, out, &out_shape)
        }
    };
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    inputs.extend(residual);
    let has_bias = bias.is_some();
    Ok(tape.record(if residual.is_some() { "linear_residual" } else { "linear" }, out, &inputs, move |grad, needs| {
        let (dx, dw, db) = match (&placed, &saved_input) {
            (Place::Cpu, SavedInput::F32(input)) => linear_backward_cpu(input, &w, grad, needs, has_bias),
            (Place::Cpu, SavedInput::Bf16 { .. }) => unreachable!("the CPU keeps x in f32"),
            (Place::Cuda(gpu), saved) => linear_backward_cuda(gpu, saved, &w, grad, needs, has_bias)?,
        };
        let mut grads = vec![dx, dw];
        if has_bias {
            grads.push(db);
        }
        if needs.len() > grads.len() {
            // out = r + …  ⇒  dr = dout
            grads.push(Some(grad.clone()));
        }
        Ok(grads)
    }))
}

type LinearGradients<T> = (Option<Tensor<T>>, Option<Tensor<T>>, Option<Tensor<T>>);

fn linear_backward_cpu<T: Float>(input: &Tensor<T>, w: &Tensor<T>, grad: &Tensor<T>, needs: &[bool], has_bias: bool) -> LinearGradients<T> {
    let (c_in, c_out) = (w.shape()[0], w.shape()[1]);
    let n = input.len() / c_in;
    let dx = needs[0].then(|| {
        let mut dx = vec![T::zero(); n * c_in];
        matmul(grad.data(), Layout::Normal, w.data(), Layout::Transposed, &mut dx, n, c_out, c_in, false);
        Tensor::from_vec(input.shape(), dx)
    });
    let dw = needs[1].then(|| {
        let mut dw = vec![T::zero(); c_in * c_out];
        matmul(input.data(), Layout::Transposed, grad.data(), Layout::Normal, &mut dw, c_in, n, c_out, false);
        Tensor::from_vec(&[c_in, c_out], dw)
    });
    let db = (has_bias && needs[2]).then(|| Tensor::from_vec(&[c_out], column_sums(grad.data(), c_out)));
    (dx, dw, db)
}

fn linear_backward_cuda<T: Float>(
    gpu: &Arc<Gpu>,
    input: &SavedInput<T>,
    w: &Tensor<T>,
    grad: &Tensor<T>,
    needs: &[bool],
    has_bias: bool,
) -> Result<LinearGradients<T>> {
    let (c_in, c_out) = (w.shape()[0], w.shape()[1]);
    let n = grad.len() / c_out;
    let (w_view, g) = (on_gpu(w), on_gpu(grad));
    // in bf16 both products read the upstream gradient: round it once, in the same pass over it
    // as the bias's gradient where there is one
    let db = if has_bias && needs[2] { Some(gpu.alloc::<f32>(c_out)?) } else { None };
    let g_rounded = match (&db, gpu.precision == ProductPrecision::Bf16 && needs[0] && needs[1]) {
        (Some(db), true) => Some(gpu.column_sums_and_bf16_copy(g, db.view())?),
        (None, true) => Some(gpu.bf16_copy(g)?),
        (Some(db), false) => {
            gpu.column_sums(g, db.view(), false)?;
            None
        }
        (None, false) => None,
    };
    let g_operand = match &g_rounded {
        Some(rounded) => Operand::normal(g).rounded(rounded.view()),
        None => Operand::normal(g),
    };
    let dx = if needs[0] {
        let dx = gpu.alloc::<f32>(n * c_in)?;
        gpu.matmul(g_operand, Operand::transposed(w_view), dx.view(), n, c_out, c_in, false)?;
        Some(Tensor::from_cuda(gpu, dx, input.shape()))
    } else {
        None
    };
    let dw = if needs[1] {
        let dw = gpu.alloc::<f32>(c_in * c_out)?;
        let x_transposed = match input {
            SavedInput::F32(x) => Operand::transposed(on_gpu(x)),
            SavedInput::Bf16 { rounded, .. } => Operand::bf16_only(rounded.view(), true),
        };
        gpu.matmul(x_transposed, g_operand, dw.view(), c_in, n, c_out, false)?;
        Some(Tensor::from_cuda(gpu, dw, &[c_in, c_out]))
    } else {
        None
    };
    let db = db.map(|db| Tensor::from_cuda(gpu, db, &[c_out]));
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn linear_gradient_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let x = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
        let w = Tensor::randn(&[4, 5], 1.0, &mut rng);
        let b = Tensor::randn(&[5], 1.0, &mut rng);
        assert!(check_op(&[x.clone(), w.clone(), b], |tape, v| linear(tape, v[0], v[1], Some(v[2]))).unwrap().max_relative_error < 1e-6);
        assert!(check_op(&[x, w], |tape, v| linear(tape, v[0], v[1], None)).unwrap().max_relative_error < 1e-6);
    }

    #[test]
    fn linear_then_gelu_gradient_matches_finite_differences() {
        let mut rng = Rng::new(4);
        let x = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
        let w = Tensor::randn(&[4, 8], 1.0, &mut rng);
        let b = Tensor::randn(&[8], 1.0, &mut rng);
        let report = check_op(&[x, w, b], |tape, v| linear_gelu(tape, v[0], v[1], v[2])).unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn linear_on_a_residual_gradient_matches_finite_differences() {
        let mut rng = Rng::new(2);
        let x = Tensor::randn(&[2, 3, 4], 1.0, &mut rng);
        let w = Tensor::randn(&[4, 5], 1.0, &mut rng);
        let b = Tensor::randn(&[5], 1.0, &mut rng);
        let r = Tensor::randn(&[2, 3, 5], 1.0, &mut rng);
        let report = check_op(&[x, w, b, r], |tape, v| linear_residual(tape, v[0], v[1], v[2], v[3])).unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    #[test]
    fn linear_on_a_residual_is_the_residual_plus_the_linear_layer() {
        let mut rng = Rng::new(3);
        let values = [[3, 4], [4, 6], [6, 0], [3, 6]].map(|shape| {
            let shape: Vec<usize> = shape.into_iter().filter(|&d| d > 0).collect();
            Tensor::<f64>::randn(&shape, 1.0, &mut rng)
        });
        let mut tape = Tape::inference();
        let [x, w, b, r] = values.map(|t| tape.leaf(t, false));
        let fused = linear_residual(&mut tape, x, w, b, r).unwrap();
        let plain = linear(&mut tape, x, w, Some(b)).unwrap();
        let sum = crate::ops::add(&mut tape, r, plain).unwrap();
        assert!(tape.value(fused).max_abs_diff(tape.value(sum)) < 1e-12);
    }
}
