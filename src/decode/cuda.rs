//! Decoding on the GPU (`sample` and `bench decode` with `--device cuda`): the KV caches and the
//! backbone passes run on the device (`decode::pass::pass` with this file's kernels, each pass
//! length recorded once into a CUDA graph and replayed). One sequence's whole speculative step
//! runs there too (`GpuStepEngine`, a `StepEngine` for `decode::generate::decode_loop`): the
//! pass, the head at the new rows, verification, acceptance and the next drafts in one graph,
//! the host learning only tokens. With top-k or top-p, and for several sequences
//! (`decode_batch_on`), the step runs on the host instead, the head's vocabulary-sized products
//! here; per step that moves hidden states (C floats a token) and the probabilities it reads
//! (r·V floats a horizon).
//!
//! Decoding in bf16 ([`GpuDecoder::in_precision`], `--precision bf16`) streams bf16 copies of
//! the weights that passes of few rows read (every block's linear layers, the head's expanders
//! and wte as the unembedding), half the bytes of f32; the few-row kernels widen them and compute
//! in f32, and everything else (the embedding, LayerNorms, the gate, the KV caches, the step's
//! distributions) stays f32. Products over more rows than those kernels take (a prefill, many
//! sequences at once) run on cuBLAS in f32 with the f32 weights: rounding their inputs would
//! take memory from the pool inside a graph's capture, where the driver allows no allocation.

use std::rc::Rc;

use multitoken_cuda::{
    AttentionShape, Buffer, CacheRows, ColumnWeights, Epilogue, Gpu, Graph, Operand, PinnedBuffer, ProductPrecision, StepBuffers,
    StepChoice, View, ACCEPT_ALWAYS, ACCEPT_EXACT, ACCEPT_RESAMPLE_FROM_TARGET, FEW_ROW_LAYERNORM_WIDTH_MAX, STEP_ACCEPTED, STEP_DRAFTS,
    STEP_NEXT, STEP_NOT_FINITE, TILE_ROWS_MAX,
};

use crate::decode::generate::{decode_batch_on, decode_loop, not_finite, AcceptanceRule, HostEngine, StepEngine, StepOutcome, StepRequest};
use crate::decode::head::{Head, HeadProducts, HeadState};
use crate::decode::pass::{pass, BatchBackbone, Linear, OneSequence, PassKernels};
use crate::decode::{DecodeRequest, Draft, Generation, SamplingConfig};
use crate::device::Precision;
use crate::error::Result;
use crate::invalid;
use crate::model::params::BlockParams;
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Rng, Tensor};

/// With `MULTITOKEN_PROFILE=1`, a decoding pass waits for the device after each phase and adds
/// its wall time to a table (printed by `bench decode`); otherwise nothing is measured.
#[derive(Default)]
pub struct PhaseProfile {
    enabled: bool,
    last: std::cell::Cell<Option<std::time::Instant>>,
    totals: std::cell::RefCell<Vec<(&'static str, f64, usize)>>,
}

impl PhaseProfile {
    fn from_env() -> Self {
        PhaseProfile { enabled: crate::autograd::profiling_enabled(), ..Default::default() }
    }

    /// Ends the phase that started at the previous mark (or at `start`).
    fn mark(&self, gpu: &Gpu, label: &'static str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        gpu.synchronize()?;
        let now = std::time::Instant::now();
        if let Some(last) = self.last.replace(Some(now)) {
            add_phase(&mut self.totals.borrow_mut(), label, (now - last).as_secs_f64(), 1);
        }
        Ok(())
    }

    /// Like [`PhaseProfile::start`], but the time since the last mark counts as `gap` (the
    /// host's own work between device calls).
    fn resume(&self, gpu: &Gpu, gap: &'static str) -> Result<()> {
        match self.last.get() {
            Some(_) => self.mark(gpu, gap),
            None => self.start(gpu),
        }
    }

    fn start(&self, gpu: &Gpu) -> Result<()> {
        if self.enabled {
            gpu.synchronize()?;
            self.last.set(Some(std::time::Instant::now()));
        }
        Ok(())
    }

    /// Forgets what was measured so far (after warm-up, which loads kernels lazily).
    pub fn reset(&self) {
        self.totals.borrow_mut().clear();
    }

    /// Moves everything measured so far into `other` (adding to its phases of the same name) and
    /// starts afresh.
    fn move_into(&self, other: &PhaseProfile) {
        self.last.set(None);
        let mut totals = other.totals.borrow_mut();
        for (label, seconds, calls) in self.totals.borrow_mut().drain(..) {
            add_phase(&mut totals, label, seconds, calls);
        }
    }

    /// The table of phases: total milliseconds, calls, share.
    pub fn report(&self) -> String {
        let totals = self.totals.borrow();
        let all: f64 = totals.iter().map(|(_, s, _)| s).sum();
        let mut out = format!("{:<28} {:>10} {:>7} {:>6}\n", "GPU phase", "total ms", "calls", "share");
        for (label, seconds, calls) in totals.iter() {
            out += &format!("{label:<28} {:>10.1} {calls:>7} {:>5.1}%\n", seconds * 1e3, 100.0 * seconds / all.max(1e-12));
        }
        out
    }
}

fn add_phase(totals: &mut Vec<(&'static str, f64, usize)>, label: &'static str, seconds: f64, calls: usize) {
    match totals.iter_mut().find(|(l, _, _)| *l == label) {
        Some(entry) => {
            entry.1 += seconds;
            entry.2 += calls;
        }
        None => totals.push((label, seconds, calls)),
    }
}

/// Views of a flat buffer laid out as the model's parameters, in the order of `ModelParams::build`.
fn param_views(config: &ModelConfig, flat: View<f32>) -> ModelParams<View<f32>> {
    let mut offset = 0;
    let result: std::result::Result<_, std::convert::Infallible> = ModelParams::build(config, |spec| {
        let len: usize = spec.shape.iter().product();
        let view = flat.slice(offset, len);
        offset += len;
        Ok(view)
    });
    match result {
        Ok(params) => params,
        Err(never) => match never {},
    }
}

/// The model on the GPU, ready to decode: weights, the KV cache and the scratch buffers.
pub struct GpuDecoder<'a> {
    config: ModelConfig,
    /// the weights' allocation, which the views in `backbone` and `head` point into
    _weights: Buffer<f32>,
    backbone: GpuBackbone<'a>,
    head: GpuHead<'a>,
    /// the speculative step's buffers and graphs (the first sequence's)
    step: DeviceStep,
    /// whether one sequence's step runs on the device where it can (the default, unless
    /// `MULTITOKEN_DEVICE_STEP=0`, which keeps it on the host for a comparison)
    device_step: bool,
    /// with `MULTITOKEN_PROFILE=1`: the phases of every autoregressive, then speculative, decode
    profiles: [PhaseProfile; 2],
}

impl<'a> GpuDecoder<'a> {
    /// Uploads `params` to `gpu` as one allocation and prepares the backbone (KV cache, scratch
    /// buffers) and the head for decoding one sequence at a time, in f32.
    pub fn new(gpu: &'a Gpu, config: &ModelConfig, params: &ModelParams<Tensor<f32>>) -> Result<Self> {
        Self::with_sequences(gpu, config, params, 1)
    }

