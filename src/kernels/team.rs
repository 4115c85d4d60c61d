//! Threads running one decoding pass together.
//!
//! A decoding pass is a chain of small products (a few rows against each weight matrix), each
//! a few tens of microseconds. Forking and joining rayon tasks around each one costs little
//! while the other threads are awake, but between products they run out of work, go to sleep,
//! and waking a sleeping thread costs tens of microseconds on a virtual machine (measured on
//! the 2-core machine of docs/results.md): as much as the product itself. So a pass of few rows
//! is run the other way round: each thread of a team enters the pass once, takes its share of
//! each product's columns, and the threads wait for each other at a spinning barrier between
//! the products that depend on each other. The team is this thread and helpers of a `Crew`
//! that spin between passes too, so that starting a pass costs about a microsecond; they sleep
//! once no pass has come for a while. A decode's products all run in teams (the backbone's
//! passes and the head's products), so that no rayon worker competes with a spinning helper
//! for a core.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};

use super::gemm::{matmul, Layout, FEW_ROWS};
use super::Float;
use super::SharedMut;

/// Backbone passes of at most this many new tokens run as a team; longer ones (a prompt) on one
/// thread whose GEMMs use the pool.
pub const TEAM_ROWS: usize = 16;

/// One thread's place in a team: which share of the work it takes, and the barrier it meets the
/// others at.
pub struct Team<'a> {
    /// this thread's place, 0..size
    pub index: usize,
    /// the number of threads in the team
    pub size: usize,
    barrier: Option<&'a SpinBarrier>,
}

impl Team<'static> {
    /// A team of one: its products may still use every thread, through `matmul`.
    pub fn solo() -> Self {
        Team { index: 0, size: 1, barrier: None }
    }
}

impl Team<'_> {
    /// This thread's share of `0..len`, in whole pieces of `piece` (the last share may be short
    /// or empty).
    pub fn share(&self, len: usize, piece: usize) -> Range<usize> {
        let per_thread = len.div_ceil(piece).div_ceil(self.size) * piece;
        (self.index * per_thread).min(len)..((self.index + 1) * per_thread).min(len)
    }

    /// Waits until every thread of the team has reached this point.
    pub fn sync(&self) {
        if let Some(barrier) = self.barrier {
            barrier.wait();
        }
    }

    /// `c (m, n) (+)= a (m, k) · b`, b (n, k) transposed or (k, n) normal: [`matmul`] in a team
    /// of one (a GEMM on every thread for many rows), the few-row kernel on this thread alone in
    /// a larger team (whose other threads are busy with their own shares). The few-row kernel
    /// and `matmul`'s few-row path add each output's terms in the same order.
    #[allow(clippy::too_many_arguments)]
    pub fn product<T: Float>(&self, a: &[T], b: &[T], b_layout: Layout, c: &mut [T], m: usize, k: usize, n: usize, accumulate: bool) {
        if self.size == 1 {
            return matmul(a, Layout::Normal, b, b_layout, c, m, k, n, accumulate);
        }
        if m == 0 || n == 0 {
            return;
        }
        if !accumulate {
            c.fill(T::zero());
        }
        let mut rows: Vec<&mut [T]> = c.chunks_mut(n).collect();
        match b_layout {
            Layout::Transposed => T::rows_times_transposed(a, k, b, 0, &mut rows),
            Layout::Normal => T::rows_times_normal(a, k, b, n, 0, &mut rows),
        }
    }

    /// [`product`](Self::product), with each output's terms added in the same order whatever
    /// the number of rows, in a team of one too: there the few-row kernel on blocks of at most
    /// 16 rows instead of a GEMM over many. A decoding pass that stacks several sequences, and
    /// the head that stacks their states, use it, so that each sequence's rows come out as they
    /// would alone.
    #[allow(clippy::too_many_arguments)]
    pub fn product_by_rows<T: Float>(
        &self,
        a: &[T],
        b: &[T],
        b_layout: Layout,
        c: &mut [T],
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        if self.size > 1 || m <= FEW_ROWS {
            return self.product(a, b, b_layout, c, m, k, n, accumulate);
        }
        for (a_block, c_block) in a.chunks(FEW_ROWS * k).zip(c.chunks_mut(FEW_ROWS * n)) {
            matmul(a_block, Layout::Normal, b, b_layout, c_block, a_block.len() / k, k, n, accumulate);
        }
    }

    /// This thread's share of the columns of `a (m, k) · bᵀ`, b (n, k) with n = `out`'s width,
    /// written into those columns of `out` (m, n).
    ///
    /// # Safety
    /// As [`SharedRows::write_columns`]: every thread of the team writes only its own columns.
    pub unsafe fn product_into_columns<T: Float>(&self, a: &[T], b: &[T], m: usize, k: usize, out: &SharedRows<T>) {
        let columns = self.share(out.width, 16);
        let mut values = vec![T::zero(); m * columns.len()];
        self.product_by_rows(a, &b[columns.start * k..columns.end * k], Layout::Transposed, &mut values, m, k, columns.len(), false);
        out.write_columns(0, columns, &values, false);
    }
}

