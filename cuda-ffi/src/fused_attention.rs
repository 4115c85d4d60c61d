//! `kernels/fused_attention.cu`: causal attention in one kernel each way (the FlashAttention-2
//! scheme, in f32): the (T, T) weights never exist. In bf16 (`--precision bf16`) the same
//! scheme on tensor cores, `kernels/tensor_core_attention.cu`: one kernel forward, two backward
//! (dK and dV by key tile, dQ by query tile).

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use crate::attention::AttentionShape;
use crate::constants::{ATTENTION_THREADS, ATTENTION_TILE, ATTENTION_TILE_PADDING, FUSED_ATTENTION_HEAD_SIZES, TC_STAGED_HEAD_SIZE_MAX};
use crate::device::warp_per_row_config;
use crate::memory::View;
use crate::{check, CudaError, Gpu, ProductPrecision, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/fused_attention.cu");
pub(crate) const TENSOR_CORE_SOURCE: &str = include_str!("../kernels/tensor_core_attention.cu");

pub(crate) struct Kernels {
    row_dots: CudaFunction,
    /// (head size, forward, backward)
    pairs: Vec<(usize, CudaFunction, CudaFunction)>,
    /// bf16 tensor cores: (head size, forward, backward of k and v, backward of q)
    tensor_core: Vec<(usize, [CudaFunction; 3])>,
}

/// The tensor-core kernels' rows per tile and threads per block (`kernels/tensor_core_attention.cu`).
const TC_TILE: usize = 64;
const TC_THREADS: usize = 128;

/// Bytes of shared memory the tensor-core kernels use for head size `hs`: bf16 tiles (64, hs)
/// padded by 8 elements a row — forward q, k, v; backward_kv k, v, q, dy and two rows of 64
/// floats; backward_q q, dy, k, v — then, up to head size 64, the staging of the next two tiles
/// as they are read (k and v in bf16; in backward_kv q in bf16, dy in f32 and the next 64
/// log-sum-exps and row dots).
fn tensor_core_shared_bytes(hs: usize, kernel: usize) -> usize {
    let tile = 2 * TC_TILE * (hs + 8);
    let rows = 2 * 4 * TC_TILE;
    let staging = match (hs <= TC_STAGED_HEAD_SIZE_MAX, kernel) {
        (false, _) => 0,
        (true, 1) => TC_TILE * hs * (2 + 4) + rows,
        (true, _) => TC_TILE * hs * (2 + 2),
    };
    staging
        + match kernel {
            0 => 3 * tile,
            1 => 4 * tile + rows,
            _ => 4 * tile,
        }
}

/// Floats of shared memory the kernels use for head size `hs`: the forward holds q, k, v and p
/// tiles, the backward k, v, q, dy, p, ds tiles and two row vectors.
fn shared_floats(hs: usize, backward: bool) -> usize {
    let (head_tile, score_tile) =
        (ATTENTION_TILE * (hs + ATTENTION_TILE_PADDING), ATTENTION_TILE * (ATTENTION_TILE + ATTENTION_TILE_PADDING));
    if backward {
        4 * head_tile + 2 * score_tile + 2 * ATTENTION_TILE
    } else {
        3 * head_tile + score_tile
    }
}

/// The q, k, v rows (B, T, 3C) that c_attn wrote, as the fused kernels read them: in f32, or
/// rounded to bf16 for the tensor-core kernels (`--precision bf16`), which is then all that the
/// backward pass needs to keep of them.
#[derive(Clone, Copy, Debug)]
pub enum QkvRows {
    /// f32, for the f32 kernels
    F32(View<f32>),
    /// rounded to bf16 (`Gpu::bf16_copy`), for the tensor-core kernels
    Bf16(View<u16>),
}

impl QkvRows {
    fn ptr(self) -> u64 {
        match self {
            QkvRows::F32(rows) => rows.ptr,
            QkvRows::Bf16(rows) => rows.ptr,
        }
    }
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>, tensor_core_module: &Arc<CudaModule>) -> Result<Self> {
        let pairs = FUSED_ATTENTION_HEAD_SIZES
            .iter()
            .map(|&hs| {
                let forward = module.load_function(&format!("fused_attention_forward_{hs}"))?;
                let backward = module.load_function(&format!("fused_attention_backward_{hs}"))?;
                // more than the default 48 KiB of shared memory per block
                for (kernel, is_backward) in [(&forward, false), (&backward, true)] {
                    let bytes = (4 * shared_floats(hs, is_backward)) as i32;
                    kernel.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
                }
                Ok((hs, forward, backward))
            })
            .collect::<Result<Vec<_>>>()?;
        let tensor_core = FUSED_ATTENTION_HEAD_SIZES
            .iter()
            .map(|&hs| {
                let load = |name: &str| tensor_core_module.load_function(&format!("tc_attention_{name}_{hs}"));
                let kernels = [load("forward")?, load("backward_kv")?, load("backward_q")?];
                for (i, kernel) in kernels.iter().enumerate() {
                    let bytes = tensor_core_shared_bytes(hs, i) as i32;
                    kernel.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
                }
                Ok((hs, kernels))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Kernels { row_dots: module.load_function("attention_row_dots")?, pairs, tensor_core })
    }

    fn tensor_core(&self, hs: usize) -> Result<&[CudaFunction; 3]> {
        let found = self.tensor_core.iter().find(|(size, _)| *size == hs);
        found.map(|(_, kernels)| kernels).ok_or_else(|| CudaError::Shape(format!("tensor-core attention: no kernel for head size {hs}")))
    }

    fn pair(&self, hs: usize) -> Result<&(usize, CudaFunction, CudaFunction)> {
        let found = self.pairs.iter().find(|(size, _, _)| *size == hs);
        found.ok_or_else(|| {
            CudaError::Shape(format!("fused attention: no kernel for head size {hs} (built for {FUSED_ATTENTION_HEAD_SIZES:?})"))
        })
    }
}

fn tensor_core_config(shape: AttentionShape, kernel: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (shape.seq.div_ceil(TC_TILE) as u32, (shape.batch * shape.n_head) as u32, 1),
        block_dim: (TC_THREADS as u32, 1, 1),
        shared_mem_bytes: tensor_core_shared_bytes(shape.head_size, kernel) as u32,
    }
}