    /// As [`new`](Self::new), with a KV cache for each of `sequences` sequences decoded together
    /// ([`decode_batch`](Self::decode_batch)).
    pub fn with_sequences(gpu: &'a Gpu, config: &ModelConfig, params: &ModelParams<Tensor<f32>>, sequences: usize) -> Result<Self> {
        Self::in_precision(gpu, config, params, sequences, Precision::F32)
    }

    /// As [`with_sequences`](Self::with_sequences), streaming the weights of passes of few rows
    /// in `precision`: f32, or bf16 copies of the large ones (the module's comment).
    pub fn in_precision(
        gpu: &'a Gpu,
        config: &ModelConfig,
        params: &ModelParams<Tensor<f32>>,
        sequences: usize,
        precision: Precision,
    ) -> Result<Self> {
        if sequences == 0 {
            return invalid!("a decoder needs room for at least one sequence");
        }
        let bf16 = match precision {
            Precision::F32 => false,
            Precision::Bf16 => true,
            Precision::Tf32 => return invalid!("decoding streams its weights in f32 or bf16, not tf32"),
        };
        let c = config.n_embd;
        if bf16 && !(gpu.few_row_linear && c.is_multiple_of(4) && c <= FEW_ROW_LAYERNORM_WIDTH_MAX) {
            // without them every product would read the f32 weights, and bf16 would be a name
            return invalid!(
                "--precision bf16 needs decoding's few-row kernels, which take n_embd a multiple of 4 up to {FEW_ROW_LAYERNORM_WIDTH_MAX} \
                 (this model's: {c}) and are off with MULTITOKEN_FEW_ROW_LINEAR=0; decode with --precision f32"
            );
        }
        if gpu.precision == ProductPrecision::Bf16 {
            // its products would round their inputs into memory taken inside a graph's capture
            return invalid!(
                "a decoder needs a GPU whose products run in f32 or TF32; to decode in bf16, give GpuDecoder::in_precision bf16"
            );
        }
        let mut flat: Vec<f32> = Vec::new();
        for (_, tensor) in params.named() {
            flat.extend(tensor.to_host()?.into_vec());
        }
        let weights = gpu.upload(&flat)?;
        let views = param_views(config, weights.view());
        let profile = Rc::new(PhaseProfile::from_env());
        Ok(GpuDecoder {
            config: config.clone(),
            backbone: GpuBackbone::new(gpu, config, views.clone(), sequences, bf16, profile.clone())?,
            head: GpuHead::new(gpu, config, views, sequences, bf16, profile)?,
            step: DeviceStep::new(gpu, config)?,
            device_step: std::env::var("MULTITOKEN_DEVICE_STEP").as_deref() != Ok("0"),
            _weights: weights,
            profiles: Default::default(),
        })
    }

    /// Decodes as `decode::decode` does on the CPU; `params` is the host copy (for the gate).
    /// The whole step runs on the device where it can ([`device_step_supports`]: greedy, or
    /// sampling without top-k and top-p); otherwise on the host with the head's products here.
    pub fn decode(&mut self, params: &ModelParams<Tensor<f32>>, request: DecodeRequest, speculative: bool) -> Result<Generation> {
        self.decode_with_rule(params, request, speculative, AcceptanceRule::Exact)
    }

    /// [`decode`](Self::decode) with a choice of acceptance rule for sampled drafts (for tests).
    pub fn decode_with_rule(
        &mut self,
        params: &ModelParams<Tensor<f32>>,
        request: DecodeRequest,
        speculative: bool,
        rule: AcceptanceRule,
    ) -> Result<Generation> {
        if !(self.device_step && device_step_supports(request.sampling)) {
            return self.decode_on_host_with_rule(params, request, speculative, rule);
        }
        let mut engine = GpuStepEngine {
            backbone: &mut self.backbone,
            head: &self.head,
            step: &mut self.step,
            n: if speculative { self.config.horizon } else { 1 },
            rule,
            drafts: Vec::new(),
            unprimed_s: None,
        };
        let generation = decode_loop(&self.config, &mut engine, request, speculative);
        self.keep_profile(speculative);
        generation
    }

    /// Decodes with the step on the host (drafts, verification and sampling there; the backbone
    /// and the head's products on the device): any sampling, and the comparison for the
    /// device's step.
    pub fn decode_on_host(&mut self, params: &ModelParams<Tensor<f32>>, request: DecodeRequest, speculative: bool) -> Result<Generation> {
        self.decode_on_host_with_rule(params, request, speculative, AcceptanceRule::Exact)
    }

    fn decode_on_host_with_rule(
        &mut self,
        params: &ModelParams<Tensor<f32>>,
        request: DecodeRequest,
        speculative: bool,
        rule: AcceptanceRule,
    ) -> Result<Generation> {
        let head = Head::with_device(&self.config, params, &self.head);
        let mut first = OneSequence { backbone: &mut self.backbone, sequence: 0 };
        let generation = decode_loop(&self.config, &mut HostEngine::new(&mut first, &head, rule), request, speculative);
        self.keep_profile(speculative);
        generation
    }

    /// Decodes up to as many requests as the decoder has sequences together, as
    /// `decode::generate::decode_batch` does on the CPU: one backbone pass a step for all of
    /// them, and the head's products of all of them in one round trip where they are known
    /// together.
    pub fn decode_batch(
        &mut self,
        params: &ModelParams<Tensor<f32>>,
        requests: Vec<DecodeRequest>,
        speculative: bool,
    ) -> Result<Vec<Generation>> {
        if let [_] = requests[..] {
            let request = requests.into_iter().next().expect("one request");
            return Ok(vec![self.decode(params, request, speculative)?]);
        }
        let head = Head::with_device(&self.config, params, &self.head);
        let generations = decode_batch_on(&self.config, &mut self.backbone, &head, requests, speculative, AcceptanceRule::Exact);
        self.keep_profile(speculative);
        generations
    }

    /// The head's states at hidden rows (m, C) with horizons 0..`horizons`, products on the GPU.
    pub fn head_states(&self, params: &ModelParams<Tensor<f32>>, hidden: &[f32], horizons: usize) -> Result<Vec<HeadState<f32>>> {
        Head::with_device(&self.config, params, &self.head).states(hidden, horizons)
    }

    /// One component's distributions `P[α,s]` for the horizons `horizons` at hidden state h (C),
    /// products on the GPU: the top-component draft's.
    pub fn component_probabilities(
        &self,
        params: &ModelParams<Tensor<f32>>,
        hidden: &[f32],
        alpha: usize,
        horizons: std::ops::Range<usize>,
    ) -> Result<Vec<Vec<f32>>> {
        Head::with_device(&self.config, params, &self.head).component_probabilities(hidden, alpha, horizons)
    }

    /// With `MULTITOKEN_PROFILE=1`: where the decodes' time went, autoregressive and speculative
    /// apart: the backbone's and the head's uploads, device work and downloads, and the host's
    /// own work between them.
    pub fn profile_report(&self) -> String {
        let [autoregressive, speculative] = &self.profiles;
        format!("autoregressive decoding:\n{}speculative decoding:\n{}", autoregressive.report(), speculative.report())
    }

