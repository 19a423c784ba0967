//! The engine: one thread that owns the executor, the scheduler and the adapter slots, and runs
//! steps of continuous batching while requests come and go through channels.
//!
//! Async callers talk to it through [`Engine`]: a submitted request gets a stream of
//! [`Event`]s; dropping that stream cancels the request at the next step boundary.

pub mod blocks;
pub mod cpu;
pub mod cuda;
pub mod executor;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod grammar;
pub mod sampling;
pub mod scheduler;
pub mod text;

use crate::adapters::{AdapterWeights, Released, Resident, SlotError, SlotTable, SlotWeights};
use crate::model::{ModelConfig, Tokenizer};
use blocks::BlockHash;
use executor::{AdapterPreparer, Executor, ExecutorError, PreparedAdapter};
use grammar::{Constraint, GrammarError, GrammarSpec, Grammars, Mask};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use sampling::{Sampler, SamplingParams, TokenLogprobs};
use scheduler::{Scheduler, SchedulerConfig, Sequence};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use text::{Detokenizer, Matched, StopMatcher};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Updates of the cached blocks a watcher may fall behind by before it must start again from a
/// snapshot.
const PREFIX_UPDATES_KEPT: usize = 1024;

/// Most stop strings one request may set.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes. Matching costs the same whatever their length, but this much
/// text (less one byte) is held back while a stop string could be completing.
pub const MAX_STOP_BYTES: usize = 1024;
/// Prompt tokens given to the detokenizer as context for the first generated token.
const DETOKENIZER_CONTEXT: usize = 6;

/// Limits of an engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Longest prompt + completion.
    pub max_model_len: usize,
    /// Requests that may wait for admission before new ones are refused.
    pub max_waiting: usize,
    /// Requests of one tenant that may wait: one tenant cannot fill the queue for everyone.
    pub max_waiting_per_tenant: usize,
    pub max_loras: usize,
    pub max_lora_rank: usize,
}

/// Why the engine refused or ended a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("adapter {0:?} is not loaded on this backend")]
    UnknownAdapter(String),
    #[error("adapter {name:?} is in use by {active} request(s); unload it when they finish")]
    AdapterInUse { name: String, active: u32 },
    #[error(
        "adapter {name:?} is still used by {active} request(s) after waiting {waited:?}; it stays loaded — retry the unload when they finish"
    )]
    UnloadTimedOut { name: String, active: u32, waited: Duration },
    #[error("all {max} adapter slots hold adapters that requests are using; retry later or raise --max-loras")]
    SlotsFull { max: usize },
    #[error("the request queue is full ({max} requests waiting); retry later")]
    QueueFull { max: usize },
    #[error("tenant {tenant:?} has {max} requests waiting on this backend, its most; retry later")]
    TenantQueueFull { tenant: String, max: usize },
    #[error("{0}")]
    InvalidRequest(String),
    /// The request's grammar was refused.
    #[error(transparent)]
    Grammar(#[from] GrammarError),
    #[error("the engine has stopped")]
    Stopped,
    /// The engine cannot serve any more (its thread died, or the device faulted); says why.
    #[error("this backend cannot serve: {0}")]
    Failed(String),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// The executor failed to place an adapter's weights; the idle adapter that was being
    /// evicted for it (if any) is gone too.
    #[error("{source}")]
    AdapterLoadFailed { source: ExecutorError, dropped: Option<String> },
}

impl From<SlotError> for EngineError {
    fn from(e: SlotError) -> EngineError {
        match e {
            SlotError::UnknownAdapter(name) => EngineError::UnknownAdapter(name),
            SlotError::InUse { name, active } => EngineError::AdapterInUse { name, active },
            SlotError::Full { max } => EngineError::SlotsFull { max },
        }
    }
}

