//! An open device: its context, its stream, its compiled kernels, its pool; copies between host
//! and device; CUDA graphs.

use std::sync::Arc;

use cudarc::driver::{result as driver, CudaContext, CudaModule, CudaStream, DeviceRepr};

use crate::attention::AttentionRoute;
use crate::blas::{Blas, GemmRoute, ProductPrecision};
use crate::constants::KERNEL_DEFINES;
use crate::memory::{same_lengths, Buffer, MemoryStats, PinnedBuffer, Pool, View};
use crate::{
    adamw, attention, check, elementwise, embedding, fused_attention, general, head, layernorm, linear, speculative, CudaError, Result,
};

/// The first compute capability (major) with programmatic dependent launch.
const EARLY_LAUNCH_MAJOR: i32 = 9;

/// Whether decoding launches early on a device of compute capability `major`.x, given the
/// setting of `MULTITOKEN_EARLY_LAUNCH`: from 9.0 on unless it is "0".
fn launches_early(major: i32, setting: Option<&str>) -> bool {
    major >= EARLY_LAUNCH_MAJOR && setting != Some("0")
}

/// The kernel files, by module name, compiled at run time.
pub(crate) const KERNEL_SOURCES: [(&str, &str); 11] = [
    ("elementwise", elementwise::SOURCE),
    ("linear", linear::SOURCE),
    ("layernorm", layernorm::SOURCE),
    ("adamw", adamw::SOURCE),
    ("embedding", embedding::SOURCE),
    ("attention", attention::SOURCE),
    ("fused_attention", fused_attention::SOURCE),
    ("tensor_core_attention", fused_attention::TENSOR_CORE_SOURCE),
    ("head", head::SOURCE),
    ("speculative", speculative::SOURCE),
    ("general", general::SOURCE),
];

/// What every kernel file shares (warp and block reductions, GELU, a row's statistics),
/// prepended to each: NVRTC cannot resolve an `#include` of an embedded source.
const KERNEL_COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel file compiled for `architecture`, with its module name. NVRTC takes seconds for
/// them all, so a process compiles them once per architecture, however often it opens a device
/// (a study that measures many checkpoints, the test suite).
pub(crate) fn compiled_kernels(architecture: &str) -> Result<Vec<(&'static str, cudarc::nvrtc::Ptx)>> {
    type Compiled = Vec<(&'static str, cudarc::nvrtc::Ptx)>;
    static COMPILED: std::sync::Mutex<std::collections::BTreeMap<String, Compiled>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut compiled = COMPILED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(kernels) = compiled.get(architecture) {
        return Ok(kernels.clone());
    }
    let kernels = KERNEL_SOURCES
        .iter()
        .map(|&(module, source)| Ok((module, compile(module, source, architecture)?)))
        .collect::<Result<Compiled>>()?;
    compiled.insert(architecture.to_string(), kernels.clone());
    Ok(kernels)
}

/// NVRTC compilations in this process, for the test that the cache above spares them.
#[cfg(test)]
pub(crate) static COMPILATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn compile(module: &str, source: &str, architecture: &str) -> Result<cudarc::nvrtc::Ptx> {
    #[cfg(test)]
    COMPILATIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut options = vec![format!("--gpu-architecture={architecture}")];
    options.extend(KERNEL_DEFINES.iter().chain(&general::OP_DEFINES).map(|(name, value)| format!("-D{name}={value}")));
    let options = cudarc::nvrtc::CompileOptions { options, ..Default::default() };
    let source = format!("{KERNEL_COMMON}\n{source}");
    cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| CudaError::Compile(format!("{module}.cu (after common.cuh): {e}")))
}

/// The function handles of every kernel file.
pub(crate) struct Kernels {
    pub(crate) elementwise: elementwise::Kernels,
    pub(crate) linear: linear::Kernels,
    pub(crate) layernorm: layernorm::Kernels,
    pub(crate) adamw: adamw::Kernels,
    pub(crate) embedding: embedding::Kernels,
    pub(crate) attention: attention::Kernels,
    pub(crate) fused_attention: fused_attention::Kernels,
    pub(crate) head: head::Kernels,
    pub(crate) speculative: speculative::Kernels,
    pub(crate) general: general::Kernels,
}

