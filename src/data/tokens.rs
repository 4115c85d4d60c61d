//! Token files (`train.bin`, `val.bin`): a 16-byte header, then little-endian token ids.
//!
//! | bytes  | field                                     |
//! |--------|-------------------------------------------|
//! | 0..4   | magic `MTOK`                              |
//! | 4..8   | format version, u32 LE (1)                |
//! | 8..12  | vocabulary size V, u32 LE                 |
//! | 12..16 | token width in bytes, u32 LE (2 or 4)     |
//! | 16..   | token ids, each `width` bytes LE, all < V |

use std::path::Path;

use crate::error::{Error, Result};

/// The first four bytes of every token file.
pub const MAGIC: &[u8; 4] = b"MTOK";
/// The format version this program writes and reads.
pub const VERSION: u32 = 1;
/// The header's size in bytes; token ids follow it.
pub const HEADER_LEN: usize = 16;

/// A token file's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFile {
    /// V, from the header; every id is below it
    pub vocab_size: u32,
    /// the token ids, in file order
    pub tokens: Vec<u32>,
}

/// Encodes a token file; ids of 16 bits when the vocabulary allows, else 32.
pub fn encode(vocab_size: u32, tokens: &[u32]) -> Vec<u8> {
    let width: u32 = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let mut bytes = Vec::with_capacity(HEADER_LEN + tokens.len() * width as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&vocab_size.to_le_bytes());
    bytes.extend_from_slice(&width.to_le_bytes());
    for &t in tokens {
        if width == 2 {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    bytes
}

/// Decodes and checks a token file's bytes; `path` only names it in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<TokenFile> {
    let bad = |message: String| Error::bad_file(path, format!("{message}; recreate it with `multitoken data prepare`"));
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err(bad("not a multitoken token file (bad magic)".into()));
    }
    let field = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let (version, vocab_size, width) = (field(4), field(8), field(12));
    if version != VERSION {
        return Err(bad(format!("token file version {version}, this program reads version {VERSION}")));
    }
    if width != 2 && width != 4 {
        return Err(bad(format!("token width {width} bytes (expected 2 or 4)")));
    }
    let max_vocab = crate::data::tokenizer::MAX_VOCAB_SIZE;
    if vocab_size < 2 || vocab_size as usize > max_vocab {
        return Err(bad(format!("the header's vocabulary size {vocab_size} is outside 2..={max_vocab}")));
    }
    let body = &bytes[HEADER_LEN..];
    if !body.len().is_multiple_of(width as usize) {
        return Err(bad("truncated: the file ends inside a token".into()));
    }
    let tokens: Vec<u32> = if width == 2 {
        body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect()
    } else {
        body.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t >= vocab_size) {
        return Err(bad(format!("token {i} has id {t}, outside the vocabulary of {vocab_size}")));
    }
    Ok(TokenFile { vocab_size, tokens })
}

/// Reads and checks a token file.
pub fn read(path: &Path) -> Result<TokenFile> {
    decode(path, &crate::data::read_file(path)?)
}

/// Writes atomically: a temporary file in the same directory, then a rename.
pub fn write(path: &Path, vocab_size: u32, tokens: &[u32]) -> Result<()> {
    crate::data::write_atomically(path, &encode(vocab_size, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_round_trip_in_both_widths() {
        for vocab in [300u32, 70_000] {
            let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919) % vocab).collect();
            let bytes = encode(vocab, &tokens);
            assert_eq!(decode(Path::new("x"), &bytes).unwrap(), TokenFile { vocab_size: vocab, tokens });
        }
    }

    #[test]
    fn corrupt_token_files_are_refused_with_a_reason() {
        let good = encode(300, &[1, 2, 3]);
        let check = |bytes: &[u8], expected: &str| {
            let message = decode(Path::new("t.bin"), bytes).unwrap_err().to_string();
            assert!(message.contains(expected), "{message}");
        };
        check(b"nope", "bad magic");
        check(&good[..good.len() - 1], "truncated");
        let mut out_of_range = good.clone();
        out_of_range[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&400u16.to_le_bytes());
        check(&out_of_range, "outside the vocabulary");
        let mut future = good.clone();
        future[4] = 9;
        check(&future, "version 9");
        let mut huge_vocabulary = good;
        huge_vocabulary[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&huge_vocabulary, "vocabulary size 4294967295");
    }
}