/// A buffer of `rows` rows of `width` that a team shares: each thread writes its own columns
/// and reads the buffer whole only after the barrier that follows the writes.
#[derive(Clone, Copy)]
pub struct SharedRows<T> {
    start: SharedMut<T>,
    rows: usize,
    width: usize,
}

impl<T: Float> SharedRows<T> {
    /// Shares `buffer` as rows of `width` elements.
    pub fn new(buffer: &mut [T], width: usize) -> Self {
        SharedRows { start: SharedMut::new(buffer.as_mut_ptr()), rows: buffer.len() / width.max(1), width }
    }

    /// The length of a row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The whole buffer.
    ///
    /// # Safety
    /// No thread may write it until the next barrier, and the buffer must outlive the reference.
    pub unsafe fn read(&self) -> &[T] {
        std::slice::from_raw_parts(self.start.get(), self.rows * self.width)
    }

    /// Row `row`, to write.
    ///
    /// # Safety
    /// No other thread may touch this row until the next barrier.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn row_mut(&self, row: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.start.get().add(row * self.width), self.width)
    }

    /// `buffer[first_row.., columns] (+)= values`, values laid out (rows, |columns|).
    ///
    /// # Safety
    /// No other thread may touch these columns of these rows until the next barrier.
    pub unsafe fn write_columns(&self, first_row: usize, columns: Range<usize>, values: &[T], add: bool) {
        if columns.is_empty() {
            return;
        }
        for (i, row) in values.chunks(columns.len()).enumerate() {
            let out = std::slice::from_raw_parts_mut(self.start.get().add((first_row + i) * self.width + columns.start), columns.len());
            if add {
                out.iter_mut().zip(row).for_each(|(o, &v)| *o += v);
            } else {
                out.copy_from_slice(row);
            }
        }
    }
}

