//! `multitoken-cuda`: the CUDA layer of multitoken, thin by design.
//!
//! - [`Gpu::new`] opens a device: a CUDA context, a stream, cuBLAS and cuBLASLt handles. The driver,
//!   the BLAS libraries and NVRTC load at run time, so this crate builds anywhere; where no driver is
//!   installed, opening a device returns [`CudaError::NoDriver`] instead of panicking.
//! - Kernels live in `kernels/*.cu` and are compiled by NVRTC for the device's architecture
//!   when the device is opened, once per process.
//! - Memory is a [`Buffer`] (an owned allocation) and [`View`]s into it: a device pointer and
//!   a length, `Copy`, as in C. The model code in the main crate slices one flat parameter
//!   buffer into many views, which Rust's borrow rules for `&mut` slices would not allow; in
//!   exchange every launcher checks the lengths of the views it is given.
//! - Everything runs in order on the one stream; only downloads wait for it.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{result as driver, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

/// The kernel sources, compiled at run time.
const KERNEL_SOURCES: [(&str, &str); 8] = [
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("linear", include_str!("../kernels/linear.cu")),
    ("layernorm", include_str!("../kernels/layernorm.cu")),
    ("adamw", include_str!("../kernels/adamw.cu")),
    ("embedding", include_str!("../kernels/embedding.cu")),
    ("attention", include_str!("../kernels/attention.cu")),
    ("fused_attention", include_str!("../kernels/fused_attention.cu")),
    ("head", include_str!("../kernels/head.cu")),
];

/// Limits of the head kernels (their per-thread arrays).
pub const MAX_HORIZON: usize = 16;
pub const MAX_RANK: usize = 16;

/// Head sizes the fused attention kernels are built for (`kernels/fused_attention.cu`).
pub const FUSED_ATTENTION_HEAD_SIZES: [usize; 4] = [16, 32, 64, 128];
/// Queries (keys) per tile of the fused attention kernels, threads per block.
const ATTENTION_TILE: usize = 64;
const ATTENTION_THREADS: u32 = 256;

/// Floats of shared memory the fused attention kernels use for head size `hs`: the forward
/// holds q, k, v and p tiles, the backward k, v, q, dy, p, ds tiles and two row vectors.
fn fused_attention_shared_floats(hs: usize, backward: bool) -> usize {
    let (head_tile, score_tile) = (ATTENTION_TILE * (hs + 4), ATTENTION_TILE * (ATTENTION_TILE + 4));
    if backward {
        4 * head_tile + 2 * score_tile + 2 * ATTENTION_TILE
    } else {
        3 * head_tile + score_tile
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver found (libcuda could not be loaded); use --device cpu, or install the NVIDIA driver")]
    NoDriver,
    #[error("CUDA device {0} is not available: {1}")]
    NoDevice(usize, String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS error: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("cuBLASLt error: {0}")]
    BlasLt(#[from] cudarc::cublaslt::result::CublasError),
    #[error("compiling the CUDA kernels failed: {0}")]
    Compile(String),
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Whether a CUDA driver can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC (the run-time compiler) can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// What every kernel file shares (constants, warp and block reductions), prepended to each.
const KERNEL_COMMON: &str = include_str!("../kernels/common.cuh");

fn compile(module: &str, source: &str, architecture: &str) -> Result<cudarc::nvrtc::Ptx> {
    let options = cudarc::nvrtc::CompileOptions { options: vec![format!("--gpu-architecture={architecture}")], ..Default::default() };
    let source = format!("{KERNEL_COMMON}\n{source}");
    cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| CudaError::Compile(format!("{module}.cu (after common.cuh): {e}")))
}

/// Compiles every kernel for `architecture` (such as `compute_90`) without a device: NVRTC
/// alone, so that a machine without a GPU can check the kernels' source.
pub fn compile_all_kernels(architecture: &str) -> Result<()> {
    for (module, source) in KERNEL_SOURCES {
        compile(module, source, architecture)?;
    }
    Ok(())
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Shape(what()))
    }
}

/// A device pointer and a length in elements: a window into a [`Buffer`].
#[derive(Debug)]
pub struct View<T> {
    ptr: u64,
    len: usize,
    _element: PhantomData<T>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for View<T> {}

impl<T> View<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `offset..offset + len`. Panics when that is out of range (a programming error).
    pub fn slice(self, offset: usize, len: usize) -> View<T> {
        assert!(offset + len <= self.len, "view slice {offset}..{} out of 0..{}", offset + len, self.len);
        View { ptr: self.ptr + (offset * std::mem::size_of::<T>()) as u64, len, _element: PhantomData }
    }

    /// The first `len` elements.
    pub fn prefix(self, len: usize) -> View<T> {
        self.slice(0, len)
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

/// Page-locked host memory of `len` elements: the driver copies from the device straight into
/// it, where a download into ordinary (pageable) memory goes through the driver's own staging
/// buffer piece by piece, at a fraction of the speed.
pub struct PinnedBuffer<T> {
    ptr: *mut T,
    len: usize,
    context: Arc<CudaContext>,
}

impl<T> std::ops::Deref for PinnedBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr holds len initialised elements (zeroed at allocation, then copies of T).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> std::ops::DerefMut for PinnedBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in deref, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        if self.len > 0 && self.context.bind_to_thread().is_ok() {
            // SAFETY: the pointer came from malloc_host and is freed once.
            unsafe {
                let _ = driver::free_host(self.ptr as *mut std::ffi::c_void);
            }
        }
    }
}

/// Bytes held in [`Buffer`]s now, and the most held at once (as PyTorch's
/// `max_memory_allocated`: the allocations, not the context or cuBLAS workspaces).
#[derive(Default)]
struct MemoryCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

/// An owned device allocation of `len` elements, freed on drop.
pub struct Buffer<T> {
    view: View<T>,
    context: Arc<CudaContext>,
    memory: Arc<MemoryCounter>,
}

impl<T> Buffer<T> {
    pub fn view(&self) -> View<T> {
        self.view
    }

    pub fn len(&self) -> usize {
        self.view.len
    }

    pub fn is_empty(&self) -> bool {
        self.view.len == 0
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        if self.view.len > 0 && self.context.bind_to_thread().is_ok() {
            // SAFETY: the pointer came from malloc_sync and is freed once; the device is
            // synchronised first so that no queued kernel still uses it.
            unsafe {
                let _ = driver::ctx::synchronize();
                let _ = driver::free_sync(self.view.ptr);
            }
            self.memory.live.fetch_sub(self.view.bytes(), Ordering::Relaxed);
        }
    }
}

struct Kernels {
    gelu_forward: CudaFunction,
    gelu_backward: CudaFunction,
    add: CudaFunction,
    broadcast_rows: CudaFunction,
    column_sums_add: CudaFunction,
    sum_of_squares: CudaFunction,
    layernorm_forward: CudaFunction,
    layernorm_forward_wide: CudaFunction,
    layernorm_backward: CudaFunction,
    adamw_update_segments: CudaFunction,
    embedding_forward: CudaFunction,
    embedding_forward_at: CudaFunction,
    embedding_backward_tokens: CudaFunction,
    embedding_backward_positions: CudaFunction,
    qkv_to_heads: CudaFunction,
    heads_to_qkv: CudaFunction,
    heads_rows: CudaFunction,
    causal_softmax_forward: CudaFunction,
    causal_softmax_backward: CudaFunction,
    head_position: CudaFunction,
    softmax_rows: CudaFunction,
    append_kv: CudaFunction,
    decode_attention: CudaFunction,
    gate_log_softmax: CudaFunction,
    head_statistics: CudaFunction,
    gate_gradient: CudaFunction,
    attention_row_dots: CudaFunction,
    /// `linear_few_rows` for up to 4 rows, and for up to 8
    linear_few_rows: [CudaFunction; 2],
    /// (head size, forward, backward)
    fused_attention: Vec<(usize, CudaFunction, CudaFunction)>,
}

/// The constants of one AdamW update (PyTorch semantics; `t` counts from 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub t: u32,
    /// the gradient is multiplied by this first (global-norm clipping; 1 for none)
    pub grad_scale: f32,
}

/// One operand of a matrix product: its view, and whether it is stored transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub data: View<f32>,
    pub transposed: bool,
    /// elements between consecutive matrices of a batch (0 for a single matrix)
    pub batch_stride: usize,
    /// elements between consecutive stored rows (0: the stored row length, a dense matrix);
    /// larger when the matrix is a block of columns of a wider one
    pub leading: usize,
}

impl Operand {
    pub fn normal(data: View<f32>) -> Self {
        Operand { data, transposed: false, batch_stride: 0, leading: 0 }
    }

    pub fn transposed(data: View<f32>) -> Self {
        Operand { data, transposed: true, batch_stride: 0, leading: 0 }
    }

    /// Stored rows are `leading` elements apart.
    pub fn leading(self, leading: usize) -> Self {
        Operand { leading, ..self }
    }

