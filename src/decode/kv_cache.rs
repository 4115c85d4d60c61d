//! The GPT-2 backbone for decoding: a KV cache per layer, new tokens appended, rollback by
//! truncation. Inference only (no tape), the same math as `model::gpt2` (SPEC.md section 1).

use crate::kernels::gemm::{matmul, Layout};
use crate::model::params::BlockParams;
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// Keys and values of one layer, head by head: (H, n_positions, hs) each, so that a head's keys
/// form one contiguous matrix; positions 0..len are filled.
struct LayerCache<T> {
    keys: Vec<T>,
    values: Vec<T>,
}

pub struct CachedBackbone<'a, T: Float> {
    config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    /// each block's four weight matrices, transposed to (out, in)
    weights: Vec<[Linear<T>; 4]>,
    layers: Vec<LayerCache<T>>,
    /// positions filled
    len: usize,
}

/// A weight matrix stored (out, in): decoding multiplies a few rows by it, and then each output
/// is a dot product over a contiguous row, read front to back. The checkpoint's Conv1D layout
/// (in, out) would make every step of that product jump a whole row ahead in memory.
struct Linear<T> {
    transposed: Vec<T>,
    n_in: usize,
    n_out: usize,
}

impl<T: Float> Linear<T> {
    fn new(weight: &Tensor<T>) -> Self {
        let (n_in, n_out) = (weight.shape()[0], weight.shape()[1]);
        let w = weight.data();
        let transposed = (0..n_out * n_in).map(|i| w[(i % n_in) * n_out + i / n_in]).collect();
        Linear { transposed, n_in, n_out }
    }

    /// `out (m, n_out) = x (m, n_in) · W + b`
    fn apply(&self, x: &[T], bias: &Tensor<T>) -> Vec<T> {
        let m = x.len() / self.n_in;
        let mut out: Vec<T> = bias.data().iter().copied().cycle().take(m * self.n_out).collect();
        matmul(x, Layout::Normal, &self.transposed, Layout::Transposed, &mut out, m, self.n_in, self.n_out, true);
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
    pub fn new(config: &'a ModelConfig, params: &'a ModelParams<Tensor<T>>) -> Self {
        let size = config.n_positions * config.n_embd;
        let layers = (0..config.n_layer).map(|_| LayerCache { keys: vec![T::zero(); size], values: vec![T::zero(); size] }).collect();
        let weights = params
            .blocks
            .iter()
            .map(|b| {
                [
                    Linear::new(&b.attn_c_attn_weight),
                    Linear::new(&b.attn_c_proj_weight),
                    Linear::new(&b.mlp_c_fc_weight),
                    Linear::new(&b.mlp_c_proj_weight),
                ]
            })
            .collect();
        CachedBackbone { config, params, weights, layers, len: 0 }
    }

    /// Positions held in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left before n_positions.
    pub fn room(&self) -> usize {
        self.config.n_positions - self.len
    }

    /// Forgets every position from `len` on (rollback of rejected drafts).
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.len, "truncate beyond the cache");
        self.len = len;
    }

    /// Runs `tokens` at positions len.. and appends their keys and values.
    /// Returns the final hidden states h (after ln_f), (m, C).
    pub fn forward(&mut self, tokens: &[u32]) -> Vec<T> {
        let (c, m, p0) = (self.config.n_embd, tokens.len(), self.len);
        assert!(p0 + m <= self.config.n_positions, "the cache holds n_positions tokens at most");
        let (wte, wpe) = (self.params.wte.data(), self.params.wpe.data());
        let mut x = vec![T::zero(); m * c];
        for (i, (row, &token)) in x.chunks_mut(c).zip(tokens).enumerate() {
            let (te, pe) = (&wte[token as usize * c..][..c], &wpe[(p0 + i) * c..][..c]);
            for j in 0..c {
                row[j] = te[j] + pe[j];
            }
        }
        for ((block, weights), cache) in self.params.blocks.iter().zip(&self.weights).zip(self.layers.iter_mut()) {
            block_forward(self.config, block, weights, cache, &mut x, p0);
        }
        self.len += m;
        layernorm_rows(&x, &self.params.ln_f_weight, &self.params.ln_f_bias)
    }
}

