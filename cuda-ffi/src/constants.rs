//! The numbers that both the launchers and the kernels depend on, defined once: each is handed
//! to NVRTC as a `-D` define ([`KERNEL_DEFINES`]), so a `.cu` file uses the name and never
//! restates the value.

/// Threads per block of most kernels.
pub(crate) const THREADS: usize = 256;
/// The largest horizon n the head kernels' per-thread arrays hold.
pub const MAX_HORIZON: usize = 16;
/// The largest rank r the head kernels' per-thread arrays hold.
pub const MAX_RANK: usize = 16;
/// Rows per block of the first pass of the column sums.
pub(crate) const COLUMN_SUM_CHUNK: usize = 256;
/// Elements per block of the first pass of the sums of squares and dot products.
pub(crate) const REDUCE_CHUNK: usize = 16384;
/// Rows per block of the LayerNorm backward pass.
pub(crate) const LAYERNORM_ROWS_PER_BLOCK: usize = 32;
/// Queries (keys) per tile of the fused attention kernels, and their threads per block.
pub(crate) const ATTENTION_TILE: usize = 64;
pub(crate) const ATTENTION_THREADS: usize = 256;
/// Floats a row of a fused attention tile in shared memory is padded by (so that float4 reads
/// along rows and columns hit distinct banks).
pub(crate) const ATTENTION_TILE_PADDING: usize = 4;
/// Head sizes the fused attention kernels are built for (their instances in the `.cu` file).
pub const FUSED_ATTENTION_HEAD_SIZES: [usize; 4] = [16, 32, 64, 128];
/// Up to this head size the tensor-core attention kernels copy their next tiles, as they are read
/// (q, k, v in bf16, dy in f32), into staging in shared memory while they work on the present
/// ones (`NextTiles`); above it the staging would take more shared memory than a block can spare
/// (as measured when the staging was all f32; not measured again since q, k, v are bf16).
pub(crate) const TC_STAGED_HEAD_SIZE_MAX: usize = 64;
/// Threads per block of decoding's attention over the cache.
pub(crate) const DECODE_THREADS: usize = 256;
/// The few-row product kernel (`kernels/linear.cu`): the rows of its two instances (the most
/// either takes is [`crate::FEW_ROWS_MAX`]), warps per block, the neighbouring output columns a
/// warp computes together, and the longest rows its LayerNorm prologue stages.
pub(crate) const FEW_ROWS_SMALL: usize = 4;
pub(crate) const FEW_ROWS_LARGE: usize = 8;
pub(crate) const FEW_ROW_WARPS: usize = 8;
pub(crate) const FEW_ROW_COLUMNS: usize = 2;
pub(crate) const FEW_ROW_LAYERNORM_K_MAX: usize = 1024;
/// The tiled kernel for the head's products (`kernels/linear.cu`): the most rows it takes, and
/// the neighbouring output columns a warp computes together.
pub(crate) const TILE_ROWS_MAX: usize = 16;
pub(crate) const TILE_COLUMNS: usize = 4;
/// Elements of a tensor per block of the many-tensor AdamW kernel.
pub(crate) const ADAMW_CHUNK: usize = 4096;

/// Threads of the one block that verifies a speculative step and drafts the next: a whole row
/// of V probabilities per component is read by it, so as many loads in flight as a block holds.
pub(crate) const STEP_THREADS: usize = 1024;
/// Where the speculative step leaves what the host reads back (`kernels/speculative.cu`): how
/// many drafts were accepted, the next token, 1 where the marginal it came from was not
/// finite, then the next step's drafts.
pub const STEP_ACCEPTED: usize = 0;
/// the token after the accepted drafts
pub const STEP_NEXT: usize = 1;
/// 1 where the marginal the next token came from was not finite
pub const STEP_NOT_FINITE: usize = 2;
/// where the next step's drafts start
pub const STEP_DRAFTS: usize = 3;
/// How the speculative step accepts sampled drafts: only `ACCEPT_EXACT` is correct (accept d
/// with probability min(1, p(d)/q(d)), else draw from max(0, p − q)); the others (accept every
/// draft; on rejection draw from p) exist for the test that shows a wrong rule is caught.
pub const ACCEPT_EXACT: usize = 0;
/// accept every draft (wrong)
pub const ACCEPT_ALWAYS: usize = 1;
/// the exact test, but a rejection draws from p instead of the residual (wrong)
pub const ACCEPT_RESAMPLE_FROM_TARGET: usize = 2;

/// What every kernel file is compiled with: `-DNAME=value` for each.
pub(crate) const KERNEL_DEFINES: [(&str, usize); 27] = [
    ("THREADS", THREADS),
    ("MAX_HORIZON", MAX_HORIZON),
    ("MAX_RANK", MAX_RANK),
    ("COLUMN_SUM_CHUNK", COLUMN_SUM_CHUNK),
    ("REDUCE_CHUNK", REDUCE_CHUNK),
    ("LAYERNORM_ROWS_PER_BLOCK", LAYERNORM_ROWS_PER_BLOCK),
    ("ATTENTION_TILE", ATTENTION_TILE),
    ("ATTENTION_THREADS", ATTENTION_THREADS),
    ("ATTENTION_TILE_PADDING", ATTENTION_TILE_PADDING),
    ("TC_STAGED_HEAD_SIZE_MAX", TC_STAGED_HEAD_SIZE_MAX),
    ("DECODE_THREADS", DECODE_THREADS),
    ("FEW_ROWS_SMALL", FEW_ROWS_SMALL),
    ("FEW_ROWS_LARGE", FEW_ROWS_LARGE),
    ("FEW_ROW_WARPS", FEW_ROW_WARPS),
    ("FEW_ROW_COLUMNS", FEW_ROW_COLUMNS),
    ("FEW_ROW_LAYERNORM_K_MAX", FEW_ROW_LAYERNORM_K_MAX),
    ("TILE_ROWS_MAX", TILE_ROWS_MAX),
    ("TILE_COLUMNS", TILE_COLUMNS),
    ("ADAMW_CHUNK", ADAMW_CHUNK),
    ("STEP_THREADS", STEP_THREADS),
    ("STEP_ACCEPTED", STEP_ACCEPTED),
    ("STEP_NEXT", STEP_NEXT),
    ("STEP_NOT_FINITE", STEP_NOT_FINITE),
    ("STEP_DRAFTS", STEP_DRAFTS),
    ("ACCEPT_EXACT", ACCEPT_EXACT),
    ("ACCEPT_ALWAYS", ACCEPT_ALWAYS),
    ("ACCEPT_RESAMPLE_FROM_TARGET", ACCEPT_RESAMPLE_FROM_TARGET),
];
