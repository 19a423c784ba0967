//! The WebAssembly policy host: the one place that uses wasmtime.
//!
//! One [`Engine`] for the process, configured once:
//! - the component model;
//! - the pooling allocator, so instantiating a component takes microseconds, with memories
//!   initialised copy-on-write from the compiled image;
//! - fuel: each decision may run a fixed amount of the guest's own code ([`WasmLimits::fuel`]),
//!   counted only while the guest runs, so a policy that fits its budget on an idle machine
//!   fits it under any load, and one that does not is stopped wherever it runs;
//! - epoch interruption, with a ticker thread, as a generous wall-clock guard
//!   ([`WasmLimits::deadline`]) behind the fuel.
//!
//! Every request gets a fresh [`Store`] and a fresh instance, used for that one decision and
//! dropped: no state, memory or globals are shared between requests, and so none between
//! tenants. A [`Deployment`] makes its instances ahead of the requests and drops them after,
//! so a request waits only for the call itself. Each store has a memory cap enforced by a
//! [`ResourceLimiter`]. A call runs on the task that asked for the decision, on a fiber stack
//! from the pool; a policy that runs long yields the thread back to the executor every
//! [`WasmLimits::yield_fuel`] units of fuel, so other requests keep being served while it runs.
//! A trap, a deadline or a limit hit is returned as a [`PolicyFault`] for that request alone.
//!
//! Guests may import the `host` interface of `wit/policy.wit` (as of contract 0.1.2; a guest
//! built against an earlier 0.1 contract imports a subset of it, and links by semver), plus the WASI interfaces
//! the Rust standard library links in. Those are given a WASI context that grants nothing: no
//! environment, no arguments, no preopened directories, no sockets, stdin closed, stdout and
//! stderr discarded.

use super::{ConstraintKind, Endpoint, Features, HostView, PolicyInput, PrefixProbe};
use crate::cluster::BackendView;
use crate::upstream::AdapterState;
use bindings::switchyard::policy::{host, types};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "policy",
        exports: { default: async },
        // The one host function that waits on the network (a backend tokenizes the prompt).
        imports: { "switchyard:policy/host.cached-prefix": async },
        additional_derives: [PartialEq],
    });
}

pub use bindings::switchyard::policy::types::{Decision as WitDecision, Request as WitRequest};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Default limits (each can be configured).
pub const DEFAULT_MEMORY_BYTES: usize = 32 << 20;
/// Fuel units (one per WebAssembly instruction, roughly) one decision may use; instantiating
/// (which may run the guest's start code) gets the same again. A Rust `tenant-map` decision,
/// instantiation included, takes under 8 thousand; this allows ten
/// thousand times that, and stops an endless loop after 10 to 18 ms of one core (the policy
/// benchmark on a 2-core x86-64 machine).
pub const DEFAULT_FUEL: u64 = 100_000_000;
/// Fuel a guest runs between yields to the executor: far more than a decision needs (it never
/// yields), and a loop gives the thread back every few tens of microseconds.
pub const DEFAULT_YIELD_FUEL: u64 = 200_000;
/// The wall-clock guard: generous, since the fuel bounds the guest's own work and this only
/// catches what fuel cannot (a host so overloaded that it cannot run the guest at all).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 16 << 20;
/// Instances the pool holds at once: the most policy calls that can run concurrently.
pub const DEFAULT_POOL_INSTANCES: u32 = 128;
/// Per pooled memory and table: how much of what a guest wrote is reset in place (kept
/// resident) rather than returned to the kernel. A small policy writes far less; the bound is
/// what an idle slot may keep resident.
const KEEP_RESIDENT_BYTES: usize = 1 << 20;
/// The guest's WebAssembly stack. Deep recursion traps with a stack overflow past it.
pub const MAX_WASM_STACK: usize = 512 << 10;
/// A log line from a policy is cut to this many bytes, and a call may log this many lines.
const MAX_LOG_LINE: usize = 512;
const MAX_LOG_LINES: u32 = 16;
/// Longest strings a decision may carry.
const MAX_DECISION_STRING: usize = 1024;
/// Calls of `cached-prefix` one decision may make: each may hash the whole prompt, host work
/// the guest's fuel does not count.
const MAX_PREFIX_CALLS: u32 = 4;

