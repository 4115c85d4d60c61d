//! `kernels/general.cu`: the general ops a model is composed from — elementwise functions,
//! arithmetic with a row or a scalar broadcast, sums along an axis, the transpose of the last two
//! axes, log-softmax — and their backward passes.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::constants::THREADS;
use crate::device::{block_per_row_config, elementwise_config};
use crate::memory::{same_lengths, View};
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/general.cu");

/// An elementwise function, `y = f(x)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// `−x`
    Neg,
    /// `eˣ`
    Exp,
    /// `ln x`
    Log,
    /// `tanh x`
    Tanh,
    /// `max(x, 0)`
    Relu,
    /// `1 / (1 + e⁻ˣ)`
    Sigmoid,
    /// `x^p`
    Pow(f32),
    /// `x · factor`
    Scale(f32),
}

impl Unary {
    /// The kernel's code and its parameter.
    fn code(self) -> (i32, f32) {
        match self {
            Unary::Neg => (0, 0.0),
            Unary::Exp => (1, 0.0),
            Unary::Log => (2, 0.0),
            Unary::Tanh => (3, 0.0),
            Unary::Relu => (4, 0.0),
            Unary::Sigmoid => (5, 0.0),
            Unary::Pow(p) => (6, p),
            Unary::Scale(factor) => (7, factor),
        }
    }
}

/// Arithmetic on two operands, either of which may be broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `a + b`
    Add = 0,
    /// `a − b`
    Sub = 1,
    /// `a · b`
    Mul = 2,
    /// `a / b`
    Div = 3,
}

/// The op codes, handed to NVRTC as defines like the constants, so that the kernels name them.
pub(crate) const OP_DEFINES: [(&str, usize); 12] = [
    ("OP_NEG", 0),
    ("OP_EXP", 1),
    ("OP_LOG", 2),
    ("OP_TANH", 3),
    ("OP_RELU", 4),
    ("OP_SIGMOID", 5),
    ("OP_POW", 6),
    ("OP_SCALE", 7),
    ("OP_ADD", Binary::Add as usize),
    ("OP_SUB", Binary::Sub as usize),
    ("OP_MUL", Binary::Mul as usize),
    ("OP_DIV", Binary::Div as usize),
];

kernel_table! {
    unary_forward: "unary_forward",
    unary_backward: "unary_backward",
    binary_forward: "binary_forward",
    binary_backward: "binary_backward",
    sum_axis: "sum_axis",
    expand_axis: "expand_axis",
    transpose_last: "transpose_last",
    log_softmax_rows: "log_softmax_rows",
    softmax_backward_rows: "softmax_backward_rows",
}

/// An operand of a broadcasting op: `out.len()` must be a multiple of its length (a row repeated,
/// or one element).
fn broadcasts(what: &str, operand: View<f32>, out: usize) -> Result<()> {
    check(!operand.is_empty() && out.is_multiple_of(operand.len()), || {
        format!("{what}: an operand of {} elements does not repeat to {out}", operand.len())
    })
}

impl Gpu {
    /// `y = f(x)`, elementwise.
    pub fn unary_forward(&self, op: Unary, x: View<f32>, y: View<f32>) -> Result<()> {
        let n = same_lengths("unary_forward", &[x, y])?;
        if n == 0 {
            return Ok(());
        }
        let ((code, p), n_i) = (op.code(), n as i64);
        let mut launch = self.stream.launch_builder(&self.kernels.general.unary_forward);
        launch.arg(&code).arg(&x.ptr).arg(&y.ptr).arg(&n_i).arg(&p);
        // SAFETY: both views hold n elements.
        unsafe { launch.launch(elementwise_config(n)) }?;
        Ok(())
    }

