//! The element type of a tensor: `f32` trains, `f64` proves gradients.
//!
//! Everything generic in this crate is generic over [`Float`]. The trait also carries the
//! few inner loops that have a SIMD version for `f32` (see `kernels/`): generic code calls
//! `T::gelu_forward(..)` and gets the scalar reference for `f64` and the vectorised loop for
//! `f32` where the CPU has the vector unit (AVX2 and FMA on x86-64, NEON on aarch64).

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use crate::kernels;

/// A real number type a tensor can hold (`f32` or `f64`): `num_traits::Float` with the crate's
/// CPU kernels attached, each a scalar reference unless the type overrides it.
pub trait Float:
    num_traits::Float + AddAssign + SubAssign + MulAssign + DivAssign + Sum + Send + Sync + Debug + Display + Default + 'static
{
    /// The safetensors / PyTorch name of the type.
    const DTYPE: &'static str;

    /// Converts from `f64`, rounding when `Self` is narrower.
    fn of(x: f64) -> Self;

    /// Widens to `f64`.
    fn as_f64(self) -> f64;

    /// `C = alpha · A · B + beta · C` on raw strided matrices (A is m×k, B is k×n).
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping matrices.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        a_row_stride: isize,
        a_col_stride: isize,
        b: *const Self,
        b_row_stride: isize,
        b_col_stride: isize,
        beta: Self,
        c: *mut Self,
        c_row_stride: isize,
        c_col_stride: isize,
    );

    /// GELU (tanh approximation) of every element; see `kernels::gelu`.
    fn gelu_forward(x: &[Self], out: &mut [Self]) {
        kernels::gelu::forward_scalar(x, out)
    }

    /// `dx += dout · gelu'(x)`; see `kernels::gelu`.
    fn gelu_backward(x: &[Self], dout: &[Self], dx: &mut [Self]) {
        kernels::gelu::backward_scalar(x, dout, dx)
    }

    /// In place: the row becomes its softmax; returns its log-sum-exp; see `kernels::softmax`.
    fn softmax_row(row: &mut [Self]) -> Self {
        kernels::softmax::softmax_row_scalar(row)
    }

    /// One LayerNorm row; returns `(mean, rstd)`; see `kernels::layernorm`.
    fn layernorm_row(x: &[Self], weight: &[Self], bias: &[Self], out: &mut [Self]) -> (Self, Self) {
        kernels::layernorm::forward_row_scalar(x, weight, bias, out)
    }

    /// One LayerNorm row backward: writes `dx`, adds into `dweight` and `dbias`; see `kernels::layernorm`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_row(
        x: &[Self],
        dout: &[Self],
        weight: &[Self],
        mean: Self,
        rstd: Self,
        dx: &mut [Self],
        dweight: &mut [Self],
        dbias: &mut [Self],
    ) {
        kernels::layernorm::backward_row_scalar(x, dout, weight, mean, rstd, dx, dweight, dbias)
    }

    /// `Σ a_i b_i`; see `kernels::vector`.
    fn dot(a: &[Self], b: &[Self]) -> Self {
        kernels::vector::dot_scalar(a, b)
    }

    /// `y += alpha · x`; see `kernels::vector`.
    fn axpy(alpha: Self, x: &[Self], y: &mut [Self]) {
        kernels::vector::axpy_scalar(alpha, x, y)
    }

    /// `out[i][j] += Σ_p a[i,p] b[p, j0+j]` for a few rows; see `kernels::vector`.
    fn rows_times_normal(a: &[Self], k: usize, b: &[Self], n: usize, j0: usize, out: &mut [&mut [Self]]) {
        kernels::vector::rows_times_normal_scalar(a, k, b, n, j0, out)
    }

    /// `out[i][j] += dot(a[i,:], b[j0+j,:])` for a few rows; see `kernels::vector`.
    fn rows_times_transposed(a: &[Self], k: usize, b: &[Self], j0: usize, out: &mut [&mut [Self]]) {
        kernels::vector::rows_times_transposed_scalar(a, k, b, j0, out)
    }

    /// One AdamW update over a parameter slice; see `kernels::adamw`.
    fn adamw_update(params: &mut [Self], grads: &[Self], m: &mut [Self], v: &mut [Self], step: &kernels::adamw::AdamWStep) {
        kernels::adamw::update_scalar(params, grads, m, v, step)
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "F64";

    fn of(x: f64) -> Self {
        x
    }

    fn as_f64(self) -> f64 {
        self
    }

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Float for f32 {
    const DTYPE: &'static str = "F32";

    fn of(x: f64) -> Self {
        x as f32
    }

    fn as_f64(self) -> f64 {
        self as f64
    }

    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }

    fn gelu_forward(x: &[f32], out: &mut [f32]) {
        kernels::gelu::forward_f32(x, out)
    }

    fn gelu_backward(x: &[f32], dout: &[f32], dx: &mut [f32]) {
        kernels::gelu::backward_f32(x, dout, dx)
    }

    fn softmax_row(row: &mut [f32]) -> f32 {
        kernels::softmax::softmax_row_f32(row)
    }

    fn layernorm_row(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) -> (f32, f32) {
        kernels::layernorm::forward_row_f32(x, weight, bias, out)
    }

    fn layernorm_backward_row(
        x: &[f32],
        dout: &[f32],
        weight: &[f32],
        mean: f32,
        rstd: f32,
        dx: &mut [f32],
        dweight: &mut [f32],
        dbias: &mut [f32],
    ) {
        kernels::layernorm::backward_row_f32(x, dout, weight, mean, rstd, dx, dweight, dbias)
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        kernels::vector::dot_f32(a, b)
    }

    fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        kernels::vector::axpy_f32(alpha, x, y)
    }

    fn rows_times_normal(a: &[f32], k: usize, b: &[f32], n: usize, j0: usize, out: &mut [&mut [f32]]) {
        kernels::vector::rows_times_normal_f32(a, k, b, n, j0, out)
    }

    fn rows_times_transposed(a: &[f32], k: usize, b: &[f32], j0: usize, out: &mut [&mut [f32]]) {
        kernels::vector::rows_times_transposed_f32(a, k, b, j0, out)
    }

    fn adamw_update(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], step: &kernels::adamw::AdamWStep) {
        kernels::adamw::update_f32(params, grads, m, v, step)
    }
}
