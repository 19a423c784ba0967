//! A team of threads that stays awake between the short parallel sections of a forward pass.
//!
//! A decode step runs ten parallel sections per layer (the projections with their LoRA,
//! attention, the row-wise steps), each a few tens of microseconds at small batches. Fork-join
//! through rayon pays a wake of a sleeping worker (a futex round trip, and the scheduler's
//! context switch) at most of them, because its workers go to sleep in the serial gaps between
//! sections. Measured with
//! `perf` on SmolLM2 at batch 8 on two cores, that was about a tenth of a step.
//!
//! The team is the shape inference engines use instead (llama.cpp's thread pool): its workers
//! start once and, after a section, spin on a counter for [`SPIN`] before they park. A section
//! is published by bumping that counter; the caller and every awake worker then claim tasks
//! from one shared atomic until none are left. The caller does not wait for workers that are
//! parked or have not yet joined: a section ends when every *claimed* task is done, so a late
//! worker costs nothing but the tasks it would have taken (a worker preempted inside a task it
//! claimed is waited for).
//!
//! One caller at a time uses the team; a second, concurrent caller (two executors in one
//! process, tests running in parallel) and any section started from inside a task run their
//! tasks on their own thread, in order. Tasks must be independent: they run in any order, on
//! any thread.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// How long a worker spins for the next section before it parks. Long enough to span the
/// serial gaps inside a step and between steps (sampling, scheduling), short enough that an
/// idle server gives its cores back at once.
const SPIN: Duration = Duration::from_micros(500);

/// Runs `f(0)`, …, `f(tasks - 1)`, spread over the team (the calling thread included), and
/// returns when all have run. A panic in a task is raised again here, after every other task
/// has finished with `f`.
pub fn for_each(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if tasks == 0 {
        return;
    }
    let team = Team::global();
    let serial = || (0..tasks).for_each(f);
    if tasks == 1 || team.workers == 0 || IN_TASK.get() {
        return serial();
    }
    let _caller = match team.caller.try_lock() {
        Ok(caller) => caller,
        // A section whose task panicked released the team cleanly (see `Team::run`).
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return serial(),
    };
    team.run(tasks, f);
}

/// Independent work that shares a parallel section with another loop (the LoRA of a decode
/// step beside its projection's panels, [`crate::quant::matmul_beside`]): item `i`'s memory
/// (`memory`) is asked for a share at a time while the loop's share of a task computes, and the
/// item is done (`run`) after it, so that its reads from memory overlap the loop's arithmetic
/// and the two need one section.
pub trait Beside: Sync {
    /// How many items there are.
    fn tasks(&self) -> usize;
    /// The memory item `i` reads, as up to two byte ranges (a hint; the default: none).
    fn memory(&self, _i: usize) -> [&[u8]; 2] {
        [&[], &[]]
    }
    /// Asks for item `i`'s memory at once, where it has no loop share to overlap (a hint).
    fn prefetch(&self, i: usize) {
        for range in self.memory(i) {
            crate::ops::prefetch(range);
        }
    }
    /// Does item `i`.
    fn run(&self, i: usize);
}

/// Runs `beside`'s items in a section of their own.
pub fn run_beside(beside: &dyn Beside) {
    for_each(beside.tasks(), &|i| {
        beside.prefetch(i);
        beside.run(i);
    });
}

/// Runs `f(i, piece)` for every `len`-long piece `i` of `data` (the last may be shorter),
/// `per_task` pieces to a task: a parallel loop whose iterations each own a piece of the output.
pub fn for_each_piece<T: Send>(data: &mut [T], len: usize, per_task: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    assert!(len > 0 && per_task > 0, "for_each_piece: empty pieces or tasks");
    let (pieces, total) = (data.len().div_ceil(len), data.len());
    let base = Shared::new(data);
    for_each(pieces.div_ceil(per_task), &|t| {
        for i in t * per_task..((t + 1) * per_task).min(pieces) {
            let start = i * len;
            // SAFETY: piece i is `start .. min(start + len, total)`, inside `data`, which is
            // borrowed mutably for the whole loop; pieces are disjoint and each is handed to
            // the one task that owns index i.
            let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), len.min(total - start)) };
            f(i, piece);
        }
    });
}

/// Rows a task of a row-wise section takes at most (prefill-sized batches).
const ROWS_PER_TASK: usize = 16;

/// Runs `f(r, row)` for every `width`-long row `r` of `data`: a row-wise parallel loop. A task
/// takes all of them for one row, a share per thread for a decode batch (the team is awake
/// between a step's sections, so even a few rows split), [`ROWS_PER_TASK`] for prefill.
pub fn for_each_row<T: Send>(data: &mut [T], width: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    let rows = data.len() / width.max(1);
    for_each_piece(data, width.max(1), rows.div_ceil(threads()).clamp(1, ROWS_PER_TASK), f);
}

