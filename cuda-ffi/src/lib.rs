//! `multitoken-cuda`: the CUDA layer of multitoken.
//!
//! - [`Gpu::new`] opens a device: a CUDA context, a stream and a cuBLAS handle. The driver,
//!   cuBLAS and NVRTC are loaded at run time, so this crate builds anywhere; where no driver is
//!   installed, opening a device returns [`CudaError::NoDriver`] instead of panicking.
//! - Kernels live in `kernels/*.cu` and are compiled at run time by NVRTC, once per process.
//! - [`Gpu::matmul`] is a row-major matrix product through cuBLAS (f32, or TF32 on request).
//!
//! Status: the device layer (context, memory, NVRTC kernels, cuBLAS) with GELU as the first
//! kernel, each checked against the CPU on a GPU machine. The ops, the fused CP head and
//! `--device cuda` in the main crate come next (docs/results.md, "CUDA").

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

/// The kernel sources, compiled at run time.
const ELEMENTWISE_SRC: &str = include_str!("../kernels/elementwise.cu");

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver found (libcuda could not be loaded); use --device cpu, or install the NVIDIA driver")]
    NoDriver,
    #[error("CUDA device {0} is not available: {1}")]
    NoDevice(usize, String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS error: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether a CUDA driver can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

struct Kernels {
    gelu_forward: CudaFunction,
    gelu_backward: CudaFunction,
}

/// An open device: context, stream, cuBLAS, compiled kernels.
pub struct Gpu {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    /// use TF32 tensor cores in matmul (`--precision tf32`)
    pub tf32: bool,
}

fn launch_config(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    LaunchConfig { grid_dim: ((n as u32).div_ceil(THREADS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Opens device `ordinal`; [`CudaError::NoDriver`] where no driver is installed.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let context = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(ordinal, e.to_string()))?;
        let stream = context.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let ptx = cudarc::nvrtc::compile_ptx(ELEMENTWISE_SRC).map_err(|e| CudaError::Compile(e.to_string()))?;
        let module = context.load_module(ptx)?;
        let kernels =
            Kernels { gelu_forward: module.load_function("gelu_forward")?, gelu_backward: module.load_function("gelu_backward")? };
        Ok(Gpu { stream, blas, kernels, tf32: false })
    }

    pub fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn download(&self, device: &CudaSlice<f32>) -> Result<Vec<f32>> {
        let mut host = vec![0.0f32; device.len()];
        self.stream.memcpy_dtoh(device, &mut host)?;
        Ok(host)
    }

    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.alloc_zeros::<f32>(len)?)
    }

    /// `c (m,n) = a (m,k) · b (k,n)`, all row-major; `a_transposed`/`b_transposed` say that the
    /// operand is stored as its transpose, as in the CPU `matmul`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        a: &CudaSlice<f32>,
        a_transposed: bool,
        b: &CudaSlice<f32>,
        b_transposed: bool,
        c: &mut CudaSlice<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if a.len() != m * k || b.len() != k * n || c.len() != m * n {
            return Err(CudaError::Shape(format!("matmul: operands are not {m}×{k} · {k}×{n}")));
        }
        // cuBLAS is column-major: a row-major C = A·B is the column-major Cᵀ = Bᵀ·Aᵀ.
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let config = GemmConfig {
            transa: op(b_transposed),
            transb: op(a_transposed),
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: if b_transposed { k as i32 } else { n as i32 },
            ldb: if a_transposed { m as i32 } else { k as i32 },
            beta: 0.0f32,
            ldc: n as i32,
        };
        let math_mode = if self.tf32 {
            cudarc::cublas::sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is ours; the sizes were checked above.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(*self.blas.handle(), math_mode).result()?;
            self.blas.gemm(config, b, a, c)?;
        }
        Ok(())
    }

    /// `out = gelu(x)`, elementwise.
    pub fn gelu_forward(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = x.len() as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.gelu_forward);
        launch.arg(x).arg(out).arg(&n);
        // SAFETY: the kernel reads x[0..n] and writes out[0..n]; both hold n elements.
        unsafe { launch.launch(launch_config(x.len())) }?;
        Ok(())
    }

    /// `dx += dout · gelu'(x)`, elementwise.
    pub fn gelu_backward(&self, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
        let n = x.len() as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.gelu_backward);
        launch.arg(x).arg(dout).arg(dx).arg(&n);
        // SAFETY: the kernel touches elements 0..n of buffers that hold n elements.
        unsafe { launch.launch(launch_config(x.len())) }?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
