//! The CUDA path against the CPU path (feature `cuda`). Every test is written with
//! `cuda_test!`: on a machine with a CUDA driver it runs on the GPU; elsewhere it prints
//! "skipped" and passes, so CI (no GPU) builds and runs this file without a device.
//!
//! Per op: the kernel against the CPU's scalar reference in f64, relative error printed.
//! Whole model: the GPU's gradients against the CPU tape's, and 50 training steps of `small`
//! n = 4, r = 4 on both, loss curves compared.
#![cfg(feature = "cuda")]

use multitoken::cuda::decode::GpuDecoder;
use multitoken::cuda::{AttentionRoute, CudaError, Gpu, GpuModel};
use multitoken::decode::head::Head;
use multitoken::decode::kv_cache::CachedBackbone;
use multitoken::decode::{DecodeRequest, SamplingConfig};
use multitoken::model::{gpt2, loss::model_loss, Batch, ModelConfig};
use multitoken::tensor::{Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{train_step, StepConfig};
use multitoken_cuda::{driver_present, AdamWStep, AttentionShape, GemmRoute, Operand, FUSED_ATTENTION_HEAD_SIZES};

/// Defines a test that receives an open `Gpu`, or reports itself skipped without a driver.
macro_rules! cuda_test {
    ($name:ident, |$gpu:ident| $body:block) => {
        #[test]
        fn $name() {
            if !driver_present() {
                println!("{}: skipped (no CUDA driver on this machine)", stringify!($name));
                return;
            }
            #[allow(unused_mut)]
            let mut $gpu = Gpu::new(0).expect("a driver is present, so device 0 opens");
            $body
        }
    };
}

/// A deterministic pseudo-random vector in [-2, 2).
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| (rng.uniform() * 4.0 - 2.0) as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn relative_error(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let norm = reference.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
    ours.iter().zip(reference).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt() / norm
}

fn report(op: &str, error: f64, tolerance: f64) {
    println!("{op}: relative error {error:.2e}");
    assert!(error < tolerance, "{op}: relative error {error:e} above {tolerance:e}");
}

#[test]
fn without_a_driver_opening_a_device_is_a_typed_error_not_a_panic() {
    match Gpu::new(0) {
        Err(CudaError::NoDriver) => assert!(!driver_present()),
        Ok(_) => assert!(driver_present()),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// Needs only NVRTC (no GPU): CI fetches it, so kernel source errors show up there too.
#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !multitoken_cuda::nvrtc_present() {
        println!("every_kernel_compiles_with_nvrtc: skipped (NVRTC not found; scripts/fetch-nvrtc.sh fetches it)");
        return;
    }
    for architecture in ["compute_80", "compute_90"] {
        if let Err(e) = multitoken_cuda::compile_all_kernels(architecture) {
            panic!("{architecture}: {e}");
        }
    }
}

cuda_test!(matmul_matches_the_cpu_for_every_layout_batched_and_accumulating, |gpu| {
    let (m, k, n) = (129, 257, 67);
    for (tf32, route, batch) in
        [false, true].into_iter().flat_map(|t| [(GemmRoute::Blas, 1), (GemmRoute::BlasLt, 1), (GemmRoute::Blas, 3)].map(|(r, b)| (t, r, b)))
    {
        gpu.tf32 = tf32;
        gpu.gemm_route = route;
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a, b, c0) = (random(batch * m * k, 1), random(batch * k * n, 2), random(batch * m * n, 3));
            let at = |q: usize, i: usize, p: usize| if a_t { a[q * m * k + p * m + i] } else { a[q * m * k + i * k + p] } as f64;
            let bt = |q: usize, p: usize, j: usize| if b_t { b[q * k * n + j * k + p] } else { b[q * k * n + p * n + j] } as f64;
            let reference: Vec<f64> = (0..batch * m * n)
                .map(|idx| {
                    let (q, i, j) = (idx / (m * n), (idx / n) % m, idx % n);
                    c0[idx] as f64 + (0..k).map(|p| at(q, i, p) * bt(q, p, j)).sum::<f64>()
                })
                .collect();
            let (da, db, dc) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&c0).unwrap());
            let operand = |view, t: bool, stride| if t { Operand::transposed(view) } else { Operand::normal(view) }.strided(stride);
            gpu.matmul_batched(operand(da.view(), a_t, m * k), operand(db.view(), b_t, k * n), dc.view(), m, k, n, batch, true).unwrap();
            let tolerance = if tf32 { 1e-2 } else { 1e-5 };
            report(
                &format!("matmul {route:?} batch={batch} a_t={a_t} b_t={b_t} tf32={tf32}"),
                relative_error(&gpu.download(dc.view()).unwrap(), &reference),
                tolerance,
            );
        }
    }
});

