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

/// The bytes per id in a file of vocabulary `vocab_size`: 2 when the ids fit 16 bits, else 4.
pub fn width_of(vocab_size: u32) -> usize {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Encodes a token file; ids of 16 bits when the vocabulary allows, else 32.
pub fn encode(vocab_size: u32, tokens: &[u32]) -> Vec<u8> {
    let width = width_of(vocab_size) as u32;
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
    let (vocab_size, width) = read_header(path, &bytes[..bytes.len().min(HEADER_LEN)])?;
    let body = &bytes[HEADER_LEN..];
    if !body.len().is_multiple_of(width) {
        return Err(Error::bad_file(path, "truncated: the file ends inside a token; recreate it with `multitoken data prepare`"));
    }
    let mut tokens = vec![0u32; body.len() / width];
    decode_ids(body, width, &mut tokens);
    if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t >= vocab_size) {
        return Err(Error::bad_file(
            path,
            format!("token {i} has id {t}, outside the vocabulary of {vocab_size}; recreate it with `multitoken data prepare`"),
        ));
    }
    Ok(TokenFile { vocab_size, tokens })
}

/// The header's fields, checked: (V, width in bytes).
fn read_header(path: &Path, header: &[u8]) -> Result<(u32, usize)> {
    let bad = |message: String| Error::bad_file(path, format!("{message}; recreate it with `multitoken data prepare`"));
    if header.len() < HEADER_LEN || &header[..4] != MAGIC {
        return Err(bad("not a multitoken token file (bad magic)".into()));
    }
    let field = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
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
    Ok((vocab_size, width as usize))
}

/// Token ids decoded from little-endian bytes of `width` 2 or 4 into `out`.
fn decode_ids(bytes: &[u8], width: usize, out: &mut [u32]) {
    if width == 2 {
        for (id, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *id = u16::from_le_bytes([b[0], b[1]]) as u32;
        }
    } else {
        for (id, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *id = u32::from_le_bytes(b.try_into().unwrap());
        }
    }
}

/// A token file read through a memory map: ids are decoded where a batch needs them, so a
/// corpus larger than memory trains, and only the pages touched are resident.
pub struct MappedTokens {
    map: memmap2::Mmap,
    width: usize,
    vocab_size: u32,
    len: usize,
}

impl MappedTokens {
    /// Opens and checks a token file: the header, the length, and every id against V, read in
    /// blocks, so the check costs no more memory than a block.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::bad_file(path, "not a regular file; recreate it with `multitoken data prepare`"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a change to the file by another process while it is
        // mapped could change the ids read, which the same change to a file read whole would too.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (vocab_size, width) = read_header(path, &map[..map.len().min(HEADER_LEN)])?;
        let body = &map[HEADER_LEN..];
        if !body.len().is_multiple_of(width) {
            return Err(Error::bad_file(path, "truncated: the file ends inside a token; recreate it with `multitoken data prepare`"));
        }
        let tokens = Self { len: body.len() / width, map, width, vocab_size };
        // the check reads the file, not the map: pages it reads stay in the kernel's cache
        // and never count as this process's memory
        const BLOCK: usize = 1 << 18;
        let mut reader = std::io::BufReader::new(file);
        reader.seek_relative(HEADER_LEN as i64).map_err(|e| Error::io(path, e))?;
        let (mut bytes, mut ids) = (vec![0u8; BLOCK * width], vec![0u32; BLOCK]);
        for start in (0..tokens.len).step_by(BLOCK) {
            let count = BLOCK.min(tokens.len - start);
            std::io::Read::read_exact(&mut reader, &mut bytes[..count * width]).map_err(|e| Error::io(path, e))?;
            decode_ids(&bytes[..count * width], width, &mut ids[..count]);
            if let Some(i) = ids[..count].iter().position(|&t| t >= vocab_size) {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "token {} has id {}, outside the vocabulary of {vocab_size}; recreate it with `multitoken data prepare`",
                        start + i,
                        ids[i]
                    ),
                ));
            }
        }
        Ok(tokens)
    }

    /// V, from the header.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ids `start .. start + out.len()` into `out`.
    pub fn copy_into(&self, start: usize, out: &mut [u32]) {
        let from = HEADER_LEN + start * self.width;
        decode_ids(&self.map[from..from + out.len() * self.width], self.width, out);
    }
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
