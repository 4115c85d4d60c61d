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
    for path in inputs {
        if let Some(offset) = first_invalid_utf8(path)? {
            return Err(Error::bad_file(
                path,
                format!("is not UTF-8 text (the first invalid byte is at offset {offset}); convert it to UTF-8 first"),
            ));
        }
    }
    Ok(total)
}

/// The offset of a file's first byte that is not UTF-8, if any, read in blocks.
fn first_invalid_utf8(path: &Path) -> Result<Option<u64>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut block = vec![0u8; 1 << 20];
    let (mut carried, mut offset) = (0, 0u64); // bytes of a character cut by the block's end
    loop {
        let read = file.read(&mut block[carried..]).map_err(|e| Error::io(path, e))?;
        let filled = carried + read;
        match std::str::from_utf8(&block[..filled]) {
            Ok(_) if read == 0 => return Ok(None),
            Ok(_) => carried = 0,
            Err(e) if e.error_len().is_some() || read == 0 => return Ok(Some(offset + e.valid_up_to() as u64)),
            Err(e) => {
                // a character cut at the end: keep its bytes for the next block
                let valid = e.valid_up_to();
                block.copy_within(valid..filled, 0);
                carried = filled - valid;
                offset += valid as u64;
                continue;
            }
        }
        offset += filled as u64;
        if read == 0 {
            return Ok(None);
        }
    }
}

/// A BPE model inside GPT-2's byte-level pipeline: no normaliser, GPT-2's pre-tokenizer without
/// a prefix space, byte-level decoding. Trained tokenizers and GPT-2's own share it.
type ByteLevelBpe = tokenizers::TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>;

fn byte_level_bpe(model: BPE) -> Result<ByteLevelBpe> {
    TokenizerBuilder::new()
        .with_model(model)
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| Error::Invalid(format!("building the tokenizer: {e}")))
}

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (including `<|endoftext|>`) and
/// writes it to `out` as `tokenizer.json`.
pub fn train(inputs: &[PathBuf], vocab_size: usize, out: &Path, show_progress: bool) -> Result<TokenizerSummary> {
    if out.exists() {
        return Err(Error::bad_file(out, "exists; a tokenizer is never written over a file (remove it, or choose another --out)"));
    }
    let input_bytes = check_inputs(inputs)?;
    let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    if vocab_size < alphabet.len() + 1 {
        return invalid!("--vocab-size {vocab_size} is too small: a byte-level vocabulary needs at least {}", alphabet.len() + 1);
    }
    if vocab_size > MAX_VOCAB_SIZE {
        return invalid!("--vocab-size {vocab_size} is larger than this program allows ({MAX_VOCAB_SIZE})");
    }
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(show_progress)
        .vocab_size(vocab_size)
        .min_frequency(2)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(alphabet)
        .build();
    let mut tokenizer = byte_level_bpe(BPE::default())?;
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
        input_tokens += encode(&tokenizer, &read_text_lossy(path)?.0)?.len();
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
    Ok(load_with_json(path)?.0)
}

/// The tokenizer that `path` names, and its `tokenizer.json` text: a `tokenizer.json` file, or a
/// directory holding one, or a Hugging Face GPT-2 directory as published, with GPT-2's BPE
/// files `vocab.json` and `merges.txt` instead (see [`from_bpe_files`]).
pub fn load_with_json(path: &Path) -> Result<(Tokenizer, String)> {
    if path.is_dir() {
        let json_path = path.join(TOKENIZER_JSON);
        if json_path.exists() {
            return load_with_json(&json_path);
        }
        let (vocab, merges) = (path.join(VOCAB_FILE), path.join(MERGES_FILE));
        if vocab.exists() && merges.exists() {
            let tokenizer = from_bpe_files(&vocab, &merges)?;
            let json = tokenizer.to_string(true).map_err(|e| Error::Invalid(format!("serialising the tokenizer: {e}")))?;
            return Ok((tokenizer, json));
        }
        return Err(Error::bad_file(path, "holds neither tokenizer.json nor vocab.json and merges.txt; pass a tokenizer"));
    }
    if !path.exists() {
        return Err(Error::bad_file(path, "no such tokenizer file (make one with `multitoken tokenizer train`)"));
    }
    let bytes = crate::data::read_file(path)?;
    let json = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not a valid tokenizer.json (not UTF-8 text)"))?;
    Ok((from_json(&json, path)?, json))
}

