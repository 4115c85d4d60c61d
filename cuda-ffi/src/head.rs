//! `kernels/head.cu`: the CP head's work per position (log-likelihoods, posterior, dℓ), the
//! gate's log-softmax and gradient, the statistics over positions, and decoding's softmax.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::constants::{MAX_HORIZON, MAX_RANK, THREADS};
use crate::device::{block_per_row_config, elementwise_config};
use crate::memory::View;
use crate::{check, Gpu, Result};

pub(crate) const SOURCE: &str = include_str!("../kernels/head.cu");

kernel_table! {
    position: "head_position",
    position_bf16: "head_position_bf16",
    softmax_rows: "softmax_rows",
    gate_log_softmax: "gate_log_softmax",
    statistics: "head_statistics",
    gate_gradient: "gate_gradient",
}

/// The multi-token head's horizon n and rank r.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    /// n, tokens predicted per position
    pub horizon: usize,
    /// r, mixture components
    pub rank: usize,
}

impl HeadShape {
    /// r·n, the (α, s) pairs of a position.
    pub fn rn(&self) -> usize {
        self.rank * self.horizon
    }

    /// Whether the head kernels' fixed-size arrays hold this n and r.
    pub fn fits_kernels(&self) -> bool {
        self.horizon <= MAX_HORIZON && self.rank <= MAX_RANK
    }

    /// The statistics' length: Σ joint NLL, Σ gate entropy, Σ NLL per horizon, top-component
    /// counts, Σ gate weights.
    pub fn statistics_len(&self) -> usize {
        2 + self.horizon + 2 * self.rank
    }
}

/// What the head's logits are stored as: f32, or bf16 (its bits in a `u16`).
pub trait LogitElement: Copy + sealed::Sealed {
    /// whether the element is bf16
    const BF16: bool;
}

impl LogitElement for f32 {
    const BF16: bool = false;
}

impl LogitElement for u16 {
    const BF16: bool = true;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u16 {}
}

impl Gpu {
    /// (H2, H7) For a block of positions, each with r·n rows of V logits: `log_p` (positions,
    /// r·n) = `log P[α,s](y_s)`; with `gradient`, also the posterior π (positions, r) and
    /// `dℓ = π[α]·inv_count·(P − onehot(y))`, in place. `targets` (positions, n); `log_w`
    /// (positions, r). The logits in f32, or in bf16 (`View<u16>`: bf16 training, where the
    /// product writes them rounded): every sum runs in f32 in the same order either way, so on
    /// bf16 logits the results are what f32 logits of the same values give, dℓ rounded as
    /// [`Gpu::bf16_copy`] rounds.
    #[allow(clippy::too_many_arguments)]
    pub fn head_position<L: LogitElement>(
        &self,
        logits: View<L>,
        targets: View<u32>,
        log_w: View<f32>,
        log_p: View<f32>,
        posterior: View<f32>,
        v: usize,
        shape: HeadShape,
        inv_count: f32,
        gradient: bool,
    ) -> Result<()> {
        let positions = log_w.len() / shape.rank;
        check(
            shape.fits_kernels()
                && logits.len() == positions * shape.rn() * v
                && targets.len() == positions * shape.horizon
                && log_p.len() == positions * shape.rn()
                && posterior.len() == log_w.len(),
            || format!("head_position: buffers do not fit {positions} positions of r·n = {} rows of {v}", shape.rn()),
        )?;
        if positions == 0 {
            return Ok(());
        }
        let (v_i, n_i, r_i, gradient_i) = (v as i32, shape.horizon as i32, shape.rank as i32, i32::from(gradient));
        // rows read in runs of 8 logits, one or two 16-byte loads, where every row starts aligned
        let vector = i32::from(v.is_multiple_of(8) && logits.ptr.is_multiple_of(16));
        let kernel = if L::BF16 { &self.kernels.head.position_bf16 } else { &self.kernels.head.position };
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&logits.ptr).arg(&targets.ptr).arg(&log_w.ptr).arg(&log_p.ptr).arg(&posterior.ptr);
        launch.arg(&v_i).arg(&n_i).arg(&r_i).arg(&inv_count).arg(&gradient_i).arg(&vector);
        // SAFETY: sizes checked; targets are < v (checked by the caller). One block per position.
        unsafe { launch.launch(block_per_row_config(positions)) }?;
        Ok(())
    }

    /// log_softmax of each row of r gate logits, in place.
    pub fn gate_log_softmax(&self, logits: View<f32>, rank: usize) -> Result<()> {
        check(rank > 0 && logits.len().is_multiple_of(rank), || "gate_log_softmax: not whole rows".into())?;
        let (p_i, r_i) = ((logits.len() / rank) as i32, rank as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.head.gate_log_softmax);
        launch.arg(&logits.ptr).arg(&p_i).arg(&r_i);
        // SAFETY: one thread per row.
        unsafe { launch.launch(elementwise_config(logits.len() / rank)) }?;
        Ok(())
    }

    /// (H4–H6) Sums over positions into `out` ([`HeadShape::statistics_len`] f64s), by one
    /// block in a fixed order.
    pub fn head_statistics(&self, log_p: View<f32>, log_w: View<f32>, out: View<f64>, shape: HeadShape) -> Result<()> {
        let positions = log_w.len() / shape.rank;
        check(log_p.len() == positions * shape.rn() && out.len() == shape.statistics_len() && shape.fits_kernels(), || {
            "head_statistics: buffers do not fit".into()
        })?;
        let (p_i, r_i, n_i) = (positions as i32, shape.rank as i32, shape.horizon as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.head.statistics);
        launch.arg(&log_p.ptr).arg(&log_w.ptr).arg(&out.ptr).arg(&p_i).arg(&r_i).arg(&n_i);
        let config = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block; sizes checked.
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// (H10) The gradient of the objective with respect to the gate logits, (positions, r).
    #[allow(clippy::too_many_arguments)]
    pub fn gate_gradient(
        &self,
        log_w: View<f32>,
        posterior: View<f32>,
        top_count: View<f64>,
        da: View<f32>,
        rank: usize,
        inv_count: f32,
        aux_coef: f32,
    ) -> Result<()> {
        let positions = log_w.len() / rank;
        check(posterior.len() == log_w.len() && da.len() == log_w.len() && top_count.len() == rank && rank <= MAX_RANK, || {
            "gate_gradient: buffers do not fit".into()
        })?;
        let (p_i, r_i) = (positions as i32, rank as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.head.gate_gradient);
        launch.arg(&log_w.ptr).arg(&posterior.ptr).arg(&top_count.ptr).arg(&da.ptr).arg(&p_i).arg(&r_i).arg(&inv_count).arg(&aux_coef);
        // SAFETY: one thread per position.
        unsafe { launch.launch(elementwise_config(positions)) }?;
        Ok(())
    }

    /// Each row of V logits (rows, v) becomes its probabilities, in place.
    pub fn softmax_rows(&self, logits: View<f32>, v: usize) -> Result<()> {
        check(v > 0 && logits.len().is_multiple_of(v), || "softmax_rows: not whole rows".into())?;
        if logits.is_empty() {
            return Ok(());
        }
        let v_i = v as i32;
        let mut launch = self.launch_early(&self.kernels.head.softmax_rows);
        launch.arg(&logits.ptr).arg(&v_i);
        // SAFETY: one block per row of v elements.
        unsafe { launch.launch(block_per_row_config(logits.len() / v)) }?;
        Ok(())
    }
}