/// The host's limits.
#[derive(Debug, Clone)]
pub struct WasmLimits {
    /// Linear memory a policy instance may grow to.
    pub memory_bytes: usize,
    /// Fuel one decision may use: the bound on the guest's own work.
    pub fuel: u64,
    /// Wall time one decision (and, separately, one instantiation) may take: a guard behind
    /// the fuel.
    pub deadline: Duration,
    /// Largest component accepted for upload.
    pub max_component_bytes: usize,
    /// Concurrent policy instances.
    pub pool_instances: u32,
    /// Fuel a guest runs before it gives its thread back to the executor (and takes it again
    /// behind the tasks that were waiting).
    pub yield_fuel: u64,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            fuel: DEFAULT_FUEL,
            deadline: DEFAULT_DEADLINE,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            pool_instances: DEFAULT_POOL_INSTANCES,
            yield_fuel: DEFAULT_YIELD_FUEL,
        }
    }
}

/// Why a policy did not produce a decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyFault {
    #[error("the policy used up its fuel ({0} units) before deciding")]
    Fuel(u64),
    #[error("the policy ran past its {0} ms deadline")]
    Deadline(u128),
    #[error("the policy exceeded its {0} MiB memory limit")]
    Memory(usize),
    #[error("the policy overflowed its stack")]
    StackOverflow,
    #[error("the policy trapped: {0}")]
    Trap(String),
    #[error("the policy failed: {0}")]
    Failed(String),
    #[error("the policy returned an invalid decision: {0}")]
    InvalidDecision(String),
    #[error("all {0} policy instances are busy")]
    Busy(u32),
}

/// Why a component was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("the component is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("the component does not fit the switchyard:policy world: {0}")]
    WrongWorld(String),
}

/// The process-wide policy runtime: engine, linker and epoch ticker.
pub struct PolicyRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    limits: WasmLimits,
    stop: Arc<AtomicBool>,
    /// Instances made ahead, over every deployment (see [`Deployment`]).
    made_ahead: Arc<AtomicU32>,
}

impl std::fmt::Debug for PolicyRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyRuntime").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Drop for PolicyRuntime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One compiled, linked policy component, ready to instantiate.
#[derive(Clone)]
pub struct CompiledPolicy {
    pre: bindings::PolicyPre<HostState>,
}

impl std::fmt::Debug for CompiledPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CompiledPolicy")
    }
}