/// Only one team runs at a time: the crew's helpers serve one pass at a time.
static ONE_TEAM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `body` on `min(rayon pool's threads, cores)` threads at once, each with its place in
/// the team: this thread and helpers of the `Crew`; or on this thread alone as a team of one
/// when the pool has one thread, when it has more threads than the machine has cores (a
/// spinning thread would take the core of the thread it waits for), or when another team is
/// running. A panic in any thread releases the others and reaches the caller.
pub fn together(body: impl Fn(&Team) + Sync) {
    let threads = rayon::current_num_threads();
    let cores = cores();
    let turn = match ONE_TEAM_AT_A_TIME.try_lock() {
        _ if threads == 1 || threads > cores => None,
        Ok(turn) => Some(turn),
        // a team that panicked left the lock poisoned; it guards no data, so take it anyway
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    match turn {
        Some(_turn) => Crew::get(cores).run(threads, &body),
        None => body(&Team::solo()),
    }
}

/// The machine's cores, asked once: the answer takes reading the cgroup's files each time,
/// some 20 µs, a tenth of a decoding pass.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Helper threads that stay awake between the passes of a decode. A pass is a few hundred
/// microseconds and passes follow each other closely, with the head's work on one thread in
/// between; waking a sleeping thread for each pass (`rayon::broadcast`) cost 48–70 µs on the
/// 2-core machine of docs/results.md, a quarter of a one-token pass. So the helpers spin while
/// they wait for the next pass, and sleep only after [`SPIN_BEFORE_SLEEPING`] without one.
struct Crew {
    helpers: Vec<Helper>,
}

/// A helper thread and its mailbox. Each helper has its own, so that a pass reaches only the
/// helpers it needs, and those are the ones its poster waits for.
struct Helper {
    thread: std::thread::Thread,
    /// counts the passes posted to this helper
    posted: AtomicUsize,
    /// the latest of them: a `Pass` on its poster's stack, live until this helper has counted
    /// itself finished with it
    pass: std::sync::atomic::AtomicPtr<Pass<'static>>,
}

/// One posted pass: what to run, on how many threads, and how they meet.
struct Pass<'a> {
    body: &'a (dyn Fn(&Team) + Sync),
    size: usize,
    barrier: SpinBarrier,
    /// helpers done with it (a helper touches the pass no more after counting itself here)
    finished: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

/// How long a helper spins for the next pass before it sleeps: longer than the host's work
/// between two decoding passes, short enough not to hold a core long after decoding ends.
const SPIN_BEFORE_SLEEPING: std::time::Duration = std::time::Duration::from_millis(2);

impl Crew {
    /// The crew, started at its first use with a helper for each core but this one.
    fn get(cores: usize) -> &'static Crew {
        static CREW: std::sync::OnceLock<Crew> = std::sync::OnceLock::new();
        CREW.get_or_init(|| {
            let helpers = (1..cores)
                .map(|index| {
                    let thread = std::thread::Builder::new()
                        .name(format!("decode-team-{index}"))
                        .spawn(move || Crew::get(cores).help(index))
                        .expect("starting a decoding helper thread")
                        .thread()
                        .clone();
                    Helper { thread, posted: AtomicUsize::new(0), pass: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()) }
                })
                .collect();
            Crew { helpers }
        })
    }

    /// Runs `body` on this thread (index 0) and helpers 1..size, returning when all are done.
    fn run(&self, threads: usize, body: &(dyn Fn(&Team) + Sync)) {
        let size = threads.min(self.helpers.len() + 1);
        let pass = Pass { body, size, barrier: SpinBarrier::new(size), finished: AtomicUsize::new(0), panic: Mutex::new(None) };
        // SAFETY: a helper follows the pointer only after its `posted` count moves and until it
        // counts itself finished, and this function returns only after every helper it posted
        // to has done so: `pass` (and `body`) outlive every use.
        let posted = &pass as *const Pass as *mut Pass<'static>;
        for helper in &self.helpers[..size - 1] {
            helper.pass.store(posted, Ordering::Release);
            helper.posted.fetch_add(1, Ordering::AcqRel);
            // wakes the helper if it sleeps; if it spins, this only leaves it a token
            helper.thread.unpark();
        }
        pass.run(0);
        spin_until(|| pass.finished.load(Ordering::Acquire) == size - 1);
        if let Some(panic) = pass.panic.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()) {
            std::panic::resume_unwind(panic);
        }
    }

    /// Helper `index`'s life: wait for each pass posted to it (spinning, then asleep) and run
    /// its share.
    fn help(&self, index: usize) {
        let mailbox = &self.helpers[index - 1];
        let mut seen = 0;
        loop {
            let waiting_since = std::time::Instant::now();
            let mut spins = 0u32;
            while mailbox.posted.load(Ordering::Acquire) == seen {
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(1024) {
                    std::hint::spin_loop();
                } else if waiting_since.elapsed() < SPIN_BEFORE_SLEEPING {
                    // now and then give the core to a thread that wants it (the poster's, when
                    // the machine runs more threads than it has cores)
                    std::thread::yield_now();
                } else {
                    // `run` unparks after posting, so a pass posted before this park ends it
                    std::thread::park();
                }
            }
            seen += 1;
            // SAFETY: a pass was posted to this helper, and its poster waits until the helper
            // counts itself finished below (`Crew::run`), so the pointer is live until then.
            let pass = unsafe { &*mailbox.pass.load(Ordering::Acquire) };
            pass.run(index);
            pass.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Pass<'_> {
    /// Runs the body as thread `index` of the team; a panic releases the others and is kept for
    /// the poster.
    fn run(&self, index: usize) {
        let team = Team { index, size: self.size, barrier: Some(&self.barrier) };
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.body)(&team))) {
            // a thread that panics would leave the others waiting at the barrier for ever
            self.barrier.abandoned.store(true, Ordering::Release);
            let mut kept = self.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            // the first panic is the cause; the others are its echo at the barrier
            kept.get_or_insert(panic);
        }
    }
}

/// A barrier whose waiters spin (sleeping would bring back the wake-up cost this module
/// avoids), yielding the core after a while in case the thread they wait for is not running.
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    /// how many times the barrier has opened
    generation: AtomicUsize,
    /// set when a thread of the team panicked and will not arrive
    abandoned: AtomicBool,
}

/// Spins before each yield: about 10–20 µs, longer than a product.
const SPINS_BEFORE_YIELDING: u32 = 1 << 14;

