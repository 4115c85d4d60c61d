//! Causal multi-head self-attention as one op, from the fused `qkv` projection.
//!
//! For each batch row b and head h, with q, k, v the head's (T, hs) slices of qkv:
//! forward:  `S = q kᵀ / √hs` (j ≤ i only), `P = softmax_rows(S)`, `out = P v`   (docs/math.md, eq. AT1)
//! backward: `dP = dout vᵀ`, `dv = Pᵀ dout`, `dS = P ⊙ (dP − rowsum(dP ⊙ P))`,
//!           `dq = dS k / √hs`, `dk = dSᵀ q / √hs`   (eq. AT2)
//!
//! On the CPU, rows are processed in blocks of `BLOCK`: block [r0, r1) only ever needs keys
//! 0..r1, so the masked upper triangle is (mostly) never computed, and the probabilities P are
//! kept for backward. On a GPU the attention route of the device decides
//! (`multitoken_cuda::AttentionRoute`): a fused kernel that keeps only each row's log-sum-exp
//! (f32; in bf16, on tensor cores, from q, k, v rounded, which is all it keeps of them), or
//! cuBLAS products that keep P (TF32).

use std::sync::Arc;

use multitoken_cuda::{AttentionRoute, AttentionShape, Gpu, ProductPrecision, QkvRows};
use rayon::prelude::*;

use super::{on_gpu, place, Place, SavedInput};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::kernels::SharedMut;
use crate::tensor::{Float, Tensor};

const BLOCK: usize = 64;

/// The row blocks `[r0, r1)` of a length-`t` sequence.
fn row_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// Strided view of one head's q, k or v inside qkv (B·T, 3C), or of its slice of out (B·T, C).
#[derive(Clone, Copy)]
struct HeadLayout {
    seq: usize,
    width: usize,
    head_size: usize,
}

impl HeadLayout {
    /// Offset of element (t, 0) of `part` (0 = q, 1 = k, 2 = v) of head h, batch row b, in qkv.
    fn qkv_offset(&self, b: usize, h: usize, part: usize, t: usize) -> usize {
        (b * self.seq + t) * 3 * self.width + part * self.width + h * self.head_size
    }

    /// Offset of element (t, 0) of head h, batch row b, in out (B·T, C).
    fn out_offset(&self, b: usize, h: usize, t: usize) -> usize {
        (b * self.seq + t) * self.width + h * self.head_size
    }
}

/// `c (m,n) = alpha · a (m,k) · b (k,n) + beta · c` on raw strided operands, one thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<T: Float>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
    beta: T,
    c: (*mut T, usize),
) {
    T::gemm_raw(m, k, n, alpha, a.0, a.1 as isize, a.2 as isize, b.0, b.1 as isize, b.2 as isize, beta, c.0, c.1 as isize, 1);
}

/// qkv (B·T, 3C) with `seq = T` → out (B·T, C)
pub fn causal_self_attention<T: Float>(tape: &mut Tape<T>, qkv: Var, seq: usize, n_head: usize) -> Result<Var> {
    let input = tape.value(qkv).clone();
    let width = input.shape()[input.shape().len() - 1] / 3;
    let batch = input.len() / (seq * 3 * width);
    assert_eq!(width % n_head, 0, "attention: width {width} is not divisible by {n_head} heads");
    match place("attention", &[&input])? {
        Place::Cpu => Ok(attention_cpu(tape, qkv, input, seq, n_head)),
        Place::Cuda(gpu) => {
            let shape = AttentionShape { batch, seq, n_head, head_size: width / n_head };
            attention_cuda(tape, qkv, &gpu, input, shape)
        }
    }
}