/// What a store carries: the WASI context that grants nothing, the deployment's config, and
/// the accounting the limiter and the log keep.
struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    config: Arc<str>,
    /// Names the policy in its log lines.
    label: Arc<str>,
    memory_cap: usize,
    memory_hit: bool,
    log_lines: u32,
    /// The request's prefix probe, for the one call it is made for.
    prefix: Option<Arc<dyn PrefixProbe>>,
    prefix_calls: u32,
    /// What the request asks of the model, for the one call it is made for.
    features: Features,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            return;
        }
        let mut end = message.len().min(MAX_LOG_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let policy = &*self.label;
        match level {
            host::Level::Debug => tracing::debug!(policy, "{message}"),
            host::Level::Info => tracing::info!(policy, "{message}"),
            host::Level::Warn => tracing::warn!(policy, "{message}"),
            host::Level::Error => tracing::error!(policy, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }

    fn random(&mut self) -> u64 {
        use rand::TryRngCore;
        rand::rngs::OsRng.try_next_u64().unwrap_or_else(|_| self.now_ms().wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }

    fn features(&mut self) -> host::RequestFeatures {
        let f = self.features;
        host::RequestFeatures {
            constraint: f.constraint.map(|c| match c {
                ConstraintKind::JsonSchema => host::ConstraintKind::JsonSchema,
                ConstraintKind::JsonObject => host::ConstraintKind::JsonObject,
                ConstraintKind::Regex => host::ConstraintKind::Regex,
                ConstraintKind::Grammar => host::ConstraintKind::Grammar,
                ConstraintKind::ToolCall => host::ConstraintKind::ToolCall,
            }),
            tools: f.tools,
            logprobs: f.logprobs,
        }
    }

    async fn cached_prefix(&mut self, adapter: Option<String>) -> Result<host::PrefixOverlap, String> {
        self.prefix_calls += 1;
        if self.prefix_calls > MAX_PREFIX_CALLS {
            return Err(format!("cached-prefix may be called at most {MAX_PREFIX_CALLS} times in one decision"));
        }
        if let Some(name) = adapter.as_deref().filter(|a| a.len() > MAX_DECISION_STRING) {
            return Err(format!("the adapter name is {} bytes (at most {MAX_DECISION_STRING})", name.len()));
        }
        let Some(probe) = self.prefix.clone() else {
            return Err("no backends to ask here (a dry run or a policy test case)".into());
        };
        let overlap = probe.overlap(adapter.as_deref()).await?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(host::PrefixOverlap {
            prompt_tokens: count(overlap.prompt_tokens),
            backends: overlap
                .backends
                .into_iter()
                .map(|(address, cached)| host::BackendPrefix { address, cached_tokens: count(cached) })
                .collect(),
        })
    }
}

impl PolicyRuntime {
    /// Builds the engine with every limit named, and starts the epoch ticker.
    pub fn new(limits: WasmLimits) -> Result<PolicyRuntime, String> {
        if limits.yield_fuel == 0 {
            return Err("the fuel between yields must be at least 1".into());
        }
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(limits.pool_instances)
            // A Rust wasip2 component is a handful of core instances (the program, its WASI
            // adapter and shims), with one memory and a few tables.
            .max_core_instances_per_component(16)
            .total_core_instances(limits.pool_instances * 16)
            .max_memories_per_component(4)
            .total_memories(limits.pool_instances * 4)
            .max_tables_per_component(16)
            .total_tables(limits.pool_instances * 16)
            .max_memory_size(limits.memory_bytes)
            .table_elements(100_000)
            .total_stacks(limits.pool_instances)
            // Reuse the slots (stacks, tables, memories) used last, which are warm in the
            // caches, instead of cycling through a hundred of them.
            .max_unused_warm_slots(0)
            // Resetting a slot for the next request: PAGEMAP_SCAN finds the pages the guest
            // wrote and copies the image back over just those, so the slot stays mapped (no
            // madvise, no TLB shootdown across cores, no page faults for the next request).
            // A guest that dirties more than this is reset the usual way past it.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(MAX_WASM_STACK)
            // Memories start as copy-on-write views of the compiled image (the default, named
            // because instantiation per request relies on it being cheap).
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| format!("cannot configure the policy engine: {e}"))?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        bindings::Policy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("cannot link the policy host: {e}"))?;
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| format!("cannot link WASI: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker, stopped) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("policy-epoch".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the policy epoch thread: {e}"))?;
        Ok(PolicyRuntime { engine, linker, limits, stop, made_ahead: Default::default() })
    }

    pub fn limits(&self) -> &WasmLimits {
        &self.limits
    }

    /// Compiles `bytes` and links it against the world. Runs on the calling thread; compiling
    /// takes milliseconds to seconds, so async callers use the blocking pool.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledPolicy, LoadError> {
        if bytes.len() > self.limits.max_component_bytes {
            return Err(LoadError::TooLarge { size: bytes.len(), limit: self.limits.max_component_bytes });
        }
        if is_core_module(bytes) {
            return Err(LoadError::NotAComponent(
                "this is a core WebAssembly module; build the policy as a component (cargo build --target wasm32-wasip2)"
                    .into(),
            ));
        }
        let component =
            Component::from_binary(&self.engine, bytes).map_err(|e| LoadError::NotAComponent(format!("{e:#}")))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = bindings::PolicyPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(CompiledPolicy { pre })
    }

    /// Runs one decision in an instance made for it, on the calling task (a dry run, a test
    /// case). Requests go through a [`Deployment`], which makes the instance ahead of time.
    pub async fn decide(
        &self,
        policy: &CompiledPolicy,
        request: &WitRequest,
        view: HostView,
        config: Arc<str>,
        label: Arc<str>,
    ) -> Result<WitDecision, PolicyFault> {
        let (mut store, instance) = self.prepare(policy, config, label).await?;
        self.run(&mut store, &instance, request, view).await
    }

    /// A fresh store and an instance of `policy` in it, not yet called.
    async fn prepare(
        &self,
        policy: &CompiledPolicy,
        config: Arc<str>,
        label: Arc<str>,
    ) -> Result<(Store<HostState>, bindings::Policy), PolicyFault> {
        let state = HostState {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            config,
            label,
            memory_cap: self.limits.memory_bytes,
            memory_hit: false,
            log_lines: 0,
            prefix: None,
            prefix_calls: 0,
            features: Features::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        store
            .fuel_async_yield_interval(Some(self.limits.yield_fuel))
            .map_err(|e| PolicyFault::Trap(format!("cannot set the policy's yield interval: {e}")))?;
        // Instantiating may run the guest's start code: it gets a budget of its own.
        self.arm(&mut store)?;
        match policy.pre.instantiate_async(&mut store).await {
            Ok(instance) => Ok((store, instance)),
            Err(e) => Err(self.classify(&e, store.data().memory_hit)),
        }
    }

    /// Gives `store` the decision's fuel and starts its deadline.
    fn arm(&self, store: &mut Store<HostState>) -> Result<(), PolicyFault> {
        store.set_fuel(self.limits.fuel).map_err(|e| PolicyFault::Trap(format!("cannot give the policy fuel: {e}")))?;
        // The deadline holds to within one tick.
        let ticks = self.limits.deadline.as_micros().div_ceil(EPOCH_TICK.as_micros()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        Ok(())
    }

    /// Calls `decide` on a prepared instance, with a full budget and what the host tells of
    /// the request (taken back from the store afterwards, so nothing of the request outlives
    /// the call).
    async fn run(
        &self,
        store: &mut Store<HostState>,
        instance: &bindings::Policy,
        request: &WitRequest,
        view: HostView,
    ) -> Result<WitDecision, PolicyFault> {
        self.arm(store)?;
        store.data_mut().prefix = view.prefix;
        store.data_mut().features = view.features;
        let outcome = instance.call_decide(&mut *store, request).await;
        store.data_mut().prefix = None;
        store.data_mut().features = Features::default();
        match outcome {
            Ok(Ok(decision)) => check_decision(decision),
            Ok(Err(message)) => Err(PolicyFault::Failed(cut(&message))),
            Err(e) => Err(self.classify(&e, store.data().memory_hit)),
        }
    }

    fn classify(&self, e: &wasmtime::Error, memory_hit: bool) -> PolicyFault {
        if memory_hit {
            return PolicyFault::Memory(self.limits.memory_bytes >> 20);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => PolicyFault::Fuel(self.limits.fuel),
            Some(Trap::Interrupt) => PolicyFault::Deadline(self.limits.deadline.as_millis()),
            Some(Trap::StackOverflow) => PolicyFault::StackOverflow,
            Some(trap) => PolicyFault::Trap(trap.to_string()),
            None if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some() => {
                PolicyFault::Busy(self.limits.pool_instances)
            }
            None => PolicyFault::Trap(cut(&format!("{e:#}"))),
        }
    }
}

/// Instances a deployment keeps made ahead of its requests.
const READY_PER_DEPLOYMENT: usize = 2;

/// A compiled policy with its configuration, as requests run it.
///
/// Every decision still gets an instance of its own, used once and dropped. What that costs
/// besides the call (instantiating, and resetting the pooled memory afterwards) is kept off the
/// request's path: the deployment holds a few instances made ahead (never called, so nothing
/// in them came from any request), and a background task drops the used one and makes the
/// next. Instances made ahead count against a runtime-wide budget (a quarter of the pool), so
/// calls always find free slots.
pub struct Deployment {
    runtime: Arc<PolicyRuntime>,
    policy: CompiledPolicy,
    config: Arc<str>,
    label: Arc<str>,
    ready: std::sync::Mutex<Vec<Prepared>>,
}

/// An instance made ahead of the request that will use it.
struct Prepared {
    store: Store<HostState>,
    instance: bindings::Policy,
    _held: Held,
}

/// One instance's share of the runtime's budget for instances made ahead.
struct Held(Arc<AtomicU32>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Deployment {
    pub fn new(runtime: Arc<PolicyRuntime>, policy: CompiledPolicy, config: Arc<str>, label: Arc<str>) -> Deployment {
        Deployment { runtime, policy, config, label, ready: Default::default() }
    }

    /// `name@id`, for logs.
    pub fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub fn config(&self) -> &Arc<str> {
        &self.config
    }

    /// Instances made ahead and not yet used.
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Decides one request, in an instance made ahead when one is ready.
    pub async fn decide(self: &Arc<Self>, request: &WitRequest, view: HostView) -> Result<WitDecision, PolicyFault> {
        let ready = self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let (mut store, instance) = match ready {
            Some(p) => (p.store, p.instance),
            None => self.runtime.prepare(&self.policy, self.config.clone(), self.label.clone()).await?,
        };
        let outcome = self.runtime.run(&mut store, &instance, request, view).await;
        // A policy that faulted gets no instance made ahead: its next request pays for its own,
        // and this one's slot is given back here, so a tenant whose policy keeps faulting
        // never holds pool slots waiting for a background task.
        let again = matches!(outcome, Ok(_) | Err(PolicyFault::Failed(_)));
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if again => {
                let me = self.clone();
                handle.spawn(async move {
                    drop(store);
                    me.refill().await;
                });
            }
            _ => drop(store),
        }
        outcome
    }

    /// Makes one instance ahead, if this deployment and the runtime have room for it.
    async fn refill(&self) {
        let ready = || self.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ready().len() >= READY_PER_DEPLOYMENT {
            return;
        }
        let budget = self.runtime.limits.pool_instances / 4;
        let count = &self.runtime.made_ahead;
        if count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < budget).then_some(n + 1)).is_err() {
            return;
        }
        let held = Held(count.clone());
        if let Ok((store, instance)) = self.runtime.prepare(&self.policy, self.config.clone(), self.label.clone()).await
        {
            let mut ready = ready();
            if ready.len() < READY_PER_DEPLOYMENT {
                ready.push(Prepared { store, instance, _held: held });
            }
        }
    }
}

