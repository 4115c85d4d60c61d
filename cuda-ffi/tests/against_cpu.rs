//! Every CUDA op against a CPU reference on random inputs, with the worst relative error
//! printed. Without a CUDA driver, opening a device must give the typed error, and the
//! comparisons report themselves skipped.

use multitoken_cuda::{driver_present, CudaError, Gpu};

/// A deterministic pseudo-random vector in [-2, 2).
fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn relative_error(ours: &[f32], reference: &[f64]) -> f64 {
    let norm = reference.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
    ours.iter().zip(reference).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt() / norm
}

fn gpu_or_skip(name: &str) -> Option<Gpu> {
    if !driver_present() {
        println!("{name}: skipped (no CUDA driver on this machine)");
        return None;
    }
    Some(Gpu::new(0).expect("a driver is present, so device 0 opens"))
}

#[test]
fn without_a_driver_opening_a_device_is_a_typed_error_not_a_panic() {
    match Gpu::new(0) {
        Err(CudaError::NoDriver) => assert!(!driver_present()),
        Ok(_) => assert!(driver_present()),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[test]
fn cublas_matmul_matches_the_cpu_for_every_layout_in_f32_and_tf32() {
    let Some(mut gpu) = gpu_or_skip("matmul") else { return };
    let (m, k, n) = (129, 257, 67);
    for tf32 in [false, true] {
        gpu.tf32 = tf32;
        for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let (a, b) = (random(m * k, 1), random(k * n, 2));
            // logical A[i,p], B[p,j] from the stored layouts
            let at = |i: usize, p: usize| if a_t { a[p * m + i] } else { a[i * k + p] } as f64;
            let bt = |p: usize, j: usize| if b_t { b[j * k + p] } else { b[p * n + j] } as f64;
            let reference: Vec<f64> = (0..m * n).map(|idx| (0..k).map(|p| at(idx / n, p) * bt(p, idx % n)).sum()).collect();
            let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
            let mut dc = gpu.upload(&vec![f32::NAN; m * n]).unwrap(); // poisoned: every element must be written
            gpu.matmul(&da, a_t, &db, b_t, &mut dc, m, k, n).unwrap();
            let c = gpu.download(&dc).unwrap();
            let error = relative_error(&c, &reference);
            println!("matmul a_t={a_t} b_t={b_t} tf32={tf32}: relative error {error:.2e}");
            assert!(error < if tf32 { 1e-2 } else { 1e-5 }, "matmul a_t={a_t} b_t={b_t} tf32={tf32}: {error:e}");
        }
    }
}

#[test]
fn gelu_kernels_match_the_cpu() {
    let Some(gpu) = gpu_or_skip("gelu") else { return };
    let n = 100_003;
    let (x, dout, dx0) = (random(n, 3), random(n, 4), random(n, 5));
    let gelu = |v: f64| 0.5 * v * (1.0 + (0.7978845608028654 * (v + 0.044715 * v * v * v)).tanh());
    let derivative = |v: f64| {
        let t = (0.7978845608028654 * (v + 0.044715 * v * v * v)).tanh();
        0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v * v)
    };
    let dxv = gpu.upload(&x).unwrap();
    let mut out = gpu.upload(&vec![f32::NAN; n]).unwrap();
    gpu.gelu_forward(&dxv, &mut out).unwrap();
    let forward: Vec<f64> = x.iter().map(|&v| gelu(v as f64)).collect();
    let error = relative_error(&gpu.download(&out).unwrap(), &forward);
    println!("gelu forward: relative error {error:.2e}");
    assert!(error < 1e-5);
    let ddout = gpu.upload(&dout).unwrap();
    let mut ddx = gpu.upload(&dx0).unwrap();
    gpu.gelu_backward(&dxv, &ddout, &mut ddx).unwrap();
    let backward: Vec<f64> = (0..n).map(|i| dx0[i] as f64 + dout[i] as f64 * derivative(x[i] as f64)).collect();
    let error = relative_error(&gpu.download(&ddx).unwrap(), &backward);
    println!("gelu backward: relative error {error:.2e}");
    assert!(error < 1e-5);
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn layernorm_kernels_match_the_cpu_op() {
    use multitoken::kernels::layernorm::{backward_row_scalar, forward_row_scalar};
    let Some(gpu) = gpu_or_skip("layernorm") else { return };
    let (rows, c) = (333, 256);
    let (x, w, b, dout) = (random(rows * c, 6), random(c, 7), random(c, 8), random(rows * c, 9));
    // CPU reference in f64, row by row
    let (xw, ww, bw, gw) = (widen(&x), widen(&w), widen(&b), widen(&dout));
    let (mut out_ref, mut dx_ref, mut dw_ref, mut db_ref) = (vec![0.0; rows * c], vec![0.0; rows * c], vec![0.0; c], vec![0.0; c]);
    for row in 0..rows {
        let range = row * c..(row + 1) * c;
        let (mean, rstd) = forward_row_scalar(&xw[range.clone()], &ww, &bw, &mut out_ref[range.clone()]);
        backward_row_scalar(&xw[range.clone()], &gw[range.clone()], &ww, mean, rstd, &mut dx_ref[range], &mut dw_ref, &mut db_ref);
    }
    let (dx, dw, db) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&b).unwrap());
    let mut out = gpu.upload(&vec![f32::NAN; rows * c]).unwrap();
    let (mut mean, mut rstd) = (gpu.zeros(rows).unwrap(), gpu.zeros(rows).unwrap());
    gpu.layernorm_forward(&dx, &dw, &db, &mut out, &mut mean, &mut rstd, rows, c).unwrap();
    let error = relative_error(&gpu.download(&out).unwrap(), &out_ref);
    println!("layernorm forward: relative error {error:.2e}");
    assert!(error < 1e-5);
    let ddout = gpu.upload(&dout).unwrap();
    let mut ddx = gpu.upload(&vec![f32::NAN; rows * c]).unwrap();
    let (mut ddw, mut ddb) = (gpu.zeros(c).unwrap(), gpu.zeros(c).unwrap());
    gpu.layernorm_backward(&dx, &ddout, &dw, &mean, &rstd, &mut ddx, &mut ddw, &mut ddb, rows, c).unwrap();
    for (name, ours, reference) in [("dx", &ddx, &dx_ref), ("dweight", &ddw, &dw_ref), ("dbias", &ddb, &db_ref)] {
        let error = relative_error(&gpu.download(ours).unwrap(), reference);
        println!("layernorm backward {name}: relative error {error:.2e}");
        assert!(error < 1e-5, "{name}");
    }
}