cuda_test!(linear_with_bias_matches_the_cpu_on_both_routes, |gpu| {
    let (rows, n_in, n_out) = (333, 96, 80);
    let (x, w, b) = (random(rows * n_in, 21), random(n_in * n_out, 22), random(n_out, 23));
    let reference: Vec<f64> = (0..rows * n_out)
        .map(|i| b[i % n_out] as f64 + (0..n_in).map(|p| x[(i / n_out) * n_in + p] as f64 * w[p * n_out + i % n_out] as f64).sum::<f64>())
        .collect();
    let (dx, dw, db) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
    for route in [GemmRoute::Blas, GemmRoute::BlasLt] {
        gpu.gemm_route = route;
        let out = gpu.upload(&vec![f32::NAN; rows * n_out]).unwrap(); // poisoned: every element must be written
        gpu.linear(dx.view(), dw.view(), db.view(), out.view()).unwrap();
        report(&format!("linear with bias, {route:?}"), relative_error(&gpu.download(out.view()).unwrap(), &reference), 1e-5);
        let residual = random(rows * n_out, 24);
        let dresidual = gpu.upload(&residual).unwrap();
        let plus: Vec<f64> = reference.iter().zip(&residual).map(|(&a, &b)| a + b as f64).collect();
        gpu.linear_residual(dx.view(), dw.view(), db.view(), dresidual.view(), out.view()).unwrap();
        report(&format!("linear with bias on a residual, {route:?}"), relative_error(&gpu.download(out.view()).unwrap(), &plus), 1e-5);
    }
});