    /// Adds the phases of the decode just finished to the autoregressive or speculative table.
    fn keep_profile(&self, speculative: bool) {
        self.backbone.profile.move_into(&self.profiles[speculative as usize]);
    }

    /// Forgets the phases measured so far (after a warm-up).
    pub fn reset_profile(&self) {
        self.profiles.iter().for_each(PhaseProfile::reset);
    }

    /// The first sequence's backbone alone, for tests: hidden states of new tokens after the
    /// cached ones.
    pub fn backbone(&mut self) -> OneSequence<'_, f32> {
        OneSequence { backbone: &mut self.backbone, sequence: 0 }
    }

    /// The backbone of every sequence, for tests.
    pub fn batch_backbone(&mut self) -> &mut dyn BatchBackbone<f32> {
        &mut self.backbone
    }

    /// Whether passes of up to n tokens a sequence replay a captured graph (the default, unless
    /// `MULTITOKEN_CUDA_GRAPHS=0`) or launch their kernels one by one.
    pub fn use_graphs(&mut self, on: bool) {
        self.backbone.use_graphs = on;
        self.backbone.graphs.iter_mut().for_each(|graph| *graph = None);
        self.step.graphs.clear();
    }

    /// How many pass lengths have a captured graph (for tests).
    pub fn captured_passes(&self) -> usize {
        self.backbone.graphs.iter().flatten().count()
    }
}

/// GPT-2 with KV caches on the device, one per sequence decoded together: one layer's keys and
/// values are (S, H, n_positions, hs) each, so a head's cached keys in one sequence are one
/// contiguous matrix for `decode_attention` to walk.
///
/// A pass stacks the new tokens of every sequence that has some (m rows in all): the linear
/// layers run once over all the rows, and one attention kernel runs every row over its own
/// sequence's cache, each row's sequence and position read from a device table of
/// (token id, sequence, position) per row. A decoding pass is some 65 small kernels, and
/// launching them one by one leaves the device idle for much of the pass, each waiting for the
/// host's launch of it. So the first pass of each m up to n·S (S sequences; prefills of that
/// many rows or fewer too) is captured as a graph and every later one replays it: the table is
/// written before the replay, and everything else the kernels touch (weights, caches, scratch)
/// stays where it was; one capture serves every mix of sequences and positions.
struct GpuBackbone<'a> {
    gpu: &'a Gpu,
    config: ModelConfig,
    p: ModelParams<View<f32>>,
    /// every block's linear weights once more, by output column (the few-row kernel's layout;
    /// in bf16 when decoding in bf16), unless that kernel is off or cannot take them (C not a
    /// multiple of 4)
    by_column: Option<ByColumn>,
    /// per layer, every sequence's keys and values: (S, H, n_positions, hs) each
    keys: Vec<Buffer<f32>>,
    values: Vec<Buffer<f32>>,
    /// positions filled, per sequence
    lens: Vec<usize>,
    scratch: Scratch,
    /// the captured pass of m rows at index m, for m up to n·S
    graphs: Vec<Option<Graph>>,
    use_graphs: bool,
    /// shared with the head: one table for the whole pass
    profile: Rc<PhaseProfile>,
}

/// A linear layer's weight on the device in two layouts: as trained, (k, n), which the products
/// over many rows (a prefill) read, and by output column, (n, k), which the few-row kernel reads
/// with each warp streaming a column's contiguous weights.
#[derive(Clone, Copy)]
struct LinearWeight {
    as_trained: View<f32>,
    by_column: Option<ColumnWeights>,
}

/// Every block's four linear weights by output column, transposed on the device once when the
/// decoder is made (in f32, the weights of `base` twice: 340 MB more of device memory; in bf16
/// 170 MB).
struct ByColumn {
    _weights: CopyBuffer,
    /// per block, in the order of [`Linear`]: (n, k) each
    layers: Vec<[ColumnWeights; 4]>,
}

/// A buffer of weights copied for decoding's kernels: in f32, or rounded to bf16.
enum CopyBuffer {
    F32(Buffer<f32>),
    Bf16(Buffer<u16>),
}

impl CopyBuffer {
    /// `len` elements, in bf16 or f32
    fn new(gpu: &Gpu, len: usize, bf16: bool) -> Result<Self> {
        Ok(match bf16 {
            true => CopyBuffer::Bf16(gpu.zeros(len)?),
            false => CopyBuffer::F32(gpu.zeros(len)?),
        })
    }

    fn view(&self) -> ColumnWeights {
        match self {
            CopyBuffer::F32(buffer) => buffer.view().into(),
            CopyBuffer::Bf16(buffer) => buffer.view().into(),
        }
    }

    /// Writes `len` elements from `offset` on: `write` fills an f32 view with them, which is
    /// this buffer's own in f32, and in bf16 a scratch buffer then rounded into it.
    fn write_with(&self, gpu: &Gpu, offset: usize, len: usize, write: impl FnOnce(View<f32>) -> Result<()>) -> Result<()> {
        match self {
            CopyBuffer::F32(buffer) => write(buffer.view().slice(offset, len)),
            CopyBuffer::Bf16(buffer) => {
                let scratch = gpu.alloc::<f32>(len)?;
                write(scratch.view())?;
                Ok(gpu.round_to_bf16(scratch.view(), buffer.view().slice(offset, len))?)
            }
        }
    }
}

/// A block's four linear layers as trained, (weight (k, n), bias (n)), in the order of [`Linear`].
fn linear_layers(block: &BlockParams<View<f32>>) -> [(View<f32>, View<f32>); 4] {
    [
        (block.attn_c_attn_weight, block.attn_c_attn_bias),
        (block.attn_c_proj_weight, block.attn_c_proj_bias),
        (block.mlp_c_fc_weight, block.mlp_c_fc_bias),
        (block.mlp_c_proj_weight, block.mlp_c_proj_bias),
    ]
}

impl ByColumn {
    fn new(gpu: &Gpu, blocks: &[BlockParams<View<f32>>], bf16: bool) -> Result<Self> {
        let total: usize = blocks.iter().flat_map(|block| linear_layers(block).map(|(weight, _)| weight.len())).sum();
        let buffer = CopyBuffer::new(gpu, total, bf16)?;
        let mut offset = 0;
        let mut layers = Vec::with_capacity(blocks.len());
        for block in blocks {
            let mut layer = [buffer.view(); 4];
            for (slot, (weight, bias)) in layer.iter_mut().zip(linear_layers(block)) {
                // (k, n) → (n, k): n is the bias's length
                let n = bias.len();
                buffer.write_with(gpu, offset, weight.len(), |by_column| {
                    Ok(gpu.transpose_last(weight, by_column, (1, weight.len() / n, n))?)
                })?;
                *slot = buffer.view().slice(offset, weight.len());
                offset += weight.len();
            }
            layers.push(layer);
        }
        // the few-row kernel reads its first weights before it waits for the kernel ahead of it
        // (`EarlyLaunch`): the copies are complete before any pass
        gpu.synchronize()?;
        Ok(ByColumn { _weights: buffer, layers })
    }
}

