//! Where a tensor's elements live: the CPU, or one GPU (an open [`Gpu`], shared by every tensor
//! on it).

use std::sync::Arc;

use multitoken_cuda::Gpu;

/// The CPU, or a GPU shared by every tensor on it; two devices are equal when they are the CPU,
/// or the same open [`Gpu`].
#[derive(Clone, Default)]
pub enum Device {
    /// Host memory (the default).
    #[default]
    Cpu,
    /// An open GPU.
    Cuda(Arc<Gpu>),
}

impl Device {
    /// A device for tensors on `gpu`.
    pub fn cuda(gpu: Gpu) -> Self {
        Device::Cuda(Arc::new(gpu))
    }

    /// Whether this is the CPU.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// The GPU, unless this is the CPU.
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Device::Cpu => None,
            Device::Cuda(gpu) => Some(gpu),
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "the CPU"),
            Device::Cuda(gpu) => write!(f, "{}", gpu.name()),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}
