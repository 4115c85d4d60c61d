//! `multitoken bench train`: full training steps (forward, backward, clipping, AdamW) on
//! random tokens, timed after warm-up steps. Speed and memory are measured here, never in tests.

use std::time::Instant;

use serde::Serialize;

use crate::data::Batch;
use crate::device::{DeviceKind, Precision};
use crate::distributed::{DataParallel, Replica};
use crate::error::Result;
use crate::invalid;
use crate::model::{gpt2, ModelConfig};
use crate::tensor::{Rng, Tensor};
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::{accumulate_gradients, apply_gradients, params_to_device, train_step, StepConfig};

/// Untimed steps before the timed ones of `bench train`.
pub const WARMUP_STEPS: usize = 3;

/// What `multitoken bench train` reports (docs/cli.md lists the JSON keys).
#[derive(Debug, Serialize)]
pub struct BenchTrainResult {
    /// B·T tokens over the median step time
    pub tokens_per_s: f64,
    /// the median time of a timed step, in milliseconds
    pub step_ms: f64,
    /// the process's peak resident memory (VmHWM), model and all
    pub peak_rss_bytes: u64,
    /// what was timed: `model`, `vocab_size`, `horizon`, `rank`, `batch`, `seq`, `steps`
    #[serde(flatten)]
    pub bench: TrainBench,
    /// the CPU threads of rayon's pool
    pub threads: usize,
    /// every timed step's time in milliseconds, in order
    pub step_ms_all: Vec<f64>,
    /// where the steps ran
    pub device: DeviceKind,
    /// f32, TF32 or bf16 matrix products
    pub precision: Precision,
    /// the matrix products' floating-point operations per trained token, forward and backward
    /// ([`model_flops_per_token`])
    pub model_flops_per_token: f64,
    /// model FLOPs per token times tokens per second, in TFLOP/s: divided by what the card's
    /// products can do, the model-FLOP utilisation
    pub model_tflop_per_s: f64,
    /// CUDA: the most bytes the memory pool held at once, in use or cached for reuse (what
    /// PyTorch calls `max_memory_reserved`), from the first timed step on
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
    /// CUDA: the most bytes in use at once (PyTorch's `max_memory_allocated`)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_in_use_bytes: Option<u64>,
    /// CUDA: allocations the pool asked the driver for during the timed steps (0 once warm)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_allocations_timed: Option<u64>,
    /// CUDA: the device's name
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// the GPUs the batch was shared out over, data parallel (1: one device)
    pub gpus: usize,
    /// several GPUs: the median device time of a step's gradient all-reduce, in milliseconds;
    /// it runs after the backward pass, so none of it is hidden
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_reduce_ms: Option<f64>,
}

/// The middle value (the upper one of an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The process's peak resident set size in bytes (Linux), or 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The memory the system has, in bytes (Linux: MemTotal), where known.
pub fn total_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
    Some(kb * 1024)
}

/// This machine's memory in bytes when `needed` bytes would not fit in it; None when they
/// would, or when the system does not say. (What the CPU commands check before allocating.)
pub fn memory_short_of(needed: u128) -> Option<u64> {
    total_memory_bytes().filter(|&total| needed > total as u128)
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u128) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The floating-point operations of the matrix products per trained token, forward and backward
/// (the backward pass does each product twice more), counted as nanoGPT and llm.c count them: the
/// blocks' linear layers 24·L·C², the head's n·r expanders 2·n·r·C² (when n·r > 1) and its
/// n·r component logits 2·n·r·C·V, all times three, plus attention's 12·L·T·C (as if not causal).
pub fn model_flops_per_token(config: &ModelConfig, seq: usize) -> f64 {
    let (c, l, v) = (config.n_embd as f64, config.n_layer as f64, config.vocab_size as f64);
    let components = (config.horizon * config.rank) as f64;
    let expanders = if components > 1.0 { 2.0 * components * c * c } else { 0.0 };
    3.0 * (24.0 * l * c * c + expanders + 2.0 * components * c * v) + 12.0 * l * seq as f64 * c
}