cuda_test!(linear_on_a_few_rows_matches_the_cpu_with_every_prologue_and_epilogue, |gpu| {
    // decoding's kernel: (k, n) shapes with ragged column tiles, ragged splits of w's rows, one
    // column tile split many ways, and many tiles (8 rows of k = 1020 are about as many as the
    // LayerNorm prologue takes)
    for (k, n) in [(300, 772), (1020, 96), (40, 8192)] {
        let (w, b, gain, shift) = (random(k * n, 61), random(n, 62), random(k, 63), random(k, 64));
        let (dw, db, dgain, dshift) =
            (gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&gain).unwrap(), gpu.upload(&shift).unwrap());
        for rows in [1, 3, 8] {
            let (x, residual) = (random(rows * k, 65 + rows as u64), random(rows * n, 75 + rows as u64));
            let (dx, dresidual) = (gpu.upload(&x).unwrap(), gpu.upload(&residual).unwrap());
            for normed in [false, true] {
                // x' rows, in f64: x itself or its LayerNorm
                let (gain, shift) = (&gain, &shift);
                let input: Vec<f64> = x
                    .chunks(k)
                    .flat_map(|row| {
                        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
                        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / k as f64;
                        let rstd = 1.0 / (var + 1e-5).sqrt();
                        (0..k).map(
                            move |j| if normed { (row[j] as f64 - mean) * rstd * gain[j] as f64 + shift[j] as f64 } else { row[j] as f64 },
                        )
                    })
                    .collect();
                let product: Vec<f64> = (0..rows * n)
                    .map(|i| b[i % n] as f64 + (0..k).map(|p| input[(i / n) * k + p] * w[p * n + i % n] as f64).sum::<f64>())
                    .collect();
                let gelu = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
                let layernorm = normed.then_some((dgain.view(), dshift.view()));
                for (name, epilogue, reference) in [
                    ("bias", multitoken_cuda::Epilogue::Bias, product.clone()),
                    ("gelu", multitoken_cuda::Epilogue::Gelu, product.iter().map(|&v| gelu(v)).collect()),
                    (
                        "residual",
                        multitoken_cuda::Epilogue::Residual(dresidual.view()),
                        product.iter().zip(&residual).map(|(&v, &r)| v + r as f64).collect(),
                    ),
                ] {
                    let out = gpu.upload(&vec![f32::NAN; rows * n]).unwrap(); // poisoned: every element must be written
                    assert!(gpu.linear_few_rows(dx.view(), layernorm, dw.view(), db.view(), epilogue, out.view()).unwrap());
                    let ours = gpu.download(out.view()).unwrap();
                    report(
                        &format!("linear_few_rows {rows}×{k}·{k}×{n}, layernorm {normed}, {name}"),
                        relative_error(&ours, &reference),
                        1e-5,
                    );
                    // a row's result does not depend on the rows decoded with it, to the bit
                    let last = rows - 1;
                    let alone = gpu.upload(&vec![f32::NAN; n]).unwrap();
                    let alone_epilogue = match epilogue {
                        multitoken_cuda::Epilogue::Residual(_) => multitoken_cuda::Epilogue::Residual(dresidual.view().slice(last * n, n)),
                        other => other,
                    };
                    gpu.linear_few_rows(dx.view().slice(last * k, k), layernorm, dw.view(), db.view(), alone_epilogue, alone.view())
                        .unwrap();
                    assert_eq!(gpu.download(alone.view()).unwrap(), ours[last * n..], "row {last} alone differs from row {last} of {rows}");
                }
            }
        }
    }
    // where it does not apply it does nothing and says so: n not a multiple of 4, too many rows,
    let (w, b, x) = (gpu.upload(&random(8 * 6, 81)).unwrap(), gpu.upload(&random(6, 82)).unwrap(), gpu.upload(&random(2 * 8, 83)).unwrap());
    let out = gpu.upload(&[7.0f32; 12]).unwrap();
    assert!(!gpu.linear_few_rows(x.view(), None, w.view(), b.view(), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    assert_eq!(gpu.download(out.view()).unwrap(), vec![7.0; 12]);
    let (w, b, x) = (gpu.upload(&random(8 * 4, 84)).unwrap(), gpu.upload(&random(4, 85)).unwrap(), gpu.upload(&random(9 * 8, 86)).unwrap());
    let out = gpu.zeros::<f32>(9 * 4).unwrap();
    assert!(!gpu.linear_few_rows(x.view(), None, w.view(), b.view(), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    // and an empty weight (k = 0)
    let (empty, b, out) = (gpu.zeros::<f32>(0).unwrap(), gpu.upload(&random(4, 87)).unwrap(), gpu.zeros::<f32>(2 * 4).unwrap());
    assert!(!gpu.linear_few_rows(empty.view(), None, empty.view(), b.view(), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    // and `linear`, `linear_gelu` on a few rows take it, or cuBLASLt when it is switched off
    let (rows, k, n) = (4, 256, 512);
    let (x, w, b) = (random(rows * k, 91), random(k * n, 92), random(n, 93));
    let (dx, dw, db) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
    let mut results = Vec::new();
    for few_rows in [true, false] {
        gpu.few_row_linear = few_rows;
        let (out, out_gelu) = (gpu.zeros::<f32>(rows * n).unwrap(), gpu.zeros::<f32>(rows * n).unwrap());
        gpu.linear(dx.view(), dw.view(), db.view(), out.view()).unwrap();
        gpu.linear_gelu(dx.view(), dw.view(), db.view(), out_gelu.view()).unwrap();
        results.push((gpu.download(out.view()).unwrap(), gpu.download(out_gelu.view()).unwrap()));
    }
    report("linear on 4 rows: few-row kernel against cuBLASLt", relative_error(&results[0].0, &widen(&results[1].0)), 1e-5);
    report("linear_gelu on 4 rows: few-row kernel against cuBLASLt", relative_error(&results[0].1, &widen(&results[1].1)), 1e-5);
});

cuda_test!(layernorm_on_a_few_rows_matches_the_cpu, |gpu| {
    // decoding's LayerNorm takes a block per row
    let c = 100;
    let (gamma, beta) = (random(c, 51), random(c, 52));
    let (dgamma, dbeta) = (gpu.upload(&gamma).unwrap(), gpu.upload(&beta).unwrap());
    for rows in [1, 3, 8] {
        let x = random(rows * c, 33 + rows as u64);
        let mut reference = Vec::new();
        for row in x.chunks(c) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            reference.extend(row.iter().zip(gamma.iter().zip(&beta)).map(|(&v, (&g, &b))| (v as f64 - mean) * rstd * g as f64 + b as f64));
        }
        let dx = gpu.upload(&x).unwrap();
        let (normed, mean, rstd) = (gpu.zeros::<f32>(rows * c).unwrap(), gpu.zeros::<f32>(rows).unwrap(), gpu.zeros::<f32>(rows).unwrap());
        gpu.layernorm_forward(dx.view(), dgamma.view(), dbeta.view(), normed.view(), mean.view(), rstd.view()).unwrap();
        report(&format!("layernorm on {rows} rows"), relative_error(&gpu.download(normed.view()).unwrap(), &reference), 1e-5);
    }
});

cuda_test!(gelu_matches_the_cpu_kernel, |gpu| {
    use multitoken::kernels::gelu::{backward_scalar, forward_scalar};
    let n = 100_003;
    let (x, dout) = (random(n, 3), random(n, 4));
    let (mut forward, mut backward) = (vec![0.0; n], vec![0.0; n]);
    forward_scalar(&widen(&x), &mut forward);
    backward_scalar(&widen(&x), &widen(&dout), &mut backward);
    let (dx, dd, out, grad) = (gpu.upload(&x).unwrap(), gpu.upload(&dout).unwrap(), gpu.zeros(n).unwrap(), gpu.zeros(n).unwrap());
    gpu.gelu_forward(dx.view(), out.view()).unwrap();
    report("gelu forward", relative_error(&gpu.download(out.view()).unwrap(), &forward), 1e-5);
    gpu.gelu_backward(dx.view(), dd.view(), grad.view()).unwrap();
    report("gelu backward", relative_error(&gpu.download(grad.view()).unwrap(), &backward), 1e-5);
});

cuda_test!(residual_bias_and_column_sums_match_the_cpu, |gpu| {
    let (rows, cols) = (1031, 77);
    let (a, b, bias, sums0) = (random(rows * cols, 5), random(rows * cols, 6), random(cols, 7), random(cols, 8));
    let (da, db, out) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap(), gpu.zeros(rows * cols).unwrap());
    gpu.add(da.view(), db.view(), out.view()).unwrap();
    let sum: Vec<f64> = a.iter().zip(&b).map(|(&x, &y)| x as f64 + y as f64).collect();
    report("residual add", relative_error(&gpu.download(out.view()).unwrap(), &sum), 1e-6);
    let dbias = gpu.upload(&bias).unwrap();
    gpu.broadcast_rows(dbias.view(), out.view()).unwrap();
    let rows_of_bias: Vec<f64> = (0..rows * cols).map(|i| bias[i % cols] as f64).collect();
    report("bias broadcast", relative_error(&gpu.download(out.view()).unwrap(), &rows_of_bias), 1e-7);
    let dsums = gpu.upload(&sums0).unwrap();
    gpu.column_sums_add(da.view(), dsums.view()).unwrap();
    let column_sums: Vec<f64> = (0..cols).map(|j| sums0[j] as f64 + (0..rows).map(|i| a[i * cols + j] as f64).sum::<f64>()).collect();
    report("column sums (bias gradient)", relative_error(&gpu.download(dsums.view()).unwrap(), &column_sums), 1e-5);
    let total = gpu.zeros::<f64>(1).unwrap();
    gpu.sum_of_squares(da.view(), total.view()).unwrap();
    let squares: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    let error = (gpu.download(total.view()).unwrap()[0] - squares).abs() / squares;
    report("sum of squares (gradient norm)", error, 1e-6);
});

cuda_test!(layernorm_matches_the_cpu_kernel, |gpu| {
    use multitoken::kernels::layernorm::{backward_row_scalar, forward_row_scalar};
    let (rows, c) = (333, 256);
    let (x, w, b, dout, dx0) = (random(rows * c, 6), random(c, 7), random(c, 8), random(rows * c, 9), random(rows * c, 10));
    let (xw, ww, bw, gw) = (widen(&x), widen(&w), widen(&b), widen(&dout));
    let (mut out_ref, mut dx_ref, mut dw_ref, mut db_ref) = (vec![0.0; rows * c], widen(&dx0), vec![0.0; c], vec![0.0; c]);
    for row in 0..rows {
        let range = row * c..(row + 1) * c;
        let (mean, rstd) = forward_row_scalar(&xw[range.clone()], &ww, &bw, &mut out_ref[range.clone()]);
        let mut dx_row = vec![0.0; c];
        backward_row_scalar(&xw[range.clone()], &gw[range.clone()], &ww, mean, rstd, &mut dx_row, &mut dw_ref, &mut db_ref);
        dx_ref[range].iter_mut().zip(dx_row).for_each(|(d, r)| *d += r);
    }
    let (dxv, dwv, dbv) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
    let (out, mean, rstd) = (gpu.zeros(rows * c).unwrap(), gpu.zeros(rows).unwrap(), gpu.zeros(rows).unwrap());
    gpu.layernorm_forward(dxv.view(), dwv.view(), dbv.view(), out.view(), mean.view(), rstd.view()).unwrap();
    report("layernorm forward", relative_error(&gpu.download(out.view()).unwrap(), &out_ref), 1e-5);
    let (ddout, ddx, ddw, ddb) = (gpu.upload(&dout).unwrap(), gpu.upload(&dx0).unwrap(), gpu.zeros(c).unwrap(), gpu.zeros(c).unwrap());
    gpu.layernorm_backward(dxv.view(), ddout.view(), dwv.view(), mean.view(), rstd.view(), ddx.view(), ddw.view(), ddb.view()).unwrap();
    for (name, ours, reference) in [("dx", &ddx, &dx_ref), ("dweight", &ddw, &dw_ref), ("dbias", &ddb, &db_ref)] {
        report(&format!("layernorm backward {name}"), relative_error(&gpu.download(ours.view()).unwrap(), reference), 1e-5);
    }
});

cuda_test!(adamw_matches_the_cpu_optimizer, |gpu| {
    use multitoken::kernels::adamw::{update_scalar, AdamWStep as CpuStep};
    let n = 50_001;
    let (p, g, m) = (random(n, 10), random(n, 11), random(n, 12));
    let v: Vec<f32> = random(n, 13).iter().map(|x| x * x).collect();
    let grad_scale = 0.5f32;
    let step = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7, grad_scale };
    let cpu_step = CpuStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7 };
    let scaled: Vec<f64> = g.iter().map(|&x| (x * grad_scale) as f64).collect();
    let dg = gpu.upload(&g).unwrap();
    // one launch over three parameters: decayed, not decayed, frozen
    let (starts, flags) = (vec![0i64, 1000, 30_000, n as i64], vec![3u32, 1, 0]);
    let (mut pr, mut mr, mut vr) = (widen(&p), widen(&m), widen(&v));
    for (segment, &flag) in flags.iter().enumerate() {
        let range = starts[segment] as usize..starts[segment + 1] as usize;
        if flag & 1 == 1 {
            let step = CpuStep { weight_decay: if flag & 2 == 2 { 0.1 } else { 0.0 }, ..cpu_step };
            update_scalar(&mut pr[range.clone()], &scaled[range.clone()], &mut mr[range.clone()], &mut vr[range], &step);
        }
    }
    let (dp, dm, dv) = (gpu.upload(&p).unwrap(), gpu.upload(&m).unwrap(), gpu.upload(&v).unwrap());
    let (dstarts, dflags) = (gpu.upload(&starts).unwrap(), gpu.upload(&flags).unwrap());
    gpu.adamw_update_segments(dp.view(), dg.view(), dm.view(), dv.view(), dstarts.view(), dflags.view(), step).unwrap();
    for (name, ours, reference) in [("param", &dp, &pr), ("exp_avg", &dm, &mr), ("exp_avg_sq", &dv, &vr)] {
        report(&format!("adamw {name}"), relative_error(&gpu.download(ours.view()).unwrap(), reference), 1e-5);
    }
});

cuda_test!(fused_attention_matches_the_cpu_op_for_every_head_size, |gpu| {
    for (k, &hs) in FUSED_ATTENTION_HEAD_SIZES.iter().enumerate() {
        // T = 130: three query tiles, the last one ragged; B·H = 4 blocks of each tile
        let shape = AttentionShape { batch: 2, seq: 130, n_head: 2, head_size: hs };
        let (rows, c) = (shape.batch * shape.seq, shape.n_head * hs);
        let (qkv, dy) = (random(rows * 3 * c, 40 + k as u64), random(rows * c, 50 + k as u64));
        // the CPU op on the tape in f64, with dy as the upstream gradient
        let mut tape = multitoken::autograd::Tape::new();
        let qkv_var = tape.leaf(Tensor::from_vec(&[rows, 3 * c], widen(&qkv)), true);
        let y_var = multitoken::ops::causal_self_attention(&mut tape, qkv_var, shape.seq, shape.n_head);
        let y_reference = tape.value(y_var).data().to_vec();
        let dy_tensor = Tensor::from_vec(&[rows, c], widen(&dy));
        let loss = multitoken::ops::weighted_sum(&mut tape, y_var, &dy_tensor);
        let dqkv_reference = tape.backward(loss).take(qkv_var).unwrap();
        let (qkv_gpu, dy_gpu) = (gpu.upload(&qkv).unwrap(), gpu.upload(&dy).unwrap());
        let (y_gpu, dqkv_gpu) = (gpu.zeros::<f32>(rows * c).unwrap(), gpu.zeros::<f32>(rows * 3 * c).unwrap());
        let heads_rows = shape.batch * shape.n_head * shape.seq;
        let (lse, dots) = (gpu.zeros::<f32>(heads_rows).unwrap(), gpu.zeros::<f32>(heads_rows).unwrap());
        gpu.fused_attention_forward(qkv_gpu.view(), y_gpu.view(), lse.view(), shape).unwrap();
        gpu.fused_attention_backward(qkv_gpu.view(), y_gpu.view(), dy_gpu.view(), lse.view(), dots.view(), dqkv_gpu.view(), shape).unwrap();
        let y = gpu.download(y_gpu.view()).unwrap();
        report(&format!("fused attention forward, hs = {hs}"), relative_error(&y, &y_reference), 1e-5);
        let dqkv = gpu.download(dqkv_gpu.view()).unwrap();
        // q, k, v columns separately, so that one cannot hide another's error
        for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let pick = |x: &[f32]| -> Vec<f32> { x.chunks(3 * c).flat_map(|row| row[part * c..(part + 1) * c].to_vec()).collect() };
            let reference: Vec<f64> = dqkv_reference.data().chunks(3 * c).flat_map(|row| row[part * c..(part + 1) * c].to_vec()).collect();
            report(&format!("fused attention backward {name}, hs = {hs}"), relative_error(&pick(&dqkv), &reference), 1e-5);
        }
    }
    for (hs, forward_registers, backward_registers, spilled) in gpu.fused_attention_resources().unwrap() {
        println!("fused attention hs = {hs}: {forward_registers} / {backward_registers} registers per thread, {spilled} bytes spilled");
    }
});

