//! Batches of training rows (T + n tokens each) cut from a token stream.
//!
//! The rows of training step k depend only on (seed, k): resuming at step k draws exactly the
//! batches an uninterrupted run would have drawn, with no sampler state to save.

use super::tokens::MappedTokens;
use crate::error::Result;
use crate::invalid;
use crate::tensor::Rng;

/// A batch of B rows: inputs x_0..x_{T−1} and, for each position t, its n targets x_{t+1..t+n}.
#[derive(Clone, Debug)]
pub struct Batch {
    /// (B·T)
    pub inputs: Vec<u32>,
    /// (B·T, n): targets[t·n + s] = y_s at position t
    pub targets: Vec<u32>,
    /// T, input positions per row
    pub seq: usize,
    /// n, targets per position
    pub horizon: usize,
}

impl Batch {
    /// Cuts rows of `T + n` tokens into inputs and targets.
    pub fn from_rows(rows: &[&[u32]], seq: usize, horizon: usize) -> Self {
        let mut inputs = Vec::with_capacity(rows.len() * seq);
        let mut targets = Vec::with_capacity(rows.len() * seq * horizon);
        for row in rows {
            assert_eq!(row.len(), seq + horizon, "a training row holds T + n tokens");
            inputs.extend_from_slice(&row[..seq]);
            for t in 0..seq {
                targets.extend_from_slice(&row[t + 1..t + 1 + horizon]);
            }
        }
        Batch { inputs, targets, seq, horizon }
    }

    /// B, the number of rows.
    pub fn rows(&self) -> usize {
        self.inputs.len() / self.seq
    }

    /// The rows cut into `parts` batches of equal size, in order (`parts` must divide B).
    pub fn split_rows(&self, parts: usize) -> Vec<Batch> {
        assert!(parts > 0 && self.rows().is_multiple_of(parts), "{parts} parts of {} rows", self.rows());
        let rows = self.rows() / parts;
        let (inputs, targets) = (rows * self.seq, rows * self.seq * self.horizon);
        (0..parts)
            .map(|i| Batch {
                inputs: self.inputs[i * inputs..(i + 1) * inputs].to_vec(),
                targets: self.targets[i * targets..(i + 1) * targets].to_vec(),
                seq: self.seq,
                horizon: self.horizon,
            })
            .collect()
    }

    /// Rank `rank`'s rows when `world` ranks share the batch out: the `rank`-th of `world` equal,
    /// contiguous parts (`world` must divide B). The mean of a per-row loss over the ranks'
    /// means is the mean over the whole batch.
    pub fn shard(&self, rank: usize, world: usize) -> Batch {
        assert!(rank < world, "rank {rank} of {world}");
        self.split_rows(world).swap_remove(rank)
    }
}

/// A stream of token ids that batches are cut from: a slice in memory, or a token file read
/// through a memory map.
pub trait TokenSource {
    /// The number of tokens.
    fn len(&self) -> usize;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Ids `start .. start + out.len()` into `out`.
    fn copy_into(&self, start: usize, out: &mut [u32]);
}

impl TokenSource for [u32] {
    fn len(&self) -> usize {
        <[u32]>::len(self)
    }
    fn copy_into(&self, start: usize, out: &mut [u32]) {
        out.copy_from_slice(&self[start..start + out.len()]);
    }
}

impl TokenSource for MappedTokens {
    fn len(&self) -> usize {
        MappedTokens::len(self)
    }
    fn copy_into(&self, start: usize, out: &mut [u32]) {
        MappedTokens::copy_into(self, start, out);
    }
}

/// Rows of `row_len` tokens starting at `offsets`, copied out of `tokens`, as one batch.
fn batch_at<S: TokenSource + ?Sized>(tokens: &S, offsets: &[usize], seq: usize, horizon: usize) -> Batch {
    let row_len = seq + horizon;
    let mut buffer = vec![0u32; offsets.len() * row_len];
    for (row, &offset) in buffer.chunks_mut(row_len).zip(offsets) {
        tokens.copy_into(offset, row);
    }
    let rows: Vec<&[u32]> = buffer.chunks(row_len).collect();
    Batch::from_rows(&rows, seq, horizon)
}

const BATCH_STREAM: u64 = 1;

fn check_length<S: TokenSource + ?Sized>(tokens: &S, seq: usize, horizon: usize, what: &str) -> Result<()> {
    if tokens.len() < seq + horizon {
        return invalid!(
            "{what} has {} tokens, fewer than one row of T + n = {} (use a smaller --seq or a larger corpus)",
            tokens.len(),
            seq + horizon
        );
    }
    Ok(())
}

/// The batch of training step `step`: `batch` rows at random offsets.
pub fn training_batch<S: TokenSource + ?Sized>(
    tokens: &S,
    batch: usize,
    seq: usize,
    horizon: usize,
    seed: u64,
    step: u64,
) -> Result<Batch> {
    check_length(tokens, seq, horizon, "the training split")?;
    let mut rng = Rng::for_stream(seed, BATCH_STREAM, step);
    let starts = tokens.len() - (seq + horizon) + 1;
    let offsets: Vec<usize> = (0..batch).map(|_| rng.below(starts)).collect();
    Ok(batch_at(tokens, &offsets, seq, horizon))
}

/// Fixed validation batches: consecutive rows (stride T) from the start, at most `max_batches`.
pub fn validation_batches<S: TokenSource + ?Sized>(
    tokens: &S,
    batch: usize,
    seq: usize,
    horizon: usize,
    max_batches: usize,
) -> Result<Vec<Batch>> {
    check_length(tokens, seq, horizon, "the validation split")?;
    let offsets: Vec<usize> = (0..=tokens.len() - (seq + horizon)).step_by(seq).take(batch * max_batches).collect();
    Ok(offsets.chunks(batch).map(|chunk| batch_at(tokens, chunk, seq, horizon)).collect())
}
