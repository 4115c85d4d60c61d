//! Data: tokenizers, token files, corpus preparation and batches.

pub mod batches;
pub mod tokenizer;
pub mod tokens;

pub use batches::Batch;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::invalid;

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

/// What `data prepare` reports.
#[derive(Debug, serde::Serialize)]
pub struct PrepareSummary {
    /// tokens written to train.bin
    pub train_tokens: usize,
    /// tokens written to val.bin
    pub val_tokens: usize,
    /// V, the tokenizer's vocabulary size (added tokens included)
    pub vocab_size: usize,
    /// bytes of the inputs that were not UTF-8 and were read as U+FFFD
    pub replaced_bytes: usize,
}

/// The training tokens, one of the files `data prepare` writes into its output directory.
pub const TRAIN_FILE: &str = "train.bin";
/// The validation tokens (the corpus's last `val_fraction`), beside [`TRAIN_FILE`].
pub const VAL_FILE: &str = "val.bin";
/// The copy of the tokenizer that encoded both, beside [`TRAIN_FILE`].
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Tokenizes the inputs (documents separated by `<|endoftext|>`), splits off the last
/// `val_fraction` as validation, and writes train.bin, val.bin and a copy of the tokenizer.
pub fn prepare(tokenizer_path: &Path, inputs: &[PathBuf], out_dir: &Path, val_fraction: f64) -> Result<PrepareSummary> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return invalid!("--val-fraction {val_fraction} must be between 0 and 1 (exclusive)");
    }
    if inputs.is_empty() {
        return invalid!("no input files given (pass --input FILE...)");
    }
    let tokenizer = tokenizer::load(tokenizer_path)?;
    let tokenizer_json = std::fs::read(tokenizer_path).map_err(|e| Error::io(tokenizer_path, e))?;
    let existing = out_dir.join(TOKENIZER_FILE);
    if existing.exists() && std::fs::read(&existing).ok().as_ref() != Some(&tokenizer_json) {
        return Err(Error::bad_file(
            out_dir,
            "holds data made with another tokenizer; choose another --out (or delete it to prepare it again)",
        ));
    }
    let separator = tokenizer::end_of_text_id(&tokenizer);
    let mut tokens = Vec::new();
    let mut replaced_bytes = 0;
    for path in inputs {
        let (text, replaced) = tokenizer::read_text_lossy(path)?;
        replaced_bytes += replaced;
        if text.trim().is_empty() {
            continue;
        }
        tokens.extend(tokenizer::encode(&tokenizer, &text)?);
        tokens.extend(separator);
    }
    let min_tokens = 64;
    if tokens.len() < min_tokens {
        return invalid!("the corpus has {} tokens; need at least {min_tokens} (the input files are empty or nearly so)", tokens.len());
    }
    let val_tokens = ((tokens.len() as f64 * val_fraction).round() as usize).clamp(1, tokens.len() - 1);
    let split = tokens.len() - val_tokens;
    let vocab_size = tokenizer.get_vocab_size(true) as u32;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    tokens::write(&out_dir.join(TRAIN_FILE), vocab_size, &tokens[..split])?;
    tokens::write(&out_dir.join(VAL_FILE), vocab_size, &tokens[split..])?;
    write_atomically(&out_dir.join(TOKENIZER_FILE), &tokenizer_json)?;
    Ok(PrepareSummary { train_tokens: split, val_tokens, vocab_size: vocab_size as usize, replaced_bytes })
}