/// A mutably borrowed slice's `width`-long rows, each behind its own lock: for row-wise sections
/// that write more than one buffer (or write one that a closure captures), each row taken by the
/// one task that owns it, so never contended.
#[derive(Debug)]
pub struct Rows<'a, T>(Vec<Mutex<&'a mut [T]>>);

impl<'a, T> Rows<'a, T> {
    pub fn new(data: &'a mut [T], width: usize) -> Rows<'a, T> {
        Rows(data.chunks_mut(width.max(1)).map(Mutex::new).collect())
    }

    /// Row `r`, or `None` past the last.
    pub fn get(&self, r: usize) -> Option<MutexGuard<'_, &'a mut [T]>> {
        Some(self.0.get(r)?.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Row `r`.
    ///
    /// # Panics
    /// Past the last row (a caller bug).
    pub fn row(&self, r: usize) -> MutexGuard<'_, &'a mut [T]> {
        self.get(r).unwrap_or_else(|| panic!("row {r} of {}", self.0.len()))
    }
}

impl<T> Default for Rows<'_, T> {
    fn default() -> Self {
        Rows(Vec::new())
    }
}

/// The start of a mutably borrowed slice, shared by a section's tasks that write disjoint
/// elements of it ([`for_each_piece`], the quantized product's column blocks, LoRA's
/// (row, projection) blocks). Whoever makes one keeps the slice borrowed for the section and
/// proves the disjointness where the tasks write.
pub(crate) struct Shared<T>(*mut T);
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
// SAFETY: every element is reached by one task only (the maker's proof), and `T: Send` lets
// it be written from the thread that runs that task.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub(crate) fn new(data: &mut [T]) -> Shared<T> {
        Shared(data.as_mut_ptr())
    }

    /// Through a method, so closures capture the whole `Shared` (which is `Sync`), not its field.
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// Threads in the team, the caller included: rayon's thread count (`--threads`) when the team
/// first runs. (A worker the OS refused to start still counts; its share falls to the others.)
pub fn threads() -> usize {
    Team::global().workers + 1
}

thread_local! {
    /// Set while this thread runs a section's tasks: a section started from inside one runs
    /// serially (every other thread is busy with the outer section).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// One section, on its caller's stack for as long as [`Team::run`] runs.
struct Section<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    /// The first panic of a worker's task, raised again by the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Section<'_> {
    /// Claims and runs tasks until none are left.
    fn drain(&self) {
        struct Leave;
        impl Drop for Leave {
            fn drop(&mut self) {
                IN_TASK.set(false);
            }
        }
        IN_TASK.set(true);
        let _leave = Leave;
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.tasks {
                break;
            }
            (self.f)(i);
        }
    }
}

struct Team {
    workers: usize,
    /// Bumped to publish a section.
    epoch: AtomicU64,
    /// The section published, or null between sections. Type-erased: see [`Team::run`].
    section: AtomicPtr<Section<'static>>,
    /// Workers between reading `section` and finishing with it.
    active: AtomicUsize,
    /// Workers parked on `wake`, and the lock they park with.
    sleepers: AtomicUsize,
    parking: Mutex<()>,
    wake: Condvar,
    /// Held by the one caller using the team.
    caller: Mutex<()>,
}

