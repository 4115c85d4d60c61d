//! The product of two matrices, or of two batches of them: `c = a · b`.
//!
//! a (…, m, k) and b (k, n), one matrix shared by the batch, or b (…, k, n) with a's leading
//! dimensions; c (…, m, n).
//! backward: `da = dc · bᵀ`, `db = aᵀ · dc` (summed over the batch when b is shared)   (docs/math.md, eq. L1)
//!
//! On the CPU each product is `kernels::gemm`; on a GPU one strided-batched cuBLAS call.

use multitoken_cuda::Operand;

use super::{on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::invalid;
use crate::kernels::gemm::{matmul as gemm, Layout};
use crate::tensor::{Float, Tensor};

/// The dimensions of a product: `batch` products of (m, k) · (k, n), b shared by all of them or
/// one per product.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    shared_b: bool,
}

fn dims(a: &[usize], b: &[usize]) -> Result<Dims> {
    let fits = a.len() >= 2 && b.len() >= 2 && a[a.len() - 1] == b[b.len() - 2];
    let shared_b = b.len() == 2;
    if !fits || (!shared_b && a[..a.len() - 2] != b[..b.len() - 2]) {
        return invalid!("matmul: shapes {a:?} and {b:?} do not multiply ((…, m, k) times (k, n) or (…, k, n))");
    }
    let (m, k, n) = (a[a.len() - 2], a[a.len() - 1], b[b.len() - 1]);
    Ok(Dims { batch: a[..a.len() - 2].iter().product(), m, k, n, shared_b })
}

/// `c = a · b`, matrix by matrix (see the module's page for the shapes).
pub fn matmul<T: Float>(tape: &mut Tape<T>, a: Var, b: Var) -> Result<Var> {
    let (left, right) = (tape.value(a).clone(), tape.value(b).clone());
    let d = dims(left.shape(), right.shape())?;
    let mut shape = left.shape().to_vec();
    *shape.last_mut().expect("two dimensions at least") = d.n;
    let placed = place("matmul", &[&left, &right])?;
    let out = match &placed {
        Place::Cpu => Tensor::from_vec(&shape, products(d, left.data(), Layout::Normal, right.data(), Layout::Normal)),
        Place::Cuda(gpu) => {
            let out = gpu.alloc::<f32>(d.batch * d.m * d.n)?;
            let b_stride = if d.shared_b { 0 } else { d.k * d.n };
            let (x, y) = (Operand::normal(on_gpu(&left)).strided(d.m * d.k), Operand::normal(on_gpu(&right)).strided(b_stride));
            gpu.matmul_batched(x, y, out.view(), d.m, d.k, d.n, d.batch, false)?;
            Tensor::from_cuda(gpu, out, &shape)
        }
    };
    Ok(tape.record("matmul", out, &[a, b], move |grad, needs| match &placed {
        Place::Cpu => {
            let g = grad.data();
            let da = needs[0].then(|| {
                // da (m, k) = dc (m, n) · bᵀ, per product
                let flipped = Dims { k: d.n, n: d.k, ..d };
                Tensor::from_vec(left.shape(), products(flipped, g, Layout::Normal, right.data(), Layout::Transposed))
            });
            let db = needs[1].then(|| {
                let mut db = vec![T::zero(); right.len()];
                if d.shared_b {
                    // every product's rows at once: aᵀ (k, batch·m) · dc (batch·m, n)
                    gemm(left.data(), Layout::Transposed, g, Layout::Normal, &mut db, d.k, d.batch * d.m, d.n, false);
                } else {
                    for (i, out) in db.chunks_mut(d.k * d.n).enumerate() {
                        let (x, gi) = (&left.data()[i * d.m * d.k..][..d.m * d.k], &g[i * d.m * d.n..][..d.m * d.n]);
                        gemm(x, Layout::Transposed, gi, Layout::Normal, out, d.k, d.m, d.n, false);
                    }
                }
                Tensor::from_vec(right.shape(), db)
            });
            Ok(vec![da, db])
        }
        Place::Cuda(gpu) => {
            let g = on_gpu(grad);
            let mut grads = vec![None, None];
            if needs[0] {
                let da = gpu.alloc::<f32>(left.len())?;
                let b_stride = if d.shared_b { 0 } else { d.k * d.n };
                let (x, y) = (Operand::normal(g).strided(d.m * d.n), Operand::transposed(on_gpu(&right)).strided(b_stride));
                gpu.matmul_batched(x, y, da.view(), d.m, d.n, d.k, d.batch, false)?;
                grads[0] = Some(Tensor::from_cuda(gpu, da, left.shape()));
            }
            if needs[1] {
                let db = gpu.alloc::<f32>(right.len())?;
                if d.shared_b {
                    gpu.matmul(Operand::transposed(on_gpu(&left)), Operand::normal(g), db.view(), d.k, d.batch * d.m, d.n, false)?;
                } else {
                    let (x, y) = (Operand::transposed(on_gpu(&left)).strided(d.m * d.k), Operand::normal(g).strided(d.m * d.n));
                    gpu.matmul_batched(x, y, db.view(), d.k, d.m, d.n, d.batch, false)?;
                }
                grads[1] = Some(Tensor::from_cuda(gpu, db, right.shape()));
            }
            Ok(grads)
        }
    }))
}

/// `batch` products `a_i (m, k) · b_i (k, n)` on the CPU, b laid out as `b_layout` and shared
/// when `d.shared_b`.
fn products<T: Float>(d: Dims, a: &[T], a_layout: Layout, b: &[T], b_layout: Layout) -> Vec<T> {
    let mut c = vec![T::zero(); d.batch * d.m * d.n];
    if d.shared_b {
        // one product of every row at once
        gemm(a, a_layout, b, b_layout, &mut c, d.batch * d.m, d.k, d.n, false);
        return c;
    }
    for (i, out) in c.chunks_mut(d.m * d.n).enumerate() {
        gemm(&a[i * d.m * d.k..][..d.m * d.k], a_layout, &b[i * d.k * d.n..][..d.k * d.n], b_layout, out, d.m, d.k, d.n, false);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    #[test]
    fn matmul_gradients_match_finite_differences() {
        let mut rng = Rng::new(1);
        let mut randn = |shape: &[usize]| Tensor::<f64>::randn(shape, 1.0, &mut rng);
        for (a, b) in [(randn(&[3, 4]), randn(&[4, 5])), (randn(&[2, 3, 4]), randn(&[2, 4, 5])), (randn(&[2, 3, 4]), randn(&[4, 5]))] {
            let label = format!("{:?} · {:?}", a.shape(), b.shape());
            check_op(&[a, b], |tape, v| matmul(tape, v[0], v[1])).unwrap().assert_below(1e-6, &label);
        }
    }

    #[test]
    fn a_batch_of_products_is_each_product_and_bad_shapes_are_refused() {
        let mut tape = Tape::<f64>::inference();
        let a = tape.leaf(Tensor::from_vec(&[2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]), false);
        let b = tape.leaf(Tensor::from_vec(&[2, 2, 1], vec![1.0, 1.0, 2.0, 0.0]), false);
        let c = matmul(&mut tape, a, b).unwrap();
        assert_eq!((tape.value(c).shape(), tape.value(c).data()), (&[2, 1, 1][..], &[3.0, 6.0][..]));
        let bad = tape.leaf(Tensor::zeros(&[3, 1]), false);
        assert!(matmul(&mut tape, a, bad).unwrap_err().to_string().contains("do not multiply"));
    }
}
