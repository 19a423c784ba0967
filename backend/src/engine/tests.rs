//! Engine behaviour around the forward pass — admission, cancellation, queue and slot limits,
//! stop conditions — with a scripted executor standing in for the model.

use super::*;
use crate::model::Model;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Always predicts token `next` (the same every step), taking `delay` per forward pass.
struct Scripted {
    vocab: usize,
    next: Arc<AtomicUsize>,
    forwards: Arc<AtomicUsize>,
    /// Adapter slots of the rows of the last forward pass.
    last_slots: Arc<std::sync::Mutex<Vec<Option<u32>>>>,
    /// Slots whose weights were dropped.
    unloaded: Arc<std::sync::Mutex<Vec<u32>>>,
    delay: Duration,
    /// What the next forward pass does: [`RUN`], [`PANIC`], [`FAULT`] or [`STALL`] (which it
    /// turns to [`STALLED`] as it wedges).
    fault: Arc<AtomicUsize>,
}

const RUN: usize = 0;
const PANIC: usize = 1;
const FAULT: usize = 2;
/// The pass waits until told something else, as on a wedged device.
const STALL: usize = 3;
const STALLED: usize = 4;

impl Executor for Scripted {
    fn device(&self) -> String {
        "scripted".into()
    }
    fn dtype(&self) -> &'static str {
        "f32"
    }
    fn preparer(&self) -> Arc<dyn executor::AdapterPreparer> {
        Arc::new(cpu::CpuPreparer { max_rank: 64, bf16_decode: false })
    }
    fn install_adapter(
        &mut self,
        _: u32,
        _: executor::PreparedAdapter,
    ) -> Result<Option<executor::Retired>, ExecutorError> {
        Ok(None)
    }
    fn unload_adapter(&mut self, slot: u32) -> Option<executor::Retired> {
        self.unloaded.lock().expect("lock").push(slot);
        None
    }
    fn forward(&mut self, batch: &executor::Batch) -> Result<Vec<f32>, ExecutorError> {
        std::thread::sleep(self.delay);
        let _ = self.fault.compare_exchange(STALL, STALLED, Ordering::SeqCst, Ordering::SeqCst);
        while self.fault.load(Ordering::SeqCst) == STALLED {
            std::thread::sleep(Duration::from_millis(1));
        }
        match self.fault.load(Ordering::SeqCst) {
            PANIC => panic!("scripted panic"),
            FAULT => return Err(ExecutorError::DeviceFault("scripted illegal address".into())),
            _ => {}
        }
        *self.last_slots.lock().expect("lock") = batch.row_adapters();
        self.forwards.fetch_add(1, Ordering::SeqCst);
        let mut logits = vec![0f32; batch.logit_rows() * self.vocab];
        let next = self.next.load(Ordering::SeqCst);
        for row in logits.chunks_mut(self.vocab) {
            row[next] = 10.0;
        }
        Ok(logits)
    }
}

struct Fixture {
    engine: Engine,
    next: Arc<AtomicUsize>,
    forwards: Arc<AtomicUsize>,
    last_slots: Arc<std::sync::Mutex<Vec<Option<u32>>>>,
    unloaded: Arc<std::sync::Mutex<Vec<u32>>>,
    tokenizer: Arc<Tokenizer>,
    fault: Arc<AtomicUsize>,
}

fn fixture(max_running: usize, max_waiting: usize, max_loras: usize) -> Fixture {
    fixture_with(max_running, max_waiting, max_waiting, max_loras)
}

fn fixture_with(max_running: usize, max_waiting: usize, max_waiting_per_tenant: usize, max_loras: usize) -> Fixture {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama");
    let model = Model::load(&dir).expect("fixture model");
    let next = Arc::new(AtomicUsize::new(65));
    let forwards = Arc::new(AtomicUsize::new(0));
    let exec = Scripted {
        vocab: model.config.vocab_size,
        next: next.clone(),
        forwards: forwards.clone(),
        last_slots: Arc::default(),
        unloaded: Arc::default(),
        delay: Duration::from_millis(2),
        fault: Arc::default(),
    };
    let (last_slots, unloaded, fault) = (exec.last_slots.clone(), exec.unloaded.clone(), exec.fault.clone());
    let cfg = EngineConfig {
        scheduler: SchedulerConfig::new(16, 1024, 256, max_running),
        max_model_len: 4096,
        max_waiting,
        max_waiting_per_tenant,
        max_loras,
        max_lora_rank: 8,
    };
    let tokenizer = Arc::new(model.tokenizer);
    let engine = Engine::start(&model.config, tokenizer.clone(), Box::new(exec), cfg);
    Fixture { engine, next, forwards, last_slots, unloaded, tokenizer, fault }
}