impl Team {
    fn global() -> &'static Team {
        static TEAM: OnceLock<&'static Team> = OnceLock::new();
        TEAM.get_or_init(|| {
            let workers = rayon::current_num_threads().saturating_sub(1);
            let team: &'static Team = Box::leak(Box::new(Team {
                workers,
                epoch: AtomicU64::new(0),
                section: AtomicPtr::new(std::ptr::null_mut()),
                active: AtomicUsize::new(0),
                sleepers: AtomicUsize::new(0),
                parking: Mutex::new(()),
                wake: Condvar::new(),
                caller: Mutex::new(()),
            }));
            for i in 0..workers {
                // A worker that cannot start leaves its share to the others: the caller drains
                // every task it publishes whoever else joins.
                let _ = std::thread::Builder::new().name(format!("switchyard-team-{i}")).spawn(|| team.work());
            }
            team
        })
    }

    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let section = Section { f, tasks, next: AtomicUsize::new(0), panic: Mutex::new(None) };
        // Unpublishes the section and waits out the workers inside it, on return and on a
        // panic of the caller's own task alike: after this no thread touches `section`.
        struct Close<'t, 's>(&'t Team, &'s Section<'s>);
        impl Drop for Close<'_, '_> {
            fn drop(&mut self) {
                // After a panic of the caller's task, no one claims the rest.
                self.1.next.store(self.1.tasks, SeqCst);
                self.0.section.store(std::ptr::null_mut(), SeqCst);
                let mut spins = 0u32;
                while self.0.active.load(SeqCst) != 0 {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(1024) {
                        // A preempted worker is finishing a task: let it have the core.
                        std::thread::yield_now();
                    }
                    std::hint::spin_loop();
                }
            }
        }
        // The lifetime is erased for the workers' sake. Sound because `Close` unpublishes the
        // pointer and waits until no worker holds it before `section` (and `f`) go away.
        let erased = (&section as *const Section<'_>).cast::<Section<'static>>().cast_mut();
        self.section.store(erased, SeqCst);
        let close = Close(self, &section);
        self.epoch.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) != 0 {
            let _parking = self.parking.lock().unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
        section.drain();
        drop(close);
        if let Some(payload) = section.panic.lock().unwrap_or_else(PoisonError::into_inner).take() {
            resume_unwind(payload);
        }
    }

    /// A worker's life: wait for a section, join it, repeat.
    fn work(&self) {
        let mut seen = self.epoch.load(SeqCst);
        loop {
            seen = self.next_epoch(seen);
            // Announce before reading the pointer: a caller that unpublishes its section then
            // sees this worker as active and waits for it (both sides are sequentially
            // consistent, so one of them sees the other's write).
            self.active.fetch_add(1, SeqCst);
            // Leaves `active` however this iteration ends: a caller must never wait on a worker
            // that is gone.
            struct Leave<'t>(&'t AtomicUsize);
            impl Drop for Leave<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, SeqCst);
                }
            }
            let _leave = Leave(&self.active);
            let ptr = self.section.load(SeqCst);
            // SAFETY: non-null means published and not yet unpublished when read, with this
            // worker counted in `active`: its caller waits for `active` to drop before the
            // section leaves its stack.
            if let Some(section) = unsafe { ptr.as_ref() }
                && let Err(payload) = catch_unwind(AssertUnwindSafe(|| section.drain()))
            {
                // Claim the rest so the caller finishes; keep the first panic.
                section.next.store(section.tasks, SeqCst);
                section.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(payload);
            }
        }
    }

    /// Waits until the epoch moves past `seen`: spinning for [`SPIN`], then parked.
    fn next_epoch(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.epoch.load(SeqCst);
            if epoch != seen {
                return epoch;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut parking = self.parking.lock().unwrap_or_else(PoisonError::into_inner);
                // Counted before the epoch is read again: a caller that bumps it afterwards
                // sees a sleeper and notifies under the lock this thread holds until it waits.
                self.sleepers.fetch_add(1, SeqCst);
                while self.epoch.load(SeqCst) == seen {
                    parking = self.wake.wait(parking).unwrap_or_else(PoisonError::into_inner);
                }
                self.sleepers.fetch_sub(1, SeqCst);
                return self.epoch.load(SeqCst);
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let runs: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            for_each(tasks, &|i| {
                runs[i].fetch_add(1, SeqCst);
            });
            assert!(runs.iter().all(|r| r.load(SeqCst) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn sections_back_to_back_and_after_a_pause_see_their_own_tasks() {
        let total = AtomicUsize::new(0);
        for round in 0..2000 {
            if round % 500 == 0 {
                // Long enough for the workers to park.
                std::thread::sleep(SPIN * 3);
            }
            let sum = AtomicUsize::new(0);
            for_each(64, &|i| {
                sum.fetch_add(i + round, SeqCst);
            });
            assert_eq!(sum.load(SeqCst), 64 * 63 / 2 + 64 * round);
            total.fetch_add(1, SeqCst);
        }
        assert_eq!(total.load(SeqCst), 2000);
    }

    #[test]
    fn pieces_cover_the_slice_once_each_with_a_short_last_piece() {
        let mut data = vec![0u32; 103];
        for_each_piece(&mut data, 10, 3, &|i, piece| {
            assert!(piece.len() == 10 || (i == 10 && piece.len() == 3));
            for v in piece.iter_mut() {
                *v += 1 + i as u32;
            }
        });
        assert!(data.iter().enumerate().all(|(j, &v)| v == 1 + (j / 10) as u32), "{data:?}");
    }

    #[test]
    fn nested_and_concurrent_sections_complete() {
        let outer: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        for_each(8, &|i| {
                            let inner = AtomicU32::new(0);
                            for_each(4, &|_| {
                                inner.fetch_add(1, SeqCst);
                            });
                            assert_eq!(inner.load(SeqCst), 4);
                            outer[i].fetch_add(1, SeqCst);
                        });
                    }
                });
            }
        });
        assert!(outer.iter().all(|r| r.load(SeqCst) == 600));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_goes_on() {
        for _ in 0..20 {
            let caught = catch_unwind(|| {
                for_each(64, &|i| {
                    if i == 40 {
                        panic!("task 40 fails");
                    }
                    std::hint::black_box(i);
                });
            });
            let payload = caught.expect_err("the panic comes back");
            assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 40 fails"));
        }
        let ran = AtomicUsize::new(0);
        for_each(100, &|_| {
            ran.fetch_add(1, SeqCst);
        });
        assert_eq!(ran.load(SeqCst), 100);
    }
}
