//! Where the work runs (`--device cpu|cuda`) and in what precision (`--precision f32|tf32`).

use crate::error::Result;
use crate::invalid;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// Matrix products in f32, or on TF32 tensor cores (CUDA only; 10-bit mantissa inputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
}

impl Device {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" if cfg!(feature = "cuda") => Ok(Device::Cuda),
            "cuda" => invalid!("--device cuda: this build has no CUDA support; rebuild with `--features cuda`, or use --device cpu"),
            other => invalid!("unknown --device '{other}' (use cpu or cuda)"),
        }
    }
}

impl Precision {
    pub fn parse(name: &str, device: Device) -> Result<Self> {
        match (name, device) {
            ("f32", _) => Ok(Precision::F32),
            ("tf32", Device::Cuda) => Ok(Precision::Tf32),
            ("tf32", Device::Cpu) => invalid!("--precision tf32 needs --device cuda (the CPU computes in f32)"),
            (other, _) => invalid!("unknown --precision '{other}' (use f32 or tf32)"),
        }
    }
}

/// Fails early, before anything is written, when `device` cannot run on this machine.
pub fn check_available(device: Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if device == Device::Cuda && !multitoken_cuda::driver_present() {
        return Err(multitoken_cuda::CudaError::NoDriver.into());
    }
    let _ = device;
    Ok(())
}

/// Opens GPU 0 with the precision asked for. `MULTITOKEN_FEW_ROW_LINEAR=0` sends decoding's
/// linear layers to cuBLASLt instead of the few-row kernel, for benchmarks.
#[cfg(feature = "cuda")]
pub fn open_gpu(precision: Precision) -> Result<crate::cuda::Gpu> {
    let mut gpu = crate::cuda::Gpu::new(0)?;
    gpu.tf32 = precision == Precision::Tf32;
    gpu.few_row_linear = std::env::var("MULTITOKEN_FEW_ROW_LINEAR").as_deref() != Ok("0");
    Ok(gpu)
}