/// Waits for `done` by spinning, then by yielding the core in case the thread it waits for is
/// not running (on a machine with more threads than cores).
fn spin_until(done: impl Fn() -> bool) {
    let mut spins = 0;
    while !done() {
        if spins < SPINS_BEFORE_YIELDING {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        SpinBarrier { threads, arrived: AtomicUsize::new(0), generation: AtomicUsize::new(0), abandoned: AtomicBool::new(false) }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // the last to arrive resets the count before opening, so that a thread that runs
            // ahead to the next barrier counts from zero
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        spin_until(|| {
            if self.abandoned.load(Ordering::Acquire) {
                panic!("another thread of the decoding team panicked");
            }
            self.generation.load(Ordering::Acquire) != generation
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_range_once_in_whole_pieces() {
        let barrier = SpinBarrier::new(3);
        for (len, piece) in [(256, 16), (100, 16), (5, 1), (2, 1), (0, 16)] {
            let mut covered = vec![0; len];
            for index in 0..3 {
                let team = Team { index, size: 3, barrier: Some(&barrier) };
                let share = team.share(len, piece);
                assert!(share.start.is_multiple_of(piece), "{len} {piece}: {share:?}");
                share.for_each(|i| covered[i] += 1);
            }
            assert!(covered.iter().all(|&c| c == 1), "{len} {piece}");
        }
    }

    #[test]
    fn the_barrier_holds_every_thread_until_all_arrive() {
        // each thread writes its round number, then checks after the barrier that every thread
        // has written it: a barrier that let one through early would fail the check
        let threads = 3;
        let barrier = SpinBarrier::new(threads);
        let rounds: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|scope| {
            for index in 0..threads {
                let (barrier, rounds) = (&barrier, &rounds);
                scope.spawn(move || {
                    for round in 1..=200 {
                        rounds[index].store(round, Ordering::Relaxed);
                        barrier.wait();
                        assert!(rounds.iter().all(|r| r.load(Ordering::Relaxed) >= round));
                        barrier.wait();
                    }
                });
            }
        });
    }

    #[test]
    fn every_thread_of_a_team_runs_each_pass_once() {
        // the helpers take passes from their mailboxes: each pass must reach exactly the
        // threads 0..size, however quickly passes follow each other (a team of one when the
        // turn is taken by another test's team)
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let expected = if cores() >= 2 { 2 } else { 1 };
        // other tests' teams may hold the turn for a while: go on until 200 passes ran as a
        // full team (or give up after 30 s)
        let (mut full_teams, started) = (0, std::time::Instant::now());
        while full_teams < 200 && started.elapsed().as_secs() < 30 {
            let (size, ran) = (AtomicUsize::new(0), [AtomicUsize::new(0), AtomicUsize::new(0)]);
            pool.install(|| {
                together(|team| {
                    size.store(team.size, Ordering::Relaxed);
                    ran[team.index].fetch_add(1, Ordering::Relaxed);
                    team.sync();
                })
            });
            let size = size.into_inner();
            let ran = ran.map(AtomicUsize::into_inner);
            assert_eq!(ran[..size], vec![1; size][..], "team of {size}");
            assert!(ran[size..].iter().all(|&count| count == 0), "team of {size}: {ran:?}");
            full_teams += usize::from(size == expected);
        }
        assert_eq!(full_teams, 200, "ran as a team of {expected} only {full_teams} times in 30 s");
    }

    #[test]
    fn a_thread_that_panics_releases_the_others_and_the_panic_reaches_the_caller() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let expected = if cores >= 2 { 2 } else { 1 };
        // a team that panics in its last thread; returns the team's size. (Another test's team
        // may hold the turn for a moment, and a pass then runs as a team of one: try again.)
        let panicking_team = || {
            let size = AtomicUsize::new(0);
            let outcome = pool.install(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    together(|team| {
                        size.store(team.size, Ordering::Relaxed);
                        if team.index == team.size - 1 {
                            panic!("deliberate");
                        }
                        // without the release, the other thread would wait here for ever
                        team.sync();
                    })
                }))
            });
            assert!(outcome.is_err(), "the panic did not reach the caller");
            size.into_inner()
        };
        assert!((0..1000).any(|_| panicking_team() == expected), "never ran as a team of {expected}");
        // and the next pass still runs as a full team
        let team_size = || {
            let size = AtomicUsize::new(0);
            pool.install(|| together(|team| size.store(team.size, Ordering::Relaxed)));
            size.into_inner()
        };
        assert!((0..1000).any(|_| team_size() == expected), "teams of {expected} stopped after a panic");
    }
}
