//! Training and evaluation on one NVIDIA GPU (`--device cuda`), llm.c style.
//!
//! The CPU path builds its backward pass from the tape; this path writes forward and backward
//! out by hand, layer by layer, over activations kept in device buffers. Each piece is a
//! kernel or a cuBLAS call of the `multitoken-cuda` crate, checked against the CPU op of the
//! same name (`tests/cuda_ops.rs`), and the whole step against the CPU step (`tests/cuda_step.rs`).
//! Parameters, gradients and AdamW moments are single flat device buffers in the order of
//! [`ModelParams::build`]; the host sees the loss and the head's statistics, never activations.

pub mod decode;
mod workspace;

use multitoken_cuda::{AdamWStep, AttentionShape, Buffer, HeadShape, Operand, View};
pub use multitoken_cuda::{CudaError, Gpu};

use self::workspace::Workspace;
use crate::error::{Error, Result};
use crate::model::{Batch, ModelConfig, ModelParams};
use crate::ops::CpHeadStats;
use crate::tensor::Tensor;
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::evaluate::{scoring_windows, Losses, Mean};
use crate::train::StepConfig;

/// With `MULTITOKEN_PROFILE=1`, the GPU pass waits for the device after each phase and adds
/// its wall time to a table (printed by `bench train` and `bench decode`); otherwise nothing is
/// measured.
#[derive(Default)]
pub struct PhaseProfile {
    enabled: bool,
    last: std::cell::Cell<Option<std::time::Instant>>,
    totals: std::cell::RefCell<Vec<(&'static str, f64, usize)>>,
}

impl PhaseProfile {
    pub(crate) fn from_env() -> Self {
        PhaseProfile { enabled: crate::autograd::profiling_enabled(), ..Default::default() }
    }

    /// Ends the phase that started at the previous mark (or at `start`).
    pub(crate) fn mark(&self, gpu: &Gpu, label: &'static str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        gpu.synchronize()?;
        let now = std::time::Instant::now();
        if let Some(last) = self.last.replace(Some(now)) {
            let seconds = (now - last).as_secs_f64();
            let mut totals = self.totals.borrow_mut();
            match totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some(entry) => {
                    entry.1 += seconds;
                    entry.2 += 1;
                }
                None => totals.push((label, seconds, 1)),
            }
        }
        Ok(())
    }

    /// Like [`PhaseProfile::start`], but the time since the last mark counts as `gap` (decoding:
    /// the host's own work between device calls).
    pub(crate) fn resume(&self, gpu: &Gpu, gap: &'static str) -> Result<()> {
        match self.last.get() {
            Some(_) => self.mark(gpu, gap),
            None => self.start(gpu),
        }
    }

    pub(crate) fn start(&self, gpu: &Gpu) -> Result<()> {
        if self.enabled {
            gpu.synchronize()?;
            self.last.set(Some(std::time::Instant::now()));
        }
        Ok(())
    }

    /// Forgets what was measured so far (after warm-up steps, which load kernels lazily).
    pub fn reset(&self) {
        self.totals.borrow_mut().clear();
    }

