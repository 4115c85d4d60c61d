//! `kernels/elementwise.cu`: GELU, sums, scaling, and the reductions (column sums, sums of
//! squares, dot products) in a fixed order.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use crate::constants::{COLUMN_SUM_CHUNK, REDUCE_CHUNK, THREADS};
use crate::device::{block_per_row_config, elementwise_config};
use crate::memory::{same_lengths, View};
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/elementwise.cu");

kernel_table! {
    gelu_forward: "gelu_forward",
    gelu_backward: "gelu_backward",
    gelu_forward_keeping_bf16: "gelu_forward_keeping_bf16",
    gelu_backward_from_bf16: "gelu_backward_from_bf16",
    add: "add",
    scale: "scale",
    broadcast_rows: "broadcast_rows",
    column_partial_sums: "column_partial_sums",
    column_sums_finish: "column_sums_finish",
    chunk_dots: "chunk_dots",
    round_to_bf16: "round_to_bf16",
    widen_bf16: "widen_bf16",
}

/// For a launch over several tensors in chunks of `chunk` elements, a block per chunk: the first
/// block of each tensor, and the number of blocks last (what the kernels' `segment_of` searches).
pub(crate) fn first_blocks(lengths: impl Iterator<Item = usize>, chunk: usize) -> Vec<i32> {
    let mut first_block = vec![0i32];
    for len in lengths {
        first_block.push(first_block[first_block.len() - 1] + len.div_ceil(chunk) as i32);
    }
    first_block
}

impl Gpu {
    /// A kernel `(views…, long n)` over views of one length n, a thread per element.
    fn elementwise(&self, what: &str, kernel: &CudaFunction, views: &[View<f32>]) -> Result<()> {
        let len = same_lengths(what, views)?;
        if len == 0 {
            return Ok(());
        }
        let n = len as i64;
        let mut launch = self.stream.launch_builder(kernel);
        for view in views {
            launch.arg(&view.ptr);
        }
        launch.arg(&n);
        // SAFETY: the kernel touches elements 0..n of each view, and each holds n; a thread
        // takes four.
        unsafe { launch.launch(elementwise_config(len.div_ceil(4))) }?;
        Ok(())
    }

    /// `out = gelu(x)`, elementwise (out may be x).
    pub fn gelu_forward(&self, x: View<f32>, out: View<f32>) -> Result<()> {
        self.elementwise("gelu_forward", &self.kernels.elementwise.gelu_forward, &[x, out])
    }

    /// `dx = dout · gelu'(x)`, elementwise.
    pub fn gelu_backward(&self, x: View<f32>, dout: View<f32>, dx: View<f32>) -> Result<()> {
        self.elementwise("gelu_backward", &self.kernels.elementwise.gelu_backward, &[x, dout, dx])
    }