/// Buffers for the rows of one pass: up to n_positions (a prefill), or n for every sequence.
struct Scratch {
    /// (token id, sequence, position) of each row
    rows: Buffer<u32>,
    x: Buffer<f32>,
    x_mid: Buffer<f32>,
    normed: Buffer<f32>,
    mean: Buffer<f32>,
    rstd: Buffer<f32>,
    qkv: Buffer<f32>,
    att_y: Buffer<f32>,
    fc_gelu: Buffer<f32>,
}

impl<'a> GpuBackbone<'a> {
    fn new(
        gpu: &'a Gpu,
        config: &ModelConfig,
        p: ModelParams<View<f32>>,
        sequences: usize,
        bf16: bool,
        profile: Rc<PhaseProfile>,
    ) -> Result<Self> {
        let (c, positions) = (config.n_embd, config.n_positions);
        let rows = positions.max(sequences * config.horizon);
        let f = |len: usize| gpu.zeros::<f32>(len);
        let scratch = Scratch {
            rows: gpu.zeros(3 * rows)?,
            x: f(rows * c)?,
            x_mid: f(rows * c)?,
            normed: f(rows * c)?,
            mean: f(rows)?,
            rstd: f(rows)?,
            qkv: f(rows * 3 * c)?,
            att_y: f(rows * c)?,
            fc_gelu: f(rows * 4 * c)?,
        };
        let cache = || (0..config.n_layer).map(|_| f(sequences * positions * c)).collect::<std::result::Result<Vec<_>, _>>();
        let (graphs, use_graphs) =
            ((0..=sequences * config.horizon).map(|_| None).collect(), std::env::var("MULTITOKEN_CUDA_GRAPHS").as_deref() != Ok("0"));
        Ok(GpuBackbone {
            gpu,
            config: config.clone(),
            by_column: if gpu.few_row_linear && c.is_multiple_of(4) { Some(ByColumn::new(gpu, &p.blocks, bf16)?) } else { None },
            p,
            keys: cache()?,
            values: cache()?,
            lens: vec![0; sequences],
            scratch,
            graphs,
            use_graphs,
            profile,
        })
    }

    /// Queues a pass over m new rows, their places in `rows`; the final hidden states land in
    /// `scratch.normed`.
    fn queue_pass(&self, m: usize, rows: CacheRows) -> Result<()> {
        let mut kernels = GpuPassKernels {
            gpu: self.gpu,
            config: &self.config,
            p: &self.p,
            by_column: self.by_column.as_ref().map(|columns| &columns.layers[..]),
            keys: &self.keys,
            values: &self.values,
            sequences: self.lens.len(),
            s: &self.scratch,
            m,
            rows,
        };
        pass(&mut kernels, self.config.n_layer)
    }

    /// Writes the table of a pass over `runs[i]` at sequence i's next positions: (token id,
    /// sequence, position) of every new row, the runs one after the other, token ids and
    /// positions checked as it is written. Returns the number of rows and the table.
    fn write_rows(&self, runs: &[&[u32]]) -> Result<(usize, CacheRows)> {
        if runs.len() > self.lens.len() {
            return invalid!("{} runs of tokens for a backbone of {} sequences", runs.len(), self.lens.len());
        }
        let mut table: Vec<[u32; 3]> = Vec::new();
        for (sequence, run) in runs.iter().enumerate() {
            let start = self.lens[sequence];
            table.extend(run.iter().zip(start..).map(|(&token, position)| [token, sequence as u32, position as u32]));
        }
        let m = table.len();
        if m == 0 || m > self.scratch.mean.len() {
            return invalid!("a decoding pass runs 1 to {} rows, not {m}", self.scratch.mean.len());
        }
        self.profile.resume(self.gpu, "host: the loop between calls")?;
        let (vocab, positions) = (self.config.vocab_size, self.config.n_positions);
        let rows = self.gpu.write_cache_rows(self.scratch.rows.view(), &table, vocab, self.lens.len(), positions)?;
        self.profile.mark(self.gpu, "backbone: upload tokens")?;
        Ok((m, rows))
    }
}

/// The GPU's kernels of a decoding pass over m new rows, the runs of every sequence stacked:
/// each step one or two launches on the scratch buffers (the residual stream alternates between
/// `x` and `x_mid`); recorded into a graph by the caller.
struct GpuPassKernels<'a> {
    gpu: &'a Gpu,
    config: &'a ModelConfig,
    p: &'a ModelParams<View<f32>>,
    /// per block, its linear weights by output column, in the order of [`Linear`]
    by_column: Option<&'a [[ColumnWeights; 4]]>,
    keys: &'a [Buffer<f32>],
    values: &'a [Buffer<f32>],
    sequences: usize,
    s: &'a Scratch,
    m: usize,
    rows: CacheRows,
}

impl GpuPassKernels<'_> {
    /// A block's linear weight in both layouts.
    fn weight(&self, layer: usize, linear: Linear) -> LinearWeight {
        let (as_trained, _) = linear_layers(&self.p.blocks[layer])[linear as usize];
        LinearWeight { as_trained, by_column: self.by_column.map(|layers| layers[layer][linear as usize]) }
    }

    /// The first m rows of a scratch buffer of rows `width` wide.
    fn rows(&self, buffer: &Buffer<f32>, width: usize) -> View<f32> {
        buffer.view().prefix(self.m * width)
    }

    /// LayerNorm's scratch: its output, each row's mean and 1/std.
    fn norm_scratch(&self) -> (View<f32>, View<f32>, View<f32>) {
        (self.rows(&self.s.normed, self.config.n_embd), self.rows(&self.s.mean, 1), self.rows(&self.s.rstd, 1))
    }

    /// m new rows over the caches of every sequence.
    fn shape(&self) -> AttentionShape {
        let (c, h) = (self.config.n_embd, self.config.n_head);
        AttentionShape { batch: self.sequences, seq: self.m, n_head: h, head_size: c / h }
    }
}

