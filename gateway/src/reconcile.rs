//! One task per backend: probe it (`grpc.health.v1`, `Info`, `ListAdapters`) every interval and
//! record what it said in the routing table. On the leading gateway ([`crate::leader`]) the task
//! also makes the backend's adapters match the desired set: it loads what the backend lacks
//! (after a restart it lacks everything) and unloads what no gateway knows about (removed while
//! the backend was unreachable, or left by an operation that never finished), leaving alone
//! adapters with an operation pending. Nothing here needs an operator: a backend that restarts
//! or appears is brought up to date on its first healthy probe.
//!
//! With discovery, one more task follows the backends' registrations in the state store
//! ([`switchyard_fleet::registration`]): a backend that registers is added (and probed), one
//! whose registration goes (its lease expired, or it withdrew) leaves the routing table at once.

use crate::Gateway;
use crate::admin::{load_request, ops};
use crate::loras::DesiredLora;
use crate::upstream::{AdapterState, AdapterStatus, UpstreamCode};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a failed load of one adapter on one backend waits before it is tried again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(30);

/// Starts the probe-and-reconcile task of every backend, and the discovery task when the
/// gateway discovers backends. The probe tasks stop with [`crate::members::Members::stop`].
pub fn spawn(gw: Arc<Gateway>) -> Vec<tokio::task::JoinHandle<()>> {
    for id in gw.members.ids() {
        start_probe(&gw, &id);
    }
    gw.discovery().is_some().then(|| tokio::spawn(discover(gw.clone()))).into_iter().collect()
}

