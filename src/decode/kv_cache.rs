//! The GPT-2 backbone for decoding on the CPU: a KV cache per layer, new tokens appended,
//! rollback by truncation, each pass [`pass::pass`](super::pass::pass) with the kernels of this
//! file. Inference only (no tape), the same math as `model::gpt2` (docs/math.md, "The model").
//!
//! It can hold several sequences, each with its own cache: a pass then stacks the new tokens of
//! all of them, so that every linear layer reads its weights once for the whole batch, and only
//! the attention looks at each sequence's cache on its own (docs/decoding.md, "Several prompts
//! at once").
//!
//! A pass of a few tokens runs as a team of threads (`kernels::team`): every thread runs the
//! whole pass, taking its share of each step (its heads of the attention, its columns of each
//! linear layer), and the threads meet at a barrier wherever a step reads what the others
//! wrote. A longer pass (a prompt, or a stack of more than 16 rows from several sequences) runs
//! on one thread whose products use the whole pool; a stack's products then keep to the
//! few-row kernel, 16 rows at a time, so that each row comes out as it would alone.

use std::ops::Range;

use super::pass::{pass, Backbone, BatchBackbone, Linear, PassKernels};
use crate::error::Result;
use crate::kernels::gemm::Layout;
use crate::kernels::team::{together, SharedRows, Team, TEAM_ROWS};
use crate::kernels::SharedMut;
use crate::model::params::BlockParams;
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// Keys and values of one layer, head by head: (H, n_positions, hs) each, so that a head's keys
/// form one contiguous matrix; positions 0..len are filled.
struct LayerCache<T> {
    keys: Vec<T>,
    values: Vec<T>,
}

/// One sequence's KV cache: every layer's, filled up to `len` positions.
struct SequenceCache<T> {
    layers: Vec<LayerCache<T>>,
    len: usize,
}

/// The backbone for decoding on the CPU: the model's weights (the linear layers' transposed to
/// (out, in)) and the KV caches of one or more sequences.
pub struct CachedBackbone<'a, T: Float> {
    config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    /// each block's four weight matrices, transposed to (out, in), in the order of [`Linear`]
    weights: Vec<[TransposedWeight<T>; 4]>,
    sequences: Vec<SequenceCache<T>>,
}

/// One sequence's part of a pass: its new tokens are rows `first..first + m` of the stacked
/// buffers, at positions `p0..p0 + m` of its cache.
#[derive(Clone, Copy)]
struct RunRows {
    sequence: usize,
    first: usize,
    m: usize,
    p0: usize,
}

/// A weight matrix stored (out, in): decoding multiplies a few rows by it, and then each output
/// is a dot product over a contiguous row, read front to back. The checkpoint's Conv1D layout
/// (in, out) would make every step of that product jump a whole row ahead in memory.
struct TransposedWeight<T> {
    transposed: Vec<T>,
    n_in: usize,
}

impl<T: Float> TransposedWeight<T> {
    fn new(weight: &Tensor<T>) -> Self {
        let (n_in, n_out) = (weight.shape()[0], weight.shape()[1]);
        let w = weight.data();
        let transposed = (0..n_out * n_in).map(|i| w[(i % n_in) * n_out + i / n_in]).collect();
        TransposedWeight { transposed, n_in }
    }

    /// Output columns `columns` of `x (m, n_in) · W + b`, laid out (m, |columns|). A team of
    /// one computes them with `matmul` (a GEMM on every thread for a long prompt, the few-row
    /// kernel for a few rows), or `by_rows` with the few-row kernel only (a stack of several
    /// sequences); a thread of a larger team with the few-row kernel on its own. On a few rows
    /// each output then adds the same terms in the same order, whoever computes it.
    fn apply(&self, team: &Team, x: &[T], bias: &Tensor<T>, columns: Range<usize>, by_rows: bool) -> Vec<T> {
        let (m, width) = (x.len() / self.n_in, columns.len());
        let mut out = bias.data()[columns.clone()].repeat(m);
        let weight = &self.transposed[columns.start * self.n_in..columns.end * self.n_in];
        if by_rows {
            team.product_by_rows(x, weight, Layout::Transposed, &mut out, m, self.n_in, width, true);
        } else {
            team.product(x, weight, Layout::Transposed, &mut out, m, self.n_in, width, true);
        }
        out
    }
}

