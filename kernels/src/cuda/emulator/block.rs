//! Running an emulated launch: blocks one after another on the calling thread; the threads of a
//! block as fibers (stackful coroutines) that switch only where CUDA threads synchronize.
//!
//! A fiber runs until it reaches `__syncthreads()` or a warp shuffle, or returns. When no fiber
//! can run, the scheduler completes every shuffle whose lanes have all arrived (each lane gets
//! the value its source lane brought), or, when every live thread waits at the barrier, opens
//! it. Anything else is a deadlock, reported as an error naming where the threads wait: a
//! barrier inside divergent code, or a shuffle whose mask names a lane that never comes.
//!
//! Between two synchronization points the runnable fibers are resumed in an order that depends
//! on the block. In the thread-at-a-time orders (ascending thread index, descending, or a fresh
//! shuffle each round) every runnable thread takes one step before any warp's shuffle completes,
//! so the warps of a block stay abreast. In the warp-at-a-time orders one warp runs, its shuffles
//! completing as it reaches them, until it waits at the barrier or returns, before the next warp
//! starts: warps race each other as far as a barrier lets them. A read of shared memory another
//! thread writes without a barrier between them sees a stale value in one of the first kind (a
//! missing barrier before a read); a write that overwrites what a slower warp has yet to read
//! (a missing barrier after a read, typically at the end of a loop) is seen in one of the second.

use super::super::CudaError;
use super::super::device::Launch;
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_void};

/// Bytes of stack per fiber: the kernels keep small register arrays; the deepest call chain is
/// entry point → kernel body → helper → the scheduler's suspend.
const FIBER_STACK: usize = 64 * 1024;
/// Largest block CUDA allows.
const MAX_BLOCK_THREADS: u32 = 1024;
const WARP: usize = 32;

unsafe extern "C" {
    fn switchyard_emu_enter(thread: *const ThreadCtx);
    fn switchyard_emu_entry_count() -> i32;
    fn switchyard_emu_entry_name(index: i32) -> *const c_char;
    fn switchyard_emu_param_count(index: i32) -> i32;
    fn switchyard_emu_param_size(index: i32, param: i32) -> u32;
    fn switchyard_emu_invoke(index: i32, params: *const *mut c_void);
}

/// `emu::Thread` in cuda.h: thread and block index, block and grid shape.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ThreadCtx {
    thread_idx: [u32; 3],
    block_idx: [u32; 3],
    block_dim: [u32; 3],
    grid_dim: [u32; 3],
}

/// Why a fiber stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Barrier,
    Shuffle,
}

type Fiber = Coroutine<(), Stop, (), DefaultStack>;

/// One emulated thread's state, shared between its fiber and the scheduler.
#[derive(Debug)]
struct Lane {
    ctx: ThreadCtx,
    yielder: *const Yielder<(), Stop>,
    /// The pending shuffle: the value brought, the lane asked for, the mask, and the answer.
    value: u32,
    src: i32,
    mask: u32,
    result: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    AtBarrier,
    AtShuffle,
    Done,
}

thread_local! {
    /// The lane whose fiber is running on this thread.
    static CURRENT: Cell<*mut Lane> = const { Cell::new(std::ptr::null_mut()) };
    /// Fiber stacks kept between blocks and launches.
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
    /// Launches started on this thread: varies the thread orders from launch to launch.
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
}

/// The running lane; aborts when called outside a fiber (C++ cannot take a Rust panic).
fn current() -> *mut Lane {
    let lane = CURRENT.with(Cell::get);
    if lane.is_null() {
        eprintln!("emulated CUDA: a synchronization primitive was called outside an emulated kernel");
        std::process::abort();
    }
    lane
}

fn suspend(stop: Stop) {
    let lane = current();
    // SAFETY: `lane` points into the running block's lane array, which outlives every fiber
    // of the block; its yielder was stored by this fiber when it started and lives on its stack.
    unsafe { (*(*lane).yielder).suspend(stop) }
}

/// `__syncthreads()`.
#[unsafe(no_mangle)]
extern "C" fn switchyard_emu_syncthreads() {
    suspend(Stop::Barrier);
}

