//! The rank-r canonical (CP) multi-token head as one fused op (docs/math.md, "The CP head"):
//! expanders, tied unembedding, gate, joint and marginal log-likelihoods and the load-balancing
//! term, with a hand-derived backward.
//!
//! Per position t with hidden state h (C), targets y_0..y_{n−1}:
//! ```text
//! z[α,s] = W[α,s] h                                  (H1)   α < r, s < n
//! ℓ[α,s] = wte · z[α,s],  A[α,s] = ℓ[α,s][y_s] − lse(ℓ[α,s])    (H2)  log P[α,s](y_s)
//! log w = log_softmax(G h + g)        (r = 1: log w = 0)        (H3)
//! joint  = −lse_α(log w[α] + Σ_s A[α,s])                        (H4)
//! head_s = −lse_α(log w[α] + A[α,s])                            (H5)
//! aux = r Σ_α f[α] m[α]                                        (H6)
//! objective = mean_t joint + λ·aux   (r = 1: aux ≡ 1 is dropped)
//! ```
//! Backward, with π = softmax_α(log w + Σ_s A) the posterior over components and N positions:
//! ```text
//! dℓ[α,s] = π[α]/N · (P[α,s] − onehot(y_s))                     (H7)
//! dz[α,s] = wteᵀ dℓ[α,s],   dwte += Σ dℓ[α,s] z[α,s]ᵀ             (H8)
//! dW[α,s] += dz[α,s] hᵀ,    dh += Σ W[α,s]ᵀ dz[α,s]               (H9)
//! da = (w − π)/N + λ·w ⊙ (u − ⟨w, u⟩),  u[α] = r f[α]/N          (H10)
//! dG += da hᵀ,  dg += da,  dh += Gᵀ da                             (H11)
//! ```
//! The vocabulary-sized work goes block by block over positions (about `BLOCK_ROWS` rows of
//! (t, α, s) at a time): a block's logits are computed, turned into probabilities, then into
//! dℓ in place, and consumed by the two backward products before the next block. The op never
//! holds more than one block of B·T·r·n·V. Since the objective is the last op, the forward pass
//! computes the gradients for an upstream gradient of 1; the backward rule only scales them.
//! On a GPU the same steps run over device buffers (`kernels/head.cu` does each position's
//! softmax, posterior and dℓ in one block), in blocks of 16384 rows.

use std::sync::Arc;

use multitoken_cuda::{Buffer, Gpu, HeadShape, Operand, ProductPrecision, View, MAX_HORIZON, MAX_RANK};
use rayon::prelude::*;

use super::{column_sums, on_gpu, place, Place};
use crate::autograd::{Tape, Var};
use crate::error::Result;
use crate::kernels::gemm::{matmul, Layout};
use crate::tensor::{Float, Rounded, Tensor};

/// Rows (t, α, s) of logits per block: 1024 × V floats at a time.
const BLOCK_ROWS: usize = 1024;

/// The head's inputs on a tape. `expand` is absent for n = r = 1 (z = h); `gate` for r = 1.
#[derive(Clone, Copy, Debug)]
pub struct CpHeadVars {
    /// h (N, C)
    pub hidden: Var,
    /// wte (V, C)
    pub wte: Var,
    /// W (r, n, C, C)
    pub expand: Option<Var>,
    /// G (r, C) and g (r)
    pub gate: Option<(Var, Var)>,
}

/// What the head reports besides its objective (means over the N positions).
#[derive(Clone, Debug, Default)]
pub struct CpHeadStats {
    /// −log p(y_0..y_{n−1}) under the mixture (H4)
    pub joint_loss: f64,
    /// −log p(y_s) for s = 0..n−1; index 0 is the next-token loss
    pub head_losses: Vec<f64>,
    /// the load-balancing term (1 when perfectly balanced)
    pub aux: f64,
    /// mean entropy of the gate w, in nats
    pub gate_entropy: f64,
    /// `f[α]`: fraction of positions whose most weighted component is α
    pub expert_fraction: Vec<f64>,
    /// `m[α]`: mean gate weight of component α
    pub expert_weight: Vec<f64>,
}

/// `log_softmax` of each row of a (rows, r) matrix, in place.
fn log_softmax_rows<T: Float>(x: &mut [T], r: usize) {
    for row in x.chunks_mut(r) {
        let max = row.iter().copied().fold(T::neg_infinity(), T::max);
        let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<T>().ln();
        row.iter_mut().for_each(|v| *v -= lse);
    }
}

