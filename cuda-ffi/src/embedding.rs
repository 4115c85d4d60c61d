//! `kernels/embedding.cu`: token plus position embeddings, forward and backward.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::attention::CacheRows;
use crate::constants::THREADS;
use crate::device::elementwise_config;
use crate::memory::View;
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/embedding.cu");

kernel_table! {
    forward: "embedding_forward",
    forward_at: "embedding_forward_at",
    backward_tokens: "embedding_backward_tokens",
    backward_positions: "embedding_backward_positions",
}

/// The rows of a batch grouped by token, for the backward pass: `order` lists the rows token
/// by token (rows in increasing order within a token), group g is `order[starts[g]..starts[g +
/// 1]]` and its token is `tokens[g]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGroups {
    /// the rows of the batch, token by token
    pub order: Vec<u32>,
    /// where each group starts in `order`, and one past the last group's end
    pub starts: Vec<u32>,
    /// the token of each group, in increasing order
    pub tokens: Vec<u32>,
}

impl TokenGroups {
    /// Groups the rows of the token ids `idx` (B·T) by token.
    pub fn new(idx: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..idx.len() as u32).collect();
        order.sort_by_key(|&row| (idx[row as usize], row));
        let (mut starts, mut tokens) = (Vec::new(), Vec::new());
        for (k, &row) in order.iter().enumerate() {
            let token = idx[row as usize];
            if tokens.last() != Some(&token) {
                tokens.push(token);
                starts.push(k as u32);
            }
        }
        starts.push(order.len() as u32);
        TokenGroups { order, starts, tokens }
    }
}

impl Gpu {
    /// `out[b,t] = wte[idx[b,t]] + wpe[offset + t]` for idx (rows), rows a multiple of `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_forward(
        &self,
        idx: View<u32>,
        wte: View<f32>,
        wpe: View<f32>,
        out: View<f32>,
        seq: usize,
        offset: usize,
        c: usize,
    ) -> Result<()> {
        let rows = idx.len();
        check(
            out.len() == rows * c && wpe.len() >= (offset + seq) * c && wte.len().is_multiple_of(c) && seq > 0 && rows.is_multiple_of(seq),
            || format!("embedding_forward: buffers do not fit {rows} rows of {c} with seq {seq}"),
        )?;
        if rows == 0 {
            return Ok(());
        }
        let (rows_i, seq_i, offset_i, c_i) = (rows as i32, seq as i32, offset as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding.forward);
        launch.arg(&idx.ptr).arg(&wte.ptr).arg(&wpe.ptr).arg(&out.ptr).arg(&rows_i).arg(&seq_i).arg(&offset_i).arg(&c_i);
        // SAFETY: token ids are checked against the vocabulary by the caller; sizes above.
        unsafe { launch.launch(elementwise_config(rows * c)) }?;
        Ok(())
    }

    /// Decoding: `out[row] = wte[token] + wpe[position]` for each new row of `rows`.
    pub fn embedding_forward_at(&self, rows: CacheRows, wte: View<f32>, wpe: View<f32>, out: View<f32>, c: usize) -> Result<()> {
        let m = rows.on_device.len() / 3;
        check(
            rows.on_device.len() == 3 * m && out.len() == m * c && wpe.len() >= rows.positions_below * c && wte.len().is_multiple_of(c),
            || format!("embedding_forward_at: buffers do not fit {m} rows of {c} below position {}", rows.positions_below),
        )?;
        let (rows_i, c_i) = (m as i32, c as i32);
        let mut launch = self.launch_early(&self.kernels.embedding.forward_at);
        launch.arg(&rows.on_device.ptr).arg(&wte.ptr).arg(&wpe.ptr).arg(&out.ptr).arg(&rows_i).arg(&c_i);
        // SAFETY: token ids are checked against the vocabulary by the caller, the rows' positions
        // against wpe above (the device's positions are below rows.positions_below: `CacheRows`).
        unsafe { launch.launch(elementwise_config(m * c)) }?;
        Ok(())
    }

    /// Adds `dwte[v] += Σ dout[row]` over the rows of token v (grouped by [`TokenGroups`]) and
    /// `dwpe[offset + t] += Σ_b dout[b, t]`, each sum in a fixed order.
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_backward(
        &self,
        groups: &TokenGroups,
        dout: View<f32>,
        dwte: View<f32>,
        dwpe: View<f32>,
        seq: usize,
        offset: usize,
        c: usize,
    ) -> Result<()> {
        let rows = groups.order.len();
        let vocab = dwte.len() / c.max(1);
        check(
            dout.len() == rows * c
                && dwpe.len() >= (offset + seq) * c
                && dwte.len().is_multiple_of(c)
                && seq > 0
                && rows.is_multiple_of(seq)
                && groups.tokens.iter().all(|&t| (t as usize) < vocab),
            || format!("embedding_backward: buffers do not fit {rows} rows of {c}"),
        )?;
        if rows == 0 {
            return Ok(());
        }
        // the groups padded to the batch's size, so that every step takes the same sizes from the pool
        let (mut starts, mut tokens) = (groups.starts.clone(), groups.tokens.clone());
        starts.resize(rows + 1, rows as u32);
        tokens.resize(rows, 0);
        let (order, starts, tokens) = (self.upload(&groups.order)?, self.upload(&starts)?, self.upload(&tokens)?);
        let c_i = c as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.embedding.backward_tokens);
        launch.arg(order.device_ptr()).arg(starts.device_ptr()).arg(tokens.device_ptr()).arg(&dout.ptr).arg(&dwte.ptr).arg(&c_i);
        let threads = THREADS as u32;
        let config = LaunchConfig {
            grid_dim: (groups.tokens.len() as u32, (c as u32).div_ceil(threads), 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each group's rows are < rows and its token < vocab (checked); one block per
        // (group, column chunk), and no two groups share a token.
        unsafe { launch.launch(config) }?;
        let (seq_i, offset_i, batch_i) = (seq as i32, offset as i32, (rows / seq) as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding.backward_positions);
        launch.arg(&dout.ptr).arg(&dwpe.ptr).arg(&batch_i).arg(&seq_i).arg(&offset_i).arg(&c_i);
        // SAFETY: writes dwpe[offset·c .. (offset + seq)·c], reads dout[0..rows·c].
        unsafe { launch.launch(elementwise_config(seq * c)) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TokenGroups;

    #[test]
    fn rows_are_grouped_by_token_in_row_order() {
        let groups = TokenGroups::new(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(groups.tokens, vec![0, 2, 5]);
        assert_eq!(groups.starts, vec![0, 1, 3, 6]);
        assert_eq!(groups.order, vec![3, 1, 4, 0, 2, 5]);
    }
}