/// An open device: context, stream, cuBLAS, compiled kernels and the memory pool.
pub struct Gpu {
    pub(crate) context: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: Blas,
    pub(crate) kernels: Kernels,
    pub(crate) pool: Arc<Pool>,
    /// the entry point of single matrix products
    pub gemm_route: GemmRoute,
    /// the arithmetic of matrix products (`--precision`)
    pub precision: ProductPrecision,
    /// decoding's products on up to [`crate::FEW_ROWS_MAX`] rows through `linear_few_rows`, and
    /// the head's on up to [`crate::TILE_ROWS_MAX`] through `linear_column_tiles` (else the
    /// general route)
    pub few_row_linear: bool,
    /// the device's multiprocessors
    pub multiprocessors: usize,
    /// how the training pass computes attention when set; else by precision and head size
    /// ([`AttentionRoute::default_for`])
    pub attention_route: Option<AttentionRoute>,
    /// whether decoding's kernels may start before the one ahead of them has finished
    /// (programmatic dependent launch, `EarlyLaunch` in device.rs): on compute capability 9.0
    /// and later unless `MULTITOKEN_EARLY_LAUNCH=0` (measured on an H200, autoregressive
    /// decoding 11 % faster with it and speculative 5 %; docs/results.md)
    pub early_launch: bool,
    name: String,
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

// SAFETY: a stream handle may be used from any thread (the driver's handles are thread-safe);
// this one is only destroyed, once, in drop.
unsafe impl Send for OwnedStream {}
unsafe impl Sync for OwnedStream {}

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

impl Gpu {
    /// Opens device `ordinal`; [`CudaError::NoDriver`] where no driver is installed.
    pub fn new(ordinal: usize) -> Result<Self> {
        crate::check_libraries()?;
        let context = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice(ordinal, e.to_string()))?;
        context.bind_to_thread()?;
        // SAFETY: a fresh stream of this context, destroyed by its `OwnedStream` when the Gpu drops.
        let (stream, stream_owner) = unsafe {
            let cu_stream = driver::stream::create(driver::stream::StreamKind::Default)?;
            (context.wrap_borrowed_stream(cu_stream), OwnedStream { stream: cu_stream, context: context.clone() })
        };
        let (major, minor) = context.compute_capability()?;
        let name = context.name().unwrap_or_else(|_| "CUDA device".into());
        let mut modules = std::collections::HashMap::<&str, Arc<CudaModule>>::new();
        for (module, ptx) in compiled_kernels(&format!("compute_{major}{minor}"))? {
            modules.insert(module, context.load_module(ptx)?);
        }
        let kernels = Kernels {
            elementwise: elementwise::Kernels::load(&modules["elementwise"])?,
            linear: linear::Kernels::load(&modules["linear"])?,
            layernorm: layernorm::Kernels::load(&modules["layernorm"])?,
            adamw: adamw::Kernels::load(&modules["adamw"])?,
            embedding: embedding::Kernels::load(&modules["embedding"])?,
            attention: attention::Kernels::load(&modules["attention"])?,
            fused_attention: fused_attention::Kernels::load(&modules["fused_attention"], &modules["tensor_core_attention"])?,
            head: head::Kernels::load(&modules["head"])?,
            speculative: speculative::Kernels::load(&modules["speculative"])?,
            general: general::Kernels::load(&modules["general"])?,
        };
        let blas = Blas::new(&context, &stream)?;
        let multiprocessors = context.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Gpu {
            pool: Arc::new(Pool::new(context.clone())),
            context,
            stream,
            blas,
            kernels,
            gemm_route: GemmRoute::BlasLt,
            precision: ProductPrecision::F32,
            few_row_linear: true,
            multiprocessors: multiprocessors.max(1) as usize,
            attention_route: None,
            early_launch: launches_early(major, std::env::var("MULTITOKEN_EARLY_LAUNCH").ok().as_deref()),
            name,
            _stream_owner: stream_owner,
        })
    }

    /// Whether the device can start a kernel before the one ahead of it ends (compute capability
    /// 9.0 on), which [`Gpu::early_launch`] asks for.
    pub fn can_launch_early(&self) -> Result<bool> {
        Ok(self.context.compute_capability()?.0 >= EARLY_LAUNCH_MAJOR)
    }

    /// Makes this device's context the calling thread's current one.
    pub(crate) fn bind(&self) -> Result<()> {
        Ok(self.context.bind_to_thread()?)
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

    /// What the memory pool holds and has held.
    pub fn memory_stats(&self) -> MemoryStats {
        self.pool.stats()
    }

    /// Forgets the pool's peaks (after warm-up, say).
    pub fn reset_memory_peaks(&self) {
        self.pool.reset_peaks();
    }

    /// `len` elements from the pool, their contents undefined: for outputs a kernel writes whole.
    pub fn alloc<T>(&self, len: usize) -> Result<Buffer<T>> {
        Buffer::allocate(&self.pool, len)
    }

    /// `len` zeros.
    pub fn zeros<T>(&self, len: usize) -> Result<Buffer<T>> {
        let buffer = self.alloc(len)?;
        self.fill_zero(buffer.view())?;
        Ok(buffer)
    }

    /// A new buffer holding a copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<Buffer<T>> {
        let buffer = self.alloc::<T>(host.len())?;
        self.write(buffer.view(), host)?;
        Ok(buffer)
    }

    /// Copies `host` into `target` (same length), in order after the work already queued. Meant
    /// for ordinary (pageable) memory, which the driver stages before it returns, so `host` may
    /// change or go right after; from page-locked memory ([`Gpu::pinned`]) the copy would run
    /// later, reading `host` when the stream reaches it.
    pub fn write<T: DeviceRepr>(&self, target: View<T>, host: &[T]) -> Result<()> {
        check(target.len() == host.len(), || format!("write: {} elements into a view of {}", host.len(), target.len()))?;
        if host.is_empty() {
            return Ok(());
        }
        self.context.bind_to_thread()?;
        // SAFETY: lengths checked. From pageable memory the driver copies `host` into its staging
        // memory before it returns, so `host` may go away after; the transfer itself runs in
        // stream order, after the work that may still read the target's old contents.
        unsafe { driver::memcpy_htod_async(target.ptr, host, self.stream.cu_stream())? };
        Ok(())
    }

    /// Waits for the queued work, then copies `source` to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, source: View<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); source.len()];
        self.download_into(source, &mut host)?;
        Ok(host)
    }

    /// Page-locked host memory for `len` elements of a plain numeric type, zeroed.
    pub fn pinned<T: DeviceRepr + Default + Copy>(&self, len: usize) -> Result<PinnedBuffer<T>> {
        PinnedBuffer::new(&self.context, len)
    }

    /// Waits for the queued work, then copies `source` into `target` (same length; page-locked
    /// memory from [`Gpu::pinned`] makes this several times faster than [`Gpu::download`]).
    pub fn download_into<T: DeviceRepr>(&self, source: View<T>, target: &mut [T]) -> Result<()> {
        check(target.len() == source.len(), || format!("download_into: {} elements into {}", source.len(), target.len()))?;
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
        if !target.is_empty() {
            self.context.bind_to_thread()?;
            // SAFETY: the view lies inside a live allocation.
            unsafe { driver::memset_d8_async(target.ptr, 0, target.bytes(), self.stream.cu_stream())? };
        }
        Ok(())
    }

    /// Copies `source` into `target` on the device (queued).
    pub fn copy<T>(&self, source: View<T>, target: View<T>) -> Result<()> {
        same_lengths("copy", &[source, target])?;
        if !source.is_empty() {
            self.context.bind_to_thread()?;
            // SAFETY: equal lengths inside live allocations.
            unsafe { driver::memcpy_dtod_async(target.ptr, source.ptr, source.bytes(), self.stream.cu_stream())? };
        }
        Ok(())
    }

    /// A new buffer holding a copy of `source`.
    pub fn duplicate<T>(&self, source: View<T>) -> Result<Buffer<T>> {
        let buffer = self.alloc(source.len())?;
        self.copy(source, buffer.view())?;
        Ok(buffer)
    }

    /// Waits until the device has finished all the work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Records the work that `issue` queues on this device, without running it, as a graph that
    /// [`Gpu::replay`] runs with one launch. A decoding pass is some 65 small kernels; launched
    /// one by one, each costs the host microseconds that the device spends waiting. `issue` may
    /// only queue kernels and products (no copies to or from the host, nothing that waits, no
    /// allocation), and what they read at run time (a `CacheRows`' device copy) may change
    /// between replays; their arguments may not.
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
}