/// For one position: `lse_α(log_w[α] + Σ_s A[α,s])` and, if asked, the posterior π into `posterior`.
/// `a` is A[α,s] laid out (r, n).
fn joint_log_likelihood<T: Float>(a: &[T], log_w: &[T], n: usize, posterior: Option<&mut [T]>) -> T {
    let scores: Vec<T> = (0..log_w.len()).map(|alpha| log_w[alpha] + a[alpha * n..(alpha + 1) * n].iter().copied().sum::<T>()).collect();
    let max = scores.iter().copied().fold(T::neg_infinity(), T::max);
    let lse = max + scores.iter().map(|&s| (s - max).exp()).sum::<T>().ln();
    if let Some(post) = posterior {
        for (p, &s) in post.iter_mut().zip(&scores) {
            *p = (s - lse).exp();
        }
    }
    lse
}

/// The head's input tensors, and which of them need a gradient.
struct HeadInputs<T: Float> {
    hidden: Tensor<T>,
    wte: Tensor<T>,
    expand: Option<Tensor<T>>,
    gate: Option<(Tensor<T>, Tensor<T>)>,
    need_hidden: bool,
    need_wte: bool,
    need_expand: bool,
    need_gate: bool,
}

impl<T: Float> HeadInputs<T> {
    /// dz is needed for any of h, wte and W.
    fn need_dz(&self) -> bool {
        self.need_hidden || self.need_wte || self.need_expand
    }

    fn any_gradient(&self) -> bool {
        self.need_dz() || self.need_gate
    }
}

/// The gradients of the objective (for an upstream gradient of 1), in the order of the op's
/// inputs: h, wte, W (when there are expanders), G and g (when r > 1).
type HeadGradients<T> = Vec<Option<Tensor<T>>>;

/// The fused head. targets (N, n) → (objective var, statistics). The objective is a CPU
/// scalar on either device.
pub fn cp_head<T: Float>(
    tape: &mut Tape<T>,
    vars: CpHeadVars,
    targets: &[u32],
    horizon: usize,
    rank: usize,
    aux_coef: f64,
) -> Result<(Var, CpHeadStats)> {
    let (r, n) = (rank, horizon);
    let needs = |var: Var| tape.requires_grad(var);
    let inputs = HeadInputs {
        hidden: tape.value(vars.hidden).clone(),
        wte: tape.value(vars.wte).clone(),
        expand: vars.expand.map(|w| tape.value(w).clone()),
        gate: vars.gate.map(|(g, b)| (tape.value(g).clone(), tape.value(b).clone())),
        need_hidden: needs(vars.hidden),
        need_wte: needs(vars.wte),
        need_expand: vars.expand.is_some_and(needs),
        need_gate: vars.gate.is_some_and(|(g, b)| needs(g) || needs(b)),
    };
    let (v, c) = (inputs.wte.shape()[0], inputs.wte.shape()[1]);
    let positions = inputs.hidden.len() / c;
    assert_eq!(targets.len(), positions * n, "cp_head: need n targets per position");
    assert_eq!(vars.expand.is_some(), r * n > 1, "cp_head: expanders exist exactly when n·r > 1");
    assert_eq!(vars.gate.is_some(), r > 1, "cp_head: the gate exists exactly when r > 1");
    assert!(targets.iter().all(|&y| (y as usize) < v), "cp_head: a target outside the vocabulary of {v}");
    let mut tensors = vec![&inputs.hidden, &inputs.wte];
    tensors.extend(&inputs.expand);
    if let Some((g, b)) = &inputs.gate {
        tensors.extend([g, b]);
    }
    let (mut stats, grads) = match place("cp_head", &tensors)? {
        Place::Cpu => cpu_head(&inputs, targets, n, r, aux_coef),
        Place::Cuda(gpu) => cuda_head(&gpu, &inputs, targets, n, r, aux_coef)?,
    };
    // (H6)
    stats.aux = r as f64 * stats.expert_fraction.iter().zip(&stats.expert_weight).map(|(f, m)| f * m).sum::<f64>();
    let objective = stats.joint_loss + if r > 1 { aux_coef * stats.aux } else { 0.0 };

    let mut input_vars = vec![vars.hidden, vars.wte];
    input_vars.extend(vars.expand);
    if let Some((g, b)) = vars.gate {
        input_vars.extend([g, b]);
    }
    let var = tape.record("cp_head", Tensor::scalar(T::of(objective)), &input_vars, move |grad, _| {
        // the gradients were computed for an upstream gradient of 1
        let scale = grad.item();
        if scale == T::one() {
            return Ok(grads);
        }
        grads.into_iter().map(|g| g.map(|g| g.scaled(scale)).transpose()).collect()
    });
    Ok((var, stats))
}