/// A core module starts with the same magic as a component but a different version/layer.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_DECISION_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn check_decision(d: WitDecision) -> Result<WitDecision, PolicyFault> {
    let too_long = |what: &str, s: &str| {
        (s.len() > MAX_DECISION_STRING).then(|| {
            PolicyFault::InvalidDecision(format!("{what} is {} bytes (at most {MAX_DECISION_STRING})", s.len()))
        })
    };
    let fault = match &d {
        types::Decision::Route(r) => r
            .adapter
            .as_deref()
            .and_then(|a| too_long("the adapter name", a))
            .or_else(|| r.backend.as_deref().and_then(|b| too_long("the backend address", b))),
        types::Decision::Reject(r) => too_long("the code", &r.code).or_else(|| too_long("the message", &r.message)),
    };
    match fault {
        Some(f) => Err(f),
        None => Ok(d),
    }
}

fn adapter_state(s: AdapterState) -> types::AdapterState {
    match s {
        AdapterState::Resident => types::AdapterState::Resident,
        AdapterState::Fetching | AdapterState::Validated => types::AdapterState::Loading,
        AdapterState::Evicted => types::AdapterState::Evicted,
        AdapterState::Draining => types::AdapterState::Draining,
        AdapterState::Failed | AdapterState::Unknown => types::AdapterState::Failed,
    }
}

