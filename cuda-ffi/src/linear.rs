//! `kernels/linear.cu`: decoding's linear layers on a few rows, in one kernel with the
//! LayerNorm before and the bias, GELU or residual after folded in.

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, LaunchConfig};

use crate::constants::{FEW_ROWS_LARGE, FEW_ROWS_SMALL, FEW_ROW_K_CHUNK_MAX, FEW_ROW_TILE_COLUMNS, FEW_ROW_WARPS, THREADS};
use crate::memory::{View, Workspace};
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/linear.cu");

/// The most rows `linear_few_rows` takes (its larger instance's).
pub const FEW_ROWS_MAX: usize = FEW_ROWS_LARGE;
/// Floats of x's rows (rows · k) the LayerNorm prologue stages, per row its instance takes: the
/// warps' sums' shared memory, FEW_ROW_WARPS × 32 float4s a row.
const LAYERNORM_FLOATS_PER_ROW: usize = FEW_ROW_WARPS * 32 * 4;
/// Floats of the blocks' partial sums, and column tiles with an arrival counter.
const PARTIALS: usize = 1 << 20;
const TILES_MAX: usize = 1024;

pub(crate) struct Kernels {
    /// for up to `FEW_ROWS_SMALL` rows, and for up to `FEW_ROWS_LARGE`
    instances: [CudaFunction; 2],
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self> {
        Ok(Kernels { instances: [module.load_function("linear_few_rows_small")?, module.load_function("linear_few_rows_large")?] })
    }

    /// Blocks of the 4-row instance that run at once on one multiprocessor.
    pub(crate) fn resident_blocks(&self) -> Result<usize> {
        Ok(self.instances[0].occupancy_max_active_blocks_per_multiprocessor(THREADS as u32, 0, None)?.max(1) as usize)
    }
}

/// The kernel's scratch: partial sums of blocks that split the weight's rows, and one arrival
/// counter per column tile (each back at zero when the kernel ends). Outside the pool: it lives
/// as long as the device.
pub(crate) struct FewRowScratch {
    partials: Workspace,
    arrivals: Workspace,
}

impl FewRowScratch {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Result<Self> {
        let scratch = FewRowScratch { partials: Workspace::new(context, 4 * PARTIALS)?, arrivals: Workspace::new(context, 4 * TILES_MAX)? };
        // SAFETY: a fresh allocation of TILES_MAX counters, which start at zero.
        unsafe { cudarc::driver::result::memset_d8_sync(scratch.arrivals.view.ptr, 0, 4 * TILES_MAX)? };
        Ok(scratch)
    }
}

/// What [`Gpu::linear_few_rows`] does to the product before it writes it.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// `out = x·w + b`
    Bias,
    /// `out = gelu(x·w + b)`
    Gelu,
    /// `out = residual + x·w + b`
    Residual(View<f32>),
}

impl Gpu {
    /// Decoding's linear layers in one kernel: `out (rows, n) = epilogue(x' · weight + bias)`, where
    /// x' is x (rows, k), or its LayerNorm with `layernorm = Some((gain, shift))`, and weight is
    /// (k, n). Returns `Ok(false)`, having done nothing, where the kernel does not apply: more than
    /// [`FEW_ROWS_MAX`] rows, n not a multiple of 4, views not 16-byte aligned, or
    /// `few_row_linear` off; the caller then takes the general route.
    pub fn linear_few_rows(
        &self,
        x: View<f32>,
        layernorm: Option<(View<f32>, View<f32>)>,
        weight: View<f32>,
        bias: View<f32>,
        epilogue: Epilogue,
        out: View<f32>,
    ) -> Result<bool> {
        let n = bias.len();
        check(n > 0 && out.len().is_multiple_of(n) && weight.len().is_multiple_of(n), || "linear: shapes do not fit".into())?;
        let (rows, k) = (out.len() / n, weight.len() / n);
        check(x.len() == rows * k, || format!("linear: x has {} elements, not {rows}×{k}", x.len()))?;
        if rows == 0 || k == 0 {
            return Ok(false);
        }
        let (instance, instance_rows) = if rows <= FEW_ROWS_SMALL { (0, FEW_ROWS_SMALL) } else { (1, FEW_ROWS_LARGE) };
        if let Some((gain, shift)) = layernorm {
            check(gain.len() == k && shift.len() == k, || format!("linear: the LayerNorm's parameters are not {k} long"))?;
            // the kernel stages x's whole rows in float4s
            if rows * k > LAYERNORM_FLOATS_PER_ROW * instance_rows || !k.is_multiple_of(4) || !x.ptr.is_multiple_of(16) {
                return Ok(false);
            }
        }
        let residual = match epilogue {
            Epilogue::Residual(residual) => {
                check(residual.len() == out.len(), || "linear: residual and out differ in length".into())?;
                Some(residual)
            }
            _ => None,
        };
        let aligned = [weight.ptr, bias.ptr, out.ptr].iter().chain(residual.map(|v| v.ptr).iter()).all(|p| p.is_multiple_of(16));
        // as many blocks as run at once (a second wave would double the time), unless w's rows
        // need more; the split depends on (k, n) and the device only, so that a row's sums run
        // in the same order however many rows come with it
        let tiles = n.div_ceil(FEW_ROW_TILE_COLUMNS);
        let splits = (self.few_row_blocks / tiles).max(k.div_ceil(FEW_ROW_K_CHUNK_MAX)).min(k.div_ceil(8)).max(1);
        let k_chunk = k.div_ceil(splits);
        let splits = k.div_ceil(k_chunk);
        let fits = splits == 1 || (tiles <= TILES_MAX && splits * rows * n <= PARTIALS);
        if !self.few_row_linear || rows > FEW_ROWS_MAX || !n.is_multiple_of(4) || !aligned || !fits {
            return Ok(false);
        }
        let null = 0u64;
        let (ln_gain, ln_shift) = layernorm.map_or((null, null), |(gain, shift)| (gain.ptr, shift.ptr));
        let residual_ptr = residual.map_or(null, |v| v.ptr);
        let (rows_i, k_i, n_i, k_chunk_i, gelu) =
            (rows as i32, k as i32, n as i32, k_chunk as i32, matches!(epilogue, Epilogue::Gelu) as i32);
        let scratch = &self.few_rows;
        let mut launch = self.launch_early(&self.kernels.linear.instances[instance]);
        launch.arg(&x.ptr).arg(&ln_gain).arg(&ln_shift).arg(&weight.ptr).arg(&bias.ptr).arg(&residual_ptr).arg(&out.ptr);
        launch.arg(&scratch.partials.view.ptr).arg(&scratch.arrivals.view.ptr);
        launch.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&k_chunk_i).arg(&gelu);
        let config = LaunchConfig { grid_dim: (tiles as u32, splits as u32, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and alignment checked above; the partial sums (splits·rows·n floats)
        // and the counters (one per tile) fit the scratch.
        unsafe { launch.launch(config) }?;
        Ok(true)
    }

    /// (registers per thread, bytes spilled to local memory, blocks per SM) of `linear_few_rows`'s
    /// two instances.
    pub fn few_row_linear_resources(&self) -> Result<Vec<(i32, i32, u32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let mut out = Vec::new();
        for kernel in &self.kernels.linear.instances {
            let blocks = kernel.occupancy_max_active_blocks_per_multiprocessor(THREADS as u32, 0, None)?;
            out.push((kernel.get_attribute(REGISTERS)?, kernel.get_attribute(LOCAL)?, blocks));
        }
        Ok(out)
    }
}