fn attention_cuda<T: Float>(tape: &mut Tape<T>, qkv: Var, gpu: &Arc<Gpu>, input: Tensor<T>, shape: AttentionShape) -> Result<Var> {
    let (rows, width) = (shape.batch * shape.seq, shape.n_head * shape.head_size);
    let y = gpu.alloc::<f32>(rows * width)?;
    let gpu = gpu.clone();
    match gpu.attention_route_for(shape.head_size) {
        AttentionRoute::Fused => {
            // on bf16 tensor cores the kernels read q, k, v rounded, and the backward keeps only that
            let saved_qkv = match input.cuda() {
                Some(qkv) if gpu.precision == ProductPrecision::Bf16 => {
                    SavedInput::Bf16 { rounded: qkv.rounded_or_round()?, shape: input.shape().to_vec() }
                }
                _ => SavedInput::F32(input),
            };
            let qkv_rows = |saved: &SavedInput<T>| match saved {
                SavedInput::F32(input) => QkvRows::F32(on_gpu(input)),
                SavedInput::Bf16 { rounded, .. } => QkvRows::Bf16(rounded.view()),
            };
            let lse = gpu.alloc::<f32>(shape.batch * shape.n_head * shape.seq)?;
            // in bf16 the output's rounding is written with it, for the product that reads it
            let y_rounded = if gpu.precision == ProductPrecision::Bf16 { Some(gpu.alloc::<u16>(rows * width)?) } else { None };
            gpu.fused_attention_forward(qkv_rows(&saved_qkv), y.view(), y_rounded.as_ref().map(|r| r.view()), lse.view(), shape)?;
            let out = Tensor::from_cuda_with_rounding(&gpu, y, y_rounded, &[rows, width]);
            let y = out.clone();
            Ok(tape.record("attention", out, &[qkv], move |grad, _| {
                let dqkv = gpu.alloc::<f32>(3 * rows * width)?;
                gpu.fused_attention_backward(qkv_rows(&saved_qkv), on_gpu(&y), on_gpu(grad), lse.view(), dqkv.view(), shape)?;
                Ok(vec![Some(Tensor::from_cuda(&gpu, dqkv, saved_qkv.shape()))])
            }))
        }
        AttentionRoute::Products => {
            let saved = gpu.attention_products_forward(on_gpu(&input), y.view(), shape)?;
            let out = Tensor::from_cuda(&gpu, y, &[rows, width]);
            let qkv_shape = input.shape().to_vec();
            drop(input);
            Ok(tape.record("attention", out, &[qkv], move |grad, _| {
                let dqkv = gpu.alloc::<f32>(3 * rows * width)?;
                gpu.attention_products_backward(&saved, on_gpu(grad), dqkv.view(), shape)?;
                Ok(vec![Some(Tensor::from_cuda(&gpu, dqkv, &qkv_shape))])
            }))
        }
    }
}

