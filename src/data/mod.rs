//! Data: tokenizers, token files, corpus preparation and batches.

pub mod batches;
pub mod prepare;
pub mod tokenizer;
pub mod tokens;

pub use batches::Batch;
pub use prepare::{prepare, PrepareSummary};

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes a file atomically: a temporary file beside it, synced, then renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::bad_file(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Reads a whole file. Anything but a regular file is refused before it is opened: a FIFO
/// would block and a device such as /dev/zero would never end.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::bad_file(path, "is a directory; expected a file"));
    }
    if !meta.is_file() {
        return Err(Error::bad_file(path, "not a regular file (a pipe or a device cannot be read as one); pass a file"));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// The training tokens, one of the files `data prepare` writes into its output directory.
pub const TRAIN_FILE: &str = "train.bin";
/// The validation tokens (the corpus's last `val_fraction`), beside [`TRAIN_FILE`].
pub const VAL_FILE: &str = "val.bin";
/// The copy of the tokenizer that encoded both, beside [`TRAIN_FILE`].
pub const TOKENIZER_FILE: &str = "tokenizer.json";
