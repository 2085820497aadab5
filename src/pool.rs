//! The thread pool verity's CPU kernels run on (the quantized matmuls first of all).
//!
//! A decode step is hundreds of small parallel products separated by short serial parts,
//! so waking threads from sleep for each would cost more than the products. The usual
//! cure, workers that spin between calls and a barrier at the end of each, collapses when
//! the host is busy: one worker the OS has not scheduled holds every call at the barrier
//! for a time slice (candle's pool: SmolLM2 batch-1 decode fell from ~92 to 5–25 tok/s with
//! one other busy process on two cores). This pool differs in three ways:
//!
//! - **Nobody waits for a thread that has not started.** A call is a set of chunks taken
//!   from a shared cursor; the calling thread takes chunks too. A worker joins a call only
//!   while it is open, and the caller, once the cursor is spent, closes it and waits only
//!   for the workers that joined, which are running a chunk. A descheduled worker costs the
//!   call nothing: the others take its share.
//! - **Spin, then yield, then park.** A worker spins briefly after a call (the next one is
//!   usually microseconds away), then keeps checking with `sched_yield` so that a busy
//!   host's other threads run, then parks until woken.
//! - **Sized from the cores the process may use** (`available_parallelism`: the affinity
//!   mask and the cgroup quota), or `VERITY_THREADS`; no pinning.
//!
//! The state of the current call is one atomic word: its generation, a closed bit and the
//! number of workers inside it. Joining is a compare-and-swap on that word, so a worker can
//! never join a call that has been closed, and the call's data (on the caller's stack) is
//! only read by workers the caller waits for.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a worker spins after a call before it starts yielding, and how long it
/// yields before it parks.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_millis(2);

const CLOSED: u64 = 1 << 31;
const ACTIVE: u64 = CLOSED - 1;

fn generation(state: u64) -> u64 {
    state >> 32
}

/// A pool of worker threads; the thread that calls [`Pool::run`] works too.
pub struct Pool {
    shared: Arc<Shared>,
    /// Serializes calls: one call is open at a time.
    call: Mutex<u64>,
    workers: Vec<Thread>,
}

struct Shared {
    /// generation << 32 | CLOSED | workers inside the call.
    state: AtomicU64,
    /// The next chunk of the open call.
    cursor: AtomicUsize,
    /// The open call; written by the caller only while the call is closed and empty.
    job: UnsafeCell<Job>,
    /// Per worker: whether it is parked (or about to be), so the caller knows whom to wake.
    parked: Vec<AtomicBool>,
    stop: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is written only by the caller holding `call` while no worker is inside a
// call, and read only by workers inside the call (see `Pool::run`).
unsafe impl Sync for Shared {}
// SAFETY: the raw pointer in `job` is only dereferenced under the protocol above.
unsafe impl Send for Shared {}

#[derive(Clone, Copy)]
struct Job {
    /// Runs chunk c of the closure at `data`.
    run: unsafe fn(*const (), usize),
    data: *const (),
    chunks: usize,
}

thread_local! {
    /// Whether this thread is running a chunk (a worker always is, in effect): a call
    /// from it runs inline, as taking the call lock again would deadlock.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

impl Pool {
    /// A pool with `threads` threads in all: `threads - 1` workers and the caller.
    pub fn new(threads: usize) -> Self {
        let n = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            state: AtomicU64::new(CLOSED),
            cursor: AtomicUsize::new(0),
            job: UnsafeCell::new(Job {
                run: |_, _| {},
                data: std::ptr::null(),
                chunks: 0,
            }),
            parked: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let workers = (0..n)
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("verity-cpu-{i}"))
                    .spawn(move || worker(&shared, i))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        Self {
            shared,
            call: Mutex::new(0),
            workers,
        }
    }

    /// The process-wide pool, sized from the cores this process may run on
    /// (`VERITY_THREADS` overrides).
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(default_threads()))
    }

    /// Threads that share a call's chunks, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(c)` for every chunk c in 0..chunks, on the caller and the workers that are
    /// free, and returns when all have run. Chunks run in no particular order; a panic in
    /// one is resumed here once the others are done. A call from inside a chunk runs
    /// inline.
    pub fn run<F: Fn(usize) + Sync>(&self, chunks: usize, f: F) {
        if chunks == 0 {
            return;
        }
        if chunks == 1 || self.workers.is_empty() || INSIDE.with(Cell::get) {
            (0..chunks).for_each(f);
            return;
        }
        unsafe fn trampoline<F: Fn(usize)>(data: *const (), c: usize) {
            // SAFETY: `data` is the `&F` that `run` published, alive until it returns.
            unsafe { (*data.cast::<F>())(c) }
        }
        let s = &*self.shared;
        let mut generation = self.call.lock();
        *generation += 1;
        // SAFETY: the previous call is closed and no worker is inside it (the caller
        // waited), and new workers cannot join a closed call: nobody reads `job` now.
        unsafe {
            *s.job.get() = Job {
                run: trampoline::<F>,
                data: (&f as *const F).cast(),
                chunks,
            };
        }
        s.cursor.store(0, Ordering::Relaxed);
        // Open the call (SeqCst: ordered before the reads of `parked` below, against
        // the workers' store to `parked` and reload of `state`).
        s.state.store(*generation << 32, Ordering::SeqCst);
        for (i, parked) in s.parked.iter().enumerate() {
            if parked.load(Ordering::SeqCst) {
                self.workers[i].unpark();
            }
        }
        // The caller's share: whatever the workers do not take.
        INSIDE.with(|w| w.set(true));
        let mine = catch_unwind(AssertUnwindSafe(|| run_chunks(s)));
        INSIDE.with(|w| w.set(false));
        // Close, then wait for the workers inside, who are running their last chunks.
        let mut state = s.state.fetch_or(CLOSED, Ordering::AcqRel) | CLOSED;
        let start = Instant::now();
        while state & ACTIVE != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            state = s.state.load(Ordering::Acquire);
        }
        let theirs = s.panic.lock().take();
        drop(generation);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