fn launch_config(shape: AttentionShape, backward: bool) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (shape.seq.div_ceil(ATTENTION_TILE) as u32, (shape.batch * shape.n_head) as u32, 1),
        block_dim: (ATTENTION_THREADS as u32, 1, 1),
        shared_mem_bytes: 4 * shared_floats(shape.head_size, backward) as u32,
    }
}

impl Gpu {
    /// (head size, forward registers per thread, backward registers, bytes spilled to local
    /// memory by either) of each fused attention kernel pair, as compiled for this device.
    pub fn fused_attention_resources(&self) -> Result<Vec<(usize, i32, i32, i32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let mut out = Vec::new();
        for (hs, forward, backward) in &self.kernels.fused_attention.pairs {
            let spilled = forward.get_attribute(LOCAL)? + backward.get_attribute(LOCAL)?;
            out.push((*hs, forward.get_attribute(REGISTERS)?, backward.get_attribute(REGISTERS)?, spilled));
        }
        Ok(out)
    }

    /// (head size, registers per thread of the forward, dk-dv and dq kernels, bytes spilled by
    /// any) of each tensor-core attention kernel set, as compiled for this device.
    pub fn tensor_core_attention_resources(&self) -> Result<Vec<(usize, [i32; 3], i32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let mut out = Vec::new();
        for (hs, kernels) in &self.kernels.fused_attention.tensor_core {
            let mut registers = [0; 3];
            let mut spilled = 0;
            for (i, kernel) in kernels.iter().enumerate() {
                registers[i] = kernel.get_attribute(REGISTERS)?;
                spilled += kernel.get_attribute(LOCAL)?;
            }
            out.push((*hs, registers, spilled));
        }
        Ok(out)
    }

    fn fused_attention_check(&self, what: &str, qkv: QkvRows, views: &[(View<f32>, usize)], shape: AttentionShape) -> Result<()> {
        let tensor_cores = self.precision == ProductPrecision::Bf16;
        let (qkv_len, qkv_ptr) = match qkv {
            QkvRows::F32(rows) if !tensor_cores => (rows.len(), rows.ptr),
            QkvRows::Bf16(rows) if tensor_cores => (rows.len(), rows.ptr),
            _ => {
                return Err(CudaError::Shape(format!(
                    "{what}: the {:?} kernels read qkv in {} (QkvRows)",
                    self.precision,
                    if tensor_cores { "bf16" } else { "f32" }
                )))
            }
        };
        shape.check(what, qkv_len, 3)?;
        check(qkv_ptr.is_multiple_of(16), || format!("{what}: buffers must start on 16-byte boundaries"))?;
        for (view, factor) in views {
            shape.check(what, view.len(), *factor)?;
            check(view.ptr.is_multiple_of(16), || format!("{what}: buffers must start on 16-byte boundaries"))?;
        }
        // B·H is the grid's second dimension
        check(shape.batch * shape.n_head <= 65_535, || {
            format!("{what}: B·H = {} is more than 65535 blocks; use MULTITOKEN_ATTENTION=products", shape.batch * shape.n_head)
        })
    }

