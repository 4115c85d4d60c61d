//! Byte-level BPE tokenizers in Hugging Face's `tokenizer.json` format, trained and run by the
//! `tokenizers` crate.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, Tokenizer, TokenizerBuilder};

use crate::error::{Error, Result};
use crate::invalid;

/// Separates documents in a corpus; also GPT-2's bos/eos token.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// What `tokenizer train` reports.
#[derive(Debug, serde::Serialize)]
pub struct TokenizerSummary {
    /// the trained vocabulary's size, `<|endoftext|>` included
    pub vocab_size: usize,
    /// input bytes per token when the inputs are encoded with the new tokenizer
    pub bytes_per_token: f64,
    /// the inputs' total size in bytes
    pub input_bytes: usize,
    /// the inputs' length in tokens of the new tokenizer
    pub input_tokens: usize,
}

fn check_inputs(inputs: &[PathBuf]) -> Result<usize> {
    if inputs.is_empty() {
        return invalid!("no input files given (pass --input FILE...)");
    }
    let mut total = 0;
    for path in inputs {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::bad_file(path, "not a regular file (pass text files, not directories)"));
        }
        total += meta.len() as usize;
    }
    if total == 0 {
        return invalid!("the input files are empty: nothing to learn a vocabulary from");
    }
    Ok(total)
}

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (including `<|endoftext|>`) and
/// writes it to `out` as `tokenizer.json`.
pub fn train(inputs: &[PathBuf], vocab_size: usize, out: &Path, show_progress: bool) -> Result<TokenizerSummary> {
    let input_bytes = check_inputs(inputs)?;
    let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    if vocab_size < alphabet.len() + 1 {
        return invalid!("--vocab-size {vocab_size} is too small: a byte-level vocabulary needs at least {}", alphabet.len() + 1);
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(show_progress)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(alphabet)
        .build();
    let mut tokenizer = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| Error::Invalid(format!("building the tokenizer: {e}")))?;
    let files: Vec<String> = inputs.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    tokenizer.train_from_files(&mut trainer, files).map_err(|e| Error::Invalid(format!("training the tokenizer: {e}")))?;
    let tokenizer: Tokenizer = tokenizer.into();
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let json = tokenizer.to_string(true).map_err(|e| Error::Invalid(format!("serialising the tokenizer: {e}")))?;
    crate::data::write_atomically(out, json.as_bytes())?;
    let mut input_tokens = 0;
    for path in inputs {
        input_tokens += encode(&tokenizer, &read_text(path)?)?.len();
    }
    Ok(TokenizerSummary {
        vocab_size: tokenizer.get_vocab_size(true),
        bytes_per_token: input_bytes as f64 / input_tokens.max(1) as f64,
        input_bytes,
        input_tokens,
    })
}

/// Reads a `tokenizer.json` file.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::bad_file(path, "no such tokenizer file (make one with `multitoken tokenizer train`)"));
    }
    Tokenizer::from_file(path).map_err(|e| Error::bad_file(path, format!("not a valid tokenizer.json ({e})")))
}

/// Parses a tokenizer from the text of a `tokenizer.json` (a checkpoint's copy, say); `path`
/// names it in the error.
pub fn from_json(json: &str, path: &Path) -> Result<Tokenizer> {
    json.parse::<Tokenizer>().map_err(|e| Error::bad_file(path, format!("not a valid tokenizer.json ({e})")))
}

/// A file's text; bytes that are not UTF-8 become U+FFFD.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Token ids of a text. Long texts are cut into pieces at line starts that begin a word, where
/// the byte-level pre-tokenizer would split anyway, and encoded in parallel.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    const PIECE: usize = 1 << 16;
    let mut pieces = Vec::new();
    let mut start = 0;
    // a cut at `end` needs "x\nW": the whitespace run is exactly the newline on both sides
    while start < text.len() {
        let mut end = (start + PIECE).min(text.len());
        while end < text.len() {
            let bytes = text.as_bytes();
            let word_starts_line = bytes[end - 1] == b'\n' && !bytes[end].is_ascii_whitespace();
            if word_starts_line && !bytes[end - 2].is_ascii_whitespace() {
                break;
            }
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    let encodings = tokenizer.encode_batch(pieces, false).map_err(|e| Error::Invalid(format!("tokenizing: {e}")))?;
    Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
}

/// The text of token ids, special tokens such as `<|endoftext|>` included.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, false).map_err(|e| Error::Invalid(format!("detokenizing: {e}")))
}

/// The id of `<|endoftext|>`, if the tokenizer has it.
pub fn end_of_text_id(tokenizer: &Tokenizer) -> Option<u32> {
    tokenizer.token_to_id(END_OF_TEXT)
}