fn random_batch(config: &ModelConfig, rows: usize, seq: usize, rng: &mut Rng) -> Batch {
    let data: Vec<Vec<u32>> = (0..rows).map(|_| (0..seq + config.horizon).map(|_| rng.below(config.vocab_size) as u32).collect()).collect();
    let refs: Vec<&[u32]> = data.iter().map(Vec::as_slice).collect();
    Batch::from_rows(&refs, seq, config.horizon)
}

/// The GPU's loss and every parameter's gradient against the CPU tape in f64: this checks the
/// embedding, attention, MLP, LayerNorm, CP head and cross-entropy kernels composed.
#[allow(clippy::too_many_arguments)]
fn compare_gradients(
    gpu: Gpu,
    route: AttentionRoute,
    model: &str,
    vocab: usize,
    horizon: usize,
    rank: usize,
    batch_rows: usize,
    seq: usize,
) {
    let config = ModelConfig::preset(model, vocab, horizon, rank).unwrap();
    let mut rng = Rng::new(5);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    for tensor in params.values_mut() {
        if tensor.shape().len() == 1 {
            tensor.add_assign(&Tensor::randn(tensor.shape(), 0.1, &mut rng));
        }
    }
    let batch = random_batch(&config, batch_rows, seq, &mut rng);
    let aux_coef = 0.05;
    let params64 = params.map(&config, |_, t| t.cast::<f64>());
    let mut tape = multitoken::autograd::Tape::new();
    let vars = gpt2::params_on_tape(&mut tape, &config, &params64, |_| true);
    let out = model_loss(&mut tape, &config, &vars, &batch, aux_coef);
    let mut grads = tape.backward(out.objective);
    let mut gpu_model = GpuModel::new(gpu, &config, &params, None).unwrap();
    gpu_model.set_attention_route(route).unwrap();
    let stats = gpu_model.loss_and_gradients(&batch, aux_coef, true).unwrap();
    let label = format!("{model} n={horizon} r={rank} ({route:?} attention)");
    let loss_error = (stats.joint_loss - out.stats.joint_loss).abs() / out.stats.joint_loss.abs();
    report(&format!("{label} joint loss"), loss_error, 1e-5);
    for (s, (ours, reference)) in stats.head_losses.iter().zip(&out.stats.head_losses).enumerate() {
        report(&format!("{label} head loss {s}"), (ours - reference).abs() / reference.abs(), 1e-5);
    }
    for ((name, ours), (_, var)) in gpu_model.download_grads().unwrap().into_iter().zip(vars.named()) {
        let Some(reference) = grads.take(*var) else {
            // unused parameters (the gate when r = 1) get no gradient on the CPU, zeros here
            assert!(ours.data().iter().all(|&x| x == 0.0), "{name} has no gradient on the CPU but a nonzero one on the GPU");
            println!("{label} d {name}: unused, zero");
            continue;
        };
        report(&format!("{label} d {name}"), relative_error(ours.data(), reference.data()), 1e-4);
    }
}