fn layernorm_rows<T: Float>(x: &[T], weight: &Tensor<T>, bias: &Tensor<T>) -> Vec<T> {
    let c = weight.len();
    let mut out = vec![T::zero(); x.len()];
    for (o, row) in out.chunks_mut(c).zip(x.chunks(c)) {
        T::layernorm_row(row, weight.data(), bias.data(), o);
    }
    out
}

impl<'a, T: Float> CachedBackbone<'a, T> {
    /// An empty cache of one sequence for the model `params`, with room for n_positions tokens.
    pub fn new(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>) -> Self {
        Self::with_sequences(config, params, 1)
    }

    /// Empty caches for `count` sequences, decoded together by [`forward_batch`](Self::forward_batch).
    pub fn with_sequences(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>, count: usize) -> Self {
        let size = config.n_positions * config.n_embd;
        let empty = || SequenceCache {
            layers: (0..config.n_layer).map(|_| LayerCache { keys: vec![T::zero(); size], values: vec![T::zero(); size] }).collect(),
            len: 0,
        };
        let weights = params
            .blocks
            .iter()
            .map(|b| [&b.attn_c_attn_weight, &b.attn_c_proj_weight, &b.mlp_c_fc_weight, &b.mlp_c_proj_weight].map(TransposedWeight::new))
            .collect();
        CachedBackbone { config, params, weights, sequences: (0..count).map(|_| empty()).collect() }
    }

    /// The cache of a backbone of one sequence.
    fn only(&self) -> &SequenceCache<T> {
        assert_eq!(self.sequences.len(), 1, "a backbone of several sequences is asked by sequence");
        &self.sequences[0]
    }

    /// Positions held in the cache (of a backbone of one sequence).
    pub fn len(&self) -> usize {
        self.only().len
    }

    /// Whether the cache holds no positions (of a backbone of one sequence).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room left before n_positions (in a backbone of one sequence).
    pub fn room(&self) -> usize {
        self.config.n_positions - self.len()
    }

    /// Forgets every position from `len` on (rollback of rejected drafts; a backbone of one
    /// sequence).
    pub fn truncate(&mut self, len: usize) {
        self.only();
        self.truncate_sequence(0, len);
    }

    /// Forgets every position from `len` on in sequence `sequence`'s cache.
    pub fn truncate_sequence(&mut self, sequence: usize, len: usize) {
        let cache = &mut self.sequences[sequence];
        assert!(len <= cache.len, "truncate beyond the cache");
        cache.len = len;
    }

    /// Runs `tokens` at the next positions of the (only) sequence and appends their keys and
    /// values. Returns the final hidden states h (after ln_f), (m, C).
    pub fn forward(&mut self, tokens: &[u32]) -> Vec<T> {
        self.only();
        self.forward_batch(&[tokens]).remove(0)
    }

    /// One pass over the new tokens of the sequences (`runs[i]` for sequence i, possibly none;
    /// sequences past the last run run nothing), each at its next positions. Returns each run's
    /// final hidden states (m_i, C).
    pub fn forward_batch(&mut self, runs: &[&[u32]]) -> Vec<Vec<T>> {
        assert!(runs.len() <= self.sequences.len(), "a run of tokens for a sequence the backbone does not hold");
        let c = self.config.n_embd;
        let mut rows = Vec::with_capacity(runs.len());
        let mut first = 0;
        for (sequence, run) in runs.iter().enumerate() {
            let p0 = self.sequences[sequence].len;
            assert!(p0 + run.len() <= self.config.n_positions, "the cache holds n_positions tokens at most");
            if !run.is_empty() {
                rows.push(RunRows { sequence, first, m: run.len(), p0 });
            }
            first += run.len();
        }
        let (tokens, m): (Vec<u32>, usize) = (runs.concat(), first);
        let (mut x, mut attended, mut activated, mut hidden) =
            (vec![T::zero(); m * c], vec![T::zero(); m * c], vec![T::zero(); m * 4 * c], vec![T::zero(); m * c]);
        let buffers = PassBuffers {
            x: SharedRows::new(&mut x, c),
            attended: SharedRows::new(&mut attended, c),
            activated: SharedRows::new(&mut activated, 4 * c),
            hidden: SharedRows::new(&mut hidden, c),
        };
        let caches: Vec<Vec<(SharedMut<T>, SharedMut<T>)>> = self
            .sequences
            .iter_mut()
            .map(|s| s.layers.iter_mut().map(|l| (SharedMut::new(l.keys.as_mut_ptr()), SharedMut::new(l.values.as_mut_ptr()))).collect())
            .collect();
        let run = |team: &Team| {
            let mut kernels = TeamKernels {
                team,
                config: self.config,
                params: self.params,
                weights: &self.weights,
                caches: &caches,
                buffers: &buffers,
                tokens: &tokens,
                rows: &rows,
                stacked: rows.len() > 1,
                queries_keys_values: Vec::new(),
            };
            // the CPU's kernels return no errors
            pass(&mut kernels, self.config.n_layer).expect("a CPU decoding pass");
        };
        // a pass of a few tokens as a team, even of a small model: the team's helpers are
        // awake, so it starts in about a microsecond (`kernels::team`)
        if m <= TEAM_ROWS {
            together(run);
        } else {
            run(&Team::solo());
        }
        for (sequence, run) in runs.iter().enumerate() {
            self.sequences[sequence].len += run.len();
        }
        if runs.len() == 1 {
            // one sequence (every pass of `decode`): its rows are the whole buffer
            return vec![hidden];
        }
        let mut rest = hidden.as_slice();
        runs.iter()
            .map(|run| {
                let (mine, after) = rest.split_at(run.len() * c);
                rest = after;
                mine.to_vec()
            })
            .collect()
    }
}