/// The head on the CPU: statistics (without `aux`) and the gradients.
fn cpu_head<T: Float>(inputs: &HeadInputs<T>, targets: &[u32], n: usize, r: usize, aux_coef: f64) -> (CpHeadStats, HeadGradients<T>) {
    let HeadInputs { hidden, wte, expand, gate, need_hidden, need_wte, need_expand, need_gate } = inputs;
    let (need_hidden, need_wte, need_expand, need_gate, need_dz) = (*need_hidden, *need_wte, *need_expand, *need_gate, inputs.need_dz());
    let (v, c) = (wte.shape()[0], wte.shape()[1]);
    let rn = r * n;
    let positions = hidden.len() / c;
    let inv_n = T::one() / T::of(positions as f64);

    // (H1) z (N, r·n·C): rows (t, α, s) of C once reshaped; z = h when there are no expanders.
    let z_owned = expand.as_ref().map(|w| {
        let mut z = vec![T::zero(); positions * rn * c];
        matmul(hidden.data(), Layout::Normal, w.data(), Layout::Transposed, &mut z, positions, c, rn * c, false);
        z
    });
    let z: &[T] = z_owned.as_deref().unwrap_or(hidden.data());

    // (H3) log w (N, r)
    let log_w: Vec<T> = match gate {
        Some((g_weight, g_bias)) => {
            let mut a = vec![T::zero(); positions * r];
            for row in a.chunks_mut(r) {
                row.copy_from_slice(g_bias.data());
            }
            matmul(hidden.data(), Layout::Normal, g_weight.data(), Layout::Transposed, &mut a, positions, c, r, true);
            log_softmax_rows(&mut a, r);
            a
        }
        None => vec![T::zero(); positions],
    };

    // (H2) block by block: A for every row, and (H7, H8) the gradient products.
    let mut log_p = vec![T::zero(); positions * rn]; // A[t, α, s]
    let mut dz = if need_dz { vec![T::zero(); positions * rn * c] } else { Vec::new() };
    let mut dwte = if need_wte { vec![T::zero(); v * c] } else { Vec::new() };
    let mut posterior = vec![T::zero(); positions * r];
    let positions_per_block = (BLOCK_ROWS / rn).max(1);
    let mut logits = vec![T::zero(); positions_per_block.min(positions) * rn * v];
    for t0 in (0..positions).step_by(positions_per_block) {
        let t1 = (t0 + positions_per_block).min(positions);
        let rows = (t1 - t0) * rn;
        let block = &mut logits[..rows * v];
        let z_block = &z[t0 * rn * c..t1 * rn * c];
        matmul(z_block, Layout::Normal, wte.data(), Layout::Transposed, block, rows, c, v, false);
        // each row becomes P[α,s] (softmax), and A = ℓ[y] − lse
        let target_of = |row: usize| targets[(row / rn) * n + row % n] as usize;
        block.par_chunks_mut(v).zip(log_p[t0 * rn..t1 * rn].par_iter_mut()).enumerate().for_each(|(i, (row, a))| {
            let y = target_of(t0 * rn + i);
            let logit_y = row[y];
            *a = logit_y - T::softmax_row(row);
        });
        for t in t0..t1 {
            joint_log_likelihood(&log_p[t * rn..(t + 1) * rn], &log_w[t * r..(t + 1) * r], n, Some(&mut posterior[t * r..(t + 1) * r]));
        }
        if !need_dz {
            continue;
        }
        // (H7) dℓ = π[α]/N · (P − onehot(y)), in place
        block.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
            let global = t0 * rn + i;
            let (t, alpha) = (global / rn, (global % rn) / n);
            let coef = posterior[t * r + alpha] * inv_n;
            row.iter_mut().for_each(|p| *p *= coef);
            row[target_of(global)] -= coef;
        });
        // (H8) dz = dℓ · wte ; dwte += dℓᵀ · z
        matmul(block, Layout::Normal, wte.data(), Layout::Normal, &mut dz[t0 * rn * c..t1 * rn * c], rows, v, c, false);
        if need_wte {
            matmul(block, Layout::Transposed, z_block, Layout::Normal, &mut dwte, v, rows, c, true);
        }
    }
    drop(logits);

    // statistics: (H4) joint, (H5) marginals, (H6)'s fractions and weights
    let mut stats =
        CpHeadStats { head_losses: vec![0.0; n], expert_fraction: vec![0.0; r], expert_weight: vec![0.0; r], ..Default::default() };
    let mut joint_total = 0.0;
    for t in 0..positions {
        let (a, lw) = (&log_p[t * rn..(t + 1) * rn], &log_w[t * r..(t + 1) * r]);
        joint_total -= joint_log_likelihood(a, lw, n, None).as_f64();
        for s in 0..n {
            let terms: Vec<f64> = (0..r).map(|alpha| (lw[alpha] + a[alpha * n + s]).as_f64()).collect();
            let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            stats.head_losses[s] -= max + terms.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        }
        let weights: Vec<f64> = lw.iter().map(|x| x.as_f64().exp()).collect();
        let top = (0..r).fold(0, |best, alpha| if weights[alpha] > weights[best] { alpha } else { best });
        stats.expert_fraction[top] += 1.0;
        for (mean, &w) in stats.expert_weight.iter_mut().zip(&weights) {
            *mean += w;
            if w > 0.0 {
                stats.gate_entropy -= w * w.ln();
            }
        }
    }
    let count = positions as f64;
    stats.joint_loss = joint_total / count;
    stats.head_losses.iter_mut().for_each(|x| *x /= count);
    stats.expert_fraction.iter_mut().for_each(|x| *x /= count);
    stats.expert_weight.iter_mut().for_each(|x| *x /= count);
    stats.gate_entropy /= count;

    let mut grads: HeadGradients<T> = vec![None, None];
    if expand.is_some() {
        grads.push(None);
    }
    if gate.is_some() {
        grads.extend([None, None]);
    }
    if !inputs.any_gradient() {
        return (stats, grads);
    }

    // (H9) dh = dz · W (or dz itself) ; dW = dzᵀ · h
    let mut dhidden = if need_hidden {
        match expand {
            Some(w) => {
                let mut dh = vec![T::zero(); positions * c];
                matmul(&dz, Layout::Normal, w.data(), Layout::Normal, &mut dh, positions, rn * c, c, false);
                dh
            }
            None => dz.clone(),
        }
    } else {
        Vec::new()
    };
    if need_expand {
        let mut dw = vec![T::zero(); rn * c * c];
        matmul(&dz, Layout::Transposed, hidden.data(), Layout::Normal, &mut dw, rn * c, positions, c, false);
        grads[2] = Some(Tensor::from_vec(&[r, n, c, c], dw));
    }
    drop(dz);
    // (H10, H11) the gate
    if let Some((g_weight, _)) = gate.as_ref().filter(|_| need_gate || need_hidden) {
        let u: Vec<T> = stats.expert_fraction.iter().map(|&f| T::of(r as f64 * f / count)).collect();
        let lambda = T::of(aux_coef);
        let mut da = vec![T::zero(); positions * r];
        for t in 0..positions {
            let w: Vec<T> = log_w[t * r..(t + 1) * r].iter().map(|x| x.exp()).collect();
            let w_dot_u: T = w.iter().zip(&u).map(|(&a, &b)| a * b).sum();
            for alpha in 0..r {
                da[t * r + alpha] = (w[alpha] - posterior[t * r + alpha]) * inv_n + lambda * w[alpha] * (u[alpha] - w_dot_u);
            }
        }
        if need_hidden {
            matmul(&da, Layout::Normal, g_weight.data(), Layout::Normal, &mut dhidden, positions, r, c, true);
        }
        let mut dg = vec![T::zero(); r * c];
        matmul(&da, Layout::Transposed, hidden.data(), Layout::Normal, &mut dg, r, positions, c, false);
        let gate_at = grads.len() - 2;
        grads[gate_at] = Some(Tensor::from_vec(&[r, c], dg));
        grads[gate_at + 1] = Some(Tensor::from_vec(&[r], column_sums(&da, r)));
    }
    grads[0] = need_hidden.then(|| Tensor::from_vec(hidden.shape(), dhidden));
    grads[1] = need_wte.then(|| Tensor::from_vec(&[v, c], dwte));
    (stats, grads)
}