fn request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest { prompt: vec![10, 11, 12], max_tokens, ignore_eos: true, ..Default::default() }
}

fn adapter() -> AdapterWeights {
    AdapterWeights { layers: Vec::new(), max_rank: 4, targets: Default::default(), base_model: None }
}

async fn finish(events: &mut mpsc::UnboundedReceiver<Event>) -> (Vec<u32>, String, FinishReason) {
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Finished { id, text: t, reason, .. } => {
                ids.extend(id);
                text.push_str(&t);
                return (ids, text, reason);
            }
            Event::Failed { reason, .. } => panic!("failed: {reason}"),
            Event::Prompt { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("stream ended without Finished");
}

async fn wait_idle(engine: &Engine) -> Arc<Snapshot> {
    for _ in 0..500 {
        let s = engine.snapshot();
        if s.running == 0 && s.waiting == 0 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.snapshot()
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_request_and_frees_its_cache() {
    let f = fixture(4, 4, 1);
    let mut events = f.engine.generate(request(2000)).await.expect("accepted");
    events.recv().await.expect("first token");
    drop(events);
    let snap = wait_idle(&f.engine).await;
    assert_eq!(snap.running, 0, "request cancelled");
    assert_eq!(snap.kv_tokens_free, snap.kv_tokens_total, "its KV blocks are free");
    let before = f.forwards.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(f.forwards.load(Ordering::SeqCst), before, "no more steps run for it");
    assert!(before < 1000, "stopped long before max_tokens ({before} steps)");
}

#[tokio::test]
async fn a_full_queue_refuses_new_requests_until_it_drains() {
    let f = fixture(1, 1, 1);
    let mut running = f.engine.generate(request(2000)).await.expect("runs");
    running.recv().await.expect("the first request holds the only running place");
    let mut waiting = f.engine.generate(request(5)).await.expect("waits");
    let err = f.engine.generate(request(5)).await.expect_err("queue full");
    assert!(matches!(err, EngineError::QueueFull { max: 1 }), "{err}");
    // Once the running request goes away the waiting one runs, and the queue has room again.
    drop(running);
    let (_, _, reason) = finish(&mut waiting).await;
    assert_eq!(reason, FinishReason::Length);
    f.engine.generate(request(5)).await.expect("room again");
}

fn for_tenant(tenant: &str, priority: u8, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { tenant: tenant.into(), priority, ..request(max_tokens) }
}

#[tokio::test]
async fn one_tenant_cannot_fill_the_queue_for_everyone() {
    let f = fixture_with(1, 4, 2, 1);
    let mut running = f.engine.generate(request(2000)).await.expect("runs");
    running.recv().await.expect("it holds the only running place");
    let _a1 = f.engine.generate(for_tenant("a", 0, 5)).await.expect("waits");
    let _a2 = f.engine.generate(for_tenant("a", 0, 5)).await.expect("waits");
    let err = f.engine.generate(for_tenant("a", 0, 5)).await.expect_err("a has its two waiting");
    assert!(matches!(&err, EngineError::TenantQueueFull { tenant, max: 2 } if tenant == "a"), "{err}");
    assert!(err.to_string().contains("tenant \"a\" has 2 requests waiting"), "{err}");
    let _b = f.engine.generate(for_tenant("b", 0, 5)).await.expect("the queue still has room for b");
}

#[tokio::test]
async fn a_high_priority_request_at_a_full_engine_runs_before_the_queued_ones() {
    let f = fixture(1, 4, 1);
    let mut running = f.engine.generate(for_tenant("a", 0, 2000)).await.expect("runs");
    running.recv().await.expect("it holds the only running place");
    let mut queued = f.engine.generate(for_tenant("a", 0, 5)).await.expect("waits");
    let mut urgent = f.engine.generate(for_tenant("b", 3, 5)).await.expect("accepted");
    let (_, _, reason) = finish(&mut urgent).await;
    assert_eq!(reason, FinishReason::Length);
    // It preempted the running request and went ahead of the queued one, which got nothing.
    assert!(queued.try_recv().is_err(), "the queued request waits behind both");
    // The preempted request resumes before the one queued after it.
    let resumed = tokio::time::timeout(Duration::from_secs(10), async {
        // (Until the urgent request is retired, the snapshot still shows it running.)
        while (f.engine.snapshot().running, f.engine.snapshot().waiting) != (1, 1) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    resumed.await.expect("one request runs again, one waits");
    assert!(queued.try_recv().is_err(), "the queued request still waits");
    drop(running);
    finish(&mut queued).await;
}

fn with_adapter(max_tokens: usize, name: &str) -> GenerateRequest {
    GenerateRequest { adapter: Some(name.into()), ..request(max_tokens) }
}

#[tokio::test]
async fn adapters_in_use_cannot_be_evicted_and_an_unload_that_times_out_changes_nothing() {
    let f = fixture(4, 4, 1);
    f.engine.install_adapter("a".into(), "file:///a".into(), adapter()).await.expect("installs");
    let mut events = f.engine.generate(with_adapter(2000, "a")).await.expect("accepted");
    events.recv().await.expect("running");
    let err = f.engine.unload_adapter("a".into(), Duration::from_millis(50)).await.expect_err("in use");
    assert!(matches!(err, EngineError::UnloadTimedOut { active: 1, .. }), "{err}");
    // Still loaded and taking requests.
    drop(f.engine.generate(with_adapter(2, "a")).await.expect("a is still loaded"));
    let err = f.engine.install_adapter("b".into(), "file:///b".into(), adapter()).await.expect_err("no idle slot");
    assert!(matches!(err, EngineError::SlotsFull { max: 1 }), "{err}");
    drop(events);
    wait_idle(&f.engine).await;
    // Released: now "b" may evict "a", and "a" is gone.
    f.engine.install_adapter("b".into(), "file:///b".into(), adapter()).await.expect("evicts idle a");
    assert!(matches!(f.engine.generate(with_adapter(2, "a")).await, Err(EngineError::UnknownAdapter(_))));
}

#[tokio::test]
async fn an_unload_waits_for_the_adapters_requests_and_refuses_new_ones_meanwhile() {
    let f = fixture(4, 4, 2);
    f.engine.install_adapter("a".into(), "file:///a".into(), adapter()).await.expect("installs");
    let slot = f.engine.snapshot().adapters[0].slot;
    let mut running = f.engine.generate(with_adapter(40, "a")).await.expect("accepted");
    running.recv().await.expect("running");
    let unload = f.engine.unload_adapter("a".into(), Duration::from_secs(30));
    let (unloaded, finished) = tokio::join!(unload, async {
        // While draining, the adapter takes no new requests, and its running request finishes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = f.engine.generate(with_adapter(2, "a")).await;
        assert!(matches!(refused, Err(EngineError::UnknownAdapter(_))), "{refused:?}");
        finish(&mut running).await
    });
    unloaded.expect("unloaded once the request finished");
    assert_eq!(finished.2, FinishReason::Length);
    assert_eq!(finished.0.len(), 39, "the running request was not cut short (one token read before)");
    assert!(f.engine.snapshot().adapters.is_empty());
    assert_eq!(*f.unloaded.lock().expect("lock"), vec![slot]);
}

#[tokio::test]
async fn a_hot_swap_sends_new_requests_to_the_new_weights_while_old_ones_finish() {
    let f = fixture(4, 4, 2);
    let first = f.engine.install_adapter("a".into(), "file:///a1".into(), adapter()).await.expect("installs");
    let mut old = f.engine.generate(with_adapter(60, "a")).await.expect("accepted");
    old.recv().await.expect("running");
    let swap = f.engine.install_adapter("a".into(), "file:///a2".into(), adapter()).await.expect("swaps");
    assert_eq!(swap.replaced.as_deref(), Some("file:///a1"));
    assert_ne!(swap.status.slot, first.status.slot, "the old slot keeps serving its request");
    let mut new = f.engine.generate(with_adapter(3, "a")).await.expect("accepted");
    new.recv().await.expect("running");
    let rows = f.last_slots.lock().expect("lock").clone();
    assert!(rows.contains(&Some(first.status.slot)) && rows.contains(&Some(swap.status.slot)), "{rows:?}");
    finish(&mut new).await;
    let (ids, _, _) = finish(&mut old).await;
    assert_eq!(ids.len(), 59, "the old request ran to its end (one token read before)");
    let snap = wait_idle(&f.engine).await;
    let uris: Vec<_> = snap.adapters.iter().map(|a| (a.slot, a.resident.uri.as_str())).collect();
    assert_eq!(uris, vec![(swap.status.slot, "file:///a2")], "the old slot was freed");
    assert_eq!(*f.unloaded.lock().expect("lock"), vec![first.status.slot]);
}

#[tokio::test]
async fn eos_and_stop_strings_end_generation_with_their_reason() {
    let f = fixture(4, 4, 1);
    // The scripted model repeats one token; find its text.
    let token = f.next.load(Ordering::SeqCst) as u32;
    let piece = f.tokenizer.decode(&[token]).expect("decodes");
    assert!(!piece.is_empty());

    let (ids, text, reason) = finish(&mut f.engine.generate(request(5)).await.expect("ok")).await;
    assert_eq!((ids.len(), reason), (5, FinishReason::Length));
    assert_eq!(text, piece.repeat(5));

    let mut req = request(50);
    req.stop = vec![piece.repeat(3)];
    let (ids, text, reason) = finish(&mut f.engine.generate(req).await.expect("ok")).await;
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(ids.len(), 3, "stops at the token completing the stop string");
    assert_eq!(text, "", "the stop string itself is not returned");

    let eos = f.tokenizer.eos_ids()[0];
    f.next.store(eos as usize, Ordering::SeqCst);
    let mut req = request(50);
    req.ignore_eos = false;
    let (ids, text, reason) = finish(&mut f.engine.generate(req).await.expect("ok")).await;
    assert_eq!((ids, text.as_str(), reason), (vec![eos], "", FinishReason::Eos));
}

#[tokio::test]
async fn prompts_that_do_not_fit_the_context_are_refused_up_front() {
    let f = fixture(4, 4, 1);
    let mut req = request(10);
    req.prompt = vec![1; 4096];
    let err = f.engine.generate(req).await.expect_err("too long");
    assert!(err.to_string().contains("4096 tokens"), "{err}");
    let err = f.engine.generate(request(4094)).await.expect_err("too long with completion");
    assert!(err.to_string().contains("4097"), "{err}");
    let mut req = request(1);
    req.prompt = vec![];
    assert!(f.engine.generate(req).await.is_err());
}

/// Reads a stream to its end; returns the failure it ended with, if any.
async fn failure(events: &mut mpsc::UnboundedReceiver<Event>) -> Option<String> {
    while let Some(ev) = events.recv().await {
        if let Event::Failed { reason, engine_stopped } = ev {
            assert!(engine_stopped, "{reason}");
            return Some(reason);
        }
    }
    None
}

#[tokio::test]
async fn a_dead_engine_thread_fails_its_requests_and_says_why_it_cannot_serve() {
    let f = fixture(4, 4, 1);
    f.engine.install_adapter("a".into(), "file:///a".into(), adapter()).await.expect("installs");
    let mut running = f.engine.generate(request(2000)).await.expect("accepted");
    running.recv().await.expect("running");
    assert_eq!(f.engine.health(), Health::Serving);
    f.fault.store(PANIC, Ordering::SeqCst);
    let why = failure(&mut running).await.expect("the running request fails");
    assert!(why.contains("the engine thread panicked: scripted panic"), "{why}");
    assert_eq!(f.engine.health(), Health::Failed(why.clone()));
    // Nothing more is taken, and every refusal says why.
    for err in [
        f.engine.generate(request(2)).await.expect_err("refused"),
        f.engine.install_adapter("b".into(), "file:///b".into(), adapter()).await.expect_err("refused"),
        f.engine.unload_adapter("a".into(), Duration::from_secs(1)).await.expect_err("refused"),
    ] {
        assert!(matches!(&err, EngineError::Failed(r) if *r == why), "{err}");
    }
}

#[tokio::test]
async fn a_device_fault_stops_the_engine_for_good_and_fails_every_request() {
    let f = fixture(1, 4, 1);
    let mut running = f.engine.generate(request(2000)).await.expect("accepted");
    running.recv().await.expect("running");
    let mut waiting = f.engine.generate(request(5)).await.expect("queued behind it");
    f.fault.store(FAULT, Ordering::SeqCst);
    let why = failure(&mut running).await.expect("the running request fails");
    assert!(why.contains("the device failed during a forward pass: scripted illegal address"), "{why}");
    assert_eq!(failure(&mut waiting).await.as_deref(), Some(why.as_str()), "the waiting one too");
    assert_eq!(f.engine.health(), Health::Failed(why.clone()));
    // The fault is sticky: the device is not trusted again, even if it would now work.
    f.fault.store(RUN, Ordering::SeqCst);
    let err = f.engine.generate(request(2)).await.expect_err("refused");
    assert!(matches!(&err, EngineError::Failed(r) if *r == why), "{err}");
    let snap = f.engine.snapshot();
    assert_eq!((snap.running, snap.waiting, snap.kv_tokens_free), (0, 0, snap.kv_tokens_total));
}

/// Sends a request to an engine whose next pass wedges; returns once the pass has.
async fn wedge(f: &Fixture) -> mpsc::UnboundedReceiver<Event> {
    f.fault.store(STALL, Ordering::SeqCst);
    let events = f.engine.generate(request(3)).await.expect("accepted");
    let wedged = async {
        while f.fault.load(Ordering::SeqCst) != STALLED {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wedged).await.expect("the pass wedges");
    events
}

/// Waits until the engine counts `n` requests waiting.
async fn until_waiting(engine: &Engine, n: usize) {
    let counted = async {
        while engine.requests_waiting() != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let waited = tokio::time::timeout(Duration::from_secs(10), counted).await;
    waited.unwrap_or_else(|_| panic!("{n} waiting expected, {} counted", engine.requests_waiting()));
}

#[tokio::test]
async fn requests_sent_to_a_wedged_engine_count_as_waiting_until_they_are_served_or_failed() {
    let f = fixture(1, 8, 1);
    // The first is taken up, and the pass that would admit it wedges: the engine thread takes
    // up nothing more, so the next ones wait in its channel. They count.
    let mut first = wedge(&f).await;
    until_waiting(&f.engine, 1).await;
    let queued = async {
        let (a, b) = tokio::join!(f.engine.generate(request(3)), f.engine.generate(request(3)));
        (a.expect("accepted"), b.expect("accepted"))
    };
    let unwedge = async {
        until_waiting(&f.engine, 3).await;
        f.fault.store(RUN, Ordering::SeqCst);
    };
    let ((mut second, mut third), ()) = tokio::join!(queued, unwedge);
    for events in [&mut first, &mut second, &mut third] {
        finish(events).await;
    }
    until_waiting(&f.engine, 0).await;

    // Requests a dead engine thread never took up are not counted for ever.
    let mut running = wedge(&f).await;
    let (refused, ()) = tokio::join!(f.engine.generate(request(3)), async {
        until_waiting(&f.engine, 2).await;
        f.fault.store(PANIC, Ordering::SeqCst);
    });
    assert!(refused.is_err(), "the engine died before taking it up");
    assert!(failure(&mut running).await.is_some(), "the running request fails");
    assert_eq!(f.engine.requests_waiting(), 0);
}

/// An adapter whose weights differ with `seed`.
fn weights(seed: f32) -> AdapterWeights {
    use crate::adapters::LoraModule;
    let module = LoraModule { a: vec![seed; 4], b: vec![seed; 4], rank: 1, scale: 1.0 };
    let layers = vec![[Some(module), None, None, None, None, None, None]];
    AdapterWeights { layers, ..adapter() }
}

/// Generates one token for `prompt` and returns how many prompt tokens came from the cache.
async fn cached_tokens(engine: &Engine, adapter: Option<&str>, salt: &str, prompt: &[u32]) -> usize {
    let req = GenerateRequest {
        prompt: prompt.to_vec(),
        adapter: adapter.map(String::from),
        cache_salt: salt.into(),
        max_tokens: 1,
        ignore_eos: true,
        ..Default::default()
    };
    let mut events = engine.generate(req).await.expect("accepted");
    while let Some(ev) = events.recv().await {
        if let Event::Finished { cached_tokens, .. } = ev {
            return cached_tokens;
        }
    }
    panic!("stream ended without Finished");
}

#[tokio::test]
async fn cached_prompt_blocks_are_kept_apart_by_adapter_weights_and_salt() {
    let f = fixture(4, 4, 4);
    let e = &f.engine;
    // Blocks of 16 tokens: a 40-token prompt has two full blocks before its last token.
    let prompt: Vec<u32> = (100..140).collect();
    e.install_adapter("a".into(), "file:///a1".into(), weights(1.0)).await.expect("installs");
    e.install_adapter("b".into(), "file:///b".into(), weights(2.0)).await.expect("installs");
    assert_eq!(cached_tokens(e, Some("a"), "", &prompt).await, 0);
    assert_eq!(cached_tokens(e, Some("a"), "", &prompt).await, 32, "the same adapter reuses both blocks");
    let mut longer = prompt.clone();
    longer.extend(140..160);
    assert_eq!(cached_tokens(e, Some("a"), "", &longer).await, 32, "a longer prompt reuses the common prefix");
    assert_eq!(cached_tokens(e, Some("b"), "", &prompt).await, 0, "another adapter shares nothing");
    assert_eq!(cached_tokens(e, None, "", &prompt).await, 0, "nor does the base model");
    assert_eq!(cached_tokens(e, Some("a"), "tenant-2", &prompt).await, 0, "nor another salt");

    // A hot swap of `a` to other weights: its old blocks are not reused.
    e.install_adapter("a".into(), "file:///a2".into(), weights(3.0)).await.expect("swaps");
    assert_eq!(cached_tokens(e, Some("a"), "", &prompt).await, 0, "new weights, new blocks");
    assert_eq!(cached_tokens(e, Some("a"), "", &prompt).await, 32);
    // Blocks are named by the weights, not the name or the source: the first weights again,
    // from elsewhere, find their blocks still cached.
    e.install_adapter("a".into(), "s3://bucket/a1".into(), weights(1.0)).await.expect("swaps back");
    assert_eq!(cached_tokens(e, Some("a"), "", &prompt).await, 32);
}

#[tokio::test]
async fn a_grammar_constrains_its_own_request_in_a_batch_and_ends_it_when_complete() {
    let f = fixture(4, 8, 1);
    // The scripted model always prefers token 65; the grammar allows only three digits, and
    // ends the request once they are written, even though it ignores end-of-sequence tokens.
    let digits = GenerateRequest { grammar: Some(GrammarSpec::Regex("[0-9]{3}".into())), ..request(50) };
    let mut constrained = f.engine.generate(digits).await.expect("accepted");
    let mut free = f.engine.generate(request(6)).await.expect("accepted");
    let (_, text, reason) = finish(&mut constrained).await;
    assert_eq!(reason, FinishReason::Stop);
    assert!(text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
    let (ids, _, reason) = finish(&mut free).await;
    assert_eq!((ids, reason), (vec![65; 6], FinishReason::Length), "the batch's other row is unconstrained");
    // A grammar that cannot be compiled is refused before anything runs.
    let bad = GenerateRequest { grammar: Some(GrammarSpec::JsonSchema(r#"{"type": 7}"#.into())), ..request(5) };
    let err = f.engine.generate(bad).await.expect_err("refused");
    assert!(matches!(err, EngineError::Grammar(grammar::GrammarError::Invalid(_))), "{err}");
    let snap = wait_idle(&f.engine).await;
    assert_eq!(snap.kv_tokens_free, snap.kv_tokens_total);
}
