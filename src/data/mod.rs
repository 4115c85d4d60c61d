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

/// What `data prepare` reports.
#[derive(Debug, serde::Serialize)]
pub struct PrepareSummary {
    /// tokens written to train.bin
    pub train_tokens: usize,
    /// tokens written to val.bin
    pub val_tokens: usize,
    /// V, the tokenizer's vocabulary size (added tokens included)
    pub vocab_size: usize,
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
    let separator = tokenizer::end_of_text_id(&tokenizer);
    let mut tokens = Vec::new();
    for path in inputs {
        if !std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
            return Err(Error::bad_file(path, "not a regular file (pass text files, not directories)"));
        }
        let text = tokenizer::read_text(path)?;
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
    let json = std::fs::read(tokenizer_path).map_err(|e| Error::io(tokenizer_path, e))?;
    write_atomically(&out_dir.join(TOKENIZER_FILE), &json)?;
    Ok(PrepareSummary { train_tokens: split, val_tokens, vocab_size: vocab_size as usize })
}