    /// `dx = dy · f'(x)`, from x and y = f(x).
    pub fn unary_backward(&self, op: Unary, x: View<f32>, y: View<f32>, dy: View<f32>, dx: View<f32>) -> Result<()> {
        let n = same_lengths("unary_backward", &[x, y, dy, dx])?;
        if n == 0 {
            return Ok(());
        }
        let ((code, p), n_i) = (op.code(), n as i64);
        let mut launch = self.stream.launch_builder(&self.kernels.general.unary_backward);
        launch.arg(&code).arg(&x.ptr).arg(&y.ptr).arg(&dy.ptr).arg(&dx.ptr).arg(&n_i).arg(&p);
        // SAFETY: all four views hold n elements.
        unsafe { launch.launch(elementwise_config(n)) }?;
        Ok(())
    }

    /// `out[i] = a[i mod |a|] ∘ b[i mod |b|]`: either operand repeated over `out`.
    pub fn binary_forward(&self, op: Binary, a: View<f32>, b: View<f32>, out: View<f32>) -> Result<()> {
        let n = out.len();
        broadcasts("binary_forward", a, n)?;
        broadcasts("binary_forward", b, n)?;
        if n == 0 {
            return Ok(());
        }
        let (code, a_len, b_len, n_i) = (op as i32, a.len() as i64, b.len() as i64, n as i64);
        let mut launch = self.stream.launch_builder(&self.kernels.general.binary_forward);
        launch.arg(&code).arg(&a.ptr).arg(&a_len).arg(&b.ptr).arg(&b_len).arg(&out.ptr).arg(&n_i);
        // SAFETY: every index is taken modulo its operand's length.
        unsafe { launch.launch(elementwise_config(n)) }?;
        Ok(())
    }

    /// The gradients of `a ∘ b` from g (out's size), at out's size: `da` and `db` (either may be
    /// absent); the caller sums a broadcast operand's back over its repeats.
    pub fn binary_backward(
        &self,
        op: Binary,
        g: View<f32>,
        a: View<f32>,
        b: View<f32>,
        da: Option<View<f32>>,
        db: Option<View<f32>>,
    ) -> Result<()> {
        let n = g.len();
        broadcasts("binary_backward", a, n)?;
        broadcasts("binary_backward", b, n)?;
        check(da.is_none_or(|d| d.len() == n) && db.is_none_or(|d| d.len() == n), || {
            "binary_backward: gradients of the wrong size".into()
        })?;
        if n == 0 {
            return Ok(());
        }
        let (code, a_len, b_len, n_i) = (op as i32, a.len() as i64, b.len() as i64, n as i64);
        let (da_ptr, db_ptr) = (da.map_or(0, |d| d.ptr), db.map_or(0, |d| d.ptr));
        let mut launch = self.stream.launch_builder(&self.kernels.general.binary_backward);
        launch.arg(&code).arg(&g.ptr).arg(&a.ptr).arg(&a_len).arg(&b.ptr).arg(&b_len).arg(&da_ptr).arg(&db_ptr).arg(&n_i);
        // SAFETY: as in the forward; the gradients hold n elements where present (null otherwise).
        unsafe { launch.launch(elementwise_config(n)) }?;
        Ok(())
    }

