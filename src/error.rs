//! The library's error type. Every variant is something a user can cause and fix; messages
//! are one line and say what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // not named `source`: that would make it the error's cause too, printed a second time
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("training stopped: the loss became {value} at step {step}; checkpoints written before it are kept (try a lower --lr)")]
    NonFiniteLoss { step: u64, value: f64 },
    #[error("interrupted at step {step}; checkpoint written to {path} (continue with --resume)")]
    Interrupted { step: u64, path: PathBuf },
    /// A GPU's error: no driver, out of memory, a failed launch.
    #[error("{0}")]
    Cuda(#[from] multitoken_cuda::CudaError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }

    pub fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), message: message.into() }
    }
}

/// `Err(Error::Invalid(..))` with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::Error::Invalid(format!($($arg)*))) };
}
