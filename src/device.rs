//! Where the work runs (`--device cpu|cuda`) and in what precision (`--precision f32|tf32`):
//! the choice on the command line, and the place that opens the device it names.

use multitoken_cuda::AttentionRoute;

use crate::error::Result;
use crate::invalid;
use crate::tensor::Device;

/// The `--device` a command was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// GPU 0, through CUDA.
    Cuda,
}

/// Matrix products in f32, or on TF32 tensor cores (CUDA only; 10-bit mantissa inputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain f32 (the default).
    #[default]
    F32,
    /// TF32 tensor cores for the matrix products; CUDA only.
    Tf32,
}

impl DeviceKind {
    /// Parses `--device`: `cpu` or `cuda`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => invalid!("unknown --device '{other}' (use cpu or cuda)"),
        }
    }

    /// Opens the device: the CPU, or GPU 0 with the precision asked for. For benchmarks,
    /// `MULTITOKEN_ATTENTION=products` or `fused` chooses the attention's route by hand (where a
    /// fused kernel exists for the head size; else by precision), and
    /// `MULTITOKEN_FEW_ROW_LINEAR=0` sends decoding's linear layers to cuBLASLt instead of the
    /// few-row kernel.
    pub fn open(self, precision: Precision) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => {
                let mut gpu = multitoken_cuda::Gpu::new(0)?;
                gpu.tf32 = precision == Precision::Tf32;
                gpu.few_row_linear = std::env::var("MULTITOKEN_FEW_ROW_LINEAR").as_deref() != Ok("0");
                gpu.attention_route = match std::env::var("MULTITOKEN_ATTENTION").as_deref() {
                    Ok("products") => Some(AttentionRoute::Products),
                    Ok("fused") => Some(AttentionRoute::Fused),
                    _ => None,
                };
                Ok(Device::cuda(gpu))
            }
        }
    }
}

impl Precision {
    /// Parses `--precision`: `f32`, or `tf32` where `device` is CUDA.
    pub fn parse(name: &str, device: DeviceKind) -> Result<Self> {
        match (name, device) {
            ("f32", _) => Ok(Precision::F32),
            ("tf32", DeviceKind::Cuda) => Ok(Precision::Tf32),
            ("tf32", DeviceKind::Cpu) => invalid!("--precision tf32 needs --device cuda (the CPU computes in f32)"),
            (other, _) => invalid!("unknown --precision '{other}' (use f32 or tf32)"),
        }
    }
}

/// Fails early, before anything is written, when `device` cannot run on this machine.
pub fn check_available(device: DeviceKind) -> Result<()> {
    if device == DeviceKind::Cuda {
        multitoken_cuda::check_libraries()?;
    }
    Ok(())
}