/// A warp shuffle: brings `value`, returns the value lane `src_lane` brought.
#[unsafe(no_mangle)]
extern "C" fn switchyard_emu_shfl(value: u32, src_lane: i32, mask: u32) -> u32 {
    let lane = current();
    // SAFETY: as in `suspend`; the scheduler touches the lane only while this fiber is suspended.
    unsafe {
        (*lane).value = value;
        (*lane).src = src_lane;
        (*lane).mask = mask;
    }
    suspend(Stop::Shuffle);
    // SAFETY: as above.
    unsafe { (*lane).result }
}

/// One entry point of the compiled sources.
#[derive(Debug)]
struct Entry {
    index: i32,
    param_sizes: Vec<u32>,
}

/// The entry points the emulation library defines, by name.
#[derive(Debug)]
pub(super) struct Kernels {
    entries: HashMap<String, Entry>,
}

impl Kernels {
    /// Reads the library's registry and checks it holds every entry point the sources declare.
    pub(super) fn load() -> Result<Kernels, CudaError> {
        let mut entries = HashMap::new();
        // SAFETY: the registry is filled by static initializers before main and never changes;
        // indices below its count are valid, and names are NUL-terminated string literals.
        unsafe {
            for index in 0..switchyard_emu_entry_count() {
                let name = CStr::from_ptr(switchyard_emu_entry_name(index)).to_string_lossy().into_owned();
                let param_sizes =
                    (0..switchyard_emu_param_count(index)).map(|p| switchyard_emu_param_size(index, p)).collect();
                entries.insert(name, Entry { index, param_sizes });
            }
        }
        if let Some(missing) = super::super::entry_point_names().into_iter().find(|n| !entries.contains_key(n)) {
            return Err(CudaError::Emulation { entry: missing, message: "not in the emulation library".into() });
        }
        Ok(Kernels { entries })
    }

    /// Runs a launch to completion.
    ///
    /// # Safety
    /// As [`super::super::Device::launch`].
    pub(super) unsafe fn launch(&self, launch: &Launch<'_>) -> Result<(), CudaError> {
        let fail = |message: String| CudaError::Emulation { entry: launch.entry.to_string(), message };
        let entry = self.entries.get(launch.entry).ok_or_else(|| fail("no such kernel".into()))?;
        let sizes: Vec<u32> = launch.args.iter().map(|a| a.size() as u32).collect();
        if sizes != entry.param_sizes {
            return Err(fail(format!("arguments of {sizes:?} bytes for parameters of {:?} bytes", entry.param_sizes)));
        }
        let (g, b) = (launch.grid, launch.block);
        let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
        if [g.0, g.1, g.2, b.0, b.1, b.2].contains(&0) || threads > MAX_BLOCK_THREADS as u64 {
            return Err(fail(format!("invalid launch shape: grid {g:?}, block {b:?}")));
        }
        let params: Vec<*mut c_void> = launch
            .args
            .iter()
            .map(|a| match a {
                super::super::KernelArg::Ptr(v) => v as *const u64 as *mut c_void,
                super::super::KernelArg::I32(v) => v as *const i32 as *mut c_void,
                super::super::KernelArg::I64(v) => v as *const i64 as *mut c_void,
                super::super::KernelArg::F32(v) => v as *const f32 as *mut c_void,
            })
            .collect();
        let seq = LAUNCHES.with(|c| {
            let n = c.get();
            c.set(n.wrapping_add(1));
            n
        });
        let mut n = 0u64;
        for z in 0..g.2 {
            for y in 0..g.1 {
                for x in 0..g.0 {
                    let ctx = ThreadCtx {
                        block_idx: [x, y, z],
                        block_dim: [b.0, b.1, b.2],
                        grid_dim: [g.0, g.1, g.2],
                        ..ThreadCtx::default()
                    };
                    let order = Order::pick(seq, n);
                    // SAFETY: the parameters match the entry point (sizes checked above) and
                    // point at `launch.args`, alive for this call; the caller vouches for the
                    // addresses inside them.
                    unsafe { run_block(entry.index, &params, ctx, order) }
                        .map_err(|m| fail(format!("block ({x}, {y}, {z}): {m}")))?;
                    n += 1;
                }
            }
        }
        Ok(())
    }
}

/// The order runnable threads are resumed in between synchronization points.
#[derive(Debug, Clone, Copy)]
enum Order {
    Ascending,
    Descending,
    /// A new permutation each round, from this seed.
    Shuffled(u64),
    /// Warp at a time, each warp running to the barrier before the next starts: the last warp
    /// first, so the warps that usually read what others wrote (the first) come last.
    WarpsDescending,
    /// Warp at a time, in a new permutation of the warps each round, from this seed.
    WarpsShuffled(u64),
}

