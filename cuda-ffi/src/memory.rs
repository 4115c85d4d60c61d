//! Device memory: a caching pool, the buffers it hands out, and views into them.
//!
//! Asking the driver for memory (`cuMemAlloc`) and giving it back (`cuMemFree`, which waits for
//! the whole device) costs far more than a training step's small kernels, and a step frees and
//! takes the same sizes every time. So a freed [`Buffer`] goes back to the [`Pool`], into a
//! list of free blocks of its size, and the next request of that size takes it from there
//! without the driver: from the second training step on, the driver is asked for nothing.
//! Everything runs on one stream, so a block handed out again is used only after the work that
//! used it before (stream order), and giving it back needs no wait. Sizes are rounded up (512
//! bytes, or 2 MiB above 1 MiB) so that nearby sizes share blocks.
//!
//! What the pool holds (in use and cached) is the program's device memory, and its peak is what
//! `bench train` reports; the driver is asked to take the cache back only when an allocation
//! fails, and then once before giving up.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result as driver, CudaContext};

use crate::{check, CudaError, Result};

/// A device pointer and a length in elements: a window into a [`Buffer`].
#[derive(Debug)]
pub struct View<T> {
    pub(crate) ptr: u64,
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
    pub(crate) fn new(ptr: u64, len: usize) -> Self {
        View { ptr, len, _element: PhantomData }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `offset..offset + len`. Panics when that is out of range (a programming error).
    pub fn slice(self, offset: usize, len: usize) -> View<T> {
        assert!(offset + len <= self.len, "view slice {offset}..{} out of 0..{}", offset + len, self.len);
        View::new(self.ptr + (offset * std::mem::size_of::<T>()) as u64, len)
    }

    /// The first `len` elements.
    pub fn prefix(self, len: usize) -> View<T> {
        self.slice(0, len)
    }

    /// The same bytes seen as elements of another type of the same size (`u32` ids as `f32`s to
    /// a copy, say).
    pub fn cast<U>(self) -> View<U> {
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<U>(), "view cast between sizes");
        View::new(self.ptr, self.len)
    }