impl PassKernels for GpuPassKernels<'_> {
    fn embed(&mut self) -> Result<()> {
        let c = self.config.n_embd;
        Ok(self.gpu.embedding_forward_at(self.rows, self.p.wte, self.p.wpe, self.rows(&self.s.x, c), c)?)
    }

    fn layernorm_linear(&mut self, layer: usize, linear: Linear) -> Result<()> {
        let (c, block) = (self.config.n_embd, &self.p.blocks[layer]);
        let (x, norm, bias, gelu, out) = match linear {
            Linear::Qkv => {
                let out = self.rows(&self.s.qkv, 3 * c);
                (self.rows(&self.s.x, c), (block.ln_1_weight, block.ln_1_bias), block.attn_c_attn_bias, false, out)
            }
            Linear::MlpUp => {
                let out = self.rows(&self.s.fc_gelu, 4 * c);
                (self.rows(&self.s.x_mid, c), (block.ln_2_weight, block.ln_2_bias), block.mlp_c_fc_bias, true, out)
            }
            other => unreachable!("{other:?} is not a sublayer's input"),
        };
        layernorm_linear(self.gpu, x, norm, self.weight(layer, linear), bias, gelu, out, self.norm_scratch())
    }

    fn attend(&mut self, layer: usize) -> Result<()> {
        let c = self.config.n_embd;
        let (keys, values) = (self.keys[layer].view(), self.values[layer].view());
        let (qkv, att_y) = (self.rows(&self.s.qkv, 3 * c), self.rows(&self.s.att_y, c));
        Ok(self.gpu.decode_attention(qkv, keys, values, att_y, self.shape(), self.rows)?)
    }

    fn add_linear(&mut self, layer: usize, linear: Linear) -> Result<()> {
        let (c, block) = (self.config.n_embd, &self.p.blocks[layer]);
        let (x, x_mid) = (self.rows(&self.s.x, c), self.rows(&self.s.x_mid, c));
        // y · W + b onto the residual stream, from x into x_mid or back
        let (y, bias, residual, out) = match linear {
            Linear::AttentionOut => (self.rows(&self.s.att_y, c), block.attn_c_proj_bias, x, x_mid),
            Linear::MlpDown => (self.rows(&self.s.fc_gelu, 4 * c), block.mlp_c_proj_bias, x_mid, x),
            other => unreachable!("{other:?} is not a sublayer's output"),
        };
        let weight = self.weight(layer, linear);
        if let Some(by_column) = weight.by_column {
            if self.gpu.linear_few_rows(y, None, by_column, Some(bias), Epilogue::Residual(residual), out)? {
                return Ok(());
            }
        }
        Ok(self.gpu.linear_residual(y, weight.as_trained, bias, residual, out)?)
    }

    fn final_layernorm(&mut self) -> Result<()> {
        let (normed, mean, rstd) = self.norm_scratch();
        Ok(self.gpu.layernorm_forward(
            self.rows(&self.s.x, self.config.n_embd),
            self.p.ln_f_weight,
            self.p.ln_f_bias,
            normed,
            mean,
            rstd,
        )?)
    }
}

impl BatchBackbone<f32> for GpuBackbone<'_> {
    fn sequences(&self) -> usize {
        self.lens.len()
    }

    fn forward_batch(&mut self, runs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let (gpu, c) = (self.gpu, self.config.n_embd);
        let (m, rows) = self.write_rows(runs)?;
        if self.use_graphs && m < self.graphs.len() {
            if self.graphs[m].is_none() {
                let graph = gpu.capture(|| self.queue_pass(m, rows))?;
                self.graphs[m] = Some(graph);
            }
            gpu.replay(self.graphs[m].as_ref().expect("captured above"))?;
        } else {
            self.queue_pass(m, rows)?;
        }
        self.profile.mark(gpu, "backbone: layers")?;
        let hidden = gpu.download(self.scratch.normed.view().prefix(m * c))?;
        self.profile.mark(gpu, "backbone: download")?;
        let mut rest = hidden.as_slice();
        let mut out = Vec::with_capacity(runs.len());
        for (sequence, run) in runs.iter().enumerate() {
            self.lens[sequence] += run.len();
            let (mine, after) = rest.split_at(run.len() * c);
            out.push(mine.to_vec());
            rest = after;
        }
        Ok(out)
    }

    fn truncate_sequence(&mut self, sequence: usize, len: usize) {
        self.lens[sequence] = self.lens[sequence].min(len);
    }

    fn sequence_positions(&self, sequence: usize) -> usize {
        self.lens[sequence]
    }
}

/// Whether the device keeps the whole step for this way of choosing tokens: greedy, or sampling
/// at a temperature; top-k and top-p sort the vocabulary, which stays on the host.
pub fn device_step_supports(sampling: &SamplingConfig) -> bool {
    sampling.greedy || (sampling.top_k == 0 && sampling.top_p >= 1.0)
}

/// The speculative step's buffers on the device, for one sequence and runs of up to n rows,
/// and the step captured as a graph for each run length m.
struct DeviceStep {
    /// (n, r): the gate at each row of the run
    w: Buffer<f32>,
    /// (n, r·C) and (n, r, V): z[α,0] = W[α,0] h at each row, then P[α,0]
    z: Buffer<f32>,
    probs: Buffer<f32>,
    /// ((n − 1), r·C) and ((n − 1), r, V): S's z[α,s] and P[α,s] for the draft horizons
    z_s: Buffer<f32>,
    probs_s: Buffer<f32>,
    /// S's hidden state (C) and the drafts' first posterior (r), from verification
    s_hidden: Buffer<f32>,
    posterior: Buffer<f32>,
    /// (n − 1, V): the distributions the drafts were drawn from
    draft_q: Buffer<f32>,
    /// 2n − 1 uniforms a step: acceptance tests, the next token's draw, the drafts'
    uniforms: Buffer<f32>,
    /// (V): a row's (tempered) marginal
    work: Buffer<f32>,
    /// what the host reads back: accepted count, next token, not-finite flag, drafts
    readback: Buffer<u32>,
    /// page-locked room for `readback`
    staging: PinnedBuffer<u32>,
    /// for each way of stepping used so far (choice, n, draft), the pass and the step over m
    /// rows captured at index m; autoregressive and speculative decodes alternate in a benchmark
    graphs: Vec<(StepSettings, Vec<Option<Graph>>)>,
}

/// What a captured step depends on besides its run length: how tokens are chosen, n, the draft.
type StepSettings = (StepChoice, usize, Draft);

/// Captured steps kept for this many settings at most (the oldest go first).
const STEP_SETTINGS_KEPT: usize = 4;

impl DeviceStep {
    fn new(gpu: &Gpu, config: &ModelConfig) -> Result<Self> {
        let (c, v, r, n) = (config.n_embd, config.vocab_size, config.rank, config.horizon);
        let drafts = (n - 1).max(1);
        Ok(DeviceStep {
            w: gpu.zeros(n * r)?,
            z: gpu.zeros(n * r * c)?,
            probs: gpu.zeros(n * r * v)?,
            z_s: gpu.zeros(drafts * r * c)?,
            probs_s: gpu.zeros(drafts * r * v)?,
            s_hidden: gpu.zeros(c)?,
            posterior: gpu.zeros(r)?,
            draft_q: gpu.zeros(drafts * v)?,
            uniforms: gpu.zeros(2 * n - 1)?,
            work: gpu.zeros(v)?,
            readback: gpu.zeros(STEP_DRAFTS + n - 1)?,
            staging: gpu.pinned(STEP_DRAFTS + n - 1)?,
            graphs: Vec::new(),
        })
    }

    /// Where in `graphs` the captured steps for `settings` are, by run length (a new entry,
    /// nothing captured yet, for new settings).
    fn graph_index(&mut self, settings: StepSettings, n: usize) -> usize {
        if let Some(index) = self.graphs.iter().position(|(kept, _)| *kept == settings) {
            return index;
        }
        if self.graphs.len() == STEP_SETTINGS_KEPT {
            self.graphs.remove(0);
        }
        self.graphs.push((settings, (0..=n).map(|_| None).collect()));
        self.graphs.len() - 1
    }

