//! `kernels/speculative.cu`: the speculative step on the device: the gate at each new row, the
//! drafts' verification and the next token, and the next step's drafts, so that a step sends
//! the host only tokens.

use cudarc::driver::LaunchConfig;

use crate::attention::CacheRows;
use crate::constants::{MAX_RANK, STEP_DRAFTS, STEP_THREADS};
use crate::device::block_per_row_config;
use crate::memory::View;
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/speculative.cu");

kernel_table! {
    gate: "decode_gate",
    verify: "speculative_verify",
    draft: "speculative_draft",
}

/// How tokens are chosen: the argmax, or a draw at a temperature (no top-k or top-p on the
/// device), with the acceptance rule for sampled drafts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepChoice {
    /// the argmax of every distribution
    pub greedy: bool,
    /// 1/T: a distribution p is drawn from as p^(1/T), renormalised
    pub inv_temperature: f32,
    /// how sampled drafts are accepted: [`crate::ACCEPT_EXACT`], or a wrong rule for the test that
    /// must catch it ([`crate::ACCEPT_ALWAYS`], [`crate::ACCEPT_RESAMPLE_FROM_TARGET`])
    pub rule: usize,
}

/// The buffers of the speculative step, shared by verification and drafting.
#[derive(Clone, Copy, Debug)]
pub struct StepBuffers {
    /// (m, C): the new rows' final hidden states
    pub hidden: View<f32>,
    /// (C): S's hidden state, written by verification
    pub s_hidden: View<f32>,
    /// (r): the drafts' first posterior `w[α]·P[α,0](next)`, written by verification
    pub posterior: View<f32>,
    /// (n − 1, V): the distribution each draft was drawn from (sampling; at T = 1 the mixture
    /// as written, whose sum is 1 up to rounding); verification writes a rejection's residual
    /// over its row
    pub draft_q: View<f32>,
    /// 2n − 1 uniforms in [0, 1): n − 1 acceptance tests, the next token's draw, n − 1 drafts
    pub uniforms: View<f32>,
    /// (V): room for a row's (tempered) marginal
    pub work: View<f32>,
    /// what the host reads back: [`STEP_DRAFTS`] + n − 1 numbers (the accepted drafts' count,
    /// the next token, a not-finite flag, the next drafts)
    pub readback: View<u32>,
}

impl Gpu {
    /// The gate at each row of `hidden` (m, C): `w (m, r) = softmax(G h + g)`; w = 1 with no gate.
    pub fn decode_gate(&self, hidden: View<f32>, gate: Option<(View<f32>, View<f32>)>, w: View<f32>, c: usize) -> Result<()> {
        let rows = hidden.len() / c.max(1);
        let r = w.len() / rows.max(1);
        check(
            c > 0
                && hidden.len() == rows * c
                && rows > 0
                && r <= MAX_RANK
                && w.len() == rows * r
                && gate.is_none_or(|(weight, bias)| weight.len() == r * c && bias.len() == r)
                && (gate.is_some() || r == 1),
            || format!("decode_gate: {rows} rows of {c}, gate weights for {r} components do not fit"),
        )?;
        // a null gate: the kernel writes w = 1
        let (weight, bias) = gate.map_or((0u64, 0u64), |(weight, bias)| (weight.ptr, bias.ptr));
        let (c_i, r_i) = (c as i32, r as i32);
        let mut launch = self.launch_early(&self.kernels.speculative.gate);
        launch.arg(&hidden.ptr).arg(&weight).arg(&bias).arg(&w.ptr).arg(&c_i).arg(&r_i);
        // SAFETY: sizes checked; one block per row.
        unsafe { launch.launch(block_per_row_config(rows)) }?;
        Ok(())
    }