/// One pass's buffers, shared by the team (m the rows of every sequence, stacked): the residual
/// stream x (m, C), the attention's output before its projection (m, C), the MLP's hidden
/// activations (m, 4C) and the final hidden states (m, C). Each thread writes its own columns
/// (or rows) of them, and reads them whole only after the barrier that follows the writes.
struct PassBuffers<T> {
    x: SharedRows<T>,
    attended: SharedRows<T>,
    activated: SharedRows<T>,
    hidden: SharedRows<T>,
}

/// The CPU's kernels as one thread of a team runs them: its share of each step.
struct TeamKernels<'a, T: Float> {
    team: &'a Team<'a>,
    config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    weights: &'a [[TransposedWeight<T>; 4]],
    /// each sequence's caches of every layer, (H, n_positions, hs) keys and values
    caches: &'a [Vec<(SharedMut<T>, SharedMut<T>)>],
    buffers: &'a PassBuffers<T>,
    /// every sequence's new tokens, stacked
    tokens: &'a [u32],
    /// which rows belong to which sequence, and at what positions
    rows: &'a [RunRows],
    /// whether the rows are several sequences': then every product keeps to the few-row kernel
    stacked: bool,
    /// this thread's heads' q, k and v of the current layer (m, |heads|·hs) each, one after the
    /// other: from `layernorm_linear(Qkv)` to `attend`
    queries_keys_values: Vec<T>,
}

impl<T: Float> TeamKernels<'_, T> {
    fn block(&self, layer: usize) -> &BlockParams<Tensor<T>> {
        &self.params.blocks[layer]
    }

    fn weight(&self, layer: usize, linear: Linear) -> &TransposedWeight<T> {
        let index = [Linear::Qkv, Linear::AttentionOut, Linear::MlpUp, Linear::MlpDown].iter().position(|&l| l == linear).expect("four");
        &self.weights[layer][index]
    }

    /// This thread's heads, and their columns in q (k, v) of a (m, C) matrix.
    fn heads(&self) -> (Range<usize>, Range<usize>) {
        let heads = self.team.share(self.config.n_head, 1);
        let hs = self.config.head_size();
        (heads.clone(), heads.start * hs..heads.end * hs)
    }

    /// One sequence's attention for this thread's heads: its new keys and values into its cache
    /// of `layer`, then each new row i (position p0 + i) over positions 0..=p0 + i.
    fn attend_one(&self, layer: usize, run: &RunRows, queries: &[T], new_keys: &[T], new_values: &[T], attended: &mut [T]) {
        let config = self.config;
        let (m, p0) = (run.m, run.p0);
        let (hs, positions) = (config.head_size(), config.n_positions);
        let (heads, columns) = self.heads();
        let width = columns.len();
        // this thread's heads' caches: (heads, n_positions, hs) each
        let (keys, values) = self.caches[run.sequence][layer];
        let cache_range = heads.start * positions * hs..heads.end * positions * hs;
        // SAFETY: a sequence's cache is written only by the threads that own its heads, each
        // its own heads' range, and a sequence runs once a pass
        let (head_keys, head_values) = unsafe {
            (
                std::slice::from_raw_parts_mut(keys.get().add(cache_range.start), cache_range.len()),
                std::slice::from_raw_parts_mut(values.get().add(cache_range.start), cache_range.len()),
            )
        };
        for i in 0..m {
            for (h, local) in heads.clone().zip(0..) {
                let at = (local * positions + p0 + i) * hs;
                let from = i * width + (h - heads.start) * hs;
                head_keys[at..at + hs].copy_from_slice(&new_keys[from..from + hs]);
                head_values[at..at + hs].copy_from_slice(&new_values[from..from + hs]);
            }
        }
        let scale = T::one() / T::of(hs as f64).sqrt();
        let visible_keys = p0 + m;
        let mut query = vec![T::zero(); m * hs];
        let mut scores = vec![T::zero(); m * visible_keys];
        let mut head_out = vec![T::zero(); m * hs];
        for local in 0..heads.len() {
            for i in 0..m {
                query[i * hs..(i + 1) * hs].copy_from_slice(&queries[i * width + local * hs..][..hs]);
            }
            let k = &head_keys[local * positions * hs..(local * positions + visible_keys) * hs];
            let v = &head_values[local * positions * hs..(local * positions + visible_keys) * hs];
            // S = q Kᵀ / √hs, masked causally, softmax by row; out = P V
            self.team.product(&query, k, Layout::Transposed, &mut scores, m, hs, visible_keys, false);
            for (i, row) in scores.chunks_mut(visible_keys).enumerate() {
                let visible = p0 + i + 1;
                row[..visible].iter_mut().for_each(|x| *x *= scale);
                T::softmax_row(&mut row[..visible]);
                row[visible..].fill(T::zero());
            }
            self.team.product(&scores, v, Layout::Normal, &mut head_out, m, visible_keys, hs, false);
            for i in 0..m {
                attended[i * width + local * hs..][..hs].copy_from_slice(&head_out[i * hs..(i + 1) * hs]);
            }
        }
    }
}

