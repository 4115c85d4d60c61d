//! The device buffers of one forward and backward pass at a given batch shape (B, T).

use multitoken_cuda::{Buffer, Gpu, View};

use super::AttentionRoute;
use crate::error::Result;
use crate::model::ModelConfig;

/// What one transformer block keeps from its forward pass for the backward pass.
pub struct LayerActivations {
    /// ln_1(x) (N, C) with each row's mean and 1/std (N)
    pub ln_1: Buffer<f32>,
    pub ln_1_mean: Buffer<f32>,
    pub ln_1_rstd: Buffer<f32>,
    /// c_attn's output: its rows (N, 3C) on the fused route; on the products route moved into
    /// heads, q, k, v each (B, H, T, hs), one after the other
    pub qkv: Buffer<f32>,
    /// products route: the attention weights (B, H, T, T)
    pub att: Buffer<f32>,
    /// fused route: each query row's log-sum-exp (B·H, T)
    pub lse: Buffer<f32>,
    /// the heads' outputs back in rows (N, C)
    pub att_y: Buffer<f32>,
    /// x + attention (N, C)
    pub x_mid: Buffer<f32>,
    pub ln_2: Buffer<f32>,
    pub ln_2_mean: Buffer<f32>,
    pub ln_2_rstd: Buffer<f32>,
    /// c_fc output before and after GELU (N, 4C)
    pub fc: Buffer<f32>,
    pub fc_gelu: Buffer<f32>,
}

fn thirds(all: View<f32>) -> (View<f32>, View<f32>, View<f32>) {
    let third = all.len() / 3;
    (all.slice(0, third), all.slice(third, third), all.slice(2 * third, third))
}

impl LayerActivations {
    pub fn q_k_v(&self) -> (View<f32>, View<f32>, View<f32>) {
        thirds(self.qkv.view())
    }
}

pub struct Workspace {
    pub batch: usize,
    pub seq: usize,
    /// token ids (N) and targets (N, n)
    pub inputs: Buffer<u32>,
    pub targets: Buffer<u32>,
    /// the residual stream entering each block, and after the last: L + 1 of (N, C)
    pub residual: Vec<Buffer<f32>>,
    pub layers: Vec<LayerActivations>,
    /// h = ln_f(x) (N, C) with its row statistics
    pub hidden: Buffer<f32>,
    pub ln_f_mean: Buffer<f32>,
    pub ln_f_rstd: Buffer<f32>,
    // scratch shared by the layers
    /// c_attn output (N, 3C); in the backward pass its gradient
    pub qkv: Buffer<f32>,
    /// products route: the attention output in heads (B, H, T, hs); in the backward pass its gradient
    pub y_heads: Buffer<f32>,
    // the head
    /// z (N, r·n·C) and its gradient, when there are expanders
    pub z: Buffer<f32>,
    pub dz: Buffer<f32>,
    /// log w (N, r), log P[α,s](y_s) (N, r·n), posterior π (N, r)
    pub log_w: Buffer<f32>,
    pub log_p: Buffer<f32>,
    pub posterior: Buffer<f32>,
    /// one block of logits (rows, V)
    pub logits: Buffer<f32>,
    /// the gradient of the gate logits (N, r)
    pub d_gate: Buffer<f32>,
    /// the head's sums over positions (2 + n + 2r)
    pub statistics: Buffer<f64>,
    // gradients
    pub d_hidden: Buffer<f32>,
    pub d_residual: Buffer<f32>,
    pub d_ln: Buffer<f32>,
    pub d_att_y: Buffer<f32>,
    /// products route: gradients of q, k, v in heads and of the weights
    pub d_qkv_heads: Buffer<f32>,
    pub d_att: Buffer<f32>,
    /// fused route: Σ y·dy per query row (B·H, T)
    pub att_dots: Buffer<f32>,
    pub d_fc: Buffer<f32>,
    pub d_fc_gelu: Buffer<f32>,
}

impl Workspace {
    pub fn new(gpu: &Gpu, config: &ModelConfig, batch: usize, seq: usize, head_block_rows: usize, route: AttentionRoute) -> Result<Self> {
        let (c, h, n, r) = (config.n_embd, config.n_head, config.horizon, config.rank);
        let rows = batch * seq;
        let rn = r * n;
        // each route allocates only what it uses
        let (fused, products) = match route {
            AttentionRoute::Fused => (1, 0),
            AttentionRoute::Products => (0, 1),
        };
        let scores = products * batch * h * seq * seq;
        let row_stats = fused * batch * h * seq;
        let f = |len: usize| gpu.zeros::<f32>(len);
        let layers = (0..config.n_layer)
            .map(|_| {
                Ok(LayerActivations {
                    ln_1: f(rows * c)?,
                    ln_1_mean: f(rows)?,
                    ln_1_rstd: f(rows)?,
                    qkv: f(3 * rows * c)?,
                    att: f(scores)?,
                    lse: f(row_stats)?,
                    att_y: f(rows * c)?,
                    x_mid: f(rows * c)?,
                    ln_2: f(rows * c)?,
                    ln_2_mean: f(rows)?,
                    ln_2_rstd: f(rows)?,
                    fc: f(4 * rows * c)?,
                    fc_gelu: f(4 * rows * c)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let expanded = if config.has_head() { rows * rn * c } else { 0 };
        let block_rows = (head_block_rows / rn).max(1).min(rows) * rn;
        Ok(Workspace {
            batch,
            seq,
            inputs: gpu.zeros(rows)?,
            targets: gpu.zeros(rows * n)?,
            residual: (0..=config.n_layer).map(|_| f(rows * c)).collect::<std::result::Result<_, _>>()?,
            layers,
            hidden: f(rows * c)?,
            ln_f_mean: f(rows)?,
            ln_f_rstd: f(rows)?,
            qkv: f(3 * rows * c)?,
            y_heads: f(products * rows * c)?,
            z: f(expanded)?,
            dz: f(expanded)?,
            log_w: f(rows * r)?,
            log_p: f(rows * rn)?,
            posterior: f(rows * r)?,
            logits: f(block_rows * config.vocab_size)?,
            d_gate: f(rows * r)?,
            statistics: gpu.zeros(2 + n + 2 * r)?,
            d_hidden: f(rows * c)?,
            d_residual: f(rows * c)?,
            d_ln: f(rows * c)?,
            d_att_y: f(rows * c)?,
            d_qkv_heads: f(products * 3 * rows * c)?,
            d_att: f(scores)?,
            att_dots: f(row_stats)?,
            d_fc: f(4 * rows * c)?,
            d_fc_gelu: f(4 * rows * c)?,
        })
    }

    pub fn d_q_k_v(&self) -> (View<f32>, View<f32>, View<f32>) {
        thirds(self.d_qkv_heads.view())
    }
}