    /// `out = gelu(x)`, and x and out rounded to bf16: what training in bf16 keeps of x for the
    /// backward ([`Gpu::gelu_backward_from_bf16`]), and what the next product reads of out.
    pub fn gelu_forward_keeping_bf16(&self, x: View<f32>, out: View<f32>, x_rounded: View<u16>, out_rounded: View<u16>) -> Result<()> {
        let len = same_lengths("gelu_forward_keeping_bf16", &[x, out])?;
        check(x_rounded.len() == len && out_rounded.len() == len, || {
            format!("gelu_forward_keeping_bf16: {len} elements, bf16 copies of {} and {}", x_rounded.len(), out_rounded.len())
        })?;
        if len == 0 {
            return Ok(());
        }
        let n = len as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.gelu_forward_keeping_bf16);
        launch.arg(&x.ptr).arg(&out.ptr).arg(&x_rounded.ptr).arg(&out_rounded.ptr).arg(&n);
        // SAFETY: the four views hold n elements; a thread takes four.
        unsafe { launch.launch(elementwise_config(len.div_ceil(4))) }?;
        Ok(())
    }

    /// `dx = dout · gelu'(x)`, elementwise, from x rounded to bf16.
    pub fn gelu_backward_from_bf16(&self, x_rounded: View<u16>, dout: View<f32>, dx: View<f32>) -> Result<()> {
        let len = same_lengths("gelu_backward_from_bf16", &[dout, dx])?;
        check(x_rounded.len() == len, || format!("gelu_backward_from_bf16: {len} elements, a bf16 x of {}", x_rounded.len()))?;
        if len == 0 {
            return Ok(());
        }
        let n = len as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.gelu_backward_from_bf16);
        launch.arg(&x_rounded.ptr).arg(&dout.ptr).arg(&dx.ptr).arg(&n);
        // SAFETY: the three views hold n elements; a thread takes four.
        unsafe { launch.launch(elementwise_config(len.div_ceil(4))) }?;
        Ok(())
    }

    /// `out = a + b`, elementwise (out may be a or b).
    pub fn add(&self, a: View<f32>, b: View<f32>, out: View<f32>) -> Result<()> {
        self.elementwise("add", &self.kernels.elementwise.add, &[a, b, out])
    }

    /// `out = x` rounded to bf16 (to nearest, ties to even), each element as its 16 bits.
    pub fn round_to_bf16(&self, x: View<f32>, out: View<u16>) -> Result<()> {
        check(x.len() == out.len(), || format!("round_to_bf16: {} elements into {}", x.len(), out.len()))?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.round_to_bf16);
        launch.arg(&x.ptr).arg(&out.ptr).arg(&n);
        // SAFETY: both views hold n elements; a thread takes a pair.
        unsafe { launch.launch(elementwise_config(x.len().div_ceil(2))) }?;
        Ok(())
    }

    /// `out = x` for x given as bf16 bits: each the f32 it stands for, exactly.
    pub fn widen_bf16(&self, x: View<u16>, out: View<f32>) -> Result<()> {
        check(x.len() == out.len(), || format!("widen_bf16: {} elements into {}", x.len(), out.len()))?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.widen_bf16);
        launch.arg(&x.ptr).arg(&out.ptr).arg(&n);
        // SAFETY: both views hold n elements; a thread takes four.
        unsafe { launch.launch(elementwise_config(x.len().div_ceil(4))) }?;
        Ok(())
    }

    /// A bf16 copy of `x` from the pool: a product's input on the bf16 tensor cores (dropped as
    /// soon as the product is queued, the pool giving its memory only to work queued after it,
    /// or kept by a backward rule that reads x only rounded), or a weight that decoding in bf16
    /// streams (kept as long as the decoder).
    pub fn bf16_copy(&self, x: View<f32>) -> Result<crate::Buffer<u16>> {
        let copy = self.alloc::<u16>(x.len())?;
        self.round_to_bf16(x, copy.view())?;
        Ok(copy)
    }

    /// `out = a · factor`, elementwise (out may be a).
    pub fn scale(&self, a: View<f32>, factor: f32, out: View<f32>) -> Result<()> {
        let len = same_lengths("scale", &[a, out])?;
        if len == 0 {
            return Ok(());
        }
        let n = len as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.scale);
        launch.arg(&a.ptr).arg(&factor).arg(&out.ptr).arg(&n);
        // SAFETY: both views hold n elements; a thread takes four.
        unsafe { launch.launch(elementwise_config(len.div_ceil(4))) }?;
        Ok(())
    }

    /// Every row of `out` (rows, bias.len()) becomes `bias`.
    pub fn broadcast_rows(&self, bias: View<f32>, out: View<f32>) -> Result<()> {
        let cols = bias.len();
        check(cols > 0 && out.len().is_multiple_of(cols), || "broadcast_rows: out is not whole rows of the bias".into())?;
        let (rows, cols_i) = ((out.len() / cols) as i64, cols as i32);
        if rows == 0 {
            return Ok(());
        }
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.broadcast_rows);
        launch.arg(&bias.ptr).arg(&out.ptr).arg(&rows).arg(&cols_i);
        // SAFETY: writes out[0..rows·cols], reads bias[0..cols]; one block per row.
        unsafe { launch.launch(block_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// `sums[j] = Σ_rows x[row, j]` for x (rows, sums.len()), or added to `sums` when
    /// `accumulate`. Two passes (chunks of rows, then the chunks in order), so the sum's order
    /// depends on the shape alone.
    pub fn column_sums(&self, x: View<f32>, sums: View<f32>, accumulate: bool) -> Result<()> {
        self.column_sums_rounding(x, sums, accumulate, None)
    }

    /// [`Gpu::column_sums`] (`sums` overwritten) and, in the same pass over x, its bf16 copy
    /// ([`Gpu::bf16_copy`]'s bits): a linear layer's upstream gradient in bf16, whose column sums
    /// are the bias's gradient and whose copy both products of the backward pass read.
    pub fn column_sums_and_bf16_copy(&self, x: View<f32>, sums: View<f32>) -> Result<crate::Buffer<u16>> {
        let copy = self.alloc::<u16>(x.len())?;
        self.column_sums_rounding(x, sums, false, Some(copy.view()))?;
        Ok(copy)
    }

    fn column_sums_rounding(&self, x: View<f32>, sums: View<f32>, accumulate: bool, rounded: Option<View<u16>>) -> Result<()> {
        let cols = sums.len();
        check(cols > 0 && x.len().is_multiple_of(cols), || "column_sums: x is not whole rows".into())?;
        let rows = x.len() / cols;
        let chunks = rows.div_ceil(COLUMN_SUM_CHUNK).max(1);
        let partials = self.alloc::<f32>(chunks * cols)?;
        let (rows_i, cols_i) = (rows as i32, cols as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.column_partial_sums);
        let rounded_ptr = rounded.map_or(0u64, |view| view.ptr);
        launch.arg(&x.ptr).arg(partials.device_ptr()).arg(&rounded_ptr).arg(&rows_i).arg(&cols_i);
        let config = LaunchConfig { grid_dim: ((cols as u32).div_ceil(32), chunks as u32, 1), block_dim: (32, 32, 1), shared_mem_bytes: 0 };
        // SAFETY: reads x[0..rows·cols], writes partials[0..chunks·cols] and, when given, the
        // bf16 copy of x (allocated with x's length).
        unsafe { launch.launch(config) }?;
        self.column_sums_finish(partials.view(), sums, chunks, cols, accumulate)
    }

    /// `sums[j] (+)= Σ_k partials[k·ld + j]` over `chunks` rows of partials, `ld` ≥ sums.len()
    /// floats apart, in row order (the second pass of the column sums, and of LayerNorm's
    /// parameter gradients).
    pub(crate) fn column_sums_finish(
        &self,
        partials: View<f32>,
        sums: View<f32>,
        chunks: usize,
        ld: usize,
        accumulate: bool,
    ) -> Result<()> {
        let cols = sums.len();
        check(cols <= ld && (chunks == 0 || partials.len() >= (chunks - 1) * ld + cols), || {
            "column_sums_finish: partials too short".into()
        })?;
        let (chunks_i, cols_i, ld_i, accumulate_i) = (chunks as i32, cols as i32, ld as i64, i32::from(accumulate));
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.column_sums_finish);
        launch.arg(&partials.ptr).arg(&sums.ptr).arg(&chunks_i).arg(&cols_i).arg(&ld_i).arg(&accumulate_i);
        // SAFETY: reads partials[k·ld + j] for k < chunks, j < cols (checked), writes sums[0..cols].
        unsafe { launch.launch(elementwise_config(cols)) }?;
        Ok(())
    }

    /// `Σ x²` of each view, in f64: one launch over all of them and one download, the chunks'
    /// partial sums added on the host in order.
    pub fn sums_of_squares(&self, views: &[View<f32>]) -> Result<Vec<f64>> {
        self.chunk_dots(views, None)
    }

    /// `Σ a·b`, in f64, in the same fixed order.
    pub fn dot(&self, a: View<f32>, b: View<f32>) -> Result<f64> {
        same_lengths("dot", &[a, b])?;
        Ok(self.chunk_dots(&[a], Some(&[b]))?[0])
    }

    fn chunk_dots(&self, x: &[View<f32>], y: Option<&[View<f32>]>) -> Result<Vec<f64>> {
        if let Some(y) = y {
            check(y.len() == x.len() && x.iter().zip(y).all(|(a, b)| a.len() == b.len()), || "dot: views differ in length".into())?;
        }
        let first_block = first_blocks(x.iter().map(View::len), REDUCE_CHUNK);
        let blocks = first_block[x.len()] as usize;
        if blocks == 0 {
            return Ok(vec![0.0; x.len()]);
        }
        let pointers = |views: &[View<f32>]| -> Vec<u64> { views.iter().map(|v| v.ptr).collect() };
        let x_table = self.upload(&pointers(x))?;
        let y_table = y.map(|y| self.upload(&pointers(y))).transpose()?;
        let lengths = self.upload(&x.iter().map(|v| v.len() as i64).collect::<Vec<_>>())?;
        let starts = self.upload(&first_block)?;
        let partials = self.alloc::<f64>(blocks)?;
        let (y_ptr, tensors) = (y_table.as_ref().map_or(0, |t| t.view().ptr), x.len() as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.elementwise.chunk_dots);
        launch.arg(x_table.device_ptr()).arg(&y_ptr).arg(lengths.device_ptr()).arg(starts.device_ptr()).arg(&tensors);
        launch.arg(partials.device_ptr());
        let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: block b reads chunk b − first_block[s] of tensor s, inside its length; one
        // partial per block.
        unsafe { launch.launch(config) }?;
        let partials = self.download(partials.view())?;
        Ok(first_block.windows(2).map(|w| partials[w[0] as usize..w[1] as usize].iter().sum()).collect())
    }
}