/// A generation request in engine terms.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Resident adapter to use; `None` is the base model.
    pub adapter: Option<String>,
    pub sampling: SamplingParams,
    /// `Some(n)`: every generated token comes with its log-probability and those of the `n`
    /// most likely tokens at its position (at most [`sampling::MAX_TOP_LOGPROBS`]); all but an
    /// end-of-sequence token that ends the generation, which has no text.
    pub logprobs: Option<usize>,
    /// `Some(n)`: the request's first event is [`Event::Prompt`], every prompt token's
    /// log-probability given the ones before it, with the `n` most likely tokens at its
    /// position (at most [`sampling::MAX_TOP_LOGPROBS`]). Such a prompt is computed in full,
    /// never taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// When set, the generated text matches this grammar: tokens that could not continue a
    /// match are never sampled, and generation ends (with [`FinishReason::Stop`]) once the
    /// grammar is complete.
    pub grammar: Option<GrammarSpec>,
    /// 0 means "until the context is full".
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Whom it is served for, and that tenant's weight (see [`scheduler`]); `""` for none.
    pub tenant: String,
    pub tenant_weight: f64,
    /// Higher is admitted first, and preempts lower when the backend is full; 0 is normal.
    pub priority: u8,
    /// Requests reuse each other's cached prompt blocks only under the same salt (and the same
    /// adapter weights): the gateway gives every tenant its own unless the operator lets it
    /// share.
    pub cache_salt: String,
    /// Where to record how long the request waited for admission (once, when first admitted).
    pub queue_wait: Option<Histogram>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Asked for with [`GenerateRequest::prompt_logprobs`], before any token: every prompt
    /// token and its log-probability given the tokens before it (`None` for the first, which
    /// follows nothing).
    Prompt { tokens: Vec<(u32, Option<TokenLogprobs>)> },
    /// A generated token and the text it completed (possibly empty), with its log-probabilities
    /// when the request asked for them.
    Token { id: u32, text: String, logprobs: Option<TokenLogprobs> },
    /// The last event: the final token, remaining text, and totals (`cached_tokens`: prompt
    /// tokens found in the prefix cache).
    Finished {
        id: Option<u32>,
        text: String,
        /// The final token's, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    /// The request failed after it was accepted: its step failed, or (`engine_stopped`) the
    /// engine stopped serving altogether.
    Failed { reason: String, engine_stopped: bool },
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub status: AdapterStatus,
    /// The name was already resident from the same URI; nothing changed.
    pub already_loaded: bool,
    /// An idle adapter evicted (least recently used) to make room.
    pub evicted: Option<String>,
    /// The URI of the adapter this one replaced under the same name (a hot swap). Requests
    /// already running on it finish on it; new requests use the new weights.
    pub replaced: Option<String>,
}

/// An adapter as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterStatus {
    pub slot: u32,
    pub resident: Resident,
}

/// Whether the engine can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// The engine generates nothing more: its thread is gone or its device has faulted. The
    /// text says which, for `Info`, health checks and the gateway's answers.
    Failed(String),
}

/// The engine's state as last published: cheap to read from any thread.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub adapters: Vec<AdapterStatus>,
    pub waiting: usize,
    pub running: usize,
    /// Adapter slots of the running and of the waiting requests (one entry per request).
    pub running_slots: Vec<u32>,
    pub waiting_slots: Vec<u32>,
    pub kv_tokens_total: usize,
    pub kv_tokens_free: usize,
}

/// Changes to the set of cached KV blocks, as routers see them (block ids, see
/// [`BlockHash::id`]). Apply `removed`, then `stored`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixUpdate {
    /// Grows by one with every update.
    pub seq: u64,
    pub removed: Vec<u64>,
    pub stored: Vec<u64>,
}

/// Every cached block at one moment: updates up to `seq` are in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSnapshot {
    pub seq: u64,
    pub blocks: Vec<u64>,
}

enum Command {
    /// Every cached block now.
    PrefixSnapshot(oneshot::Sender<PrefixSnapshot>),
    Submit {
        /// First, so that it is dropped before `reply` where the command is dropped whole (an
        /// engine thread gone): a caller told its request was refused finds it uncounted.
        arrival: Arrival,
        req: Box<GenerateRequest>,
        stops: Box<StopMatcher>,
        constraint: Option<Box<Constraint>>,
        events: mpsc::UnboundedSender<Event>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Install {
        name: String,
        uri: String,
        adapter: Box<PreparedAdapter>,
        /// [`AdapterWeights::digest`] of its weights.
        digest: [u8; 32],
        reply: oneshot::Sender<Result<Installed, EngineError>>,
    },
    /// The device failed while preparing an adapter off the engine thread.
    Fault(String),
    Unload {
        name: String,
        /// The slot being drained and a receiver that fires when it is free.
        reply: oneshot::Sender<Result<(u32, oneshot::Receiver<()>), EngineError>>,
    },
    Undrain {
        name: String,
        slot: u32,
        /// Whether the adapter is back in service, and how many requests use it.
        reply: oneshot::Sender<Option<u32>>,
    },
}

/// A request handed to the engine thread and not yet taken up by it: counted while it lives.
/// Dropped when the thread takes the request, or with the command if the thread never will.
struct Arrival(Arc<AtomicUsize>);

impl Arrival {
    fn new(count: &Arc<AtomicUsize>) -> Arrival {
        count.fetch_add(1, Ordering::Relaxed);
        Arrival(count.clone())
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handle to a running engine. Dropping it lets the engine finish its requests and stop.
#[derive(Debug)]
pub struct Engine {
    commands: mpsc::UnboundedSender<Command>,
    /// Requests sent to the engine thread that it has not taken up yet.
    arriving: Arc<AtomicUsize>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    health: watch::Receiver<Health>,
    step_seconds: Histogram,
    preparer: Arc<dyn AdapterPreparer>,
    config: EngineConfig,
    vocab_size: usize,
    prefixes: broadcast::Sender<Arc<PrefixUpdate>>,
    grammars: Arc<Grammars>,
}

impl Engine {
    /// Starts the engine thread.
    pub fn start(
        model: &ModelConfig,
        tokenizer: Arc<Tokenizer>,
        executor: Box<dyn Executor>,
        config: EngineConfig,
    ) -> Engine {
        let (commands, rx) = mpsc::unbounded_channel();
        let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let preparer = executor.preparer();
        let (health_tx, health) = watch::channel(Health::Serving);
        // 100 µs to about 6.5 s.
        let step_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 17));
        let (prefixes, _) = broadcast::channel(PREFIX_UPDATES_KEPT);
        let grammars = Grammars::new(tokenizer.clone(), model.vocab_size);
        grammars.prepare_in_background();
        let mut worker = Worker {
            prefixes: prefixes.clone(),
            prefix_seq: 0,
            executor,
            scheduler: Scheduler::new(config.scheduler),
            slots: SlotTable::new(config.max_loras),
            drains: HashMap::new(),
            active: HashMap::new(),
            rx,
            snapshot: snapshot_tx,
            tokenizer,
            config,
            next_id: 0,
            health: health_tx.clone(),
            fault: None,
            step_seconds: step_seconds.clone(),
        };
        let spawned = std::thread::Builder::new().name("switchyard-engine".into()).spawn(move || {
            worker.publish();
            // A panic (a bug) must not leave the backend looking healthy with nothing behind it:
            // the requests in flight are failed and the engine says why it stopped.
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                worker.stop(format!("the engine thread panicked: {what}"));
            }
        });
        if let Err(e) = spawned {
            // Without its thread the engine answers every call with why it cannot serve.
            let reason = format!("could not start the engine thread: {e}");
            tracing::error!(%reason, "engine not started");
            health_tx.send_replace(Health::Failed(reason));
        }
        Engine {
            commands,
            arriving: Arc::new(AtomicUsize::new(0)),
            snapshot,
            health,
            step_seconds,
            preparer,
            config,
            vocab_size: model.vocab_size,
            prefixes,
            grammars,
        }
    }

