//! One task per backend: probe it (`grpc.health.v1`, `Info`, `ListAdapters`) every interval,
//! record what it said in the routing table, and make its adapters match the desired set:
//! load what it lacks (after a restart it lacks everything), unload what was removed while it
//! was unreachable. Nothing here needs an operator: a backend that restarts or appears is
//! brought up to date on its first healthy probe.

use crate::Gateway;
use crate::admin::load_request;
use crate::loras::DesiredLora;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;

/// How long a failed load of one adapter on one backend waits before it is tried again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

/// Starts the probe-and-reconcile task of every backend.
pub fn spawn(gw: Arc<Gateway>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..gw.backends.len())
        .map(|i| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(gw.options.probe_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failures = Failures::default();
                loop {
                    tick.tick().await;
                    round(&gw, i, &mut failures).await;
                }
            })
        })
        .collect()
}

/// When each adapter last failed to load on this backend.
#[derive(Debug, Default)]
pub struct Failures(HashMap<String, Instant>);

impl Failures {
    fn may_retry(&self, name: &str) -> bool {
        self.0.get(name).is_none_or(|at| at.elapsed() >= RETRY_FAILED_AFTER)
    }
}

/// One probe of backend `i`, then (if healthy) one reconciliation.
pub async fn round(gw: &Arc<Gateway>, i: usize, failures: &mut Failures) {
    let backend = gw.backends[i].clone();
    let address = backend.address().to_string();
    let probe = backend.probe().await;
    let (was, now) = match probe {
        Ok(p) => {
            if p.serving && !p.info.model.is_empty() {
                gw.set_base_model(&p.info.model);
            }
            gw.with_view(i, |v| {
                let was = v.healthy;
                v.observe(p.serving, p.info, p.adapters);
                (was, v.healthy)
            })
        }
        Err(e) => gw.with_view(i, |v| {
            let was = v.healthy;
            v.fail(e.message.clone());
            (was, false)
        }),
    }
    .unwrap_or((false, false));
    gw.metrics.backend_health(&address, now);
    match (was, now) {
        (false, true) => tracing::info!(backend = %address, "backend is healthy"),
        (true, false) => {
            let reason = gw.read_view(i, |v| v.last_error.clone()).flatten().unwrap_or_default();
            tracing::warn!(backend = %address, %reason, "backend is unhealthy");
        }
        _ => {}
    }
    if now {
        converge(gw, i, failures).await;
    }
}

/// Whether the backend's listing already satisfies `lora`: the same source (and pin), not failed.
fn satisfied(listed: Option<&pb::AdapterInfo>, lora: &DesiredLora) -> bool {
    listed.is_some_and(|a| {
        a.uri == lora.uri
            && a.state() != pb::AdapterState::Failed
            && lora.sha256.as_ref().is_none_or(|pin| a.sha256.is_empty() || *pin == a.sha256)
    })
}

async fn converge(gw: &Arc<Gateway>, i: usize, failures: &mut Failures) {
    if let Err(e) = gw.loras.refresh() {
        tracing::warn!(error = %e, "cannot re-read the adapter state file; using the last good copy");
    }
    let backend = gw.backends[i].clone();
    for lora in gw.loras.list() {
        let listed = gw.read_view(i, |v| v.adapters.get(&lora.name).cloned()).flatten();
        if satisfied(listed.as_ref(), &lora) || !failures.may_retry(&lora.name) {
            continue;
        }
        let turn = gw.turn(&lora.name);
        let _turn = turn.lock().await;
        // The API may have changed it while this waited for the turn.
        if gw.loras.get(&lora.name).as_ref() != Some(&lora) {
            continue;
        }
        match backend.load_adapter(load_request(gw, &lora)).await {
            Ok(r) => {
                failures.0.remove(&lora.name);
                tracing::info!(backend = backend.address(), adapter = %lora.name, fetched = r.fetched, "re-applied adapter");
                if let Some(info) = r.adapter {
                    gw.with_view(i, |v| v.adapters.insert(info.name.clone(), info));
                }
            }
            Err(e) => {
                failures.0.insert(lora.name.clone(), Instant::now());
                tracing::warn!(backend = backend.address(), adapter = %lora.name, error = %e, "cannot re-apply adapter");
                if e.is_backend_failure() {
                    return;
                }
            }
        }
    }
    for name in gw.loras.removed() {
        let listed = gw.read_view(i, |v| v.adapters.contains_key(&name)).unwrap_or(false);
        if !listed {
            continue;
        }
        let turn = gw.turn(&name);
        let _turn = turn.lock().await;
        if !gw.loras.removed().contains(&name) {
            continue;
        }
        match backend.unload_adapter(&name).await {
            Ok(()) => {
                tracing::info!(backend = backend.address(), adapter = %name, "unloaded a removed adapter");
                gw.with_view(i, |v| v.adapters.remove(&name));
            }
            Err(e) => {
                tracing::warn!(backend = backend.address(), adapter = %name, error = %e, "cannot unload a removed adapter")
            }
        }
    }
}
