//! The directory of `LoraAdapter` manifests the gateways watch (`--manifests`; in Kubernetes a
//! mounted ConfigMap, which works as it is). The leading gateway reads it every
//! [`POLL_INTERVAL`] and makes the desired set match it, through the same recorded operations
//! as the adapter API: it creates and updates what the directory declares and unloads what it
//! declared and no longer does. Other gateways only follow (one writer, as for every operation).
//!
//! A bad file refuses the whole set, so a half-edited ConfigMap never unloads anything; the set
//! applied last stays. An object whose `loraName` is already taken by an adapter the directory
//! did not declare (loaded through the API, or by `switchyard apply`) is refused by name. Each
//! declared adapter is bounded by its tenant's `load_prefixes`, as if the tenant had loaded it.

use crate::Gateway;
use crate::admin::ops::{Action, Outcome};
use crate::loras::{self, Declaration, DesiredLora, Origin};
use crate::manifest::{self, LoraAdapter};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often the leader reads the directory.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Who the operations of the directory are recorded as asked for by.
pub const REQUESTER: &str = "manifests";

/// Starts watching `dir`.
pub fn spawn(gw: Arc<Gateway>, dir: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_problem = String::new();
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            if gw.leadership().token().is_none() {
                continue;
            }
            let problems = sync(&gw, &dir).await;
            let report = problems.join("; ");
            if report != last_problem {
                if report.is_empty() {
                    tracing::info!(dir = %dir.display(), "the manifests are applied");
                } else {
                    tracing::warn!(dir = %dir.display(), problems = %report, "some manifests are not applied");
                }
                last_problem = report;
            }
        }
    })
}

/// The adapter `m` declares.
fn desired(m: &LoraAdapter) -> DesiredLora {
    DesiredLora {
        name: m.spec.lora_name.clone(),
        uri: loras::canonical_uri(&m.spec.source.uri).to_string(),
        sha256: m.spec.sha256.as_deref().and_then(|p| loras::normalize_sha256(p).ok()),
        owner: m.spec.tenant.clone(),
        shared: m.spec.shared,
        loaded_by: None,
        replicas: m.spec.replicas,
        declared: Some(Declaration { name: m.metadata.name.clone(), origin: Origin::Directory }),
    }
}

/// One pass over the directory. Returns what could not be applied, each naming its object.
pub async fn sync(gw: &Gateway, dir: &std::path::Path) -> Vec<String> {
    let manifests = match manifest::read(dir) {
        Ok(m) => m,
        Err(e) => return vec![e.to_string()],
    };
    let mut problems = Vec::new();
    for m in &manifests {
        let object = format!("loraadapter/{}", m.metadata.name);
        if !gw.tenants.contains_key(&m.spec.tenant) {
            problems.push(format!("{object}: spec.tenant {:?} is not a configured tenant", m.spec.tenant));
            continue;
        }
        let want = desired(m);
        let (previous, expect) = gw.loras.get_versioned(&want.name);
        if let Some(p) = &previous {
            if p.declared.as_ref().map(|d| d.origin) != Some(Origin::Directory) {
                problems.push(format!(
                    "{object}: loraName {:?} is taken by an adapter this directory did not declare",
                    want.name
                ));
                continue;
            }
            if p.owner != want.owner {
                problems.push(format!("{object}: loraName {:?} is owned by tenant {:?}", want.name, p.owner));
                continue;
            }
            if *p == want {
                continue;
            }
        }
        match crate::admin::run(gw, REQUESTER, Action::Load { lora: want }, expect).await {
            Ok(Outcome::Done { .. }) => tracing::info!(object = %object, "applied a declared adapter"),
            Ok(Outcome::Failed { error, .. }) => problems.push(format!("{object}: {error}")),
            Err(e) => problems.push(format!("{object}: {e}")),
        }
    }
    let declared: std::collections::BTreeSet<&str> = manifests.iter().map(|m| m.spec.lora_name.as_str()).collect();
    for lora in gw.loras.list() {
        let ours = lora.declared.as_ref().is_some_and(|d| d.origin == Origin::Directory);
        if !ours || declared.contains(lora.name.as_str()) {
            continue;
        }
        let (_, expect) = gw.loras.get_versioned(&lora.name);
        let name = lora.name.clone();
        match crate::admin::run(gw, REQUESTER, Action::Unload { lora }, expect).await {
            Ok(Outcome::Done { .. }) => {
                tracing::info!(adapter = %name, "unloaded an adapter the directory no longer declares")
            }
            Ok(Outcome::Failed { error, .. }) => problems.push(format!("unloading {name}: {error}")),
            Err(e) => problems.push(format!("unloading {name}: {e}")),
        }
    }
    problems
}