    /// The step's buffers for runs of up to `n` rows (n = 1: autoregressive), hidden states
    /// `hidden` (m, C).
    fn buffers(&self, hidden: View<f32>, n: usize, vocab: usize) -> StepBuffers {
        StepBuffers {
            hidden,
            s_hidden: self.s_hidden.view(),
            posterior: self.posterior.view(),
            draft_q: self.draft_q.view().prefix((n - 1) * vocab),
            uniforms: self.uniforms.view().prefix(2 * n - 1),
            work: self.work.view(),
            readback: self.readback.view().prefix(STEP_DRAFTS + n - 1),
        }
    }
}

/// The whole speculative step on the GPU, for the first sequence of a [`GpuDecoder`]: one
/// upload of the run's tokens (and, sampling, its random numbers), one replayed graph (the
/// backbone pass, the head at every new row, verification, S's distributions and the next
/// step's drafts), and one download of a few numbers: how many drafts were accepted, the token
/// after them, and the next drafts. With n = 1 the same graph is autoregressive decoding.
struct GpuStepEngine<'d, 'a> {
    backbone: &'d mut GpuBackbone<'a>,
    head: &'d GpuHead<'a>,
    step: &'d mut DeviceStep,
    /// tokens a pass runs at most: the horizon when speculative, else 1
    n: usize,
    rule: AcceptanceRule,
    /// the drafts the device made after the last step's next token
    drafts: Vec<u32>,
    /// after a rebuild: the row of the prefill's hidden states that is S, not yet primed
    unprimed_s: Option<usize>,
}

impl<'d, 'a> GpuStepEngine<'d, 'a> {
    /// How this decode chooses tokens, as the kernels take it (greedy ignores the temperature,
    /// so that greedy decodes share their graphs whatever it is).
    fn choice(&self, sampling: &SamplingConfig) -> StepChoice {
        let rule = match self.rule {
            AcceptanceRule::Exact => ACCEPT_EXACT,
            AcceptanceRule::AlwaysAccept => ACCEPT_ALWAYS,
            AcceptanceRule::ResampleFromTarget => ACCEPT_RESAMPLE_FROM_TARGET,
        };
        let inv_temperature = if sampling.greedy { 1.0 } else { (1.0 / sampling.temperature) as f32 };
        StepChoice { greedy: sampling.greedy, inv_temperature, rule }
    }

    /// The head's work after a pass (or a prefill) over m rows `hidden` (m, C): the gate, the
    /// next-token distributions P[α,0] at each row, verification (or, `forced`, S primed at
    /// the one row with that next token), then S's draft horizons and the next drafts.
    fn queue_step(&self, hidden: View<f32>, rows: CacheRows, choice: StepChoice, draft: Draft, forced: Option<u32>) -> Result<()> {
        let (gpu, config, step) = (self.backbone.gpu, &self.backbone.config, &*self.step);
        let (c, v, r) = (config.n_embd, config.vocab_size, config.rank);
        let m = rows.rows();
        let gate = self.backbone.p.head.as_ref().filter(|_| r > 1).map(|head| (head.gate_weight, head.gate_bias));
        let w = step.w.view().prefix(m * r);
        gpu.decode_gate(hidden, gate, w, c)?;
        // z[α,0] = W[α,0] h for every row (h itself without expanders), then P[α,0]
        let z = match self.head.expanders() {
            Some(expanders) => {
                let z = step.z.view().prefix(m * r * c);
                product_by_column(gpu, hidden, expanders.prefix(r * c * c), z, m, c, r * c)?;
                z
            }
            None => hidden,
        };
        let probs = step.probs.view().prefix(m * r * v);
        product_by_column(gpu, z, self.head.wte(), probs, m * r, c, v)?;
        gpu.softmax_rows(probs, v)?;
        let buffers = step.buffers(hidden, self.n, v);
        gpu.speculative_verify(probs, w, rows, buffers, self.n, choice, forced)?;
        if let (Some(expanders), true) = (self.head.expanders(), self.n > 1) {
            // S's horizons 1..n: one row against the stacked W[α,s], then P[α,s]
            let count = self.n - 1;
            let z_s = step.z_s.view().prefix(count * r * c);
            let w_s = expanders.slice(r * c * c, count * r * c * c);
            product_by_column(gpu, step.s_hidden.view(), w_s, z_s, 1, c, count * r * c)?;
            let probs_s = step.probs_s.view().prefix(count * r * v);
            product_by_column(gpu, z_s, self.head.wte(), probs_s, count * r, c, v)?;
            gpu.softmax_rows(probs_s, v)?;
            gpu.speculative_draft(probs_s, buffers, count, choice, draft == Draft::TopComponent)?;
        }
        Ok(())
    }

    /// Uploads the step's uniforms when sampling: 2n − 1 of them, each below 1 in f32 too.
    fn write_uniforms(&self, choice: StepChoice, rng: &mut Rng) -> Result<()> {
        if choice.greedy {
            return Ok(());
        }
        let below_one = f32::from_bits(0x3f7f_ffff);
        let uniforms: Vec<f32> = (0..2 * self.n - 1).map(|_| (rng.uniform() as f32).min(below_one)).collect();
        Ok(self.backbone.gpu.write(self.step.uniforms.view().prefix(2 * self.n - 1), &uniforms)?)
    }

    /// Downloads what the step left for the host: (accepted drafts, next token), and the next
    /// step's drafts into `self.drafts`.
    fn read_step(&mut self) -> Result<(usize, u32)> {
        let numbers = &mut self.step.staging[..STEP_DRAFTS + self.n - 1];
        self.backbone.gpu.download_into(self.step.readback.view().prefix(numbers.len()), numbers)?;
        if numbers[STEP_NOT_FINITE] != 0 {
            return Err(not_finite());
        }
        self.drafts = numbers[STEP_DRAFTS..].to_vec();
        Ok((numbers[STEP_ACCEPTED] as usize, numbers[STEP_NEXT]))
    }
}

impl StepEngine for GpuStepEngine<'_, '_> {
    fn rebuild(&mut self, context: &[u32], generation: &mut Generation) -> Result<()> {
        let tick = std::time::Instant::now();
        self.backbone.truncate_sequence(0, 0);
        self.drafts.clear();
        self.unprimed_s = None;
        if !context.is_empty() {
            // the prefill's hidden states stay in the scratch rows until the next pass; S is
            // primed there only for drafting
            self.backbone.forward_batch(&[context])?;
            self.unprimed_s = Some(context.len() - 1).filter(|_| self.n > 1);
        }
        generation.timing.prefill_s += tick.elapsed().as_secs_f64();
        Ok(())
    }