    /// The stored row length and the leading dimension of a logical (rows, cols) matrix, after
    /// checking that `batch` of them fit in the view.
    fn layout(&self, rows: usize, cols: usize, batch: usize) -> Option<usize> {
        let (stored_rows, stored_cols) = if self.transposed { (cols, rows) } else { (rows, cols) };
        let leading = if self.leading == 0 { stored_cols } else { self.leading };
        let needed = self.batch_stride * (batch - 1) + (stored_rows - 1) * leading + stored_cols;
        (leading >= stored_cols && self.data.len >= needed).then_some(leading)
    }

    pub fn strided(self, batch_stride: usize) -> Self {
        Operand { batch_stride, ..self }
    }
}

/// Which cuBLAS entry point single matrix products go through (batched products always use
/// `cublasSgemmStridedBatched`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmRoute {
    /// `cublasSgemm`
    Blas,
    /// `cublasLtMatmul` with its heuristic's first choice (what PyTorch's `addmm` uses)
    BlasLt,
}

/// The cuBLASLt handle and its workspace.
struct BlasLt {
    handle: cudarc::cublaslt::sys::cublasLtHandle_t,
    workspace: Buffer<u8>,
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by create_handle and is destroyed once.
        unsafe {
            let _ = cudarc::cublaslt::result::destroy_handle(self.handle);
        }
    }
}

/// What a cuBLASLt product's plan depends on (pointers and β are passed per call).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct LtKey {
    /// whether A, B are transposed
    transposed: [bool; 2],
    m: usize,
    n: usize,
    k: usize,
    lda: i32,
    ldb: i32,
    /// the bias epilogue
    bias: bool,
    tf32: bool,
}

/// A cuBLASLt product made ready: descriptor, matrix layouts, and the heuristic's algorithm.
struct LtPlan {
    desc: cudarc::cublaslt::sys::cublasLtMatmulDesc_t,
    a_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    b_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    c_layout: cudarc::cublaslt::sys::cublasLtMatrixLayout_t,
    algo: cudarc::cublaslt::sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the handles are plain descriptors, used under the Gpu's mutex only.
unsafe impl Send for LtPlan {}

impl LtPlan {
    unsafe fn new(handle: cudarc::cublaslt::sys::cublasLtHandle_t, key: LtKey, workspace_bytes: usize) -> Result<Self> {
        use cudarc::cublaslt::{result as lt, sys as lt_sys};
        let f32_type = lt_sys::cudaDataType_t::CUDA_R_32F;
        let compute = if key.tf32 {
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let (a_rows, a_cols) = if key.transposed[0] { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if key.transposed[1] { (n, k) } else { (k, n) };
        let mut plan = LtPlan {
            desc: lt::create_matmul_desc(compute, f32_type)?,
            a_layout: lt::create_matrix_layout(f32_type, a_rows, a_cols, key.lda as i64)?,
            b_layout: lt::create_matrix_layout(f32_type, b_rows, b_cols, key.ldb as i64)?,
            c_layout: lt::create_matrix_layout(f32_type, m, n, m as i64)?,
            algo: std::mem::zeroed(),
        };
        let set_desc =
            |attribute, value: *const std::ffi::c_void, bytes: usize| lt::set_matmul_desc_attribute(plan.desc, attribute, value, bytes);
        for (attribute, transposed) in [
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.transposed[0]),
            (lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.transposed[1]),
        ] {
            let op = if transposed { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N } as i32;
            set_desc(attribute, (&op) as *const i32 as *const _, std::mem::size_of::<i32>())?;
        }
        if key.bias {
            // D = op(A)·op(B) + bias, the bias added to every column (a row of the row-major result)
            let epilogue = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            let attribute = lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE;
            set_desc(attribute, (&epilogue) as *const _ as *const _, std::mem::size_of_val(&epilogue))?;
        }
        let preference = lt::create_matmul_pref()?;
        let heuristic = lt::set_matmul_pref_attribute(
            preference,
            lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&workspace_bytes) as *const usize as *const _,
            std::mem::size_of::<usize>(),
        )
        .and_then(|()| {
            lt::get_matmul_algo_heuristic(handle, plan.desc, plan.a_layout, plan.b_layout, plan.c_layout, plan.c_layout, preference)
        });
        lt::destroy_matmul_pref(preference)?;
        // (the plan is dropped, and its descriptors destroyed, if there is no algorithm)
        plan.algo = heuristic?.algo;
        Ok(plan)
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as lt;
        // SAFETY: each was created once, in LtPlan::new, and is destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for layout in [self.a_layout, self.b_layout, self.c_layout] {
                let _ = lt::destroy_matrix_layout(layout);
            }
        }
    }
}

/// Bytes of cuBLAS and cuBLASLt workspace (NVIDIA's recommendation for Hopper).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// An open device: context, stream, cuBLAS, compiled kernels.
pub struct Gpu {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cuBLASLt plans by shape
    lt_plans: std::sync::Mutex<std::collections::HashMap<LtKey, LtPlan>>,
    blas_lt: BlasLt,
    /// cuBLAS's workspace, kept alive while the handle lives (fields drop in order)
    _blas_workspace: Buffer<u8>,
    /// the entry point of single matrix products
    pub gemm_route: GemmRoute,
    /// linear layers on up to [`FEW_ROWS_MAX`] rows through `linear_few_rows` (else cuBLASLt)
    pub few_row_linear: bool,
    /// the most blocks `linear_few_rows` aims for: as many as run at once (of its 4-row
    /// instance; `examples/gemm_probe.rs` tries others)
    pub few_row_blocks: usize,
    few_row_scratch: FewRowScratch,
    kernels: Kernels,
    /// use TF32 tensor cores in matmul (`--precision tf32`)
    pub tf32: bool,
    name: String,
    memory: Arc<MemoryCounter>,
    /// destroys `stream` after everything above that queues work on it (fields drop in order)
    _stream_owner: OwnedStream,
}

/// A stream of our own (not the legacy default stream, which cannot be captured into a graph),
/// created blocking: like the default stream, it waits for the synchronous copies and sets
/// that the driver runs on the default stream, and they wait for it.
/// It holds the context, so that the context outlives the stream.
struct OwnedStream {
    stream: cudarc::driver::sys::CUstream,
    context: Arc<CudaContext>,
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        // SAFETY: created in `Gpu::new` in this context, which is still alive, and destroyed once,
        // after the work queued on it is done.
        unsafe {
            if self.context.bind_to_thread().is_ok() {
                let _ = driver::stream::synchronize(self.stream);
                let _ = driver::stream::destroy(self.stream);
            }
        }
    }
}

/// A pass of kernels recorded once by [`Gpu::capture`] and run again by [`Gpu::replay`].
pub struct Graph(cudarc::driver::CudaGraph);

const THREADS: u32 = 256;

/// The most rows `linear_few_rows` takes (its wider instance's `FEW_ROWS_MAX`), its columns per
/// block (`TILE_COLUMNS`) and the most rows of the weight per block (`K_CHUNK_MAX`).
pub const FEW_ROWS_MAX: usize = 8;
const FEW_ROW_TILE_COLUMNS: usize = 128;
const FEW_ROW_K_CHUNK_MAX: usize = 128;
/// Floats of x's rows (rows · k) the LayerNorm prologue of `linear_few_rows` stages, per row
/// its instance takes.
const FEW_ROW_LAYERNORM_FLOATS_PER_ROW: usize = 1024;
/// Floats of the blocks' partial sums, and column tiles with an arrival counter.
const FEW_ROW_PARTIALS: usize = 1 << 20;
const FEW_ROW_TILES_MAX: usize = 1024;

/// `linear_few_rows`'s scratch: partial sums of blocks that split the weight's rows, and one
/// arrival counter per column tile (each back at zero when the kernel ends).
struct FewRowScratch {
    partials: Buffer<u8>,
    arrivals: Buffer<u8>,
}

/// What [`Gpu::linear_few_rows`] does to the product before it writes it.
#[derive(Clone, Copy, Debug)]
pub enum Epilogue {
    /// `out = x·w + b`
    Bias,
    /// `out = gelu(x·w + b)`
    Gelu,
    /// `out = residual + x·w + b`
    Residual(View<f32>),
}
/// Up to this many rows, LayerNorm takes a block per row (decoding) instead of a warp.
const FEW_ROWS: usize = 64;
/// Threads per block of the decoding attention kernel (its `DECODE_THREADS`).
const DECODE_THREADS: u32 = 256;
/// Rows per block in the LayerNorm backward kernel (its `ROWS_PER_BLOCK`).
const LAYERNORM_ROWS_PER_BLOCK: u32 = 32;
/// The widest LayerNorm whose backward partial sums (2·c floats) fit in 48 KiB of shared memory.
pub const MAX_LAYERNORM_WIDTH: usize = 6144;
/// Rows per block in the column-sum kernel (its `COLUMN_SUM_CHUNK`).
const COLUMN_SUM_CHUNK: u32 = 256;

fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u64).div_ceil(THREADS as u64) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row, 8 rows per block of 256 threads.
fn warp_per_row_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(8), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block of 256 threads per row.
fn block_per_row_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Opens device `ordinal`; [`CudaError::NoDriver`] where no driver is installed.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        let context = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(ordinal, e.to_string()))?;
        context.bind_to_thread()?;
        // SAFETY: a fresh stream of this context, destroyed by its `OwnedStream` when the Gpu drops.
        let (stream, stream_owner) = unsafe {
            let cu_stream = driver::stream::create(driver::stream::StreamKind::Default)?;
            (context.wrap_borrowed_stream(cu_stream), OwnedStream { stream: cu_stream, context: context.clone() })
        };
        let blas = CudaBlas::new(stream.clone())?;
        let (major, minor) = context.compute_capability()?;
        let name = context.name().unwrap_or_else(|_| "CUDA device".into());
        let mut modules = std::collections::HashMap::new();
        for (module, source) in KERNEL_SOURCES {
            let ptx = compile(module, source, &format!("compute_{major}{minor}"))?;
            modules.insert(module, context.load_module(ptx)?);
        }
        let f = |module: &str, name: &str| modules[module].load_function(name);
        let kernels = Kernels {
            gelu_forward: f("elementwise", "gelu_forward")?,
            gelu_backward: f("elementwise", "gelu_backward")?,
            add: f("elementwise", "add")?,
            broadcast_rows: f("elementwise", "broadcast_rows")?,
            column_sums_add: f("elementwise", "column_sums_add")?,
            sum_of_squares: f("elementwise", "sum_of_squares")?,
            layernorm_forward: f("layernorm", "layernorm_forward")?,
            layernorm_forward_wide: f("layernorm", "layernorm_forward_wide")?,
            layernorm_backward: f("layernorm", "layernorm_backward")?,
            adamw_update_segments: f("adamw", "adamw_update_segments")?,
            embedding_forward: f("embedding", "embedding_forward")?,
            embedding_forward_at: f("embedding", "embedding_forward_at")?,
            embedding_backward_tokens: f("embedding", "embedding_backward_tokens")?,
            embedding_backward_positions: f("embedding", "embedding_backward_positions")?,
            qkv_to_heads: f("attention", "qkv_to_heads")?,
            heads_to_qkv: f("attention", "heads_to_qkv")?,
            heads_rows: f("attention", "heads_rows")?,
            causal_softmax_forward: f("attention", "causal_softmax_forward")?,
            causal_softmax_backward: f("attention", "causal_softmax_backward")?,
            head_position: f("head", "head_position")?,
            softmax_rows: f("head", "softmax_rows")?,
            append_kv: f("attention", "append_kv")?,
            decode_attention: f("attention", "decode_attention")?,
            gate_log_softmax: f("head", "gate_log_softmax")?,
            head_statistics: f("head", "head_statistics")?,
            gate_gradient: f("head", "gate_gradient")?,
            attention_row_dots: f("fused_attention", "attention_row_dots")?,
            linear_few_rows: [f("linear", "linear_few_rows_4")?, f("linear", "linear_few_rows_8")?],
            fused_attention: FUSED_ATTENTION_HEAD_SIZES
                .iter()
                .map(|&hs| {
                    let forward = f("fused_attention", &format!("fused_attention_forward_{hs}"))?;
                    let backward = f("fused_attention", &format!("fused_attention_backward_{hs}"))?;
                    // more than the default 48 KiB of shared memory per block
                    for (kernel, is_backward) in [(&forward, false), (&backward, true)] {
                        let bytes = (4 * fused_attention_shared_floats(hs, is_backward)) as i32;
                        kernel.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)?;
                    }
                    Ok((hs, forward, backward))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let memory = Arc::new(MemoryCounter::default());
        let allocate = |bytes: usize| -> Result<Buffer<u8>> {
            context.bind_to_thread()?;
            // SAFETY: a fresh allocation, only ever handed to cuBLAS as scratch space.
            let ptr = unsafe { driver::malloc_sync(bytes)? };
            Ok(Buffer { view: View { ptr, len: bytes, _element: PhantomData }, context: context.clone(), memory: memory.clone() })
        };
        let blas_workspace = allocate(BLAS_WORKSPACE_BYTES)?;
        // SAFETY: the workspace outlives the handle (both live in the Gpu; the handle drops first).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), blas_workspace.view.ptr as *mut _, BLAS_WORKSPACE_BYTES).result()?;
        }
        let blas_lt = BlasLt { handle: cudarc::cublaslt::result::create_handle()?, workspace: allocate(BLAS_WORKSPACE_BYTES)? };
        let multiprocessors = context.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let few_row_scratch = FewRowScratch { partials: allocate(4 * FEW_ROW_PARTIALS)?, arrivals: allocate(4 * FEW_ROW_TILES_MAX)? };
        let resident = kernels.linear_few_rows[0].occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)?;
        let few_row_blocks = multiprocessors.max(1) as usize * resident.max(1) as usize;
        // SAFETY: a fresh allocation of FEW_ROW_TILES_MAX counters, which start at zero.
        unsafe { driver::memset_d8_sync(few_row_scratch.arrivals.view.ptr, 0, 4 * FEW_ROW_TILES_MAX)? };
        Ok(Gpu {
            context,
            stream,
            blas,
            lt_plans: Default::default(),
            blas_lt,
            _blas_workspace: blas_workspace,
            gemm_route: GemmRoute::BlasLt,
            few_row_linear: true,
            few_row_blocks,
            few_row_scratch,
            kernels,
            tf32: false,
            name,
            memory,
            _stream_owner: stream_owner,
        })
    }

    /// Records the work that `issue` queues on this device, without running it, as a graph that
    /// [`Gpu::replay`] runs with one launch. A decoding pass is some 80 small kernels; launched
    /// one by one, each costs the host microseconds that the device spends waiting. `issue` may
    /// only queue kernels and products (no copies to or from the host, nothing that waits), and
    /// what they read at run time (a `CachePosition`'s device copy) may change between replays;
    /// their arguments may not.
    pub fn capture<E: From<CudaError>>(&self, issue: impl FnOnce() -> std::result::Result<(), E>) -> std::result::Result<Graph, E> {
        self.context.bind_to_thread().map_err(CudaError::from)?;
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream.begin_capture(mode).map_err(CudaError::from)?;
        let issued = issue();
        // end the capture in any case, so that the stream takes work again
        let captured = self.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        issued?;
        let graph = captured.map_err(CudaError::from)?;
        Ok(graph.map(Graph).ok_or_else(|| CudaError::Shape("capture: nothing was queued".into()))?)
    }

    /// Queues a captured graph's work once more.
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        Ok(graph.0.launch()?)
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.context.bind_to_thread()?;
        Ok(driver::mem_get_info()?)
    }

    /// A zero-filled allocation of `len` elements.
    pub fn zeros<T>(&self, len: usize) -> Result<Buffer<T>> {
        self.context.bind_to_thread()?;
        let bytes = len * std::mem::size_of::<T>();
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: a fresh allocation, zeroed before anyone reads it.
            unsafe {
                let ptr = driver::malloc_sync(bytes)?;
                driver::memset_d8_sync(ptr, 0, bytes)?;
                ptr
            }
        };
        let live = self.memory.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.memory.peak.fetch_max(live, Ordering::Relaxed);
        Ok(Buffer { view: View { ptr, len, _element: PhantomData }, context: self.context.clone(), memory: self.memory.clone() })
    }

    /// Bytes held in buffers now.
    pub fn allocated_bytes(&self) -> usize {
        self.memory.live.load(Ordering::Relaxed)
    }

    /// The most bytes held in buffers at once since the device was opened.
    pub fn peak_allocated_bytes(&self) -> usize {
        self.memory.peak.load(Ordering::Relaxed)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buffer<T>> {
        let buffer = self.zeros::<T>(host.len())?;
        self.write(buffer.view(), host)?;
        Ok(buffer)
    }

    /// Copies `host` into `target` (same length), after the work already queued.
    pub fn write<T: DeviceRepr>(&self, target: View<T>, host: &[T]) -> Result<()> {
        check(target.len == host.len(), || format!("write: {} elements into a view of {}", host.len(), target.len))?;
        if host.is_empty() {
            return Ok(());
        }
        self.synchronize()?;
        // SAFETY: lengths checked; the stream is idle, so no kernel reads the target meanwhile.
        unsafe { driver::memcpy_htod_sync(target.ptr, host)? };
        Ok(())
    }

    /// Waits for the queued work, then copies `source` to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, source: View<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); source.len];
        self.download_into(source, &mut host)?;
        Ok(host)
    }

    /// Page-locked host memory for `len` elements of a plain numeric type, zeroed.
    pub fn pinned<T: DeviceRepr + Default + Copy>(&self, len: usize) -> Result<PinnedBuffer<T>> {
        self.context.bind_to_thread()?;
        let bytes = len * std::mem::size_of::<T>();
        let ptr = if bytes == 0 {
            std::ptr::NonNull::<T>::dangling().as_ptr()
        } else {
            // SAFETY: a fresh allocation of `bytes`, every element then written before use.
            unsafe {
                let ptr = driver::malloc_host(bytes, 0)? as *mut T;
                for i in 0..len {
                    ptr.add(i).write(T::default());
                }
                ptr
            }
        };
        Ok(PinnedBuffer { ptr, len, context: self.context.clone() })
    }

    /// Waits for the queued work, then copies `source` into `target` (same length; page-locked
    /// memory from [`Gpu::pinned`] makes this several times faster than [`Gpu::download`]).
    pub fn download_into<T: DeviceRepr>(&self, source: View<T>, target: &mut [T]) -> Result<()> {
        check(target.len() == source.len, || format!("download_into: {} elements into {}", source.len, target.len()))?;
        if target.is_empty() {
            return Ok(());
        }
        self.synchronize()?;
        // SAFETY: the target holds exactly source.len elements.
        unsafe { driver::memcpy_dtoh_sync(target, source.ptr)? };
        Ok(())
    }

    /// Sets every element of `target` to zero (queued).
    pub fn fill_zero<T>(&self, target: View<T>) -> Result<()> {
        if target.len > 0 {
            self.context.bind_to_thread()?;
            // SAFETY: the view lies inside a live allocation.
            unsafe { driver::memset_d8_async(target.ptr, 0, target.bytes(), self.stream.cu_stream())? };
        }
        Ok(())
    }

    /// Copies `source` into `target` on the device (queued).
    pub fn copy<T>(&self, source: View<T>, target: View<T>) -> Result<()> {
        check(source.len == target.len, || format!("copy: {} elements into a view of {}", source.len, target.len))?;
        if source.len > 0 {
            self.context.bind_to_thread()?;
            // SAFETY: equal lengths inside live allocations.
            unsafe { driver::memcpy_dtod_async(target.ptr, source.ptr, source.bytes(), self.stream.cu_stream())? };
        }
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// `c (m,n) = a (m,k) · b (k,n)` (plus c itself when `accumulate`), row-major, for `batch`
    /// matrices at the operands' batch strides. Through cuBLAS: f32, or TF32 when `self.tf32`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_batched(
        &self,
        a: Operand,
        b: Operand,
        c: View<f32>,
        m: usize,
        k: usize,
        n: usize,
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        check(c.len == batch * m * n, || format!("matmul: c holds {}, not {batch} × {m}×{n}", c.len))?;
        let c = Operand::normal(c).strided(if batch > 1 { m * n } else { 0 });
        self.matmul_general(a, b, c, m, k, n, batch, accumulate)
    }

    /// As [`Gpu::matmul_batched`], with `c` given as an operand too (its own batch stride and
    /// leading dimension; not transposed): products written into blocks of larger matrices.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_general(
        &self,
        a: Operand,
        b: Operand,
        c: Operand,
        m: usize,
        k: usize,
        n: usize,
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        let shapes = (batch >= 1 && m > 0 && k > 0 && n > 0 && !c.transposed)
            .then(|| Some((a.layout(m, k, batch)?, b.layout(k, n, batch)?, c.layout(m, n, batch)?)))
            .flatten();
        let Some((a_leading, b_leading, c_leading)) = shapes else {
            return Err(CudaError::Shape(format!(
                "matmul: operands do not hold {batch} products {m}×{k} · {k}×{n} (a {}, b {}, c {})",
                a.data.len, b.data.len, c.data.len
            )));
        };
        let dense = a.leading == 0 && b.leading == 0 && c.leading == 0;
        let (c_stride, c) = (c.batch_stride, c.data);
        // cuBLAS is column-major: a row-major C = A·B is the column-major Cᵀ = Bᵀ·Aᵀ.
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        let math = if self.tf32 { cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH } else { cublasMath_t::CUBLAS_DEFAULT_MATH };
        let handle = *self.blas.handle();
        let (lda, ldb, ldc) = (b_leading as i32, a_leading as i32, c_leading as i32);
        // SAFETY: the handle is ours and bound to our stream; the sizes were checked above.
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(handle, math).result()?;
            let (b_ptr, a_ptr, c_ptr) = (b.data.ptr as *const f32, a.data.ptr as *const f32, c.ptr as *mut f32);
            let (op_b, op_a) = (op(b.transposed), op(a.transposed));
            if batch == 1 && dense && self.gemm_route == GemmRoute::BlasLt {
                self.lt_matmul(op_b, op_a, n, m, k, b_ptr, lda, a_ptr, ldb, beta, c_ptr, c_ptr, None)?;
            } else if batch == 1 {
                cudarc::cublas::sys::cublasSgemm_v2(
                    handle, op_b, op_a, n as i32, m as i32, k as i32, &alpha, b_ptr, lda, a_ptr, ldb, &beta, c_ptr, ldc,
                )
                .result()?;
            } else {
                cudarc::cublas::sys::cublasSgemmStridedBatched(
                    handle,
                    op_b,
                    op_a,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha,
                    b_ptr,
                    lda,
                    b.batch_stride as i64,
                    a_ptr,
                    ldb,
                    a.batch_stride as i64,
                    &beta,
                    c_ptr,
                    ldc,
                    c_stride as i64,
                    batch as i32,
                )
                .result()?;
            }
        }
        Ok(())
    }

    /// Column-major `D (m,n) = op(A) (m,k) · op(B) (k,n) + beta·C (+ bias)` through cuBLASLt.
    /// The descriptors and the heuristic's algorithm are made once per shape and kept
    /// ([`LtPlan`]): asking the heuristic costs more host time than a small product takes on
    /// the device, which is what decoding does, token after token.
    #[allow(clippy::too_many_arguments)]
    unsafe fn lt_matmul(
        &self,
        op_a: cublasOperation_t,
        op_b: cublasOperation_t,
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *const f32,
        d: *mut f32,
        bias: Option<View<f32>>,
    ) -> Result<()> {
        use cudarc::cublaslt::{result as lt, sys as lt_sys};
        let transposed = [op_a, op_b].map(|op| op == cublasOperation_t::CUBLAS_OP_T);
        let key = LtKey { transposed, m, n, k, lda, ldb, bias: bias.is_some(), tf32: self.tf32 };
        let mut plans = self.lt_plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(LtPlan::new(self.blas_lt.handle, key, self.blas_lt.workspace.len())?)
            }
        };
        if let Some(bias) = bias {
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias.ptr) as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )?;
        }
        let alpha = 1.0f32;
        lt::matmul(
            self.blas_lt.handle,
            plan.desc,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            a as *const _,
            plan.a_layout,
            b as *const _,
            plan.b_layout,
            c as *const _,
            plan.c_layout,
            d as *mut _,
            plan.c_layout,
            (&plan.algo) as *const _,
            self.blas_lt.workspace.view.ptr as *mut _,
            self.blas_lt.workspace.len(),
            self.stream.cu_stream() as *mut _,
        )?;
        Ok(())
    }

    /// A linear layer: `out (rows, n_out) = x (rows, n_in) · weight (n_in, n_out) + bias`, the
    /// bias added by the matrix product's epilogue (cuBLASLt) or, on the plain cuBLAS route, by
    /// filling `out` with it first.
    pub fn linear(&self, x: View<f32>, weight: View<f32>, bias: View<f32>, out: View<f32>) -> Result<()> {
        self.linear_plus(x, weight, bias, None, out)
    }

    /// A linear layer on a residual stream: `out = residual + x · weight + bias`, the residual
    /// added by the product itself (cuBLASLt reads it as C with β = 1 and writes D = out).
    pub fn linear_residual(&self, x: View<f32>, weight: View<f32>, bias: View<f32>, residual: View<f32>, out: View<f32>) -> Result<()> {
        check(residual.len == out.len, || "linear_residual: residual and out differ in length".into())?;
        self.linear_plus(x, weight, bias, Some(residual), out)
    }

    /// `out = gelu(x · weight + bias)`: one kernel on a few rows, else the product then the GELU.
    pub fn linear_gelu(&self, x: View<f32>, weight: View<f32>, bias: View<f32>, out: View<f32>) -> Result<()> {
        if self.linear_few_rows(x, None, weight, bias, Epilogue::Gelu, out)? {
            return Ok(());
        }
        self.linear(x, weight, bias, out)?;
        self.gelu_forward(out, out)
    }

    fn linear_plus(&self, x: View<f32>, weight: View<f32>, bias: View<f32>, residual: Option<View<f32>>, out: View<f32>) -> Result<()> {
        let n_out = bias.len;
        check(n_out > 0 && out.len.is_multiple_of(n_out) && weight.len.is_multiple_of(n_out), || "linear: shapes do not fit".into())?;
        let (rows, n_in) = (out.len / n_out, weight.len / n_out);
        check(x.len == rows * n_in, || format!("linear: x has {} elements, not {rows}×{n_in}", x.len))?;
        let epilogue = residual.map_or(Epilogue::Bias, Epilogue::Residual);
        if self.linear_few_rows(x, None, weight, bias, epilogue, out)? {
            return Ok(());
        }
        if self.gemm_route == GemmRoute::Blas {
            self.broadcast_rows(bias, out)?;
            self.matmul(Operand::normal(x), Operand::normal(weight), out, rows, n_in, n_out, true)?;
            return match residual {
                Some(residual) => self.add(out, residual, out),
                None => Ok(()),
            };
        }
        let op_n = cublasOperation_t::CUBLAS_OP_N;
        let (beta, c) = match residual {
            Some(residual) => (1.0, residual.ptr as *const f32),
            None => (0.0, out.ptr as *const f32),
        };
        // SAFETY: sizes checked above; column-major out (n_out, rows) = weight (n_out, n_in) · x (n_in, rows).
        unsafe {
            self.lt_matmul(
                op_n,
                op_n,
                n_out,
                rows,
                n_in,
                weight.ptr as *const f32,
                n_out as i32,
                x.ptr as *const f32,
                n_in as i32,
                beta,
                c,
                out.ptr as *mut f32,
                Some(bias),
            )
        }
    }

    /// Decoding's linear layers in one kernel: `out (rows, n) = epilogue(x' · weight + bias)`, where
    /// x' is x (rows, k), or its LayerNorm with `layernorm = Some((gain, shift))`, and weight is
    /// (k, n). Returns `Ok(false)`, having done nothing, where the kernel does not apply: more than
    /// [`FEW_ROWS_MAX`] rows, n not a multiple of 4, views not 16-byte aligned, or
    /// `few_row_linear` off; the caller then takes the general route.
    pub fn linear_few_rows(
        &self,
        x: View<f32>,
        layernorm: Option<(View<f32>, View<f32>)>,
        weight: View<f32>,
        bias: View<f32>,
        epilogue: Epilogue,
        out: View<f32>,
    ) -> Result<bool> {
        let n = bias.len;
        check(n > 0 && out.len.is_multiple_of(n) && weight.len.is_multiple_of(n), || "linear: shapes do not fit".into())?;
        let (rows, k) = (out.len / n, weight.len / n);
        check(x.len == rows * k, || format!("linear: x has {} elements, not {rows}×{k}", x.len))?;
        if rows == 0 || k == 0 {
            return Ok(false);
        }
        let (instance, instance_rows) = if rows <= 4 { (0, 4) } else { (1, 8) };
        if let Some((gain, shift)) = layernorm {
            check(gain.len == k && shift.len == k, || format!("linear: the LayerNorm's parameters are not {k} long"))?;
            // the kernel stages x's whole rows in float4s
            if rows * k > FEW_ROW_LAYERNORM_FLOATS_PER_ROW * instance_rows || !k.is_multiple_of(4) || !x.ptr.is_multiple_of(16) {
                return Ok(false);
            }
        }
        let residual = match epilogue {
            Epilogue::Residual(residual) => {
                check(residual.len == out.len, || "linear: residual and out differ in length".into())?;
                Some(residual)
            }
            _ => None,
        };
        let aligned = [weight.ptr, bias.ptr, out.ptr].iter().chain(residual.map(|v| v.ptr).iter()).all(|p| p.is_multiple_of(16));
        // as many blocks as run at once (a second wave would double the time), unless w's rows
        // need more; the split depends on (k, n) and the device only, so that a row's sums run
        // in the same order however many rows come with it
        let tiles = n.div_ceil(FEW_ROW_TILE_COLUMNS);
        let scratch = &self.few_row_scratch;
        let splits = (self.few_row_blocks / tiles).max(k.div_ceil(FEW_ROW_K_CHUNK_MAX)).min(k.div_ceil(8)).max(1);
        let k_chunk = k.div_ceil(splits);
        let splits = k.div_ceil(k_chunk);
        let fits = splits == 1 || (tiles <= FEW_ROW_TILES_MAX && splits * rows * n <= FEW_ROW_PARTIALS);
        if !self.few_row_linear || rows > FEW_ROWS_MAX || !n.is_multiple_of(4) || !aligned || !fits {
            return Ok(false);
        }
        let null = 0u64;
        let (ln_gain, ln_shift) = layernorm.map_or((null, null), |(gain, shift)| (gain.ptr, shift.ptr));
        let residual_ptr = residual.map_or(null, |v| v.ptr);
        let (rows_i, k_i, n_i, k_chunk_i, gelu) =
            (rows as i32, k as i32, n as i32, k_chunk as i32, matches!(epilogue, Epilogue::Gelu) as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.linear_few_rows[instance]);
        launch.arg(&x.ptr).arg(&ln_gain).arg(&ln_shift).arg(&weight.ptr).arg(&bias.ptr).arg(&residual_ptr).arg(&out.ptr);
        launch.arg(&scratch.partials.view.ptr).arg(&scratch.arrivals.view.ptr);
        launch.arg(&rows_i).arg(&k_i).arg(&n_i).arg(&k_chunk_i).arg(&gelu);
        let config = LaunchConfig { grid_dim: (tiles as u32, splits as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: shapes and alignment checked above; the partial sums (splits·rows·n floats)
        // and the counters (one per tile) fit the scratch.
        unsafe { launch.launch(config) }?;
        Ok(true)
    }

    /// `c (m,n) = a (m,k) · b (k,n)` (plus c when `accumulate`); see [`Gpu::matmul_batched`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&self, a: Operand, b: Operand, c: View<f32>, m: usize, k: usize, n: usize, accumulate: bool) -> Result<()> {
        self.matmul_batched(a, b, c, m, k, n, 1, accumulate)
    }

    /// A kernel `(views…, long n)` over views of one length n, a thread per element.
    fn elementwise(&self, what: &str, kernel: &CudaFunction, views: &[View<f32>]) -> Result<()> {
        let len = views[0].len;
        check(views.iter().all(|v| v.len == len), || format!("{what}: buffers differ in length"))?;
        let n = len as i64;
        let mut launch = self.stream.launch_builder(kernel);
        for view in views {
            launch.arg(&view.ptr);
        }
        launch.arg(&n);
        // SAFETY: the kernel touches elements 0..n of each view, and each holds n.
        unsafe { launch.launch(elementwise_config(len)) }?;
        Ok(())
    }

    /// `out = gelu(x)`, elementwise.
    pub fn gelu_forward(&self, x: View<f32>, out: View<f32>) -> Result<()> {
        self.elementwise("gelu_forward", &self.kernels.gelu_forward, &[x, out])
    }

    /// `dx = dout · gelu'(x)`, elementwise.
    pub fn gelu_backward(&self, x: View<f32>, dout: View<f32>, dx: View<f32>) -> Result<()> {
        self.elementwise("gelu_backward", &self.kernels.gelu_backward, &[x, dout, dx])
    }

    /// `out = a + b`, elementwise (the residual connection).
    pub fn add(&self, a: View<f32>, b: View<f32>, out: View<f32>) -> Result<()> {
        self.elementwise("add", &self.kernels.add, &[a, b, out])
    }

    /// Every row of `out` (rows, bias.len()) becomes `bias`.
    pub fn broadcast_rows(&self, bias: View<f32>, out: View<f32>) -> Result<()> {
        let cols = bias.len;
        check(cols > 0 && out.len.is_multiple_of(cols), || "broadcast_rows: out is not whole rows of the bias".into())?;
        let (rows, cols_i) = ((out.len / cols) as i64, cols as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.broadcast_rows);
        launch.arg(&bias.ptr).arg(&out.ptr).arg(&rows).arg(&cols_i);
        // SAFETY: writes out[0..rows·cols], reads bias[0..cols]; one block per row.
        unsafe { launch.launch(block_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// `sums[j] += Σ_rows x[row, j]` for x (rows, sums.len()).
    pub fn column_sums_add(&self, x: View<f32>, sums: View<f32>) -> Result<()> {
        let cols = sums.len;
        check(cols > 0 && x.len.is_multiple_of(cols), || "column_sums_add: x is not whole rows".into())?;
        let (rows, cols_i) = ((x.len / cols) as i32, cols as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.column_sums_add);
        launch.arg(&x.ptr).arg(&sums.ptr).arg(&rows).arg(&cols_i);
        let chunks = (rows as u32).div_ceil(COLUMN_SUM_CHUNK).max(1);
        let config = LaunchConfig { grid_dim: ((cols as u32).div_ceil(32), chunks, 1), block_dim: (32, 32, 1), shared_mem_bytes: 0 };
        // SAFETY: reads x[0..rows·cols], updates sums[0..cols].
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// `total[0] += Σ x²`, accumulated in f64 (queued).
    pub fn sum_of_squares(&self, x: View<f32>, total: View<f64>) -> Result<()> {
        check(total.len == 1, || "sum_of_squares: total holds one f64".into())?;
        if x.len == 0 {
            return Ok(());
        }
        let n = x.len as i64;
        let mut launch = self.stream.launch_builder(&self.kernels.sum_of_squares);
        launch.arg(&x.ptr).arg(&n).arg(&total.ptr);
        let blocks = (x.len as u64).div_ceil(THREADS as u64).min(1024) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: grid-stride loop over x[0..n]; one f64 updated atomically.
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// LayerNorm of each row of x (rows, c); writes out and each row's mean and rstd.
    pub fn layernorm_forward(
        &self,
        x: View<f32>,
        weight: View<f32>,
        bias: View<f32>,
        out: View<f32>,
        mean: View<f32>,
        rstd: View<f32>,
    ) -> Result<()> {
        let (c, rows) = (weight.len, mean.len);
        check(x.len == rows * c && out.len == rows * c && bias.len == c && rstd.len == rows, || {
            format!("layernorm_forward: buffers do not fit {rows} rows of {c}")
        })?;
        let (rows_i, c_i) = (rows as i32, c as i32);
        if rows <= FEW_ROWS {
            let mut launch = self.stream.launch_builder(&self.kernels.layernorm_forward_wide);
            launch.arg(&x.ptr).arg(&weight.ptr).arg(&bias.ptr).arg(&out.ptr).arg(&mean.ptr).arg(&rstd.ptr).arg(&c_i);
            // SAFETY: sizes checked above; one block per row.
            unsafe { launch.launch(block_per_row_config(rows)) }?;
            return Ok(());
        }
        let mut launch = self.stream.launch_builder(&self.kernels.layernorm_forward);
        launch.arg(&x.ptr).arg(&weight.ptr).arg(&bias.ptr).arg(&out.ptr).arg(&mean.ptr).arg(&rstd.ptr).arg(&rows_i).arg(&c_i);
        // SAFETY: sizes checked above; one warp per row.
        unsafe { launch.launch(warp_per_row_config(rows)) }?;
        Ok(())
    }

    /// LayerNorm backward: adds into dx (the residual stream's gradient), dweight and dbias.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        &self,
        x: View<f32>,
        dout: View<f32>,
        weight: View<f32>,
        mean: View<f32>,
        rstd: View<f32>,
        dx: View<f32>,
        dweight: View<f32>,
        dbias: View<f32>,
    ) -> Result<()> {
        let (c, rows) = (weight.len, mean.len);
        check(c <= MAX_LAYERNORM_WIDTH, || format!("layernorm_backward: width {c} above {MAX_LAYERNORM_WIDTH}"))?;
        check(
            x.len == rows * c && dout.len == rows * c && dx.len == rows * c && rstd.len == rows && dweight.len == c && dbias.len == c,
            || format!("layernorm_backward: buffers do not fit {rows} rows of {c}"),
        )?;
        let (rows_i, c_i) = (rows as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.layernorm_backward);
        launch.arg(&x.ptr).arg(&dout.ptr).arg(&weight.ptr).arg(&mean.ptr).arg(&rstd.ptr);
        launch.arg(&dx.ptr).arg(&dweight.ptr).arg(&dbias.ptr).arg(&rows_i).arg(&c_i);
        let config = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(LAYERNORM_ROWS_PER_BLOCK), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (2 * c * std::mem::size_of::<f32>()) as u32,
        };
        // SAFETY: sizes checked above; the shared memory holds the block's 2·c partial sums.
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// AdamW over a flat buffer of parameters in one launch: parameter s spans
    /// `starts[s]..starts[s + 1]` (`starts` has one more entry than `flags`); `flags[s]` bit 0
    /// says whether to update it, bit 1 whether to decay it (then with `step.weight_decay`).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_update_segments(
        &self,
        params: View<f32>,
        grads: View<f32>,
        m: View<f32>,
        v: View<f32>,
        starts: View<i64>,
        flags: View<u32>,
        step: AdamWStep,
    ) -> Result<()> {
        let n = params.len;
        check(grads.len == n && m.len == n && v.len == n && starts.len == flags.len + 1 && !flags.is_empty(), || {
            "adamw_update_segments: buffers differ in length".into()
        })?;
        let bias_correction1 = 1.0 - step.beta1.powi(step.t as i32);
        let bias_correction2_sqrt = (1.0 - step.beta2.powi(step.t as i32)).sqrt();
        let (n_i, segments) = (n as i64, flags.len as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.adamw_update_segments);
        launch.arg(&params.ptr).arg(&grads.ptr).arg(&m.ptr).arg(&v.ptr).arg(&n_i).arg(&starts.ptr).arg(&flags.ptr).arg(&segments);
        launch.arg(&step.grad_scale).arg(&step.lr).arg(&step.beta1).arg(&step.beta2).arg(&step.eps).arg(&step.weight_decay);
        launch.arg(&bias_correction1).arg(&bias_correction2_sqrt);
        // SAFETY: all four views hold n elements; the starts are increasing offsets below n.
        unsafe { launch.launch(elementwise_config(n)) }?;
        Ok(())
    }

    /// `out[b,t] = wte[idx[b,t]] + wpe[t]` for idx (rows) with rows a multiple of `seq`.
    pub fn embedding_forward(&self, idx: View<u32>, wte: View<f32>, wpe: View<f32>, out: View<f32>, seq: usize, c: usize) -> Result<()> {
        let rows = idx.len;
        check(out.len == rows * c && wpe.len >= seq * c && wte.len.is_multiple_of(c) && seq > 0 && rows.is_multiple_of(seq), || {
            format!("embedding_forward: buffers do not fit {rows} rows of {c} with seq {seq}")
        })?;
        let (rows_i, seq_i, c_i) = (rows as i32, seq as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding_forward);
        launch.arg(&idx.ptr).arg(&wte.ptr).arg(&wpe.ptr).arg(&out.ptr).arg(&rows_i).arg(&seq_i).arg(&c_i);
        // SAFETY: token ids are checked against the vocabulary by the caller; sizes above.
        unsafe { launch.launch(elementwise_config(rows * c)) }?;
        Ok(())
    }

    /// Decoding: `out[row] = wte[idx[row]] + wpe[at.start + row]` for the new rows `idx`.
    pub fn embedding_forward_at(
        &self,
        idx: View<u32>,
        wte: View<f32>,
        wpe: View<f32>,
        out: View<f32>,
        at: CachePosition,
        c: usize,
    ) -> Result<()> {
        let rows = idx.len;
        check(out.len == rows * c && wpe.len >= (at.start + rows) * c && wte.len.is_multiple_of(c) && at.on_device.len == 1, || {
            format!("embedding_forward_at: buffers do not fit {rows} rows of {c} at position {}", at.start)
        })?;
        let (rows_i, c_i) = (rows as i32, c as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding_forward_at);
        launch.arg(&idx.ptr).arg(&at.on_device.ptr).arg(&wte.ptr).arg(&wpe.ptr).arg(&out.ptr).arg(&rows_i).arg(&c_i);
        // SAFETY: token ids are checked against the vocabulary by the caller, the rows' positions
        // against wpe above (the device's start equals at.start: `CachePosition`).
        unsafe { launch.launch(elementwise_config(rows * c)) }?;
        Ok(())
    }

    /// `dwte[idx[row]] += dout[row]`, `dwpe[t] += Σ_b dout[b,t]`.
    pub fn embedding_backward(
        &self,
        idx: View<u32>,
        dout: View<f32>,
        dwte: View<f32>,
        dwpe: View<f32>,
        seq: usize,
        c: usize,
    ) -> Result<()> {
        let rows = idx.len;
        check(dout.len == rows * c && dwpe.len >= seq * c && dwte.len.is_multiple_of(c) && seq > 0 && rows.is_multiple_of(seq), || {
            format!("embedding_backward: buffers do not fit {rows} rows of {c}")
        })?;
        let (rows_i, seq_i, c_i, batch_i) = (rows as i32, seq as i32, c as i32, (rows / seq) as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding_backward_tokens);
        launch.arg(&idx.ptr).arg(&dout.ptr).arg(&dwte.ptr).arg(&rows_i).arg(&c_i);
        // SAFETY: as in the forward pass.
        unsafe { launch.launch(elementwise_config(rows * c)) }?;
        let mut launch = self.stream.launch_builder(&self.kernels.embedding_backward_positions);
        launch.arg(&dout.ptr).arg(&dwpe.ptr).arg(&batch_i).arg(&seq_i).arg(&c_i);
        // SAFETY: writes dwpe[0..seq·c], reads dout[0..rows·c].
        unsafe { launch.launch(elementwise_config(seq * c)) }?;
        Ok(())
    }

    fn attention_shape_check(&self, what: &str, len: usize, shape: AttentionShape, factor: usize) -> Result<()> {
        check(len == factor * shape.batch * shape.seq * shape.n_head * shape.head_size, || {
            format!(
                "{what}: buffer of {len} does not fit {factor} × (B={}, T={}, H={}, hs={})",
                shape.batch, shape.seq, shape.n_head, shape.head_size
            )
        })
    }

    /// qkv (B, T, 3C) → q, k, v (B, H, T, hs) one after the other in `heads`; `inverse` goes back.
    pub fn qkv_heads(&self, qkv: View<f32>, heads: View<f32>, shape: AttentionShape, inverse: bool) -> Result<()> {
        self.attention_shape_check("qkv_heads", qkv.len, shape, 3)?;
        self.attention_shape_check("qkv_heads", heads.len, shape, 3)?;
        let kernel = if inverse { &self.kernels.heads_to_qkv } else { &self.kernels.qkv_to_heads };
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
        self.attention_shape_check("heads_rows", heads.len, shape, 1)?;
        self.attention_shape_check("heads_rows", rows.len, shape, 1)?;
        let dims = shape.dims();
        let direction = i32::from(to_rows);
        let mut launch = self.stream.launch_builder(&self.kernels.heads_rows);
        launch.arg(&heads.ptr).arg(&rows.ptr).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&direction);
        // SAFETY: both views hold B·T·C elements; one block per row (b, t).
        unsafe { launch.launch(block_per_row_config(shape.batch * shape.seq)) }?;
        Ok(())
    }

    /// In place over matrices of (`queries`, `keys`) scores: the causal softmax of
    /// `scale`·scores, query t seeing keys up to t + keys − queries (training: queries = keys).
    pub fn causal_softmax_forward(&self, scores: View<f32>, queries: usize, keys: usize, scale: f32) -> Result<()> {
        check(queries > 0 && queries <= keys && scores.len.is_multiple_of(queries * keys), || {
            "causal_softmax_forward: not whole queries×keys matrices".into()
        })?;
        let (rows, queries_i, keys_i) = ((scores.len / keys) as i32, queries as i32, keys as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.causal_softmax_forward);
        launch.arg(&scores.ptr).arg(&rows).arg(&queries_i).arg(&keys_i).arg(&scale);
        // SAFETY: rows·keys elements.
        unsafe { launch.launch(warp_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// The kernels' cache dimensions [m, H, hs, positions] of a KV cache (H, positions, hs),
    /// after checking that `shape.seq` = m new rows of one sequence fit at `at`.
    fn cache_dims(what: &str, keys: View<f32>, values: View<f32>, shape: AttentionShape, at: CachePosition) -> Result<[i32; 4]> {
        let (m, h, hs) = (shape.seq, shape.n_head, shape.head_size);
        let (positions, start) = (keys.len / (h * hs).max(1), at.start);
        check(shape.batch == 1 && m > 0 && values.len == keys.len && start + m <= positions && at.on_device.len == 1, || {
            format!("{what}: {m} rows at {start} do not fit a cache of {positions} positions")
        })?;
        Ok([m as i32, h as i32, hs as i32, positions as i32])
    }

    /// Decoding: m new rows of qkv (m, 3C) → q (H, m, hs), keys and values appended to the
    /// caches (H, positions, hs) at `at.start..at.start + m`.
    pub fn append_kv(
        &self,
        qkv: View<f32>,
        q: View<f32>,
        keys: View<f32>,
        values: View<f32>,
        shape: AttentionShape,
        at: CachePosition,
    ) -> Result<()> {
        let (m, h, hs) = (shape.seq, shape.n_head, shape.head_size);
        let dims = Self::cache_dims("append_kv", keys, values, shape, at)?;
        check(qkv.len == 3 * m * h * hs && q.len == m * h * hs, || format!("append_kv: qkv and q do not hold {m} rows"))?;
        let mut launch = self.stream.launch_builder(&self.kernels.append_kv);
        launch.arg(&qkv.ptr).arg(&q.ptr).arg(&keys.ptr).arg(&values.ptr);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&at.on_device.ptr);
        // SAFETY: sizes checked; one thread per element of the new rows.
        unsafe { launch.launch(elementwise_config(3 * m * h * hs)) }?;
        Ok(())
    }

    /// Each row of V logits (rows, v) becomes its probabilities, in place.
    pub fn softmax_rows(&self, logits: View<f32>, v: usize) -> Result<()> {
        check(v > 0 && logits.len.is_multiple_of(v), || "softmax_rows: not whole rows".into())?;
        let v_i = v as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.softmax_rows);
        launch.arg(&logits.ptr).arg(&v_i);
        // SAFETY: one block per row of v elements.
        unsafe { launch.launch(block_per_row_config(logits.len / v)) }?;
        Ok(())
    }

    /// In place: the gradient d of the attention weights becomes that of the unscaled scores.
    pub fn causal_softmax_backward(&self, att: View<f32>, d: View<f32>, seq: usize, scale: f32) -> Result<()> {
        check(seq > 0 && att.len == d.len && att.len.is_multiple_of(seq * seq), || {
            "causal_softmax_backward: not whole T×T matrices".into()
        })?;
        let (rows, seq_i) = ((att.len / seq) as i32, seq as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.causal_softmax_backward);
        launch.arg(&att.ptr).arg(&d.ptr).arg(&rows).arg(&seq_i).arg(&scale);
        // SAFETY: rows·T elements in both.
        unsafe { launch.launch(warp_per_row_config(rows as usize)) }?;
        Ok(())
    }

    /// Decoding: the attention of m new query rows `q` (H, m, hs) over the caches (H,
    /// positions, hs) filled up to `start + m`, row i seeing positions ≤ start + i; writes rows
    /// `y` (m, C). `shape.seq` is m.
    pub fn decode_attention(
        &self,
        q: View<f32>,
        keys: View<f32>,
        values: View<f32>,
        y: View<f32>,
        shape: AttentionShape,
        at: CachePosition,
    ) -> Result<()> {
        let (m, h, hs) = (shape.seq, shape.n_head, shape.head_size);
        let dims = Self::cache_dims("decode_attention", keys, values, shape, at)?;
        let positions = dims[3] as usize;
        check(q.len == m * h * hs && y.len == q.len, || format!("decode_attention: q and y do not hold {m} rows"))?;
        check(
            4 * (hs + positions) <= 46 << 10, // with the kernel's static arrays, under 48 KiB
            || format!("decode_attention: a context of {positions} positions does not fit in shared memory"),
        )?;
        let scale = 1.0 / (hs as f32).sqrt();
        let mut launch = self.stream.launch_builder(&self.kernels.decode_attention);
        launch.arg(&q.ptr).arg(&keys.ptr).arg(&values.ptr).arg(&y.ptr);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&at.on_device.ptr).arg(&scale);
        // the query and up to `positions` scores per block
        let shared_mem_bytes = (4 * (hs + positions)) as u32;
        let config = LaunchConfig { grid_dim: (m as u32, h as u32, 1), block_dim: (DECODE_THREADS, 1, 1), shared_mem_bytes };
        // SAFETY: sizes checked; one block per (new row, head).
        unsafe { launch.launch(config) }?;
        Ok(())
    }

    /// (H2, H7) For a block of positions, each with r·n rows of V logits: `log_p` (positions,
    /// r·n) = log P[α,s](y_s); with `gradient`, also the posterior π (positions, r) and, in place,
    /// dℓ = π[α]·inv_count·(P − onehot(y)). `targets` (positions, n); `log_w` (positions, r).
    #[allow(clippy::too_many_arguments)]
    pub fn head_position(
        &self,
        logits: View<f32>,
        targets: View<u32>,
        log_w: View<f32>,
        log_p: View<f32>,
        posterior: View<f32>,
        v: usize,
        shape: HeadShape,
        inv_count: f32,
        gradient: bool,
    ) -> Result<()> {
        let positions = log_w.len / shape.rank;
        check(
            shape.fits_kernels()
                && logits.len == positions * shape.rn() * v
                && targets.len == positions * shape.horizon
                && log_p.len == positions * shape.rn()
                && posterior.len == log_w.len,
            || format!("head_position: buffers do not fit {positions} positions of r·n = {} rows of {v}", shape.rn()),
        )?;
        let (v_i, n_i, r_i, gradient_i) = (v as i32, shape.horizon as i32, shape.rank as i32, i32::from(gradient));
        let mut launch = self.stream.launch_builder(&self.kernels.head_position);
        launch.arg(&logits.ptr).arg(&targets.ptr).arg(&log_w.ptr).arg(&log_p.ptr).arg(&posterior.ptr);
        launch.arg(&v_i).arg(&n_i).arg(&r_i).arg(&inv_count).arg(&gradient_i);
        // SAFETY: sizes checked; targets are < v (checked by the caller). One block per position.
        unsafe { launch.launch(block_per_row_config(positions)) }?;
        Ok(())
    }

    /// log_softmax of each row of r gate logits, in place.
    pub fn gate_log_softmax(&self, logits: View<f32>, rank: usize) -> Result<()> {
        check(rank > 0 && logits.len.is_multiple_of(rank), || "gate_log_softmax: not whole rows".into())?;
        let (p_i, r_i) = ((logits.len / rank) as i32, rank as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.gate_log_softmax);
        launch.arg(&logits.ptr).arg(&p_i).arg(&r_i);
        // SAFETY: one thread per row.
        unsafe { launch.launch(elementwise_config(logits.len / rank)) }?;
        Ok(())
    }

    /// (H4–H6) Sums over positions into `out` (2 + n + 2r f64s): Σ joint NLL, Σ gate entropy,
    /// Σ NLL per horizon, top-component counts, Σ gate weights.
    pub fn head_statistics(&self, log_p: View<f32>, log_w: View<f32>, out: View<f64>, shape: HeadShape) -> Result<()> {
        let positions = log_w.len / shape.rank;
        check(log_p.len == positions * shape.rn() && out.len == 2 + shape.horizon + 2 * shape.rank && shape.fits_kernels(), || {
            "head_statistics: buffers do not fit".into()
        })?;
        let (p_i, r_i, n_i) = (positions as i32, shape.rank as i32, shape.horizon as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.head_statistics);
        launch.arg(&log_p.ptr).arg(&log_w.ptr).arg(&out.ptr).arg(&p_i).arg(&r_i).arg(&n_i);
        let config = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
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
        let positions = log_w.len / rank;
        check(posterior.len == log_w.len && da.len == log_w.len && top_count.len == rank && rank <= MAX_RANK, || {
            "gate_gradient: buffers do not fit".into()
        })?;
        let (p_i, r_i) = (positions as i32, rank as i32);
        let mut launch = self.stream.launch_builder(&self.kernels.gate_gradient);
        launch.arg(&log_w.ptr).arg(&posterior.ptr).arg(&top_count.ptr).arg(&da.ptr).arg(&p_i).arg(&r_i).arg(&inv_count).arg(&aux_coef);
        // SAFETY: one thread per position.
        unsafe { launch.launch(elementwise_config(positions)) }?;
        Ok(())
    }
}

impl Gpu {
    fn fused_attention_kernels(&self, hs: usize) -> Result<&(usize, CudaFunction, CudaFunction)> {
        let found = self.kernels.fused_attention.iter().find(|(size, _, _)| *size == hs);
        found.ok_or_else(|| {
            CudaError::Shape(format!("fused attention: no kernel for head size {hs} (built for {FUSED_ATTENTION_HEAD_SIZES:?})"))
        })
    }

    /// (head size, forward registers per thread, backward registers, bytes spilled to local
    /// memory by either) of each fused attention kernel pair, as compiled for this device.
    pub fn fused_attention_resources(&self) -> Result<Vec<(usize, i32, i32, i32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let mut out = Vec::new();
        for (hs, forward, backward) in &self.kernels.fused_attention {
            let spilled = forward.get_attribute(LOCAL)? + backward.get_attribute(LOCAL)?;
            out.push((*hs, forward.get_attribute(REGISTERS)?, backward.get_attribute(REGISTERS)?, spilled));
        }
        Ok(out)
    }

    /// (registers per thread, bytes spilled to local memory, blocks per SM) of `linear_few_rows`'s
    /// 4-row and 8-row instances.
    pub fn few_row_linear_resources(&self) -> Result<Vec<(i32, i32, u32)>> {
        use CUfunction_attribute::{CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES as LOCAL, CU_FUNC_ATTRIBUTE_NUM_REGS as REGISTERS};
        let mut out = Vec::new();
        for kernel in &self.kernels.linear_few_rows {
            let blocks = kernel.occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)?;
            out.push((kernel.get_attribute(REGISTERS)?, kernel.get_attribute(LOCAL)?, blocks));
        }
        Ok(out)
    }

    fn fused_attention_check(&self, what: &str, views: &[(View<f32>, usize)], shape: AttentionShape) -> Result<()> {
        for (view, factor) in views {
            self.attention_shape_check(what, view.len, shape, *factor)?;
            check(view.ptr.is_multiple_of(16), || format!("{what}: buffers must start on 16-byte boundaries"))?;
        }
        // B·H is the grid's second dimension
        check(shape.batch * shape.n_head <= 65_535, || {
            format!("{what}: B·H = {} is more than 65535 blocks; use MULTITOKEN_ATTENTION=products", shape.batch * shape.n_head)
        })
    }

    fn fused_attention_config(shape: AttentionShape, backward: bool) -> LaunchConfig {
        let tiles = shape.seq.div_ceil(ATTENTION_TILE) as u32;
        let shared = 4 * fused_attention_shared_floats(shape.head_size, backward) as u32;
        LaunchConfig {
            grid_dim: (tiles, (shape.batch * shape.n_head) as u32, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: shared,
        }
    }

    /// Causal attention in one kernel: q, k, v read from c_attn's rows `qkv` (B, T, 3C), the
    /// output written to rows `y` (B, T, C), and each query row's log-sum-exp of its scaled
    /// scores, in base 2, to `lse` (B·H, T) for the backward pass.
    pub fn fused_attention_forward(&self, qkv: View<f32>, y: View<f32>, lse: View<f32>, shape: AttentionShape) -> Result<()> {
        let (_, forward, _) = self.fused_attention_kernels(shape.head_size)?;
        self.fused_attention_check("fused_attention_forward", &[(qkv, 3), (y, 1)], shape)?;
        check(lse.len == shape.batch * shape.n_head * shape.seq, || "fused_attention_forward: lse is not (B·H, T)".into())?;
        let (seq, n_head, scale) = (shape.seq as i32, shape.n_head as i32, 1.0 / (shape.head_size as f32).sqrt());
        let mut launch = self.stream.launch_builder(forward);
        launch.arg(&qkv.ptr).arg(&y.ptr).arg(&lse.ptr).arg(&seq).arg(&n_head).arg(&scale);
        // SAFETY: sizes and alignment checked; one block per (query tile, head).
        unsafe { launch.launch(Self::fused_attention_config(shape, false)) }?;
        Ok(())
    }

    /// Backward of [`Gpu::fused_attention_forward`] from dy (B, T, C): dqkv (B, T, 3C) is
    /// overwritten with the gradients of q, k and v. `dots` (B·H, T) is scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn fused_attention_backward(
        &self,
        qkv: View<f32>,
        y: View<f32>,
        dy: View<f32>,
        lse: View<f32>,
        dots: View<f32>,
        dqkv: View<f32>,
        shape: AttentionShape,
    ) -> Result<()> {
        let (_, _, backward) = self.fused_attention_kernels(shape.head_size)?;
        self.fused_attention_check("fused_attention_backward", &[(qkv, 3), (y, 1), (dy, 1), (dqkv, 3)], shape)?;
        let heads_rows = shape.batch * shape.n_head * shape.seq;
        check(lse.len == heads_rows && dots.len == heads_rows, || "fused_attention_backward: lse and dots are not (B·H, T)".into())?;
        let [_, seq, n_head, hs] = shape.dims();
        let rows = (shape.batch * shape.seq) as i32;
        let mut launch = self.stream.launch_builder(&self.kernels.attention_row_dots);
        launch.arg(&y.ptr).arg(&dy.ptr).arg(&dots.ptr).arg(&rows).arg(&seq).arg(&n_head).arg(&hs);
        // SAFETY: sizes checked; one warp per (row, head).
        unsafe { launch.launch(warp_per_row_config(heads_rows)) }?;
        // dq is summed over key tiles with atomics
        self.fill_zero(dqkv)?;
        let scale = 1.0 / (shape.head_size as f32).sqrt();
        let mut launch = self.stream.launch_builder(backward);
        launch.arg(&qkv.ptr).arg(&dy.ptr).arg(&lse.ptr).arg(&dots.ptr).arg(&dqkv.ptr).arg(&seq).arg(&n_head).arg(&scale);
        // SAFETY: sizes and alignment checked; one block per (key tile, head).
        unsafe { launch.launch(Self::fused_attention_config(shape, true)) }?;
        Ok(())
    }
}

/// Where decoding's new rows start in the KV cache: the host's copy, for the checks, and a
/// one-element device buffer holding the same number, which the decoding kernels read. Read from
/// device memory, the position is not baked into a captured pass ([`Gpu::capture`]), so one
/// capture replays at every position; whoever writes the device copy keeps the two equal.
#[derive(Clone, Copy, Debug)]
pub struct CachePosition {
    pub start: usize,
    pub on_device: View<u32>,
}

/// The dimensions of a batch of attention: B, T, H and the head size.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub n_head: usize,
    pub head_size: usize,
}

impl AttentionShape {
    fn dims(&self) -> [i32; 4] {
        [self.batch as i32, self.seq as i32, self.n_head as i32, self.head_size as i32]
    }
}

/// The multi-token head's horizon n and rank r.
#[derive(Clone, Copy, Debug)]
pub struct HeadShape {
    pub horizon: usize,
    pub rank: usize,
}

impl HeadShape {
    pub fn rn(&self) -> usize {
        self.rank * self.horizon
    }

    /// Whether the head kernels' fixed-size arrays hold this n and r.
    pub fn fits_kernels(&self) -> bool {
        self.horizon <= MAX_HORIZON && self.rank <= MAX_RANK
    }
}
