//! The leader's side of adapter operations: run each pending operation on every healthy
//! backend, undo what a refusal leaves half done, and record the outcome together with the
//! change to the desired set. Runs only while this gateway leads; a pending operation whose
//! leader died is run again from the start by the next one (loading what is loaded and
//! unloading what is gone are no-ops on a backend). Finished records are removed once the
//! gateway that waits for them has had time to read them.

use super::ops::{self, Action, Operation, Outcome};
use super::{Applied, BackendResult, load_request, split_by_health};
use crate::Gateway;
use crate::error::{Code, Error};
use crate::loras::{self, DesiredLora};
use crate::store::{Expect, Revision, StoreError, Write};
use crate::upstream::{UpstreamCode, UpstreamError};
use futures::future::join_all;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a finished operation's record stays for the gateway that waits for it.
pub const FINISHED_RETENTION_S: u64 = 60;
/// How often the executor looks at the records without being woken (to clean up).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the executor: it runs operations whenever this gateway leads.
pub fn spawn(gw: Arc<Gateway>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let running: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut changes = gw.replica().subscribe();
        let mut lead = gw.leadership.subscribe();
        loop {
            if let Some(fence) = gw.leadership.token() {
                sweep(&gw, fence, &running).await;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = lead.changed() => {}
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
        }
    })
}

/// Starts every pending operation not already running here, and removes old finished ones.
async fn sweep(gw: &Arc<Gateway>, fence: u64, running: &Arc<Mutex<HashSet<String>>>) {
    let snapshot = gw.replica().current();
    let now = ops::now();
    for (name, op, revision) in ops::all(&snapshot) {
        match &op.outcome {
            None if op.started.is_none() && now.saturating_sub(op.requested_at) > ops::ACCEPT_WITHIN_S => {
                let error = Error::new(
                    Code::OperationExpired,
                    format!(
                        "the operation on LoRA adapter '{name}' reached the state store more than {}s after it was asked for (the store was unavailable); it was not run",
                        ops::ACCEPT_WITHIN_S
                    ),
                );
                let failed = Operation { outcome: Some(Outcome::Failed { error, finished_at: now }), ..op };
                if let Ok(v) = serde_json::to_string(&failed) {
                    let _ = gw.replica().commit(vec![Write::put(ops::key(&name), Expect::At(revision), v)]).await;
                }
            }
            None => {
                let fresh = running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(op.id.clone());
                if fresh {
                    let (gw, running) = (gw.clone(), running.clone());
                    tokio::spawn(async move {
                        let id = op.id.clone();
                        run(&gw, &name, op, revision, fence).await;
                        running.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
                    });
                }
            }
            Some(outcome) if now.saturating_sub(outcome.finished_at()) >= FINISHED_RETENTION_S => {
                let _ = gw.replica().commit(vec![Write::delete(ops::key(&name), Expect::At(revision))]).await;
            }
            Some(_) => {}
        }
    }
}

/// What running an operation on the backends did.
enum Ran {
    /// It took: the outcome, and the write that makes the desired set say so.
    Took { hot_swap: bool, backends: Vec<BackendResult>, took: Vec<String>, desired: Write },
    /// It was refused; the backends that took it were put back.
    Refused(Error),
    /// A newer leader drives the backends: leave the operation to it.
    Fenced,
}