// SAFETY (for every method): all threads of the team run the same pass, so they meet at the same
// barriers; each writes only its own columns (rows) of a shared buffer, and reads a buffer whole
// only after the barrier that follows the writes to it.
impl<T: Float> PassKernels for TeamKernels<'_, T> {
    fn embed(&mut self) -> Result<()> {
        let c = self.config.n_embd;
        let (wte, wpe) = (self.params.wte.data(), self.params.wpe.data());
        let columns = self.team.share(c, 16);
        let mut x = Vec::with_capacity(self.tokens.len() * columns.len());
        for run in self.rows {
            for (i, &token) in self.tokens[run.first..run.first + run.m].iter().enumerate() {
                let (te, pe) = (&wte[token as usize * c..][columns.clone()], &wpe[(run.p0 + i) * c..][columns.clone()]);
                x.extend(te.iter().zip(pe).map(|(&a, &b)| a + b));
            }
        }
        unsafe { self.buffers.x.write_columns(0, columns, &x, false) };
        self.team.sync();
        Ok(())
    }

    fn layernorm_linear(&mut self, layer: usize, linear: Linear) -> Result<()> {
        let (c, block) = (self.config.n_embd, self.block(layer));
        let x = unsafe { self.buffers.x.read() };
        match linear {
            Linear::Qkv => {
                // this thread's heads' queries, keys and values
                let a = layernorm_rows(x, &block.ln_1_weight, &block.ln_1_bias);
                let (_, columns) = self.heads();
                let weight = self.weight(layer, Linear::Qkv);
                let part = |offset: usize| {
                    weight.apply(self.team, &a, &block.attn_c_attn_bias, offset + columns.start..offset + columns.end, self.stacked)
                };
                self.queries_keys_values = [part(0), part(c), part(2 * c)].concat();
            }
            Linear::MlpUp => {
                // this thread's hidden units
                let normed = layernorm_rows(x, &block.ln_2_weight, &block.ln_2_bias);
                let columns = self.team.share(4 * c, 16);
                let hidden =
                    self.weight(layer, Linear::MlpUp).apply(self.team, &normed, &block.mlp_c_fc_bias, columns.clone(), self.stacked);
                let mut activated = vec![T::zero(); hidden.len()];
                T::gelu_forward(&hidden, &mut activated);
                unsafe { self.buffers.activated.write_columns(0, columns, &activated, false) };
                self.team.sync();
            }
            other => unreachable!("{other:?} is not a sublayer's input"),
        }
        Ok(())
    }

    fn attend(&mut self, layer: usize) -> Result<()> {
        let m_all = self.tokens.len();
        let (_, columns) = self.heads();
        let width = columns.len();
        let (queries, rest) = self.queries_keys_values.split_at(m_all * width);
        let (new_keys, new_values) = rest.split_at(m_all * width);
        let mut attended = vec![T::zero(); m_all * width];
        for run in self.rows {
            // this sequence's rows of q, k, v and of the output, (m, |heads|·hs) each
            let rows = run.first * width..(run.first + run.m) * width;
            let (q, k, v) = (&queries[rows.clone()], &new_keys[rows.clone()], &new_values[rows.clone()]);
            self.attend_one(layer, run, q, k, v, &mut attended[rows]);
        }
        unsafe { self.buffers.attended.write_columns(0, columns, &attended, false) };
        self.team.sync();
        Ok(())
    }

    fn add_linear(&mut self, layer: usize, linear: Linear) -> Result<()> {
        let block = self.block(layer);
        let (input, bias) = match linear {
            Linear::AttentionOut => (&self.buffers.attended, &block.attn_c_proj_bias),
            Linear::MlpDown => (&self.buffers.activated, &block.mlp_c_proj_bias),
            other => unreachable!("{other:?} is not a sublayer's output"),
        };
        // x += y · W + b, this thread's columns
        let columns = self.team.share(self.config.n_embd, 16);
        let projected = self.weight(layer, linear).apply(self.team, unsafe { input.read() }, bias, columns.clone(), self.stacked);
        unsafe { self.buffers.x.write_columns(0, columns, &projected, true) };
        self.team.sync();
        Ok(())
    }

    fn final_layernorm(&mut self) -> Result<()> {
        let c = self.config.n_embd;
        let x = unsafe { self.buffers.x.read() };
        for row in self.team.share(self.tokens.len(), 1) {
            let out = unsafe { self.buffers.hidden.row_mut(row) };
            T::layernorm_row(&x[row * c..(row + 1) * c], self.params.ln_f_weight.data(), self.params.ln_f_bias.data(), out);
        }
        self.team.sync();
        Ok(())
    }
}