    /// Verification of the run in `rows` (c and m − 1 drafts) against each row's next-token
    /// marginal from `probs` (m, r, V) and `w` (m, r): how many drafts are accepted, the next
    /// token, and S (its hidden state and the drafts' first posterior) at the row that chose it.
    /// Sampling tempers relative to each distribution's largest entry, so no temperature
    /// underflows it, and a rejection's residual `max(0, p − q)` is written over that row of
    /// `draft_q`, which no later step reads.
    /// With `forced = Some(token)` (m = 1) nothing is verified and the next token is `token`:
    /// priming S after a prefill. `n` is the horizon the buffers are laid out for.
    #[allow(clippy::too_many_arguments)]
    pub fn speculative_verify(
        &self,
        probs: View<f32>,
        w: View<f32>,
        rows: CacheRows,
        buffers: StepBuffers,
        n: usize,
        choice: StepChoice,
        forced: Option<u32>,
    ) -> Result<()> {
        let m = rows.rows();
        let c = buffers.s_hidden.len();
        let r = buffers.posterior.len();
        let v = buffers.work.len();
        check(
            m > 0
                && m <= n
                && r <= MAX_RANK
                && probs.len() == m * r * v
                && w.len() == m * r
                && buffers.hidden.len() == m * c
                && buffers.draft_q.len() == (n - 1) * v
                && buffers.uniforms.len() == 2 * n - 1
                && buffers.readback.len() == STEP_DRAFTS + n - 1
                && forced.is_none_or(|token| (token as usize) < v && m == 1),
            || format!("speculative_verify: a run of {m} rows, r {r}, V {v}, n {n}: buffers do not fit"),
        )?;
        let forced_i = forced.map_or(-1, |token| token as i32);
        let (m_i, v_i, r_i, c_i, n_i, greedy_i, rule_i) =
            (m as i32, v as i32, r as i32, c as i32, n as i32, i32::from(choice.greedy), choice.rule as i32);
        let mut launch = self.launch_early(&self.kernels.speculative.verify);
        launch.arg(&probs.ptr).arg(&w.ptr).arg(&rows.on_device.ptr).arg(&buffers.draft_q.ptr).arg(&buffers.uniforms.ptr);
        launch.arg(&buffers.hidden.ptr).arg(&buffers.s_hidden.ptr).arg(&buffers.posterior.ptr).arg(&buffers.work.ptr);
        launch.arg(&buffers.readback.ptr).arg(&m_i).arg(&v_i).arg(&r_i).arg(&c_i).arg(&n_i).arg(&greedy_i);
        let width = float4_width(probs, v);
        launch.arg(&choice.inv_temperature).arg(&rule_i).arg(&forced_i).arg(&width);
        // SAFETY: sizes checked; the table's token ids were checked as it was written
        // (`write_cache_rows`); one block.
        unsafe { launch.launch(one_block()) }?;
        Ok(())
    }

    /// The next step's `count` drafts from S's distributions `probs_s` (count, r, V) (horizons
    /// 1..=count) and the posterior verification left: into the step's numbers, and (sampling)
    /// the distributions they were drawn from into `draft_q`. `top_component`: from the
    /// component most likely given the next token alone.
    pub fn speculative_draft(
        &self,
        probs_s: View<f32>,
        buffers: StepBuffers,
        count: usize,
        choice: StepChoice,
        top_component: bool,
    ) -> Result<()> {
        let r = buffers.posterior.len();
        let v = buffers.work.len();
        let n = count + 1;
        check(
            count > 0
                && r <= MAX_RANK
                && probs_s.len() == count * r * v
                && buffers.draft_q.len() == count * v
                && buffers.uniforms.len() == 2 * n - 1
                && buffers.readback.len() == STEP_DRAFTS + count,
            || format!("speculative_draft: {count} drafts, r {r}, V {v}: buffers do not fit"),
        )?;
        let uniforms = buffers.uniforms.slice(n, count);
        let (count_i, v_i, r_i, greedy_i, top_i) = (count as i32, v as i32, r as i32, i32::from(choice.greedy), i32::from(top_component));
        let mut launch = self.launch_early(&self.kernels.speculative.draft);
        launch.arg(&probs_s.ptr).arg(&buffers.posterior.ptr).arg(&uniforms.ptr).arg(&buffers.draft_q.ptr).arg(&buffers.readback.ptr);
        let width = float4_width(probs_s, v);
        launch.arg(&count_i).arg(&v_i).arg(&r_i).arg(&greedy_i).arg(&choice.inv_temperature).arg(&top_i).arg(&width);
        // SAFETY: sizes checked; one block.
        unsafe { launch.launch(one_block()) }?;
        Ok(())
    }
}

/// 4 where the rows of V probabilities in `probs` can be read in float4s (V a multiple of 4,
/// the rows 16-byte aligned), else 1: the step's kernels' `width`.
fn float4_width(probs: View<f32>, v: usize) -> i32 {
    if v.is_multiple_of(4) && probs.ptr.is_multiple_of(16) {
        4
    } else {
        1
    }
}

/// One block of [`STEP_THREADS`] threads.
fn one_block() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (STEP_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}