impl Pool {
    /// Runs `f(i, part)` for every part i of `data` cut into parts of `part_len` elements
    /// (the last may be shorter), as [`Self::run`] runs chunks: each part is one chunk.
    pub fn for_each_part<T: Send>(
        &self,
        data: &mut [T],
        part_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let parts: Vec<Mutex<&mut [T]>> =
            data.chunks_mut(part_len.max(1)).map(Mutex::new).collect();
        self.run(parts.len(), |i| f(i, &mut parts[i].lock()));
    }
}

/// Runs chunks of the open call until the cursor is spent.
fn run_chunks(s: &Shared) {
    // SAFETY: called by the caller of the open call or by a worker inside it; the job
    // stays unchanged until the call is closed and empty.
    let job = unsafe { *s.job.get() };
    loop {
        let c = s.cursor.fetch_add(1, Ordering::Relaxed);
        if c >= job.chunks {
            return;
        }
        // SAFETY: `job.data` is the caller's closure, alive while the call is open or
        // has workers inside.
        unsafe { (job.run)(job.data, c) };
    }
}

fn worker(s: &Shared, i: usize) {
    INSIDE.with(|w| w.set(true));
    let mut seen = 0;
    loop {
        let Some(state) = wait_for_call(s, i, seen) else {
            return;
        };
        seen = generation(state);
        if join(s, state) {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| run_chunks(s))) {
                s.panic.lock().get_or_insert(p);
            }
            s.state.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Enters the open call of `state`'s generation, unless it has closed meanwhile.
fn join(s: &Shared, mut state: u64) -> bool {
    let gen = generation(state);
    loop {
        if generation(state) != gen || state & CLOSED != 0 {
            return false;
        }
        match s
            .state
            .compare_exchange_weak(state, state + 1, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(now) => state = now,
        }
    }
}

/// Waits for an open call of a generation after `seen`: spins, yields, then parks. None
/// when the pool stops.
fn wait_for_call(s: &Shared, i: usize, seen: u64) -> Option<u64> {
    let is_new = |state: u64| generation(state) != seen && state & CLOSED == 0;
    let mut start = Instant::now();
    let mut spins = 0u32;
    loop {
        let state = s.state.load(Ordering::Acquire);
        if is_new(state) {
            return Some(state);
        }
        if s.stop.load(Ordering::Relaxed) {
            return None;
        }
        spins = spins.wrapping_add(1);
        // Read the clock now and then: it costs more than a spin.
        let waited = if spins.is_multiple_of(64) {
            start.elapsed()
        } else {
            Duration::ZERO
        };
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < SPIN + YIELD {
            std::thread::yield_now();
        } else {
            s.parked[i].store(true, Ordering::SeqCst);
            let state = s.state.load(Ordering::SeqCst);
            if !is_new(state) && !s.stop.load(Ordering::SeqCst) {
                // A call opened after the load above unparks us (the token is kept if it
                // comes before `park`).
                std::thread::park();
            }
            s.parked[i].store(false, Ordering::Relaxed);
            start = Instant::now();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for w in &self.workers {
            w.unpark();
        }
    }
}

/// `VERITY_THREADS`, else the cores this process may use.
fn default_threads() -> usize {
    std::env::var("VERITY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_whatever_the_pool_size() {
        for threads in [1, 2, 4] {
            let pool = Pool::new(threads);
            for chunks in [0, 1, 3, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(chunks, |c| {
                    hits[c].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn many_calls_from_several_threads_and_nested_calls() {
        let pool = Arc::new(Pool::new(3));
        let total = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        pool.run(8, |_| {
                            // A nested call runs inline instead of deadlocking.
                            pool.run(2, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 500 * 8 * 2);
    }

    #[test]
    fn workers_wake_from_parking_and_a_panic_reaches_the_caller() {
        let pool = Pool::new(2);
        pool.run(4, |_| {});
        // Long enough for the worker to park.
        std::thread::sleep(SPIN + YIELD + Duration::from_millis(20));
        // Two chunks: the caller's waits for the worker's, so the worker must wake (a
        // deadline instead of a hang if it never does).
        let worker_ran = AtomicBool::new(false);
        let on_caller = std::thread::current().id();
        pool.run(2, |_| {
            if std::thread::current().id() != on_caller {
                worker_ran.store(true, Ordering::Release);
                return;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !worker_ran.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert!(
            worker_ran.load(Ordering::Acquire),
            "the parked worker never woke"
        );
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(16, |c| assert_ne!(c, 7))));
        assert!(r.is_err());
        // The pool still works after a panic.
        let n = AtomicUsize::new(0);
        pool.run(16, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
