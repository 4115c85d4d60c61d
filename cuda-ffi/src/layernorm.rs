//! `kernels/layernorm.cu`: LayerNorm forward (a warp per row, or a block per row on a few rows)
//! and backward.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};

use crate::constants::{LAYERNORM_ROWS_PER_BLOCK, THREADS};
use crate::device::{block_per_row_config, warp_per_row_config};
use crate::memory::View;
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/layernorm.cu");

/// Up to this many rows, LayerNorm takes a block per row (decoding) instead of a warp.
const FEW_ROWS: usize = 64;

/// The one-pass backward (`layernorm_backward_rows_VEC`) holds a row in registers, 128·VEC
/// floats a warp, for VEC up to this.
const ROWS_IN_REGISTERS_MAX_VEC: usize = 8;

pub(crate) struct Kernels {
    forward: CudaFunction,
    forward_wide: CudaFunction,
    backward: CudaFunction,
    /// `layernorm_backward_rows_VEC` for VEC = 1 ..= ROWS_IN_REGISTERS_MAX_VEC
    backward_rows: Vec<CudaFunction>,
}

impl Kernels {
    pub(crate) fn load(module: &Arc<CudaModule>) -> Result<Self> {
        let backward_rows = (1..=ROWS_IN_REGISTERS_MAX_VEC)
            .map(|vec| module.load_function(&format!("layernorm_backward_rows_{vec}")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Kernels {
            forward: module.load_function("layernorm_forward")?,
            forward_wide: module.load_function("layernorm_forward_wide")?,
            backward: module.load_function("layernorm_backward")?,
            backward_rows,
        })
    }

    /// The one-pass backward for rows of `c`, where it applies: c a multiple of 4 of at most
    /// 128·ROWS_IN_REGISTERS_MAX_VEC, and every buffer on 16 bytes.
    fn backward_rows(&self, c: usize, views: &[View<f32>]) -> Option<&CudaFunction> {
        let fits = c.is_multiple_of(4) && c <= 128 * ROWS_IN_REGISTERS_MAX_VEC && views.iter().all(|v| v.ptr.is_multiple_of(16));
        fits.then(|| &self.backward_rows[c.div_ceil(128) - 1])
    }
}

impl Gpu {
    /// LayerNorm of each row of x (rows, c); writes out and each row's mean and rstd.
    pub fn layernorm_forward(
        &self,
        x: View<f32>,
        weight: View<f32>,
        bias: View<f32>,
        out: View<f32>,
        mean: View<f32>,
        rstd: View<f32>,
    ) -> Result<()> {
        self.layernorm_forward_rounding(x, weight, bias, out, None, mean, rstd)
    }

    /// [`Gpu::layernorm_forward`], writing out rounded to bf16 into `rounded` too where given (bf16
    /// training: what the next product reads).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward_rounding(
        &self,
        x: View<f32>,
        weight: View<f32>,
        bias: View<f32>,
        out: View<f32>,
        rounded: Option<View<u16>>,
        mean: View<f32>,
        rstd: View<f32>,
    ) -> Result<()> {
        let (c, rows) = (weight.len(), mean.len());
        check(x.len() == rows * c && out.len() == rows * c && bias.len() == c && rstd.len() == rows, || {
            format!("layernorm_forward: buffers do not fit {rows} rows of {c}")
        })?;
        check(rounded.is_none_or(|r| r.len() == rows * c), || format!("layernorm_forward: the bf16 copy does not fit {rows} rows of {c}"))?;
        let rounded = rounded.map_or(0, |r| r.ptr);
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, c_i) = (rows as i32, c as i32);
        let kernels = &self.kernels.layernorm;
        if rows <= FEW_ROWS {
            let mut launch = self.stream.launch_builder(&kernels.forward_wide);
            launch.arg(&x.ptr).arg(&weight.ptr).arg(&bias.ptr).arg(&out.ptr).arg(&rounded).arg(&mean.ptr).arg(&rstd.ptr).arg(&c_i);
            // SAFETY: sizes checked above; one block per row.
            unsafe { launch.launch(block_per_row_config(rows)) }?;
            return Ok(());
        }
        let mut launch = self.stream.launch_builder(&kernels.forward);
        launch.arg(&x.ptr).arg(&weight.ptr).arg(&bias.ptr).arg(&out.ptr).arg(&rounded).arg(&mean.ptr).arg(&rstd.ptr).arg(&rows_i).arg(&c_i);
        // SAFETY: sizes checked above; one warp per row.
        unsafe { launch.launch(warp_per_row_config(rows)) }?;
        Ok(())
    }

    /// LayerNorm backward: writes dx, dweight and dbias. The parameters' gradients are summed per
    /// block of rows, then over the blocks in order. Rows of up to 1024 floats, a multiple of 4,
    /// take one pass over x and dout (a warp holds a row in registers); others read them twice.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        x: View<f32>,
        dout: View<f32>,
        weight: View<f32>,
        mean: View<f32>,
        rstd: View<f32>,
        dx: View<f32>,
        dweight: View<f32>,
        dbias: View<f32>,
    ) -> Result<()> {
        let (c, rows) = (weight.len(), mean.len());
        check(
            x.len() == rows * c
                && dout.len() == rows * c
                && dx.len() == rows * c
                && rstd.len() == rows
                && dweight.len() == c
                && dbias.len() == c,
            || format!("layernorm_backward: buffers do not fit {rows} rows of {c}"),
        )?;
        if rows == 0 || c == 0 {
            return Ok(());
        }
        let blocks = rows.div_ceil(LAYERNORM_ROWS_PER_BLOCK);
        let partials = self.alloc::<f32>(blocks * 2 * c)?;
        let (rows_i, c_i) = (rows as i32, c as i32);
        let kernels = &self.kernels.layernorm;
        let one_pass = kernels.backward_rows(c, &[x, dout, weight, dx, partials.view()]);
        let mut launch = self.stream.launch_builder(one_pass.unwrap_or(&kernels.backward));
        launch.arg(&x.ptr).arg(&dout.ptr).arg(&weight.ptr).arg(&mean.ptr).arg(&rstd.ptr);
        launch.arg(&dx.ptr).arg(partials.device_ptr()).arg(&rows_i).arg(&c_i);
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sizes checked above; block b writes partials[b·2c .. (b + 1)·2c].
        unsafe { launch.launch(config) }?;
        // the partials are (blocks, 2c): dw's columns, then db's
        self.column_sums_finish(partials.view(), dweight, blocks, 2 * c, false)?;
        self.column_sums_finish(partials.view().slice(c, partials.len() - c), dbias, blocks, 2 * c, false)?;
        Ok(())
    }
}