    /// How long each step (one forward pass and its sampling) took.
    pub fn step_seconds(&self) -> &Histogram {
        &self.step_seconds
    }

    /// Whether the engine can serve, and why not.
    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Follows the engine's health (for health checks that must change with it).
    pub fn watch_health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The latest published state.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Requests waiting for admission: the scheduler's queue as last published, and the
    /// requests handed to the engine thread that it has not taken up yet. Those gather while a
    /// step runs, and for as long as a wedged device holds the thread; the snapshot alone would
    /// show such a backend as idle.
    pub fn requests_waiting(&self) -> usize {
        self.snapshot.borrow().waiting + self.arriving.load(Ordering::Relaxed)
    }

    /// Every cached KV block now, and the updates that follow it. Updates with a `seq` no
    /// greater than the snapshot's are already in it. A receiver that lags has lost updates
    /// and must start again from a new snapshot.
    pub async fn watch_prefixes(
        &self,
    ) -> Result<(PrefixSnapshot, broadcast::Receiver<Arc<PrefixUpdate>>), EngineError> {
        // Subscribed first: nothing published after the snapshot is missed.
        let updates = self.prefixes.subscribe();
        let (reply, answer) = oneshot::channel();
        self.send(Command::PrefixSnapshot(reply))?;
        let snapshot = answer.await.map_err(|_| self.stopped())?;
        Ok((snapshot, updates))
    }

