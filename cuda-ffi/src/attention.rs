//! `kernels/attention.cu`: causal attention through cuBLAS products (the route TF32 takes, and
//! head sizes without a fused kernel), and decoding's attention over a KV cache.
//!
//! The products route moves q, k, v from c_attn's rows (B, T, 3C) into heads (B, H, T, hs),
//! multiplies over causal query chunks (chunk i of T/S queries needs only the first (i + 1)·T/S
//! keys, so the products skip (S − 1)/2S of the work above the diagonal), and keeps the (B, H,
//! T, T) weights for the backward pass.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::blas::{Operand, ProductPrecision};
use crate::constants::{DECODE_THREADS, FUSED_ATTENTION_HEAD_SIZES};
use crate::device::{block_per_row_config, warp_per_row_config};
use crate::memory::{Buffer, View};
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/attention.cu");

kernel_table! {
    qkv_to_heads: "qkv_to_heads",
    heads_to_qkv: "heads_to_qkv",
    heads_rows: "heads_rows",
    causal_softmax_forward: "causal_softmax_forward",
    causal_softmax_backward: "causal_softmax_backward",
    decode_attention: "decode_attention",
}

/// The dimensions of a batch of attention: B, T, H and the head size.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// B, sequences in the batch
    pub batch: usize,
    /// T, positions per sequence
    pub seq: usize,
    /// H, attention heads
    pub n_head: usize,
    /// hs = C / H, the width of one head
    pub head_size: usize,
}

impl AttentionShape {
    pub(crate) fn dims(&self) -> [i32; 4] {
        [self.batch as i32, self.seq as i32, self.n_head as i32, self.head_size as i32]
    }

    /// B·T·C: the elements of one of q, k, v or y.
    pub fn elements(&self) -> usize {
        self.batch * self.seq * self.n_head * self.head_size
    }

    pub(crate) fn check(&self, what: &str, len: usize, factor: usize) -> Result<()> {
        check(len == factor * self.elements(), || {
            format!(
                "{what}: buffer of {len} does not fit {factor} × (B={}, T={}, H={}, hs={})",
                self.batch, self.seq, self.n_head, self.head_size
            )
        })
    }
}

/// How the training pass computes causal attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionRoute {
    /// one kernel each way over c_attn's rows (`kernels/fused_attention.cu`): the (T, T)
    /// weights are never stored, the backward pass recomputes them tile by tile
    Fused,
    /// strided-batched cuBLAS products over causal query chunks and a masked softmax, with the
    /// weights stored for the backward pass: any head size, and TF32 tensor cores when asked
    Products,
}

impl AttentionRoute {
    /// The fused kernels, where one exists for the head size: they hold no (T, T) weights, and
    /// in f32 they are faster than the products. With TF32 the products, whose tensor cores
    /// outrun the kernels' f32 arithmetic. Not in bf16: there the products would round their
    /// (T, T) operands into bf16 copies, which costs more than the tensor cores save.
    pub fn default_for(head_size: usize, precision: ProductPrecision) -> Self {
        if FUSED_ATTENTION_HEAD_SIZES.contains(&head_size) && precision != ProductPrecision::Tf32 {
            AttentionRoute::Fused
        } else {
            AttentionRoute::Products
        }
    }
}

/// What the products route's forward pass keeps for the backward pass: q, k, v in heads, each
/// (B·H, T, hs), one after the other, and the weights (B·H, T, T).
pub struct ProductsAttention {
    /// q, k, v in heads, each (B·H, T, hs), one after the other
    pub heads: Buffer<f32>,
    /// the attention weights (B·H, T, T) after the causal softmax
    pub weights: Buffer<f32>,
}

/// A decoding pass's new rows and where they go in the KV caches of one or several sequences:
/// (token id, sequence, position) for each row, three numbers in device memory, which the
/// decoding kernels read. Read from device memory, the places are not baked into a captured
/// pass ([`Gpu::capture`]), so one capture of m rows replays for any sequences at any positions.
/// Only [`Gpu::write_cache_rows`] makes one, after checking every row against the bounds it
/// keeps, so that the kernels given it stay inside the caches.
#[derive(Clone, Copy, Debug)]
pub struct CacheRows {
    /// every row's position is below this
    pub(crate) positions_below: usize,
    /// every row's sequence is below this
    pub(crate) sequences_below: usize,
    /// (token id, sequence, position) of each new row: 3m numbers
    pub(crate) on_device: View<u32>,
}

