//! The GPT-2 backbone for decoding: a KV cache per layer, new tokens appended, rollback by
//! truncation. Inference only (no tape), the same math as `model::gpt2` (SPEC.md section 1).

use crate::kernels::gemm::{matmul, Layout};
use crate::model::params::BlockParams;
use crate::model::{ModelConfig, ModelParams};
use crate::tensor::{Float, Tensor};

/// Keys and values of one layer: (n_positions, C) each, rows 0..len filled.
struct LayerCache<T> {
    keys: Vec<T>,
    values: Vec<T>,
}

pub struct CachedBackbone<'a, T: Float> {
    config: &'a ModelConfig,
    params: &'a ModelParams<Tensor<T>>,
    layers: Vec<LayerCache<T>>,
    /// positions filled
    len: usize,
}

/// `out (m, n_out) = x (m, n_in) · W + b`
fn affine<T: Float>(x: &[T], weight: &Tensor<T>, bias: &Tensor<T>) -> Vec<T> {
    let (n_in, n_out) = (weight.shape()[0], weight.shape()[1]);
    let m = x.len() / n_in;
    let mut out: Vec<T> = bias.data().iter().copied().cycle().take(m * n_out).collect();
    matmul(x, Layout::Normal, weight.data(), Layout::Normal, &mut out, m, n_in, n_out, true);
    out
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
        CachedBackbone { config, params, layers, len: 0 }
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
        for (block, cache) in self.params.blocks.iter().zip(self.layers.iter_mut()) {
            block_forward(self.config, block, cache, &mut x, p0);
        }
        self.len += m;
        layernorm_rows(&x, &self.params.ln_f_weight, &self.params.ln_f_bias)
    }
}

/// One transformer block over m new rows at positions p0.., in place on x (m, C).
fn block_forward<T: Float>(config: &ModelConfig, block: &BlockParams<Tensor<T>>, cache: &mut LayerCache<T>, x: &mut [T], p0: usize) {
    let (c, hs) = (config.n_embd, config.head_size());
    let m = x.len() / c;
    let a = layernorm_rows(x, &block.ln_1_weight, &block.ln_1_bias);
    let qkv = affine(&a, &block.attn_c_attn_weight, &block.attn_c_attn_bias);
    for i in 0..m {
        let row = &qkv[i * 3 * c..(i + 1) * 3 * c];
        cache.keys[(p0 + i) * c..(p0 + i + 1) * c].copy_from_slice(&row[c..2 * c]);
        cache.values[(p0 + i) * c..(p0 + i + 1) * c].copy_from_slice(&row[2 * c..]);
    }
    // attention of each new row i (position p0 + i) over positions 0..=p0 + i
    let scale = T::one() / T::of(hs as f64).sqrt();
    let mut attended = vec![T::zero(); m * c];
    let mut scores = vec![T::zero(); p0 + m];
    for h in 0..config.n_head {
        for i in 0..m {
            let keys = p0 + i + 1;
            let q = &qkv[i * 3 * c + h * hs..][..hs];
            for (j, s) in scores[..keys].iter_mut().enumerate() {
                *s = T::dot(q, &cache.keys[j * c + h * hs..][..hs]) * scale;
            }
            T::softmax_row(&mut scores[..keys]);
            let out = &mut attended[i * c + h * hs..][..hs];
            for (j, &p) in scores[..keys].iter().enumerate() {
                T::axpy(p, &cache.values[j * c + h * hs..][..hs], out);
            }
        }
    }
    let projected = affine(&attended, &block.attn_c_proj_weight, &block.attn_c_proj_bias);
    x.iter_mut().zip(&projected).for_each(|(a, &b)| *a += b);
    let normed = layernorm_rows(x, &block.ln_2_weight, &block.ln_2_bias);
    let hidden = affine(&normed, &block.mlp_c_fc_weight, &block.mlp_c_fc_bias);
    let mut activated = vec![T::zero(); hidden.len()];
    T::gelu_forward(&hidden, &mut activated);
    let projected = affine(&activated, &block.mlp_c_proj_weight, &block.mlp_c_proj_bias);
    x.iter_mut().zip(&projected).for_each(|(a, &b)| *a += b);
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