    /// Validates and queues a request; the receiver yields its events. Errors that concern the
    /// request itself (unknown adapter, prompt too long, queue full) are returned here, before
    /// any token is generated.
    pub async fn generate(&self, mut req: GenerateRequest) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        let max_len = self.config.max_model_len;
        if req.prompt.is_empty() {
            return invalid("the prompt is empty".into());
        }
        if let Some(bad) = req.prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return invalid(format!("prompt token id {bad} is outside the vocabulary (size {})", self.vocab_size));
        }
        if let Err(e) = req.sampling.validate(self.vocab_size) {
            return invalid(e);
        }
        if let Some(n) = req.logprobs.filter(|&n| n > sampling::MAX_TOP_LOGPROBS) {
            return invalid(format!("top_logprobs is {n}; the most is {}", sampling::MAX_TOP_LOGPROBS));
        }
        if let Some(n) = req.prompt_logprobs.filter(|&n| n > sampling::MAX_TOP_LOGPROBS) {
            return invalid(format!("prompt_logprobs is {n}; the most is {}", sampling::MAX_TOP_LOGPROBS));
        }
        if req.stop.len() > MAX_STOP_STRINGS {
            return invalid(format!("at most {MAX_STOP_STRINGS} stop strings are allowed, got {}", req.stop.len()));
        }
        if let Some(long) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return invalid(format!("a stop string is {} bytes; the limit is {MAX_STOP_BYTES}", long.len()));
        }
        // Built here, off the engine thread, which only feeds it the generated text.
        let stops = StopMatcher::new(&req.stop).map_err(EngineError::InvalidRequest)?;
        let prompt_len = req.prompt.len();
        if prompt_len >= max_len {
            return invalid(format!(
                "the prompt has {prompt_len} tokens, but this model's context is {max_len} tokens and at least one must be left to generate"
            ));
        }
        if req.max_tokens == 0 {
            req.max_tokens = max_len - prompt_len;
        } else if prompt_len + req.max_tokens > max_len {
            return invalid(format!(
                "this model's maximum context length is {max_len} tokens, but {} were requested ({prompt_len} in the prompt, {} to generate)",
                prompt_len + req.max_tokens,
                req.max_tokens
            ));
        }
        // Compiled off the engine thread too; the last check, as the most costly.
        let constraint = match req.grammar.take() {
            Some(spec) => Some(Box::new(self.grammars.compile(spec).await?)),
            None => None,
        };
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let arrival = Arrival::new(&self.arriving);
        self.send(Command::Submit { arrival, req: Box::new(req), stops: Box::new(stops), constraint, events, reply })?;
        answer.await.map_err(|_| self.stopped())??;
        Ok(rx)
    }

    /// Places validated adapter weights in a slot under `name`, evicting the least recently
    /// used idle adapter if every slot is taken. A name resident from the same `uri` is left
    /// as it is; from another `uri` it is hot-swapped: the new weights go to another slot when
    /// one can be had (so a failure leaves the old adapter serving), new requests use them,
    /// and the old slot drains.
    ///
    /// The weights are prepared for the executor (converted, laid out, uploaded) on a blocking
    /// thread while the engine keeps stepping; the engine only swaps them in between two steps.
    pub async fn install_adapter(
        &self,
        name: String,
        uri: String,
        weights: AdapterWeights,
    ) -> Result<Installed, EngineError> {
        let preparer = self.preparer.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let digest = weights.digest();
            preparer.prepare(weights).map(|adapter| (adapter, digest))
        });
        let prepared = prepared.await.map_err(|e| EngineError::AdapterLoadFailed {
            source: ExecutorError::Invalid(format!("preparing the adapter failed: {e}")),
            dropped: None,
        })?;
        let (adapter, digest) = match prepared {
            Ok(prepared) => prepared,
            Err(source) => {
                if let ExecutorError::DeviceFault(why) = &source {
                    let reason = format!("the device failed preparing adapter {name:?}: {why}");
                    self.send(Command::Fault(reason))?;
                }
                return Err(EngineError::AdapterLoadFailed { source, dropped: None });
            }
        };
        let (reply, answer) = oneshot::channel();
        self.send(Command::Install { name, uri, adapter: Box::new(adapter), digest, reply })?;
        answer.await.map_err(|_| self.stopped())?
    }

    /// Unloads an adapter: new requests stop finding it at once, the ones using it finish,
    /// then its slot is freed. If they have not finished within `wait`, the unload is called
    /// off and the adapter stays loaded ([`EngineError::UnloadTimedOut`]).
    pub async fn unload_adapter(&self, name: String, wait: Duration) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Unload { name: name.clone(), reply })?;
        let (slot, freed) = answer.await.map_err(|_| self.stopped())??;
        match tokio::time::timeout(wait, freed).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(self.stopped()),
            Err(_) => {}
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Undrain { name: name.clone(), slot, reply })?;
        match answer.await.map_err(|_| self.stopped())? {
            Some(active) => Err(EngineError::UnloadTimedOut { name, active, waited: wait }),
            // Freed (or replaced) just as the wait ran out: the unload happened.
            None => Ok(()),
        }
    }

    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.commands.send(cmd).map_err(|_| self.stopped())
    }

    /// The error for a call the engine will not answer: why it failed, when it did.
    fn stopped(&self) -> EngineError {
        match self.health() {
            Health::Failed(reason) => EngineError::Failed(reason),
            Health::Serving => EngineError::Stopped,
        }
    }
}

/// A prompt's log-probabilities as they are worked out.
struct PromptLogprobs {
    prompt: Vec<u32>,
    top: usize,
    /// Entry `i` is prompt token `i`'s (the first has none).
    done: Vec<(u32, Option<TokenLogprobs>)>,
}

/// The grammar masks of a step's constrained rows, by request (or why one could not be had).
type Masks = HashMap<u64, Result<Mask, String>>;

/// A request being generated.
struct Active {
    events: mpsc::UnboundedSender<Event>,
    sampler: Sampler,
    /// Alternatives to report with each token's log-probability (`None`: no log-probabilities).
    logprobs: Option<usize>,
    /// The grammar its text must match, if any.
    constraint: Option<Box<Constraint>>,
    /// Prompt log-probabilities asked for: the prompt, the alternatives per position, and the
    /// ones worked out so far (the prompt may be computed in several chunks, and again after a
    /// preemption).
    prompt_logprobs: Option<PromptLogprobs>,
    detok: Detokenizer,
    stops: StopMatcher,
    prompt_len: usize,
    generated: usize,
    max_tokens: usize,
    ignore_eos: bool,
    adapter_slot: Option<u32>,
    /// It has been admitted to the running batch (preempted or not since).
    admitted: bool,
    /// Prompt tokens found in the prefix cache when it was first admitted.
    cached_tokens: usize,
    queued_at: std::time::Instant,
    /// Taken when the request is first admitted.
    queue_wait: Option<Histogram>,
}