impl CacheRows {
    /// m, the number of new rows.
    pub fn rows(&self) -> usize {
        self.on_device.len() / 3
    }
}

/// Checks that every new row's token id, sequence and position lie below their bounds, and that
/// each sequence's rows are consecutive, at consecutive positions (`decode_attention` tells a
/// new key from a cached one by that).
fn check_cache_rows(rows: &[[u32; 3]], vocab: usize, sequences: usize, positions: usize) -> Result<()> {
    let mut seen = vec![false; sequences];
    for (i, &[token, sequence, position]) in rows.iter().enumerate() {
        check((token as usize) < vocab, || format!("token id {token} is outside the vocabulary of {vocab}"))?;
        check((sequence as usize) < sequences, || format!("sequence {sequence} is not one of the {sequences} the caches hold"))?;
        check((position as usize) < positions, || format!("position {position} is past the {positions} a cache holds"))?;
        match i.checked_sub(1).map(|before| rows[before]) {
            Some([_, same, previous]) if same == sequence => {
                check(position == previous + 1, || format!("sequence {sequence}'s new rows are not at consecutive positions"))?
            }
            _ => {
                check(!seen[sequence as usize], || format!("sequence {sequence}'s new rows are not consecutive"))?;
                seen[sequence as usize] = true;
            }
        }
    }
    Ok(())
}

/// Attention dimensions: T, the head size, B·H matrices, and the causal query chunks.
struct CausalChunks {
    t: usize,
    hs: usize,
    bh: usize,
    chunks: usize,
    chunk: usize,
}

impl CausalChunks {
    fn of(shape: AttentionShape) -> Self {
        let t = shape.seq;
        let chunks = [4, 2].into_iter().find(|&s| t.is_multiple_of(s) && t / s >= 32).unwrap_or(1);
        CausalChunks { t, hs: shape.head_size, bh: shape.batch * shape.n_head, chunks, chunk: t / chunks }
    }
}

/// Rows `first..` of each of a batch of (T, width) matrices, as a view that starts there.
fn chunk_rows(x: View<f32>, first: usize, width: usize) -> View<f32> {
    x.slice(first * width, x.len() - first * width)
}

fn thirds(all: View<f32>) -> (View<f32>, View<f32>, View<f32>) {
    let third = all.len() / 3;
    (all.slice(0, third), all.slice(third, third), all.slice(2 * third, third))
}

impl Gpu {
    /// Writes a decoding pass's new rows into `table` (3 numbers a row, from its start): each
    /// row's token id, below `vocab`; its sequence, below `sequences`; its position in that
    /// sequence's cache, below `positions`. All are checked here, and the returned [`CacheRows`]
    /// carries the bounds for the kernels' own checks of the buffers they are given.
    pub fn write_cache_rows(
        &self,
        table: View<u32>,
        rows: &[[u32; 3]],
        vocab: usize,
        sequences: usize,
        positions: usize,
    ) -> Result<CacheRows> {
        check_cache_rows(rows, vocab, sequences, positions)?;
        check(!rows.is_empty() && 3 * rows.len() <= table.len(), || {
            format!("cache rows: {} rows do not fit a table of {} numbers", rows.len(), table.len())
        })?;
        let on_device = table.prefix(3 * rows.len());
        self.write(on_device, rows.as_flattened())?;
        Ok(CacheRows { positions_below: positions, sequences_below: sequences, on_device })
    }

    /// How attention runs on this device for head size `head_size`.
    pub fn attention_route_for(&self, head_size: usize) -> AttentionRoute {
        match self.attention_route {
            Some(AttentionRoute::Fused) if FUSED_ATTENTION_HEAD_SIZES.contains(&head_size) => AttentionRoute::Fused,
            Some(_) => AttentionRoute::Products,
            None => AttentionRoute::default_for(head_size, self.precision),
        }
    }