#[test]
fn adamw_kernel_matches_the_cpu_optimizer() {
    use multitoken::kernels::adamw::{update_scalar, AdamWStep as CpuStep};
    let Some(gpu) = gpu_or_skip("adamw") else { return };
    let n = 50_001;
    let (p, g, m) = (random(n, 10), random(n, 11), random(n, 12));
    let v: Vec<f32> = random(n, 13).iter().map(|x| x * x).collect();
    let step = multitoken_cuda::AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7 };
    let cpu_step = CpuStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, t: 7 };
    let (mut pr, mut mr, mut vr) = (widen(&p), widen(&m), widen(&v));
    update_scalar(&mut pr, &widen(&g), &mut mr, &mut vr, &cpu_step);
    let (mut dp, dg, mut dm, mut dv) = (gpu.upload(&p).unwrap(), gpu.upload(&g).unwrap(), gpu.upload(&m).unwrap(), gpu.upload(&v).unwrap());
    gpu.adamw_update(&mut dp, &dg, &mut dm, &mut dv, step).unwrap();
    for (name, ours, reference) in [("param", &dp, &pr), ("exp_avg", &dm, &mr), ("exp_avg_sq", &dv, &vr)] {
        let error = relative_error(&gpu.download(ours).unwrap(), reference);
        println!("adamw {name}: relative error {error:.2e}");
        assert!(error < 1e-5, "{name}");
    }
}
