//! `data prepare`: a corpus streamed through the tokenizer into `train.bin` and `val.bin`, in
//! memory bounded by a block of text, whatever the corpus's size.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{tokenizer, tokens, write_atomically, TOKENIZER_FILE, TRAIN_FILE, VAL_FILE};
use crate::error::{Error, Result};
use crate::invalid;

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
    /// the process's peak resident memory, in bytes (Linux; 0 elsewhere)
    pub peak_rss_bytes: u64,
}

/// Text is read and tokenized in blocks of about this many bytes.
const BLOCK: usize = 4 << 20;

/// The fewest tokens a corpus may have.
const MIN_TOKENS: usize = 64;

/// Reads a file in blocks cut where the tokenizer would split anyway ([`tokenizer::is_safe_cut`]),
/// so that tokenizing the blocks one by one gives the tokens of the whole text.
struct TextBlocks {
    file: std::fs::File,
    path: PathBuf,
    pending: Vec<u8>,
    done: bool,
}

impl TextBlocks {
    fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::bad_file(path, "not a regular file (pass text files, not directories, pipes or devices)"));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(TextBlocks { file, path: path.into(), pending: Vec::new(), done: false })
    }

    /// The next block's bytes, or `None` at the end of the file.
    fn next_block(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if !self.done {
                let before = self.pending.len();
                self.pending.resize(before + BLOCK, 0);
                let read = read_full(&mut self.file, &mut self.pending[before..]).map_err(|e| Error::io(&self.path, e))?;
                self.pending.truncate(before + read);
                self.done = read == 0;
            }
            if self.done {
                return Ok((!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending)));
            }
            // the last cut in what is pending; without one, read more, up to a bound: text
            // without a line break in 32 MB is cut at a character boundary, where its tokens
            // may differ from those of the whole text
            let cut = (2..self.pending.len()).rev().find(|&i| tokenizer::is_safe_cut(&self.pending, i)).or_else(|| {
                (self.pending.len() >= 8 * BLOCK)
                    .then(|| (1..self.pending.len()).rev().find(|&i| (self.pending[i] as i8) >= -0x40))
                    .flatten()
            });
            if let Some(cut) = cut {
                let rest = self.pending.split_off(cut);
                return Ok(Some(std::mem::replace(&mut self.pending, rest)));
            }
        }
    }
}

/// Fills `buffer` as far as the reader allows; the count read (0 only at the end).
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Whether a file holds anything but whitespace (one that does not adds no document).
fn holds_text(path: &Path) -> Result<bool> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buffer = vec![0; 1 << 16];
    loop {
        let read = read_full(&mut file, &mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            return Ok(false);
        }
        if buffer[..read].iter().any(|b| !b.is_ascii_whitespace()) {
            return Ok(true);
        }
    }
}

/// Token ids appended to a token file as they come.
struct TokenWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    vocab_size: u32,
    width: usize,
    count: usize,
}

impl TokenWriter {
    fn create(path: &Path, vocab_size: u32) -> Result<Self> {
        // read back at the end, to copy the validation tail out
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| Error::io(path, e))?;
        let mut writer = TokenWriter { file: std::io::BufWriter::new(file), path: path.into(), vocab_size, width: 0, count: 0 };
        let header = tokens::encode(vocab_size, &[]);
        writer.width = tokens::width_of(vocab_size);
        writer.file.write_all(&header).map_err(|e| Error::io(path, e))?;
        Ok(writer)
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(Error::bad_file(&self.path, format!("the tokenizer made id {id}, outside its vocabulary of {}", self.vocab_size)));
        }
        let mut bytes = Vec::with_capacity(ids.len() * self.width);
        for &id in ids {
            if self.width == 2 {
                bytes.extend_from_slice(&(id as u16).to_le_bytes());
            } else {
                bytes.extend_from_slice(&id.to_le_bytes());
            }
        }
        self.file.write_all(&bytes).map_err(|e| Error::io(&self.path, e))?;
        self.count += ids.len();
        Ok(())
    }

    /// Flushes and syncs; the file and the number of tokens written.
    fn finish(self) -> Result<(std::fs::File, usize)> {
        let path = self.path.clone();
        let file = self.file.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok((file, self.count))
    }
}