    /// Moves everything measured so far into `other` (adding to its phases of the same name) and
    /// starts afresh.
    pub(crate) fn move_into(&self, other: &PhaseProfile) {
        self.last.set(None);
        let mut totals = other.totals.borrow_mut();
        for (label, seconds, calls) in self.totals.borrow_mut().drain(..) {
            match totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some(entry) => {
                    entry.1 += seconds;
                    entry.2 += calls;
                }
                None => totals.push((label, seconds, calls)),
            }
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

/// How the training pass computes causal attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionRoute {
    /// one kernel each way over c_attn's rows (`kernels/fused_attention.cu`): the (T, T)
    /// weights are never stored, the backward pass recomputes them tile by tile
    Fused,
    /// strided-batched cuBLAS products over causal query chunks and a masked softmax, with the
    /// weights stored for the backward pass: any head size, and TF32 tensor cores when asked
    Products,
}

impl AttentionRoute {
    /// In f32 the fused kernels, where one exists for the head size: they are faster than the
    /// products and hold no (T, T) weights. With TF32 the products, whose tensor cores outrun
    /// the kernels' f32 arithmetic. `MULTITOKEN_ATTENTION=products` (or `fused`) overrides, for
    /// benchmarks and tests.
    pub fn default_for(config: &ModelConfig, tf32: bool) -> Self {
        let supported = multitoken_cuda::FUSED_ATTENTION_HEAD_SIZES.contains(&config.head_size());
        match std::env::var("MULTITOKEN_ATTENTION").as_deref() {
            Ok("products") => AttentionRoute::Products,
            Ok("fused") if supported => AttentionRoute::Fused,
            _ if supported && !tf32 => AttentionRoute::Fused,
            _ => AttentionRoute::Products,
        }
    }
}

/// Rows (t, α, s) of logits per block of the head: 16384 × V floats at a time.
const HEAD_BLOCK_ROWS: usize = 16384;

impl From<CudaError> for Error {
    fn from(e: CudaError) -> Self {
        Error::Invalid(e.to_string())
    }
}

/// A model, its gradients and its optimizer state on the GPU.
pub struct GpuModel {
    pub gpu: Gpu,
    config: ModelConfig,
    /// each parameter's (name, shape) in canonical order
    shapes: Vec<(String, Vec<usize>)>,
    params_buffer: Buffer<f32>,
    grads_buffer: Buffer<f32>,
    m_buffer: Buffer<f32>,
    v_buffer: Buffer<f32>,
    params: ModelParams<View<f32>>,
    grads: ModelParams<View<f32>>,
    optimizer_config: AdamWConfig,
    /// AdamW updates taken so far
    optimizer_steps: u64,
    /// one f64 for the gradient norm
    norm_accumulator: Buffer<f64>,
    workspace: Option<Workspace>,
    /// the AdamW segment table on the device, and the flags it was built for
    optimizer_segments: Option<(Vec<u32>, Buffer<i64>, Buffer<u32>)>,
    attention: AttentionRoute,
    pub profile: PhaseProfile,
}

/// Views of a flat buffer laid out as the model's parameters.
pub(crate) fn param_views(config: &ModelConfig, flat: View<f32>) -> ModelParams<View<f32>> {
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

impl GpuModel {
    /// Uploads the parameters (and the optimizer state, when resuming).
    pub fn new(gpu: Gpu, config: &ModelConfig, params: &ModelParams<Tensor<f32>>, optimizer: Option<&AdamW<f32>>) -> Result<Self> {
        let head = HeadShape { horizon: config.horizon, rank: config.rank };
        if !head.fits_kernels() {
            return crate::invalid!("--device cuda supports horizon and rank up to {}", multitoken_cuda::MAX_RANK);
        }
        let named = params.named();
        let shapes: Vec<(String, Vec<usize>)> = named.iter().map(|(name, t)| (name.clone(), t.shape().to_vec())).collect();
        let flat = |tensors: Vec<&Tensor<f32>>| -> Vec<f32> { tensors.into_iter().flat_map(|t| t.data().iter().copied()).collect() };
        let params_host = flat(named.iter().map(|(_, t)| *t).collect());
        let total = params_host.len();
        let params_buffer = gpu.upload(&params_host)?;
        let (m_buffer, v_buffer, optimizer_config, optimizer_steps) = match optimizer {
            Some(opt) => (gpu.upload(&flat(opt.m.iter().collect()))?, gpu.upload(&flat(opt.v.iter().collect()))?, opt.config, opt.t),
            None => (gpu.zeros(total)?, gpu.zeros(total)?, AdamWConfig::default(), 0),
        };
        let grads_buffer = gpu.zeros(total)?;
        let norm_accumulator = gpu.zeros(1)?;
        let attention = AttentionRoute::default_for(config, gpu.tf32);
        Ok(GpuModel {
            params: param_views(config, params_buffer.view()),
            grads: param_views(config, grads_buffer.view()),
            gpu,
            config: config.clone(),
            shapes,
            params_buffer,
            grads_buffer,
            m_buffer,
            v_buffer,
            optimizer_config,
            optimizer_steps,
            norm_accumulator,
            workspace: None,
            optimizer_segments: None,
            attention,
            profile: PhaseProfile::from_env(),
        })
    }

    pub fn attention_route(&self) -> AttentionRoute {
        self.attention
    }

    /// Chooses how attention is computed (both routes give the same results to rounding).
    pub fn set_attention_route(&mut self, route: AttentionRoute) -> Result<()> {
        let hs = self.config.head_size();
        if route == AttentionRoute::Fused && !multitoken_cuda::FUSED_ATTENTION_HEAD_SIZES.contains(&hs) {
            return crate::invalid!("no fused attention kernel for head size {hs}");
        }
        if route != self.attention {
            self.attention = route;
            self.workspace = None;
        }
        Ok(())
    }

    fn to_tensors(&self, flat: View<f32>) -> Result<Vec<Tensor<f32>>> {
        let host = self.gpu.download(flat)?;
        let mut offset = 0;
        Ok(self
            .shapes
            .iter()
            .map(|(_, shape)| {
                let len: usize = shape.iter().product();
                offset += len;
                Tensor::from_vec(shape, host[offset - len..offset].to_vec())
            })
            .collect())
    }

    /// The parameters, copied back to the host.
    pub fn download_params(&self) -> Result<ModelParams<Tensor<f32>>> {
        let mut tensors = self.to_tensors(self.params_buffer.view())?.into_iter();
        let result: std::result::Result<_, std::convert::Infallible> =
            ModelParams::build(&self.config, |_| Ok(tensors.next().expect("one tensor per parameter")));
        match result {
            Ok(params) => Ok(params),
            Err(never) => match never {},
        }
    }

    /// The optimizer state, copied back to the host.
    pub fn download_optimizer(&self) -> Result<AdamW<f32>> {
        Ok(AdamW {
            config: self.optimizer_config,
            m: self.to_tensors(self.m_buffer.view())?,
            v: self.to_tensors(self.v_buffer.view())?,
            t: self.optimizer_steps,
        })
    }

    /// The gradients of the last `loss_and_gradients`, copied back to the host (for tests).
    pub fn download_grads(&self) -> Result<Vec<(String, Tensor<f32>)>> {
        let tensors = self.to_tensors(self.grads_buffer.view())?;
        Ok(self.shapes.iter().map(|(name, _)| name.clone()).zip(tensors).collect())
    }

    fn workspace_for(&mut self, batch: usize, seq: usize) -> Result<()> {
        if self.workspace.as_ref().is_some_and(|w| w.batch == batch && w.seq == seq) {
            return Ok(());
        }
        self.workspace = None; // free the old buffers before taking new ones
        self.workspace = Some(Workspace::new(&self.gpu, &self.config, batch, seq, HEAD_BLOCK_ROWS, self.attention)?);
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            Some(t) => crate::invalid!("token id {t} is outside the vocabulary of {}", self.config.vocab_size),
            None => Ok(()),
        }
    }

    /// The objective's statistics on a batch; with `gradients`, also fills the gradient buffer
    /// (zeroed first) for an upstream gradient of 1 on `joint + λ·aux`.
    pub fn loss_and_gradients(&mut self, batch: &Batch, aux_coef: f64, gradients: bool) -> Result<CpHeadStats> {
        self.loss_on_prefix(batch, batch.inputs.len(), aux_coef, gradients)
    }

    /// As [`GpuModel::loss_and_gradients`], scoring only the first `scored` positions.
    fn loss_on_prefix(&mut self, batch: &Batch, scored: usize, aux_coef: f64, gradients: bool) -> Result<CpHeadStats> {
        let seq = batch.seq;
        if seq == 0 || seq > self.config.n_positions || !batch.inputs.len().is_multiple_of(seq) || batch.inputs.is_empty() {
            return crate::invalid!("a batch needs rows of 1 to {} tokens", self.config.n_positions);
        }
        self.check_tokens(&batch.inputs)?;
        self.check_tokens(&batch.targets)?;
        self.workspace_for(batch.inputs.len() / seq, seq)?;
        if gradients {
            self.gpu.fill_zero(self.grads_buffer.view())?;
        }
        let ws = self.workspace.as_ref().expect("allocated above");
        let pass = Pass {
            gpu: &self.gpu,
            config: &self.config,
            p: &self.params,
            g: &self.grads,
            ws,
            attention: self.attention,
            profile: &self.profile,
        };
        self.profile.start(&self.gpu)?;
        self.gpu.write(ws.inputs.view(), &batch.inputs)?;
        self.gpu.write(ws.targets.view().prefix(scored * self.config.horizon), &batch.targets[..scored * self.config.horizon])?;
        pass.backbone_forward()?;
        let stats = pass.head(scored, aux_coef, gradients)?;
        if gradients {
            pass.backbone_backward()?;
        }
        Ok(stats)
    }

    /// Whether a parameter receives a gradient: with r = 1 the gate is unused (w = 1), and as on
    /// the CPU it is left alone rather than decayed.
    fn has_gradient(&self, name: &str) -> bool {
        self.config.rank > 1 || !name.starts_with("mtp.gate")
    }

    /// One training step: forward, backward, global-norm clipping, AdamW on the parameters that
    /// `trainable` names. Returns (objective, gradient norm before clipping), as the CPU step.
    pub fn train_step(&mut self, batch: &Batch, step: StepConfig, trainable: &dyn Fn(&str) -> bool) -> Result<(f64, f64)> {
        let stats = self.loss_and_gradients(batch, step.aux_coef, true)?;
        let objective = stats.joint_loss + if self.config.rank > 1 { step.aux_coef * stats.aux } else { 0.0 };
        if !objective.is_finite() {
            return Ok((objective, f64::NAN));
        }
        let grads = self.grads.named();
        let accumulator = self.norm_accumulator.view();
        self.gpu.fill_zero(accumulator)?;
        if grads.iter().all(|(name, _)| trainable(name)) {
            // gradients of unused parameters are zero, so one pass over the whole buffer will do
            self.gpu.sum_of_squares(self.grads_buffer.view(), accumulator)?;
        } else {
            for (name, grad) in &grads {
                if trainable(name) && self.has_gradient(name) {
                    self.gpu.sum_of_squares(**grad, accumulator)?;
                }
            }
        }
        let norm = self.gpu.download(accumulator)?[0].sqrt();
        if !norm.is_finite() {
            return Ok((objective, norm));
        }
        let factor = step.grad_clip / (norm + 1e-6);
        let grad_scale = if factor < 1.0 { factor as f32 } else { 1.0 };
        self.optimizer_steps += 1;
        // which parameters to update and to decay (matrices only, as on the CPU)
        let flags: Vec<u32> = self
            .shapes
            .iter()
            .map(|(name, shape)| u32::from(trainable(name) && self.has_gradient(name)) | (u32::from(shape.len() >= 2) << 1))
            .collect();
        if self.optimizer_segments.as_ref().is_none_or(|(cached, _, _)| *cached != flags) {
            let mut starts = vec![0i64];
            for (_, shape) in &self.shapes {
                starts.push(starts.last().copied().unwrap_or(0) + shape.iter().product::<usize>() as i64);
            }
            self.optimizer_segments = Some((flags.clone(), self.gpu.upload(&starts)?, self.gpu.upload(&flags)?));
        }
        let (_, starts, flag_buffer) = self.optimizer_segments.as_ref().expect("built above");
        let c = &self.optimizer_config;
        let adam = AdamWStep {
            lr: step.lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            t: self.optimizer_steps as u32,
            grad_scale,
        };
        let (params, grads) = (self.params_buffer.view(), self.grads_buffer.view());
        self.gpu.adamw_update_segments(
            params,
            grads,
            self.m_buffer.view(),
            self.v_buffer.view(),
            starts.view(),
            flag_buffer.view(),
            adam,
        )?;
        self.profile.mark(&self.gpu, "clip + AdamW")?;
        Ok((objective, norm))
    }

    /// Mean losses over batches, as `train::evaluate::evaluate_batches` computes them on the CPU.
    pub fn evaluate_batches(&mut self, batches: &[Batch]) -> Result<Losses> {
        let mut mean = Mean::default();
        for batch in batches {
            let stats = self.loss_and_gradients(batch, 0.0, false)?;
            mean.add(&stats, batch.inputs.len());
        }
        Ok(mean.finish())
    }

    /// `eval` on a token stream, as `train::evaluate::evaluate_tokens` on the CPU.
    pub fn evaluate_tokens(&mut self, tokens: &[u32]) -> Result<Losses> {
        let n = self.config.horizon;
        let mut mean = Mean::default();
        for window in scoring_windows(tokens, n, self.config.n_positions) {
            let seq = window.inputs.len();
            let mut targets = window.targets;
            targets.resize(seq * n, 0); // rows past `scored` are not scored
            let batch = Batch { inputs: window.inputs.to_vec(), targets, seq, horizon: n };
            let stats = self.loss_on_prefix(&batch, window.scored, 0.0, false)?;
            mean.add(&stats, window.scored);
        }
        Ok(mean.finish())
    }
}

/// Attention dimensions: T, the head size, B·H matrices, and the causal query chunks.
struct CausalChunks {
    t: usize,
    hs: usize,
    bh: usize,
    chunks: usize,
    chunk: usize,
}

/// Rows `first..` of each of a batch of (T, width) matrices, as a view that starts there.
fn chunk_rows(x: View<f32>, first: usize, width: usize) -> View<f32> {
    x.slice(first * width, x.len() - first * width)
}

/// One forward (and backward) pass: the model's views and the workspace.
struct Pass<'a> {
    gpu: &'a Gpu,
    config: &'a ModelConfig,
    p: &'a ModelParams<View<f32>>,
    g: &'a ModelParams<View<f32>>,
    ws: &'a Workspace,
    attention: AttentionRoute,
    profile: &'a PhaseProfile,
}