/// What `bench train` times: a preset with its head, and the shape of the steps.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    /// the model preset
    pub model: String,
    /// V, of the random tokens
    pub vocab_size: usize,
    /// n, the head's horizon
    pub horizon: usize,
    /// r, the head's rank
    pub rank: usize,
    /// B, rows per step (over all GPUs)
    pub batch: usize,
    /// T, positions per row
    pub seq: usize,
    /// the number of timed steps
    pub steps: usize,
}

impl TrainBench {
    /// The model, once the flags are checked against it and this machine's memory.
    pub fn config(&self, device: DeviceKind) -> Result<ModelConfig> {
        let TrainBench { batch, seq, steps, .. } = *self;
        let config = ModelConfig::preset(&self.model, self.vocab_size, self.horizon, self.rank)?;
        if seq == 0 || seq > config.n_positions || batch == 0 || steps == 0 {
            return invalid!("need 1 ≤ --seq ≤ {} and --batch, --steps ≥ 1", config.n_positions);
        }
        let most = crate::train::MAX_TOKENS_PER_STEP;
        if batch.saturating_mul(seq) > most {
            return invalid!("--batch {batch} × --seq {seq} is more than {most} tokens per step");
        }
        crate::device::check_available(device)?;
        crate::train::check_memory(&config, device)?;
        Ok(config)
    }
}

/// Full training steps on random tokens; with `MULTITOKEN_PROFILE=1` the tape's table of time
/// per op comes back too. With `replica`, this process is one rank of a data-parallel run:
/// `bench.batch` is the global batch, of which it trains its share.
pub fn bench_train(bench: &TrainBench, device: DeviceKind, precision: Precision, replica: Option<&Replica>) -> Result<BenchTrainResult> {
    let config = bench.config(device)?;
    let TrainBench { vocab_size, horizon, batch, seq, steps, .. } = *bench;
    let on = device.open_on(precision, replica.map_or(0, |r| r.local_rank))?;
    let mut replicas = replica.map(|r| DataParallel::join(r, &on)).transpose()?;
    let mut rng = Rng::new(0);
    let params = gpt2::init_params::<f32>(&config, &mut rng);
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &refs).to_device(&on)?;
    let mut params = params_to_device(&config, &params, &on)?;
    let step_config = StepConfig { lr: 1e-4, grad_clip: 1.0, aux_coef: 0.01 };
    let mut times = Vec::new();
    let mut all_reduce_times = Vec::new();
    let mut driver_allocations_before = 0;
    for step in 0..WARMUP_STEPS + steps {
        let rows: Vec<Vec<u32>> = (0..batch).map(|_| (0..seq + horizon).map(|_| rng.below(vocab_size) as u32).collect()).collect();
        let row_refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut data = Batch::from_rows(&row_refs, seq, horizon);
        if let Some(replicas) = &replicas {
            data = data.shard(replicas.rank(), replicas.world_size());
        }
        if step == WARMUP_STEPS {
            let _ = crate::autograd::profile_report(); // forget the warm-up's times
            if let Some(gpu) = on.gpu() {
                gpu.reset_memory_peaks();
                driver_allocations_before = gpu.memory_stats().driver_allocations;
            }
        }
        let tick = Instant::now();
        // on a GPU a step returns once the gradient norm is read, with only the optimizer's
        // update still queued; the next step waits for it, so over the timed steps the times
        // add up to the device's work
        match &mut replicas {
            None => {
                train_step(&config, &mut params, &mut optimizer, &data, step_config, &|_| true)?;
            }
            Some(replicas) => {
                let (objective, mut grads) =
                    accumulate_gradients(&config, &params, std::slice::from_ref(&data), step_config.aux_coef, &|_| true)?;
                replicas.average(&mut grads, objective, false, std::time::Duration::ZERO)?;
                apply_gradients(&mut params, &mut optimizer, &grads, 1, step_config)?;
            }
        }
        if step >= WARMUP_STEPS {
            times.push(tick.elapsed().as_secs_f64() * 1e3);
            if let Some(replicas) = &replicas {
                all_reduce_times.push(replicas.last_all_reduce_ms()?);
            }
        }
    }
    let step_ms = median(&times);
    let memory = on.gpu().map(|gpu| gpu.memory_stats());
    let tokens_per_s = (batch * seq) as f64 / (step_ms / 1e3);
    let flops_per_token = model_flops_per_token(&config, seq);
    Ok(BenchTrainResult {
        tokens_per_s,
        step_ms,
        peak_rss_bytes: peak_rss_bytes(),
        bench: bench.clone(),
        threads: rayon::current_num_threads(),
        step_ms_all: times,
        device,
        precision,
        model_flops_per_token: flops_per_token,
        model_tflop_per_s: flops_per_token * tokens_per_s / 1e12,
        peak_gpu_bytes: memory.map(|m| m.peak_held as u64),
        peak_gpu_in_use_bytes: memory.map(|m| m.peak_in_use as u64),
        driver_allocations_timed: memory.map(|m| m.driver_allocations - driver_allocations_before),
        gpu: on.gpu().map(|gpu| gpu.name().to_string()),
        gpus: replica.map_or(1, |r| r.world_size),
        all_reduce_ms: (!all_reduce_times.is_empty()).then(|| median(&all_reduce_times)),
    })
}