/// A tokenizer's file in Hugging Face's format.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// GPT-2's vocabulary as published: token to id, as JSON.
pub const VOCAB_FILE: &str = "vocab.json";
/// GPT-2's merges as published: one pair a line, in order, after a `#version` line.
pub const MERGES_FILE: &str = "merges.txt";

/// GPT-2's tokenizer from its published BPE files: byte-level BPE with GPT-2's pre-tokenizer and
/// no prefix space, `<|endoftext|>` a special token, the same pipeline as the trained ones and
/// as Hugging Face's `GPT2TokenizerFast`.
pub fn from_bpe_files(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    for file in [vocab, merges] {
        crate::data::read_file(file)?; // a regular file, readable
    }
    let (vocab_text, merges_text) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let model = BPE::from_file(&vocab_text, &merges_text)
        .build()
        .map_err(|e| Error::bad_file(vocab.parent().unwrap_or(vocab), format!("GPT-2's BPE files do not make a tokenizer ({e})")))?;
    let mut tokenizer: Tokenizer = byte_level_bpe(model)?.into();
    tokenizer.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
    check_ids(&tokenizer, vocab)?;
    Ok(tokenizer)
}

/// Parses a tokenizer from the text of a `tokenizer.json` (a checkpoint's copy, say); `path`
/// names it in the error.
pub fn from_json(json: &str, path: &Path) -> Result<Tokenizer> {
    let tokenizer = json.parse::<Tokenizer>().map_err(|e| Error::bad_file(path, format!("not a valid tokenizer.json ({e})")))?;
    check_ids(&tokenizer, path)?;
    Ok(tokenizer)
}

/// Refuses a tokenizer that cannot index a model's vocabulary: more tokens than allowed, or
/// ids that do not run from 0 to V − 1 (an id past V would name a row the model lacks, or be
/// cut to 16 bits in a token file).
fn check_ids(tokenizer: &Tokenizer, path: &Path) -> Result<()> {
    let size = tokenizer.get_vocab_size(true);
    if size > MAX_VOCAB_SIZE {
        return Err(Error::bad_file(path, format!("the tokenizer has {size} tokens, more than this program allows ({MAX_VOCAB_SIZE})")));
    }
    if let Some((token, id)) = tokenizer.get_vocab(true).into_iter().find(|&(_, id)| id as usize >= size) {
        return Err(Error::bad_file(
            path,
            format!(
                "token {token:?} has id {id}, but the ids of a tokenizer of {size} tokens must run from 0 to {}",
                size.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

pub use crate::model::config::MAX_VOCAB_SIZE;

/// A file's text, which must be UTF-8: a text scored or prompted with is never changed behind
/// the user's back.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = crate::data::read_file(path)?;
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        Error::bad_file(path, format!("is not UTF-8 text (the first invalid byte is at offset {offset}); convert it to UTF-8 first"))
    })
}

/// A corpus file's text, with each byte sequence that is not UTF-8 replaced by U+FFFD; also
/// returns how many bytes were replaced, so the caller can say so.
pub fn read_text_lossy(path: &Path) -> Result<(String, usize)> {
    let bytes = crate::data::read_file(path)?;
    let replaced = bytes.utf8_chunks().map(|chunk| chunk.invalid().len()).sum();
    Ok((String::from_utf8_lossy(&bytes).into_owned(), replaced))
}

/// Whether text may be cut before byte `at` without changing its tokens: where a line break
/// stands alone between two visible ASCII characters, `x\nW` (cut before `W`) or `x\r\nW`
/// (cut between `\r` and `\n`). GPT-2's pre-tokenizer splits there anyway, the whitespace
/// run being only the break (visible ASCII on both sides, so no Unicode space joins it), and
/// such a cut is a UTF-8 character boundary.
pub(crate) fn is_safe_cut(bytes: &[u8], at: usize) -> bool {
    if at < 2 || at + 1 >= bytes.len() {
        return false;
    }
    let unix = bytes[at - 1] == b'\n' && bytes[at - 2].is_ascii_graphic() && bytes[at].is_ascii_graphic();
    let windows = bytes[at - 1] == b'\r' && bytes[at] == b'\n' && bytes[at - 2].is_ascii_graphic() && bytes[at + 1].is_ascii_graphic();
    unix || windows
}

/// Token ids of a text. Long texts are cut into pieces at line starts that begin a word, where
/// the byte-level pre-tokenizer would split anyway, and encoded in parallel, a few pieces per
/// thread at a time: an encoding holds offsets and strings for every token, so encoding a
/// long text whole would take many times its size in memory.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    const PIECE: usize = 1 << 14;
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + PIECE).min(text.len());
        while end < text.len() && !is_safe_cut(text.as_bytes(), end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    let mut ids = Vec::with_capacity(text.len() / 3);
    for group in pieces.chunks(2 * rayon::current_num_threads()) {
        let encodings = tokenizer.encode_batch(group.to_vec(), false).map_err(|e| Error::Invalid(format!("tokenizing: {e}")))?;
        ids.extend(encodings.iter().flat_map(|e| e.get_ids().iter().copied()));
    }
    Ok(ids)
}

/// The text of token ids, special tokens such as `<|endoftext|>` included.
pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, false).map_err(|e| Error::Invalid(format!("detokenizing: {e}")))
}