impl<T: Float> Backbone<T> for CachedBackbone<'_, T> {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<T>> {
        Ok(CachedBackbone::forward(self, tokens))
    }

    fn truncate(&mut self, len: usize) {
        CachedBackbone::truncate(self, len);
    }

    fn positions(&self) -> usize {
        CachedBackbone::len(self)
    }
}

impl<T: Float> BatchBackbone<T> for CachedBackbone<'_, T> {
    fn sequences(&self) -> usize {
        self.sequences.len()
    }

    fn forward_batch(&mut self, runs: &[&[u32]]) -> Result<Vec<Vec<T>>> {
        Ok(CachedBackbone::forward_batch(self, runs))
    }

    fn truncate_sequence(&mut self, sequence: usize, len: usize) {
        CachedBackbone::truncate_sequence(self, sequence, len);
    }

    fn sequence_positions(&self, sequence: usize) -> usize {
        self.sequences[sequence].len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
    use crate::decode::pass::OneSequence;
    use crate::model::gpt2;
    use crate::tensor::Rng;

    #[test]
    fn cached_hidden_states_equal_a_full_forward_at_every_position() {
        let config = ModelConfig { vocab_size: 40, n_positions: 24, n_embd: 16, n_layer: 2, n_head: 4, horizon: 1, rank: 1 };
        let mut rng = Rng::new(3);
        let params = gpt2::init_params::<f64>(&config, &mut rng);
        let tokens: Vec<u32> = (0..20).map(|_| rng.below(40) as u32).collect();
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, &config, &params, |_| false);
        let full = gpt2::hidden_states(&mut tape, &config, &vars, &tokens, tokens.len()).unwrap();
        let full = tape.value(full).data().to_vec();
        // feed in uneven pieces, with a rollback in the middle
        let mut cache = CachedBackbone::new(&config, &params);
        let mut cached = cache.forward(&tokens[..7]);
        cache.forward(&tokens[7..10]);
        cache.truncate(7);
        cached.extend(cache.forward(&tokens[7..12]));
        cached.extend(cache.forward(&tokens[12..13]));
        cached.extend(cache.forward(&tokens[13..]));
        let worst = full.iter().zip(&cached).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert_eq!(cached.len(), full.len());
        assert!(worst < 1e-12, "cached and full forward differ by {worst}");
    }

    #[test]
    fn a_batch_of_sequences_gives_each_the_hidden_states_it_gets_alone() {
        // three sequences of different lengths, passes of a few rows (a team) and of many (the
        // products on the whole pool), one sequence idle in a pass, one rolled back
        let config = ModelConfig { vocab_size: 40, n_positions: 24, n_embd: 16, n_layer: 2, n_head: 4, horizon: 1, rank: 1 };
        let mut rng = Rng::new(8);
        let params = gpt2::init_params::<f64>(&config, &mut rng);
        let streams: Vec<Vec<u32>> = [19, 12, 22].iter().map(|&len| (0..len).map(|_| rng.below(40) as u32).collect()).collect();
        let alone: Vec<Vec<f64>> = streams.iter().map(|s| CachedBackbone::new(&config, &params).forward(s)).collect();
        let mut batch = CachedBackbone::with_sequences(&config, &params, 3);
        let mut together: Vec<Vec<f64>> = batch.forward_batch(&[&streams[0][..9], &streams[1][..2], &streams[2][..10]]);
        // a pass past a draft that is then rolled back
        batch.forward_batch(&[&[1, 2], &[], &[3]]);
        batch.truncate_sequence(0, 9);
        batch.truncate_sequence(2, 10);
        for pieces in [[9..12, 2..3, 10..14], [12..19, 3..12, 14..22]] {
            let runs: Vec<&[u32]> = pieces.iter().zip(&streams).map(|(range, s)| &s[range.clone()]).collect();
            for (mine, new) in together.iter_mut().zip(batch.forward_batch(&runs)) {
                mine.extend(new);
            }
        }
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert_eq!(a.len(), b.len(), "sequence {i}");
            assert!(worst < 1e-12, "sequence {i}: batched and alone differ by {worst}");
        }
        let mut one = OneSequence { backbone: &mut batch, sequence: 1 };
        assert_eq!(one.positions(), 12);
        one.truncate(4);
        let again = one.forward(&streams[1][4..6]).unwrap();
        let worst = again.iter().zip(&alone[1][4 * 16..6 * 16]).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-12, "one sequence run alone after a rollback differs by {worst}");
    }

    #[test]
    fn a_stack_of_more_rows_than_a_team_takes_gives_each_sequence_its_bits_alone() {
        // 4 + 8 + 7 = 19 rows: above 16 the pass runs on one thread, and its products must still
        // add each output's terms as the few rows of one sequence do; on one thread and on two
        let config = ModelConfig { vocab_size: 50, n_positions: 32, n_embd: 64, n_layer: 2, n_head: 4, horizon: 1, rank: 1 };
        let params = gpt2::init_params::<f32>(&config, &mut Rng::new(6));
        let streams: Vec<Vec<u32>> = [7, 11, 10].iter().map(|&len| (0..len).map(|i| (i * 13 % 50) as u32).collect()).collect();
        let prefill = [3, 3, 3];
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (alone, together) = pool.install(|| {
                let alone: Vec<Vec<f32>> = streams
                    .iter()
                    .zip(prefill)
                    .map(|(s, p)| {
                        let mut cache = CachedBackbone::new(&config, &params);
                        cache.forward(&s[..p]);
                        cache.forward(&s[p..])
                    })
                    .collect();
                let mut batch = CachedBackbone::with_sequences(&config, &params, 3);
                for (i, (s, p)) in streams.iter().zip(prefill).enumerate() {
                    OneSequence { backbone: &mut batch, sequence: i }.forward(&s[..p]).unwrap();
                }
                let runs: Vec<&[u32]> = streams.iter().zip(prefill).map(|(s, p)| &s[p..]).collect();
                (alone, batch.forward_batch(&runs))
            });
            assert_eq!(together, alone, "{threads} thread(s)");
        }
    }

    #[test]
    fn a_team_of_threads_computes_the_same_bits_as_one_thread() {
        // a pass of a few rows runs as a team when the pool has several threads, and through
        // `matmul` otherwise; every output must add the same terms in the same order either way
        let config = ModelConfig { vocab_size: 50, n_positions: 32, n_embd: 128, n_layer: 2, n_head: 4, horizon: 1, rank: 1 };
        let params = gpt2::init_params::<f32>(&config, &mut Rng::new(4));
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 % 50) as u32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut cache = CachedBackbone::new(&config, &params);
                let mut hidden = cache.forward(&tokens[..5]);
                hidden.extend(cache.forward(&tokens[5..9]));
                hidden.extend(cache.forward(&tokens[9..]));
                hidden
            })
        };
        let alone = run(1);
        // 2 threads: a team on a machine of 2 cores or more; 3 on a 2-core machine: one thread,
        // as an oversubscribed pool runs
        for threads in [2, 3] {
            assert_eq!(run(threads), alone, "{threads} threads");
        }
    }
}