    /// Causal attention in one kernel: q, k, v read from c_attn's rows `qkv` (B, T, 3C), the
    /// output written to rows `y` (B, T, C), and each query row's log-sum-exp of its scaled
    /// scores, in base 2, to `lse` (B·H, T) for the backward pass. On bf16 tensor cores from qkv
    /// rounded to bf16 when `self.precision` is bf16, and then y rounded to bf16 into `y_rounded`
    /// too where given (what the next product reads); else in f32 from qkv in f32.
    pub fn fused_attention_forward(
        &self,
        qkv: QkvRows,
        y: View<f32>,
        y_rounded: Option<View<u16>>,
        lse: View<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        let (_, forward, _) = self.kernels.fused_attention.pair(shape.head_size)?;
        self.fused_attention_check("fused_attention_forward", qkv, &[(y, 1)], shape)?;
        check(
            y_rounded.is_none_or(|r| r.len() == y.len() && r.ptr.is_multiple_of(16) && self.precision == ProductPrecision::Bf16),
            || "fused_attention_forward: y rounded to bf16 is written in bf16 only, as long as y, from a 16-byte boundary".into(),
        )?;
        check(lse.len() == shape.batch * shape.n_head * shape.seq, || "fused_attention_forward: lse is not (B·H, T)".into())?;
        let (seq, n_head, scale) = (shape.seq as i32, shape.n_head as i32, 1.0 / (shape.head_size as f32).sqrt());
        let tensor_cores = self.precision == ProductPrecision::Bf16;
        let kernel = if tensor_cores { &self.kernels.fused_attention.tensor_core(shape.head_size)?[0] } else { forward };
        let (qkv, y_rounded) = (qkv.ptr(), y_rounded.map_or(0, |r| r.ptr));
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&qkv).arg(&y.ptr);
        if tensor_cores {
            launch.arg(&y_rounded);
        }
        launch.arg(&lse.ptr).arg(&seq).arg(&n_head).arg(&scale);
        let config = if tensor_cores { tensor_core_config(shape, 0) } else { launch_config(shape, false) };
        // SAFETY: sizes and alignment checked; one block per (query tile, head).
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// Backward of [`Gpu::fused_attention_forward`] from dy (B, T, C): dqkv (B, T, 3C) is
    /// overwritten with the gradients of q, k and v.
    pub fn fused_attention_backward(
        &self,
        qkv: QkvRows,
        y: View<f32>,
        dy: View<f32>,
        lse: View<f32>,
        dqkv: View<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        let (_, _, backward) = self.kernels.fused_attention.pair(shape.head_size)?;
        self.fused_attention_check("fused_attention_backward", qkv, &[(y, 1), (dy, 1), (dqkv, 3)], shape)?;
        let qkv = qkv.ptr();
        let heads_rows = shape.batch * shape.n_head * shape.seq;
        check(lse.len() == heads_rows, || "fused_attention_backward: lse is not (B·H, T)".into())?;
        let [_, seq, n_head, hs] = shape.dims();
        let rows = (shape.batch * shape.seq) as i32;
        let dots = self.alloc::<f32>(heads_rows)?;
        let mut launch = self.stream.launch_builder(&self.kernels.fused_attention.row_dots);
        launch.arg(&y.ptr).arg(&dy.ptr).arg(dots.device_ptr()).arg(&rows).arg(&seq).arg(&n_head).arg(&hs);
        // SAFETY: sizes checked; one warp per (row, head).
        unsafe { launch.launch(warp_per_row_config(heads_rows)) }?;
        let scale = 1.0 / (shape.head_size as f32).sqrt();
        if self.precision == ProductPrecision::Bf16 {
            // dk and dv by key tile, then dq by query tile: each writes its part of dqkv whole
            let kernels = self.kernels.fused_attention.tensor_core(shape.head_size)?;
            for (i, kernel) in kernels.iter().enumerate().skip(1) {
                let mut launch = self.stream.launch_builder(kernel);
                launch.arg(&qkv).arg(&dy.ptr).arg(&lse.ptr).arg(dots.device_ptr()).arg(&dqkv.ptr).arg(&seq).arg(&n_head).arg(&scale);
                // SAFETY: sizes and alignment checked; one block per (tile, head).
                unsafe { launch.launch(tensor_core_config(shape, i)) }?;
            }
            return Ok(());
        }
        // dq is summed over key tiles in turn, starting from zeros; a turn counter per (head,
        // query tile), a ticket counter per head
        self.fill_zero(dqkv)?;
        let heads = shape.batch * shape.n_head;
        let (turns, tickets) = (self.zeros::<i32>(heads * shape.seq.div_ceil(ATTENTION_TILE))?, self.zeros::<i32>(heads)?);
        let mut launch = self.stream.launch_builder(backward);
        launch.arg(&qkv).arg(&dy.ptr).arg(&lse.ptr).arg(dots.device_ptr()).arg(&dqkv.ptr).arg(turns.device_ptr()).arg(tickets.device_ptr());
        launch.arg(&seq).arg(&n_head).arg(&scale);
        // SAFETY: sizes and alignment checked; one block per (key tile, head), one turn counter
        // per (head, query tile), one ticket counter per head.
        unsafe { launch.launch(launch_config(shape, true)) }?;
        Ok(())
    }
}