cuda_test!(next_token_model_gradients_match_the_cpu_on_both_attention_routes, |gpu| {
    compare_gradients(gpu, AttentionRoute::Fused, "tiny", 97, 1, 1, 3, 37);
    compare_gradients(Gpu::new(0).unwrap(), AttentionRoute::Products, "tiny", 97, 1, 1, 3, 37);
});

cuda_test!(cp_head_model_gradients_match_the_cpu, |gpu| {
    compare_gradients(gpu, AttentionRoute::Fused, "tiny", 97, 3, 4, 3, 37);
});

cuda_test!(independent_heads_model_gradients_match_the_cpu, |gpu| {
    // T = 64: two causal chunks on the products route
    compare_gradients(gpu, AttentionRoute::Products, "tiny", 97, 2, 1, 2, 64);
    // T = 128 on `small` (head size 64): two tiles of the fused kernels
    compare_gradients(Gpu::new(0).unwrap(), AttentionRoute::Fused, "small", 61, 2, 1, 2, 128);
});

cuda_test!(fifty_training_steps_of_small_agree_with_the_cpu, |gpu| {
    // a corpus with structure, so that the loss falls: a noisy repeating pattern
    let config = ModelConfig::preset("small", 512, 4, 4).unwrap();
    let mut rng = Rng::new(9);
    let stream: Vec<u32> = (0..20_000).map(|i| if rng.uniform() < 0.2 { rng.below(512) as u32 } else { (i * 7 % 61) as u32 }).collect();
    let (rows, seq) = (8, 128);
    let mut params = gpt2::init_params::<f32>(&config, &mut Rng::new(1));
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &refs);
    let mut model = GpuModel::new(gpu, &config, &params, None).unwrap();
    let mut worst: f64 = 0.0;
    for step in 0..50 {
        let starts: Vec<usize> = (0..rows).map(|_| rng.below(stream.len() - seq - config.horizon)).collect();
        let row_refs: Vec<&[u32]> = starts.iter().map(|&s| &stream[s..s + seq + config.horizon]).collect();
        let batch = Batch::from_rows(&row_refs, seq, config.horizon);
        let step_config = StepConfig { lr: 1e-3, grad_clip: 1.0, aux_coef: 0.01 };
        let (cpu_loss, _) = train_step(&config, &mut params, &mut optimizer, &batch, step_config, &|_| true);
        let (gpu_loss, _) = model.train_step(&batch, step_config, &|_| true).unwrap();
        let error = (gpu_loss - cpu_loss).abs() / cpu_loss.abs();
        worst = worst.max(error);
        if step % 10 == 0 || step == 49 {
            println!("step {:>2}: cpu {cpu_loss:.6} cuda {gpu_loss:.6} relative difference {error:.2e}", step + 1);
        }
    }
    report("50 steps of small n=4 r=4, loss curves", worst, 1e-4);
});