/// The id of `<|endoftext|>`, if the tokenizer has it.
pub fn end_of_text_id(tokenizer: &Tokenizer) -> Option<u32> {
    tokenizer.token_to_id(END_OF_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level BPE tokenizer trained on `text`: its merges join what the text repeats, so a
    /// cut that splits a pre-tokenizer piece shows as other tokens.
    fn tokenizer_of(text: &str) -> Tokenizer {
        let alphabet: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let mut trainer = BpeTrainerBuilder::new().show_progress(false).vocab_size(400).initial_alphabet(alphabet).build();
        let mut tokenizer = byte_level_bpe(BPE::default()).unwrap();
        tokenizer.train(&mut trainer, [text.to_string()].into_iter()).unwrap();
        tokenizer.into()
    }

    #[test]
    fn text_cut_at_safe_places_has_the_tokens_of_the_whole_text() {
        // lines that end and start with every kind of character, Unicode spaces, CRLF
        let lines = [
            "the whale",
            "x\u{00A0}",
            "\u{3000}\u{3000}y",
            "tab\t",
            " leading",
            "café",
            "\x0bvt",
            "end.",
            "",
            "  ",
            "日本語",
            "x\r",
            "Word",
        ];
        let mut text = String::new();
        let mut i = 0usize;
        while text.len() < 60_000 {
            text += lines[i % lines.len()];
            text += if i.is_multiple_of(3) { "\r\n" } else { "\n" };
            i = i * 7 + 3;
            i %= 1_000_003;
        }
        let tokenizer = tokenizer_of(&text);
        let whole: Vec<u32> = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        let differs_at = |ids: &[u32]| ids.iter().zip(&whole).position(|(a, b)| a != b).or((ids.len() != whole.len()).then_some(0));
        assert_eq!(differs_at(&encode(&tokenizer, &text).unwrap()), None, "encoded in pieces: the first token that differs");
        let cuts = (0..text.len()).filter(|&at| is_safe_cut(text.as_bytes(), at)).count();
        assert!(cuts > 100, "{cuts} safe cuts");
        // every single safe cut
        for at in (0..text.len()).filter(|&at| is_safe_cut(text.as_bytes(), at)).step_by(53) {
            let (a, b) = text.split_at(at);
            let mut pieces = tokenizer.encode(a, false).unwrap().get_ids().to_vec();
            pieces.extend(tokenizer.encode(b, false).unwrap().get_ids());
            assert_eq!(differs_at(&pieces), None, "cut at byte {at}: the first token that differs");
        }
    }
}