impl Order {
    /// Cycles the orders over the blocks of a launch, starting at a different one each launch,
    /// so every kernel meets every order.
    fn pick(launch: u64, block: u64) -> Order {
        let seed = launch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_add(1);
        match (launch + block) % 5 {
            0 => Order::Ascending,
            1 => Order::Descending,
            2 => Order::Shuffled(seed),
            3 => Order::WarpsDescending,
            _ => Order::WarpsShuffled(seed),
        }
    }

    /// Whether warps run one at a time (the unit `fill` orders is then the warp).
    fn by_warp(&self) -> bool {
        matches!(self, Order::WarpsDescending | Order::WarpsShuffled(_))
    }

    /// Writes this round's order of the units (threads, or warps) into `order`.
    fn fill(&mut self, order: &mut [usize]) {
        let n = order.len();
        for (i, slot) in order.iter_mut().enumerate() {
            *slot = match self {
                Order::Descending | Order::WarpsDescending => n - 1 - i,
                _ => i,
            };
        }
        if let Order::Shuffled(state) | Order::WarpsShuffled(state) = self {
            // Fisher–Yates with splitmix64: cheap, and reproducible from the seed.
            for i in (1..n).rev() {
                *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                order.swap(i, (z % (i as u64 + 1)) as usize);
            }
        }
    }
}

fn take_stack() -> Result<DefaultStack, String> {
    match STACKS.with(|s| s.borrow_mut().pop()) {
        Some(stack) => Ok(stack),
        None => DefaultStack::new(FIBER_STACK).map_err(|e| format!("cannot allocate a fiber stack: {e}")),
    }
}

/// Gives a fiber's stack back to the pool, finished or not.
fn recycle(mut fiber: Fiber) {
    if !fiber.done() {
        // SAFETY: a suspended fiber is inside a kernel (C++ frames without destructors) or the
        // scheduler's suspend (no live Rust values that need dropping); abandoning them is sound.
        unsafe { fiber.force_reset() };
    }
    let stack = fiber.into_stack();
    STACKS.with(|s| s.borrow_mut().push(stack));
}