impl Pass<'_> {
    fn rows(&self) -> usize {
        self.ws.batch * self.ws.seq
    }

    fn attention_shape(&self) -> AttentionShape {
        let (c, h) = (self.config.n_embd, self.config.n_head);
        AttentionShape { batch: self.ws.batch, seq: self.ws.seq, n_head: h, head_size: c / h }
    }

    /// Backward of `linear`: dweight += xᵀ dout, dbias += Σ dout, dx = dout · weightᵀ.
    fn linear_backward(
        &self,
        x: View<f32>,
        weight: View<f32>,
        dout: View<f32>,
        dx: View<f32>,
        dweight: View<f32>,
        dbias: View<f32>,
    ) -> Result<()> {
        let rows = self.rows();
        let (n_in, n_out) = (x.len() / rows, dout.len() / rows);
        self.gpu.matmul(Operand::transposed(x), Operand::normal(dout), dweight, n_in, rows, n_out, true)?;
        self.gpu.column_sums_add(dout, dbias)?;
        self.gpu.matmul(Operand::normal(dout), Operand::transposed(weight), dx, rows, n_out, n_in, false)?;
        Ok(())
    }

    /// The attention's dimensions and its query chunks: chunk i of T/S queries needs only the
    /// first (i + 1)·T/S keys, so the products skip (S − 1)/2S of the work above the diagonal.
    fn causal_chunks(&self) -> CausalChunks {
        let shape = self.attention_shape();
        let t = self.ws.seq;
        let chunks = [4, 2].into_iter().find(|&s| t.is_multiple_of(s) && t / s >= 32).unwrap_or(1);
        CausalChunks { t, hs: shape.head_size, bh: self.ws.batch * shape.n_head, chunks, chunk: t / chunks }
    }

    /// Causal attention of q, k, v (B·H, T, hs): att (B·H, T, T) the weights, y (B·H, T, hs).
    fn attention_forward(&self, q: View<f32>, k: View<f32>, v: View<f32>, att: View<f32>, y: View<f32>) -> Result<()> {
        let (gpu, CausalChunks { t, hs, bh, chunks, chunk }) = (self.gpu, self.causal_chunks());
        let rows = |x: View<f32>, i: usize, width: usize| chunk_rows(x, i * chunk, width);
        for i in 0..chunks {
            // scores[chunk i, ..keys] = q_i k[..keys]ᵀ
            let (q_i, scores_i) = (rows(q, i, hs), rows(att, i, t));
            let (a, b) = (Operand::normal(q_i).strided(t * hs), Operand::transposed(k).strided(t * hs));
            gpu.matmul_general(a, b, Operand::normal(scores_i).strided(t * t).leading(t), chunk, hs, (i + 1) * chunk, bh, false)?;
        }
        gpu.causal_softmax_forward(att, t, t, 1.0 / (hs as f32).sqrt())?;
        for i in 0..chunks {
            // y_i = att[chunk i, ..keys] v[..keys]
            let (att_i, y_i) = (rows(att, i, t), rows(y, i, hs));
            let (a, b) = (Operand::normal(att_i).strided(t * t).leading(t), Operand::normal(v).strided(t * hs));
            gpu.matmul_general(a, b, Operand::normal(y_i).strided(t * hs), chunk, (i + 1) * chunk, hs, bh, false)?;
        }
        Ok(())
    }

    /// Backward of `attention_forward` from dy (B·H, T, hs); `d_att` is scratch of att's size.
    fn attention_backward(
        &self,
        (q, k, v): (View<f32>, View<f32>, View<f32>),
        (dq, dk, dv): (View<f32>, View<f32>, View<f32>),
        att: View<f32>,
        d_att: View<f32>,
        dy: View<f32>,
    ) -> Result<()> {
        let (gpu, CausalChunks { t, hs, bh, chunks, chunk }) = (self.gpu, self.causal_chunks());
        let rows = |x: View<f32>, i: usize, width: usize| chunk_rows(x, i * chunk, width);
        let heads = |x: View<f32>| Operand::normal(x).strided(t * hs);
        let scores =
            |x: View<f32>, transposed: bool| if transposed { Operand::transposed(x) } else { Operand::normal(x) }.strided(t * t).leading(t);
        // the last chunk reaches every key: it writes dk and dv whole, the others add to a prefix
        for i in (0..chunks).rev() {
            let (keys, first) = ((i + 1) * chunk, i + 1 == chunks);
            let (dy_i, att_i, d_att_i) = (rows(dy, i, hs), rows(att, i, t), rows(d_att, i, t));
            // y = att v: d_att = dy vᵀ, dv += attᵀ dy
            gpu.matmul_general(heads(dy_i), Operand::transposed(v).strided(t * hs), scores(d_att_i, false), chunk, hs, keys, bh, false)?;
            gpu.matmul_general(scores(att_i, true), heads(dy_i), heads(dv), keys, chunk, hs, bh, !first)?;
        }
        gpu.causal_softmax_backward(att, d_att, t, 1.0 / (hs as f32).sqrt())?;
        for i in (0..chunks).rev() {
            let (keys, first) = ((i + 1) * chunk, i + 1 == chunks);
            let (q_i, dq_i, d_scores_i) = (rows(q, i, hs), rows(dq, i, hs), rows(d_att, i, t));
            // scores = q kᵀ: dq = d_scores k, dk += d_scoresᵀ q
            gpu.matmul_general(scores(d_scores_i, false), heads(k), heads(dq_i), chunk, keys, hs, bh, false)?;
            gpu.matmul_general(scores(d_scores_i, true), heads(q_i), heads(dk), keys, chunk, hs, bh, !first)?;
        }
        Ok(())
    }

    fn backbone_forward(&self) -> Result<()> {
        let (gpu, ws, p) = (self.gpu, self.ws, self.p);
        let (c, seq) = (self.config.n_embd, ws.seq);
        let shape = self.attention_shape();
        gpu.embedding_forward(ws.inputs.view(), p.wte, p.wpe, ws.residual[0].view(), seq, c)?;
        self.profile.mark(gpu, "forward: embedding")?;
        for (l, (block, acts)) in p.blocks.iter().zip(&ws.layers).enumerate() {
            let x = ws.residual[l].view();
            gpu.layernorm_forward(x, block.ln_1_weight, block.ln_1_bias, acts.ln_1.view(), acts.ln_1_mean.view(), acts.ln_1_rstd.view())?;
            self.profile.mark(gpu, "forward: ln_1")?;
            match self.attention {
                AttentionRoute::Fused => {
                    gpu.linear(acts.ln_1.view(), block.attn_c_attn_weight, block.attn_c_attn_bias, acts.qkv.view())?;
                    self.profile.mark(gpu, "forward: c_attn")?;
                    gpu.fused_attention_forward(acts.qkv.view(), acts.att_y.view(), acts.lse.view(), shape)?;
                }
                AttentionRoute::Products => {
                    gpu.linear(acts.ln_1.view(), block.attn_c_attn_weight, block.attn_c_attn_bias, ws.qkv.view())?;
                    self.profile.mark(gpu, "forward: c_attn")?;
                    gpu.qkv_heads(ws.qkv.view(), acts.qkv.view(), shape, false)?;
                    self.profile.mark(gpu, "forward: qkv → heads")?;
                    let (q, k, v) = acts.q_k_v();
                    self.attention_forward(q, k, v, acts.att.view(), ws.y_heads.view())?;
                    gpu.heads_rows(ws.y_heads.view(), acts.att_y.view(), shape, true)?;
                }
            }
            self.profile.mark(gpu, "forward: attention core")?;
            let x_mid = acts.x_mid.view();
            gpu.linear_residual(acts.att_y.view(), block.attn_c_proj_weight, block.attn_c_proj_bias, x, x_mid)?;
            self.profile.mark(gpu, "forward: attn c_proj")?;
            gpu.layernorm_forward(
                x_mid,
                block.ln_2_weight,
                block.ln_2_bias,
                acts.ln_2.view(),
                acts.ln_2_mean.view(),
                acts.ln_2_rstd.view(),
            )?;
            gpu.linear(acts.ln_2.view(), block.mlp_c_fc_weight, block.mlp_c_fc_bias, acts.fc.view())?;
            gpu.gelu_forward(acts.fc.view(), acts.fc_gelu.view())?;
            self.profile.mark(gpu, "forward: ln_2 + c_fc + gelu")?;
            let x_out = ws.residual[l + 1].view();
            gpu.linear_residual(acts.fc_gelu.view(), block.mlp_c_proj_weight, block.mlp_c_proj_bias, x_mid, x_out)?;
            self.profile.mark(gpu, "forward: mlp c_proj")?;
        }
        let last = ws.residual[self.config.n_layer].view();
        gpu.layernorm_forward(last, p.ln_f_weight, p.ln_f_bias, ws.hidden.view(), ws.ln_f_mean.view(), ws.ln_f_rstd.view())?;
        self.profile.mark(gpu, "forward: ln_f")?;
        Ok(())
    }

    /// The CP head over the first `positions` rows of the hidden states: statistics, and with
    /// `gradients` the head's gradients and dh (in `ws.d_hidden`). docs/math.md H1–H11.
    fn head(&self, positions: usize, aux_coef: f64, gradients: bool) -> Result<CpHeadStats> {
        let (gpu, ws, p, g) = (self.gpu, self.ws, self.p, self.g);
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        let shape = HeadShape { horizon: self.config.horizon, rank: self.config.rank };
        let (n, r, rn) = (shape.horizon, shape.rank, shape.rn());
        let hidden = ws.hidden.view().prefix(positions * c);
        let inv_count = 1.0 / positions as f32;
        // (H1) z (positions, r·n·C) = h Wᵀ; z = h when there are no expanders
        let z = match &p.head {
            Some(head) => {
                let z = ws.z.view().prefix(positions * rn * c);
                gpu.matmul(Operand::normal(hidden), Operand::transposed(head.expand_weight), z, positions, c, rn * c, false)?;
                z
            }
            None => hidden,
        };
        // (H3) log w (positions, r)
        let log_w = ws.log_w.view().prefix(positions * r);
        match p.head.as_ref().filter(|_| r > 1) {
            Some(head) => {
                gpu.broadcast_rows(head.gate_bias, log_w)?;
                gpu.matmul(Operand::normal(hidden), Operand::transposed(head.gate_weight), log_w, positions, c, r, true)?;
                gpu.gate_log_softmax(log_w, r)?;
            }
            None => gpu.fill_zero(log_w)?,
        }
        self.profile.mark(gpu, "head: expanders + gate")?;
        let dz = match &p.head {
            Some(_) => ws.dz.view().prefix(positions * rn * c),
            None => ws.d_hidden.view().prefix(positions * c),
        };
        let (log_p, posterior) = (ws.log_p.view().prefix(positions * rn), ws.posterior.view().prefix(positions * r));
        let targets = ws.targets.view();
        let per_block = (HEAD_BLOCK_ROWS / rn).max(1);
        for t0 in (0..positions).step_by(per_block) {
            let count = per_block.min(positions - t0);
            let rows = count * rn;
            let logits = ws.logits.view().prefix(rows * v);
            let z_block = z.slice(t0 * rn * c, rows * c);
            let block_targets = targets.slice(t0 * n, count * n);
            // (H2) logits, log P[α,s](y_s); (H7) the posterior and dℓ in place
            gpu.matmul(Operand::normal(z_block), Operand::transposed(p.wte), logits, rows, c, v, false)?;
            let (block_log_w, block_posterior) = (log_w.slice(t0 * r, count * r), posterior.slice(t0 * r, count * r));
            let block_log_p = log_p.slice(t0 * rn, rows);
            gpu.head_position(logits, block_targets, block_log_w, block_log_p, block_posterior, v, shape, inv_count, gradients)?;
            self.profile.mark(gpu, "head: logits + softmax")?;
            if !gradients {
                continue;
            }
            // (H8) dz = dℓ wte, dwte += dℓᵀ z
            gpu.matmul(Operand::normal(logits), Operand::normal(p.wte), dz.slice(t0 * rn * c, rows * c), rows, v, c, false)?;
            gpu.matmul(Operand::transposed(logits), Operand::normal(z_block), g.wte, v, rows, c, true)?;
            self.profile.mark(gpu, "head: dℓ, dz, dwte")?;
        }
        // (H4–H6)
        let sums_view = ws.statistics.view();
        gpu.head_statistics(log_p, log_w, sums_view, shape)?;
        let sums = gpu.download(sums_view)?;
        self.profile.mark(gpu, "head: statistics")?;
        let count = positions as f64;
        let mut stats = CpHeadStats {
            joint_loss: sums[0] / count,
            gate_entropy: sums[1] / count,
            head_losses: sums[2..2 + n].iter().map(|x| x / count).collect(),
            expert_fraction: sums[2 + n..2 + n + r].iter().map(|x| x / count).collect(),
            expert_weight: sums[2 + n + r..].iter().map(|x| x / count).collect(),
            aux: 0.0,
        };
        stats.aux = r as f64 * stats.expert_fraction.iter().zip(&stats.expert_weight).map(|(f, m)| f * m).sum::<f64>();
        if !gradients {
            return Ok(stats);
        }
        let d_hidden = ws.d_hidden.view().prefix(positions * c);
        if let (Some(head), Some(head_grads)) = (&p.head, &g.head) {
            // (H9) dh = dz W ; dW += dzᵀ h
            gpu.matmul(Operand::normal(dz), Operand::normal(head.expand_weight), d_hidden, positions, rn * c, c, false)?;
            gpu.matmul(Operand::transposed(dz), Operand::normal(hidden), head_grads.expand_weight, rn * c, positions, c, true)?;
            if r > 1 {
                // (H10, H11) the gate
                let da = ws.d_gate.view().prefix(positions * r);
                gpu.gate_gradient(log_w, posterior, sums_view.slice(2 + n, r), da, r, inv_count, aux_coef as f32)?;
                gpu.matmul(Operand::normal(da), Operand::normal(head.gate_weight), d_hidden, positions, r, c, true)?;
                gpu.matmul(Operand::transposed(da), Operand::normal(hidden), head_grads.gate_weight, r, positions, c, true)?;
                gpu.column_sums_add(da, head_grads.gate_bias)?;
            }
        }
        self.profile.mark(gpu, "head: dh, dW, gate")?;
        Ok(stats)
    }

    fn backbone_backward(&self) -> Result<()> {
        let (gpu, ws, p, g) = (self.gpu, self.ws, self.p, self.g);
        let (c, seq) = (self.config.n_embd, ws.seq);
        let shape = self.attention_shape();
        let d_residual = ws.d_residual.view();
        gpu.fill_zero(d_residual)?;
        let last = ws.residual[self.config.n_layer].view();
        gpu.layernorm_backward(
            last,
            ws.d_hidden.view(),
            p.ln_f_weight,
            ws.ln_f_mean.view(),
            ws.ln_f_rstd.view(),
            d_residual,
            g.ln_f_weight,
            g.ln_f_bias,
        )?;
        self.profile.mark(gpu, "backward: ln_f")?;
        for l in (0..self.config.n_layer).rev() {
            let (block, grads, acts) = (&p.blocks[l], &g.blocks[l], &ws.layers[l]);
            // MLP: x_out = x_mid + gelu(ln_2(x_mid) W_fc + b_fc) W_proj + b_proj
            let d_fc = ws.d_fc.view();
            self.linear_backward(
                acts.fc_gelu.view(),
                block.mlp_c_proj_weight,
                d_residual,
                ws.d_fc_gelu.view(),
                grads.mlp_c_proj_weight,
                grads.mlp_c_proj_bias,
            )?;
            self.profile.mark(gpu, "backward: mlp c_proj")?;
            gpu.gelu_backward(acts.fc.view(), ws.d_fc_gelu.view(), d_fc)?;
            self.linear_backward(
                acts.ln_2.view(),
                block.mlp_c_fc_weight,
                d_fc,
                ws.d_ln.view(),
                grads.mlp_c_fc_weight,
                grads.mlp_c_fc_bias,
            )?;
            let (mean, rstd) = (acts.ln_2_mean.view(), acts.ln_2_rstd.view());
            gpu.layernorm_backward(
                acts.x_mid.view(),
                ws.d_ln.view(),
                block.ln_2_weight,
                mean,
                rstd,
                d_residual,
                grads.ln_2_weight,
                grads.ln_2_bias,
            )?;
            self.profile.mark(gpu, "backward: gelu + c_fc + ln_2")?;
            // attention: x_mid = x + attn(ln_1(x)) W_proj + b_proj
            let d_y = ws.d_att_y.view();
            self.linear_backward(
                acts.att_y.view(),
                block.attn_c_proj_weight,
                d_residual,
                d_y,
                grads.attn_c_proj_weight,
                grads.attn_c_proj_bias,
            )?;
            self.profile.mark(gpu, "backward: attn c_proj")?;
            // the gradient of c_attn's output lands in ws.qkv
            match self.attention {
                AttentionRoute::Fused => {
                    let (lse, dots) = (acts.lse.view(), ws.att_dots.view());
                    gpu.fused_attention_backward(acts.qkv.view(), acts.att_y.view(), d_y, lse, dots, ws.qkv.view(), shape)?;
                }
                AttentionRoute::Products => {
                    let d_y_heads = ws.y_heads.view();
                    gpu.heads_rows(d_y_heads, d_y, shape, false)?;
                    self.attention_backward(acts.q_k_v(), ws.d_q_k_v(), acts.att.view(), ws.d_att.view(), d_y_heads)?;
                    gpu.qkv_heads(ws.qkv.view(), ws.d_qkv_heads.view(), shape, true)?;
                }
            }
            self.profile.mark(gpu, "backward: attention core")?;
            self.linear_backward(
                acts.ln_1.view(),
                block.attn_c_attn_weight,
                ws.qkv.view(),
                ws.d_ln.view(),
                grads.attn_c_attn_weight,
                grads.attn_c_attn_bias,
            )?;
            let (mean, rstd) = (acts.ln_1_mean.view(), acts.ln_1_rstd.view());
            gpu.layernorm_backward(
                ws.residual[l].view(),
                ws.d_ln.view(),
                block.ln_1_weight,
                mean,
                rstd,
                d_residual,
                grads.ln_1_weight,
                grads.ln_1_bias,
            )?;
            self.profile.mark(gpu, "backward: c_attn + ln_1")?;
        }
        gpu.embedding_backward(ws.inputs.view(), d_residual, g.wte, g.wpe, seq, c)?;
        self.profile.mark(gpu, "backward: embedding")?;
        Ok(())
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

    #[test]
    fn attention_route_is_fused_in_f32_where_a_kernel_exists() {
        if std::env::var_os("MULTITOKEN_ATTENTION").is_some() {
            return; // chosen by hand for this run
        }
        let base = ModelConfig::preset("base", 64, 1, 1).unwrap(); // head size 64
        assert_eq!(AttentionRoute::default_for(&base, false), AttentionRoute::Fused);
        assert_eq!(AttentionRoute::default_for(&base, true), AttentionRoute::Products);
        let odd = ModelConfig { n_embd: 96, n_head: 2, ..base }; // head size 48: no kernel
        assert_eq!(AttentionRoute::default_for(&odd, false), AttentionRoute::Products);
    }
}