/// Tokenizes the inputs (documents separated by `<|endoftext|>`), splits off the last
/// `val_fraction` as validation, and writes train.bin, val.bin and a copy of the tokenizer.
/// The text streams through in blocks, so memory stays bounded whatever the corpus's size; a
/// progress bar over the input bytes shows on stderr when `show_progress` is set.
pub fn prepare(
    tokenizer_path: &Path,
    inputs: &[PathBuf],
    out_dir: &Path,
    val_fraction: f64,
    show_progress: bool,
) -> Result<PrepareSummary> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return invalid!("--val-fraction {val_fraction} must be between 0 and 1 (exclusive)");
    }
    if inputs.is_empty() {
        return invalid!("no input files given (pass --input FILE...)");
    }
    let (tokenizer, tokenizer_json) = tokenizer::load_with_json(tokenizer_path)?;
    let existing = out_dir.join(TOKENIZER_FILE);
    if existing.exists() && super::read_file(&existing)? != tokenizer_json.as_bytes() {
        return Err(Error::bad_file(
            out_dir,
            "holds data made with another tokenizer; choose another --out (or delete it to prepare it again)",
        ));
    }
    let mut total_bytes = 0;
    for path in inputs {
        total_bytes += TextBlocks::open(path)?.file.metadata().map_err(|e| Error::io(path, e))?.len();
    }
    let vocab_size = tokenizer.get_vocab_size(true) as u32;
    let separator = tokenizer::end_of_text_id(&tokenizer);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    // every token goes to one staging file; the validation tail is copied out at the end
    let staging = out_dir.join(format!(".{TRAIN_FILE}.tmp-{}", std::process::id()));
    let val_staging = out_dir.join(format!(".{VAL_FILE}.tmp-{}", std::process::id()));
    let bar = if show_progress { indicatif::ProgressBar::new(total_bytes) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} | {bytes_per_sec} | eta {eta}").expect("valid template"),
    );
    let written = (|| -> Result<PrepareSummary> {
        let mut writer = TokenWriter::create(&staging, vocab_size)?;
        let mut replaced_bytes = 0;
        for path in inputs {
            if !holds_text(path)? {
                bar.inc(std::fs::metadata(path).map_or(0, |m| m.len()));
                continue;
            }
            let mut blocks = TextBlocks::open(path)?;
            while let Some(block) = blocks.next_block()? {
                replaced_bytes += block.utf8_chunks().map(|chunk| chunk.invalid().len()).sum::<usize>();
                writer.push(&tokenizer::encode(&tokenizer, &String::from_utf8_lossy(&block))?)?;
                bar.inc(block.len() as u64);
            }
            writer.push(separator.as_slice())?;
        }
        let width = writer.width;
        let (mut file, count) = writer.finish()?;
        if count < MIN_TOKENS {
            return invalid!("the corpus has {count} tokens; need at least {MIN_TOKENS} (the input files are empty or nearly so)");
        }
        let val_tokens = ((count as f64 * val_fraction).round() as usize).clamp(1, count - 1);
        let train_tokens = count - val_tokens;
        let train_bytes = (tokens::HEADER_LEN + train_tokens * width) as u64;
        // val.bin: the header, then the last val_tokens ids
        let mut val = std::fs::File::create(&val_staging).map_err(|e| Error::io(&val_staging, e))?;
        val.write_all(&tokens::encode(vocab_size, &[])).map_err(|e| Error::io(&val_staging, e))?;
        file.seek(SeekFrom::Start(train_bytes)).map_err(|e| Error::io(&staging, e))?;
        std::io::copy(&mut file, &mut val).map_err(|e| Error::io(&val_staging, e))?;
        val.sync_all().map_err(|e| Error::io(&val_staging, e))?;
        file.set_len(train_bytes).and_then(|()| file.sync_all()).map_err(|e| Error::io(&staging, e))?;
        std::fs::rename(&val_staging, out_dir.join(VAL_FILE)).map_err(|e| Error::io(out_dir.join(VAL_FILE), e))?;
        std::fs::rename(&staging, out_dir.join(TRAIN_FILE)).map_err(|e| Error::io(out_dir.join(TRAIN_FILE), e))?;
        write_atomically(&out_dir.join(TOKENIZER_FILE), tokenizer_json.as_bytes())?;
        Ok(PrepareSummary {
            train_tokens,
            val_tokens,
            vocab_size: vocab_size as usize,
            replaced_bytes,
            peak_rss_bytes: crate::bench::peak_rss_bytes(),
        })
    })();
    bar.finish_and_clear();
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
        let _ = std::fs::remove_file(&val_staging);
    }
    written
}