/// Starts probing backend `id` every interval, for as long as it is a member.
fn start_probe(gw: &Arc<Gateway>, id: &str) {
    let (me, member) = (gw.clone(), id.to_string());
    let task = tokio::spawn(async move {
        let id = member;
        let probes = async {
            let mut tick = tokio::time::interval(me.options.probe_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures = Failures::default();
            loop {
                tick.tick().await;
                round(&me, &id, &mut failures).await;
            }
        };
        // The backend's prefix cache is followed by the same task, so it stops with it.
        match me.options.prefix_routing {
            true => futures::future::join(probes, crate::prefix::follow(me.clone(), id.clone())).await.0,
            false => probes.await,
        }
    });
    gw.members.set_probe(id, task.abort_handle());
}

/// Follows the registrations in the store: adds the backends that register, removes those
/// whose registration is gone.
async fn discover(gw: Arc<Gateway>) {
    use switchyard_fleet::registration::{BackendRecord, KEY_PREFIX};
    let Some(connect) = gw.discovery().cloned() else { return };
    let mut changes = gw.replica().subscribe();
    loop {
        let snapshot = gw.replica().current();
        let registered: std::collections::BTreeSet<String> = snapshot
            .under(KEY_PREFIX)
            .filter_map(|(key, entry)| match serde_json::from_str::<BackendRecord>(&entry.value) {
                Ok(r) => Some(r.address),
                Err(e) => {
                    tracing::warn!(key = %format!("{KEY_PREFIX}{key}"), error = %e, "ignoring a backend registration this gateway cannot read");
                    None
                }
            })
            .collect();
        for address in &registered {
            if gw.members.upstream(address).is_some() {
                continue;
            }
            match connect.connect(address) {
                Ok(upstream) => {
                    if gw.members.add(upstream, true) {
                        tracing::info!(backend = %address, "a backend registered: routing to it once it is healthy");
                        start_probe(&gw, address);
                    }
                }
                Err(e) => tracing::warn!(backend = %address, error = %e, "cannot use a registered backend"),
            }
        }
        for id in gw.members.registered() {
            if !registered.contains(&id) && gw.members.remove_registered(&id) {
                gw.prefixes.forget(&id);
                tracing::warn!(backend = %id, "a backend's registration is gone: it left the routing table");
                gw.metrics.backend_health(&id, false);
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// When each adapter last failed to load on this backend.
#[derive(Debug, Default)]
pub struct Failures(HashMap<String, Instant>);

impl Failures {
    fn may_retry(&self, name: &str) -> bool {
        self.0.get(name).is_none_or(|at| at.elapsed() >= RETRY_FAILED_AFTER)
    }
}

/// One probe of backend `id`, then (if healthy and this gateway leads) one reconciliation.
pub async fn round(gw: &Arc<Gateway>, id: &str, failures: &mut Failures) {
    let Some(backend) = gw.members.upstream(id) else { return };
    let address = backend.address().to_string();
    let since = gw.read_view(id, |v| v.probe_start()).unwrap_or_default();
    let probe = backend.probe().await;
    let (was, now) = match probe {
        Ok(p) => {
            if p.serving && !p.info.model.is_empty() {
                gw.set_base_model(&p.info.model);
            }
            gw.with_view(id, |v| {
                let was = v.healthy;
                v.observe(since, p.serving, p.info, p.adapters);
                (was, v.healthy)
            })
        }
        Err(e) => gw.with_view(id, |v| {
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
            let reason = gw.read_view(id, |v| v.last_error.clone()).flatten().unwrap_or_default();
            tracing::warn!(backend = %address, %reason, "backend is unhealthy");
        }
        _ => {}
    }
    if now && let Some(fence) = gw.leadership.token() {
        converge(gw, id, failures, fence).await;
    }
}

/// Whether the backend's listing already satisfies `lora`: the same source (and pin), not failed.
fn satisfied(listed: Option<&AdapterStatus>, lora: &DesiredLora) -> bool {
    listed.is_some_and(|a| {
        crate::loras::canonical_uri(&a.uri) == crate::loras::canonical_uri(&lora.uri)
            && a.state != AdapterState::Failed
            && lora.sha256.as_ref().is_none_or(|pin| a.sha256.as_ref().is_none_or(|d| d == pin))
    })
}

async fn converge(gw: &Arc<Gateway>, id: &str, failures: &mut Failures, fence: u64) {
    let Some(backend) = gw.members.upstream(id) else { return };
    let pending: std::collections::HashSet<String> = ops::all(&gw.replica().current())
        .into_iter()
        .filter(|(_, op, _)| op.outcome.is_none())
        .map(|(name, ..)| name)
        .collect();
    let views = gw.views();
    let mut unplaced = Vec::new();
    for lora in gw.loras.list() {
        if !crate::cluster::placement(&lora.name, lora.replicas, &views).iter().any(|p| p == id) {
            unplaced.push(lora.name.clone());
            continue;
        }
        let listed = gw.read_view(id, |v| v.adapters.get(&lora.name).cloned()).flatten();
        if satisfied(listed.as_ref(), &lora) || !failures.may_retry(&lora.name) || pending.contains(&lora.name) {
            continue;
        }
        let turn = gw.turn(&lora.name);
        let _turn = turn.lock().await;
        // The API may have changed it while this waited for the turn.
        if gw.loras.get(&lora.name).as_ref() != Some(&lora) {
            continue;
        }
        gw.metrics.reconcile_call(backend.address(), "load");
        match backend.load_adapter(load_request(gw, &lora, fence)).await {
            Ok(r) => {
                failures.0.remove(&lora.name);
                tracing::info!(backend = backend.address(), adapter = %lora.name, fetched = r.fetched, "re-applied adapter");
                if let Some(info) = r.adapter {
                    gw.with_view(id, |v| v.loaded(info));
                }
            }
            Err(e) if e.code == UpstreamCode::Fenced => return,
            Err(e) => {
                failures.0.insert(lora.name.clone(), Instant::now());
                tracing::warn!(backend = backend.address(), adapter = %lora.name, error = %e, "cannot re-apply adapter");
                if e.is_backend_failure() {
                    return;
                }
            }
        }
    }
    // What the backend has that no gateway knows about, or that is placed elsewhere. Not while
    // the copy is out of step with the store: it may be missing what another gateway just
    // recorded.
    if !gw.replica().in_step() {
        return;
    }
    let listed: Vec<String> = gw.read_view(id, |v| v.adapters.keys().cloned().collect()).unwrap_or_default();
    let keep = |name: &str| gw.loras.get(name).is_some() && !unplaced.iter().any(|u| u == name);
    for name in listed {
        if keep(&name) || pending.contains(&name) {
            continue;
        }
        let turn = gw.turn(&name);
        let _turn = turn.lock().await;
        let snapshot = gw.replica().current();
        if keep(&name) || ops::read(&snapshot, &name).is_some_and(|(op, _)| op.outcome.is_none()) {
            continue;
        }
        gw.metrics.reconcile_call(backend.address(), "unload");
        match backend.unload_adapter(&name, fence).await {
            Ok(()) => {
                tracing::info!(backend = backend.address(), adapter = %name, "unloaded an adapter not desired here");
                gw.with_view(id, |v| v.unloaded(&name));
            }
            Err(e) if e.code == UpstreamCode::NotFound => {
                gw.with_view(id, |v| v.unloaded(&name));
            }
            Err(e) => {
                tracing::warn!(backend = backend.address(), adapter = %name, error = %e, "cannot unload an adapter that is not desired");
                if e.is_backend_failure() || e.code == UpstreamCode::Fenced {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_written_with_a_trailing_slash_is_satisfied_by_the_backends_report() {
        let lora = DesiredLora::new("a", "s3://bucket/a/", "acme");
        let listed = AdapterStatus::new("a", "s3://bucket/a", AdapterState::Resident);
        assert!(satisfied(Some(&listed), &lora), "it would be reloaded at every probe");
        let other = AdapterStatus { uri: "s3://bucket/b".into(), ..listed };
        assert!(!satisfied(Some(&other), &lora));
    }
}