async fn run(gw: &Arc<Gateway>, name: &str, op: Operation, revision: Revision, fence: u64) {
    let turn = gw.turn(name);
    let _turn = turn.lock().await;
    // Say who runs it before calling any backend (a record nobody started, and old, expires).
    let op = Operation { started: Some(ops::Started { by: gw.leadership.holder().to_string(), at: ops::now() }), ..op };
    let Ok(value) = serde_json::to_string(&op) else { return };
    let revision = match gw.replica().commit(vec![Write::put(ops::key(name), Expect::At(revision), value)]).await {
        Ok(r) => r,
        // Changed or gone: whoever changed it decides; the store unavailable: the next sweep.
        Err(_) => return,
    };
    let expect = ops::expectation(op.expect);
    let ran = match &op.action {
        Action::Load { lora } => load(gw, lora, expect, fence).await,
        Action::Unload { lora } => unload(gw, lora, expect, fence).await,
    };
    let finished_at = ops::now();
    let (outcome, desired, took) = match ran {
        Ran::Fenced => {
            tracing::warn!(adapter = name, "a newer leader drives the backends; leaving the operation to it");
            return;
        }
        Ran::Refused(error) => (Outcome::Failed { error, finished_at }, None, Vec::new()),
        Ran::Took { hot_swap, backends, took, desired } => {
            (Outcome::Done { hot_swap, backends, finished_at }, Some(desired), took)
        }
    };
    let failed = matches!(outcome, Outcome::Failed { .. });
    let record = |outcome: Outcome| {
        let done = Operation { outcome: Some(outcome), ..op.clone() };
        serde_json::to_string(&done).map(|v| Write::put(ops::key(name), Expect::At(revision), v))
    };
    let Ok(finish) = record(outcome) else { return };
    let mut writes = vec![finish];
    writes.extend(desired);
    match gw.replica().commit(writes).await {
        Ok(_) => tracing::info!(adapter = name, tenant = %op.requested_by, failed, "adapter operation finished"),
        Err(StoreError::Conflict { key }) if key == loras::key(name) => {
            // The record changed under the operation (a gateway of an earlier version wrote it):
            // put the backends back, and say so.
            undo(gw, &op.action, &took, fence).await;
            let error = Error::new(
                Code::ChangedConcurrently,
                format!(
                    "LoRA adapter '{name}' was changed by another request while this one ran; read it again and retry"
                ),
            );
            if let Ok(w) = record(Outcome::Failed { error, finished_at }) {
                let _ = gw.replica().commit(vec![w]).await;
            }
        }
        Err(StoreError::Conflict { .. }) => {
            // The record was removed or replaced: nobody waits for this outcome.
            undo(gw, &op.action, &took, fence).await;
        }
        Err(e) => {
            // Left pending: the next sweep (or the next leader) runs it again once the store
            // answers, and the reconcilers leave its adapter alone meanwhile.
            tracing::warn!(adapter = name, error = %e, "cannot record an adapter operation's outcome; it will run again");
        }
    }
}

/// The error for a backend's refusal of an adapter operation.
pub fn refusal(backend: &str, e: &UpstreamError) -> Error {
    let message = format!("backend {backend}: {}", e.message);
    let code = match e.code {
        UpstreamCode::InvalidArgument => Code::InvalidAdapter,
        UpstreamCode::NotFound => Code::AdapterSourceNotFound,
        UpstreamCode::PermissionDenied => Code::AdapterSourceDenied,
        UpstreamCode::FailedPrecondition => Code::AdapterBusy,
        UpstreamCode::ResourceExhausted => Code::BackendResourceExhausted,
        UpstreamCode::Unavailable | UpstreamCode::Timeout | UpstreamCode::Fenced => Code::BackendUnavailable,
        UpstreamCode::Other => Code::BackendError,
    };
    Error::new(code, message)
}

/// Whether a backend's error is about the adapter (the same everywhere) rather than that
/// backend's condition.
fn is_refusal(e: &UpstreamError) -> bool {
    matches!(
        e.code,
        UpstreamCode::InvalidArgument
            | UpstreamCode::NotFound
            | UpstreamCode::PermissionDenied
            | UpstreamCode::FailedPrecondition
    )
}

fn no_backend() -> Error {
    Error::new(Code::NoBackend, "no backend is healthy; nothing was changed")
}

async fn load(gw: &Arc<Gateway>, lora: &DesiredLora, expect: Expect, fence: u64) -> Ran {
    let (mut healthy, mut results) = split_by_health(gw);
    // Only where it is placed; the reconcilers unload it from backends that lose their copy.
    let placed = crate::cluster::placement(&lora.name, lora.replicas, &gw.views());
    healthy.retain(|(id, _)| placed.contains(id));
    if lora.replicas.is_some() {
        // Its copies go to healthy backends: one that is down is not waiting for one.
        results.clear();
    }
    if healthy.is_empty() {
        return Ran::Refused(no_backend());
    }
    let request = load_request(gw, lora, fence);
    let calls = healthy.iter().map(|(id, backend)| {
        let request = request.clone();
        async move { (id.clone(), backend.load_adapter(request).await) }
    });
    let answers = join_all(calls).await;
    let took: Vec<String> = answers.iter().filter(|(_, r)| r.is_ok()).map(|(id, _)| id.clone()).collect();
    if answers.iter().any(|(_, r)| matches!(r, Err(e) if e.code == UpstreamCode::Fenced)) {
        return Ran::Fenced;
    }
    let previous = gw.loras.get(&lora.name);
    let undo_action = Action::Load { lora: lora.clone() };
    if let Some((id, e)) = answers.iter().find_map(|(id, r)| match r {
        Err(e) if is_refusal(e) => Some((id, e.clone())),
        _ => None,
    }) {
        undo_load(gw, &took, previous.as_ref(), &lora.name, fence).await;
        return Ran::Refused(refusal(id, &e));
    }
    if took.is_empty() {
        let refused = answers.iter().find_map(|(id, r)| r.as_ref().err().map(|e| refusal(id, e)));
        return Ran::Refused(refused.unwrap_or_else(no_backend));
    }
    let desired = match loras::put_write(lora, expect) {
        Ok(w) => w,
        Err(e) => {
            undo(gw, &undo_action, &took, fence).await;
            return Ran::Refused(Error::new(Code::StateUnavailable, format!("cannot record the adapter: {e}")));
        }
    };
    let mut hot_swap = false;
    for (id, answer) in answers {
        let applied = match answer {
            Ok(r) if r.already_loaded => Applied::AlreadyLoaded,
            Ok(r) => {
                hot_swap |= r.hot_swap;
                if let Some(info) = r.adapter {
                    gw.with_view(&id, |v| v.loaded(info));
                }
                Applied::Loaded { hot_swap: r.hot_swap, fetched: r.fetched, warnings: r.warnings }
            }
            Err(e) => Applied::Pending { reason: e.message },
        };
        results.push(BackendResult { backend: id, applied });
    }
    results.sort_by(|a, b| a.backend.cmp(&b.backend));
    Ran::Took { hot_swap, backends: results, took, desired }
}

