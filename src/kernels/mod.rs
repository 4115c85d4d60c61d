//! CPU inner loops, the CPU's half of every op (the GPU's half is the crate `multitoken-cuda`).
//! Each hot loop has a plain scalar reference (`*_scalar`, generic, used for f64) and an `f32`
//! version whose vector loop is written once against `simd::F32x8`: AVX2+FMA on x86-64 when the
//! CPU has them (detected at run time), NEON on aarch64. Tests in each file check that the two
//! agree.

pub mod adamw;
mod float;
pub mod gelu;
pub mod gemm;
pub mod layernorm;
mod simd;
pub mod softmax;
pub mod team;
pub mod vector;

pub use float::Float;

/// A raw pointer that may cross threads; used where parallel tasks write disjoint,
/// non-contiguous parts of one buffer (GEMM blocks, attention heads).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(*mut T);
// SAFETY: every user writes disjoint elements from each task.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub(crate) fn new(ptr: *mut T) -> Self {
        SharedMut(ptr)
    }

    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

pub use simd::available as simd_available;
