//! NCCL: the ranks of a data-parallel run average their gradients with an all-reduce.
//!
//! One process drives one GPU. The ranks join one NCCL communicator through a 128-byte id that
//! rank 0 makes ([`unique_id`]) and hands to the others (the main crate's rendezvous does that
//! over TCP). Collectives are queued on the device's one stream, in order with the kernels,
//! and [`Communicator::wait`] waits for them with a time limit: a rank that died or hangs
//! leaves the others spinning in NCCL's kernels forever, so a plain stream synchronisation
//! would never return.
//!
//! NCCL loads at run time, like the rest of CUDA: the binary runs without it until a run asks
//! for several GPUs.

use std::time::{Duration, Instant};

use cudarc::nccl::{result as nccl, sys};

use crate::{CudaError, Gpu, Result, View};

/// The bytes of an NCCL unique id: what rank 0 sends every other rank.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Whether NCCL (`libnccl.so`) can be loaded on this machine.
pub fn nccl_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { sys::is_culib_present() }
}

/// NCCL's own soname, which is all that some installations hold (pip's `nvidia-nccl-cu13`, the
/// one PyTorch loads): cudarc looks for `libnccl.so` and numbered names of CUDA's versions only.
pub const NCCL_SONAME: &str = "libnccl.so.2";

/// Where `libnccl.so.2` is when cudarc cannot load NCCL by its own names: in the directory that
/// [`crate::LIB_DIR_VARIABLE`] names, else wherever the loader finds it (pip keeps NCCL in a
/// directory of its own, apart from cuBLAS and NVRTC). A launcher of ranks links `libnccl.so`
/// to it in a directory of its own, on the ranks' `LD_LIBRARY_PATH`.
pub fn nccl_soname_path() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os(crate::LIB_DIR_VARIABLE).filter(|d| !d.is_empty()) {
        let path = std::path::Path::new(&dir).join(NCCL_SONAME);
        if path.is_file() {
            return Some(path);
        }
    }
    // SAFETY: opening NCCL runs only its initialisers; it stays loaded, as cudarc's would.
    let library = unsafe { libloading::Library::new(NCCL_SONAME) }.ok()?;
    std::mem::forget(library);
    // the loader chose the file: the process's memory map names it, by the name a link to it
    // resolves to (a system's libnccl.so.2 is a link to libnccl.so.2.X.Y)
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let is_nccl = |path: &&str| std::path::Path::new(path).file_name().is_some_and(|name| name.to_string_lossy().starts_with(NCCL_SONAME));
    maps.lines().filter_map(|line| line.split_whitespace().nth(5)).find(is_nccl).map(Into::into)
}

/// Checks that NCCL can be loaded, so that a missing library is a [`CudaError`] naming it.
pub fn check_nccl() -> Result<()> {
    if nccl_present() {
        return Ok(());
    }
    Err(CudaError::Collective(
        "NCCL could not be loaded (neither libnccl.so nor libnccl.so.2 on the library path); install NCCL for CUDA 13, or name the directory of its libnccl.so.2 in MULTITOKEN_CUDA_LIB_DIR, or train on one GPU".into(),
    ))
}

fn nccl_error(what: &str, error: nccl::NcclError) -> CudaError {
    // SAFETY: NCCL returns a static string for every result code.
    let message = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(error.0)) };
    CudaError::Collective(format!("NCCL {what} failed: {} ({:?})", message.to_string_lossy(), error.0))
}

/// A fresh NCCL unique id (rank 0 makes it, every rank joins with it).
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    check_nccl()?;
    let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
    // (c_char is i8 on x86-64 and u8 on aarch64: the same byte either way)
    Ok(id.internal.map(|c| c.to_ne_bytes()[0]))
}

