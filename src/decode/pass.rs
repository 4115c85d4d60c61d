//! A decoding pass: the GPT-2 backbone over m new tokens with a KV cache, written once for
//! every device. [`pass`] is the layer sequence (docs/math.md, "The model"); a device supplies
//! the kernels ([`PassKernels`]) and decides how they run: the CPU as a team of threads, each
//! taking its share of every step (`kv_cache.rs`), a GPU as kernels recorded into a graph once
//! and replayed (`cuda.rs`). The pass reads and writes the device's own buffers: the residual
//! stream x (m, C), the attention's input qkv and output, the MLP's hidden activations, and the
//! hidden states h (m, C) it ends with.
//!
//! A device that keeps the whole speculative step (drafts, targets, acceptance) runs its own
//! kernels after the pass over the same buffers: `decode::generate::StepEngine`.

use crate::error::Result;

/// The linear layers of a transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Linear {
    /// `attn.c_attn`: ln_1(x) → q, k, v
    Qkv,
    /// `attn.c_proj`: the attention's output → the residual stream
    AttentionOut,
    /// `mlp.c_fc`: ln_2(x) → the hidden activations (GELU)
    MlpUp,
    /// `mlp.c_proj`: the hidden activations → the residual stream
    MlpDown,
}

/// The kernels of a decoding pass, as one device runs them over its buffers.
pub trait PassKernels {
    /// `x = wte[tokens] + wpe[positions of the new rows]`
    fn embed(&mut self) -> Result<()>;
    /// A sublayer's input: qkv = ln_1(x) · W + b for [`Linear::Qkv`], and
    /// hidden = gelu(ln_2(x) · W + b) for [`Linear::MlpUp`].
    fn layernorm_linear(&mut self, layer: usize, linear: Linear) -> Result<()>;
    /// The new rows' keys and values into the layer's cache, and the attention of their queries
    /// over it, row i seeing the cached positions and the new rows up to i.
    fn attend(&mut self, layer: usize) -> Result<()>;
    /// A sublayer's output into the residual stream: x += y · W + b, y the attention's output
    /// for [`Linear::AttentionOut`] and the hidden activations for [`Linear::MlpDown`].
    fn add_linear(&mut self, layer: usize, linear: Linear) -> Result<()>;
    /// h = ln_f(x)
    fn final_layernorm(&mut self) -> Result<()>;
}

/// The pass over `n_layer` blocks.
pub fn pass(kernels: &mut impl PassKernels, n_layer: usize) -> Result<()> {
    kernels.embed()?;
    for layer in 0..n_layer {
        // x += attn(ln_1(x))
        kernels.layernorm_linear(layer, Linear::Qkv)?;
        kernels.attend(layer)?;
        kernels.add_linear(layer, Linear::AttentionOut)?;
        // x += mlp(ln_2(x))
        kernels.layernorm_linear(layer, Linear::MlpUp)?;
        kernels.add_linear(layer, Linear::MlpDown)?;
    }
    kernels.final_layernorm()
}

/// A backbone with a KV cache, as the decoding loop sees it: new tokens in, their hidden states
/// (m, C) out; rollback by truncation. On the CPU `kv_cache::CachedBackbone`, on a GPU
/// `cuda::GpuDecoder`'s backbone; both run [`pass`]. One sequence of a [`BatchBackbone`] is one
/// too ([`OneSequence`]).
pub trait Backbone<T> {
    /// Runs `tokens` at the next positions, appends their keys and values to the cache, and
    /// returns their final hidden states h (m, C), after ln_f.
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<T>>;
    /// Keeps the first `len` positions of the cache and forgets the rest (a rollback).
    fn truncate(&mut self, len: usize);
    /// positions in the cache
    fn positions(&self) -> usize;
}

/// The caches of several sequences behind one backbone, as batched decoding sees them: one pass
/// runs every sequence's new tokens stacked, so that each linear layer reads its weights once
/// for all of them, while each sequence attends over its own cache at its own positions.
pub trait BatchBackbone<T> {
    /// How many sequences it holds a cache for.
    fn sequences(&self) -> usize;
    /// One pass over `runs[i]` at sequence i's next positions, for every i (an empty run leaves
    /// its sequence as it was; sequences past the last run too). Returns each run's hidden
    /// states (m_i, C), after ln_f.
    fn forward_batch(&mut self, runs: &[&[u32]]) -> Result<Vec<Vec<T>>>;
    /// Keeps the first `len` positions of sequence `sequence`'s cache (a rollback).
    fn truncate_sequence(&mut self, sequence: usize, len: usize);
    /// positions in sequence `sequence`'s cache
    fn sequence_positions(&self, sequence: usize) -> usize;
}

/// One sequence of a [`BatchBackbone`], as a [`Backbone`] of its own: its passes run that
/// sequence alone (a batch's prefill, a rebuilt window, every step of its verification).
pub struct OneSequence<'b, T> {
    /// the backbone of every sequence
    pub backbone: &'b mut dyn BatchBackbone<T>,
    /// which of its sequences this is
    pub sequence: usize,
}

impl<T> Backbone<T> for OneSequence<'_, T> {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<T>> {
        let mut runs = vec![&[][..]; self.sequence + 1];
        runs[self.sequence] = tokens;
        Ok(self.backbone.forward_batch(&runs)?.swap_remove(self.sequence))
    }

    fn truncate(&mut self, len: usize) {
        self.backbone.truncate_sequence(self.sequence, len);
    }

    fn positions(&self) -> usize {
        self.backbone.sequence_positions(self.sequence)
    }
}
