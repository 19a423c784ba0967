//! The adapter load API's operations, independent of HTTP: check the caller's right to them
//! ([`crate::authz`]), record the operation in the state store before any backend is called
//! ([`ops`]), and wait for the leading gateway to run it ([`execute`]) and record its outcome.
//!
//! So an operation outlives whoever asked for it: a client that goes away during a long
//! download, or a gateway that dies, leaves a recorded operation that the leader finishes, never
//! an adapter no gateway knows about. Two requests changing one adapter at once cannot both go
//! through: the second is told (409) while the first is pending, and an outcome is recorded
//! only if the adapter's record is still the one the operation was authorised against.
//!
//! A load that a backend refuses (the adapter does not fit, its source does not exist) is undone
//! on the backends that took it. Backends that are down are reported as `pending`; the
//! reconcilers bring them up to date when they come back.

pub mod execute;
pub mod ops;

use crate::Gateway;
use crate::auth::{Principal, Scope};
use crate::error::{Code, Error};
use crate::loras::{self, DesiredLora};
use crate::store::{Expect, StoreError, Write};
use crate::upstream::{LoadCall, Upstream};
use ops::{Action, Operation, Outcome};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How long the gateway that took an adapter request waits for its outcome before answering
/// that it is still running (the operation goes on).
pub const OUTCOME_WAIT: Duration = Duration::from_secs(600);

/// What one backend did with an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Applied {
    Loaded {
        hot_swap: bool,
        fetched: bool,
        warnings: Vec<String>,
    },
    AlreadyLoaded,
    Unloaded,
    /// The backend is down; the change reaches it when it is healthy again.
    Pending {
        reason: String,
    },
}

/// One backend's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendResult {
    pub backend: String,
    #[serde(flatten)]
    pub applied: Applied,
}

/// A load request, as the API takes it.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub name: String,
    pub uri: String,
    pub sha256: Option<String>,
    /// Replace an adapter of the same name loaded from another source.
    pub hot_swap: bool,
    /// Let every configured tenant use it (`None`: as it was, or private for a new adapter).
    pub shared: Option<bool>,
    /// How many backends keep it (`None`: as it was, or all for a new adapter).
    pub replicas: Option<u32>,
    /// The tenant that owns it (`None`: the caller for a new adapter). Only an admin names
    /// another tenant; an existing adapter's owner never changes.
    pub owner: Option<String>,
    /// The manifest that declares it (`switchyard apply`).
    pub declared: Option<loras::Declaration>,
}

/// What a successful load did.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    pub lora: DesiredLora,
    /// The name was already desired from the same source.
    pub already_loaded: bool,
    pub hot_swap: bool,
    pub backends: Vec<BackendResult>,
}

/// The backend call that loads `lora`, bounded to the `load_prefixes` of the tenant whose grant
/// admitted its source: the backend checks them again on the resolved location. A tenant no
/// longer configured bounds it to nothing, so the backend refuses it.
pub(crate) fn load_request(gw: &Gateway, lora: &DesiredLora, fence: u64) -> LoadCall {
    let allowed_prefixes = gw.tenants.get(lora.loader()).map(|t| t.load_prefixes.clone()).unwrap_or_default();
    LoadCall { name: lora.name.clone(), uri: lora.uri.clone(), sha256: lora.sha256.clone(), allowed_prefixes, fence }
}

/// A backend an operation is applied to: its address and its client.
pub(crate) type Target = (String, Arc<dyn Upstream>);

/// The healthy backends, and results for the others.
pub(crate) fn split_by_health(gw: &Gateway) -> (Vec<Target>, Vec<BackendResult>) {
    let mut healthy = Vec::new();
    let mut pending = Vec::new();
    for v in gw.views() {
        match gw.members.upstream(&v.address) {
            Some(upstream) if v.healthy => healthy.push((v.address, upstream)),
            _ => {
                let reason = v.last_error.unwrap_or_else(|| "unhealthy".into());
                pending.push(BackendResult { backend: v.address, applied: Applied::Pending { reason } });
            }
        }
    }
    (healthy, pending)
}

