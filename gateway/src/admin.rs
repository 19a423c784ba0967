//! The adapter load API's operations, independent of HTTP: check the caller's right to them
//! ([`crate::authz`]), apply them to every healthy backend at once, and record the desired set only when the
//! operation took. A load that a backend refuses (the adapter does not fit, its source does not
//! exist) is undone on the backends that took it, so no backend keeps an adapter the gateway
//! does not list. Backends that are down are reported as `pending`; the reconcilers apply the
//! desired set to them when they come back.

use crate::Gateway;
use crate::auth::{Principal, Scope};
use crate::loras::{self, DesiredLora};
use crate::openai::ApiError;
use crate::upstream::{UpstreamCode, UpstreamError};
use futures::future::join_all;
use serde::Serialize;
use std::sync::Arc;
use switchyard_proto::v1 as pb;

/// What one backend did with an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

/// The answer for a backend's refusal of an adapter operation.
pub fn refusal(backend: &str, e: &UpstreamError) -> ApiError {
    let message = format!("backend {backend}: {}", e.message);
    match e.code {
        UpstreamCode::InvalidArgument => ApiError::unprocessable(message, "invalid_adapter"),
        UpstreamCode::NotFound => ApiError::unprocessable(message, "adapter_source_not_found"),
        UpstreamCode::PermissionDenied => ApiError::forbidden(message, "adapter_source_denied"),
        UpstreamCode::FailedPrecondition => ApiError::conflict(message, "adapter_busy"),
        UpstreamCode::ResourceExhausted => {
            ApiError::unavailable(message, crate::RETRY_AFTER_S).with_code("backend_resource_exhausted")
        }
        UpstreamCode::Unavailable | UpstreamCode::Timeout => {
            ApiError::unavailable(message, crate::RETRY_AFTER_S).with_code("backend_unavailable")
        }
        UpstreamCode::Other => ApiError::server(502, message, "backend_error"),
    }
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

/// The backend call that loads `lora`, bounded to the `load_prefixes` of the tenant whose grant
/// admitted its source: the backend checks them again on the resolved location. A tenant no
/// longer configured bounds it to nothing, so the backend refuses it.
pub(crate) fn load_request(gw: &Gateway, lora: &DesiredLora) -> pb::LoadAdapterRequest {
    let prefixes = gw.tenants.get(lora.loader()).map(|t| t.load_prefixes.clone()).unwrap_or_default();
    pb::LoadAdapterRequest {
        name: lora.name.clone(),
        source: Some(pb::AdapterSource { uri: lora.uri.clone(), sha256: lora.sha256.clone().unwrap_or_default() }),
        scope: Some(pb::SourceScope { prefixes }),
    }
}

/// Indices of healthy backends, and results for the others.
fn split_by_health(gw: &Gateway) -> (Vec<usize>, Vec<BackendResult>) {
    let mut healthy = Vec::new();
    let mut pending = Vec::new();
    for (i, v) in gw.views().into_iter().enumerate() {
        if v.healthy {
            healthy.push(i);
        } else {
            let reason = v.last_error.unwrap_or_else(|| "unhealthy".into());
            pending.push(BackendResult { backend: v.address, applied: Applied::Pending { reason } });
        }
    }
    (healthy, pending)
}

fn no_backend() -> ApiError {
    ApiError::unavailable("no backend is healthy; nothing was changed", crate::RETRY_AFTER_S).with_code("no_backend")
}

/// Loads (or hot-swaps) an adapter on every healthy backend and records it as desired.
pub async fn load(gw: &Arc<Gateway>, who: &Principal, req: LoadRequest) -> Result<LoadOutcome, ApiError> {
    who.require(Scope::LoraLoad)?;
    let caller = gw.caller(who)?;
    loras::validate_name(&req.name).map_err(|m| ApiError::invalid(m, Some("lora_name")))?;
    loras::validate_uri(&req.uri).map_err(|m| ApiError::invalid(m, Some("source.uri")))?;
    let sha256 = req
        .sha256
        .as_deref()
        .map(loras::normalize_sha256)
        .transpose()
        .map_err(|m| ApiError::invalid(m, Some("sha256")))?;

    let turn = gw.turn(&req.name);
    let _turn = turn.lock().await;
    let previous = gw.loras.get(&req.name);
    caller.check_load(&req.name, &req.uri, previous.as_ref())?;
    let lora = DesiredLora {
        name: req.name.clone(),
        uri: req.uri,
        sha256,
        // Ownership stays with whoever loaded the name first; an admin's hot swap keeps it.
        owner: previous.as_ref().map_or_else(|| caller.name.to_string(), |p| p.owner.clone()),
        shared: req.shared.unwrap_or_else(|| previous.as_ref().is_some_and(|p| p.shared)),
        loaded_by: previous.as_ref().is_some_and(|p| p.owner != caller.name).then(|| caller.name.to_string()),
    };
    let same_source = previous.as_ref().is_some_and(|p| p.uri == lora.uri && p.sha256 == lora.sha256);
    if let Some(p) = &previous
        && !same_source
        && !req.hot_swap
    {
        return Err(ApiError::conflict(
            format!(
                "LoRA adapter '{}' is already loaded from {}; unload it first, or send \"hot_swap\": true to replace it",
                p.name, p.uri
            ),
            "lora_exists",
        ));
    }

    let (healthy, mut results) = split_by_health(gw);
    if healthy.is_empty() {
        return Err(no_backend());
    }
    let request = load_request(gw, &lora);
    let calls = healthy.iter().map(|&i| {
        let backend = gw.backends[i].clone();
        let request = request.clone();
        async move { (i, backend.load_adapter(request).await) }
    });
    let answers = join_all(calls).await;

    let refused = answers.iter().find_map(|(i, r)| match r {
        Err(e) if is_refusal(e) => Some((*i, e.clone())),
        _ => None,
    });
    let took: Vec<usize> = answers.iter().filter(|(_, r)| r.is_ok()).map(|(i, _)| *i).collect();
    if let Some((i, e)) = refused {
        undo_load(gw, &took, previous.as_ref(), &lora.name).await;
        return Err(refusal(gw.backends[i].address(), &e));
    }
    if took.is_empty() {
        let (i, e) = answers.iter().find_map(|(i, r)| r.as_ref().err().map(|e| (*i, e))).ok_or_else(no_backend)?;
        return Err(refusal(gw.backends[i].address(), e));
    }
    if previous.as_ref() != Some(&lora)
        && let Err(e) = gw.loras.put(lora.clone())
    {
        undo_load(gw, &took, previous.as_ref(), &lora.name).await;
        return Err(ApiError::server(500, format!("cannot record the adapter: {e}"), "state_write_failed"));
    }

    let mut hot_swap = false;
    for (i, answer) in answers {
        let applied = match answer {
            Ok(r) if r.already_loaded => Applied::AlreadyLoaded,
            Ok(r) => {
                hot_swap |= r.hot_swap;
                if let Some(info) = r.adapter {
                    gw.with_view(i, |v| v.adapters.insert(info.name.clone(), info));
                }
                Applied::Loaded { hot_swap: r.hot_swap, fetched: r.fetched, warnings: r.warnings }
            }
            Err(e) => Applied::Pending { reason: e.message },
        };
        results.push(BackendResult { backend: gw.backends[i].address().to_string(), applied });
    }
    results.sort_by(|a, b| a.backend.cmp(&b.backend));
    tracing::info!(adapter = %lora.name, tenant = %who.tenant, hot_swap, "adapter loaded");
    Ok(LoadOutcome { lora, already_loaded: same_source, hot_swap, backends: results })
}

/// Puts the backends in `took` back as they were before a load that did not go through.
async fn undo_load(gw: &Gateway, took: &[usize], previous: Option<&DesiredLora>, name: &str) {
    let undo = took.iter().map(|&i| {
        let backend = gw.backends[i].clone();
        async move {
            let r = match previous {
                Some(p) => backend.load_adapter(load_request(gw, p)).await.map(|_| ()),
                None => backend.unload_adapter(name).await,
            };
            if let Err(e) = r {
                // The reconciler converges it on its next round.
                tracing::warn!(backend = backend.address(), adapter = name, error = %e, "cannot undo a refused load");
            }
        }
    });
    join_all(undo).await;
}

/// Unloads an adapter from every healthy backend and removes it from the desired set.
pub async fn unload(
    gw: &Arc<Gateway>,
    who: &Principal,
    name: &str,
) -> Result<(DesiredLora, Vec<BackendResult>), ApiError> {
    who.require(Scope::LoraUnload)?;
    let caller = gw.caller(who)?;
    let turn = gw.turn(name);
    let _turn = turn.lock().await;
    let loras = gw.loras.snapshot();
    let lora = caller.check_unload(name, loras.get(name), &loras)?.clone();
    let (healthy, mut results) = split_by_health(gw);
    let calls = healthy.iter().map(|&i| {
        let backend = gw.backends[i].clone();
        async move { (i, backend.unload_adapter(name).await) }
    });
    let answers = join_all(calls).await;
    // NOT_FOUND: the backend does not have it (it restarted, or never got it): as good as unloaded.
    let gone =
        |r: &Result<(), UpstreamError>| matches!(r, Ok(()) | Err(UpstreamError { code: UpstreamCode::NotFound, .. }));
    if let Some((i, e)) = answers.iter().find_map(|(i, r)| match r {
        Err(e) if e.code == UpstreamCode::FailedPrecondition => Some((*i, e.clone())),
        _ => None,
    }) {
        let took: Vec<usize> = answers.iter().filter(|(_, r)| gone(r)).map(|(i, _)| *i).collect();
        undo_unload(gw, &took, &lora).await;
        return Err(refusal(gw.backends[i].address(), &e));
    }
    gw.loras
        .remove(name)
        .map_err(|e| ApiError::server(500, format!("cannot record the unload: {e}"), "state_write_failed"))?;
    let mut everywhere = results.is_empty();
    for (i, answer) in answers {
        let applied = if gone(&answer) {
            gw.with_view(i, |v| v.adapters.remove(name));
            Applied::Unloaded
        } else {
            everywhere = false;
            Applied::Pending { reason: answer.err().map(|e| e.message).unwrap_or_default() }
        };
        results.push(BackendResult { backend: gw.backends[i].address().to_string(), applied });
    }
    if everywhere && let Err(e) = gw.loras.forget_removed(name) {
        tracing::warn!(adapter = name, error = %e, "cannot update the adapter state file");
    }
    results.sort_by(|a, b| a.backend.cmp(&b.backend));
    tracing::info!(adapter = name, tenant = %who.tenant, "adapter unloaded");
    Ok((lora, results))
}

async fn undo_unload(gw: &Gateway, took: &[usize], lora: &DesiredLora) {
    let undo = took.iter().map(|&i| {
        let backend = gw.backends[i].clone();
        async move {
            if let Err(e) = backend.load_adapter(load_request(gw, lora)).await {
                tracing::warn!(backend = backend.address(), adapter = %lora.name, error = %e, "cannot undo an unload");
            }
        }
    });
    join_all(undo).await;
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
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The desired adapters the caller may see (use or manage), with each backend's view of them.
pub fn list(gw: &Gateway, who: &Principal) -> Result<Vec<ListedLora>, ApiError> {
    who.require(Scope::LoraRead)?;
    let caller = gw.caller(who)?;
    let views = gw.views();
    Ok(gw
        .loras
        .list()
        .into_iter()
        .filter(|l| caller.may_see(l))
        .map(|l| ListedLora {
            lora_name: l.name.clone(),
            lora_id: l.lora_id(),
            backends: views
                .iter()
                .map(|v| {
                    let info = v.adapters.get(&l.name);
                    let state = info.map_or("absent".to_string(), |a| {
                        a.state().as_str_name().trim_start_matches("ADAPTER_STATE_").to_ascii_lowercase()
                    });
                    let error = info.map(|a| a.error.clone()).unwrap_or_default();
                    BackendState { backend: v.address.clone(), healthy: v.healthy, state, error }
                })
                .collect(),
            source: Source { uri: l.uri },
            sha256: l.sha256,
            owner: l.owner,
            shared: l.shared,
        })
        .collect())
}