async fn unload(gw: &Arc<Gateway>, lora: &DesiredLora, expect: Expect, fence: u64) -> Ran {
    let name = lora.name.as_str();
    let (healthy, mut results) = split_by_health(gw);
    let calls =
        healthy.iter().map(|(id, backend)| async move { (id.clone(), backend.unload_adapter(name, fence).await) });
    let answers = join_all(calls).await;
    if answers.iter().any(|(_, r)| matches!(r, Err(e) if e.code == UpstreamCode::Fenced)) {
        return Ran::Fenced;
    }
    // NOT_FOUND: the backend does not have it (it restarted, or never got it): as good as unloaded.
    let gone =
        |r: &Result<(), UpstreamError>| matches!(r, Ok(()) | Err(UpstreamError { code: UpstreamCode::NotFound, .. }));
    let took: Vec<String> = answers.iter().filter(|(_, r)| gone(r)).map(|(id, _)| id.clone()).collect();
    if let Some((id, e)) = answers.iter().find_map(|(id, r)| match r {
        Err(e) if e.code == UpstreamCode::FailedPrecondition => Some((id, e.clone())),
        _ => None,
    }) {
        undo(gw, &Action::Unload { lora: lora.clone() }, &took, fence).await;
        return Ran::Refused(refusal(id, &e));
    }
    for (id, answer) in answers {
        let applied = if gone(&answer) {
            gw.with_view(&id, |v| v.unloaded(name));
            Applied::Unloaded
        } else {
            // The reconcilers unload it there when it answers: it is no longer desired.
            Applied::Pending { reason: answer.err().map(|e| e.message).unwrap_or_default() }
        };
        results.push(BackendResult { backend: id, applied });
    }
    results.sort_by(|a, b| a.backend.cmp(&b.backend));
    Ran::Took { hot_swap: false, backends: results, took, desired: Write::delete(loras::key(name), expect) }
}

/// Puts the backends in `took` back as they were before `action`.
async fn undo(gw: &Arc<Gateway>, action: &Action, took: &[String], fence: u64) {
    match action {
        Action::Load { lora } => {
            let previous = gw.loras.get(&lora.name);
            undo_load(gw, took, previous.as_ref(), &lora.name, fence).await;
        }
        Action::Unload { lora } => {
            let calls = took.iter().filter_map(|id| gw.members.upstream(id)).map(|backend| {
                async move {
                    if let Err(e) = backend.load_adapter(load_request(gw, lora, fence)).await {
                        tracing::warn!(backend = backend.address(), adapter = %lora.name, error = %e, "cannot undo an unload");
                    }
                }
            });
            join_all(calls).await;
        }
    }
}

/// Puts the backends in `took` back as they were before a load that did not go through.
async fn undo_load(gw: &Gateway, took: &[String], previous: Option<&DesiredLora>, name: &str, fence: u64) {
    let calls = took.iter().filter_map(|id| gw.members.upstream(id)).map(|backend| {
        async move {
            let r = match previous {
                Some(p) => backend.load_adapter(load_request(gw, p, fence)).await.map(|_| ()),
                None => backend.unload_adapter(name, fence).await,
            };
            if let Err(e) = r {
                // The reconciler converges it on its next round.
                tracing::warn!(backend = backend.address(), adapter = name, error = %e, "cannot undo a refused load");
            }
        }
    });
    join_all(calls).await;
}