/// A `tiny` model with n = 3, r = 4 and every parameter moved off its init.
fn noisy_tiny_model(vocab: usize) -> (ModelConfig, multitoken::model::ModelParams<Tensor<f32>>) {
    let config = ModelConfig::preset("tiny", vocab, 3, 4).unwrap();
    let mut rng = Rng::new(17);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    for tensor in params.values_mut() {
        tensor.add_assign(&Tensor::randn(tensor.shape(), 0.05, &mut rng));
    }
    (config, params)
}

cuda_test!(gpu_kv_cache_passes_match_the_cpu_cache, |gpu| {
    let (config, params) = noisy_tiny_model(97);
    let mut decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
    let mut cpu = CachedBackbone::new(&config, &params);
    let tokens: Vec<u32> = (0..40).map(|i| (i * 13 % 97) as u32).collect();
    // prefill, single tokens, runs of drafts, rollbacks and reruns, as decoding does; passes of
    // up to n = 3 tokens replay a graph captured at their first use, at the positions of later ones
    let passes = [
        (0..20, None),
        (20..21, None),
        (21..22, None),
        (22..25, Some(23)),
        (23..26, None),
        (26..29, Some(26)),
        (26..27, None),
        (27..31, None),
        (31..40, None),
    ];
    let mut worst: f64 = 0.0;
    let mut hidden = [vec![], vec![]];
    for (graphs, hidden) in [true, false].into_iter().zip(&mut hidden) {
        decoder.use_graphs(graphs);
        decoder.backbone().truncate(0);
        cpu.truncate(0);
        for (range, truncate_to) in passes.clone() {
            let ours = decoder.backbone().forward(&tokens[range.clone()]).unwrap();
            let reference: Vec<f64> = cpu.forward(&tokens[range]).iter().map(|&x| x as f64).collect();
            worst = worst.max(relative_error(&ours, &reference));
            hidden.extend(ours);
            if let Some(len) = truncate_to {
                decoder.backbone().truncate(len);
                cpu.truncate(len);
            }
        }
        // passes of 1 and 3 tokens
        assert_eq!(decoder.captured_passes(), if graphs { 2 } else { 0 });
    }
    report("KV-cache backbone passes, GPU against CPU", worst, 1e-5);
    assert!(hidden[0] == hidden[1], "replayed graphs and kernels launched one by one differ");
});

