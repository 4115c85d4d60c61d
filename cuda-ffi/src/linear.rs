//! `kernels/linear.cu`: decoding's products on a few rows, `x · wᵀ` with w given by output
//! column, in one kernel with the LayerNorm before and the bias, GELU or residual after folded in;
//! w in f32, or in bf16 for bf16 decoding ([`ColumnWeights`]).

use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig};

use crate::constants::{FEW_ROWS_LARGE, FEW_ROWS_SMALL, FEW_ROW_COLUMNS, FEW_ROW_LAYERNORM_K_MAX, FEW_ROW_WARPS, THREADS, TILE_COLUMNS};
use crate::memory::View;
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/linear.cu");

/// The most rows `linear_few_rows` takes (its largest instance's).
pub const FEW_ROWS_MAX: usize = FEW_ROWS_LARGE;

/// The widest rows `linear_few_rows`'s LayerNorm prologue takes (k at most this).
pub const FEW_ROW_LAYERNORM_WIDTH_MAX: usize = FEW_ROW_LAYERNORM_K_MAX;

/// The most rows `linear_column_tiles` takes.
pub const TILE_ROWS_MAX: usize = crate::constants::TILE_ROWS_MAX;

/// The kernels for weights of one element type.
struct ForWeights {
    /// for up to `FEW_ROWS_SMALL` rows and up to `FEW_ROWS_LARGE`, with those numbers
    instances: [(usize, CudaFunction); 2],
    /// for up to [`TILE_ROWS_MAX`] rows, no prologue, no bias
    column_tiles: CudaFunction,
}

impl ForWeights {
    /// `suffix`: "" for the f32 instances, "_bf16" for the bf16 ones
    fn load(module: &Arc<CudaModule>, suffix: &str) -> Result<Self> {
        Ok(ForWeights {
            instances: [
                (FEW_ROWS_SMALL, module.load_function(&format!("linear_few_rows_small{suffix}"))?),
                (FEW_ROWS_LARGE, module.load_function(&format!("linear_few_rows_large{suffix}"))?),
            ],
            column_tiles: module.load_function(&format!("linear_column_tiles{suffix}"))?,
        })
    }
}

pub(crate) struct Kernels {
    f32: ForWeights,
    bf16: ForWeights,
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self> {
        Ok(Kernels { f32: ForWeights::load(module, "")?, bf16: ForWeights::load(module, "_bf16")? })
    }

    fn for_weights(&self, weights: ColumnWeights) -> &ForWeights {
        match weights {
            ColumnWeights::F32(_) => &self.f32,
            ColumnWeights::Bf16(_) => &self.bf16,
        }
    }
}

/// A weight by output column, (n, k), as the few-row kernels read it: in f32, or as a bf16 copy
/// (each element the 16 bits of a bf16; `Gpu::round_to_bf16`), which halves the bytes a
/// decoding pass streams. The kernels widen a bf16 to the f32 it stands for and go on in f32.
#[derive(Clone, Copy, Debug)]
pub enum ColumnWeights {
    /// the weights as they are
    F32(View<f32>),
    /// the weights rounded to bf16
    Bf16(View<u16>),
}

impl ColumnWeights {
    /// elements
    pub fn len(&self) -> usize {
        match self {
            ColumnWeights::F32(w) => w.len(),
            ColumnWeights::Bf16(w) => w.len(),
        }
    }

    /// no elements
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `len` elements from `offset` on
    pub fn slice(self, offset: usize, len: usize) -> Self {
        match self {
            ColumnWeights::F32(w) => ColumnWeights::F32(w.slice(offset, len)),
            ColumnWeights::Bf16(w) => ColumnWeights::Bf16(w.slice(offset, len)),
        }
    }

    /// the first `len` elements
    pub fn prefix(self, len: usize) -> Self {
        self.slice(0, len)
    }

    fn ptr(&self) -> u64 {
        match self {
            ColumnWeights::F32(w) => w.ptr,
            ColumnWeights::Bf16(w) => w.ptr,
        }
    }
}

impl From<View<f32>> for ColumnWeights {
    fn from(weights: View<f32>) -> Self {
        ColumnWeights::F32(weights)
    }
}

impl From<View<u16>> for ColumnWeights {
    fn from(weights: View<u16>) -> Self {
        ColumnWeights::Bf16(weights)
    }
}

