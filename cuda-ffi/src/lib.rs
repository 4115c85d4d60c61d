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
mod fused_attention; // fused_attention.cu: flash attention in f32; tensor_core_attention.cu: in bf16
mod head; // head.cu: the CP head's per-position work and statistics
mod speculative; // speculative.cu: the speculative step on the device (gate, verification, drafts)
mod adamw; // adamw.cu: the optimizer over many tensors in one launch
mod linear; // linear.cu: decoding's linear layers on a few rows
mod general; // general.cu: elementwise functions and arithmetic, sums along an axis, transposes, log-softmax
mod collective; // NCCL: all-reduce across the GPUs of a data-parallel run

pub use adamw::{AdamWSegment, AdamWStep};
pub use attention::ProductsAttention;
pub use attention::{AttentionRoute, AttentionShape, CacheRows};
pub use blas::{GemmRoute, Operand, ProductPrecision};
pub use collective::{check_nccl, nccl_present, nccl_soname_path, unique_id, Communicator, NCCL_SONAME, UNIQUE_ID_BYTES};
pub use constants::{
    ACCEPT_ALWAYS, ACCEPT_EXACT, ACCEPT_RESAMPLE_FROM_TARGET, FUSED_ATTENTION_HEAD_SIZES, MAX_HORIZON, MAX_RANK, STEP_ACCEPTED,
    STEP_DRAFTS, STEP_NEXT, STEP_NOT_FINITE,
};
pub use device::{Gpu, Graph};
pub use embedding::TokenGroups;
pub use fused_attention::QkvRows;
pub use general::{Binary, Unary};
pub use head::{HeadShape, LogitElement};
pub use linear::{ColumnWeights, Epilogue, FEW_ROWS_MAX, FEW_ROW_LAYERNORM_WIDTH_MAX, TILE_ROWS_MAX};
pub use memory::{Buffer, MemoryStats, PinnedBuffer, View};
pub use speculative::{StepBuffers, StepChoice};

/// Everything the CUDA layer can fail with; `Display` gives a one-line message for the user.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The driver library (libcuda) could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver found (libcuda could not be loaded); use --device cpu, or install the NVIDIA driver")]
    NoDriver,
    /// A CUDA library could not be loaded from the directory that [`LIB_DIR_VARIABLE`] names, or
    /// a library other than the driver from anywhere.
    #[error("{library} ({file}) could not be loaded{searched}; {install}, and put its directory in LD_LIBRARY_PATH or {LIB_DIR_VARIABLE}, or use --device cpu")]
    MissingLibrary {
        /// its usual name
        library: &'static str,
        /// the file looked for
        file: &'static str,
        /// what to install
        install: &'static str,
        /// where it was looked for, when a directory was named
        searched: String,
    },
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
    /// An NCCL call failed, or the other ranks of a data-parallel run stopped answering.
    #[error("{0}")]
    Collective(String),
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

/// The environment variable that names a directory to load the CUDA libraries from, ahead of
/// the system's search path; then a library missing from it is reported missing.
pub const LIB_DIR_VARIABLE: &str = "MULTITOKEN_CUDA_LIB_DIR";

/// Checks that every CUDA library a device needs can be loaded (driver, cuBLAS, cuBLASLt,
/// NVRTC), so that a missing one is a [`CudaError`] naming it instead of a panic inside the
/// loader. With [`LIB_DIR_VARIABLE`] set, each is opened from that directory and stays loaded,
/// so the loader finds it there.
pub fn check_libraries() -> Result<()> {
    type Probe = unsafe fn() -> bool;
    // (name for the user, cudarc's library name, the file on Linux, what to install, cudarc's probe)
    let libraries: [(&'static str, &str, &'static str, &'static str, Probe); 4] = [
        ("the CUDA driver", "cuda", "libcuda.so.1", "install the NVIDIA driver", cudarc::driver::sys::is_culib_present),
        ("cuBLAS", "cublas", "libcublas.so.13", "install cuBLAS from the CUDA 13 toolkit", cudarc::cublas::sys::is_culib_present),
        ("cuBLASLt", "cublasLt", "libcublasLt.so.13", "install cuBLAS from the CUDA 13 toolkit", cudarc::cublaslt::sys::is_culib_present),
        ("NVRTC", "nvrtc", "libnvrtc.so.13", "install NVRTC from the CUDA 13 toolkit", cudarc::nvrtc::sys::is_culib_present),
    ];
    let directory = std::env::var_os(LIB_DIR_VARIABLE).filter(|d| !d.is_empty()).map(std::path::PathBuf::from);
    for (library, lib_name, file, install, probe) in libraries {
        let found = match &directory {
            // SAFETY: opening a CUDA library runs only its initialisers; it stays loaded for the
            // process's life, as cudarc's own handle does.
            Some(dir) => cudarc::get_lib_name_candidates(lib_name).iter().map(|name| dir.join(name)).filter(|path| path.is_file()).any(
                |path| match unsafe { libloading::Library::new(&path) } {
                    Ok(handle) => {
                        std::mem::forget(handle);
                        true
                    }
                    Err(_) => false,
                },
            ),
            // SAFETY: only probes whether the shared library can be opened.
            None => unsafe { probe() },
        };
        if !found {
            if lib_name == "cuda" && directory.is_none() {
                return Err(CudaError::NoDriver);
            }
            let searched = directory.as_ref().map(|d| format!(" from {} ({LIB_DIR_VARIABLE})", d.display())).unwrap_or_default();
            return Err(CudaError::MissingLibrary { library, file, install, searched });
        }
    }
    Ok(())
}

/// The number of CUDA devices this process sees (0 where no driver is installed).
pub fn device_count() -> usize {
    if check_libraries().is_err() {
        return 0;
    }
    cudarc::driver::CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

/// Whether NVRTC (the run-time compiler) can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles every kernel for `architecture` (such as `compute_90`) without a device: NVRTC
/// alone, so that a machine without a GPU can check the kernels' source.
pub fn compile_all_kernels(architecture: &str) -> Result<()> {
    device::compiled_kernels(architecture).map(drop)
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
            // a second device of the architecture takes the kernels compiled for the first
            let compiled_before = super::device::COMPILATIONS.load(std::sync::atomic::Ordering::SeqCst);
            let (first, again) = (super::device::compiled_kernels(architecture), super::device::compiled_kernels(architecture));
            assert_eq!(super::device::COMPILATIONS.load(std::sync::atomic::Ordering::SeqCst), compiled_before, "compiled again");
            let sources = |kernels: super::Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>>| {
                kernels.unwrap().into_iter().map(|(module, ptx)| (module, ptx.to_src())).collect::<Vec<_>>()
            };
            let first = sources(first);
            assert_eq!(first.len(), super::device::KERNEL_SOURCES.len());
            assert_eq!(first, sources(again));
        }
    }
}