cuda_test!(gpu_head_products_match_the_cpu_head, |gpu| {
    let (config, params) = noisy_tiny_model(97);
    let hidden = Tensor::<f32>::randn(&[3, config.n_embd], 1.0, &mut Rng::new(4));
    let cpu_states = Head::new(&config, &params).states(hidden.data(), 3).unwrap();
    let decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
    let mut gpu_states = decoder.head_states(&params, hidden.data(), 3).unwrap();
    // three states ask for each horizon in turn (one product per horizon); one state alone asks
    // for its consecutive horizons (one product against the stacked expanders, as a draft does)
    gpu_states.extend(decoder.head_states(&params, &hidden.data()[..config.n_embd], 3).unwrap());
    let cpu_states = [&cpu_states[..], &cpu_states[..1]].concat();
    let mut worst: f64 = 0.0;
    assert_eq!(gpu_states.len(), 4);
    for (ours, reference) in gpu_states.iter().zip(&cpu_states) {
        for alpha in 0..config.rank {
            for s in 0..config.horizon {
                let reference: Vec<f64> = reference.prob(alpha, s).iter().map(|&x| x as f64).collect();
                worst = worst.max(relative_error(ours.prob(alpha, s), &reference));
            }
        }
    }
    report("head probabilities P[α,s], GPU against CPU", worst, 1e-5);
});