impl PromptLogprobs {
    /// Takes the log-probabilities of the prompt tokens that `logits` (rows for positions
    /// `first..`) predict and that are not worked out yet: the row at position `p` gives
    /// token `p + 1`'s.
    fn take(&mut self, first: usize, logits: &[f32], vocab: usize) {
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let next = first + r + 1;
            if next == self.done.len()
                && let Some(&token) = self.prompt.get(next)
            {
                self.done.push((token, Some(sampling::logprobs(row, token, self.top))));
            }
        }
    }
}

impl Active {
    /// At the end of generation: appends to `text` whatever the detokenizer and the stop
    /// matcher still hold. Returns the text and whether a stop string cut it.
    fn drain(&mut self, tokenizer: &Tokenizer, mut text: String) -> (String, bool) {
        let tail = self.detok.flush(tokenizer);
        match self.stops.push(&tail) {
            Matched::Stop(t) => {
                text.push_str(&t);
                (text, true)
            }
            Matched::Continue(t) => {
                text.push_str(&t);
                text.push_str(&self.stops.finish());
                (text, false)
            }
        }
    }
}

struct Worker {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    slots: SlotTable,
    /// Unloads waiting for a draining slot to be freed.
    drains: HashMap<u32, Vec<oneshot::Sender<()>>>,
    active: HashMap<u64, Active>,
    rx: mpsc::UnboundedReceiver<Command>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    tokenizer: Arc<Tokenizer>,
    config: EngineConfig,
    next_id: u64,
    health: watch::Sender<Health>,
    /// Why the engine stopped serving (a device fault), once it has.
    fault: Option<String>,
    step_seconds: Histogram,
    prefixes: broadcast::Sender<Arc<PrefixUpdate>>,
    prefix_seq: u64,
}

impl Worker {
    /// Stops serving for good: every request in flight or waiting fails with `reason`, new ones
    /// are refused with it, and the engine's health says it.
    fn stop(&mut self, reason: String) {
        tracing::error!(%reason, requests = self.active.len(), "the engine stops serving");
        // Health first: whoever sees a request fail finds the engine's state already changed.
        self.fault = Some(reason.clone());
        self.health.send_replace(Health::Failed(reason.clone()));
        let ids: Vec<u64> = self.active.keys().copied().collect();
        for id in ids {
            self.scheduler.remove(id);
            if let Some(a) = self.active.remove(&id) {
                let _ = a.events.send(Event::Failed { reason: reason.clone(), engine_stopped: true });
            }
        }
        self.publish();
    }

    fn run(&mut self) {
        loop {
            if self.scheduler.is_idle() {
                // Nothing to compute: sleep until a command arrives (or every handle is gone).
                match self.rx.blocking_recv() {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                }
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.handle(cmd);
            }
            self.reap_cancelled();
            self.step();
            self.publish();
            self.publish_prefixes();
        }
    }