/// What `multitoken bench decode` reports: autoregressive decoding with a KV cache against
/// self-speculative decoding, same model, same prompt, same sampling settings.
#[derive(Debug, Serialize)]
pub struct BenchDecodeResult {
    /// how the speculative decoder drafted (`--draft`)
    pub draft: crate::decode::Draft,
    /// sequences decoded together (`--batch`): copies of the prompt seeded `seed`, `seed` + 1, …;
    /// the tokens/s count the new tokens of all of them
    pub batch: usize,
    /// autoregressive decoding: new tokens per second, the median over the repeats
    pub ar_tokens_per_s: f64,
    /// self-speculative decoding: new tokens per second, the median over the repeats
    pub spec_tokens_per_s: f64,
    /// `spec_tokens_per_s / ar_tokens_per_s`
    pub speedup: f64,
    /// new tokens per forward pass of the last speculative run
    pub mean_accepted: f64,
    /// acceptance rate at draft positions s = 1..n−1
    pub acceptance_rates: Vec<f64>,
    /// backbone passes of the last speculative run (prefill not counted)
    pub forward_passes: usize,
    /// the number of new tokens each run asked for
    pub max_new_tokens: usize,
    /// greedy only: whether both decoders produced the same tokens (they must)
    pub identical_output: Option<bool>,
    /// cost of one speculative pass over one autoregressive pass
    pub step_cost_ratio: f64,
    /// where the last autoregressive run's time went
    pub ar_timing: crate::decode::generate::Timing,
    /// where the last speculative run's time went
    pub spec_timing: crate::decode::generate::Timing,
    /// timed runs of each decoder
    pub repeats: usize,
    /// the CPU threads of rayon's pool
    pub threads: usize,
    /// where the decoders ran
    pub device: DeviceKind,
    /// the weights the passes streamed: f32, or bf16 copies of the large ones (GPU only)
    pub precision: Precision,
    /// the bytes of the weights a speculative pass reads: every block, the final LayerNorm, wte
    /// (the unembedding) and the head's expanders and gate (wpe's few rows and the KV cache
    /// apart); in bf16 the blocks' linear weights, wte and the expanders at 2 bytes an element
    /// (one sequence's passes read those copies; a batch's passes over more than 8 rows read
    /// the f32 weights, which this count does not follow)
    pub weight_bytes_per_pass: u64,
    /// `weight_bytes_per_pass` over the median time of a speculative pass
    pub achieved_bandwidth_bytes_per_s: f64,
    /// the bytes of the weights an autoregressive pass reads: as a speculative pass's, but of
    /// the expanders only the next-token horizon's `W[α,0]`
    pub ar_weight_bytes_per_pass: u64,
    /// `ar_weight_bytes_per_pass` over the median time of an autoregressive pass
    pub ar_achieved_bandwidth_bytes_per_s: f64,
    /// the device's copy bandwidth, measured in the same run: bytes copied per second from one
    /// buffer of 256 MiB to another (on the GPU device to device, on the CPU by every thread)
    pub copy_bandwidth_bytes_per_s: f64,
    /// with `MULTITOKEN_PROFILE=1` on the GPU: the passes' phases, summed over every run
    #[serde(skip)]
    pub gpu_profile: Option<String>,
}

