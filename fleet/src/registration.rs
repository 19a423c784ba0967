//! Backend registrations. A backend started with `--advertise ADDRESS --store etcd://…` keeps a
//! record of itself, `<prefix>state/backends/<id>` → `{"address": …}`, under a lease it renews;
//! gateways follow these keys with the rest of the state and add and remove backends as they
//! come and go. A backend that dies stops renewing, and etcd deletes its record when the lease's
//! TTL runs out; one that stops cleanly revokes the lease, which deletes it at once.

use crate::{keep_lease, state_key};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Where registrations are, among the state keys.
pub const KEY_PREFIX: &str = "backends/";
/// Default lease TTL of a registration: how long a dead backend stays in routing tables.
pub const DEFAULT_TTL_S: i64 = 5;
/// Pause before registering again after etcd refused.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a backend says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRecord {
    /// Where gateways reach it (`https://host:port` or `http://host:port`).
    pub address: String,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
}

/// The state key of the backend at `address` (16 hex digits of its SHA-256, so any address is
/// a valid key and one address is one record).
pub fn key(address: &str) -> String {
    let d = Sha256::digest(address.as_bytes());
    let id: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{KEY_PREFIX}{id}")
}

/// A registration kept alive by a task; [`Registration::withdraw`] ends it.
#[derive(Debug)]
pub struct Registration {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Registration {
    /// Keeps `record` registered in the store under `prefix` with a lease of `ttl_s` seconds,
    /// registering again whenever the lease is lost (etcd unreachable for longer than the TTL).
    pub fn spawn(client: etcd_client::Client, prefix: &str, record: BackendRecord, ttl_s: i64) -> Registration {
        let key = state_key(prefix, &key(&record.address));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let Ok(value) = serde_json::to_string(&record) else { return };
            loop {
                let held = async {
                    let (lease, lost, guard) = keep_lease(&client, ttl_s).await?;
                    let options = etcd_client::PutOptions::new().with_lease(lease);
                    client.clone().put(key.clone(), value.clone(), Some(options)).await?;
                    Ok::<_, etcd_client::Error>((lost, guard))
                };
                match held.await {
                    Ok((mut lost, guard)) => {
                        tracing::info!(address = %record.address, ttl_s, "registered with the fleet");
                        let withdrawn = tokio::select! {
                            _ = lost.wait_for(|l| *l) => false,
                            _ = stopped.wait_for(|s| *s) => true,
                        };
                        if withdrawn {
                            let _ = guard.revoke().await;
                            return;
                        }
                        tracing::warn!(address = %record.address, "the registration's lease was lost; registering again");
                    }
                    Err(e) => tracing::warn!(address = %record.address, error = %e, "cannot register with the fleet"),
                }
                let withdrawn = tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => false,
                    _ = stopped.wait_for(|s| *s) => true,
                };
                if withdrawn {
                    return;
                }
            }
        });
        Registration { task, stop }
    }

    /// Removes the registration now (revoking its lease), so gateways stop routing here.
    pub async fn withdraw(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(crate::REQUEST_TIMEOUT, self.task).await;
    }
}