/// Rows (t, α, s) of logits per block of the head on a GPU: 16384 × V floats at a time.
const CUDA_BLOCK_ROWS: usize = 16384;

/// What only the head's products read (z, a block's logits then dℓ, dz): f32, or in bf16 the
/// rounding alone, which the product that computes it writes.
enum ProductOnly {
    F32(Buffer<f32>),
    Bf16(Buffer<u16>),
}

impl ProductOnly {
    /// Room for `len` elements in the device's precision.
    fn alloc(gpu: &Gpu, len: usize) -> Result<Self> {
        Ok(if gpu.precision == ProductPrecision::Bf16 { ProductOnly::Bf16(gpu.alloc(len)?) } else { ProductOnly::F32(gpu.alloc(len)?) })
    }

    /// out (m, n) = a (m, k) · b (k, n) into elements [from, from + m·n)
    #[allow(clippy::too_many_arguments)]
    fn product(&self, gpu: &Gpu, a: Operand, b: Operand, from: usize, m: usize, k: usize, n: usize) -> Result<()> {
        match self {
            ProductOnly::F32(out) => gpu.matmul(a, b, out.view().slice(from, m * n), m, k, n, false)?,
            ProductOnly::Bf16(out) => gpu.matmul_into_bf16(a, b, out.view().slice(from, m * n), m, k, n)?,
        }
        Ok(())
    }