    fn step(&mut self, request: StepRequest, rng: &mut Rng, generation: &mut Generation) -> Result<StepOutcome> {
        let (gpu, c) = (self.backbone.gpu, self.backbone.config.n_embd);
        let choice = self.choice(request.sampling);
        if let Some(row) = self.unprimed_s.take() {
            // S at the prefill's last row, and its drafts after the pending token
            let tick = std::time::Instant::now();
            let (_, rows) = self.backbone.write_rows(&[&[request.pending]])?;
            self.write_uniforms(choice, rng)?;
            let hidden = self.backbone.scratch.normed.view().slice(row * c, c);
            self.queue_step(hidden, rows, choice, request.draft, Some(request.pending))?;
            self.read_step()?;
            generation.timing.draft_s += tick.elapsed().as_secs_f64();
        }
        let tick = std::time::Instant::now();
        let drafts = &self.drafts[..request.max_drafts.min(self.drafts.len())];
        let run: Vec<u32> = std::iter::once(request.pending).chain(drafts.iter().copied()).collect();
        let cache_before = self.backbone.lens[0];
        let (m, rows) = self.backbone.write_rows(&[&run])?;
        self.write_uniforms(choice, rng)?;
        self.backbone.profile.mark(gpu, "step: upload uniforms")?;
        let hidden = self.backbone.scratch.normed.view().prefix(m * c);
        if self.backbone.use_graphs {
            let settings = (choice, self.n, request.draft);
            let captured = self.step.graph_index(settings, self.n);
            if self.step.graphs[captured].1[m].is_none() {
                let graph = gpu.capture(|| {
                    self.backbone.queue_pass(m, rows)?;
                    self.queue_step(hidden, rows, choice, request.draft, None)
                })?;
                self.step.graphs[captured].1[m] = Some(graph);
            }
            gpu.replay(self.step.graphs[captured].1[m].as_ref().expect("captured above"))?;
        } else {
            self.backbone.queue_pass(m, rows)?;
            self.queue_step(hidden, rows, choice, request.draft, None)?;
        }
        self.backbone.profile.mark(gpu, "step: pass, head, acceptance, drafts")?;
        let (kept, next) = self.read_step()?;
        self.backbone.profile.mark(gpu, "step: download tokens")?;
        // 4. keep c, d_1..d_k in the cache
        self.backbone.lens[0] = cache_before + 1 + kept;
        for j in 0..(kept + 1).min(m - 1) {
            generation.drafted[j] += 1;
            generation.accepted[j] += usize::from(j < kept);
        }
        generation.timing.backbone_s += tick.elapsed().as_secs_f64();
        Ok(StepOutcome { accepted: run[1..1 + kept].to_vec(), next })
    }
}

/// One of the head's weights by output column, (n, k): as trained (cuBLAS's, on many rows), and
/// its bf16 copy when decoding in bf16 (the few-row and tiled kernels').
#[derive(Clone, Copy)]
struct HeadWeight {
    f32: View<f32>,
    bf16: Option<View<u16>>,
}

impl HeadWeight {
    /// `len` elements from `offset` on, of both
    fn slice(self, offset: usize, len: usize) -> Self {
        HeadWeight { f32: self.f32.slice(offset, len), bf16: self.bf16.map(|w| w.slice(offset, len)) }
    }

    fn prefix(self, len: usize) -> Self {
        self.slice(0, len)
    }

    /// what the few-row kernels read: the bf16 copy where there is one
    fn by_column(self) -> ColumnWeights {
        self.bf16.map_or(self.f32.into(), ColumnWeights::from)
    }
}

/// The most rows the head's products take the few-row kernel for: on an H200 it streams wte for
/// 4 rows faster than cuBLAS, for 8 or more slower (`examples/gemm_probe.rs --decoding`); the
/// tiled kernel takes up to [`TILE_ROWS_MAX`] (a speculative pass's n·r rows).
const HEAD_FEW_ROWS: usize = 4;

/// `out (rows, n) = x (rows, k) · wᵀ` for w (n, k), no bias (the head's products): the few-row
/// kernel on up to [`HEAD_FEW_ROWS`] rows, the tiled one on up to [`TILE_ROWS_MAX`] where it
/// gives every SM a block (the logits against wte; a narrower product, such as the expanders'
/// on more than 4 rows, would leave SMs idle and stays with cuBLAS), else a general product.
/// Where the tiled kernel takes the logits the few-row kernel gives a column group one warp too
/// (`Gpu::linear_few_rows`), so the two sum an output in one order and a row's logits are the
/// same bits in a pass of one token and of n.
fn product_by_column(gpu: &Gpu, x: View<f32>, w: HeadWeight, out: View<f32>, rows: usize, k: usize, n: usize) -> Result<()> {
    if rows <= HEAD_FEW_ROWS && gpu.linear_few_rows(x, None, w.by_column(), None, Epilogue::Bias, out)? {
        return Ok(());
    }
    let fills_the_device = gpu.column_tile_blocks(n) >= gpu.multiprocessors;
    if rows <= TILE_ROWS_MAX && fills_the_device && gpu.linear_column_tiles(x, w.by_column(), out)? {
        return Ok(());
    }
    Ok(gpu.matmul(Operand::normal(x), Operand::transposed(w.f32), out, rows, k, n, false)?)
}

/// `out = LayerNorm(x) · weight + bias`, then GELU when `gelu`: one kernel on a few rows (which
/// reads the weight by column, `weight.by_column`), else the LayerNorm into `scratch` (normed,
/// mean, rstd) and the product.
#[allow(clippy::too_many_arguments)]
fn layernorm_linear(
    gpu: &Gpu,
    x: View<f32>,
    (gain, shift): (View<f32>, View<f32>),
    weight: LinearWeight,
    bias: View<f32>,
    gelu: bool,
    out: View<f32>,
    (normed, mean, rstd): (View<f32>, View<f32>, View<f32>),
) -> Result<()> {
    let epilogue = if gelu { Epilogue::Gelu } else { Epilogue::Bias };
    if let Some(by_column) = weight.by_column {
        if gpu.linear_few_rows(x, Some((gain, shift)), by_column, Some(bias), epilogue, out)? {
            return Ok(());
        }
    }
    let weight = weight.as_trained;
    gpu.layernorm_forward(x, gain, shift, normed, mean, rstd)?;
    if gelu {
        Ok(gpu.linear_gelu(normed, weight, bias, out)?)
    } else {
        Ok(gpu.linear(normed, weight, bias, out)?)
    }
}

/// The head's products on the device: z = W[α,s] h for every α in one product (the expanders
/// regrouped by horizon at load time), logits against wte, softmax, then to the host.
struct GpuHead<'a> {
    gpu: &'a Gpu,
    config: ModelConfig,
    wte: View<f32>,
    /// (n, r·C, C): for each horizon, W[α,s] for all α one after the other; absent when n = r = 1
    expand_by_horizon: Option<Buffer<f32>>,
    /// decoding in bf16: bf16 copies of wte and of `expand_by_horizon`
    wte_bf16: Option<Buffer<u16>>,
    expand_bf16: Option<Buffer<u16>>,
    /// room for `rows` hidden states at a time
    rows: usize,
    hidden: Buffer<f32>,
    z: Buffer<f32>,
    logits: Buffer<f32>,
    /// page-locked room for the downloaded probabilities
    staging: std::cell::RefCell<PinnedBuffer<f32>>,
    profile: Rc<PhaseProfile>,
}