    /// Where the view starts on the device.
    pub fn address(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

/// The pool's counters, in bytes (and a count of the driver's allocations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// in buffers now
    pub in_use: usize,
    /// the most `in_use` reached since the peaks were last reset
    pub peak_in_use: usize,
    /// taken from the driver and not given back: in use plus cached
    pub held: usize,
    /// the most `held` reached since the peaks were last reset
    pub peak_held: usize,
    /// calls to the driver's allocator so far
    pub driver_allocations: u64,
}

/// The caching allocator: free blocks by (rounded) size, and the counters.
pub(crate) struct Pool {
    context: Arc<CudaContext>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<usize, Vec<u64>>,
    stats: MemoryStats,
}

/// The size class of a request: whole 512-byte units, or whole 2 MiB above 1 MiB.
fn rounded(bytes: usize) -> usize {
    if bytes > 1 << 20 {
        bytes.next_multiple_of(2 << 20)
    } else {
        bytes.next_multiple_of(512)
    }
}

fn out_of_memory(error: &cudarc::driver::DriverError) -> bool {
    error.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
}

impl Pool {
    pub(crate) fn new(context: Arc<CudaContext>) -> Self {
        Pool { context, state: Mutex::new(PoolState::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.state().stats
    }

    /// Forgets the peaks (they become what is in use and held now).
    pub(crate) fn reset_peaks(&self) {
        let mut state = self.state();
        state.stats.peak_in_use = state.stats.in_use;
        state.stats.peak_held = state.stats.held;
    }

    /// A block of at least `bytes` (uninitialised): a cached one of its size class, or a new one.
    fn allocate(&self, bytes: usize) -> Result<(u64, usize)> {
        if bytes == 0 {
            return Ok((0, 0));
        }
        let size = rounded(bytes);
        let mut state = self.state();
        let cached = state.free.get_mut(&size).and_then(Vec::pop);
        let ptr = match cached {
            Some(ptr) => ptr,
            None => {
                self.context.bind_to_thread()?;
                // SAFETY: a fresh allocation of `size` bytes, handed out once.
                let first_try = unsafe { driver::malloc_sync(size) };
                let ptr = match first_try {
                    Ok(ptr) => ptr,
                    Err(e) if out_of_memory(&e) => {
                        // give the cache back to the driver, then try once more
                        Self::release_cache(&mut state)?;
                        // SAFETY: as above.
                        unsafe { driver::malloc_sync(size) }.map_err(|e| {
                            if out_of_memory(&e) {
                                CudaError::OutOfMemory { requested: size, held: state.stats.held }
                            } else {
                                e.into()
                            }
                        })?
                    }
                    Err(e) => return Err(e.into()),
                };
                state.stats.driver_allocations += 1;
                state.stats.held += size;
                state.stats.peak_held = state.stats.peak_held.max(state.stats.held);
                ptr
            }
        };
        state.stats.in_use += size;
        state.stats.peak_in_use = state.stats.peak_in_use.max(state.stats.in_use);
        Ok((ptr, size))
    }

    fn give_back(&self, ptr: u64, size: usize) {
        if size == 0 {
            return;
        }
        let mut state = self.state();
        state.stats.in_use -= size;
        state.free.entry(size).or_default().push(ptr);
    }

    /// Frees every cached block (after the device has finished the work that used them); a block
    /// the driver refuses to free stays counted as held, and the first such error is returned.
    fn release_cache(state: &mut PoolState) -> Result<()> {
        driver::ctx::synchronize()?;
        let mut first_error = None;
        for (size, blocks) in state.free.drain() {
            for ptr in blocks {
                // SAFETY: a block of this pool, not in use, freed once.
                match unsafe { driver::free_sync(ptr) } {
                    Ok(()) => state.stats.held -= size,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // every buffer holds the pool, so none is in use any more
        if self.context.bind_to_thread().is_ok() {
            let _ = Self::release_cache(&mut self.state());
        }
    }
}

/// An allocation of `len` elements from a device's pool, given back to the pool on drop.
pub struct Buffer<T> {
    view: View<T>,
    size: usize,
    pool: Arc<Pool>,
}

impl<T> Buffer<T> {
    /// `len` elements from `pool`, uninitialised.
    pub(crate) fn allocate(pool: &Arc<Pool>, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>());
        let bytes = bytes.ok_or(CudaError::OutOfMemory { requested: usize::MAX, held: pool.stats().held })?;
        let (ptr, size) = pool.allocate(bytes)?;
        Ok(Buffer { view: View::new(ptr, len), size, pool: pool.clone() })
    }

    /// The whole buffer as a view.
    pub fn view(&self) -> View<T> {
        self.view
    }

    /// The device pointer, borrowed: a kernel argument.
    pub(crate) fn device_ptr(&self) -> &u64 {
        &self.view.ptr
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.view.len
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.view.len == 0
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        self.pool.give_back(self.view.ptr, self.size);
    }
}

/// Device memory outside the pool, for a device's own long-lived scratch (cuBLAS workspaces):
/// taken once when the device opens, freed when it closes, not counted as the program's.
pub(crate) struct Workspace {
    pub(crate) view: View<u8>,
    context: Arc<CudaContext>,
}

impl Workspace {
    pub(crate) fn new(context: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        context.bind_to_thread()?;
        // SAFETY: a fresh allocation, freed once in drop.
        let ptr = unsafe { driver::malloc_sync(bytes)? };
        Ok(Workspace { view: View::new(ptr, bytes), context: context.clone() })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: allocated in `new`, freed once, after the device has finished with it.
            unsafe {
                let _ = driver::ctx::synchronize();
                let _ = driver::free_sync(self.view.ptr);
            }
        }
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

impl<T: Default + Copy> PinnedBuffer<T> {
    pub(crate) fn new(context: &Arc<CudaContext>, len: usize) -> Result<Self> {
        context.bind_to_thread()?;
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
        Ok(PinnedBuffer { ptr, len, context: context.clone() })
    }
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

/// Checks that `views` all hold `len` elements.
pub(crate) fn same_lengths<T>(what: &str, views: &[View<T>]) -> Result<usize> {
    let len = views.first().map_or(0, View::len);
    check(views.iter().all(|v| v.len() == len), || format!("{what}: buffers differ in length"))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::rounded;

    #[test]
    fn sizes_round_to_their_class() {
        assert_eq!(rounded(1), 512);
        assert_eq!(rounded(512), 512);
        assert_eq!(rounded(513), 1024);
        assert_eq!(rounded(1 << 20), 1 << 20);
        assert_eq!(rounded((1 << 20) + 1), 2 << 20);
        assert_eq!(rounded((3 << 20) + 5), 4 << 20);
    }
}