/// (rows, k, n) of `out (rows, n) = x (rows, k) · wᵀ` from the three lengths, or `None` where
/// one is empty.
fn product_shape(x: View<f32>, weight_by_column: ColumnWeights, out: View<f32>) -> Result<Option<(usize, usize, usize)>> {
    let k_times_n = weight_by_column.len();
    // rows·k = |x|, n·k = |w|, rows·n = |out|
    let rows = ((x.len() as f64 * out.len() as f64 / k_times_n.max(1) as f64).sqrt().round()) as usize;
    if rows == 0 || k_times_n == 0 {
        return Ok(None);
    }
    let (k, n) = (x.len() / rows, out.len() / rows);
    check(rows * k == x.len() && rows * n == out.len() && k * n == k_times_n, || {
        format!("linear: x ({} elements), weight ({k_times_n}) and out ({}) are not rows×k, n×k and rows×n", x.len(), out.len())
    })?;
    Ok(Some((rows, k, n)))
}

/// What [`Gpu::linear_few_rows`] does to the product before it writes it.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// `out = x·wᵀ + b`
    Bias,
    /// `out = gelu(x·wᵀ + b)`
    Gelu,
    /// `out = residual + x·wᵀ + b`
    Residual(View<f32>),
}

impl Gpu {
    /// Decoding's products in one kernel: `out (rows, n) = epilogue(x' · weight_by_columnᵀ + bias)`,
    /// where x' is x (rows, k), or its LayerNorm with `layernorm = Some((gain, shift))`, and
    /// `weight_by_column` is (n, k): output column o's k weights one after another (wte's layout,
    /// and the expanders'; a linear layer's weight (k, n) transposed), in f32 or bf16. No bias:
    /// zero. On bf16 weights a row's result is the bits that f32 weights holding the same values
    /// give. Returns
    /// `Ok(false)`, having done nothing, where the kernel does not apply: more than
    /// [`FEW_ROWS_MAX`] rows, k not a multiple of 4, x not 16-byte aligned, a LayerNorm over
    /// rows longer than it stages, or `few_row_linear` off; the caller then takes the general
    /// route.
    pub fn linear_few_rows(
        &self,
        x: View<f32>,
        layernorm: Option<(View<f32>, View<f32>)>,
        weight_by_column: impl Into<ColumnWeights>,
        bias: Option<View<f32>>,
        epilogue: Epilogue,
        out: View<f32>,
    ) -> Result<bool> {
        let weight_by_column = weight_by_column.into();
        let Some((rows, k, n)) = product_shape(x, weight_by_column, out)? else {
            return Ok(false);
        };
        check(bias.is_none_or(|b| b.len() == n), || format!("linear: the bias is not {n} long"))?;
        let instances = &self.kernels.linear.for_weights(weight_by_column).instances;
        let Some((_, kernel)) = instances.iter().find(|(most, _)| rows <= *most) else {
            return Ok(false);
        };
        if let Some((gain, shift)) = layernorm {
            check(gain.len() == k && shift.len() == k, || format!("linear: the LayerNorm's parameters are not {k} long"))?;
            if k > FEW_ROW_LAYERNORM_K_MAX {
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
        let aligned = [x.ptr, weight_by_column.ptr()].iter().all(|p| p.is_multiple_of(16));
        if !self.few_row_linear || !k.is_multiple_of(4) || !aligned {
            return Ok(false);
        }
        let split = self.column_split(k, n);
        let null = 0u64;
        let (ln_gain, ln_shift) = layernorm.map_or((null, null), |(gain, shift)| (gain.ptr, shift.ptr));
        let (bias_ptr, residual_ptr) = (bias.map_or(null, |v| v.ptr), residual.map_or(null, |v| v.ptr));
        let (rows_i, k_i, n_i, split_i, gelu) = (rows as i32, k as i32, n as i32, split as i32, matches!(epilogue, Epilogue::Gelu) as i32);
        let mut launch = self.launch_early(kernel);
        let w_ptr = weight_by_column.ptr();
        launch.arg(&x.ptr).arg(&ln_gain).arg(&ln_shift).arg(&w_ptr).arg(&bias_ptr).arg(&residual_ptr).arg(&out.ptr);
        launch.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&split_i).arg(&gelu);
        let blocks = n.div_ceil(few_row_columns_per_block(split));
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and alignment checked above; k is a multiple of 4·split (column_split).
        unsafe { launch.launch(config) }?;
        Ok(true)
    }

    /// The head's products on up to [`TILE_ROWS_MAX`] rows: `out (rows, n) = x (rows, k) ·
    /// weight_by_columnᵀ`, weight_by_column (n, k) as for [`Gpu::linear_few_rows`], no bias. A
    /// warp computes four neighbouring columns, so each load of x serves four of the weight; each
    /// output is summed in the order `linear_few_rows` sums it when one warp takes a column group
    /// (as it does wherever this kernel's blocks fill the device), so the two give a row the same
    /// bits. Returns `Ok(false)`, having done nothing, where it does not apply: more than
    /// [`TILE_ROWS_MAX`] rows, k not a multiple of 4, x or the weight not 16-byte aligned, or
    /// `few_row_linear` off. The weight in f32 or bf16, as for [`Gpu::linear_few_rows`].
    pub fn linear_column_tiles(&self, x: View<f32>, weight_by_column: impl Into<ColumnWeights>, out: View<f32>) -> Result<bool> {
        let weight_by_column = weight_by_column.into();
        let Some((rows, k, n)) = product_shape(x, weight_by_column, out)? else {
            return Ok(false);
        };
        let (w_ptr, aligned) = (weight_by_column.ptr(), [x.ptr, weight_by_column.ptr()].iter().all(|p| p.is_multiple_of(16)));
        if rows > TILE_ROWS_MAX || !self.few_row_linear || !k.is_multiple_of(4) || !aligned {
            return Ok(false);
        }
        let (rows_i, k_i, n_i) = (rows as i32, k as i32, n as i32);
        let mut launch = self.launch_early(&self.kernels.linear.for_weights(weight_by_column).column_tiles);
        launch.arg(&x.ptr).arg(&w_ptr).arg(&out.ptr).arg(&rows_i).arg(&k_i).arg(&n_i);
        let blocks = self.column_tile_blocks(n);
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and alignment checked above.
        unsafe { launch.launch(config) }?;
        Ok(true)
    }

    /// How many warps share a group of output columns: the fewest (1, 2, 4 or 8) that give two
    /// blocks for every multiprocessor, so that enough loads are in flight, with k still a
    /// multiple of 4·split (a warp's span in whole float4s); and 1 wherever the tiled kernel
    /// gives every multiprocessor a block, so that the two sum a column in one order (a few rows
    /// of logits here, more in tiles). Depends on (k, n) and the device only, so that a row's
    /// sums run in the same order however many rows come with it.
    fn column_split(&self, k: usize, n: usize) -> usize {
        if self.column_tile_blocks(n) >= self.multiprocessors {
            return 1;
        }
        let wanted_blocks = 2 * self.multiprocessors;
        let valid = |split: &usize| k.is_multiple_of(4 * split);
        [1, 2, 4, 8]
            .into_iter()
            .filter(valid)
            .find(|&split| n.div_ceil(few_row_columns_per_block(split)) >= wanted_blocks)
            .unwrap_or_else(|| [8, 4, 2, 1].into_iter().find(valid).unwrap_or(1))
    }

    /// (registers per thread, bytes spilled to local memory, blocks per SM) of `linear_few_rows`'s
    /// instances, for up to 4 and 8 rows, then of `linear_column_tiles`: on f32 weights, then on
    /// bf16.
    pub fn few_row_linear_resources(&self) -> Result<Vec<(i32, i32, u32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let linear = &self.kernels.linear;
        let mut out = Vec::new();
        let kernels = |weights: &'_ ForWeights| {
            let few_rows = weights.instances.iter().map(|(_, kernel)| kernel);
            few_rows.chain([&weights.column_tiles]).cloned().collect::<Vec<_>>()
        };
        for kernel in kernels(&linear.f32).iter().chain(&kernels(&linear.bf16)) {
            let blocks = kernel.occupancy_max_active_blocks_per_multiprocessor(THREADS as u32, 0, None)?;
            out.push((kernel.get_attribute(REGISTERS)?, kernel.get_attribute(LOCAL)?, blocks));
        }
        Ok(out)
    }

    /// The blocks `linear_column_tiles` launches for n output columns.
    pub fn column_tile_blocks(&self, n: usize) -> usize {
        n.div_ceil(FEW_ROW_WARPS * TILE_COLUMNS)
    }
}

/// The output columns a block of `linear_few_rows` computes when `split` warps share a group of
/// columns.
fn few_row_columns_per_block(split: usize) -> usize {
    FEW_ROW_WARPS / split * FEW_ROW_COLUMNS
}