/// A launch of a kernel that may start while the kernel ahead of it on the stream still runs
/// (programmatic dependent launch, compute capability 9.0 on): its blocks are placed as soon as
/// every block of that kernel has called `let_next_kernel_start()` and there is room, so that
/// the launch's latency, and whatever the kernel does before `wait_for_previous_kernel()` (a
/// linear layer's first loads of its weights, which no kernel writes), overlap that kernel's
/// last blocks. In a captured graph the driver keeps the relation as a programmatic edge.
///
/// Only kernels that call `wait_for_previous_kernel()` (common.cuh) before they read what a
/// kernel before them wrote, or write anything, are launched this way; with
/// [`Gpu::early_launch`] off it is an ordinary launch.
pub(crate) struct EarlyLaunch<'a> {
    gpu: &'a Gpu,
    function: &'a cudarc::driver::CudaFunction,
    /// pointers to the arguments, which outlive the launch (`'a`)
    args: Vec<*mut std::ffi::c_void>,
}

impl<'a> EarlyLaunch<'a> {
    /// Appends an argument, as `cudarc`'s `LaunchArgs::arg` does.
    pub(crate) fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.args.push(value as *const T as *mut std::ffi::c_void);
        self
    }

    /// Queues the kernel on the device's stream.
    ///
    /// # Safety
    /// As `cudarc`'s `LaunchArgs::launch`: the arguments match the kernel's parameters, and the
    /// memory they point to holds what the kernel reads and writes; and the kernel waits for
    /// the previous one as above.
    pub(crate) unsafe fn launch(&mut self, config: cudarc::driver::LaunchConfig) -> Result<()> {
        use cudarc::driver::sys;
        self.gpu.context.bind_to_thread()?;
        let mut overlap = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue { programmaticStreamSerializationAllowed: 1 },
        };
        let launch = sys::CUlaunchConfig {
            gridDimX: config.grid_dim.0,
            gridDimY: config.grid_dim.1,
            gridDimZ: config.grid_dim.2,
            blockDimX: config.block_dim.0,
            blockDimY: config.block_dim.1,
            blockDimZ: config.block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: &mut overlap,
            numAttrs: u32::from(self.gpu.early_launch),
        };
        // SAFETY: the caller's promise above; `launch`, `overlap` and the arguments live
        // through the call, which copies them.
        unsafe { sys::cuLaunchKernelEx(&launch, self.function.cu_function(), self.args.as_mut_ptr(), std::ptr::null_mut()).result()? };
        Ok(())
    }
}

