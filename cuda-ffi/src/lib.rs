//! `multitoken-cuda`: the CUDA layer of multitoken.
//!
//! - [`Gpu::new`] opens a device: a CUDA context, a stream and a cuBLAS handle. The driver,
//!   cuBLAS and NVRTC are loaded at run time, so this crate builds anywhere; where no driver is
//!   installed, opening a device returns [`CudaError::NoDriver`] instead of panicking.
//! - Kernels live in `kernels/*.cu` and are compiled at run time by NVRTC, once per process.
//! - [`Gpu::matmul`] is a row-major matrix product through cuBLAS (f32, or TF32 on request).
//!
//! Status: the device layer (context, memory, NVRTC kernels, cuBLAS) with GELU, LayerNorm and
//! AdamW kernels, each checked against the CPU on a GPU machine. The ops, the fused CP head and
//! `--device cuda` in the main crate come next (docs/results.md, "CUDA").

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

/// The kernel sources, compiled at run time.
const KERNEL_SOURCES: [&str; 3] =
    [include_str!("../kernels/elementwise.cu"), include_str!("../kernels/layernorm.cu"), include_str!("../kernels/adamw.cu")];

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
    layernorm_forward: CudaFunction,
    layernorm_backward: CudaFunction,
    adamw_update: CudaFunction,
}

/// The constants of one AdamW update (PyTorch semantics; `t` counts from 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub t: u32,
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

/// One warp per row, 8 rows per block of 256 threads.
fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
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
        let mut modules = Vec::new();
        for source in KERNEL_SOURCES {
            let ptx = cudarc::nvrtc::compile_ptx(source).map_err(|e| CudaError::Compile(e.to_string()))?;
            modules.push(context.load_module(ptx)?);
        }
        let kernels = Kernels {
            gelu_forward: modules[0].load_function("gelu_forward")?,
            gelu_backward: modules[0].load_function("gelu_backward")?,
            layernorm_forward: modules[1].load_function("layernorm_forward")?,
            layernorm_backward: modules[1].load_function("layernorm_backward")?,
            adamw_update: modules[2].load_function("adamw_update")?,
        };
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

    /// LayerNorm of each row of x (rows, c); writes out and each row's mean and rstd.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        mean: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        if x.len() != rows * c || out.len() != rows * c || weight.len() != c || bias.len() != c || mean.len() != rows || rstd.len() != rows
        {
            return Err(CudaError::Shape(format!("layernorm_forward: buffers do not fit {rows} rows of {c}")));
        }
        let (rows_i, c_i) = (rows as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.layernorm_forward);
        launch.arg(x).arg(weight).arg(bias).arg(out).arg(mean).arg(rstd).arg(&rows_i).arg(&c_i);
        // SAFETY: sizes checked above; one warp per row, 8 rows per block.
        unsafe { launch.launch(rows_config(rows)) }?;
        Ok(())
    }

    /// LayerNorm backward: writes dx, adds into dweight and dbias.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        x: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dweight: &mut CudaSlice<f32>,
        dbias: &mut CudaSlice<f32>,
        rows: usize,
        c: usize,
    ) -> Result<()> {
        if x.len() != rows * c
            || dout.len() != rows * c
            || dx.len() != rows * c
            || weight.len() != c
            || dweight.len() != c
            || dbias.len() != c
        {
            return Err(CudaError::Shape(format!("layernorm_backward: buffers do not fit {rows} rows of {c}")));
        }
        let (rows_i, c_i) = (rows as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.layernorm_backward);
        launch.arg(x).arg(dout).arg(weight).arg(mean).arg(rstd).arg(dx).arg(dweight).arg(dbias).arg(&rows_i).arg(&c_i);
        // SAFETY: sizes checked above.
        unsafe { launch.launch(rows_config(rows)) }?;
        Ok(())
    }

    /// One AdamW update of a parameter buffer in place.
    pub fn adamw_update(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        step: AdamWStep,
    ) -> Result<()> {
        let n = params.len();
        if grads.len() != n || m.len() != n || v.len() != n {
            return Err(CudaError::Shape("adamw_update: parameter, gradient and moments differ in length".into()));
        }
        let bias_correction1 = 1.0 - step.beta1.powi(step.t as i32);
        let bias_correction2_sqrt = (1.0 - step.beta2.powi(step.t as i32)).sqrt();
        let n_i = n as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.adamw_update);
        launch.arg(params).arg(grads).arg(m).arg(v).arg(&n_i);
        launch.arg(&step.lr).arg(&step.beta1).arg(&step.beta2).arg(&step.eps).arg(&step.weight_decay);
        launch.arg(&bias_correction1).arg(&bias_correction2_sqrt);
        // SAFETY: all four buffers hold n elements.
        unsafe { launch.launch(launch_config(n)) }?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}