fn attention_cpu<T: Float>(tape: &mut Tape<T>, qkv: Var, input: Tensor<T>, seq: usize, n_head: usize) -> Var {
    let width = input.shape()[input.shape().len() - 1] / 3;
    let batch = input.len() / (seq * 3 * width);
    let layout = HeadLayout { seq, width, head_size: width / n_head };
    let scale = T::one() / T::of(layout.head_size as f64).sqrt();
    let hs = layout.head_size;

    // probs (B, H, T, T): row i holds P[i, 0..=i], zeros after.
    let mut probs = vec![T::zero(); batch * n_head * seq * seq];
    let mut out = vec![T::zero(); batch * seq * width];
    let out_ptr = SharedMut::new(out.as_mut_ptr());
    let x = input.data().as_ptr() as usize;
    probs.par_chunks_mut(seq * seq).enumerate().for_each(|(bh, p)| {
        let (b, h) = (bh / n_head, bh % n_head);
        let x = x as *const T;
        for (r0, r1) in row_blocks(seq) {
            // SAFETY: offsets stay inside qkv/out/probs; each (b, h) writes only its own head's columns.
            unsafe {
                let q = (x.add(layout.qkv_offset(b, h, 0, r0)), 3 * width, 1);
                let k_t = (x.add(layout.qkv_offset(b, h, 1, 0)), 1, 3 * width);
                gemm(r1 - r0, hs, r1, scale, q, k_t, T::zero(), (p.as_mut_ptr().add(r0 * seq), seq));
            }
            for i in r0..r1 {
                let row = &mut p[i * seq..(i + 1) * seq];
                T::softmax_row(&mut row[..=i]);
                row[i + 1..].fill(T::zero());
            }
            unsafe {
                let v = (x.add(layout.qkv_offset(b, h, 2, 0)), 3 * width, 1);
                let p_block = (p.as_ptr().add(r0 * seq), seq, 1);
                gemm(r1 - r0, r1, hs, T::one(), p_block, v, T::zero(), (out_ptr.get().add(layout.out_offset(b, h, r0)), width));
            }
        }
    });

    let out = Tensor::from_vec(&[batch * seq, width], out);
    tape.record("attention", out, &[qkv], move |grad, _| {
        let mut dqkv = vec![T::zero(); input.len()];
        let d_ptr = SharedMut::new(dqkv.as_mut_ptr());
        let x = input.data().as_ptr() as usize;
        let g = grad.data().as_ptr() as usize;
        probs.par_chunks(seq * seq).enumerate().for_each(|(bh, p)| {
            let (b, h) = (bh / n_head, bh % n_head);
            let (x, g, d) = (x as *const T, g as *const T, d_ptr);
            let mut dscores = vec![T::zero(); seq * seq];
            for (r0, r1) in row_blocks(seq) {
                let rows = r1 - r0;
                // SAFETY: as in the forward pass; each (b, h) writes only its own head's columns of dqkv.
                unsafe {
                    let dout = (g.add(layout.out_offset(b, h, r0)), width, 1);
                    let v_t = (x.add(layout.qkv_offset(b, h, 2, 0)), 1, 3 * width);
                    let ds = dscores.as_mut_ptr().add(r0 * seq);
                    // dP = dout · vᵀ
                    gemm(rows, hs, r1, T::one(), dout, v_t, T::zero(), (ds, seq));
                    // dv += Pᵀ · dout
                    let p_t = (p.as_ptr().add(r0 * seq), 1, seq);
                    gemm(r1, rows, hs, T::one(), p_t, dout, T::one(), (d.get().add(layout.qkv_offset(b, h, 2, 0)), 3 * width));
                }
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), times the 1/√hs of the forward
                for i in r0..r1 {
                    let (p_row, ds_row) = (&p[i * seq..=i * seq + i], &mut dscores[i * seq..=i * seq + i]);
                    let dot: T = p_row.iter().zip(ds_row.iter()).map(|(&a, &b)| a * b).sum();
                    for (ds, &pj) in ds_row.iter_mut().zip(p_row) {
                        *ds = pj * (*ds - dot) * scale;
                    }
                    dscores[i * seq + i + 1..(i + 1) * seq].fill(T::zero());
                }
                unsafe {
                    let ds = (dscores.as_ptr().add(r0 * seq), seq, 1);
                    let k = (x.add(layout.qkv_offset(b, h, 1, 0)), 3 * width, 1);
                    // dq = dS · k
                    gemm(rows, r1, hs, T::one(), ds, k, T::one(), (d.get().add(layout.qkv_offset(b, h, 0, r0)), 3 * width));
                    // dk += dSᵀ · q
                    let ds_t = (dscores.as_ptr().add(r0 * seq), 1, seq);
                    let q = (x.add(layout.qkv_offset(b, h, 0, r0)), 3 * width, 1);
                    gemm(r1, rows, hs, T::one(), ds_t, q, T::one(), (d.get().add(layout.qkv_offset(b, h, 1, 0)), 3 * width));
                }
            }
        });
        Ok(vec![Some(Tensor::from_vec(input.shape(), dqkv))])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_op;
    use crate::tensor::Rng;

    /// Plain attention, one (b, h, i) at a time, straight from the definition.
    fn naive_attention(qkv: &[f64], batch: usize, seq: usize, width: usize, n_head: usize) -> Vec<f64> {
        let hs = width / n_head;
        let mut out = vec![0.0; batch * seq * width];
        let at = |b: usize, t: usize, part: usize, h: usize, d: usize| qkv[(b * seq + t) * 3 * width + part * width + h * hs + d];
        for b in 0..batch {
            for h in 0..n_head {
                for i in 0..seq {
                    let scores: Vec<f64> =
                        (0..=i).map(|j| (0..hs).map(|d| at(b, i, 0, h, d) * at(b, j, 1, h, d)).sum::<f64>() / (hs as f64).sqrt()).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for d in 0..hs {
                        out[(b * seq + i) * width + h * hs + d] = (0..=i).map(|j| weights[j] / total * at(b, j, 2, h, d)).sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_the_definition_across_row_blocks() {
        let (batch, seq, width, n_head) = (2, 70, 8, 2); // 70 > BLOCK: two row blocks
        let qkv = Tensor::randn(&[batch * seq, 3 * width], 1.0, &mut Rng::new(3));
        let mut tape = Tape::inference();
        let x = tape.leaf(qkv.clone(), false);
        let out = causal_self_attention(&mut tape, x, seq, n_head).unwrap();
        let expected = naive_attention(qkv.data(), batch, seq, width, n_head);
        let worst = tape.value(out).data().iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "attention differs from the definition by {worst}");
    }

    #[test]
    fn attention_gradient_matches_finite_differences() {
        let qkv = Tensor::randn(&[2 * 5, 3 * 6], 1.0, &mut Rng::new(1));
        assert!(check_op(&[qkv], |tape, v| causal_self_attention(tape, v[0], 5, 2)).unwrap().max_relative_error < 1e-6);
    }

    #[test]
    fn attention_gradient_matches_finite_differences_across_row_blocks() {
        let qkv = Tensor::randn(&[67, 3 * 4], 0.5, &mut Rng::new(2));
        assert!(check_op(&[qkv], |tape, v| causal_self_attention(tape, v[0], 67, 2)).unwrap().max_relative_error < 1e-6);
    }
}