impl<'a> GpuHead<'a> {
    fn new(
        gpu: &'a Gpu,
        config: &ModelConfig,
        p: ModelParams<View<f32>>,
        sequences: usize,
        bf16: bool,
        profile: Rc<PhaseProfile>,
    ) -> Result<Self> {
        let (c, v, r, n) = (config.n_embd, config.vocab_size, config.rank, config.horizon);
        let expand_by_horizon = match &p.head {
            Some(head) => {
                let regrouped = gpu.zeros::<f32>(n * r * c * c)?;
                for s in 0..n {
                    for alpha in 0..r {
                        let source = head.expand_weight.slice((alpha * n + s) * c * c, c * c);
                        gpu.copy(source, regrouped.view().slice((s * r + alpha) * c * c, c * c))?;
                    }
                }
                Some(regrouped)
            }
            None => None,
        };
        // a request batch: every horizon of the draft state and every verified state of one
        // sequence, or one horizon of every sequence's state (the draft's at S, the targets
        // without drafts)
        let rows = (2 * n.max(1)).max(n * sequences);
        let wte_bf16 = bf16.then(|| gpu.bf16_copy(p.wte)).transpose()?;
        let expand_bf16 = expand_by_horizon.as_ref().filter(|_| bf16).map(|w| gpu.bf16_copy(w.view())).transpose()?;
        // the few-row kernels read their first weights before they wait for the kernel ahead
        // (`EarlyLaunch`): the copies are complete before any pass
        gpu.synchronize()?;
        Ok(GpuHead {
            gpu,
            config: config.clone(),
            wte: p.wte,
            wte_bf16,
            expand_bf16,
            expand_by_horizon,
            rows,
            hidden: gpu.zeros(rows * c)?,
            z: gpu.zeros(rows * r * c)?,
            logits: gpu.zeros(rows * r * v)?,
            staging: std::cell::RefCell::new(gpu.pinned(rows * r * v)?),
            profile,
        })
    }
}

impl GpuHead<'_> {
    /// wte, the unembedding (V, C)
    fn wte(&self) -> HeadWeight {
        HeadWeight { f32: self.wte, bf16: self.wte_bf16.as_ref().map(Buffer::view) }
    }

    /// the expanders by horizon (n, r·C, C), if the head has any
    fn expanders(&self) -> Option<HeadWeight> {
        let f32 = self.expand_by_horizon.as_ref()?.view();
        Some(HeadWeight { f32, bf16: self.expand_bf16.as_ref().map(Buffer::view) })
    }
}

impl HeadProducts<f32> for GpuHead<'_> {
    fn probabilities(&self, requests: &[(&[f32], usize)]) -> Result<Vec<Vec<f32>>> {
        let (c, v, r) = (self.config.n_embd, self.config.vocab_size, self.config.rank);
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.rows) {
            let count = chunk.len();
            let hidden: Vec<f32> = chunk.iter().flat_map(|(h, _)| h.iter().copied()).collect();
            let h = self.hidden.view().prefix(count * c);
            self.profile.resume(self.gpu, "host: the loop between calls")?;
            self.gpu.write(h, &hidden)?;
            self.profile.mark(self.gpu, "head: upload hidden")?;
            // z rows (request, α): W[α,s] h for the request's own horizon s, one product per
            // run of requests with the same horizon (the verified states all ask for s = 0) or
            // with consecutive horizons of one state (the draft's), as on the CPU
            let z = match self.expanders() {
                Some(w) => {
                    let (z, block) = (self.z.view().prefix(count * r * c), r * c);
                    let mut first = 0;
                    while first < count {
                        let (state, s) = chunk[first];
                        let one_state = chunk[first..]
                            .iter()
                            .zip(s..)
                            .take_while(|&(&(other, t), next)| std::ptr::eq(other, state) && t == next)
                            .count();
                        // one state: h against the stacked W[α,t] of its horizons, one row out,
                        // which is the run's z blocks side by side
                        let (run, rows, horizons) = match one_state {
                            1 => {
                                let run = chunk[first..].iter().take_while(|(_, horizon)| *horizon == s).count();
                                (run, run, 1)
                            }
                            _ => (one_state, 1, one_state),
                        };
                        let w_run = w.slice(s * block * c, horizons * block * c);
                        let (h_run, z_run) = (h.slice(first * c, rows * c), z.slice(first * block, run * block));
                        product_by_column(self.gpu, h_run, w_run, z_run, rows, c, horizons * block)?;
                        first += run;
                    }
                    z
                }
                None => h,
            };
            out.extend(self.distributions(z, count * r, r * v)?);
        }
        Ok(out)
    }

    /// One component's rows only: z[s] = W[α,s] h for each horizon in one batched product (the
    /// W[α,s] of consecutive horizons are r·C·C apart), then their logits.
    fn component_probabilities(
        &self,
        hidden: &[f32],
        alpha: usize,
        horizons: std::ops::Range<usize>,
        vocab: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let (c, r) = (self.config.n_embd, self.config.rank);
        let (count, first) = (horizons.len(), horizons.start);
        let Some(w) =
            self.expand_by_horizon.as_ref().filter(|_| count > 0 && count <= self.rows * r && horizons.end <= self.config.horizon)
        else {
            // nothing to draft, or more than the buffers hold: every component's, keeping α's
            let requests: Vec<(&[f32], usize)> = horizons.map(|s| (hidden, s)).collect();
            return Ok(self.probabilities(&requests)?.into_iter().map(|block| block[alpha * vocab..][..vocab].to_vec()).collect());
        };
        let h = self.hidden.view().prefix(c);
        self.profile.resume(self.gpu, "host: the loop between calls")?;
        self.gpu.write(h, hidden)?;
        self.profile.mark(self.gpu, "head: upload hidden")?;
        let z = self.z.view().prefix(count * c);
        let w_rows = w.view().slice((first * r + alpha) * c * c, ((count - 1) * r + 1) * c * c);
        let (h, w_rows) = (Operand::normal(h), Operand::transposed(w_rows).strided(r * c * c));
        self.gpu.matmul_batched(h, w_rows, z, 1, c, c, count, false)?;
        self.distributions(z, count, vocab)
    }
}

impl GpuHead<'_> {
    /// softmax(z · wteᵀ) for `rows` rows of z, downloaded: on the host in blocks of `block`.
    fn distributions(&self, z: View<f32>, rows: usize, block: usize) -> Result<Vec<Vec<f32>>> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let logits = self.logits.view().prefix(rows * v);
        product_by_column(self.gpu, z.prefix(rows * c), self.wte(), logits, rows, c, v)?;
        self.gpu.softmax_rows(logits, v)?;
        self.profile.mark(self.gpu, "head: products + softmax")?;
        let mut staging = self.staging.borrow_mut();
        let staged = &mut staging[..rows * v];
        self.gpu.download_into(logits, staged)?;
        self.profile.mark(self.gpu, "head: download")?;
        Ok(staged.chunks(block).map(<[f32]>::to_vec).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_profile_adds_to_the_phases_of_the_same_name_and_starts_afresh() {
        let (run, total) = (PhaseProfile::default(), PhaseProfile::default());
        run.totals.borrow_mut().extend([("backbone", 2.0, 2), ("head", 1.0, 4)]);
        run.last.set(Some(std::time::Instant::now()));
        run.move_into(&total);
        run.totals.borrow_mut().push(("head", 0.5, 1));
        run.move_into(&total);
        assert_eq!(*total.totals.borrow(), vec![("backbone", 2.0, 2), ("head", 1.5, 5)]);
        assert!(run.totals.borrow().is_empty() && run.last.get().is_none());
        assert!(total.report().contains("head"));
    }
}