    /// qkv (B, T, 3C) → q, k, v (B, H, T, hs) one after the other in `heads`; `inverse` goes back.
    pub fn qkv_heads(&self, qkv: View<f32>, heads: View<f32>, shape: AttentionShape, inverse: bool) -> Result<()> {
        shape.check("qkv_heads", qkv.len(), 3)?;
        shape.check("qkv_heads", heads.len(), 3)?;
        if shape.elements() == 0 {
            return Ok(());
        }
        let kernels = &self.kernels.attention;
        let kernel = if inverse { &kernels.heads_to_qkv } else { &kernels.qkv_to_heads };
        let (source, target) = if inverse { (heads, qkv) } else { (qkv, heads) };
        let dims = shape.dims();
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&source.ptr).arg(&target.ptr).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]);
        // SAFETY: both views hold 3·B·T·C elements; one block per row (b, t).
        unsafe { launch.launch(block_per_row_config(shape.batch * shape.seq)) }?;
        Ok(())
    }

    /// heads (B, H, T, hs) → rows (B, T, C) when `to_rows`, else rows → heads.
    pub fn heads_rows(&self, heads: View<f32>, rows: View<f32>, shape: AttentionShape, to_rows: bool) -> Result<()> {
        shape.check("heads_rows", heads.len(), 1)?;
        shape.check("heads_rows", rows.len(), 1)?;
        if shape.elements() == 0 {
            return Ok(());
        }
        let dims = shape.dims();
        let direction = i32::from(to_rows);
        let mut launch = self.stream.launch_builder(&self.kernels.attention.heads_rows);
        launch.arg(&heads.ptr).arg(&rows.ptr).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&direction);
        // SAFETY: both views hold B·T·C elements; one block per row (b, t).
        unsafe { launch.launch(block_per_row_config(shape.batch * shape.seq)) }?;
        Ok(())
    }

    /// In place over matrices of (`queries`, `keys`) scores: the causal softmax of
    /// `scale`·scores, query t seeing keys up to t + keys − queries (training: queries = keys).
    pub fn causal_softmax_forward(&self, scores: View<f32>, queries: usize, keys: usize, scale: f32) -> Result<()> {
        check(queries > 0 && queries <= keys && scores.len().is_multiple_of(queries * keys), || {
            "causal_softmax_forward: not whole queries×keys matrices".into()
        })?;
        let (rows, queries_i, keys_i) = ((scores.len() / keys) as i32, queries as i32, keys as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.attention.causal_softmax_forward);
        launch.arg(&scores.ptr).arg(&rows).arg(&queries_i).arg(&keys_i).arg(&scale);
        // SAFETY: rows·keys elements.
        unsafe { launch.launch(warp_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// In place: the gradient d of the attention weights becomes that of the unscaled scores.
    pub fn causal_softmax_backward(&self, att: View<f32>, d: View<f32>, seq: usize, scale: f32) -> Result<()> {
        check(seq > 0 && att.len() == d.len() && att.len().is_multiple_of(seq * seq), || {
            "causal_softmax_backward: not whole T×T matrices".into()
        })?;
        let (rows, seq_i) = ((att.len() / seq) as i32, seq as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.attention.causal_softmax_backward);
        launch.arg(&att.ptr).arg(&d.ptr).arg(&rows).arg(&seq_i).arg(&scale);
        // SAFETY: rows·T elements in both.
        unsafe { launch.launch(warp_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// Causal attention through products: y (B, T, C) from c_attn's rows qkv (B, T, 3C); returns
    /// what the backward pass needs.
    pub fn attention_products_forward(&self, qkv: View<f32>, y: View<f32>, shape: AttentionShape) -> Result<ProductsAttention> {
        shape.check("attention_products_forward", qkv.len(), 3)?;
        shape.check("attention_products_forward", y.len(), 1)?;
        let CausalChunks { t, hs, bh, chunks, chunk } = CausalChunks::of(shape);
        let saved = ProductsAttention { heads: self.alloc(3 * shape.elements())?, weights: self.alloc(bh * t * t)? };
        self.qkv_heads(qkv, saved.heads.view(), shape, false)?;
        let ((q, k, v), att) = (thirds(saved.heads.view()), saved.weights.view());
        let y_heads = self.alloc::<f32>(shape.elements())?;
        let rows = |x: View<f32>, i: usize, width: usize| chunk_rows(x, i * chunk, width);
        for i in 0..chunks {
            // scores[chunk i, ..keys] = q_i k[..keys]ᵀ
            let (q_i, scores_i) = (rows(q, i, hs), rows(att, i, t));
            let (a, b) = (Operand::normal(q_i).strided(t * hs), Operand::transposed(k).strided(t * hs));
            self.matmul_general(a, b, Operand::normal(scores_i).strided(t * t).leading(t), chunk, hs, (i + 1) * chunk, bh, false)?;
        }
        self.causal_softmax_forward(att, t, t, 1.0 / (hs as f32).sqrt())?;
        for i in 0..chunks {
            // y_i = att[chunk i, ..keys] v[..keys]
            let (att_i, y_i) = (rows(att, i, t), rows(y_heads.view(), i, hs));
            let (a, b) = (Operand::normal(att_i).strided(t * t).leading(t), Operand::normal(v).strided(t * hs));
            self.matmul_general(a, b, Operand::normal(y_i).strided(t * hs), chunk, (i + 1) * chunk, hs, bh, false)?;
        }
        self.heads_rows(y_heads.view(), y, shape, true)?;
        Ok(saved)
    }

    /// Backward of [`Gpu::attention_products_forward`] from dy (B, T, C): writes dqkv (B, T, 3C).
    pub fn attention_products_backward(
        &self,
        saved: &ProductsAttention,
        dy: View<f32>,
        dqkv: View<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        shape.check("attention_products_backward", dy.len(), 1)?;
        shape.check("attention_products_backward", dqkv.len(), 3)?;
        let CausalChunks { t, hs, bh, chunks, chunk } = CausalChunks::of(shape);
        let ((q, k, v), att) = (thirds(saved.heads.view()), saved.weights.view());
        let (dy_heads, d_heads, d_att) =
            (self.alloc::<f32>(shape.elements())?, self.alloc::<f32>(3 * shape.elements())?, self.alloc(bh * t * t)?);
        self.heads_rows(dy_heads.view(), dy, shape, false)?;
        let ((dq, dk, dv), dy, d_att) = (thirds(d_heads.view()), dy_heads.view(), d_att.view());
        let rows = |x: View<f32>, i: usize, width: usize| chunk_rows(x, i * chunk, width);
        let heads = |x: View<f32>| Operand::normal(x).strided(t * hs);
        let scores =
            |x: View<f32>, transposed: bool| if transposed { Operand::transposed(x) } else { Operand::normal(x) }.strided(t * t).leading(t);
        // the last chunk reaches every key: it writes dk and dv whole, the others add to a prefix
        for i in (0..chunks).rev() {
            let (keys, first) = ((i + 1) * chunk, i + 1 == chunks);
            let (dy_i, att_i, d_att_i) = (rows(dy, i, hs), rows(att, i, t), rows(d_att, i, t));
            // y = att v: d_att = dy vᵀ, dv += attᵀ dy
            self.matmul_general(heads(dy_i), Operand::transposed(v).strided(t * hs), scores(d_att_i, false), chunk, hs, keys, bh, false)?;
            self.matmul_general(scores(att_i, true), heads(dy_i), heads(dv), keys, chunk, hs, bh, !first)?;
        }
        self.causal_softmax_backward(att, d_att, t, 1.0 / (hs as f32).sqrt())?;
        for i in (0..chunks).rev() {
            let (keys, first) = ((i + 1) * chunk, i + 1 == chunks);
            let (q_i, dq_i, d_scores_i) = (rows(q, i, hs), rows(dq, i, hs), rows(d_att, i, t));
            // scores = q kᵀ: dq = d_scores k, dk += d_scoresᵀ q
            self.matmul_general(scores(d_scores_i, false), heads(k), heads(dq_i), chunk, keys, hs, bh, false)?;
            self.matmul_general(scores(d_scores_i, true), heads(q_i), heads(dk), keys, chunk, hs, bh, !first)?;
        }
        self.qkv_heads(dqkv, d_heads.view(), shape, true)
    }

    /// The kernels' cache dimensions [m, H, hs, positions] of the KV caches (S, H, positions, hs)
    /// of `shape.batch` = S sequences, after checking that `shape.seq` = m new rows fit there.
    fn cache_dims(what: &str, keys: View<f32>, values: View<f32>, shape: AttentionShape, rows: CacheRows) -> Result<[i32; 4]> {
        let (sequences, m, h, hs) = (shape.batch, shape.seq, shape.n_head, shape.head_size);
        let positions = keys.len() / (sequences * h * hs).max(1);
        check(
            m > 0
                && values.len() == keys.len()
                && keys.len() == sequences * h * positions * hs
                && rows.on_device.len() == 3 * m
                && rows.positions_below <= positions
                && rows.sequences_below <= sequences,
            || {
                format!(
                    "{what}: {m} rows below position {} of sequences below {} do not fit caches of {sequences} sequences of {positions} positions",
                    rows.positions_below, rows.sequences_below
                )
            },
        )?;
        Ok([m as i32, h as i32, hs as i32, positions as i32])
    }

    /// Decoding: the attention of m new rows of `qkv` (m, 3C), each over its own sequence's
    /// cache (of the caches (S, H, positions, hs)) up to its own position in `rows`; writes rows
    /// `y` (m, C), and appends the rows' keys and values to the caches. `shape.seq` is m,
    /// `shape.batch` is S.
    pub fn decode_attention(
        &self,
        qkv: View<f32>,
        keys: View<f32>,
        values: View<f32>,
        y: View<f32>,
        shape: AttentionShape,
        rows: CacheRows,
    ) -> Result<()> {
        let (m, h, hs) = (shape.seq, shape.n_head, shape.head_size);
        let dims = Self::cache_dims("decode_attention", keys, values, shape, rows)?;
        let positions = dims[3] as usize;
        check(qkv.len() == 3 * m * h * hs && y.len() == m * h * hs, || format!("decode_attention: qkv and y do not hold {m} rows"))?;
        check(
            4 * positions <= 42 << 10, // with the kernel's static arrays, under 48 KiB
            || format!("decode_attention: a context of {positions} positions does not fit in shared memory"),
        )?;
        let scale = 1.0 / (hs as f32).sqrt();
        // float4 loads of keys, values and the query where every row starts 16 bytes aligned
        let aligned = [qkv.ptr, keys.ptr, values.ptr].iter().all(|p| p.is_multiple_of(16));
        let width: i32 = if hs.is_multiple_of(4) && aligned { 4 } else { 1 };
        let mut launch = self.launch_early(&self.kernels.attention.decode_attention);
        launch.arg(&qkv.ptr).arg(&keys.ptr).arg(&values.ptr).arg(&y.ptr);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&rows.on_device.ptr).arg(&scale).arg(&width);
        // up to `positions` scores per block
        let shared_mem_bytes = (4 * positions) as u32;
        let config = LaunchConfig { grid_dim: (m as u32, h as u32, 1), block_dim: (DECODE_THREADS as u32, 1, 1), shared_mem_bytes };
        // SAFETY: sizes checked; one block per (new row, head); each sequence's rows are
        // consecutive, at consecutive positions (`check_cache_rows`), as the kernel needs.
        unsafe { launch.launch(config) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{check_cache_rows, AttentionRoute, ProductPrecision};

    #[test]
    fn cache_rows_outside_the_caches_are_refused() {
        let rows = [[5, 0, 3], [6, 1, 0], [7, 1, 1]];
        assert!(check_cache_rows(&rows, 8, 2, 4).is_ok());
        for (vocab, sequences, positions) in [(7, 2, 4), (8, 1, 4), (8, 2, 3)] {
            assert!(check_cache_rows(&rows, vocab, sequences, positions).is_err(), "{vocab} {sequences} {positions}");
        }
        // a sequence's rows apart, or at positions with a gap
        assert!(check_cache_rows(&[[5, 0, 3], [6, 1, 0], [7, 0, 4]], 8, 2, 8).is_err());
        assert!(check_cache_rows(&[[5, 0, 3], [6, 0, 5]], 8, 2, 8).is_err());
    }

    #[test]
    fn attention_route_is_fused_unless_tf32_where_a_kernel_exists() {
        assert_eq!(AttentionRoute::default_for(64, ProductPrecision::F32), AttentionRoute::Fused);
        assert_eq!(AttentionRoute::default_for(64, ProductPrecision::Tf32), AttentionRoute::Products);
        assert_eq!(AttentionRoute::default_for(64, ProductPrecision::Bf16), AttentionRoute::Fused);
        // head size 48: no kernel
        assert_eq!(AttentionRoute::default_for(48, ProductPrecision::F32), AttentionRoute::Products);
    }
}
