//! Batches of training rows (T + n tokens each) cut from a token stream.
//!
//! The rows of training step k depend only on (seed, k): resuming at step k draws exactly the
//! batches an uninterrupted run would have drawn, with no sampler state to save.

use crate::error::Result;
use crate::invalid;
use crate::model::Batch;
use crate::tensor::Rng;

const BATCH_STREAM: u64 = 1;

fn check_length(tokens: &[u32], seq: usize, horizon: usize, what: &str) -> Result<()> {
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
pub fn training_batch(tokens: &[u32], batch: usize, seq: usize, horizon: usize, seed: u64, step: u64) -> Result<Batch> {
    check_length(tokens, seq, horizon, "the training split")?;
    let mut rng = Rng::for_stream(seed, BATCH_STREAM, step);
    let starts = tokens.len() - (seq + horizon) + 1;
    let rows: Vec<&[u32]> = (0..batch).map(|_| rng.below(starts)).map(|o| &tokens[o..o + seq + horizon]).collect();
    Ok(Batch::from_rows(&rows, seq, horizon))
}

/// Fixed validation batches: consecutive rows (stride T) from the start, at most `max_batches`.
pub fn validation_batches(tokens: &[u32], batch: usize, seq: usize, horizon: usize, max_batches: usize) -> Result<Vec<Batch>> {
    check_length(tokens, seq, horizon, "the validation split")?;
    let offsets: Vec<usize> = (0..=tokens.len() - (seq + horizon)).step_by(seq).take(batch * max_batches).collect();
    Ok(offsets
        .chunks(batch)
        .map(|chunk| {
            let rows: Vec<&[u32]> = chunk.iter().map(|&o| &tokens[o..o + seq + horizon]).collect();
            Batch::from_rows(&rows, seq, horizon)
        })
        .collect())
}