fn backend(v: &BackendView) -> types::Backend {
    let free_slots = v.info.as_ref().map_or(0, |i| i.max_loras.saturating_sub(i.loaded_loras));
    types::Backend {
        address: v.address.clone(),
        healthy: v.healthy,
        adapters: v
            .adapters
            .values()
            .map(|a| types::BackendAdapter { name: a.name.clone(), state: adapter_state(a.state) })
            .collect(),
        free_slots,
        queue_depth: v.queue_depth(),
    }
}

/// The WIT request for a policy input.
pub fn request(input: &PolicyInput<'_>) -> WitRequest {
    types::Request {
        tenant: input.tenant.to_string(),
        subject: input.subject.map(str::to_string),
        scopes: input.scopes.iter().cloned().collect(),
        claims: input
            .claims
            .iter()
            .map(|(name, value)| types::Claim { name: name.clone(), value: value.to_string() })
            .collect(),
        endpoint: match input.endpoint {
            Endpoint::ChatCompletions => types::Endpoint::ChatCompletions,
            Endpoint::Completions => types::Endpoint::Completions,
        },
        model: input.model.to_string(),
        base_model: input.base_model.to_string(),
        headers: input.headers.iter().map(|(n, v)| types::Header { name: n.clone(), value: v.clone() }).collect(),
        prompt_chars: u32::try_from(input.prompt_chars).unwrap_or(u32::MAX),
        max_tokens: input.max_tokens,
        stream: input.stream,
        backends: input.backends.iter().map(backend).collect(),
        adapters: input
            .adapters
            .iter()
            .map(|(name, owner)| types::KnownAdapter { name: name.clone(), owner: owner.clone() })
            .collect(),
    }
}