/// Runs one block: every thread as a fiber, synchronized as described in the module docs.
///
/// # Safety
/// `params` must match entry point `index`.
unsafe fn run_block(index: i32, params: &[*mut c_void], block: ThreadCtx, mut order: Order) -> Result<(), String> {
    let [bx, by, bz] = block.block_dim;
    let n = (bx * by * bz) as usize;
    let mut lanes: Vec<Lane> = (0..n)
        .map(|i| {
            let i = i as u32;
            let thread_idx = [i % bx, (i / bx) % by, i / (bx * by)];
            Lane {
                ctx: ThreadCtx { thread_idx, ..block },
                yielder: std::ptr::null(),
                value: 0,
                src: 0,
                mask: 0,
                result: 0,
            }
        })
        .collect();
    let lanes_ptr = lanes.as_mut_ptr();
    let params_ptr = params.as_ptr() as usize;
    let mut fibers: Vec<Fiber> = Vec::with_capacity(n);
    for i in 0..n {
        let stack = match take_stack() {
            Ok(stack) => stack,
            Err(e) => {
                fibers.into_iter().for_each(recycle);
                return Err(e);
            }
        };
        // Raw addresses, not references: the closure must be 'static, and both the lane array
        // and the parameters outlive every fiber (all are finished or reset before returning).
        let lane = lanes_ptr as usize + i * std::mem::size_of::<Lane>();
        fibers.push(Coroutine::with_stack(stack, move |yielder: &Yielder<(), Stop>, ()| {
            // SAFETY: see above; this fiber is the only one touching its lane while it runs.
            unsafe {
                (*(lane as *mut Lane)).yielder = yielder;
                switchyard_emu_invoke(index, params_ptr as *const *mut c_void);
            }
        }));
    }

    let mut state = vec![State::Ready; n];
    let warps = n.div_ceil(WARP);
    // Resumes thread `i` if it can run, until its next synchronization point.
    let mut resume = |i: usize, state: &mut [State]| {
        if state[i] != State::Ready {
            return;
        }
        // SAFETY: `i < n`; the lane array is not moved while fibers run.
        let lane = unsafe { lanes_ptr.add(i) };
        CURRENT.with(|c| c.set(lane));
        // SAFETY: the lane's context lives as long as the block.
        unsafe { switchyard_emu_enter(&(*lane).ctx) };
        state[i] = match fibers[i].resume(()) {
            CoroutineResult::Yield(Stop::Barrier) => State::AtBarrier,
            CoroutineResult::Yield(Stop::Shuffle) => State::AtShuffle,
            CoroutineResult::Return(()) => State::Done,
        };
        CURRENT.with(|c| c.set(std::ptr::null_mut()));
        // SAFETY: no fiber runs now; the C++ side must not see a stale thread.
        unsafe { switchyard_emu_enter(std::ptr::null()) };
    };
    // The lanes, for the scheduler to read and answer shuffles.
    // SAFETY: called only between resumes, when no fiber runs, and each slice is dropped before
    // the next resume; nothing else touches the lanes while it lives.
    let lanes_now = || unsafe { std::slice::from_raw_parts_mut(lanes_ptr, n) };
    let mut sequence = vec![0usize; if order.by_warp() { warps } else { n }];
    let outcome = loop {
        order.fill(&mut sequence);
        let shuffled = if order.by_warp() {
            let mut settled = Ok(false);
            'warps: for &w in &sequence {
                // This warp runs until none of its threads can go on, its shuffles completing
                // as soon as its lanes arrive; after the last warp, every shuffle is settled.
                loop {
                    (w * WARP..((w + 1) * WARP).min(n)).for_each(|i| resume(i, &mut state));
                    match complete_shuffles(lanes_now(), &mut state, w..w + 1) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            settled = Err(e);
                            break 'warps;
                        }
                    }
                }
            }
            settled
        } else {
            sequence.iter().for_each(|&i| resume(i, &mut state));
            complete_shuffles(lanes_now(), &mut state, 0..warps)
        };
        match shuffled {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => break Err(e),
        }
        if state.iter().all(|s| *s == State::Done) {
            break Ok(());
        }
        // Threads that have returned count as arrived, as on the hardware.
        if state.iter().all(|s| matches!(s, State::AtBarrier | State::Done)) {
            state.iter_mut().filter(|s| **s == State::AtBarrier).for_each(|s| *s = State::Ready);
            continue;
        }
        break Err(deadlock(&state));
    };
    fibers.into_iter().for_each(recycle);
    drop(lanes);
    outcome
}

/// Completes the shuffle of every warp in `warps` whose participating lanes have all arrived.
/// Returns whether any did; an error when a shuffle can never complete.
fn complete_shuffles(lanes: &mut [Lane], state: &mut [State], warps: std::ops::Range<usize>) -> Result<bool, String> {
    let mut any = false;
    for w in warps {
        let first = w * WARP;
        let end = (first + WARP).min(lanes.len());
        let Some(lead) = (first..end).find(|&i| state[i] == State::AtShuffle) else { continue };
        let mask = lanes[lead].mask;
        let in_mask = |i: usize| mask & (1 << (i - first)) != 0;
        if (first..end).any(|i| state[i] == State::AtShuffle && (!in_mask(i) || lanes[i].mask != mask)) {
            return Err(format!("warp {w}: lanes shuffle with different masks"));
        }
        let members: Vec<usize> = (first..end).filter(|&i| in_mask(i)).collect();
        if let Some(&gone) = members.iter().find(|&&i| state[i] == State::Done) {
            return Err(format!("warp {w}: lane {} exited before a shuffle its mask {mask:#x} names", gone - first));
        }
        if members.iter().any(|&i| state[i] != State::AtShuffle) {
            // Some member is elsewhere (at the barrier): the deadlock check reports it.
            continue;
        }
        for &i in &members {
            let src = first + (lanes[i].src.rem_euclid(WARP as i32)) as usize;
            // A source outside the mask or past the block returns the lane's own value.
            lanes[i].result = if src < end && in_mask(src) { lanes[src].value } else { lanes[i].value };
        }
        for &i in &members {
            state[i] = State::Ready;
        }
        any = true;
    }
    Ok(any)
}

fn deadlock(state: &[State]) -> String {
    let count = |s: State| state.iter().filter(|&&x| x == s).count();
    format!(
        "deadlock: {} threads wait at __syncthreads(), {} at a warp shuffle, {} have returned \
         (a barrier in divergent code, or a shuffle that not all its lanes reach)",
        count(State::AtBarrier),
        count(State::AtShuffle),
        count(State::Done)
    )
}
