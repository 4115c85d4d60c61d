#![deny(missing_docs)]
//! `multitoken-cuda`: the CUDA layer of multitoken, thin by design.
//!
//! - [`Gpu::new`] opens a device: a CUDA context, a stream, cuBLAS and cuBLASLt handles, a memory
//!   pool. The driver, the BLAS libraries and NVRTC load at run time, so this crate builds
//!   anywhere; where no driver is installed, opening a device returns [`CudaError::NoDriver`]
//!   instead of panicking.
//! - Kernels live in `kernels/*.cu`, compiled by NVRTC for the device's architecture when the
//!   device opens. Each `.cu` file has one module here that holds its source, its function
//!   handles and its launchers, as llm.c keeps a kernel beside the code that launches it.
//! - Memory is a [`Buffer`] (an allocation from the device's caching pool, returned to it on
//!   drop) and [`View`]s into it: a device pointer and a length, `Copy`, as in C. Every launcher
//!   checks the lengths of the views it is given.
//! - Everything runs in order on the one stream; only downloads wait for it.
//!
//! Modules in reading order:

/// A kernel file's handles: `struct Kernels` with one field per kernel, and `Kernels::load`,
/// which looks each up by its `extern "C"` name in the file's compiled module.
macro_rules! kernel_table {
    ($($field:ident: $name:literal),+ $(,)?) => {
        pub(crate) struct Kernels {
            $($field: cudarc::driver::CudaFunction,)+
        }

        impl Kernels {
            pub(crate) fn load(module: &std::sync::Arc<cudarc::driver::CudaModule>) -> crate::Result<Self> {
                Ok(Kernels { $($field: module.load_function($name)?,)+ })
            }
        }
    };
}

mod constants; // numbers Rust and the kernels share, handed to NVRTC as defines
mod memory; // the caching pool, buffers, views, page-locked host memory
mod device; // Gpu: context, stream, compiled kernels, copies, captured graphs
mod blas; // matrix products through cuBLAS and cuBLASLt
mod elementwise; // elementwise.cu: GELU, sums, column sums, squares, dots
mod layernorm; // layernorm.cu
mod embedding; // embedding.cu
mod attention; // attention.cu: head layouts, causal softmax, the products route, decoding's attention
mod fused_attention; // fused_attention.cu: flash attention in f32
mod head; // head.cu: the CP head's per-position work and statistics
mod adamw; // adamw.cu: the optimizer over many tensors in one launch
mod linear; // linear.cu: decoding's linear layers on a few rows
mod general; // general.cu: elementwise functions and arithmetic, sums along an axis, transposes, log-softmax

pub use adamw::{AdamWSegment, AdamWStep};
pub use attention::ProductsAttention;
pub use attention::{AttentionRoute, AttentionShape, CachePosition};
pub use blas::{GemmRoute, Operand};
pub use constants::{FUSED_ATTENTION_HEAD_SIZES, MAX_HORIZON, MAX_RANK};
pub use device::{Gpu, Graph};
pub use embedding::TokenGroups;
pub use general::{Binary, Unary};
pub use head::HeadShape;
pub use linear::{Epilogue, FEW_ROWS_MAX};
pub use memory::{Buffer, MemoryStats, PinnedBuffer, View};

/// Everything the CUDA layer can fail with; `Display` gives a one-line message for the user.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver library (libcuda) could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver found (libcuda could not be loaded); use --device cpu, or install the NVIDIA driver")]
    NoDriver,
    /// Opening the device with this ordinal failed; the driver's message.
    #[error("CUDA device {0} is not available: {1}")]
    NoDevice(usize, String),
    /// An allocation did not fit, even after the pool gave its cache back to the driver.
    #[error(
        "the GPU is out of memory: {requested} more bytes did not fit beside the {held} the pool holds; use a smaller --batch or --seq"
    )]
    OutOfMemory {
        /// the bytes asked for
        requested: usize,
        /// the bytes the pool held then (after giving back its cache: those in use)
        held: usize,
    },
    /// A driver call failed (a launch, a copy, a synchronisation).
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// A cuBLASLt call failed.
    #[error("cuBLASLt error: {0}")]
    BlasLt(#[from] cudarc::cublaslt::result::CublasError),
    /// NVRTC could not compile a kernel file; its log.
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    /// A call that cannot be carried out as asked (views of the wrong lengths, a shape no kernel
    /// handles, a capture of nothing); the message says which.
    #[error("{0}")]
    Shape(String),
}

/// The CUDA layer's result: `Ok(T)` or a [`CudaError`].
pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether a CUDA driver can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (the run-time compiler) can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles every kernel for `architecture` (such as `compute_90`) without a device: NVRTC
/// alone, so that a machine without a GPU can check the kernels' source.
pub fn compile_all_kernels(architecture: &str) -> Result<()> {
    for (module, source) in device::KERNEL_SOURCES {
        device::compile(module, source, architecture)?;
    }
    Ok(())
}

/// `Err(Shape(what()))` unless `ok`: the launchers' check of the views they are given.
fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape(what()))
    }
}

#[cfg(test)]
mod tests {
    /// Needs only NVRTC (no GPU): CI fetches it, so kernel source errors show up there too.
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !super::nvrtc_present() {
            println!("every_kernel_compiles_with_nvrtc: skipped (NVRTC not found; scripts/fetch-nvrtc.sh fetches it)");
            return;
        }
        for architecture in ["compute_80", "compute_90"] {
            if let Err(e) = super::compile_all_kernels(architecture) {
                panic!("{architecture}: {e}");
            }
        }
    }
}
