//! The GPU against the CPU. Every test here is written with `cuda_test!`: on a machine with a
//! CUDA driver it runs on the GPU; elsewhere it prints "skipped" and passes, so CI (no GPU) builds
//! and runs this file without a device.
//!
//! - Each op of `ops/` on the GPU (f32) against the same op on the CPU in f64: its output and
//!   the gradient of every input, the upstream gradient a fixed random tensor (`compare_op!`).
//! - The launchers the ops do not cover on their own (matrix products on every route, decoding's
//!   few-row kernels), and the reductions, which must give the same bits on every run.
//! - The whole model: every parameter's gradient against the CPU tape in f64, 50 training steps
//!   against the CPU's loss curve, two runs of the same steps to the bit, the memory pool asking
//!   the driver for nothing after the first step, evaluation, a frozen backbone, and decoding.

mod common;

use multitoken::autograd::{Tape, Var};
use multitoken::data::Batch;
use multitoken::decode::cuda::GpuDecoder;
use multitoken::decode::head::Head;
use multitoken::decode::kv_cache::CachedBackbone;
use multitoken::decode::pass::Backbone;
use multitoken::decode::{DecodeRequest, Draft, SamplingConfig};
use multitoken::device::Precision;
use multitoken::error::Result;
use multitoken::model::{gpt2, loss::model_loss, ModelConfig, ModelParams};
use multitoken::ops;
use multitoken::tensor::{Device, Float, Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{params_to_device, train_step, StepConfig};
use multitoken_cuda::{
    driver_present, AttentionRoute, CudaError, GemmRoute, Gpu, HeadShape, Operand, ProductPrecision, QkvRows, View,
    FUSED_ATTENTION_HEAD_SIZES,
};

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

/// Each float's bits: for comparing two results bit for bit.
fn bits(values: Vec<f32>) -> Vec<u32> {
    values.into_iter().map(f32::to_bits).collect()
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

/// A device for tensors on `gpu`, with its attention route fixed (`None`: by precision).
fn device_with(mut gpu: Gpu, route: Option<AttentionRoute>) -> Device {
    gpu.attention_route = route;
    Device::cuda(gpu)
}

/// Runs `op` over `inputs` (leaves that need gradients) on `device`; returns its output and the
/// gradient of every input, on the host in f64, for the upstream gradient `weights` of the
/// output's shape (drawn from `seed` when None).
fn run_op<T: Float>(
    device: &Device,
    inputs: &[Tensor<f64>],
    op: impl Fn(&mut Tape<T>, &[Var]) -> Result<Var>,
) -> (Tensor<f64>, Vec<Option<Tensor<f64>>>) {
    let mut tape = Tape::new();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.leaf(t.cast::<T>().to_device(device).unwrap(), true)).collect();
    let out = op(&mut tape, &vars).unwrap();
    let value = tape.value(out).to_host().unwrap().cast::<f64>();
    let weights = Tensor::<f64>::randn(value.shape(), 1.0, &mut Rng::new(99)).cast::<T>();
    let loss = ops::weighted_sum(&mut tape, out, &weights).unwrap();
    let mut grads = tape.backward(loss).unwrap();
    let grads = vars.iter().map(|&v| grads.take(v).map(|g| g.to_host().unwrap().cast::<f64>())).collect();
    (value, grads)
}

/// The op on the GPU in f32 against the op on the CPU in f64: output and every input's gradient
/// within `tolerance` (relative, over the whole tensor). The op is written once and run at both
/// element types.
macro_rules! compare_op {
    ($device:expr, $name:expr, $inputs:expr, $tolerance:expr, |$tape:ident, $v:ident| $body:expr) => {
        compare_op!($device, $name, $inputs, $tolerance, gradients: |_| $tolerance, |$tape, $v| $body)
    };
    // `gradients`: input i's gradient's tolerance, where one differs from the forward's
    ($device:expr, $name:expr, $inputs:expr, $tolerance:expr, gradients: $gradient_tolerance:expr, |$tape:ident, $v:ident| $body:expr) => {{
        let inputs: Vec<Tensor<f64>> = $inputs;
        let gradient_tolerance: &dyn Fn(usize) -> f64 = &$gradient_tolerance;
        let (reference, reference_grads) = run_op::<f64>(&Device::Cpu, &inputs, |$tape, $v| $body);
        let (ours, our_grads) = run_op::<f32>($device, &inputs, |$tape, $v| $body);
        let as_f32 = |t: &Tensor<f64>| t.cast::<f32>();
        report(&format!("{} forward", $name), relative_error(as_f32(&ours).data(), reference.data()), $tolerance);
        for (i, (ours, reference)) in our_grads.iter().zip(&reference_grads).enumerate() {
            match (ours, reference) {
                (Some(ours), Some(reference)) => {
                    report(&format!("{} d input {i}", $name), relative_error(as_f32(ours).data(), reference.data()), gradient_tolerance(i))
                }
                (None, None) => {}
                _ => panic!("{}: input {i} has a gradient on one device only", $name),
            }
        }
    }};
}

#[test]
fn without_a_driver_opening_a_device_is_a_typed_error_not_a_panic() {
    match Gpu::new(0) {
        Err(CudaError::NoDriver) => assert!(!driver_present()),
        Ok(_) => assert!(driver_present()),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

// ---- each op on the GPU against the CPU in f64 ----

cuda_test!(elementwise_ops_match_the_cpu, |gpu| {
    let device = Device::cuda(gpu);
    let mut rng = Rng::new(1);
    let mut randn = |shape: &[usize], std: f64| Tensor::<f64>::randn(shape, std, &mut rng);
    compare_op!(&device, "gelu", vec![randn(&[37, 100], 2.0)], 1e-6, |tape, v| ops::gelu(tape, v[0]));
    compare_op!(&device, "gelu, a ragged last four", vec![randn(&[37, 101], 2.0)], 1e-6, |tape, v| ops::gelu(tape, v[0]));
    compare_op!(&device, "add", vec![randn(&[37, 10], 1.0), randn(&[37, 10], 1.0)], 1e-6, |tape, v| ops::add(tape, v[0], v[1]));
    compare_op!(&device, "add to itself", vec![randn(&[5, 10], 1.0)], 1e-6, |tape, v| ops::add(tape, v[0], v[0]));
});

cuda_test!(elementwise_kernels_give_the_same_bits_on_views_off_16_bytes, |gpu| {
    // four elements a thread as float4s on 16 bytes; a view one float in takes them singly
    let n = 1001;
    let host = |seed: f32| (0..n).map(|i| (i as f32 * seed).sin() * 3.0).collect::<Vec<f32>>();
    let (x, dout) = (gpu.upload(&host(0.37)).unwrap(), gpu.upload(&host(0.11)).unwrap());
    let (on_16, off_16) = (gpu.alloc::<f32>(n).unwrap(), gpu.alloc::<f32>(n + 1).unwrap());
    let shifted = off_16.view().slice(1, n);
    let run = |what: &str, out: View<f32>| match what {
        "gelu" => gpu.gelu_forward(x.view(), out),
        "gelu backward" => gpu.gelu_backward(x.view(), dout.view(), out),
        "add" => gpu.add(x.view(), dout.view(), out),
        _ => gpu.scale(x.view(), 0.3, out),
    };
    for what in ["gelu", "gelu backward", "add", "scale"] {
        run(what, on_16.view()).unwrap();
        run(what, shifted).unwrap();
        assert_eq!(bits(gpu.download(on_16.view()).unwrap()), bits(gpu.download(shifted).unwrap()), "{what}: the two paths differ");
    }
});

cuda_test!(layernorm_and_attention_write_their_outputs_rounding_and_writing_a_tensor_in_place_drops_it, |gpu| {
    // LayerNorm on a few rows (a block a row) and on many (a warp a row)
    let c = 100;
    let (gain, shift) = (gpu.upload(&random(c, 51)).unwrap(), gpu.upload(&random(c, 52)).unwrap());
    for rows in [3, 300] {
        let x = gpu.upload(&random(rows * c, 53)).unwrap();
        let (out, rounded) = (gpu.alloc::<f32>(rows * c).unwrap(), gpu.alloc::<u16>(rows * c).unwrap());
        let (mean, rstd) = (gpu.alloc::<f32>(rows).unwrap(), gpu.alloc::<f32>(rows).unwrap());
        gpu.layernorm_forward_rounding(x.view(), gain.view(), shift.view(), out.view(), Some(rounded.view()), mean.view(), rstd.view())
            .unwrap();
        let expected = gpu.download(gpu.bf16_copy(out.view()).unwrap().view()).unwrap();
        assert_eq!(gpu.download(rounded.view()).unwrap(), expected, "layernorm on {rows} rows");
    }
    // the tensor-core attention, every head size, T = 130 (a ragged last tile)
    gpu.precision = ProductPrecision::Bf16;
    for hs in FUSED_ATTENTION_HEAD_SIZES {
        let shape = multitoken_cuda::AttentionShape { batch: 2, seq: 130, n_head: 2, head_size: hs };
        let qkv = gpu.upload(&random(2 * 130 * 3 * 2 * hs, 54)).unwrap();
        let qkv = gpu.bf16_copy(qkv.view()).unwrap();
        let (y, y_rounded) = (gpu.alloc::<f32>(2 * 130 * 2 * hs).unwrap(), gpu.alloc::<u16>(2 * 130 * 2 * hs).unwrap());
        let lse = gpu.alloc::<f32>(4 * 130).unwrap();
        gpu.fused_attention_forward(QkvRows::Bf16(qkv.view()), y.view(), Some(y_rounded.view()), lse.view(), shape).unwrap();
        let expected = gpu.download(gpu.bf16_copy(y.view()).unwrap().view()).unwrap();
        assert_eq!(gpu.download(y_rounded.view()).unwrap(), expected, "attention, head size {hs}");
    }
    // a tensor carries its rounding into its views of rows, and loses it when written in place
    let device = Device::cuda(gpu);
    let gpu = device.gpu().unwrap().clone();
    let values = random(6 * 4, 55);
    let rounding = gpu.bf16_copy(gpu.upload(&values).unwrap().view()).unwrap();
    let expected = gpu.download(rounding.view()).unwrap();
    let with_rounding = || {
        let rounding = gpu.bf16_copy(gpu.upload(&values).unwrap().view()).unwrap();
        Tensor::<f32>::from_cuda_with_rounding(&gpu, gpu.upload(&values).unwrap(), Some(rounding), &[6, 4])
    };
    let ones = Tensor::from_vec(&[6, 4], vec![1.0; 24]).to_device(&device).unwrap();
    let mut tensor = with_rounding();
    let rows = tensor.rows(2, 3);
    let rows_rounded = rows.cuda().unwrap().rounded().expect("a view of rows keeps the rounding");
    assert_eq!(gpu.download(rows_rounded.view()).unwrap(), expected[8..20].to_vec());
    drop((rows, rows_rounded));
    // shared elements: the sum goes to a copy, and the other tensor keeps them and their rounding
    let shared = tensor.clone();
    tensor.add_assign(&ones).unwrap();
    assert!(tensor.cuda().unwrap().rounded().is_none(), "a sum into a copy kept the old rounding");
    assert!(shared.cuda().unwrap().rounded().is_some(), "the tensor that shares the elements lost their rounding");
    // its own elements: the sum is written in place, and the rounding goes
    let mut alone = shared;
    alone.add_assign(&ones).unwrap();
    assert!(alone.cuda().unwrap().rounded().is_none(), "a sum written in place kept the old rounding");
    let mut alone = with_rounding();
    alone.cuda_mut().unwrap();
    assert!(alone.cuda().unwrap().rounded().is_none(), "a tensor handed out for writing kept its rounding");
});

cuda_test!(gelu_keeping_bf16_gives_the_bits_of_gelu_and_of_rounding_and_its_backward_those_of_the_rounded_x, |gpu| {
    // on 16 bytes (four elements a thread, the copy as 8-byte pairs of pairs) and one float in
    // (one element at a time); 1001 elements, a ragged last four
    let n = 1001;
    let host = |seed: f32| (0..n + 1).map(|i| (i as f32 * seed).sin() * 3.0).collect::<Vec<f32>>();
    let (x_all, dout_all) = (gpu.upload(&host(0.37)).unwrap(), gpu.upload(&host(0.11)).unwrap());
    for first in [0, 1] {
        let (x, dout) = (x_all.view().slice(first, n), dout_all.view().slice(first, n));
        let (out, plain_out) = (gpu.alloc::<f32>(n).unwrap(), gpu.alloc::<f32>(n).unwrap());
        let (rounded, out_rounded) = (gpu.alloc::<u16>(n + 1).unwrap(), gpu.alloc::<u16>(n + 1).unwrap());
        let (rounded, out_rounded) = (rounded.view().slice(first, n), out_rounded.view().slice(first, n));
        gpu.gelu_forward_keeping_bf16(x, out.view(), rounded, out_rounded).unwrap();
        gpu.gelu_forward(x, plain_out.view()).unwrap();
        assert_eq!(bits(gpu.download(out.view()).unwrap()), bits(gpu.download(plain_out.view()).unwrap()), "from element {first}");
        let rounded_bits = gpu.download(rounded).unwrap();
        assert_eq!(rounded_bits, gpu.download(gpu.bf16_copy(x).unwrap().view()).unwrap(), "from element {first}");
        assert_eq!(
            gpu.download(out_rounded).unwrap(),
            gpu.download(gpu.bf16_copy(out.view()).unwrap().view()).unwrap(),
            "from element {first}"
        );
        // the backward from the rounding is the f32 backward at the rounded values
        let widened: Vec<f32> = rounded_bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let x_widened = gpu.upload(&widened).unwrap();
        let (dx, plain_dx) = (gpu.alloc::<f32>(n).unwrap(), gpu.alloc::<f32>(n).unwrap());
        gpu.gelu_backward_from_bf16(rounded, dout, dx.view()).unwrap();
        gpu.gelu_backward(x_widened.view(), dout, plain_dx.view()).unwrap();
        assert_eq!(bits(gpu.download(dx.view()).unwrap()), bits(gpu.download(plain_dx.view()).unwrap()), "from element {first}");
    }
});

cuda_test!(column_sums_with_a_bf16_copy_give_the_bits_of_each_alone, |gpu| {
    // 600 rows of 70: three chunks of rows, the last ragged, and a ragged block of columns
    let x = gpu.upload(&random(600 * 70, 5)).unwrap();
    let (alone, together) = (gpu.alloc::<f32>(70).unwrap(), gpu.alloc::<f32>(70).unwrap());
    gpu.column_sums(x.view(), alone.view(), false).unwrap();
    let copy = gpu.column_sums_and_bf16_copy(x.view(), together.view()).unwrap();
    assert_eq!(bits(gpu.download(alone.view()).unwrap()), bits(gpu.download(together.view()).unwrap()));
    assert_eq!(gpu.download(copy.view()).unwrap(), gpu.download(gpu.bf16_copy(x.view()).unwrap().view()).unwrap());
});

cuda_test!(the_head_on_bf16_logits_gives_what_it_gives_on_f32_logits_of_their_values_its_gradient_rounded, |gpu| {
    // in bf16 training the product writes the head's logits rounded: head_position on them must
    // give the log-likelihoods and posterior it gives on f32 logits holding the same values, bit
    // for bit, and write over the logits the rounding of the f32 kernel's dℓ
    // rows in runs of 8 (V = 1000) and one by one (1003); r·n = 6, and 1 (a row shared by warps)
    for (positions, n, r, v) in [(5, 3, 2, 1000), (5, 3, 2, 1003), (4, 1, 1, 1000)] {
        let shape = HeadShape { horizon: n, rank: r };
        let (rounded, values) = bf16_copy(&random(positions * r * n * v, 41));
        let targets: Vec<u32> = (0..positions * n).map(|i| (i * 37 % v) as u32).collect();
        let (targets, log_w) = (gpu.upload(&targets).unwrap(), gpu.upload(&random(positions * r, 42)).unwrap());
        let (in_f32, in_bf16) = (gpu.upload(&values).unwrap(), gpu.upload(&rounded).unwrap());
        let outputs = || (gpu.alloc::<f32>(positions * r * n).unwrap(), gpu.alloc::<f32>(positions * r).unwrap());
        let ((log_p, posterior), (log_p_bf16, posterior_bf16)) = (outputs(), outputs());
        gpu.head_position(in_f32.view(), targets.view(), log_w.view(), log_p.view(), posterior.view(), v, shape, 0.2, true).unwrap();
        let (view, targets) = (in_bf16.view(), targets.view());
        gpu.head_position(view, targets, log_w.view(), log_p_bf16.view(), posterior_bf16.view(), v, shape, 0.2, true).unwrap();
        for (f32_kernel, bf16_kernel) in [(&log_p, &log_p_bf16), (&posterior, &posterior_bf16)] {
            assert_eq!(bits(gpu.download(f32_kernel.view()).unwrap()), bits(gpu.download(bf16_kernel.view()).unwrap()));
        }
        let expected = gpu.bf16_copy(in_f32.view()).unwrap();
        assert_eq!(gpu.download(in_bf16.view()).unwrap(), gpu.download(expected.view()).unwrap());
    }
});

cuda_test!(a_product_written_in_bf16_is_the_rounding_of_the_product, |gpu| {
    // the head's logits in bf16 training: (rows, c) · wteᵀ written in bf16 by cuBLASLt, against
    // the same bf16 product written in f32; and refused outside bf16
    drop(gpu);
    let mut gpu = Gpu::new(0).unwrap();
    let (x, wte) = (gpu.upload(&random(70 * 48, 43)).unwrap(), gpu.upload(&random(500 * 48, 44)).unwrap());
    let out = gpu.alloc::<u16>(70 * 500).unwrap();
    let (a, b) = (multitoken_cuda::Operand::normal(x.view()), multitoken_cuda::Operand::transposed(wte.view()));
    assert!(gpu.matmul_into_bf16(a, b, out.view(), 70, 48, 500).is_err(), "an f32 device writes no bf16 product");
    gpu.precision = ProductPrecision::Bf16;
    let in_f32 = gpu.alloc::<f32>(70 * 500).unwrap();
    gpu.matmul(a, b, in_f32.view(), 70, 48, 500, false).unwrap();
    gpu.matmul_into_bf16(a, b, out.view(), 70, 48, 500).unwrap();
    let (written, exact) = (gpu.download(out.view()).unwrap(), gpu.download(in_f32.view()).unwrap());
    // each within the rounding's half unit in the last place (at most 2⁻⁸ of its value) of its
    // f32 value, and nearly all (those whose f32 sums agree) exactly its rounding to nearest
    let worst = written
        .iter()
        .zip(&exact)
        .map(|(&bits, &exact)| (half::bf16::from_bits(bits).to_f32() as f64 - exact as f64).abs() - 2f64.powi(-8) * (exact as f64).abs())
        .fold(f64::MIN, f64::max);
    let rounded_alike = written.iter().zip(&exact).filter(|(&bits, &exact)| half::bf16::from_f32(exact).to_bits() == bits).count();
    assert!(worst <= 1e-4, "a bf16 product written {worst:e} past its rounding from its f32 value");
    assert!(rounded_alike * 100 >= written.len() * 99, "{rounded_alike} of {} the nearest bf16 of the f32 product", written.len());
    println!(
        "a product written in bf16: {rounded_alike} of {} the nearest bf16 of the f32 product, none further than its rounding",
        written.len()
    );
});

cuda_test!(linear_layers_match_the_cpu, |gpu| {
    let device = Device::cuda(gpu);
    let mut rng = Rng::new(2);
    let mut randn = |shape: &[usize]| Tensor::<f64>::randn(shape, 1.0, &mut rng);
    // 333 rows: products on cuBLASLt; 5 rows: the few-row kernel
    for rows in [333, 5] {
        let (x, w, b, r) = (randn(&[rows, 96]), randn(&[96, 80]), randn(&[80]), randn(&[rows, 80]));
        compare_op!(&device, format!("linear, {rows} rows"), vec![x.clone(), w.clone(), b.clone()], 1e-5, |tape, v| ops::linear(
            tape,
            v[0],
            v[1],
            Some(v[2])
        ));
        compare_op!(&device, format!("linear without bias, {rows} rows"), vec![x.clone(), w.clone()], 1e-5, |tape, v| ops::linear(
            tape, v[0], v[1], None
        ));
        compare_op!(&device, format!("linear on a residual, {rows} rows"), vec![x, w, b, r], 1e-5, |tape, v| ops::linear_residual(
            tape, v[0], v[1], v[2], v[3]
        ));
    }
});

cuda_test!(layernorm_matches_the_cpu, |gpu| {
    let device = Device::cuda(gpu);
    let mut rng = Rng::new(3);
    // forward: more than 64 rows a warp per row, else a block per row; backward: partial sums
    // over blocks of 32 rows, in one pass with a row in registers where c is a multiple of 4 of at
    // most 1024 (whole and ragged lanes: 256, 100, 1000), else in two (770, 1028)
    for (rows, c) in [(333, 256), (8, 256), (333, 100), (70, 1000), (70, 770), (40, 1028)] {
        let (x, w, b) = (Tensor::randn(&[rows, c], 1.5, &mut rng), Tensor::randn(&[c], 1.0, &mut rng), Tensor::randn(&[c], 1.0, &mut rng));
        let label = format!("layernorm, {rows} rows of {c}");
        compare_op!(&device, label, vec![x, w, b], 1e-5, |tape, v| ops::layernorm(tape, v[0], v[1], v[2]));
    }
});

cuda_test!(embedding_and_unembedding_match_the_cpu, |gpu| {
    let device = Device::cuda(gpu);
    let mut rng = Rng::new(4);
    let (wte, wpe) = (Tensor::<f64>::randn(&[50, 32], 1.0, &mut rng), Tensor::<f64>::randn(&[20, 32], 1.0, &mut rng));
    // repeated tokens, so that rows of dwte gather several rows of the gradient
    let tokens: Vec<u32> = (0..3 * 16).map(|i| (i * 7 % 13) as u32).collect();
    compare_op!(&device, "embedding", vec![wte.clone(), wpe], 1e-6, |tape, v| ops::embedding(tape, v[0], v[1], &tokens, 16, 2));
    let h = Tensor::<f64>::randn(&[48, 32], 1.0, &mut rng);
    compare_op!(&device, "unembed", vec![h, wte], 1e-5, |tape, v| ops::unembed(tape, v[0], v[1]));
});

cuda_test!(cross_entropy_matches_the_cpu, |gpu| {
    // rows read one by one (70) and in runs of 8 (72, and 1000: several runs a lane)
    let device = Device::cuda(gpu);
    for v in [70, 72, 1000] {
        let logits = Tensor::<f64>::randn(&[33, v], 2.0, &mut Rng::new(5));
        let targets: Vec<u32> = (0..33).map(|i| (i * 11 % v) as u32).collect();
        compare_op!(&device, format!("cross_entropy, V = {v}"), vec![logits], 1e-5, |tape, vars| ops::cross_entropy(
            tape, vars[0], &targets
        ));
    }
});

/// Attention on `device` in f32 against the CPU in f64: y, and the gradients of q, k and v each
/// on its own, so that one cannot hide another's error (dq is the part the fused backward adds
/// up across key tiles).
fn compare_attention(device: &Device, label: &str, qkv: Tensor<f64>, seq: usize, n_head: usize) {
    compare_attention_within(device, label, qkv, seq, n_head, 1e-5, 0.0)
}

/// As [`compare_attention`] within `tolerance`; the output's error must also reach `floor` (in
/// bf16: evidence that the inputs were rounded).
fn compare_attention_within(device: &Device, label: &str, qkv: Tensor<f64>, seq: usize, n_head: usize, tolerance: f64, floor: f64) {
    let (reference, reference_grads) =
        run_op::<f64>(&Device::Cpu, std::slice::from_ref(&qkv), |tape, v| ops::causal_self_attention(tape, v[0], seq, n_head));
    let (ours, our_grads) = run_op::<f32>(device, &[qkv], |tape, v| ops::causal_self_attention(tape, v[0], seq, n_head));
    let forward_error = relative_error(ours.cast::<f32>().data(), reference.data());
    report(&format!("{label} forward"), forward_error, tolerance);
    assert!(forward_error >= floor, "{label}: error {forward_error:e} below {floor:e}: were the inputs rounded?");
    let (ours, reference) = (our_grads[0].as_ref().unwrap(), reference_grads[0].as_ref().unwrap());
    let c = ours.shape()[1] / 3;
    let third = |t: &Tensor<f64>, part: usize| -> Vec<f64> {
        t.data().chunks(3 * c).flat_map(|row| row[part * c..(part + 1) * c].to_vec()).collect()
    };
    for (part, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        let ours: Vec<f32> = third(ours, part).iter().map(|&x| x as f32).collect();
        report(&format!("{label} backward {name}"), relative_error(&ours, &third(reference, part)), tolerance);
    }
}

cuda_test!(attention_matches_the_cpu_on_both_routes_for_every_head_size, |gpu| {
    drop(gpu);
    for route in [AttentionRoute::Fused, AttentionRoute::Products] {
        let device = device_with(Gpu::new(0).unwrap(), Some(route));
        for (k, &hs) in FUSED_ATTENTION_HEAD_SIZES.iter().enumerate() {
            // T = 130: three query tiles of the fused kernels, the last one ragged; B·H = 4
            let (batch, seq, n_head) = (2, 130, 2);
            let qkv = Tensor::<f64>::randn(&[batch * seq, 3 * n_head * hs], 1.0, &mut Rng::new(40 + k as u64));
            compare_attention(&device, &format!("attention {route:?}, hs = {hs}, T = {seq}"), qkv, seq, n_head);
        }
    }
    // head size 24 has no fused kernel: the products route, T = 64 in two causal chunks
    let device = device_with(Gpu::new(0).unwrap(), None);
    assert_eq!(device.gpu().unwrap().attention_route_for(24), AttentionRoute::Products);
    let qkv = Tensor::<f64>::randn(&[2 * 64, 3 * 48], 1.0, &mut Rng::new(49));
    compare_attention(&device, "attention Products, hs = 24, T = 64", qkv, 64, 2);
    for (hs, forward_registers, backward_registers, spilled) in device.gpu().unwrap().fused_attention_resources().unwrap() {
        println!("fused attention hs = {hs}: {forward_registers} / {backward_registers} registers per thread, {spilled} bytes spilled");
    }
});

cuda_test!(the_cp_head_matches_the_cpu, |gpu| {
    // V = 45: rows read one by one; 1000: in runs of 8, a row taken by 1, 2, 4 and 8 warps
    // (r·n = 12, 3, 2, 1)
    let device = Device::cuda(gpu);
    let (positions, c) = (37, 16);
    for (n, r, v) in [(3, 4, 45), (2, 1, 45), (1, 3, 45), (1, 1, 45), (3, 4, 1000), (1, 3, 1000), (2, 1, 1000), (1, 1, 1000)] {
        let mut rng = Rng::new(60 + 10 * n as u64 + r as u64);
        let mut inputs = vec![Tensor::<f64>::randn(&[positions, c], 1.0, &mut rng), Tensor::randn(&[v, c], 0.7, &mut rng)];
        if n * r > 1 {
            inputs.push(Tensor::randn(&[r, n, c, c], 0.5, &mut rng));
        }
        if r > 1 {
            inputs.push(Tensor::randn(&[r, c], 0.8, &mut rng));
            inputs.push(Tensor::randn(&[r], 0.5, &mut rng));
        }
        let targets: Vec<u32> = (0..positions * n).map(|_| rng.below(v) as u32).collect();
        compare_op!(&device, format!("cp_head n = {n}, r = {r}, V = {v}"), inputs, 1e-5, |tape, vars| {
            let head = ops::CpHeadVars {
                hidden: vars[0],
                wte: vars[1],
                expand: (n * r > 1).then(|| vars[2]),
                gate: (r > 1).then(|| (vars[3], vars[4])),
            };
            Ok(ops::cp_head(tape, head, &targets, n, r, 0.05)?.0)
        });
    }
});

cuda_test!(the_general_ops_match_the_cpu, |gpu| {
    let device = Device::cuda(gpu);
    let mut rng = Rng::new(70);
    let mut randn = |shape: &[usize]| Tensor::<f64>::randn(shape, 1.0, &mut rng);
    let (x, same, row, scalar) = (randn(&[37, 20]), randn(&[37, 20]), randn(&[20]), randn(&[]));
    let positive = |t: &Tensor<f64>| Tensor::from_array(t.array().mapv(|v| v.abs() + 0.5));
    compare_op!(&device, "neg", vec![x.clone()], 1e-5, |tape, v| ops::neg(tape, v[0]));
    compare_op!(&device, "exp", vec![x.clone()], 1e-5, |tape, v| ops::exp(tape, v[0]));
    compare_op!(&device, "log", vec![positive(&x)], 1e-5, |tape, v| ops::log(tape, v[0]));
    compare_op!(&device, "tanh", vec![x.clone()], 1e-5, |tape, v| ops::tanh(tape, v[0]));
    compare_op!(&device, "relu", vec![x.clone()], 1e-5, |tape, v| ops::relu(tape, v[0]));
    compare_op!(&device, "sigmoid", vec![x.clone()], 1e-5, |tape, v| ops::sigmoid(tape, v[0]));
    compare_op!(&device, "powf 2", vec![x.clone()], 1e-5, |tape, v| ops::powf(tape, v[0], 2.0));
    compare_op!(&device, "powf −1.5", vec![positive(&x)], 1e-5, |tape, v| ops::powf(tape, v[0], -1.5));
    compare_op!(&device, "scale", vec![x.clone()], 1e-5, |tape, v| ops::scale(tape, v[0], -3.0));
    // arithmetic: the same shape, a row and a scalar broadcast, on either side
    for (label, b) in [("same shape", &same), ("a row", &row), ("a scalar", &scalar)] {
        let b = positive(b);
        compare_op!(&device, format!("add, {label}"), vec![x.clone(), b.clone()], 1e-5, |tape, v| ops::add(tape, v[0], v[1]));
        compare_op!(&device, format!("sub, {label} first"), vec![b.clone(), x.clone()], 1e-5, |tape, v| ops::sub(tape, v[0], v[1]));
        compare_op!(&device, format!("mul, {label}"), vec![x.clone(), b.clone()], 1e-5, |tape, v| ops::mul(tape, v[0], v[1]));
        compare_op!(&device, format!("div, {label}"), vec![x.clone(), b.clone()], 1e-5, |tape, v| ops::div(tape, v[0], v[1]));
    }
    let cube = randn(&[3, 37, 20]);
    compare_op!(&device, "sum", vec![cube.clone()], 1e-5, |tape, v| ops::sum(tape, v[0]));
    compare_op!(&device, "mean", vec![cube.clone()], 1e-5, |tape, v| ops::mean(tape, v[0]));
    for axis in 0..3 {
        compare_op!(&device, format!("sum_axis {axis}"), vec![cube.clone()], 1e-5, |tape, v| ops::sum_axis(tape, v[0], axis));
        compare_op!(&device, format!("mean_axis {axis}"), vec![cube.clone()], 1e-5, |tape, v| ops::mean_axis(tape, v[0], axis));
    }
    compare_op!(&device, "softmax", vec![cube.clone()], 1e-5, |tape, v| ops::softmax(tape, v[0]));
    compare_op!(&device, "log_softmax", vec![cube.clone()], 1e-5, |tape, v| ops::log_softmax(tape, v[0]));
    compare_op!(&device, "reshape", vec![cube.clone()], 1e-5, |tape, v| ops::reshape(tape, v[0], &[37, 60]));
    compare_op!(&device, "transpose", vec![cube.clone()], 1e-5, |tape, v| ops::transpose(tape, v[0]));
    let (b, batch_b) = (randn(&[20, 11]), randn(&[3, 20, 11]));
    compare_op!(&device, "matmul (37, 20)·(20, 11)", vec![x.clone(), b.clone()], 1e-5, |tape, v| ops::matmul(tape, v[0], v[1]));
    compare_op!(&device, "matmul (3, 37, 20)·(20, 11)", vec![cube.clone(), b], 1e-5, |tape, v| ops::matmul(tape, v[0], v[1]));
    compare_op!(&device, "matmul (3, 37, 20)·(3, 20, 11)", vec![cube, batch_b], 1e-5, |tape, v| ops::matmul(tape, v[0], v[1]));
});

// ---- bf16 products (`--precision bf16`) ----

/// A product's relative tolerance against f64. bf16 keeps 8 mantissa bits: rounding an input
/// moves it by up to 2⁻⁹ ≈ 2e-3 relative (about 1e-3 on average), and a sum of such products
/// over random signs errs by about that much; TF32 keeps 11 bits.
fn product_tolerance(precision: ProductPrecision) -> f64 {
    match precision {
        ProductPrecision::F32 => 1e-5,
        ProductPrecision::Tf32 => 1e-2,
        ProductPrecision::Bf16 => BF16_PRODUCT_TOLERANCE,
    }
}

/// One bf16 product (a linear layer, unembed, matmul) against f64: about 2e-3 expected.
const BF16_PRODUCT_TOLERANCE: f64 = 5e-3;

/// An op built of two or three bf16 products (attention, the CP head) against f64: the errors of
/// chained products add.
const BF16_OP_TOLERANCE: f64 = 2e-2;

/// A gradient whose entries are small differences of larger bf16-computed terms (the CP head's
/// gate bias: posterior minus gate weight, summed over positions).
const BF16_CANCELLING_TOLERANCE: f64 = 5e-2;

/// Below this a bf16 product's error would mean its inputs were not rounded (f32 errs by 1e-7).
const BF16_ROUNDED_AT_LEAST: f64 = 1e-4;

/// The whole model in bf16 against the CPU in f64 (losses, gradients): every linear layer, the
/// attention's products and the head's, forward and backward, round their inputs. The losses
/// average thousands of log-probabilities whose rounding errors mostly cancel (2e-5 seen), the
/// gradients sum the errors of up to three chained products (5e-3 seen).
const BF16_MODEL_TOLERANCE: (f64, f64) = (2e-4, 2e-2);

fn bf16_device(route: Option<AttentionRoute>) -> Device {
    let mut gpu = Gpu::new(0).unwrap();
    gpu.precision = ProductPrecision::Bf16;
    device_with(gpu, route)
}

cuda_test!(the_ops_with_products_match_the_cpu_in_bf16, |gpu| {
    drop(gpu);
    // attention on the products route: in bf16 the fused kernels compute in f32
    let device = bf16_device(Some(AttentionRoute::Products));
    let mut rng = Rng::new(80);
    let mut randn = |shape: &[usize]| Tensor::<f64>::randn(shape, 1.0, &mut rng);
    let tolerance = BF16_PRODUCT_TOLERANCE;
    let (x, w, b, r) = (randn(&[333, 96]), randn(&[96, 80]), randn(&[80]), randn(&[333, 80]));
    compare_op!(&device, "bf16 linear", vec![x.clone(), w.clone(), b.clone()], tolerance, |tape, v| ops::linear(
        tape,
        v[0],
        v[1],
        Some(v[2])
    ));
    compare_op!(&device, "bf16 linear on a residual", vec![x, w, b, r], tolerance, |tape, v| ops::linear_residual(
        tape, v[0], v[1], v[2], v[3]
    ));
    // GPT-2's MLP up to its projection: in bf16 one product with the GELU epilogue, one record on
    // the tape after the three leaves (not linear's and gelu's), within the rounding of its output
    // of the two ops apart
    let (x, w, b) = (randn(&[333, 96]), randn(&[96, 80]), randn(&[80]));
    let inputs = vec![x.clone(), w.clone(), b.clone()];
    compare_op!(&device, "bf16 linear_gelu", inputs, BF16_OP_TOLERANCE, |tape, v| ops::linear_gelu(tape, v[0], v[1], v[2]));
    let mut tape = Tape::<f32>::new();
    let vars: Vec<Var> = [x, w, b].iter().map(|t| tape.leaf(t.cast::<f32>().to_device(&device).unwrap(), true)).collect();
    let fused = ops::linear_gelu(&mut tape, vars[0], vars[1], vars[2]).unwrap();
    assert_eq!(fused.id(), vars[2].id() + 1, "linear_gelu in bf16 is one op on the tape");
    let hidden = ops::linear(&mut tape, vars[0], vars[1], Some(vars[2])).unwrap();
    let apart = ops::gelu(&mut tape, hidden).unwrap();
    let [fused, apart] = [fused, apart].map(|v| tape.value(v).to_host().unwrap().data().to_vec());
    report("bf16 linear_gelu against linear then gelu", relative_error(&fused, &widen(&apart)), 4e-3);
    let (h, wte) = (randn(&[48, 32]), randn(&[50, 32]));
    compare_op!(&device, "bf16 unembed", vec![h, wte], tolerance, |tape, v| ops::unembed(tape, v[0], v[1]));
    // no product, but its backward evaluates gelu' at x rounded to bf16
    compare_op!(&device, "bf16 gelu", vec![randn(&[37, 101])], BF16_OP_TOLERANCE, |tape, v| ops::gelu(tape, v[0]));
    let (m, cube, shared, batched) = (randn(&[37, 20]), randn(&[3, 37, 20]), randn(&[20, 11]), randn(&[3, 20, 11]));
    compare_op!(&device, "bf16 matmul (37, 20)·(20, 11)", vec![m, shared.clone()], tolerance, |tape, v| ops::matmul(tape, v[0], v[1]));
    compare_op!(&device, "bf16 matmul (3, 37, 20)·(20, 11)", vec![cube.clone(), shared], tolerance, |tape, v| ops::matmul(
        tape, v[0], v[1]
    ));
    compare_op!(&device, "bf16 matmul (3, 37, 20)·(3, 20, 11)", vec![cube, batched], tolerance, |tape, v| ops::matmul(tape, v[0], v[1]));
    // both attention routes: the products, and the fused kernels, on tensor cores in bf16
    // (`tensor_core_attention.cu`); T = 130 is three tiles, the last one ragged
    let fused = bf16_device(Some(AttentionRoute::Fused));
    for (route, device) in [("Products", &device), ("Fused", &fused)] {
        for hs in FUSED_ATTENTION_HEAD_SIZES {
            let qkv = Tensor::<f64>::randn(&[2 * 130, 3 * 2 * hs], 1.0, &mut Rng::new(81 + hs as u64));
            let label = format!("bf16 attention {route}, hs = {hs}, T = 130");
            compare_attention_within(device, &label, qkv, 130, 2, BF16_OP_TOLERANCE, BF16_ROUNDED_AT_LEAST);
        }
    }
    // the tensor-core backward writes every gradient element from one block: the same bits twice
    let qkv = Tensor::<f64>::randn(&[2 * 200, 3 * 2 * 64], 1.0, &mut Rng::new(89));
    let attention = |tape: &mut Tape<f32>, v: &[Var]| ops::causal_self_attention(tape, v[0], 200, 2);
    let (first, second) = (run_op(&fused, std::slice::from_ref(&qkv), attention), run_op(&fused, std::slice::from_ref(&qkv), attention));
    assert_eq!(first.0.data(), second.0.data());
    assert_eq!(first.1[0].as_ref().unwrap().data(), second.1[0].as_ref().unwrap().data());
    for (hs, registers, spilled) in fused.gpu().unwrap().tensor_core_attention_resources().unwrap() {
        println!("tensor-core attention hs = {hs}: {registers:?} registers per thread (forward, dk dv, dq), {spilled} bytes spilled");
    }
    // the head's logits in bf16, read one by one (V = 45) and in runs of 8 (48)
    for v in [45, 48] {
        let (positions, c, n, r) = (37, 16, 3, 4);
        let mut rng = Rng::new(82);
        let inputs = vec![
            Tensor::<f64>::randn(&[positions, c], 1.0, &mut rng),
            Tensor::randn(&[v, c], 0.7, &mut rng),
            Tensor::randn(&[r, n, c, c], 0.5, &mut rng),
            Tensor::randn(&[r, c], 0.8, &mut rng),
            Tensor::randn(&[r], 0.5, &mut rng),
        ];
        let targets: Vec<u32> = (0..positions * n).map(|_| rng.below(v) as u32).collect();
        // the gate bias's gradient Σ_t (π[t] − w[t]) / N sums to zero over α, so its few entries are
        // small differences and err relatively more than the rest (1.2e-2 at V = 45, 2.5e-2 at 48
        // on the H200, where the others err by 0.9–1.4e-2)
        const GATE_BIAS: usize = 4;
        let tolerances = |input: usize| if input == GATE_BIAS { BF16_CANCELLING_TOLERANCE } else { BF16_OP_TOLERANCE };
        let name = format!("bf16 cp_head n = 3, r = 4, V = {v}");
        compare_op!(&device, name, inputs, BF16_OP_TOLERANCE, gradients: tolerances, |tape, vars| {
            let head = ops::CpHeadVars { hidden: vars[0], wte: vars[1], expand: Some(vars[2]), gate: Some((vars[3], vars[4])) };
            Ok(ops::cp_head(tape, head, &targets, n, r, 0.05)?.0)
        });
    }
});

cuda_test!(the_model_s_gradients_match_the_cpu_in_bf16, |gpu| {
    drop(gpu);
    let (fused, products) = (bf16_device(None), bf16_device(Some(AttentionRoute::Products)));
    assert_eq!(fused.gpu().unwrap().attention_route_for(64), AttentionRoute::Fused);
    compare_gradients(&fused, "bf16, fused attention", "tiny", 97, 1, 1, 3, 37, BF16_MODEL_TOLERANCE);
    compare_gradients(&fused, "bf16, fused attention", "tiny", 97, 3, 4, 3, 37, BF16_MODEL_TOLERANCE);
    compare_gradients(&products, "bf16, products attention", "tiny", 97, 3, 4, 3, 37, BF16_MODEL_TOLERANCE);
    compare_gradients(&fused, "bf16, fused attention", "small", 61, 4, 4, 2, 128, BF16_MODEL_TOLERANCE);
});

cuda_test!(in_bf16_the_forward_keeps_24_bytes_less_a_row_width_and_layer, |gpu| {
    drop(gpu);
    // What the tape's rules hold after the backbone's forward. In f32 a block keeps its eight
    // outputs, 64·C bytes a row; in bf16 the linear layers keep their inputs rounded, GELU its
    // input, and the attention q, k, v, so that ln_1's and ln_2's outputs, qkv and the MLP's two
    // hidden layers are kept in half their bytes, and the attention's output, which the attention
    // keeps in f32 too, gains a rounded copy: 40·C. ln_f's output carries its rounding for the
    // head: 2·C a row more in bf16. small at 4096 rows: every size is whole units of the pool's
    // classes.
    let config = ModelConfig::preset("small", 97, 1, 1).unwrap();
    let (batch_rows, seq) = (16, 256);
    let batch = random_batch(&config, batch_rows, seq, &mut Rng::new(6));
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(5));
    let kept_by_the_forward = |precision| {
        let mut gpu = Gpu::new(0).unwrap();
        gpu.precision = precision;
        let device = device_with(gpu, Some(AttentionRoute::Fused));
        let on_gpu = params_to_device(&config, &params, &device).unwrap();
        let gpu = device.gpu().unwrap().clone();
        let before = gpu.memory_stats().in_use;
        let mut tape = Tape::new();
        let vars = gpt2::params_on_tape(&mut tape, &config, &on_gpu, |_| true);
        let _h = gpt2::hidden_states(&mut tape, &config, &vars, &batch.inputs, seq).unwrap();
        gpu.memory_stats().in_use - before
    };
    let (f32_bytes, bf16_bytes) = (kept_by_the_forward(ProductPrecision::F32), kept_by_the_forward(ProductPrecision::Bf16));
    let rows_widths_layers = batch_rows * seq * config.n_embd * config.n_layer;
    println!("the backbone's forward keeps {f32_bytes} bytes in f32, {bf16_bytes} in bf16 ({rows_widths_layers} rows × widths × layers)");
    assert_eq!(f32_bytes - bf16_bytes, 24 * rows_widths_layers - 2 * batch_rows * seq * config.n_embd);
});

cuda_test!(rounding_to_bf16_matches_the_host_s_rounding_and_widening_gives_its_value, |gpu| {
    // ties to even (1 + 2⁻⁸ down, 1 + 3·2⁻⁸ up), NaN, infinities, the largest finite value (past
    // bf16's largest: to infinity), bf16's own largest, subnormals, and plain values; 21 of them,
    // so the last pair is a single element, and again from the second, off the 8-byte alignment;
    // widened back, each rounding is the f32 it stands for, bit for bit (four at a time, and the
    // last one alone)
    let mut values = vec![
        0.0,
        -0.0,
        1.0,
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        -(1.0 + 3.0 * 2f32.powi(-8)),
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        half::bf16::MAX.to_f32(),
        1e-40,
        -3e-39,
        f32::MIN_POSITIVE,
    ];
    values.extend(random(6, 90));
    let x = gpu.upload(&values).unwrap();
    for first in [0, 1] {
        let view = x.view().slice(first, values.len() - first);
        let out = gpu.alloc::<u16>(view.len()).unwrap();
        gpu.round_to_bf16(view, out.view()).unwrap();
        let ours = gpu.download(out.view()).unwrap();
        for (&value, &bits) in values[first..].iter().zip(&ours) {
            assert_eq!(bits, half::bf16::from_f32(value).to_bits(), "{value:e} (from element {first})");
        }
        let widened = gpu.alloc::<f32>(view.len()).unwrap();
        gpu.widen_bf16(out.view(), widened.view()).unwrap();
        let widened: Vec<u32> = gpu.download(widened.view()).unwrap().iter().map(|v| v.to_bits()).collect();
        let expected: Vec<u32> = ours.iter().map(|&bits| half::bf16::from_bits(bits).to_f32().to_bits()).collect();
        assert_eq!(widened, expected, "widened from element {first}");
    }
});

// ---- launchers the ops do not cover on their own ----

cuda_test!(matmul_matches_the_cpu_for_every_layout_batched_and_accumulating, |gpu| {
    let (m, k, n) = (129, 257, 67);
    let precisions = [ProductPrecision::F32, ProductPrecision::Tf32, ProductPrecision::Bf16];
    for (precision, route, batch) in
        precisions.into_iter().flat_map(|p| [(GemmRoute::Blas, 1), (GemmRoute::BlasLt, 1), (GemmRoute::Blas, 3)].map(|(r, b)| (p, r, b)))
    {
        gpu.precision = precision;
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
            let error = relative_error(&gpu.download(dc.view()).unwrap(), &reference);
            let label = format!("matmul {route:?} batch={batch} a_t={a_t} b_t={b_t} {precision:?}");
            report(&label, error, product_tolerance(precision));
            if precision == ProductPrecision::Bf16 {
                assert!(error >= BF16_ROUNDED_AT_LEAST, "{label}: error {error:e}: were the inputs rounded to bf16?");
            }
            // a from its bf16 copy alone: the same bits in bf16, refused in the other precisions
            let a_copy = gpu.bf16_copy(da.view()).unwrap();
            let again = gpu.upload(&c0).unwrap();
            let only = Operand::bf16_only(a_copy.view(), a_t).strided(m * k);
            let result = gpu.matmul_batched(only, operand(db.view(), b_t, k * n), again.view(), m, k, n, batch, true);
            if precision == ProductPrecision::Bf16 {
                result.unwrap();
                assert_eq!(bits(gpu.download(again.view()).unwrap()), bits(gpu.download(dc.view()).unwrap()), "{label}: from bf16 alone");
            } else {
                assert!(result.is_err(), "{label}: an operand only in bf16 was taken");
            }
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
    // decoding's kernel, on weights by output column: shapes whose k allows one warp per group of
    // columns only (300, 1020, 40), and shapes split over 4 and 8 warps (768 × 1536, 768 × 768,
    // 3072 × 96); n odd, so that a warp's second column is past the end; rows for both instances
    // (8 rows of k = 1020 are about as many as the LayerNorm prologue takes)
    for (k, n) in [(300, 772), (1020, 95), (40, 8192), (768, 1536), (768, 768), (3072, 96)] {
        let (w, b, gain, shift) = (random(k * n, 61), random(n, 62), random(k, 63), random(k, 64));
        let by_column: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
        let (dw, db, dgain, dshift) =
            (gpu.upload(&by_column).unwrap(), gpu.upload(&b).unwrap(), gpu.upload(&gain).unwrap(), gpu.upload(&shift).unwrap());
        for rows in [1, 3, 8] {
            let (x, residual) = (random(rows * k, 65 + rows as u64), random(rows * n, 75 + rows as u64));
            let (dx, dresidual) = (gpu.upload(&x).unwrap(), gpu.upload(&residual).unwrap());
            for normed in [false, true] {
                let layernorm = normed.then_some((dgain.view(), dshift.view()));
                if normed && k > 1024 {
                    // past what the prologue stages: nothing done, and said so
                    let out = gpu.zeros::<f32>(rows * n).unwrap();
                    let epilogue = multitoken_cuda::Epilogue::Bias;
                    assert!(!gpu.linear_few_rows(dx.view(), layernorm, dw.view(), Some(db.view()), epilogue, out.view()).unwrap());
                    continue;
                }
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
                let unbiased: Vec<f64> =
                    (0..rows * n).map(|i| (0..k).map(|p| input[(i / n) * k + p] * w[p * n + i % n] as f64).sum::<f64>()).collect();
                let product: Vec<f64> = unbiased.iter().enumerate().map(|(i, &v)| v + b[i % n] as f64).collect();
                let gelu = |v: f64| 0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh());
                for (name, bias, epilogue, reference) in [
                    ("no bias", None, multitoken_cuda::Epilogue::Bias, unbiased.clone()),
                    ("bias", Some(db.view()), multitoken_cuda::Epilogue::Bias, product.clone()),
                    ("gelu", Some(db.view()), multitoken_cuda::Epilogue::Gelu, product.iter().map(|&v| gelu(v)).collect()),
                    (
                        "residual",
                        Some(db.view()),
                        multitoken_cuda::Epilogue::Residual(dresidual.view()),
                        product.iter().zip(&residual).map(|(&v, &r)| v + r as f64).collect(),
                    ),
                ] {
                    let out = gpu.upload(&vec![f32::NAN; rows * n]).unwrap(); // poisoned: every element must be written
                    assert!(gpu.linear_few_rows(dx.view(), layernorm, dw.view(), bias, epilogue, out.view()).unwrap());
                    let ours = gpu.download(out.view()).unwrap();
                    report(
                        &format!("linear_few_rows {rows}×{k}·({n}×{k})ᵀ, layernorm {normed}, {name}"),
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
                    gpu.linear_few_rows(dx.view().slice(last * k, k), layernorm, dw.view(), bias, alone_epilogue, alone.view()).unwrap();
                    assert_eq!(gpu.download(alone.view()).unwrap(), ours[last * n..], "row {last} alone differs from row {last} of {rows}");
                }
            }
        }
    }
    // where it does not apply it does nothing and says so: k not a multiple of 4, too many rows,
    let (w, b, x) = (gpu.upload(&random(6 * 8, 81)).unwrap(), gpu.upload(&random(8, 82)).unwrap(), gpu.upload(&random(2 * 6, 83)).unwrap());
    let out = gpu.upload(&[7.0f32; 16]).unwrap();
    assert!(!gpu.linear_few_rows(x.view(), None, w.view(), Some(b.view()), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    assert_eq!(gpu.download(out.view()).unwrap(), vec![7.0; 16]);
    let (w, b, x) =
        (gpu.upload(&random(4 * 8, 84)).unwrap(), gpu.upload(&random(4, 85)).unwrap(), gpu.upload(&random(17 * 8, 86)).unwrap());
    let out = gpu.zeros::<f32>(17 * 4).unwrap();
    assert!(!gpu.linear_few_rows(x.view(), None, w.view(), Some(b.view()), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    // and an empty weight (k = 0)
    let (empty, b, out) = (gpu.zeros::<f32>(0).unwrap(), gpu.upload(&random(4, 87)).unwrap(), gpu.zeros::<f32>(2 * 4).unwrap());
    assert!(!gpu.linear_few_rows(empty.view(), None, empty.view(), Some(b.view()), multitoken_cuda::Epilogue::Bias, out.view()).unwrap());
    // and on the weight by column it gives what `linear` (cuBLASLt) gives on the weight as trained
    let (rows, k, n) = (4, 256, 512);
    let (x, w, b) = (random(rows * k, 91), random(k * n, 92), random(n, 93));
    let by_column: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
    let (dx, dw, dw_by_column, db) =
        (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap(), gpu.upload(&by_column).unwrap(), gpu.upload(&b).unwrap());
    let (general, few) = (gpu.zeros::<f32>(rows * n).unwrap(), gpu.zeros::<f32>(rows * n).unwrap());
    gpu.linear(dx.view(), dw.view(), db.view(), general.view()).unwrap();
    let bias = multitoken_cuda::Epilogue::Bias;
    assert!(gpu.linear_few_rows(dx.view(), None, dw_by_column.view(), Some(db.view()), bias, few.view()).unwrap());
    let general = widen(&gpu.download(general.view()).unwrap());
    report("linear on 4 rows: few-row kernel against cuBLASLt", relative_error(&gpu.download(few.view()).unwrap(), &general), 1e-5);
});

cuda_test!(linear_in_column_tiles_matches_the_cpu_and_the_few_row_kernel_to_the_bit, |gpu| {
    // the head's tiled products: n a multiple of a block's 32 columns or not (and fewer columns
    // than one warp's four), k with or without float4s left over past 32 lanes; every row count
    // from 1 to 16 on the smallest shape; wte-sized, and just past the fewest columns that give
    // every SM a block of tiles (32 an SM less 20), where the few-row kernel must split no column
    let every_row_count: Vec<usize> = (1..=16).collect();
    let fewest_filling = 32 * gpu.multiprocessors - 20;
    let shapes =
        [(300, 773, &[1, 5, 12][..]), (40, 3, &every_row_count[..]), (768, 8192, &[4, 13, 16][..]), (768, fewest_filling, &[4, 16][..])];
    for (k, n, row_counts) in shapes {
        let w = random(k * n, 101);
        let dw = gpu.upload(&w).unwrap(); // (n, k): by output column
        for &rows in row_counts {
            let x = random(rows * k, 102 + rows as u64);
            let dx = gpu.upload(&x).unwrap();
            let reference: Vec<f64> =
                (0..rows * n).map(|i| (0..k).map(|p| x[(i / n) * k + p] as f64 * w[(i % n) * k + p] as f64).sum::<f64>()).collect();
            let out = gpu.upload(&vec![f32::NAN; rows * n]).unwrap(); // poisoned: every element must be written
            assert!(gpu.linear_column_tiles(dx.view(), dw.view(), out.view()).unwrap());
            let tiled = gpu.download(out.view()).unwrap();
            report(&format!("linear_column_tiles {rows}×{k}·({n}×{k})ᵀ"), relative_error(&tiled, &reference), 1e-5);
            if gpu.column_tile_blocks(n) >= gpu.multiprocessors {
                // where the tiles take the logits the few-row kernel gives a column group one
                // warp, and each of its rows, decoded alone, the same bits
                for row in 0..rows {
                    let alone = gpu.upload(&vec![f32::NAN; n]).unwrap();
                    let epilogue = multitoken_cuda::Epilogue::Bias;
                    assert!(gpu.linear_few_rows(dx.view().slice(row * k, k), None, dw.view(), None, epilogue, alone.view()).unwrap());
                    assert_eq!(gpu.download(alone.view()).unwrap(), tiled[row * n..(row + 1) * n], "row {row} of {rows}");
                }
            }
        }
    }
    // where it does not apply it does nothing and says so: more than 16 rows, k not a multiple of 4
    let (w, x) = (gpu.upload(&random(8 * 4, 103)).unwrap(), gpu.upload(&random(17 * 8, 104)).unwrap());
    let out = gpu.upload(&[7.0f32; 17 * 4]).unwrap();
    assert!(!gpu.linear_column_tiles(x.view(), w.view(), out.view()).unwrap());
    let (w, x) = (gpu.upload(&random(6 * 8, 105)).unwrap(), gpu.upload(&random(2 * 6, 106)).unwrap());
    assert!(!gpu.linear_column_tiles(x.view(), w.view(), out.view().prefix(16)).unwrap());
    assert_eq!(gpu.download(out.view()).unwrap(), vec![7.0; 17 * 4]);
});

/// The bf16 copy of a weight as decoding keeps it (each element's 16 bits), and the f32 values it
/// stands for.
fn bf16_copy(w: &[f32]) -> (Vec<u16>, Vec<f32>) {
    w.iter().map(|&v| half::bf16::from_f32(v)).map(|b| (b.to_bits(), b.to_f32())).unzip()
}

cuda_test!(on_bf16_weights_the_few_row_kernels_give_the_bits_of_f32_weights_of_the_same_values, |gpu| {
    // bf16 decoding's kernels widen each weight and go on as on f32 weights: the same bits as the
    // f32 kernels on the rounded values, on shapes that split a group of columns over 1 to 8
    // warps, every prologue and epilogue, rows for both instances; 4096 × 4096 (split 2) gives a
    // warp 512 quads of each of its two columns, more than one round of loads in flight in
    // either precision (96 f32, 256 bf16); then the head's tiled product
    for (k, n) in [(300, 772), (40, 8192), (768, 1536), (768, 768), (3072, 96), (4096, 4096)] {
        let (bits, values) = bf16_copy(&random(n * k, 111));
        let (w_bf16, w_f32) = (gpu.upload(&bits).unwrap(), gpu.upload(&values).unwrap());
        let (b, gain, shift) =
            (gpu.upload(&random(n, 112)).unwrap(), gpu.upload(&random(k, 113)).unwrap(), gpu.upload(&random(k, 114)).unwrap());
        for rows in [1, 4, 8] {
            let (x, residual) = (gpu.upload(&random(rows * k, 115)).unwrap(), gpu.upload(&random(rows * n, 116)).unwrap());
            for layernorm in [None, Some((gain.view(), shift.view()))].into_iter().filter(|ln| ln.is_none() || k <= 1024) {
                let epilogues = [
                    multitoken_cuda::Epilogue::Bias,
                    multitoken_cuda::Epilogue::Gelu,
                    multitoken_cuda::Epilogue::Residual(residual.view()),
                ];
                for epilogue in epilogues {
                    let outs = [gpu.zeros::<f32>(rows * n).unwrap(), gpu.zeros::<f32>(rows * n).unwrap()];
                    assert!(gpu.linear_few_rows(x.view(), layernorm, w_bf16.view(), Some(b.view()), epilogue, outs[0].view()).unwrap());
                    assert!(gpu.linear_few_rows(x.view(), layernorm, w_f32.view(), Some(b.view()), epilogue, outs[1].view()).unwrap());
                    let [bf16, f32] = outs.map(|out| gpu.download(out.view()).unwrap());
                    let label = format!("{rows}×{k}·({n}×{k})ᵀ, layernorm {}, {epilogue:?}", layernorm.is_some());
                    assert!(bf16.iter().all(|v| v.is_finite()), "{label}");
                    assert_eq!(bf16, f32, "{label}: bf16 weights and their f32 values differ");
                }
            }
        }
    }
    for (k, n) in [(300, 773), (768, 8192)] {
        let (bits, values) = bf16_copy(&random(n * k, 117));
        let (w_bf16, w_f32) = (gpu.upload(&bits).unwrap(), gpu.upload(&values).unwrap());
        for rows in [1, 7, 16] {
            let x = gpu.upload(&random(rows * k, 118)).unwrap();
            let outs = [gpu.zeros::<f32>(rows * n).unwrap(), gpu.zeros::<f32>(rows * n).unwrap()];
            assert!(gpu.linear_column_tiles(x.view(), w_bf16.view(), outs[0].view()).unwrap());
            assert!(gpu.linear_column_tiles(x.view(), w_f32.view(), outs[1].view()).unwrap());
            let [bf16, f32] = outs.map(|out| gpu.download(out.view()).unwrap());
            assert_eq!(bf16, f32, "column tiles {rows}×{k}·({n}×{k})ᵀ: bf16 weights and their f32 values differ");
        }
    }
    println!("few-row kernels and column tiles on bf16 weights: the bits of f32 weights of the same values");
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

cuda_test!(reductions_match_the_cpu_and_give_the_same_bits_every_run, |gpu| {
    let (rows, cols) = (1031, 77);
    let (a, b, bias) = (random(rows * cols, 5), random(rows * cols, 6), random(cols, 7));
    let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let out = gpu.zeros::<f32>(rows * cols).unwrap();
    let dbias = gpu.upload(&bias).unwrap();
    gpu.broadcast_rows(dbias.view(), out.view()).unwrap();
    let rows_of_bias: Vec<f64> = (0..rows * cols).map(|i| bias[i % cols] as f64).collect();
    report("bias broadcast", relative_error(&gpu.download(out.view()).unwrap(), &rows_of_bias), 1e-7);
    let column_sums = |accumulate: bool| {
        let sums = gpu.upload(&random(cols, 8)).unwrap();
        gpu.column_sums(da.view(), sums.view(), accumulate).unwrap();
        gpu.download(sums.view()).unwrap()
    };
    let start = widen(&random(cols, 8));
    for accumulate in [false, true] {
        let reference: Vec<f64> =
            (0..cols).map(|j| if accumulate { start[j] } else { 0.0 } + (0..rows).map(|i| a[i * cols + j] as f64).sum::<f64>()).collect();
        let ours = column_sums(accumulate);
        report(&format!("column sums, accumulate {accumulate}"), relative_error(&ours, &reference), 1e-5);
        assert_eq!(ours, column_sums(accumulate), "column sums differ between two runs");
    }
    let squares: Vec<f64> = [&a, &b].iter().map(|x| x.iter().map(|&v| (v as f64).powi(2)).sum()).collect();
    let ours = gpu.sums_of_squares(&[da.view(), db.view()]).unwrap();
    for (ours, reference) in ours.iter().zip(&squares) {
        report("sum of squares", (ours - reference).abs() / reference, 1e-12);
    }
    assert_eq!(ours, gpu.sums_of_squares(&[da.view(), db.view()]).unwrap(), "sums of squares differ between two runs");
    let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
    report("dot", (gpu.dot(da.view(), db.view()).unwrap() - dot).abs() / dot.abs(), 1e-12);
});

/// Three AdamW steps over `params` with `grads` (None: a frozen parameter) on `device`; the
/// parameters and both moments afterwards, on the host in f64.
fn adamw_steps<T: Float>(device: &Device, params: &[Tensor<f64>], grads: &[Option<Tensor<f64>>]) -> Vec<[Tensor<f64>; 3]> {
    let mut params: Vec<Tensor<T>> = params.iter().map(|p| p.cast::<T>().to_device(device).unwrap()).collect();
    let grads: Vec<Option<Tensor<T>>> = grads.iter().map(|g| g.as_ref().map(|g| g.cast::<T>().to_device(device).unwrap())).collect();
    let refs: Vec<&Tensor<T>> = params.iter().collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &refs).to_device(device).unwrap();
    let grad_refs: Vec<Option<&Tensor<T>>> = grads.iter().map(Option::as_ref).collect();
    for _ in 0..3 {
        optimizer.step(&mut params.iter_mut().collect::<Vec<_>>(), &grad_refs, 1e-2, 0.5).unwrap();
    }
    let host = |t: &Tensor<T>| t.to_host().unwrap().cast::<f64>();
    (0..params.len()).map(|i| [host(&params[i]), host(&optimizer.m[i]), host(&optimizer.v[i])]).collect()
}

cuda_test!(adamw_matches_the_cpu_optimizer_over_many_tensors_in_one_launch, |gpu| {
    let device = Device::cuda(gpu);
    // a matrix (decayed), a vector (not), and a frozen one (no gradient), with clipping's scale
    let shapes: [&[usize]; 3] = [&[70, 301], &[999], &[5, 5]];
    let mut rng = Rng::new(9);
    let params: Vec<Tensor<f64>> = shapes.iter().map(|s| Tensor::randn(s, 1.0, &mut rng)).collect();
    let grads: Vec<Option<Tensor<f64>>> =
        shapes.iter().enumerate().map(|(i, s)| (i < 2).then(|| Tensor::randn(s, 0.1, &mut rng))).collect();
    let reference = adamw_steps::<f64>(&Device::Cpu, &params, &grads);
    let ours = adamw_steps::<f32>(&device, &params, &grads);
    for (i, (ours, reference)) in ours.iter().zip(&reference).enumerate().take(2) {
        for (name, ours, reference) in
            [("param", &ours[0], &reference[0]), ("exp_avg", &ours[1], &reference[1]), ("exp_avg_sq", &ours[2], &reference[2])]
        {
            let ours: Vec<f32> = ours.data().iter().map(|&x| x as f32).collect();
            report(&format!("adamw, tensor {i} {name}"), relative_error(&ours, reference.data()), 1e-6);
        }
    }
    let frozen: Vec<f32> = ours[2][0].data().iter().map(|&x| x as f32).collect();
    assert_eq!(frozen, params[2].cast::<f32>().data(), "a parameter without a gradient moved");
});

// ---- the whole model ----

fn random_batch(config: &ModelConfig, rows: usize, seq: usize, rng: &mut Rng) -> Batch {
    let data: Vec<Vec<u32>> = (0..rows).map(|_| (0..seq + config.horizon).map(|_| rng.below(config.vocab_size) as u32).collect()).collect();
    let refs: Vec<&[u32]> = data.iter().map(Vec::as_slice).collect();
    Batch::from_rows(&refs, seq, config.horizon)
}

/// Relative tolerances of the whole model on the GPU against the CPU in f64: (losses, gradients).
const F32_MODEL_TOLERANCE: (f64, f64) = (1e-5, 1e-4);

/// The GPU's loss and every parameter's gradient against the CPU tape in f64: the same model
/// code (`model::gpt2`, the CP head) on both devices.
#[allow(clippy::too_many_arguments)]
fn compare_gradients(
    device: &Device,
    label: &str,
    model: &str,
    vocab: usize,
    horizon: usize,
    rank: usize,
    batch_rows: usize,
    seq: usize,
    (loss_tolerance, gradient_tolerance): (f64, f64),
) {
    let config = ModelConfig::preset(model, vocab, horizon, rank).unwrap();
    let mut rng = Rng::new(5);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    for tensor in params.values_mut() {
        if tensor.shape().len() == 1 {
            tensor.add_assign(&Tensor::randn(tensor.shape(), 0.1, &mut rng)).unwrap();
        }
    }
    let batch = random_batch(&config, batch_rows, seq, &mut rng);
    let aux_coef = 0.05;
    let gradients = |params: &ModelParams<Tensor<f64>>| {
        let mut tape = Tape::new();
        let vars = gpt2::params_on_tape(&mut tape, &config, params, |_| true);
        let out = model_loss(&mut tape, &config, &vars, &batch, aux_coef).unwrap();
        let mut grads = tape.backward(out.objective).unwrap();
        let grads: Vec<Option<Tensor<f64>>> = vars.named().iter().map(|(_, v)| grads.take(**v)).collect();
        (out.stats, grads)
    };
    let (reference_stats, reference) = gradients(&params.map(&config, |_, t| t.cast::<f64>()));
    let on_gpu = params_to_device(&config, &params, device).unwrap();
    let mut tape = Tape::new();
    let vars = gpt2::params_on_tape(&mut tape, &config, &on_gpu, |_| true);
    let out = model_loss(&mut tape, &config, &vars, &batch, aux_coef).unwrap();
    let stats = out.stats.clone();
    let mut grads = tape.backward(out.objective).unwrap();
    let label = format!("{model} n={horizon} r={rank} ({label})");
    let joint_error = (stats.joint_loss - reference_stats.joint_loss).abs() / reference_stats.joint_loss;
    report(&format!("{label} joint loss"), joint_error, loss_tolerance);
    for (s, (ours, theirs)) in stats.head_losses.iter().zip(&reference_stats.head_losses).enumerate() {
        report(&format!("{label} head loss {s}"), (ours - theirs).abs() / theirs.abs(), loss_tolerance);
    }
    for ((name, var), reference) in vars.named().into_iter().zip(reference) {
        match (grads.take(*var), reference) {
            (Some(ours), Some(reference)) => {
                report(&format!("{label} d {name}"), relative_error(ours.to_host().unwrap().data(), reference.data()), gradient_tolerance)
            }
            (None, None) => println!("{label} d {name}: unused on both devices"),
            _ => panic!("{label}: {name} has a gradient on one device only"),
        }
    }
}

cuda_test!(the_model_s_gradients_match_the_cpu_on_both_attention_routes, |gpu| {
    let fused = device_with(gpu, Some(AttentionRoute::Fused));
    let products = device_with(Gpu::new(0).unwrap(), Some(AttentionRoute::Products));
    compare_gradients(&fused, "fused attention", "tiny", 97, 1, 1, 3, 37, F32_MODEL_TOLERANCE);
    compare_gradients(&products, "products attention", "tiny", 97, 1, 1, 3, 37, F32_MODEL_TOLERANCE);
    compare_gradients(&fused, "fused attention", "tiny", 97, 3, 4, 3, 37, F32_MODEL_TOLERANCE);
    // T = 64: two causal chunks on the products route
    compare_gradients(&products, "products attention", "tiny", 97, 2, 1, 2, 64, F32_MODEL_TOLERANCE);
    // T = 128 on `small` (head size 64): two tiles of the fused kernels
    compare_gradients(&fused, "fused attention", "small", 61, 2, 1, 2, 128, F32_MODEL_TOLERANCE);
});

/// A corpus with structure, so that the loss falls: a noisy repeating pattern.
fn patterned_stream(vocab: usize, noise: f64, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..20_000).map(|i| if rng.uniform() < noise { rng.below(vocab) as u32 } else { (i * 7 % 61) as u32 }).collect()
}

fn stream_batch(stream: &[u32], rows: usize, seq: usize, horizon: usize, rng: &mut Rng) -> Batch {
    let starts: Vec<usize> = (0..rows).map(|_| rng.below(stream.len() - seq - horizon)).collect();
    let row_refs: Vec<&[u32]> = starts.iter().map(|&s| &stream[s..s + seq + horizon]).collect();
    Batch::from_rows(&row_refs, seq, horizon)
}

/// A model of `config` as initialised from seed 1, and its optimizer, on `device`.
fn fresh_model(config: &ModelConfig, device: &Device) -> (ModelParams<Tensor<f32>>, AdamW<f32>) {
    let params = gpt2::init_params::<f32>(config, &mut Rng::new(1));
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let optimizer = AdamW::new(AdamWConfig::default(), &refs).to_device(device).unwrap();
    (params_to_device(config, &params, device).unwrap(), optimizer)
}

/// `steps` training steps of `config` on `device` from the same init; the losses and the final
/// parameters on the host.
fn train_on(device: &Device, config: &ModelConfig, steps: usize, trainable: &dyn Fn(&str) -> bool) -> (Vec<f64>, ModelParams<Tensor<f32>>) {
    let stream = patterned_stream(config.vocab_size, 0.2, 9);
    let mut rng = Rng::new(10);
    let (mut params, mut optimizer) = fresh_model(config, device);
    let step_config = StepConfig { lr: 1e-3, grad_clip: 1.0, aux_coef: 0.01 };
    let losses = (0..steps)
        .map(|_| {
            let batch = stream_batch(&stream, 8, 128, config.horizon, &mut rng);
            train_step(config, &mut params, &mut optimizer, &batch, step_config, trainable).unwrap().0
        })
        .collect();
    (losses, params_to_device(config, &params, &Device::Cpu).unwrap())
}

cuda_test!(fifty_training_steps_of_small_agree_with_the_cpu, |gpu| {
    let config = ModelConfig::preset("small", 512, 4, 4).unwrap();
    let (cpu, _) = train_on(&Device::Cpu, &config, 50, &|_| true);
    let (ours, _) = train_on(&Device::cuda(gpu), &config, 50, &|_| true);
    let mut worst: f64 = 0.0;
    for (step, (ours, theirs)) in ours.iter().zip(&cpu).enumerate() {
        let error = (ours - theirs).abs() / theirs.abs();
        worst = worst.max(error);
        if step % 10 == 0 || step == 49 {
            println!("step {:>2}: cpu {theirs:.6} cuda {ours:.6} relative difference {error:.2e}", step + 1);
        }
    }
    report("50 steps of small n=4 r=4, loss curves", worst, 1e-4);
});

cuda_test!(training_on_the_gpu_gives_the_same_bits_on_every_run_on_both_attention_routes, |gpu| {
    // the same steps twice, on each route: every reduction adds in a fixed order, so the
    // parameters must agree to the bit (what --resume relies on)
    let config = ModelConfig::preset("tiny", 97, 3, 4).unwrap();
    let fused = device_with(gpu, Some(AttentionRoute::Fused));
    let products = device_with(Gpu::new(0).unwrap(), Some(AttentionRoute::Products));
    for (route, device) in [("fused", &fused), ("products", &products)] {
        let (first_losses, first) = train_on(device, &config, 8, &|_| true);
        let (second_losses, second) = train_on(device, &config, 8, &|_| true);
        assert_eq!(first_losses, second_losses, "{route}: the losses differ between two runs");
        for ((name, a), (_, b)) in first.named().into_iter().zip(second.named()) {
            assert!(a.data() == b.data(), "{route}: {name} differs between two runs");
        }
        println!("{route} attention: 8 steps twice, every parameter the same bits");
    }
});

cuda_test!(from_the_second_step_on_the_memory_pool_asks_the_driver_for_nothing, |gpu| {
    let device = Device::cuda(gpu);
    let gpu = device.gpu().unwrap().clone();
    let config = ModelConfig::preset("tiny", 97, 3, 4).unwrap();
    let stream = patterned_stream(97, 0.2, 9);
    let mut rng = Rng::new(10);
    let (mut params, mut optimizer) = fresh_model(&config, &device);
    let step_config = StepConfig { lr: 1e-3, grad_clip: 1.0, aux_coef: 0.01 };
    let mut allocations = Vec::new();
    for _ in 0..4 {
        let batch = stream_batch(&stream, 4, 64, config.horizon, &mut rng);
        train_step(&config, &mut params, &mut optimizer, &batch, step_config, &|_| true).unwrap();
        allocations.push(gpu.memory_stats().driver_allocations);
    }
    let stats = gpu.memory_stats();
    println!("driver allocations after each step {allocations:?}; pool holds {} bytes, at most {}", stats.held, stats.peak_held);
    assert!(allocations[0] > 0);
    assert!(allocations[1..].iter().all(|&a| a == allocations[0]), "the driver was asked for memory after the first step: {allocations:?}");
});

/// A `tiny` model with n = 3, r = 4 and every parameter moved off its init.
fn noisy_tiny_model(vocab: usize) -> (ModelConfig, ModelParams<Tensor<f32>>) {
    let config = ModelConfig::preset("tiny", vocab, 3, 4).unwrap();
    let mut rng = Rng::new(17);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    for tensor in params.values_mut() {
        tensor.add_assign(&Tensor::randn(tensor.shape(), 0.05, &mut rng)).unwrap();
    }
    (config, params)
}

cuda_test!(eval_of_a_token_stream_matches_the_cpu_across_windows, |gpu| {
    // 300 tokens through a 128-position model: three windows, the last one partly scored
    let (config, params) = noisy_tiny_model(97);
    let tokens: Vec<u32> = (0..300).map(|i| (i * 31 % 97) as u32).collect();
    let cpu = multitoken::train::evaluate::evaluate_tokens(&config, &params, &tokens).unwrap();
    let on_gpu = params_to_device(&config, &params, &Device::cuda(gpu)).unwrap();
    let ours = multitoken::train::evaluate::evaluate_tokens(&config, &on_gpu, &tokens).unwrap();
    assert_eq!(ours.tokens, cpu.tokens);
    report("eval joint loss over windows, GPU against CPU", (ours.joint_loss - cpu.joint_loss).abs() / cpu.joint_loss, 1e-5);
    report("eval next-token loss over windows, GPU against CPU", (ours.ntp_loss - cpu.ntp_loss).abs() / cpu.ntp_loss, 1e-5);
});

cuda_test!(a_frozen_backbone_stays_put_while_the_head_trains, |gpu| {
    let config = ModelConfig::preset("tiny", 97, 3, 4).unwrap();
    let head_only = |name: &str| name.starts_with("mtp.");
    let (_, after) = train_on(&Device::cuda(gpu), &config, 2, &head_only);
    let before = gpt2::init_params::<f32>(&config, &mut Rng::new(1));
    for ((name, before), (_, now)) in before.named().into_iter().zip(after.named()) {
        let moved = before.max_abs_diff(now) > 0.0;
        assert_eq!(moved, head_only(&name), "{name}: moved = {moved}");
    }
    println!("head-only steps on the GPU: the head moved, the backbone did not");
});

// ---- decoding ----

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
        let (pass_worst, pass_hidden) = passes_against_the_cpu(&mut decoder, &mut cpu, &tokens, &passes);
        worst = worst.max(pass_worst);
        *hidden = pass_hidden;
        // passes of 1 and 3 tokens
        assert_eq!(decoder.captured_passes(), if graphs { 2 } else { 0 });
    }
    report("KV-cache backbone passes, GPU against CPU", worst, 1e-5);
    assert!(hidden[0] == hidden[1], "replayed graphs and kernels launched one by one differ");
});

/// Decoding passes through the GPU decoder's backbone and the CPU's cached one alike: each pass
/// the tokens of its range, then both caches cut to the length given, if any. Returns the worst
/// relative error of the GPU's hidden states and those states, pass after pass.
fn passes_against_the_cpu(
    decoder: &mut GpuDecoder,
    cpu: &mut CachedBackbone<f32>,
    tokens: &[u32],
    passes: &[(std::ops::Range<usize>, Option<usize>)],
) -> (f64, Vec<f32>) {
    let (mut worst, mut hidden) = (0.0f64, Vec::new());
    for (range, truncate_to) in passes.iter().cloned() {
        let ours = decoder.backbone().forward(&tokens[range.clone()]).unwrap();
        let reference: Vec<f64> = cpu.forward(&tokens[range]).iter().map(|&x| x as f64).collect();
        worst = worst.max(relative_error(&ours, &reference));
        hidden.extend(ours);
        if let Some(len) = truncate_to {
            decoder.backbone().truncate(len);
            cpu.truncate(len);
        }
    }
    (worst, hidden)
}

cuda_test!(gpu_kv_cache_passes_take_every_head_shape_and_launch_early_to_the_same_bits, |gpu| {
    // heads wider than a block's 256 threads (384: the attention's weighted sum in passes, float4
    // loads), heads of a width that is not a multiple of 4 (6: single loads), and a model width
    // C = 6 that the few-row kernel cannot take (no copies by column: the general products); each
    // against the CPU, and launched early (where the device can) to the same bits as not
    for (n_embd, n_head) in [(384, 1), (12, 2), (6, 1)] {
        let config = ModelConfig { n_embd, n_head, ..ModelConfig::preset("tiny", 97, 3, 4).unwrap() };
        let mut rng = Rng::new(23);
        let mut params = gpt2::init_params::<f32>(&config, &mut rng);
        for tensor in params.values_mut() {
            tensor.add_assign(&Tensor::randn(tensor.shape(), 0.05, &mut rng)).unwrap();
        }
        let tokens: Vec<u32> = (0..40).map(|i| (i * 13 % 97) as u32).collect();
        let passes = [(0..20, None), (20..21, None), (21..24, Some(22)), (22..25, None), (25..40, None)];
        let mut runs = Vec::new();
        for early in [false, true] {
            if early && !gpu.can_launch_early().unwrap() {
                continue;
            }
            gpu.early_launch = early;
            let mut decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
            let mut cpu = CachedBackbone::new(&config, &params);
            let (worst, hidden) = passes_against_the_cpu(&mut decoder, &mut cpu, &tokens, &passes);
            report(&format!("KV-cache passes, C {n_embd}, {n_head} heads, early launch {early}: GPU against CPU"), worst, 1e-5);
            runs.push(hidden);
        }
        gpu.early_launch = false;
        assert!(runs.windows(2).all(|pair| pair[0] == pair[1]), "C {n_embd}: early launch changed the hidden states");
    }
});

cuda_test!(gpu_batched_passes_match_the_cpu_batch, |gpu| {
    let (config, params) = noisy_tiny_model(97);
    let mut decoder = GpuDecoder::with_sequences(&gpu, &config, &params, 3).unwrap();
    let mut cpu = CachedBackbone::with_sequences(&config, &params, 3);
    let streams: Vec<Vec<u32>> = (0..3).map(|k| (0..30).map(|i| ((i * 13 + k * 29) % 97) as u32).collect()).collect();
    // prefills of different lengths stacked in one pass, then stacked runs of up to n = 3 tokens
    // (graphs captured per shape), a sequence left out, rollbacks, as batched decoding does
    // each pass: every sequence's run, then the lengths to roll back to, if any
    type Pass = ([std::ops::Range<usize>; 3], Option<[usize; 3]>);
    let passes: [Pass; 6] = [
        ([0..9, 0..2, 0..10], None),
        ([9..11, 2..2, 10..11], None),
        ([11..14, 2..5, 11..14], Some([12, 5, 11])),
        ([12..15, 5..8, 11..14], None),
        ([15..16, 8..9, 14..15], None),
        ([16..17, 9..10, 15..16], None),
    ];
    let mut worst: f64 = 0.0;
    let mut hidden = [vec![], vec![]];
    for (graphs, hidden) in [true, false].into_iter().zip(&mut hidden) {
        decoder.use_graphs(graphs);
        for sequence in 0..3 {
            decoder.batch_backbone().truncate_sequence(sequence, 0);
            cpu.truncate_sequence(sequence, 0);
        }
        for (ranges, truncate_to) in passes.clone() {
            let runs: Vec<&[u32]> = ranges.iter().zip(&streams).map(|(range, stream)| &stream[range.clone()]).collect();
            let ours = decoder.batch_backbone().forward_batch(&runs).unwrap();
            let reference = cpu.forward_batch(&runs);
            for (ours, reference) in ours.iter().zip(&reference) {
                assert_eq!(ours.len(), reference.len());
                worst = worst.max(relative_error(ours, &widen(reference)));
                hidden.extend_from_slice(ours);
            }
            if let Some(lens) = truncate_to {
                for (sequence, len) in lens.into_iter().enumerate() {
                    decoder.batch_backbone().truncate_sequence(sequence, len);
                    cpu.truncate_sequence(sequence, len);
                }
            }
        }
        // the five short passes have 3 or 9 rows, each length captured once (whichever sequences
        // at whatever positions); the prefill of 21 rows is not
        assert_eq!(decoder.captured_passes(), if graphs { 2 } else { 0 });
    }
    report("batched KV-cache passes of 3 sequences, GPU against CPU", worst, 1e-5);
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
    // one component's alone (the top-component draft's), every α, from horizon 1 and from 0
    let (cpu_head, h) = (Head::new(&config, &params), &hidden.data()[..config.n_embd]);
    let mut worst: f64 = 0.0;
    for alpha in 0..config.rank {
        for first in [0, 1] {
            let ours = decoder.component_probabilities(&params, h, alpha, first..config.horizon).unwrap();
            let reference = cpu_head.component_probabilities(h, alpha, first..config.horizon).unwrap();
            assert_eq!(ours.len(), config.horizon - first);
            for (ours, reference) in ours.iter().zip(&reference) {
                let reference: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
                worst = worst.max(relative_error(ours, &reference));
            }
        }
    }
    report("one component's P[α,s], GPU against CPU", worst, 1e-5);
});

/// `params` with the weights whose names `rounded` picks rounded to bf16 values (kept in f32).
fn with_bf16_values(config: &ModelConfig, params: &ModelParams<Tensor<f32>>, rounded: &dyn Fn(&str) -> bool) -> ModelParams<Tensor<f32>> {
    params.map(config, |name, tensor| match rounded(name) {
        true => Tensor::from_vec(tensor.shape(), bf16_copy(tensor.data()).1),
        false => tensor.clone(),
    })
}

cuda_test!(decoding_in_bf16_streams_bf16_copies_and_keeps_greedy_speculative_decoding_exact, |gpu| {
    // V = 8192: the head's products take the few-row and tiled kernels, as at full size
    let (config, params) = noisy_tiny_model(8192);
    let mut bf16 = GpuDecoder::in_precision(&gpu, &config, &params, 1, Precision::Bf16).unwrap();
    let linear = |name: &str| {
        [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"].iter().any(|s| name.ends_with(s))
    };
    let head = |name: &str| name == "transformer.wte.weight" || name == "mtp.expand.weight";

    // passes of up to 8 rows read the blocks' bf16 copies: the bits an f32 decoder gives with
    // those weights rounded (the embedding reads wte in f32 in both); a prefill of 20 rows takes
    // cuBLAS in f32 on the f32 weights, as f32 decoding does
    let rounded_blocks = with_bf16_values(&config, &params, &linear);
    let mut f32_of_rounded = GpuDecoder::new(&gpu, &config, &rounded_blocks).unwrap();
    let mut f32_decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
    let tokens: Vec<u32> = (0..30).map(|i| (i * 331 % 8192) as u32).collect();
    for decoder in [&mut bf16, &mut f32_of_rounded, &mut f32_decoder] {
        decoder.backbone().forward(&tokens[..3]).unwrap();
    }
    for run in [&tokens[3..4], &tokens[4..7], &tokens[7..15]] {
        let ours = bf16.backbone().forward(run).unwrap();
        assert_eq!(ours, f32_of_rounded.backbone().forward(run).unwrap(), "a pass of {} rows", run.len());
        assert_ne!(ours, f32_decoder.backbone().forward(run).unwrap(), "bf16 decoding gave f32's bits: no bf16 copies read");
    }
    let mut cpu = CachedBackbone::new(&config, &params);
    bf16.backbone().truncate(0);
    let reference: Vec<f64> = cpu.forward(&tokens[..20]).iter().map(|&x| x as f64).collect();
    report(
        "a bf16 decoder's prefill of 20 rows against the CPU",
        relative_error(&bf16.backbone().forward(&tokens[..20]).unwrap(), &reference),
        1e-5,
    );

    // the head's products read bf16 copies of the expanders and wte: the bits of f32 ones of the
    // same values, for three states' next tokens and one state's three horizons (12 rows of
    // logits each, the tiled kernel's; past 16 both take cuBLAS on the f32 weights)
    let rounded_head = with_bf16_values(&config, &params, &head);
    let f32_of_rounded = GpuDecoder::new(&gpu, &config, &rounded_head).unwrap();
    let hidden = Tensor::<f32>::randn(&[3, config.n_embd], 1.0, &mut Rng::new(5));
    for (states, horizons) in [(hidden.data(), 1), (&hidden.data()[..config.n_embd], 3)] {
        let (ours, reference) =
            (bf16.head_states(&params, states, horizons).unwrap(), f32_of_rounded.head_states(&params, states, horizons).unwrap());
        assert_eq!(ours.len(), reference.len());
        for (ours, reference) in ours.iter().zip(&reference) {
            for (alpha, s) in (0..config.rank).flat_map(|alpha| (0..horizons).map(move |s| (alpha, s))) {
                assert_eq!(ours.prob(alpha, s), reference.prob(alpha, s), "P[{alpha},{s}] of {} states", states.len() / config.n_embd);
            }
        }
    }

    // greedy speculative decoding in bf16 gives autoregressive decoding's tokens, the step on
    // the device and on the host, both drafts; sampling runs
    let sampling = SamplingConfig::greedy();
    let sampled = SamplingConfig { greedy: false, ..SamplingConfig::greedy() };
    for prompt_len in [1, 5, 17] {
        let prompt = &tokens[..prompt_len];
        let mut run = |speculative: bool, draft: Draft, on_host: bool, sampling: &SamplingConfig| {
            let request = DecodeRequest { prompt, max_new_tokens: 40, sampling, seed: 3, progress: &mut |_| {}, stop_at: None, draft };
            match on_host {
                false => bf16.decode(&params, request, speculative).unwrap(),
                true => bf16.decode_on_host(&params, request, speculative).unwrap(),
            }
        };
        let ar = run(false, Draft::Mixture, false, &sampling);
        for (draft, on_host) in [(Draft::Mixture, false), (Draft::TopComponent, false), (Draft::Mixture, true)] {
            let spec = run(true, draft, on_host, &sampling);
            assert_eq!(ar.tokens, spec.tokens, "prompt of {prompt_len}, {draft:?}, on the host {on_host}: bf16 speculative differs");
        }
        let drawn = run(true, Draft::Mixture, false, &sampled);
        assert!(drawn.tokens.len() == 40 && drawn.tokens.iter().all(|&t| t < 8192), "sampled in bf16: {:?}", drawn.tokens);
    }

    // three sequences at once: their passes of more than 8 rows, captured in graphs, take
    // cuBLAS in f32 (rounding there would allocate inside the capture)
    let mut batch = GpuDecoder::in_precision(&gpu, &config, &params, 3, Precision::Bf16).unwrap();
    for (speculative, sampling) in [(false, &sampling), (true, &sampling), (true, &sampled)] {
        let mut callbacks: Vec<_> = (0..3).map(|_| |_: usize| {}).collect();
        let requests = callbacks
            .iter_mut()
            .zip([1, 5, 17])
            .map(|(progress, len)| DecodeRequest {
                prompt: &tokens[..len],
                max_new_tokens: 40,
                sampling,
                seed: len as u64,
                progress,
                stop_at: None,
                draft: Draft::Mixture,
            })
            .collect();
        let generations = batch.decode_batch(&params, requests, speculative).unwrap();
        for generation in &generations {
            assert!(
                generation.tokens.len() == 40 && generation.tokens.iter().all(|&t| t < 8192),
                "a batch in bf16: {:?}",
                generation.tokens
            );
        }
    }
    assert!(GpuDecoder::in_precision(&gpu, &config, &params, 1, Precision::Tf32).is_err(), "decoding in tf32 is refused");
    // and so is bf16 where the few-row kernels are off (every product would read f32 weights)
    gpu.few_row_linear = false;
    assert!(GpuDecoder::in_precision(&gpu, &config, &params, 1, Precision::Bf16).is_err(), "bf16 without the few-row kernels");
    gpu.few_row_linear = true;
    // and so is a GPU whose cuBLAS products round into bf16 copies (inside a capture)
    gpu.precision = ProductPrecision::Bf16;
    assert!(GpuDecoder::new(&gpu, &config, &params).is_err(), "a decoder on a bf16 Gpu is refused");
    println!("decoding in bf16: passes and head products the bits of f32 on rounded weights; greedy speculative == autoregressive");
});

cuda_test!(speculative_greedy_decoding_on_the_gpu_equals_autoregressive, |gpu| {
    // V = 97: the step's kernels read the probabilities one by one; V = 96: in float4s
    for vocab in [97, 96] {
        greedy_speculative_decoding_equals_autoregressive(&gpu, vocab);
    }
});

fn greedy_speculative_decoding_equals_autoregressive(gpu: &Gpu, vocab: usize) {
    // train the tiny model on a near-deterministic stream first, so that greedy choices are clear
    let config = ModelConfig::preset("tiny", vocab, 3, 4).unwrap();
    let stream = patterned_stream(vocab, 0.05, 3);
    let device = Device::cuda(Gpu::new(0).unwrap());
    let mut rng = Rng::new(3);
    let (mut params, mut optimizer) = fresh_model(&config, &device);
    for _ in 0..300 {
        let batch = stream_batch(&stream, 8, 64, 3, &mut rng);
        train_step(&config, &mut params, &mut optimizer, &batch, StepConfig { lr: 3e-3, grad_clip: 1.0, aux_coef: 0.01 }, &|_| true)
            .unwrap();
    }
    let params = params_to_device(&config, &params, &Device::Cpu).unwrap();
    let mut decoder = GpuDecoder::new(gpu, &config, &params).unwrap();
    let sampling = SamplingConfig::greedy();
    let mut accepted = Vec::new();
    // short prompts, and long ones whose continuation crosses the end of the 128-token context
    let mut cases = Vec::new();
    for (prompt_len, new_tokens) in [(1, 40), (5, 60), (17, 50), (100, 60), (127, 20)] {
        let start = rng.below(stream.len() - prompt_len);
        let prompt = &stream[start..start + prompt_len];
        cases.push((prompt.to_vec(), new_tokens));
        let mut run = |speculative: bool, draft: Draft| {
            let request = DecodeRequest {
                prompt,
                max_new_tokens: new_tokens,
                sampling: &sampling,
                seed: 0,
                progress: &mut |_| {},
                stop_at: None,
                draft,
            };
            decoder.decode(&params, request, speculative).unwrap()
        };
        let ar = run(false, Draft::Mixture);
        for draft in [Draft::Mixture, Draft::TopComponent] {
            let spec = run(true, draft);
            assert_eq!(ar.tokens, spec.tokens, "prompt of {prompt_len}, {draft:?}: speculative output differs from autoregressive");
            accepted.push(spec.mean_accepted());
        }
        // the step on the device against the step on the host, and against the CPU: the same
        // tokens, and the same passes where speculative
        for (speculative, draft) in [(false, Draft::Mixture), (true, Draft::Mixture), (true, Draft::TopComponent)] {
            fn request<'a>(
                prompt: &'a [u32],
                new_tokens: usize,
                sampling: &'a SamplingConfig,
                draft: Draft,
                progress: &'a mut dyn FnMut(usize),
            ) -> DecodeRequest<'a> {
                DecodeRequest { prompt, max_new_tokens: new_tokens, sampling, seed: 0, progress, stop_at: None, draft }
            }
            let on_device = decoder.decode(&params, request(prompt, new_tokens, &sampling, draft, &mut |_| {}), speculative).unwrap();
            let on_host = decoder.decode_on_host(&params, request(prompt, new_tokens, &sampling, draft, &mut |_| {}), speculative).unwrap();
            let cpu = multitoken::decode::decode(&config, &params, request(prompt, new_tokens, &sampling, draft, &mut |_| {}), speculative)
                .unwrap();
            let label = format!("prompt of {prompt_len}, speculative {speculative}, {draft:?}");
            assert_eq!(on_device.tokens, on_host.tokens, "{label}: the device's step and the host's differ");
            assert_eq!(on_device.tokens, cpu.tokens, "{label}: the GPU and the CPU differ");
            assert_eq!(on_device.forward_passes, on_host.forward_passes, "{label}");
            assert_eq!((&on_device.drafted, &on_device.accepted), (&on_host.drafted, &on_host.accepted), "{label}");
        }
    }
    println!(
        "greedy speculative == autoregressive on the GPU for 5 prompts, both drafts, the step on the device and on the host, and on \
         the CPU; mean accepted per pass {accepted:.2?}"
    );
    // the device's step launched kernel by kernel gives the bits its replayed graphs give
    let (prompt, new_tokens) = &cases[3];
    let sampled = SamplingConfig { greedy: false, ..SamplingConfig::greedy() };
    for sampling in [SamplingConfig::greedy(), sampled] {
        let mut both = Vec::new();
        for graphs in [true, false] {
            decoder.use_graphs(graphs);
            let request = DecodeRequest {
                prompt,
                max_new_tokens: *new_tokens,
                sampling: &sampling,
                seed: 5,
                progress: &mut |_| {},
                stop_at: None,
                draft: Draft::Mixture,
            };
            both.push(decoder.decode(&params, request, true).unwrap().tokens);
        }
        assert_eq!(both[0], both[1], "{sampling:?}: graphs and direct launches differ");
    }
    decoder.use_graphs(true);

    // the same prompts decoded together, greedy and sampled: each sequence gets the tokens it
    // gets alone
    let mut batch_decoder = GpuDecoder::with_sequences(gpu, &config, &params, cases.len()).unwrap();
    for sampling in [SamplingConfig::greedy(), SamplingConfig { greedy: false, ..SamplingConfig::greedy() }] {
        for (speculative, draft) in [(false, Draft::Mixture), (true, Draft::Mixture), (true, Draft::TopComponent)] {
            let mut callbacks: Vec<_> = cases.iter().map(|_| |_: usize| {}).collect();
            fn request<'a>(
                (prompt, new_tokens): &'a (Vec<u32>, usize),
                sampling: &'a SamplingConfig,
                draft: Draft,
                seed: u64,
                progress: &'a mut dyn FnMut(usize),
            ) -> DecodeRequest<'a> {
                DecodeRequest { prompt, max_new_tokens: *new_tokens, sampling, seed, progress, stop_at: None, draft }
            }
            let requests = cases
                .iter()
                .zip(callbacks.iter_mut())
                .zip(0..)
                .map(|((case, progress), seed)| request(case, &sampling, draft, seed, progress))
                .collect();
            let together = batch_decoder.decode_batch(&params, requests, speculative).unwrap();
            for ((case, seed), together) in cases.iter().zip(0..).zip(&together) {
                // a batch's steps run on the host, which draws its random numbers as one
                // sequence's host step does
                let alone = decoder.decode_on_host(&params, request(case, &sampling, draft, seed, &mut |_| {}), speculative).unwrap();
                assert_eq!(together.tokens, alone.tokens, "prompt of {}, {sampling:?}, speculative {speculative}, {draft:?}", case.0.len());
                assert_eq!(together.forward_passes, alone.forward_passes);
            }
        }
    }
    println!("{} prompts decoded together on the GPU: each one's tokens as alone, greedy and sampled, both drafts", cases.len());
}

/// The speculative step's buffers for a run of up to m ≤ n rows, width c, rank r, vocabulary v:
/// random hidden states, the rest zeros.
struct StepRoom {
    hidden: multitoken_cuda::Buffer<f32>,
    s_hidden: multitoken_cuda::Buffer<f32>,
    posterior: multitoken_cuda::Buffer<f32>,
    draft_q: multitoken_cuda::Buffer<f32>,
    uniforms: multitoken_cuda::Buffer<f32>,
    work: multitoken_cuda::Buffer<f32>,
    readback: multitoken_cuda::Buffer<u32>,
}

impl StepRoom {
    fn new(gpu: &Gpu, m: usize, c: usize, r: usize, n: usize, v: usize) -> Self {
        StepRoom {
            hidden: gpu.upload(&random(m * c, 31)).unwrap(),
            s_hidden: gpu.zeros(c).unwrap(),
            posterior: gpu.zeros(r).unwrap(),
            draft_q: gpu.zeros((n - 1) * v).unwrap(),
            uniforms: gpu.zeros(2 * n - 1).unwrap(),
            work: gpu.zeros(v).unwrap(),
            readback: gpu.zeros(multitoken_cuda::STEP_DRAFTS + n - 1).unwrap(),
        }
    }

    fn buffers(&self) -> multitoken_cuda::StepBuffers {
        multitoken_cuda::StepBuffers {
            hidden: self.hidden.view(),
            s_hidden: self.s_hidden.view(),
            posterior: self.posterior.view(),
            draft_q: self.draft_q.view(),
            uniforms: self.uniforms.view(),
            work: self.work.view(),
            readback: self.readback.view(),
        }
    }
}

cuda_test!(the_step_kernels_choose_the_first_of_equal_maxima_past_4096_entries, |gpu| {
    // V past 4096, so that each of the step block's 1024 threads takes entries from more than
    // one run of the row, in float4s (V = 8196) and one by one (8197); the largest marginal
    // planted twice, the lower index in a later warp than the higher one (in both widths for
    // verification). Verification's next token and the drafts must each be the lowest index
    // among equal largest entries, as the host's argmax; the last draft's maximum is the last
    // entry, the end of both loops
    use multitoken_cuda::{StepChoice, ACCEPT_EXACT, STEP_ACCEPTED, STEP_DRAFTS, STEP_NEXT, STEP_NOT_FINITE};
    let (r, n, c) = (3, 3, 8);
    for v in [8196usize, 8197] {
        let mut rng = Rng::new(v as u64);
        // rows of probabilities (not normalised: the argmax does not care) with planted maxima
        let mut rows_with_maxima = |count: usize, maxima: &[usize]| -> Vec<f32> {
            let mut rows = Vec::with_capacity(count * r * v);
            for _ in 0..count * r {
                let mut row: Vec<f32> = (0..v).map(|_| 0.1 + 0.5 * rng.uniform() as f32).collect();
                maxima.iter().for_each(|&i| row[i] = 3.0);
                rows.extend(row);
            }
            rows
        };
        let probs = gpu.upload(&rows_with_maxima(1, &[3000, 4200])).unwrap();
        let mut probs_s = rows_with_maxima(1, &[5100, 6000]);
        probs_s.extend(rows_with_maxima(1, &[v - 1]));
        let probs_s = gpu.upload(&probs_s).unwrap();
        let w = gpu.upload(&[0.2f32, 0.3, 0.5]).unwrap();
        let table = gpu.zeros::<u32>(3).unwrap();
        let rows = gpu.write_cache_rows(table.view(), &[[7, 0, 4]], v, 1, 16).unwrap();
        let room = StepRoom::new(&gpu, 1, c, r, n, v);
        let buffers = room.buffers();
        let greedy = StepChoice { greedy: true, inv_temperature: 1.0, rule: ACCEPT_EXACT };
        gpu.speculative_verify(probs.view(), w.view(), rows, buffers, n, greedy, None).unwrap();
        gpu.speculative_draft(probs_s.view(), buffers, n - 1, greedy, false).unwrap();
        let back = gpu.download(room.readback.view()).unwrap();
        assert_eq!((back[STEP_ACCEPTED], back[STEP_NEXT], back[STEP_NOT_FINITE]), (0, 3000, 0), "V = {v}: verification");
        assert_eq!(back[STEP_DRAFTS..], [5100, v as u32 - 1], "V = {v}: the drafts");
    }
});

cuda_test!(the_step_kernels_draw_where_the_running_sum_passes_the_uniform, |gpu| {
    // V past 8192, so that each of the step block's 1024 threads sums a chunk of 9 entries, the
    // rows in float4s (V = 8196) and one by one (8197), with heavy entries at the chunks' edges
    // and at the last entry. Verification rejects a draft, then draws the next token across
    // [0, 1): from the residual max(0, p − q) (written over q's row), at T = 1 and T = 0.6, or from
    // p itself where q covers p everywhere and the residual has no mass; then the next draft from
    // S's mixture. Each draw must be the first entry whose running sum (in f64 here) passes u·Σ,
    // unless u·Σ lies within f32 rounding of an entry's end; the draft's distribution is kept
    // for the next step's test.
    use multitoken_cuda::{StepChoice, ACCEPT_EXACT, STEP_ACCEPTED, STEP_DRAFTS, STEP_NEXT};
    let (r, n, c) = (2, 2, 8);
    // where the running sum of `weights` passes u·Σ, or None within `margin`·Σ of an entry's end
    let first_past = |weights: &[f64], u: f64, margin: f64| -> Option<usize> {
        let total: f64 = weights.iter().sum();
        let target = u * total;
        let mut running = 0.0;
        for (i, &x) in weights.iter().enumerate() {
            running += x;
            if (running - target).abs() < margin * total {
                return None;
            }
            if running > target {
                return Some(i);
            }
        }
        None
    };
    // p^(1/T), normalised
    let tempered = |p: &[f64], temperature: f64| -> Vec<f64> {
        let powered: Vec<f64> = p.iter().map(|x| x.powf(1.0 / temperature)).collect();
        let total: f64 = powered.iter().sum();
        powered.iter().map(|x| x / total).collect()
    };
    for v in [8196usize, 8197] {
        let mut rng = Rng::new(v as u64 + 1);
        let chunk = v.div_ceil(1024);
        // distributions with a few heavy entries over a light floor: at a chunk's first and last
        // entries and either side of them, at the last entry, and anywhere
        let mut distributions = |count: usize| -> Vec<f32> {
            let mut all = Vec::with_capacity(count * v);
            for _ in 0..count {
                let mut row: Vec<f64> = (0..v).map(|_| rng.uniform() * 1e-4).collect();
                let edge = chunk * (1 + rng.below(v / chunk - 2));
                for i in [edge - 1, edge, edge + 1, edge + chunk - 1, v - 1, rng.below(v)] {
                    row[i] += rng.uniform();
                }
                let total: f64 = row.iter().sum();
                all.extend(row.iter().map(|x| (x / total) as f32));
            }
            all
        };
        let (probs, probs_s) = (distributions(2 * r), distributions(r));
        let w = [0.3f32, 0.7, 0.6, 0.4];
        let p0: Vec<f64> = (0..v).map(|i| w[0] as f64 * probs[i] as f64 + w[1] as f64 * probs[v + i] as f64).collect();
        // the draft d: this q gives it half its mass and p next to none; the other q is 2p, above
        // p everywhere (p(d)/q(d) = 1/2 for every d)
        let draft = 4321;
        let mut q_against_d: Vec<f64> = widen(&distributions(1));
        q_against_d[draft] += 1.0;
        let q_against_d: Vec<f32> = q_against_d.iter().map(|x| (x / 2.0) as f32).collect();
        let q_above_p: Vec<f32> = p0.iter().map(|x| (2.0 * x) as f32).collect();

        let (probs_d, probs_s_d, w_d) = (gpu.upload(&probs).unwrap(), gpu.upload(&probs_s).unwrap(), gpu.upload(&w).unwrap());
        let table = gpu.zeros::<u32>(6).unwrap();
        let rows = gpu.write_cache_rows(table.view(), &[[7, 0, 4], [draft as u32, 0, 5]], v, 1, 16).unwrap();
        let room = StepRoom::new(&gpu, 2, c, r, n, v);
        let buffers = room.buffers();
        let (draft_q, uniforms, readback) = (&room.draft_q, &room.uniforms, &room.readback);
        for (temperature, q, residual_has_mass) in [(1.0, &q_against_d, true), (0.6, &q_against_d, true), (1.0, &q_above_p, false)] {
            let target = tempered(&p0, temperature);
            let residual: Vec<f64> = (0..v).map(|i| (target[i] - q[i] as f64).max(0.0)).collect();
            assert_eq!(residual.iter().any(|&x| x > 0.0), residual_has_mass);
            let next_from = if residual_has_mass { &residual } else { &target };
            let choice = StepChoice { greedy: false, inv_temperature: (1.0 / temperature) as f32, rule: ACCEPT_EXACT };
            let (mut checked_next, mut checked_drafts, mut worst_kept) = (0, 0, 0.0f64);
            for i in 0..64 {
                let (u_next, u_draft) = ((i as f64 + 0.5) / 64.0, rng.uniform());
                gpu.write(draft_q.view(), q).unwrap();
                gpu.write(uniforms.view(), &[0.75, u_next as f32, u_draft as f32]).unwrap();
                gpu.speculative_verify(probs_d.view(), w_d.view(), rows, buffers, n, choice, None).unwrap();
                gpu.speculative_draft(probs_s_d.view(), buffers, n - 1, choice, false).unwrap();
                let back = gpu.download(readback.view()).unwrap();
                let label = format!("V = {v}, T = {temperature}, residual with mass {residual_has_mass}");
                assert_eq!(back[STEP_ACCEPTED], 0, "{label}: p(d)/q(d) is at most 1/2, below the acceptance test's 0.75");
                let next = back[STEP_NEXT] as usize;
                if let Some(expected) = first_past(next_from, u_next as f32 as f64, 1e-5) {
                    assert_eq!(next, expected, "{label}, u = {u_next}: the next token");
                    checked_next += 1;
                }
                // S's mixture after `next`: π[α] ∝ w[0,α] P[0,α,0](next), then tempered
                let pi: Vec<f64> = (0..r).map(|a| w[a] as f64 * probs[a * v + next] as f64).collect();
                let pi_total: f64 = pi.iter().sum();
                let mixture: Vec<f64> = (0..v).map(|j| (0..r).map(|a| pi[a] / pi_total * probs_s[a * v + j] as f64).sum()).collect();
                let mixture = tempered(&mixture, temperature);
                worst_kept = worst_kept.max(relative_error(&gpu.download(draft_q.view()).unwrap(), &mixture));
                if let Some(expected) = first_past(&mixture, u_draft as f32 as f64, 1e-5) {
                    assert_eq!(back[STEP_DRAFTS] as usize, expected, "{label}, u = {u_draft}: the draft");
                    checked_drafts += 1;
                }
            }
            let label = format!("V = {v}, T = {temperature}, residual with mass {residual_has_mass}");
            report(&format!("{label}: the drafts' distributions kept"), worst_kept, 1e-5);
            println!("{label}: {checked_next} next tokens and {checked_drafts} drafts where the running sum passes u·Σ");
            assert!(checked_next >= 40 && checked_drafts >= 40, "{label}: too few draws away from an entry's end to check");
        }
    }
});

cuda_test!(speculative_sampling_on_the_gpu_is_exact_and_a_wrong_acceptance_rule_is_caught, |gpu| {
    use common::exactness::{chi_square, critical_value, exact_pair_distribution};
    use multitoken::decode::generate::AcceptanceRule;
    // as the CPU's test (tests/decoding.rs): a small vocabulary and a peaked random model, 64
    // cells, drafts often wrong; the first two tokens of 3000 samples against their exact
    // distribution, with the whole step on the device
    let config = ModelConfig { vocab_size: 8, n_positions: 16, n_embd: 32, n_layer: 2, n_head: 4, horizon: 3, rank: 3 };
    let mut params = gpt2::init_params::<f32>(&config, &mut Rng::new(4));
    params.wte.data_mut().iter_mut().for_each(|x| *x *= 3.0);
    let prompt = [1, 5, 2];
    let mut decoder = GpuDecoder::new(&gpu, &config, &params).unwrap();
    // (T = 0.6 too: the device tempers each distribution against its largest entry)
    let cases = [
        ("autoregressive", 1.0, false, AcceptanceRule::Exact, Draft::Mixture, true),
        ("speculative", 1.0, true, AcceptanceRule::Exact, Draft::Mixture, true),
        ("speculative, top-component draft", 1.0, true, AcceptanceRule::Exact, Draft::TopComponent, true),
        ("autoregressive, T = 0.6", 0.6, false, AcceptanceRule::Exact, Draft::Mixture, true),
        ("speculative, T = 0.6", 0.6, true, AcceptanceRule::Exact, Draft::Mixture, true),
        ("always-accept", 1.0, true, AcceptanceRule::AlwaysAccept, Draft::Mixture, false),
        ("always-accept, top-component draft", 1.0, true, AcceptanceRule::AlwaysAccept, Draft::TopComponent, false),
        ("resample-from-target", 1.0, true, AcceptanceRule::ResampleFromTarget, Draft::Mixture, false),
    ];
    for (name, temperature, speculative, rule, draft, must_pass) in cases {
        let exact = exact_pair_distribution(&config, &params, &prompt, temperature);
        let sampling = SamplingConfig { greedy: false, temperature, top_k: 0, top_p: 1.0 };
        let v = config.vocab_size;
        let mut counts = vec![0; v * v];
        for seed in 0..3000 {
            let request = DecodeRequest {
                prompt: &prompt,
                max_new_tokens: 3,
                sampling: &sampling,
                seed,
                progress: &mut |_| {},
                stop_at: None,
                draft,
            };
            let generation = decoder.decode_with_rule(&params, request, speculative, rule).unwrap();
            counts[generation.tokens[0] as usize * v + generation.tokens[1] as usize] += 1;
        }
        let (statistic, df) = chi_square(&counts, &exact);
        let critical = critical_value(df);
        println!("GPU, {name}: chi-square {statistic:.1} on {df} degrees of freedom, critical value {critical:.1} at 0.001");
        assert_eq!(statistic <= critical, must_pass, "{name}: chi-square {statistic:.1}, critical {critical:.1}");
    }
});

// ---- resuming a run on the GPU ----

cuda_test!(resume_on_the_gpu_ends_bit_for_bit_like_an_uninterrupted_run, |gpu| {
    use multitoken::device::DeviceKind;
    use multitoken::train::{train, RunOptions, TrainSettings};
    drop(gpu); // each run opens the device itself, as the command line does
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text: String = (0..4000).map(|i| ["the whale ", "and the sea ", "called me ", "old ship. "][i * 7 % 4]).collect();
    std::fs::write(&corpus, text).unwrap();
    let tokenizer = dir.path().join("tokenizer.json");
    multitoken::data::tokenizer::train(std::slice::from_ref(&corpus), 300, &tokenizer, false).unwrap();
    let data = dir.path().join("data");
    multitoken::data::prepare(&tokenizer, std::slice::from_ref(&corpus), &data, 0.1, false).unwrap();
    let settings = TrainSettings {
        model: "tiny".into(),
        horizon: 2,
        rank: 2,
        steps: 12,
        batch: 4,
        seq: 32,
        eval_every: 4,
        save_every: 4,
        ..TrainSettings::default()
    };
    let options = |stop_after_steps, resume| RunOptions {
        resume,
        show_progress: false,
        stop_after_steps,
        device: DeviceKind::Cuda,
        explicit: Vec::new(),
        ..RunOptions::default()
    };
    let (straight, resumed) = (dir.path().join("straight"), dir.path().join("resumed"));
    train(&data, &straight, settings.clone(), &options(None, false)).unwrap();
    let interrupted = train(&data, &resumed, settings.clone(), &options(Some(6), false));
    assert!(matches!(interrupted, Err(multitoken::error::Error::Interrupted { step: 6, .. })), "{interrupted:?}");
    train(&data, &resumed, settings, &options(None, true)).unwrap();
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (std::fs::read(straight.join(file)).unwrap(), std::fs::read(resumed.join(file)).unwrap());
        assert!(a == b, "{file} differs between the uninterrupted run and the resumed one");
    }
    println!("12 steps on the GPU, and 6 + 6 with a resume between: the same checkpoint, byte for byte");
});