fn state_error(e: &StoreError) -> Error {
    Error::new(
        Code::StateUnavailable,
        format!(
            "cannot record the operation: {e}; a store that recovers within {}s may still apply it, so check GET /v1/loras before retrying (retrying the same request is safe)",
            ops::ACCEPT_WITHIN_S
        ),
    )
}

/// Records `action` on adapter `name` (authorised against the record at `expect`), then waits
/// for its outcome.
pub(crate) async fn run(gw: &Gateway, who: &str, action: Action, expect: Expect) -> Result<Outcome, Error> {
    let name = action.lora().name.clone();
    let op = Operation {
        id: format!("{:016x}", crate::random_u64()),
        action,
        expect: match expect {
            Expect::At(r) => Some(r),
            _ => None,
        },
        requested_by: who.to_string(),
        gateway: gw.leadership.holder().to_string(),
        requested_at: ops::now(),
        started: None,
        outcome: None,
    };
    let value = serde_json::to_string(&op).map_err(|e| Error::new(Code::StateUnavailable, e.to_string()))?;
    let mut changes = gw.replica().subscribe();
    // A finished operation's record (its requester gone before reading it) is replaced; a
    // pending one is another request in progress.
    let previous = match ops::read(&gw.replica().current(), &name) {
        Some((done, revision)) if done.outcome.is_some() => Expect::At(revision),
        _ => Expect::Absent,
    };
    let record = vec![Write::put(ops::key(&name), previous, value), Write::check(loras::key(&name), expect)];
    match gw.replica().commit(record).await {
        Ok(_) => {}
        Err(StoreError::Conflict { key }) if key == ops::key(&name) => {
            // Who asked for it is not said: it may be another tenant (an admin).
            return Err(Error::new(
                Code::OperationInProgress,
                format!("another operation on LoRA adapter '{name}' is in progress; retry when it is done"),
            ));
        }
        Err(StoreError::Conflict { .. }) => {
            return Err(Error::new(
                Code::ChangedConcurrently,
                format!("LoRA adapter '{name}' was changed by another request; read it again and retry"),
            ));
        }
        Err(e) => return Err(state_error(&e)),
    }
    let waited = tokio::time::timeout(OUTCOME_WAIT, async {
        loop {
            match ops::read(&gw.replica().current(), &name) {
                Some((recorded, revision)) if recorded.id == op.id => {
                    if let Some(outcome) = recorded.outcome {
                        // Read: the record has done its job (the leader removes it later if this fails).
                        let _ = gw.replica().commit(vec![Write::delete(ops::key(&name), Expect::At(revision))]).await;
                        return Ok(outcome);
                    }
                }
                _ => {
                    return Err(Error::new(
                        Code::OperationLost,
                        format!("the operation on LoRA adapter '{name}' was removed before it finished"),
                    ));
                }
            }
            if changes.changed().await.is_err() {
                return Err(Error::new(Code::OperationLost, "the gateway is shutting down"));
            }
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        Err(Error::new(
            Code::OperationTimeout,
            format!(
                "the operation on LoRA adapter '{name}' is still running after {}s; GET /v1/loras shows when it is done",
                OUTCOME_WAIT.as_secs()
            ),
        ))
    })
}

/// Whether any backend is healthy in this gateway's view.
fn any_healthy(gw: &Gateway) -> Result<(), Error> {
    if gw.views().iter().any(|v| v.healthy) {
        return Ok(());
    }
    Err(Error::new(Code::NoBackend, "no backend is healthy; nothing was changed"))
}

/// Loads (or hot-swaps) an adapter on every healthy backend and records it as desired.
pub async fn load(gw: &Arc<Gateway>, who: &Principal, req: LoadRequest) -> Result<LoadOutcome, Error> {
    who.require(Scope::LoraLoad)?;
    let caller = gw.caller(who)?;
    loras::validate_name(&req.name).map_err(|m| Error::invalid(m, Some("lora_name")))?;
    loras::validate_uri(&req.uri).map_err(|m| Error::invalid(m, Some("source.uri")))?;
    if req.replicas == Some(0) {
        return Err(Error::invalid("replicas must be at least 1 (omit it for every backend)", Some("replicas")));
    }
    let sha256 = req
        .sha256
        .as_deref()
        .map(loras::normalize_sha256)
        .transpose()
        .map_err(|m| Error::invalid(m, Some("sha256")))?;

    let (previous, expect) = gw.loras.get_versioned(&req.name);
    caller.check_load(&req.name, &req.uri, previous.as_ref())?;
    if let Some(owner) = &req.owner {
        if owner != caller.name && !caller.is_admin() {
            return Err(Error::new(
                Code::OwnerNotAllowed,
                format!("only an admin tenant loads adapters for another tenant ({owner:?})"),
            ));
        }
        if !gw.tenants.contains_key(owner) {
            let message = format!("owner {owner:?} is not a configured tenant");
            return Err(Error::new(Code::NoSuchTenant, message).at(Some("owner")));
        }
        if let Some(p) = previous.as_ref().filter(|p| p.owner != *owner) {
            return Err(Error::new(
                Code::AdapterOwnedByAnother,
                format!("LoRA adapter '{}' is owned by tenant {:?}, not {owner:?}", p.name, p.owner),
            ));
        }
    }
    // Ownership stays with whoever loaded the name first; an admin's hot swap keeps it.
    let owner = previous.as_ref().map(|p| p.owner.clone()).or(req.owner).unwrap_or_else(|| caller.name.to_string());
    let lora = DesiredLora {
        name: req.name.clone(),
        uri: loras::canonical_uri(&req.uri).to_string(),
        sha256,
        shared: req.shared.unwrap_or_else(|| previous.as_ref().is_some_and(|p| p.shared)),
        loaded_by: (owner != caller.name).then(|| caller.name.to_string()),
        owner,
        replicas: req.replicas.or_else(|| previous.as_ref().and_then(|p| p.replicas)),
        declared: req.declared.or_else(|| previous.as_ref().and_then(|p| p.declared.clone())),
    };
    let same_source =
        previous.as_ref().is_some_and(|p| loras::canonical_uri(&p.uri) == lora.uri && p.sha256 == lora.sha256);
    if let Some(p) = &previous
        && !same_source
        && !req.hot_swap
    {
        return Err(Error::new(
            Code::LoraExists,
            format!(
                "LoRA adapter '{}' is already loaded from {}; unload it first, or send \"hot_swap\": true to replace it",
                p.name, p.uri
            ),
        ));
    }
    any_healthy(gw)?;
    match run(gw, caller.name, Action::Load { lora: lora.clone() }, expect).await? {
        Outcome::Done { hot_swap, backends, .. } => {
            tracing::info!(adapter = %lora.name, tenant = %who.tenant, hot_swap, "adapter loaded");
            Ok(LoadOutcome { lora, already_loaded: same_source, hot_swap, backends })
        }
        Outcome::Failed { error, .. } => Err(error),
    }
}

/// Unloads an adapter from every healthy backend and removes it from the desired set.
pub async fn unload(
    gw: &Arc<Gateway>,
    who: &Principal,
    name: &str,
) -> Result<(DesiredLora, Vec<BackendResult>), Error> {
    who.require(Scope::LoraUnload)?;
    let caller = gw.caller(who)?;
    let loras = gw.loras.snapshot();
    let lora = caller.check_unload(name, loras.get(name), &loras)?.clone();
    let (_, expect) = gw.loras.get_versioned(name);
    match run(gw, caller.name, Action::Unload { lora: lora.clone() }, expect).await? {
        Outcome::Done { backends, .. } => {
            tracing::info!(adapter = name, tenant = %who.tenant, "adapter unloaded");
            Ok((lora, backends))
        }
        Outcome::Failed { error, .. } => Err(error),
    }
}

/// An adapter as the list API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ListedLora {
    pub lora_name: String,
    pub lora_id: u32,
    pub source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub owner: String,
    /// Every configured tenant may use it.
    pub shared: bool,
    /// How many backends keep it (absent: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The manifest that declares it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub declared: Option<loras::Declaration>,
    /// Backends where it is resident now.
    pub ready: usize,
    /// Per backend: its state for this adapter (`resident`, `evicted`, … or `absent`).
    pub backends: Vec<BackendState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub uri: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendState {
    pub backend: String,
    pub healthy: bool,
    /// Why the backend is not healthy (a failed probe, or what it reports), when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A backend as the list API shows it: its address, whether requests go there, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct ListedBackend {
    pub backend: String,
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
}

/// The fleet's backends, for callers who may read the adapter listing (which names them too).
pub fn backends(gw: &Gateway, who: &Principal) -> Result<Vec<ListedBackend>, Error> {
    who.require(Scope::LoraRead)?;
    Ok(gw
        .views()
        .iter()
        .map(|v| ListedBackend {
            backend: v.address.clone(),
            healthy: v.healthy,
            unhealthy_reason: (!v.healthy).then(|| v.reason()),
        })
        .collect())
}

/// An adapter operation as the list API shows it: pending, or finished and not yet read by
/// the gateway that took it (its client went away, or that gateway died).
#[derive(Debug, Clone, Serialize)]
pub struct ListedOperation {
    pub lora_name: String,
    pub action: &'static str,
    pub requested_by: String,
    pub requested_at: u64,
    /// The leader that runs it, once it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    /// `pending`, `done` or `failed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

/// The operations on adapters the caller may manage. Those who only use an adapter (shared
/// with them) do not see who changes it, or the backends' errors about its sources.
pub fn operations(gw: &Gateway, who: &Principal) -> Result<Vec<ListedOperation>, Error> {
    who.require(Scope::LoraRead)?;
    let caller = gw.caller(who)?;
    Ok(ops::all(&gw.replica().current())
        .into_iter()
        .filter(|(_, op, _)| caller.may_manage(op.action.lora()))
        .map(|(name, op, _)| ListedOperation {
            lora_name: name,
            action: match op.action {
                Action::Load { .. } => "load",
                Action::Unload { .. } => "unload",
            },
            requested_by: op.requested_by,
            requested_at: op.requested_at,
            started_by: op.started.map(|s| s.by),
            status: match &op.outcome {
                None => "pending",
                Some(Outcome::Done { .. }) => "done",
                Some(Outcome::Failed { .. }) => "failed",
            },
            error: match op.outcome {
                Some(Outcome::Failed { error, .. }) => Some(error),
                _ => None,
            },
        })
        .collect())
}

/// The desired adapters the caller may see (use or manage), with each backend's view of them.
pub fn list(gw: &Gateway, who: &Principal) -> Result<Vec<ListedLora>, Error> {
    who.require(Scope::LoraRead)?;
    let caller = gw.caller(who)?;
    let views = gw.views();
    Ok(gw
        .loras
        .list()
        .into_iter()
        .filter(|l| caller.may_see(l))
        .map(|l| {
            let backends: Vec<BackendState> = views
                .iter()
                .map(|v| {
                    let info = v.adapters.get(&l.name);
                    let state = info.map_or("absent", |a| a.state.as_str()).to_string();
                    let error = info.and_then(|a| a.error.clone()).unwrap_or_default();
                    let unhealthy_reason = (!v.healthy).then(|| v.reason());
                    BackendState { backend: v.address.clone(), healthy: v.healthy, unhealthy_reason, state, error }
                })
                .collect();
            ListedLora {
                lora_name: l.name.clone(),
                lora_id: l.lora_id(),
                ready: backends.iter().filter(|b| b.healthy && b.state == "resident").count(),
                backends,
                source: Source { uri: l.uri },
                sha256: l.sha256,
                owner: l.owner,
                shared: l.shared,
                replicas: l.replicas,
                declared: l.declared,
            }
        })
        .collect())
}
