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