/// One transformer block over m new rows at positions p0.., in place on x (m, C).
fn block_forward<T: Float>(
    config: &ModelConfig,
    block: &BlockParams<Tensor<T>>,
    weights: &[Linear<T>; 4],
    cache: &mut LayerCache<T>,
    x: &mut [T],
    p0: usize,
) {
    let [attn, attn_proj, fc, fc_proj] = weights;
    let (c, hs) = (config.n_embd, config.head_size());
    let m = x.len() / c;
    let a = layernorm_rows(x, &block.ln_1_weight, &block.ln_1_bias);
    let qkv = attn.apply(&a, &block.attn_c_attn_bias);
    let positions = config.n_positions;
    for i in 0..m {
        let row = &qkv[i * 3 * c..(i + 1) * 3 * c];
        for h in 0..config.n_head {
            let at = (h * positions + p0 + i) * hs;
            cache.keys[at..at + hs].copy_from_slice(&row[c + h * hs..c + (h + 1) * hs]);
            cache.values[at..at + hs].copy_from_slice(&row[2 * c + h * hs..2 * c + (h + 1) * hs]);
        }
    }
    // attention of each new row i (position p0 + i) over positions 0..=p0 + i
    let scale = T::one() / T::of(hs as f64).sqrt();
    let keys = p0 + m;
    let mut attended = vec![T::zero(); m * c];
    let mut queries = vec![T::zero(); m * hs];
    let mut scores = vec![T::zero(); m * keys];
    let mut head_out = vec![T::zero(); m * hs];
    for h in 0..config.n_head {
        for i in 0..m {
            queries[i * hs..(i + 1) * hs].copy_from_slice(&qkv[i * 3 * c + h * hs..][..hs]);
        }
        let head_keys = &cache.keys[h * positions * hs..(h * positions + keys) * hs];
        let head_values = &cache.values[h * positions * hs..(h * positions + keys) * hs];
        // S = q Kᵀ / √hs, masked causally, softmax by row; out = P V
        matmul(&queries, Layout::Normal, head_keys, Layout::Transposed, &mut scores, m, hs, keys, false);
        for (i, row) in scores.chunks_mut(keys).enumerate() {
            let visible = p0 + i + 1;
            row[..visible].iter_mut().for_each(|x| *x *= scale);
            T::softmax_row(&mut row[..visible]);
            row[visible..].fill(T::zero());
        }
        matmul(&scores, Layout::Normal, head_values, Layout::Normal, &mut head_out, m, keys, hs, false);
        for i in 0..m {
            attended[i * c + h * hs..][..hs].copy_from_slice(&head_out[i * hs..(i + 1) * hs]);
        }
    }
    let projected = attn_proj.apply(&attended, &block.attn_c_proj_bias);
    x.iter_mut().zip(&projected).for_each(|(a, &b)| *a += b);
    let normed = layernorm_rows(x, &block.ln_2_weight, &block.ln_2_bias);
    let hidden = fc.apply(&normed, &block.mlp_c_fc_bias);
    let mut activated = vec![T::zero(); hidden.len()];
    T::gelu_forward(&hidden, &mut activated);
    let projected = fc_proj.apply(&activated, &block.mlp_c_proj_bias);
    x.iter_mut().zip(&projected).for_each(|(a, &b)| *a += b);
}

impl<T: Float> super::generate::Backbone<T> for CachedBackbone<'_, T> {
    fn forward(&mut self, tokens: &[u32]) -> crate::error::Result<Vec<T>> {
        Ok(CachedBackbone::forward(self, tokens))
    }

    fn truncate(&mut self, len: usize) {
        CachedBackbone::truncate(self, len);
    }

    fn positions(&self) -> usize {
        CachedBackbone::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::Tape;
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
        let full = gpt2::hidden_states(&mut tape, &config, &vars, &tokens, tokens.len());
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
}
