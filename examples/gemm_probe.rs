//! Times single matrix products of the model's shapes through each cuBLAS entry point, in
//! TFLOP/s, to choose `GemmRoute` (docs/results.md, "CUDA"); then decoding's linear layers (a
//! few rows), as the host's time to issue a call and the device's time per call. Needs a GPU.
//! `cargo run --release --example gemm_probe [-- --decoding]` (only the decoding part)
fn main() -> Result<(), Box<dyn std::error::Error>> {
    use multitoken_cuda::{Epilogue, GemmRoute, Gpu, Operand, ProductPrecision};
    let only_decoding = std::env::args().any(|a| a == "--decoding");
    let mut gpu = Gpu::new(0)?;
    println!("{}", gpu.name());
    // (m, k, n, a transposed, b transposed): base at B·T = 8192 — c_attn, c_proj, c_fc, mlp c_proj
    // forward; their weight and input gradients; the head's logits and backward products
    let shapes = [
        (8192, 768, 2304, false, false),
        (8192, 768, 768, false, false),
        (8192, 768, 3072, false, false),
        (8192, 3072, 768, false, false),
        (768, 8192, 2304, true, false),
        (8192, 2304, 768, false, true),
        (16384, 768, 8192, false, true),
        (16384, 8192, 768, false, false),
        (8192, 16384, 768, true, false),
    ];
    // bf16 includes rounding both inputs into bf16 copies, as training does it
    for precision in [ProductPrecision::F32, ProductPrecision::Tf32, ProductPrecision::Bf16] {
        gpu.precision = precision;
        for &(m, k, n, a_t, b_t) in shapes.iter().filter(|_| !only_decoding) {
            // random operands: the time of a GEMM on zeros is not the time on data
            let mut rng = multitoken::tensor::Rng::new(1);
            let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.uniform() as f32 - 0.5).collect() };
            let (a, b, c) = (gpu.upload(&random(m * k))?, gpu.upload(&random(k * n))?, gpu.upload(&random(m * n))?);
            let operand = |view, t: bool| if t { Operand::transposed(view) } else { Operand::normal(view) };
            let mut line = format!("{:<4} {m:>5}×{k:>5}·{k:>5}×{n:>5} a_t={a_t:<5} b_t={b_t:<5}", format!("{precision:?}"));
            for route in [GemmRoute::Blas, GemmRoute::BlasLt] {
                gpu.gemm_route = route;
                let run = || gpu.matmul(operand(a.view(), a_t), operand(b.view(), b_t), c.view(), m, k, n, true);
                run()?;
                gpu.synchronize()?;
                let repeats = 20;
                let start = std::time::Instant::now();
                for _ in 0..repeats {
                    run()?;
                }
                gpu.synchronize()?;
                let seconds = start.elapsed().as_secs_f64() / repeats as f64;
                line += &format!(" | {route:?} {:6.1} TFLOP/s", 2.0 * (m * k * n) as f64 / seconds / 1e12);
            }
            println!("{line}");
        }
    }
    gpu.precision = ProductPrecision::F32;
    // decoding: `base`'s four linear layers on 1 and 4 rows, and a kernel on 256 elements
    let mut rng = multitoken::tensor::Rng::new(2);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.uniform() as f32 - 0.5).collect() };
    let repeats = 500;
    let time = |gpu: &Gpu, run: &dyn Fn() -> Result<(), multitoken_cuda::CudaError>| -> Result<(f64, f64), Box<dyn std::error::Error>> {
        run()?;
        gpu.synchronize()?;
        let start = std::time::Instant::now();
        for _ in 0..repeats {
            run()?;
        }
        let issued = start.elapsed().as_secs_f64();
        gpu.synchronize()?;
        Ok((issued * 1e6 / repeats as f64, start.elapsed().as_secs_f64() * 1e6 / repeats as f64))
    };
    if !only_decoding {
        // what bf16 adds to a product: rounding an input of B·T·C = 8192 × 768 elements
        let x = gpu.upload(&vec![0.5f32; 8192 * 768])?;
        let copy = gpu.alloc::<u16>(x.len())?;
        let (_, micros) = time(&gpu, &|| gpu.round_to_bf16(x.view(), copy.view()))?;
        println!("round_to_bf16 of 8192×768: {micros:.1} µs, {:.0} GB/s (6 bytes an element)", 6.0 * x.len() as f64 / micros / 1e3);
    }
    let kernels = ["linear_few_rows for 4 rows", "linear_few_rows for 8 rows", "linear_column_tiles"];
    let kernels = kernels.iter().map(|k| format!("{k}, f32 weights")).chain(kernels.iter().map(|k| format!("{k}, bf16 weights")));
    for ((registers, spilled, blocks), kernel) in gpu.few_row_linear_resources()?.into_iter().zip(kernels) {
        println!("decoding: {kernel}: {registers} registers, {spilled} bytes spilled, {blocks} blocks per SM");
    }
    let (small_in, small_out) = (gpu.upload(&random(256))?, gpu.upload(&random(256))?);
    let (issue, done) = time(&gpu, &|| gpu.gelu_forward(small_in.view(), small_out.view()))?;
    println!("decoding: a kernel on 256 elements: issued in {issue:.1} µs, done every {done:.1} µs");
    // each product walks `copies` weights in turn, 16 of them holding more than the L2 cache,
    // as a pass over 12 layers does; with one copy the weight stays in L2. cuBLASLt reads the
    // weight as trained, (n_in, n_out); the few-row kernel a copy by output column (random
    // either way: only the time is read)
    for copies in [1, 16] {
        for rows in [1, 4] {
            for (n_in, n_out) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
                let weights = (0..copies).map(|_| gpu.upload(&random(n_in * n_out))).collect::<Result<Vec<_>, _>>()?;
                let (x, b, out) = (gpu.upload(&random(rows * n_in))?, gpu.upload(&random(n_out))?, gpu.upload(&random(rows * n_out))?);
                let next = std::cell::Cell::new(0);
                let mut line = format!("decoding: linear {rows}×{n_in}·{n_in}×{n_out}, {copies:2} weight copies");
                let (issue, done) = time(&gpu, &|| {
                    next.set((next.get() + 1) % copies);
                    gpu.linear(x.view(), weights[next.get()].view(), b.view(), out.view())
                })?;
                let bandwidth = (4 * n_in * n_out) as f64 / (done * 1e-6) / 1e12;
                line += &format!(" | cuBLASLt: issued {issue:4.1} µs, done {done:5.1} µs ({bandwidth:.2} TB/s)");
                let (issue, done) = time(&gpu, &|| {
                    next.set((next.get() + 1) % copies);
                    gpu.linear_few_rows(x.view(), None, weights[next.get()].view(), Some(b.view()), Epilogue::Bias, out.view()).map(|_| ())
                })?;
                let bandwidth = (4 * n_in * n_out) as f64 / (done * 1e-6) / 1e12;
                line += &format!(" | few rows: issued {issue:4.1} µs, done {done:5.1} µs ({bandwidth:.2} TB/s)");
                if n_in == 768 {
                    // with the LayerNorm before it and the GELU after it, as decoding runs c_fc
                    let (gain, shift) = (gpu.upload(&random(n_in))?, gpu.upload(&random(n_in))?);
                    let (issue, done) = time(&gpu, &|| {
                        next.set((next.get() + 1) % copies);
                        let layernorm = Some((gain.view(), shift.view()));
                        gpu.linear_few_rows(x.view(), layernorm, weights[next.get()].view(), Some(b.view()), Epilogue::Gelu, out.view())
                            .map(|_| ())
                    })?;
                    line += &format!(" | LayerNorm + few rows + GELU: issued {issue:4.1} µs, done {done:5.1} µs");
                }
                println!("{line}");
            }
        }
    }
    // the head at decoding: `base` n = 4, r = 4, V = 8192; a request's r expanded rows against
    // wte (V, C), as a product with wte transposed, and through the few-row and column-tile
    // kernels (which read wte as it is, by output column)
    let (c, v) = (768, 8192);
    let wte = gpu.upload(&random(v * c))?;
    let expanders = gpu.upload(&random(4 * c * c))?;
    for rows in [4, 8, 12, 16] {
        let (z, logits) = (gpu.upload(&random(rows * c))?, gpu.upload(&random(rows * v))?);
        let (issue, done) =
            time(&gpu, &|| gpu.matmul(Operand::normal(z.view()), Operand::transposed(wte.view()), logits.view(), rows, c, v, false))?;
        let mut line = format!("decoding: head logits {rows}×{c}·{c}×{v} | matmul on wteᵀ: issued {issue:4.1} µs, done {done:5.1} µs");
        let (issue, done) = time(&gpu, &|| gpu.softmax_rows(logits.view(), v))?;
        line += &format!(" | softmax: issued {issue:4.1} µs, done {done:5.1} µs");
        if rows <= 8 {
            let (issue, done) =
                time(&gpu, &|| gpu.linear_few_rows(z.view(), None, wte.view(), None, Epilogue::Bias, logits.view()).map(|_| ()))?;
            line += &format!(" | few rows: issued {issue:4.1} µs, done {done:5.1} µs");
        }
        let (issue, done) = time(&gpu, &|| gpu.linear_column_tiles(z.view(), wte.view(), logits.view()).map(|_| ()))?;
        line += &format!(" | column tiles: issued {issue:4.1} µs, done {done:5.1} µs");
        println!("{line}");
    }
    let (h, z) = (gpu.upload(&random(c))?, gpu.upload(&random(4 * c))?);
    let (issue, done) =
        time(&gpu, &|| gpu.matmul(Operand::normal(h.view()), Operand::transposed(expanders.view()), z.view(), 1, c, 4 * c, false))?;
    println!("decoding: head expander 1×{c}·{c}×{} (r horizons' W[α,s]) | matmul: issued {issue:4.1} µs, done {done:5.1} µs", 4 * c);
    Ok(())
}