    /// `out[o, i] = scale · Σ_j x[o, j, i]` over an (outer, axis, inner) view of x.
    pub fn sum_axis(&self, x: View<f32>, out: View<f32>, (outer, axis, inner): (usize, usize, usize), scale: f32) -> Result<()> {
        check(x.len() == outer * axis * inner && out.len() == outer * inner, || "sum_axis: views do not fit the shape".into())?;
        check_int_indices("sum_axis", x.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let (outer_i, axis_i, inner_i) = (outer as i32, axis as i32, inner as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.general.sum_axis);
        launch.arg(&x.ptr).arg(&out.ptr).arg(&outer_i).arg(&axis_i).arg(&inner_i).arg(&scale);
        let config = LaunchConfig { grid_dim: ((outer * inner) as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: sizes checked; a block per output element.
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// `out[o, j, i] = scale · g[o, i]`: sum_axis's backward.
    pub fn expand_axis(&self, g: View<f32>, out: View<f32>, (outer, axis, inner): (usize, usize, usize), scale: f32) -> Result<()> {
        check(g.len() == outer * inner && out.len() == outer * axis * inner, || "expand_axis: views do not fit the shape".into())?;
        check_int_indices("expand_axis", out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let (outer_i, axis_i, inner_i) = (outer as i32, axis as i32, inner as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.general.expand_axis);
        launch.arg(&g.ptr).arg(&out.ptr).arg(&outer_i).arg(&axis_i).arg(&inner_i).arg(&scale);
        // SAFETY: sizes checked; a thread per output element.
        unsafe { launch.launch(elementwise_config(out.len())) }?;
        Ok(())
    }

    /// `out (batch, cols, rows)` = `x (batch, rows, cols)` with its last two axes swapped.
    pub fn transpose_last(&self, x: View<f32>, out: View<f32>, (batch, rows, cols): (usize, usize, usize)) -> Result<()> {
        check(x.len() == batch * rows * cols && out.len() == x.len(), || "transpose_last: views do not fit the shape".into())?;
        check_int_indices("transpose_last", x.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let (batch_i, rows_i, cols_i) = (batch as i32, rows as i32, cols as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.general.transpose_last);
        launch.arg(&x.ptr).arg(&out.ptr).arg(&batch_i).arg(&rows_i).arg(&cols_i);
        // SAFETY: sizes checked; a thread per element.
        unsafe { launch.launch(elementwise_config(x.len())) }?;
        Ok(())
    }

    /// `y = log_softmax(x)` of each row of `v` elements.
    pub fn log_softmax_rows(&self, x: View<f32>, y: View<f32>, v: usize) -> Result<()> {
        let n = same_lengths("log_softmax_rows", &[x, y])?;
        check(v > 0 && n.is_multiple_of(v), || "log_softmax_rows: not whole rows".into())?;
        check_int_indices("log_softmax_rows", n)?;
        if n == 0 {
            return Ok(());
        }
        let v_i = v as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.general.log_softmax_rows);
        launch.arg(&x.ptr).arg(&y.ptr).arg(&v_i);
        // SAFETY: a block per row of v elements.
        unsafe { launch.launch(block_per_row_config(n / v)) }?;
        Ok(())
    }

    /// The backward of softmax (`log` false, y its probabilities) or log-softmax (`log`, y its
    /// log-probabilities) over rows of `v`.
    pub fn softmax_backward_rows(&self, y: View<f32>, g: View<f32>, dx: View<f32>, v: usize, log: bool) -> Result<()> {
        let n = same_lengths("softmax_backward_rows", &[y, g, dx])?;
        check(v > 0 && n.is_multiple_of(v), || "softmax_backward_rows: not whole rows".into())?;
        check_int_indices("softmax_backward_rows", n)?;
        if n == 0 {
            return Ok(());
        }
        let (v_i, log_i) = (v as i32, i32::from(log));
        let mut launch = self.stream.launch_builder(&self.kernels.general.softmax_backward_rows);
        launch.arg(&y.ptr).arg(&g.ptr).arg(&dx.ptr).arg(&v_i).arg(&log_i);
        // SAFETY: a block per row of v elements.
        unsafe { launch.launch(block_per_row_config(n / v)) }?;
        Ok(())
    }
}

/// The kernels of general.cu other than the elementwise ones index a tensor with 32-bit ints
/// (and launch a block per row or per output element): a larger tensor is refused rather than
/// indexed wrong.
fn check_int_indices(what: &str, elements: usize) -> Result<()> {
    check(elements <= i32::MAX as usize, || format!("{what}: {elements} elements, more than general.cu's 32-bit indices reach"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tensors_past_the_32_bit_indices_are_refused() {
        assert!(super::check_int_indices("sum_axis", i32::MAX as usize).is_ok());
        let error = super::check_int_indices("sum_axis", i32::MAX as usize + 1).unwrap_err().to_string();
        assert!(error.contains("32-bit"), "{error}");
    }
}