/// This rank's membership of an NCCL communicator, on one [`Gpu`]'s stream.
pub struct Communicator {
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    /// marks how far the stream has got, for [`Communicator::wait`]
    progress: cudarc::driver::CudaEvent,
    /// around the last [`Communicator::all_reduce`], to time it on the device
    reduce_started: cudarc::driver::CudaEvent,
    reduce_finished: cudarc::driver::CudaEvent,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; `&mut self` on every
// call that queues work keeps it so.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Joins the communicator of `world_size` ranks named by `id`, as `rank`, on `gpu`. Blocks
    /// until every rank has joined.
    pub fn join(gpu: &Gpu, id: &[u8; UNIQUE_ID_BYTES], rank: usize, world_size: usize) -> Result<Self> {
        check_nccl()?;
        crate::check(rank < world_size, || format!("rank {rank} is not below the world size {world_size}"))?;
        gpu.bind()?;
        let id = sys::ncclUniqueId { internal: id.map(|b| std::ffi::c_char::from_ne_bytes([b])) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; the id came from `unique_id`.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world_size as i32, id, rank as i32).map_err(|e| nccl_error("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        let progress = gpu.context.new_event(None)?;
        let timed = || gpu.context.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
        let (reduce_started, reduce_finished) = (timed()?, timed()?);
        Ok(Communicator { comm, rank, world_size, progress, reduce_started, reduce_finished })
    }

    /// This process's rank, 0 to world size − 1.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Queues, in one NCCL group, an in-place mean over the ranks of every view in `means` and
    /// an in-place sum of every view in `sums`. Every rank must pass views of the same lengths
    /// in the same order.
    pub fn all_reduce(&mut self, gpu: &Gpu, means: &[View<f32>], sums: &[View<f64>]) -> Result<()> {
        let stream = gpu.stream.cu_stream() as sys::cudaStream_t;
        let group = |result: std::result::Result<nccl::NcclStatus, nccl::NcclError>, what: &str| result.map_err(|e| nccl_error(what, e));
        self.reduce_started.record(&gpu.stream)?;
        group(nccl::group_start(), "ncclGroupStart")?;
        use sys::{ncclDataType_t::*, ncclRedOp_t::*};
        let means = means.iter().map(|v| (v.address(), v.len(), ncclFloat32, ncclAvg));
        let ops = means.chain(sums.iter().map(|v| (v.address(), v.len(), ncclFloat64, ncclSum)));
        for (address, len, element, op) in ops {
            let pointer = address as *mut std::ffi::c_void;
            // SAFETY: the view is live device memory of `len` elements on this communicator's
            // GPU; in place, as NCCL allows (send and receive the same buffer).
            let queued = unsafe { nccl::all_reduce(pointer, pointer, len, element, op, self.comm, stream) };
            if let Err(e) = queued {
                let _ = nccl::group_end();
                return Err(nccl_error("ncclAllReduce", e));
            }
        }
        group(nccl::group_end(), "ncclGroupEnd")?;
        self.reduce_finished.record(&gpu.stream)?;
        Ok(())
    }

    /// The device time of the last [`Communicator::all_reduce`], in milliseconds, once a
    /// [`Communicator::wait`] has seen it done: on one stream, time that nothing else overlaps.
    pub fn last_all_reduce_ms(&self) -> Result<f64> {
        Ok(self.reduce_started.elapsed_ms(&self.reduce_finished)? as f64)
    }

    /// Waits until the work queued on `gpu`'s stream so far (collectives included) is done, or
    /// fails once `limit` has passed or NCCL reports an error: a rank that died or hangs shows
    /// up here, as a one-line error, instead of as a wait that never ends.
    pub fn wait(&mut self, gpu: &Gpu, limit: Duration) -> Result<()> {
        self.progress.record(&gpu.stream)?;
        let started = Instant::now();
        while !self.progress.try_is_complete()? {
            // read as a plain integer: another NCCL version may return a code the enum lacks
            let mut async_error: i32 = 0;
            // SAFETY: a live communicator; NCCL writes one result code (a C enum, an int).
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, (&mut async_error as *mut i32).cast()) };
            if async_error != sys::ncclResult_t::ncclSuccess as i32 && async_error != sys::ncclResult_t::ncclInProgress as i32 {
                return Err(CudaError::Collective(format!("NCCL reported error {async_error} during a collective (a rank died?)")));
            }
            if started.elapsed() > limit {
                return Err(CudaError::Collective(format!(
                    "the other ranks did not answer within {} s (one of them died or hangs)",
                    limit.as_secs()
                )));
            }
            // a healthy all-reduce ends within milliseconds: spin (one core of many) rather than
            // sleep past its end, and sleep only once it is clearly waiting for a slow peer
            if started.elapsed() < Duration::from_millis(100) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: a live communicator, released once. Aborted rather than destroyed: destroying
        // waits for the peers, which a rank that fails alone (or whose peer died) would wait for
        // until the others time out; a communicator is dropped only when no collective of it
        // is still to come.
        unsafe {
            let _ = nccl::comm_abort(self.comm);
        }
    }
}