impl Gpu {
    /// An [`EarlyLaunch`] of `function` on this device's stream.
    pub(crate) fn launch_early<'a>(&'a self, function: &'a cudarc::driver::CudaFunction) -> EarlyLaunch<'a> {
        EarlyLaunch { gpu: self, function, args: Vec::new() }
    }
}

/// One thread per element, blocks of [`crate::constants::THREADS`].
pub(crate) fn elementwise_config(n: usize) -> cudarc::driver::LaunchConfig {
    let threads = crate::constants::THREADS as u32;
    cudarc::driver::LaunchConfig {
        grid_dim: ((n as u64).div_ceil(threads as u64).max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, 8 rows per block of 256 threads.
pub(crate) fn warp_per_row_config(rows: usize) -> cudarc::driver::LaunchConfig {
    let threads = crate::constants::THREADS as u32;
    cudarc::driver::LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(threads / 32).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of 256 threads per row (at least one row: the kernels take the block's index as
/// their row unchecked).
pub(crate) fn block_per_row_config(rows: usize) -> cudarc::driver::LaunchConfig {
    debug_assert!(rows > 0, "a launch of no rows");
    let threads = crate::constants::THREADS as u32;
    cudarc::driver::LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::launches_early;

    #[test]
    fn early_launch_is_on_from_hopper_unless_turned_off() {
        assert!(launches_early(9, None));
        assert!(launches_early(10, Some("1")));
        assert!(!launches_early(9, Some("0")));
        assert!(!launches_early(8, None));
        assert!(!launches_early(8, Some("1")));
    }
}