/// The bytes of the weights a decoding pass reads that uses the expanders of the first
/// `horizons` horizons: all n for a speculative pass, one for an autoregressive pass (see
/// [`BenchDecodeResult::weight_bytes_per_pass`]).
pub fn weight_bytes_per_pass(params: &crate::model::ModelParams<crate::tensor::Tensor<f32>>, horizons: usize, precision: Precision) -> u64 {
    let element_bytes = |name: &str| match precision {
        Precision::Bf16 if streamed_in_bf16(name) => 2,
        _ => 4,
    };
    let read = params.named().into_iter().filter(|(name, _)| name != "transformer.wpe.weight");
    let all: u64 = read.map(|(name, tensor)| tensor.len() as u64 * element_bytes(&name)).sum();
    // the expanders W (r, n, C, C): of each component, only the horizons used
    let unused = params.head.as_ref().map_or(0, |head| {
        let n = head.expand_weight.shape()[1];
        head.expand_weight.len() as u64 * element_bytes("mtp.expand.weight") / n as u64 * n.saturating_sub(horizons) as u64
    });
    all - unused
}

/// Whether decoding in bf16 streams the parameter `name` as a bf16 copy: the blocks' linear
/// weights, wte and the expanders (`decode::cuda`); LayerNorms, biases and the gate stay f32.
fn streamed_in_bf16(name: &str) -> bool {
    let linear = [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"];
    name == "transformer.wte.weight" || name == "mtp.expand.weight" || linear.iter().any(|suffix| name.ends_with(suffix))
}

/// Bytes per second copied between two buffers of 256 MiB on `device`: the median of five
/// copies, after one untimed.
pub fn copy_bandwidth(device: &crate::tensor::Device) -> Result<f64> {
    const BYTES: usize = 256 << 20;
    let mut times = Vec::new();
    match device.gpu() {
        Some(gpu) => {
            let (source, target) = (gpu.alloc::<f32>(BYTES / 4)?, gpu.alloc::<f32>(BYTES / 4)?);
            for _ in 0..6 {
                gpu.synchronize()?;
                let started = Instant::now();
                gpu.copy(source.view(), target.view())?;
                gpu.synchronize()?;
                times.push(started.elapsed().as_secs_f64());
            }
        }
        None => {
            use rayon::prelude::*;
            let (source, mut target) = (vec![1u8; BYTES], vec![0u8; BYTES]);
            let chunk = BYTES / rayon::current_num_threads().max(1);
            for _ in 0..6 {
                let started = Instant::now();
                target.par_chunks_mut(chunk).zip(source.par_chunks(chunk)).for_each(|(t, s)| t.copy_from_slice(s));
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(BYTES as f64 / times[times.len() / 2])
}

/// New tokens of each decoder's warm-up run in `bench decode`: enough for every shape a pass
/// takes (passes of 1 to n tokens, head requests of 1 to n states).
const WARM_UP_TOKENS: usize = 32;

/// Times both decoders `repeats` times, alternating, after an untimed warm-up, and reports the
/// medians. With `batch` > 1 each run decodes that many copies of the prompt together
/// ([`decode_batch`](crate::decode::generate::decode_batch), on a GPU
/// [`GpuDecoder::decode_batch`](crate::decode::cuda::GpuDecoder::decode_batch)).
#[allow(clippy::too_many_arguments)]
pub fn bench_decode(
    config: &crate::model::ModelConfig,
    params: &crate::model::ModelParams<crate::tensor::Tensor<f32>>,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &crate::decode::SamplingConfig,
    seed: u64,
    repeats: usize,
    device: DeviceKind,
    draft: crate::decode::Draft,
    batch: usize,
    precision: Precision,
) -> Result<BenchDecodeResult> {
    use crate::decode::generate::{decode_batch, AcceptanceRule};
    use crate::decode::{DecodeRequest, Generation};
    crate::device::check_available(device)?;
    if batch == 0 {
        return crate::invalid!("--batch 0: decode at least one sequence (--batch 1 or more)");
    }
    if seed.checked_add(batch as u64 - 1).is_none() {
        return crate::invalid!(
            "--seed {seed} with --batch {batch}: the copies' seeds (--seed + k) would pass the largest seed; choose a smaller --seed"
        );
    }
    if device == DeviceKind::Cpu {
        crate::decode::generate::check_cache_memory(config, batch, std::mem::size_of::<f32>())?;
    }
    precision.check_device(device)?;
    let on = device.open(Precision::F32)?;
    let mut gpu_decoder = match on.gpu() {
        Some(gpu) => Some(crate::decode::cuda::GpuDecoder::in_precision(gpu, config, params, batch, precision)?),
        None => None,
    };
    // a warm-up run is untimed and shorter: the first passes pay for what is made once (on the
    // GPU: modules loaded, cuBLASLt plans for each product shape), which would otherwise land in
    // the first repeat and in the profile of where a pass goes
    // each run: the batch's generations as one (tokens of every sequence, passes of every
    // sequence, the batch's wall-clock), and the number of backbone passes the batch ran
    let mut run = |speculative: bool, warm_up: bool| -> Result<(Generation, usize)> {
        let max_new_tokens = if warm_up { max_new_tokens.min(WARM_UP_TOKENS) } else { max_new_tokens };
        let request = |seed, progress| DecodeRequest { prompt, max_new_tokens, sampling, seed, progress, stop_at: None, draft };
        let mut callbacks: Vec<_> = (0..batch).map(|_| |_| {}).collect();
        let requests = callbacks.iter_mut().zip(0..).map(|(progress, k)| request(seed + k, progress)).collect();
        let generations = match gpu_decoder.as_mut() {
            Some(decoder) => {
                let generations = decoder.decode_batch(params, requests, speculative)?;
                if warm_up {
                    decoder.reset_profile();
                }
                generations
            }
            None => decode_batch(config, params, requests, speculative, AcceptanceRule::Exact)?,
        };
        // from the batch's start (its caches and weights set up) to its last sequence's end
        let elapsed_s = generations.iter().map(|g| g.elapsed_s).fold(0.0, f64::max);
        let passes = generations.iter().map(|g| g.forward_passes).max().unwrap_or(0);
        let mut all = generations[0].clone();
        for more in &generations[1..] {
            all.tokens.extend(&more.tokens);
            all.forward_passes += more.forward_passes;
            all.drafted.iter_mut().zip(&more.drafted).for_each(|(a, b)| *a += b);
            all.accepted.iter_mut().zip(&more.accepted).for_each(|(a, b)| *a += b);
        }
        all.elapsed_s = elapsed_s;
        Ok((all, passes))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    run(false, true)?;
    run(true, true)?;
    let (mut ar_runs, mut spec_runs) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        ar_runs.push(run(false, false)?);
        spec_runs.push(run(true, false)?);
    }
    let ar_tokens_per_s = median(ar_runs.iter().map(|(g, _)| g.tokens_per_s()).collect());
    let spec_tokens_per_s = median(spec_runs.iter().map(|(g, _)| g.tokens_per_s()).collect());
    let ((ar, _), (spec, _)) = (ar_runs.last().expect("one run"), spec_runs.last().expect("one run"));
    let gpu_profile = gpu_decoder.as_ref().map(|decoder| decoder.profile_report());
    let weight_bytes = weight_bytes_per_pass(params, config.horizon, precision);
    let ar_weight_bytes = weight_bytes_per_pass(params, 1, precision);
    let copy_bandwidth_bytes_per_s = copy_bandwidth(&on)?;
    // time per backbone pass (of the whole batch)
    let ar_step = median(ar_runs.iter().map(|(g, passes)| g.elapsed_s / (*passes).max(1) as f64).collect());
    let spec_step = median(spec_runs.iter().map(|(g, passes)| g.elapsed_s / (*passes).max(1) as f64).collect());
    Ok(BenchDecodeResult {
        draft,
        batch,
        ar_tokens_per_s,
        spec_tokens_per_s,
        speedup: spec_tokens_per_s / ar_tokens_per_s,
        mean_accepted: spec.mean_accepted(),
        acceptance_rates: spec.acceptance_rates(),
        forward_passes: spec.forward_passes,
        max_new_tokens,
        identical_output: sampling.greedy.then(|| ar.tokens == spec.tokens),
        step_cost_ratio: spec_step / ar_step,
        ar_timing: ar.timing.clone(),
        spec_timing: spec.timing.clone(),
        repeats: repeats.max(1),
        threads: rayon::current_num_threads(),
        device,
        precision,
        weight_bytes_per_pass: weight_bytes,
        achieved_bandwidth_bytes_per_s: weight_bytes as f64 / spec_step,
        ar_weight_bytes_per_pass: ar_weight_bytes,
        ar_achieved_bandwidth_bytes_per_s: ar_weight_bytes as f64 / ar_step,
        copy_bandwidth_bytes_per_s,
        gpu_profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nanoGPT's estimate, 6 FLOPs per parameter and token plus attention's 12·L·T·C, counts the
    /// same products from the parameters: without the position table (a lookup, no product), the
    /// biases and LayerNorms it differs by under 1 % at GPT-2's shape.
    #[test]
    fn flops_per_token_agree_with_six_per_parameter_at_next_token() {
        let config = ModelConfig::preset("gpt2", 50257, 1, 1).unwrap();
        let (seq, c, l) = (1024.0, 768.0, 12.0);
        let parameters = config.parameter_count() as f64 - config.n_positions as f64 * c;
        let estimate = 6.0 * parameters + 12.0 * l * seq * c;
        let ours = model_flops_per_token(&config, 1024);
        assert!((ours / estimate - 1.0).abs() < 0.01, "{ours:e} against {estimate:e}");
        // the CP head at n = 4, r = 4: its expanders and gate are parameters (6 FLOPs each a
        // token); its n·r − 1 further logit rows reuse wte, 6·C·V each
        let (one, cp) = (ModelConfig::preset("gpt2", 50257, 1, 1).unwrap(), ModelConfig::preset("gpt2", 50257, 4, 4).unwrap());
        let head_parameters = (cp.parameter_count() - one.parameter_count()) as f64;
        let estimate = 6.0 * head_parameters + 6.0 * 15.0 * c * 50257.0;
        let extra = model_flops_per_token(&cp, 1024) - model_flops_per_token(&one, 1024);
        assert!((extra / estimate - 1.0).abs() < 0.01, "{extra:e} against {estimate:e}");
    }

    /// A speculative pass reads every weight but wpe; an autoregressive one, of the expanders W
    /// (r, n, C, C), only the next-token horizon's r·C·C. In bf16 the blocks' linear weights,
    /// wte and the expanders take 2 bytes an element, the rest 4.
    #[test]
    fn an_autoregressive_pass_reads_one_horizon_of_the_expanders() {
        let config = ModelConfig { vocab_size: 40, n_positions: 8, n_embd: 8, n_layer: 1, n_head: 2, horizon: 4, rank: 3 };
        let params = crate::model::gpt2::init_params::<f32>(&config, &mut crate::tensor::Rng::new(0));
        let all: u64 = params.named().iter().map(|(_, t)| t.len() as u64 * 4).sum();
        let (wpe, expanders) = ((8 * 8 * 4) as u64, (3 * 4 * 8 * 8 * 4) as u64);
        assert_eq!(weight_bytes_per_pass(&params, 4, Precision::F32), all - wpe);
        assert_eq!(weight_bytes_per_pass(&params, 1, Precision::F32), all - wpe - expanders / 4 * 3);
        // bf16 saves 2 bytes an element of the block's linear weights (12·C·C), wte (V·C) and
        // the expanders a pass reads (r·C·C a horizon)
        let (linear, wte, horizon) = ((12 * 8 * 8) as u64, (40 * 8) as u64, (3 * 8 * 8) as u64);
        assert_eq!(weight_bytes_per_pass(&params, 4, Precision::Bf16), all - wpe - 2 * (linear + wte + 4 * horizon));
        assert_eq!(weight_bytes_per_pass(&params, 1, Precision::Bf16), all - wpe - expanders / 4 * 3 - 2 * (linear + wte + horizon));
        // without a head (n = r = 1) both passes read the same
        let plain = ModelConfig { horizon: 1, rank: 1, ..config };
        let params = crate::model::gpt2::init_params::<f32>(&plain, &mut crate::tensor::Rng::new(0));
        assert_eq!(weight_bytes_per_pass(&params, 1, Precision::F32), weight_bytes_per_pass(&params, plain.horizon, Precision::F32));
    }
}