cuda_test!(speculative_greedy_decoding_on_the_gpu_equals_autoregressive, |gpu| {
    // train the tiny model on a near-deterministic stream first, so that greedy choices are clear
    let config = ModelConfig::preset("tiny", 97, 3, 4).unwrap();
    let mut rng = Rng::new(3);
    let stream: Vec<u32> = (0..20_000).map(|i| if rng.uniform() < 0.05 { rng.below(97) as u32 } else { (i * 7 % 61) as u32 }).collect();
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(1));
    let mut model = GpuModel::new(Gpu::new(0).unwrap(), &config, &params, None).unwrap();
    for _ in 0..300 {
        let starts: Vec<usize> = (0..8).map(|_| rng.below(stream.len() - 64 - 3)).collect();
        let rows: Vec<&[u32]> = starts.iter().map(|&s| &stream[s..s + 64 + 3]).collect();
        model.train_step(&Batch::from_rows(&rows, 64, 3), StepConfig { lr: 3e-3, grad_clip: 1.0, aux_coef: 0.01 }, &|_| true).unwrap();
    }
    let params = model.download_params().unwrap();
    let mut decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
    let sampling = SamplingConfig::greedy();
    let mut accepted = Vec::new();
    // short prompts, and long ones whose continuation crosses the end of the 128-token context
    for (prompt_len, new_tokens) in [(1, 40), (5, 60), (17, 50), (100, 60), (127, 20)] {
        let start = rng.below(stream.len() - prompt_len);
        let prompt = &stream[start..start + prompt_len];
        let mut run = |speculative: bool| {
            let request = DecodeRequest { prompt, max_new_tokens: new_tokens, sampling: &sampling, seed: 0, progress: &mut |_| {} };
            decoder.decode(&params, request, speculative).unwrap()
        };
        let (ar, spec) = (run(false), run(true));
        assert_eq!(ar.tokens, spec.tokens, "prompt of {prompt_len}: speculative output differs from autoregressive");
        accepted.push(spec.mean_accepted());
    }
    println!("greedy speculative == autoregressive on the GPU for 5 prompts; mean accepted per pass {accepted:.2?}");
});

cuda_test!(eval_of_a_token_stream_matches_the_cpu_across_windows, |gpu| {
    // 300 tokens through a 128-position model: three windows, the last one partly scored
    let (config, params) = noisy_tiny_model(97);
    let tokens: Vec<u32> = (0..300).map(|i| (i * 31 % 97) as u32).collect();
    let cpu = multitoken::train::evaluate::evaluate_tokens(&config, &params, &tokens);
    let ours = GpuModel::new(gpu, &config, &params, None).unwrap().evaluate_tokens(&tokens).unwrap();
    assert_eq!(ours.tokens, cpu.tokens);
    report("eval joint loss over windows, GPU against CPU", (ours.joint_loss - cpu.joint_loss).abs() / cpu.joint_loss, 1e-5);
    report("eval next-token loss over windows, GPU against CPU", (ours.ntp_loss - cpu.ntp_loss).abs() / cpu.ntp_loss, 1e-5);
});

cuda_test!(a_frozen_backbone_stays_put_while_the_head_trains, |gpu| {
    let (config, params) = noisy_tiny_model(97);
    let mut model = GpuModel::new(gpu, &config, &params, None).unwrap();
    let mut rng = Rng::new(8);
    let batch = random_batch(&config, 2, 32, &mut rng);
    let head_only = |name: &str| name.starts_with("mtp.");
    model.train_step(&batch, StepConfig { lr: 1e-2, grad_clip: 1.0, aux_coef: 0.01 }, &head_only).unwrap();
    let after = model.download_params().unwrap();
    for ((name, before), (_, now)) in params.named().into_iter().zip(after.named()) {
        let moved = before.max_abs_diff(now) > 0.0;
        assert_eq!(moved, head_only(&name), "{name}: moved = {moved}");
    }
    println!("head-only step on the GPU: the head moved, the backbone did not");
});
