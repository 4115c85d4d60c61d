//! The library's error type. Every variant is something a user can cause and fix; messages
//! are one line and say what to do.

use std::path::PathBuf;

/// Everything the library can fail with; `Display` gives the one-line message for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file or directory failed.
    // not named `source`: that would make it the error's cause too, printed a second time
    #[error("{path}: {error}")]
    Io {
        /// the file or directory
        path: PathBuf,
        /// what the operating system reported
        error: std::io::Error,
    },
    /// An argument, setting or shape that cannot be accepted; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A file or directory that exists but holds the wrong thing: a bad header, a missing
    /// tensor, settings that disagree.
    #[error("{path}: {message}")]
    BadFile {
        /// the file or directory
        path: PathBuf,
        /// what is wrong with it, and what to do
        message: String,
    },
    /// The training loss became NaN or infinite.
    #[error("training stopped: the loss became {value} at step {step}; checkpoints written before it are kept (try a lower --lr)")]
    NonFiniteLoss {
        /// the step whose loss it was
        step: u64,
        /// the loss
        value: f64,
    },
    /// Training stopped early (Ctrl-C, or a requested stop) after writing a checkpoint.
    #[error("interrupted at step {step}; checkpoint written to {path} (continue with --resume)")]
    Interrupted {
        /// the number of steps done, which the checkpoint holds
        step: u64,
        /// the run's output directory, where the checkpoint is
        path: PathBuf,
    },
    /// A rank of a multi-GPU run failed, and the launcher stopped the others. With no signal,
    /// the rank printed its own message, and this one is not printed.
    #[error("{}", rank_failed(*rank, *signal))]
    RankFailed {
        /// the rank that failed first
        rank: usize,
        /// its exit status (the launcher exits with it)
        code: u8,
        /// the signal that killed it, if one did
        signal: Option<i32>,
    },
    /// A GPU's error: no driver, out of memory, a failed launch.
    #[error(transparent)]
    Cuda(#[from] multitoken_cuda::CudaError),
}

/// The library's result: `Ok(T)` or an [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }

    /// An [`Error::BadFile`] for `path`, saying `message`.
    pub fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), message: message.into() }
    }
}

fn rank_failed(rank: usize, signal: Option<i32>) -> String {
    match signal {
        Some(signal) => format!(
            "rank {rank} was killed by signal {signal}; the other ranks were stopped, and the checkpoint in --out is the last one saved (continue with --resume)"
        ),
        None => format!("rank {rank} failed; the other ranks were stopped"),
    }
}

/// `Err(Error::Invalid(..))` with a formatted message.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { Err($crate::error::Error::Invalid(format!($($arg)*))) };
}