    /// elements [from, from + len) as a product's operand, as stored or transposed
    fn operand(&self, from: usize, len: usize, transposed: bool) -> Operand {
        match self {
            ProductOnly::F32(x) if transposed => Operand::transposed(x.view().slice(from, len)),
            ProductOnly::F32(x) => Operand::normal(x.view().slice(from, len)),
            ProductOnly::Bf16(x) => Operand::bf16_only(x.view().slice(from, len), transposed),
        }
    }
}

/// The head on a GPU, the same equations as [`cpu_head`] over device buffers, block by block
/// over positions: statistics (without `aux`) and the gradients.
fn cuda_head<T: Float>(
    gpu: &Arc<Gpu>,
    inputs: &HeadInputs<T>,
    targets: &[u32],
    n: usize,
    r: usize,
    aux_coef: f64,
) -> Result<(CpHeadStats, HeadGradients<T>)> {
    let shape = HeadShape { horizon: n, rank: r };
    if !shape.fits_kernels() {
        return crate::invalid!("--device cuda takes --horizon and --rank up to {} (the head kernels' arrays)", MAX_RANK.min(MAX_HORIZON));
    }
    let (v, c) = (inputs.wte.shape()[0], inputs.wte.shape()[1]);
    let rn = r * n;
    let positions = inputs.hidden.len() / c;
    let (hidden, wte) = (on_gpu(&inputs.hidden), on_gpu(&inputs.wte));
    let (gradient, need_dz) = (inputs.any_gradient(), inputs.need_dz());
    let inv_count = 1.0 / positions as f32;
    let targets_on_gpu = gpu.upload(targets)?;
    // in bf16, what several products read is rounded once: h (where its LayerNorm wrote the
    // rounding, that) and wte; z, each block's logits (then dℓ) and dz are written by their
    // products in bf16 alone
    let bf16 = gpu.precision == ProductPrecision::Bf16;
    let with = |operand: Operand, rounded: Option<View<u16>>| match rounded {
        Some(rounded) => operand.rounded(rounded),
        None => operand,
    };
    let hidden_rounded = match inputs.hidden.cuda() {
        Some(h) if bf16 => Some(h.rounded_or_round()?),
        _ => None,
    };
    let hidden_view = hidden_rounded.as_ref().map(Rounded::view);
    // (H1) z (positions, r·n·C) = h Wᵀ; z = h when there are no expanders. In bf16 only products
    // read z, and they read it rounded: the product writes it in bf16 alone.
    let z = match &inputs.expand {
        Some(w) => {
            let z = ProductOnly::alloc(gpu, positions * rn * c)?;
            z.product(gpu, with(Operand::normal(hidden), hidden_view), Operand::transposed(on_gpu(w)), 0, positions, c, rn * c)?;
            Some(z)
        }
        None => None,
    };
    // rows [from, from + count) of z as a product reads them
    let z_rows = |from: usize, count: usize| match &z {
        Some(z) => z.operand(from * c, count * c, false),
        None => with(Operand::normal(hidden.slice(from * c, count * c)), hidden_view.map(|h| h.slice(from * c, count * c))),
    };
    // (H3) log w (positions, r)
    let log_w = gpu.alloc::<f32>(positions * r)?;
    match &inputs.gate {
        Some((g_weight, g_bias)) => {
            gpu.broadcast_rows(on_gpu(g_bias), log_w.view())?;
            let h = with(Operand::normal(hidden), hidden_view);
            gpu.matmul(h, Operand::transposed(on_gpu(g_weight)), log_w.view(), positions, c, r, true)?;
            gpu.gate_log_softmax(log_w.view(), r)?;
        }
        None => gpu.fill_zero(log_w.view())?,
    }
    // dz (positions, r·n·C): with expanders only products read it, rounded in bf16; without,
    // it is dh itself, f32
    let dz = match (need_dz, &inputs.expand) {
        (false, _) => None,
        (true, Some(_)) => Some(ProductOnly::alloc(gpu, positions * rn * c)?),
        (true, None) => Some(ProductOnly::F32(gpu.alloc(positions * rn * c)?)),
    };
    let dwte = if inputs.need_wte { Some(gpu.zeros::<f32>(v * c)?) } else { None };
    let (log_p, posterior) = (gpu.alloc::<f32>(positions * rn)?, gpu.alloc::<f32>(positions * r)?);
    let per_block = (CUDA_BLOCK_ROWS / rn).max(1);
    // a block's logits, written over by dℓ: f32, or in bf16 the product's rounding (as autocast
    // has them; the head's sums still run in f32), which only the products read as dℓ
    let logits = ProductOnly::alloc(gpu, per_block.min(positions) * rn * v)?;
    let wte_rounded = if bf16 { Some(gpu.bf16_copy(wte)?) } else { None };
    let wte_view = wte_rounded.as_ref().map(Buffer::view);
    for t0 in (0..positions).step_by(per_block) {
        let count = per_block.min(positions - t0);
        let rows = count * rn;
        let (z_operand, wte_operand) = (z_rows(t0 * rn, rows), with(Operand::transposed(wte), wte_view));
        let (block_log_w, block_posterior) = (log_w.view().slice(t0 * r, count * r), posterior.view().slice(t0 * r, count * r));
        let block_targets = targets_on_gpu.view().slice(t0 * n, count * n);
        let block_log_p = log_p.view().slice(t0 * rn, rows);
        // (H2) logits, log P[α,s](y_s); (H7) the posterior and dℓ in place
        logits.product(gpu, z_operand, wte_operand, 0, rows, c, v)?;
        let (targets, log_w, log_p, posterior) = (block_targets, block_log_w, block_log_p, block_posterior);
        match &logits {
            ProductOnly::F32(all) => {
                gpu.head_position(all.view().prefix(rows * v), targets, log_w, log_p, posterior, v, shape, inv_count, gradient)?
            }
            ProductOnly::Bf16(all) => {
                gpu.head_position(all.view().prefix(rows * v), targets, log_w, log_p, posterior, v, shape, inv_count, gradient)?
            }
        }
        if let Some(dz) = &dz {
            // (H8) dz = dℓ wte, dwte += dℓᵀ z
            let dl = |transposed: bool| logits.operand(0, rows * v, transposed);
            dz.product(gpu, dl(false), with(Operand::normal(wte), wte_view), t0 * rn * c, rows, v, c)?;
            if let Some(dwte) = &dwte {
                gpu.matmul(dl(true), z_rows(t0 * rn, rows), dwte.view(), v, rows, c, true)?;
            }
        }
    }
    drop(logits);
    // (H4–H6) the sums over positions, on the device in a fixed order
    let sums = gpu.alloc::<f64>(shape.statistics_len())?;
    gpu.head_statistics(log_p.view(), log_w.view(), sums.view(), shape)?;
    let totals = gpu.download(sums.view())?;
    let count = positions as f64;
    let stats = CpHeadStats {
        joint_loss: totals[0] / count,
        gate_entropy: totals[1] / count,
        head_losses: totals[2..2 + n].iter().map(|x| x / count).collect(),
        expert_fraction: totals[2 + n..2 + n + r].iter().map(|x| x / count).collect(),
        expert_weight: totals[2 + n + r..].iter().map(|x| x / count).collect(),
        aux: 0.0,
    };
    let mut grads: HeadGradients<T> = vec![None, None];
    if inputs.expand.is_some() {
        grads.push(None);
    }
    if inputs.gate.is_some() {
        grads.extend([None, None]);
    }
    if !gradient {
        return Ok((stats, grads));
    }
    // (H9) dh = dz W (or dz itself); dW = dzᵀ h
    let dz_operand = |dz: &ProductOnly, transposed: bool| dz.operand(0, positions * rn * c, transposed);
    if let (Some(dz), true) = (&dz, inputs.need_expand) {
        let dw = gpu.alloc::<f32>(rn * c * c)?;
        let h = with(Operand::normal(hidden), hidden_view);
        gpu.matmul(dz_operand(dz, true), h, dw.view(), rn * c, positions, c, false)?;
        grads[2] = Some(Tensor::from_cuda(gpu, dw, &[r, n, c, c]));
    }
    let dhidden = match (&inputs.expand, dz) {
        _ if !inputs.need_hidden => None,
        (Some(w), Some(dz)) => {
            let dh = gpu.alloc::<f32>(positions * c)?;
            gpu.matmul(dz_operand(&dz, false), Operand::normal(on_gpu(w)), dh.view(), positions, rn * c, c, false)?;
            Some(dh)
        }
        (None, Some(ProductOnly::F32(dz))) => Some(dz),
        (None, Some(_)) => unreachable!("without expanders dz is dh, in f32"),
        (_, None) => Some(gpu.zeros::<f32>(positions * c)?),
    };
    // (H10, H11) the gate
    if let Some((g_weight, _)) = &inputs.gate {
        let da = gpu.alloc::<f32>(positions * r)?;
        gpu.gate_gradient(log_w.view(), posterior.view(), sums.view().slice(2 + n, r), da.view(), r, inv_count, aux_coef as f32)?;
        if let Some(dh) = &dhidden {
            gpu.matmul(Operand::normal(da.view()), Operand::normal(on_gpu(g_weight)), dh.view(), positions, r, c, true)?;
        }
        let (dg, dg_bias) = (gpu.alloc::<f32>(r * c)?, gpu.alloc::<f32>(r)?);
        gpu.matmul(Operand::transposed(da.view()), with(Operand::normal(hidden), hidden_view), dg.view(), r, positions, c, false)?;
        gpu.column_sums(da.view(), dg_bias.view(), false)?;
        let gate_at = grads.len() - 2;
        grads[gate_at] = Some(Tensor::from_cuda(gpu, dg, &[r, c]));
        grads[gate_at + 1] = Some(Tensor::from_cuda(gpu, dg_bias, &[r]));
    }
    grads[0] = dhidden.map(|dh| Tensor::from_cuda(gpu, dh, inputs.hidden.shape()));
    grads[1] = dwte.map(|dwte| Tensor::from_cuda(gpu, dwte, &[v, c]));
    Ok((stats, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, GradcheckOptions};
    use crate::ops;
    use crate::tensor::Rng;

    struct Setup {
        inputs: Vec<Tensor<f64>>,
        targets: Vec<u32>,
        n: usize,
        r: usize,
    }

    fn setup(positions: usize, c: usize, v: usize, n: usize, r: usize, seed: u64) -> Setup {
        let mut rng = Rng::new(seed);
        let mut inputs = vec![Tensor::randn(&[positions, c], 1.0, &mut rng), Tensor::randn(&[v, c], 0.7, &mut rng)];
        if n * r > 1 {
            inputs.push(Tensor::randn(&[r, n, c, c], 0.5, &mut rng));
        }
        if r > 1 {
            inputs.push(Tensor::randn(&[r, c], 0.8, &mut rng));
            inputs.push(Tensor::randn(&[r], 0.5, &mut rng));
        }
        let targets = (0..positions * n).map(|_| rng.below(v) as u32).collect();
        Setup { inputs, targets, n, r }
    }

    fn head_vars(vars: &[Var], n: usize, r: usize) -> CpHeadVars {
        let expand = (n * r > 1).then(|| vars[2]);
        let gate = (r > 1).then(|| (vars[3], vars[4]));
        CpHeadVars { hidden: vars[0], wte: vars[1], expand, gate }
    }

    fn run(s: &Setup, aux_coef: f64) -> (f64, CpHeadStats) {
        let mut tape = Tape::inference();
        let vars: Vec<Var> = s.inputs.iter().map(|t| tape.leaf(t.clone(), false)).collect();
        let (out, stats) = cp_head(&mut tape, head_vars(&vars, s.n, s.r), &s.targets, s.n, s.r, aux_coef).unwrap();
        (tape.value(out).item(), stats)
    }

    #[test]
    fn cp_head_gradient_matches_finite_differences_for_every_input() {
        for (n, r, aux_coef) in [(2, 3, 0.3), (3, 1, 0.0), (1, 2, 0.1), (1, 1, 0.0)] {
            let s = setup(5, 4, 7, n, r, 1 + n as u64 * 10 + r as u64);
            let report = gradcheck(
                &s.inputs,
                |tape, vars| Ok(cp_head(tape, head_vars(vars, n, r), &s.targets, n, r, aux_coef)?.0),
                &GradcheckOptions::default(),
            )
            .unwrap();
            println!("n={n} r={r}: {report}");
            assert!(report.max_relative_error < 1e-6, "n={n} r={r}: {report}");
        }
    }

    #[test]
    fn blocks_of_positions_give_the_same_result_as_one_block() {
        // 300 positions × r·n = 4 rows → two blocks of BLOCK_ROWS
        let s = setup(300, 4, 9, 2, 2, 3);
        let report = gradcheck(
            &s.inputs,
            |tape, vars| Ok(cp_head(tape, head_vars(vars, 2, 2), &s.targets, 2, 2, 0.05)?.0),
            &GradcheckOptions { max_coordinates_per_input: 20, ..Default::default() },
        )
        .unwrap();
        assert!(report.max_relative_error < 1e-6, "{report}");
    }

    /// Every joint probability, by brute force over all V^n target tuples.
    fn brute_force_joint(s: &Setup, position: usize, v: usize) -> Vec<f64> {
        let (n, r) = (s.n, s.r);
        let c = s.inputs[0].shape()[1];
        let h = &s.inputs[0].data()[position * c..(position + 1) * c];
        let w = s.inputs.get(2);
        let log_w: Vec<f64> = if r > 1 {
            let (g, b) = (&s.inputs[3], &s.inputs[4]);
            let mut a: Vec<f64> = (0..r).map(|al| b.data()[al] + (0..c).map(|j| g.data()[al * c + j] * h[j]).sum::<f64>()).collect();
            log_softmax_rows(&mut a, r);
            a
        } else {
            vec![0.0]
        };
        // P[α][s][v]
        let probs: Vec<Vec<Vec<f64>>> = (0..r)
            .map(|al| {
                (0..n)
                    .map(|st| {
                        let z: Vec<f64> = match w {
                            Some(w) => (0..c).map(|i| (0..c).map(|j| w.data()[((al * n + st) * c + i) * c + j] * h[j]).sum()).collect(),
                            None => h.to_vec(),
                        };
                        let mut logits: Vec<f64> = (0..v).map(|k| (0..c).map(|j| s.inputs[1].data()[k * c + j] * z[j]).sum()).collect();
                        crate::kernels::softmax::softmax_row_scalar(&mut logits);
                        logits
                    })
                    .collect()
            })
            .collect();
        (0..v.pow(n as u32))
            .map(|mut index| {
                let tuple: Vec<usize> = (0..n)
                    .map(|_| {
                        let y = index % v;
                        index /= v;
                        y
                    })
                    .collect();
                (0..r).map(|al| log_w[al].exp() * tuple.iter().enumerate().map(|(st, &y)| probs[al][st][y]).product::<f64>()).sum()
            })
            .collect()
    }

    #[test]
    fn the_joint_over_all_target_tuples_sums_to_one_and_matches_the_fused_op() {
        let (v, n, r) = (5, 3, 4);
        let mut s = setup(1, 3, v, n, r, 9);
        let joint = brute_force_joint(&s, 0, v);
        assert!((joint.iter().sum::<f64>() - 1.0).abs() < 1e-12, "the joint sums to {}", joint.iter().sum::<f64>());
        for index in [0, 17, 63, 124] {
            s.targets = vec![(index % v) as u32, ((index / v) % v) as u32, (index / v / v) as u32];
            let (_, stats) = run(&s, 0.0);
            assert!(((-stats.joint_loss).exp() - joint[index]).abs() < 1e-12, "tuple {index}");
        }
    }

    #[test]
    fn rank_one_joint_is_the_sum_of_independent_cross_entropies() {
        let s = setup(6, 4, 8, 3, 1, 5);
        let (objective, stats) = run(&s, 0.5);
        assert!((objective - stats.joint_loss).abs() < 1e-12, "r = 1 has no aux term");
        assert!((stats.joint_loss - stats.head_losses.iter().sum::<f64>()).abs() < 1e-10);
        // head s equals cross-entropy of the logits wte · W[0,s] h
        for st in 0..3 {
            let mut tape = Tape::inference();
            let h = tape.leaf(s.inputs[0].clone(), false);
            let w_s = Tensor::from_vec(&[4, 4], s.inputs[2].data()[st * 16..(st + 1) * 16].to_vec());
            let w_t = tape.leaf(transpose(&w_s), false);
            let z = ops::linear(&mut tape, h, w_t, None).unwrap();
            let wte = tape.leaf(s.inputs[1].clone(), false);
            let logits = ops::unembed(&mut tape, z, wte).unwrap();
            let targets: Vec<u32> = (0..6).map(|t| s.targets[t * 3 + st]).collect();
            let ce = ops::cross_entropy(&mut tape, logits, &targets).unwrap();
            assert!((tape.value(ce).item() - stats.head_losses[st]).abs() < 1e-12, "head {st}");
        }
    }

    fn transpose(t: &Tensor<f64>) -> Tensor<f64> {
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        Tensor::from_vec(&[cols, rows], (0..rows * cols).map(|i| t.data()[(i % rows) * cols + i / rows]).collect())
    }

    #[test]
    fn horizon_one_rank_one_is_gpt2_cross_entropy() {
        let s = setup(6, 4, 8, 1, 1, 6);
        let (objective, stats) = run(&s, 0.01);
        let mut tape = Tape::inference();
        let h = tape.leaf(s.inputs[0].clone(), false);
        let wte = tape.leaf(s.inputs[1].clone(), false);
        let logits = ops::unembed(&mut tape, h, wte).unwrap();
        let ce = ops::cross_entropy(&mut tape, logits, &s.targets).unwrap();
        assert!((tape.value(ce).item() - objective).abs() < 1e-12);
        assert_eq!(stats.head_losses.len(), 1);
    }

    #[test]
    fn load_balancing_term_is_one_when_balanced_and_r_when_collapsed() {
        let mut s = setup(8, 4, 5, 2, 4, 2);
        // G = 0, g = 0: every weight is 1/r, argmax ties go to component 0 → f = (1,0,0,0), m = 1/r
        s.inputs[3] = Tensor::zeros(&[4, 4]);
        s.inputs[4] = Tensor::zeros(&[4]);
        let (_, stats) = run(&s, 0.0);
        assert!((stats.aux - 1.0).abs() < 1e-12 && (stats.gate_entropy - 4f64.ln()).abs() < 1e-12);
        // a huge bias on component 2: all weight there, aux = r
        s.inputs[4] = Tensor::from_vec(&[4], vec![0.0, 0.0, 50.0, 0.0]);
        let (_, stats) = run(&s, 0.0);
        assert!((stats.aux - 4.0).abs() < 1e-9 && stats.expert_fraction[2] == 1.0);
    }
}