    /// Carries out a command. The new state is published before the caller hears back, so a
    /// caller that reads the snapshot after its reply sees its own change.
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::PrefixSnapshot(reply) => {
                let blocks = self.scheduler.cached_names().map(BlockHash::id).collect();
                let _ = reply.send(PrefixSnapshot { seq: self.prefix_seq, blocks });
            }
            Command::Submit { arrival, req, stops, constraint, events, reply } => {
                drop(arrival);
                let result = match &self.fault {
                    Some(reason) => Err(EngineError::Failed(reason.clone())),
                    None => self.submit(*req, *stops, constraint, events),
                };
                self.publish();
                let _ = reply.send(result);
            }
            Command::Install { name, uri, adapter, digest, reply } => {
                let result = match &self.fault {
                    Some(reason) => Err(EngineError::Failed(reason.clone())),
                    None => self.install(name, uri, *adapter, digest),
                };
                self.publish();
                let _ = reply.send(result);
            }
            Command::Fault(reason) => {
                if self.fault.is_none() {
                    self.stop(reason);
                }
            }
            Command::Unload { name, reply } => {
                let (done, freed) = oneshot::channel();
                let result = self.slots.drain(&name).map_err(EngineError::from).map(|(slot, idle)| {
                    if idle {
                        self.free_slot(Released { slot, name });
                        let _ = done.send(());
                    } else {
                        tracing::info!(adapter = %name, slot, "adapter draining before unload");
                        self.drains.entry(slot).or_default().push(done);
                    }
                    (slot, freed)
                });
                self.publish();
                let _ = reply.send(result);
            }
            Command::Undrain { name, slot, reply } => {
                let restored = self.slots.undrain(slot, &name);
                let active = restored.then(|| self.slots.get(slot).map_or(0, |r| r.active));
                if restored {
                    self.drains.remove(&slot);
                    tracing::info!(adapter = %name, slot, "unload timed out; adapter stays loaded");
                }
                self.publish();
                let _ = reply.send(active);
            }
        }
    }

    /// A draining slot is empty: drop its weights and tell whoever waits for it.
    fn free_slot(&mut self, released: Released) {
        if let Some(retired) = self.executor.unload_adapter(released.slot) {
            retired.drop_elsewhere();
        }
        tracing::info!(adapter = %released.name, slot = released.slot, "adapter unloaded");
        let waiters = self.drains.remove(&released.slot).unwrap_or_default();
        if !waiters.is_empty() {
            // Like every reply: publish first, so the unloader sees the slot gone.
            self.publish();
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }

    fn submit(
        &mut self,
        req: GenerateRequest,
        stops: StopMatcher,
        constraint: Option<Box<Constraint>>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Result<(), EngineError> {
        if self.scheduler.waiting_len() >= self.config.max_waiting {
            return Err(EngineError::QueueFull { max: self.config.max_waiting });
        }
        if self.scheduler.waiting_of(&req.tenant) >= self.config.max_waiting_per_tenant {
            return Err(EngineError::TenantQueueFull { tenant: req.tenant, max: self.config.max_waiting_per_tenant });
        }
        let adapter_slot = match &req.adapter {
            Some(name) => Some(self.slots.acquire(name)?),
            None => None,
        };
        let id = self.next_id;
        self.next_id += 1;
        let tail = &req.prompt[req.prompt.len().saturating_sub(DETOKENIZER_CONTEXT)..];
        self.active.insert(
            id,
            Active {
                events,
                sampler: Sampler::new(req.sampling, &req.prompt),
                logprobs: req.logprobs,
                prompt_logprobs: req.prompt_logprobs.map(|top| PromptLogprobs {
                    prompt: req.prompt.clone(),
                    top,
                    done: req.prompt.first().map(|&t| vec![(t, None)]).unwrap_or_default(),
                }),
                constraint,
                detok: Detokenizer::new(tail),
                stops,
                prompt_len: req.prompt.len(),
                generated: 0,
                max_tokens: req.max_tokens,
                ignore_eos: req.ignore_eos,
                adapter_slot,
                admitted: false,
                cached_tokens: 0,
                queued_at: std::time::Instant::now(),
                queue_wait: req.queue_wait,
            },
        );
        let digest = adapter_slot.and_then(|slot| self.slots.get(slot)).map(|r| r.weights_digest);
        let root = BlockHash::root(digest.as_ref(), &req.cache_salt);
        let mut seq = Sequence::new(id, req.prompt, adapter_slot).cached_under(root);
        if req.prompt_logprobs.is_some() {
            seq = seq.with_prompt_logits();
        }
        self.scheduler.add(seq.served_for(req.tenant.into(), req.tenant_weight, req.priority));
        Ok(())
    }

    fn install(
        &mut self,
        name: String,
        uri: String,
        adapter: PreparedAdapter,
        digest: [u8; 32],
    ) -> Result<Installed, EngineError> {
        let current = self.slots.find(&name);
        let mut replaced = None;
        if let Some(slot) = current {
            let resident = self.slots.get(slot).cloned().ok_or(EngineError::Stopped)?;
            if resident.uri == uri {
                let status = AdapterStatus { slot, resident };
                return Ok(Installed { status, already_loaded: true, evicted: None, replaced: None });
            }
            replaced = Some(resident.uri);
        }
        // A hot swap keeps the old adapter's slot out of the choice while another exists, so
        // the old adapter keeps serving if the new one fails to load.
        let (slot, evicted) = self.slots.choose(current)?;
        let (max_rank, targets, size_bytes) = (adapter.max_rank, adapter.targets.clone(), adapter.size_bytes);
        let weights = SlotWeights { max_rank, targets, size_bytes, digest };
        let installed = self.executor.install_adapter(slot, adapter);
        if let Ok(Some(retired)) = installed {
            // The evicted adapter's weights: freed off this thread.
            retired.drop_elsewhere();
        } else if let Err(source) = installed {
            if let ExecutorError::DeviceFault(_) = &source {
                self.stop(format!("the device failed placing adapter {name:?}: {source}"));
            }
            // The slot's previous (idle) adapter may be partly overwritten: drop it as well, so
            // the table never names weights the executor no longer holds.
            if let Some(old) = &evicted {
                let _ = self.slots.remove(old);
                tracing::warn!(adapter = %old, slot, "adapter dropped: a failed load overwrote its slot");
            }
            if let Some(retired) = self.executor.unload_adapter(slot) {
                retired.drop_elsewhere();
            }
            return Err(EngineError::AdapterLoadFailed { source, dropped: evicted });
        }
        if let Some(old_slot) = current.filter(|&s| s != slot) {
            let (_, idle) = self.slots.drain(&name)?;
            if idle {
                self.free_slot(Released { slot: old_slot, name: name.clone() });
            }
        }
        // Replacing the same name in place is a swap, not an eviction.
        let evicted = evicted.filter(|old| *old != name);
        if let Some(old) = &evicted {
            tracing::info!(adapter = %old, slot, "evicted least recently used idle adapter");
        }
        self.slots.insert(slot, name.clone(), uri, weights);
        tracing::info!(adapter = %name, slot, rank = max_rank, hot_swap = replaced.is_some(), "adapter loaded");
        let resident = self.slots.get(slot).cloned().ok_or(EngineError::Stopped)?;
        Ok(Installed { status: AdapterStatus { slot, resident }, already_loaded: false, evicted, replaced })
    }

    /// Drops requests whose caller has gone away.
    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self.active.iter().filter(|(_, a)| a.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            tracing::debug!(request = id, "client went away; request cancelled");
            self.retire(id);
        }
    }

    /// Removes a request from the scheduler and the adapter table.
    fn retire(&mut self, id: u64) -> Option<Active> {
        self.scheduler.remove(id);
        let active = self.active.remove(&id)?;
        if let Some(released) = active.adapter_slot.and_then(|slot| self.slots.release(slot)) {
            self.free_slot(released);
        }
        Some(active)
    }

    fn step(&mut self) {
        let step = self.scheduler.schedule();
        for id in &step.admitted {
            // First admission: how long it waited, and what of its prompt was cached.
            if let Some(a) = self.active.get_mut(id)
                && !std::mem::replace(&mut a.admitted, true)
            {
                if let Some(histogram) = a.queue_wait.take() {
                    histogram.observe(a.queued_at.elapsed().as_secs_f64());
                }
                a.cached_tokens = self.scheduler.get(*id).map_or(0, |s| s.cached_tokens);
            }
        }
        if step.batch.tokens.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        self.step_inner(step);
        self.step_seconds.observe(started.elapsed().as_secs_f64());
    }

    fn step_inner(&mut self, step: scheduler::Step) {
        let (logits, mut masks) = self.forward_and_mask(&step);
        let mut logits = match logits {
            Ok(l) => l,
            Err(ExecutorError::DeviceFault(why)) => {
                self.stop(format!("the device failed during a forward pass: {why}"));
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing the requests in the batch");
                for &(id, _) in &step.chunks {
                    if let Some(a) = self.retire(id) {
                        let _ = a.events.send(Event::Failed { reason: e.to_string(), engine_stopped: false });
                    }
                }
                return;
            }
        };
        self.scheduler.complete(&step);
        let rows: usize = step.logit_rows.iter().map(|r| r.2).sum();
        let vocab = logits.len() / rows.max(1);
        // Each sampling sequence's row: the last of its rows.
        let mut sample_row = HashMap::with_capacity(step.logits_for.len());
        let mut at = 0;
        for &(id, first, count) in &step.logit_rows {
            if let Some(p) = self.active.get_mut(&id).and_then(|a| a.prompt_logprobs.as_mut()) {
                p.take(first, &logits[at * vocab..(at + count) * vocab], vocab);
                if p.done.len() == p.prompt.len() && !p.prompt.is_empty() {
                    let tokens = std::mem::take(&mut p.done);
                    p.prompt.clear();
                    if let Some(a) = self.active.get(&id) {
                        let _ = a.events.send(Event::Prompt { tokens });
                    }
                }
            }
            sample_row.insert(id, at + count - 1);
            at += count;
        }
        for &id in &step.logits_for {
            let Some(active) = self.active.get_mut(&id) else {
                continue;
            };
            let Some(&row) = sample_row.get(&id) else { continue };
            let row = &mut logits[row * vocab..(row + 1) * vocab];
            let (token, logprobs) = match masks.remove(&id) {
                None => {
                    let token = active.sampler.sample(row);
                    (token, active.logprobs.map(|top| sampling::logprobs(row, token, top)))
                }
                Some(Ok(mask)) => {
                    // Log-probabilities are the model's own, as without a grammar: taken from
                    // the row before the mask.
                    let raw = active.logprobs.map(|_| row.to_vec());
                    mask.apply(row);
                    let token = active.sampler.sample(row);
                    (token, active.logprobs.zip(raw).map(|(top, raw)| sampling::logprobs(&raw, token, top)))
                }
                Some(Err(why)) => {
                    self.fail(id, format!("the request's grammar failed: {why}"));
                    continue;
                }
            };
            let ends_grammar = match active.constraint.as_mut() {
                None => false,
                // An end-of-sequence token the mask allowed ends a complete text.
                Some(_) if self.tokenizer.eos_ids().contains(&token) => true,
                Some(c) => match c.accept(token) {
                    Ok(()) => c.is_complete(),
                    Err(why) => {
                        self.fail(id, format!("the request's grammar failed: {why}"));
                        continue;
                    }
                },
            };
            self.on_token(id, token, logprobs, ends_grammar);
        }
    }

    /// Runs the step's forward pass while, on another thread, the grammar masks of the rows it
    /// samples are computed (they depend only on tokens already chosen).
    fn forward_and_mask(&mut self, step: &scheduler::Step) -> (Result<Vec<f32>, ExecutorError>, Masks) {
        let mut constrained: Vec<(u64, &mut Constraint)> = Vec::new();
        for (id, active) in self.active.iter_mut() {
            if let Some(c) = active.constraint.as_deref_mut()
                && step.logits_for.contains(id)
            {
                constrained.push((*id, c));
            }
        }
        if constrained.is_empty() {
            return (self.executor.forward(&step.batch), HashMap::new());
        }
        let executor = &mut self.executor;
        std::thread::scope(|scope| {
            let masking =
                scope.spawn(move || constrained.into_iter().map(|(id, c)| (id, c.mask())).collect::<HashMap<_, _>>());
            let logits = executor.forward(&step.batch);
            let masks = masking.join().unwrap_or_else(|_| {
                // A panic in the matcher (a bug) fails the rows it was masking, not the engine.
                step.logits_for.iter().map(|&id| (id, Err("the grammar matcher panicked".to_string()))).collect()
            });
            (logits, masks)
        })
    }

    /// Ends a request with an error of its own.
    fn fail(&mut self, id: u64, reason: String) {
        tracing::warn!(request = id, %reason, "request failed");
        if let Some(a) = self.retire(id) {
            let _ = a.events.send(Event::Failed { reason, engine_stopped: false });
        }
        self.publish();
    }

    /// `ends_grammar`: the token completes the request's grammar, which allows nothing more.
    fn on_token(&mut self, id: u64, token: u32, logprobs: Option<TokenLogprobs>, ends_grammar: bool) {
        self.scheduler.push_token(id, token);
        let Some(a) = self.active.get_mut(&id) else {
            return;
        };
        a.generated += 1;
        let finish = |a: &mut Active, reason, text: String, logprobs| Event::Finished {
            id: Some(token),
            text,
            logprobs,
            reason,
            prompt_tokens: a.prompt_len,
            completion_tokens: a.generated,
            cached_tokens: a.cached_tokens,
        };
        let eos = self.tokenizer.eos_ids().contains(&token);
        let event = if eos && (!a.ignore_eos || ends_grammar) {
            // The end-of-sequence token has no text, and no log-probabilities are reported for it.
            let (text, stopped) = a.drain(&self.tokenizer, String::new());
            finish(a, if stopped { FinishReason::Stop } else { FinishReason::Eos }, text, None)
        } else {
            let piece = a.detok.push(&self.tokenizer, token);
            match a.stops.push(&piece) {
                Matched::Stop(text) => finish(a, FinishReason::Stop, text, logprobs),
                Matched::Continue(text) if ends_grammar => {
                    let (text, _) = a.drain(&self.tokenizer, text);
                    finish(a, FinishReason::Stop, text, logprobs)
                }
                Matched::Continue(text) if a.generated >= a.max_tokens => {
                    let (text, stopped) = a.drain(&self.tokenizer, text);
                    finish(a, if stopped { FinishReason::Stop } else { FinishReason::Length }, text, logprobs)
                }
                Matched::Continue(text) => Event::Token { id: token, text, logprobs },
            }
        };
        let done = matches!(event, Event::Finished { .. });
        let sent = a.events.send(event).is_ok();
        if done || !sent {
            // The stream ends when `finished` (holding its sender) is dropped: publish first, so
            // a client that saw its stream end reads a snapshot without its request.
            let finished = self.retire(id);
            self.publish();
            drop(finished);
        }
    }

    /// Tells prefix watchers what the last step cached and gave out.
    fn publish_prefixes(&mut self) {
        let changes = self.scheduler.take_cache_changes();
        if changes.is_empty() {
            return;
        }
        self.prefix_seq += 1;
        let mut update = PrefixUpdate { seq: self.prefix_seq, ..PrefixUpdate::default() };
        for change in changes {
            match change {
                blocks::CacheChange::Stored(name) => update.stored.push(name.id()),
                blocks::CacheChange::Removed(name) => update.removed.push(name.id()),
            }
        }
        // A step gives blocks out before it names the ones it filled: removals come first.
        let _ = self.prefixes.send(Arc::new(update));
    }

    fn publish(&self) {
        let cfg = self.scheduler.config();
        let (running_slots, waiting_slots) = self.scheduler.adapter_slots();
        let snapshot = Snapshot {
            adapters: self.slots.iter().map(|(slot, r)| AdapterStatus { slot, resident: r.clone() }).collect(),
            waiting: self.scheduler.waiting_len(),
            running: self.scheduler.running_len(),
            running_slots,
            waiting_slots,
            kv_tokens_total: cfg.num_blocks * cfg.block_size,
            kv_tokens_free: self.scheduler.free_blocks() * cfg.block_size,
        };
        self.snapshot.send_replace(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests;
