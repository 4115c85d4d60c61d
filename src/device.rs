//! Where the work runs (`--device cpu|cuda`) and in what precision (`--precision f32|tf32|bf16`):
//! the choice on the command line, and the place that opens the device it names.

use multitoken_cuda::{AttentionRoute, ProductPrecision};

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
    /// GPU 0 (each rank's own, in a multi-GPU run), through CUDA.
    Cuda,
}

/// Matrix products in f32, or on tensor cores in TF32 or bf16 (CUDA only). Whatever the choice,
/// parameters, gradients, the optimizer's state and everything outside the products stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Plain f32 (the default).
    #[default]
    F32,
    /// TF32 tensor cores for the matrix products (10-bit mantissa inputs); CUDA only.
    Tf32,
    /// bf16 tensor cores for the matrix products (inputs rounded to an 8-bit mantissa, f32
    /// accumulation): mixed precision as PyTorch's autocast does it; CUDA only.
    Bf16,
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
        self.open_on(precision, 0)
    }

    /// [`DeviceKind::open`] on GPU `ordinal` (a multi-GPU run's rank opens its own).
    pub fn open_on(self, precision: Precision, ordinal: usize) -> Result<Device> {
        precision.check_device(self)?;
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda => {
                let mut gpu = multitoken_cuda::Gpu::new(ordinal)?;
                gpu.precision = match precision {
                    Precision::F32 => ProductPrecision::F32,
                    Precision::Tf32 => ProductPrecision::Tf32,
                    Precision::Bf16 => ProductPrecision::Bf16,
                };
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
    /// Parses `--precision`: `f32`, or `tf32` or `bf16` where `device` is CUDA.
    pub fn parse(name: &str, device: DeviceKind) -> Result<Self> {
        let precision = match name {
            "f32" => Precision::F32,
            "tf32" => Precision::Tf32,
            "bf16" => Precision::Bf16,
            other => return invalid!("unknown --precision '{other}' (use f32, tf32 or bf16)"),
        };
        precision.check_device(device)?;
        Ok(precision)
    }

    /// Parses decoding's `--precision` (`sample`, `bench decode`): `f32`, or `bf16` where `device`
    /// is CUDA, the precision of the weights a decoding pass streams.
    pub fn parse_for_decoding(name: &str, device: DeviceKind) -> Result<Self> {
        match name {
            "f32" | "bf16" => Precision::parse(name, device),
            "tf32" => {
                invalid!("--precision tf32 is for training: decoding streams its weights in f32 or bf16 (use --precision f32 or bf16)")
            }
            other => invalid!("unknown --precision '{other}' for decoding (use f32 or bf16)"),
        }
    }

    /// The name `--precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Tensor-core precisions need the GPU.
    pub fn check_device(self, device: DeviceKind) -> Result<()> {
        if self != Precision::F32 && device != DeviceKind::Cuda {
            return invalid!("--precision {} needs --device cuda (the CPU computes in f32)", self.name());
        }
        Ok(())
    }
}

/// Fails early, before anything is written, when `device` cannot run on this machine.
pub fn check_available(device: DeviceKind) -> Result<()> {
    if device == DeviceKind::Cuda {
        multitoken_cuda::check_libraries()?;
    }
    Ok(())
}
