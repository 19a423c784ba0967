//! What Switchyard gateways and backends share about a fleet: where its state store is
//! ([`Location`], the `--store` flag of both), how to reach etcd ([`connect`]), leases kept alive
//! ([`keep_lease`]), and backend registrations ([`registration`]): a backend started with
//! `--advertise` keeps a record of itself under a lease, so gateways find it and lose it within
//! the lease's TTL when it dies.

pub mod registration;

use std::time::Duration;

pub use etcd_client;

/// Where the desired state is under a fleet's etcd prefix: snapshots and watches cover it.
pub const STATE_KEYS: &str = "state/";

/// The etcd key of state key `key` under `prefix`.
pub fn state_key(prefix: &str, key: &str) -> String {
    format!("{prefix}{STATE_KEYS}{key}")
}

/// Deadline of each request to etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of connecting to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the desired state lives, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Dir(std::path::PathBuf),
    /// An etcd cluster: its endpoints (`http://host:port`) and the key prefix (ends in `/`).
    Etcd { endpoints: Vec<String>, prefix: String },
}

/// The default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/switchyard/";

impl std::str::FromStr for Location {
    type Err = String;

    /// `etcd://host:2379[,host:2379…][/prefix]`, or a directory path.
    fn from_str(s: &str) -> Result<Location, String> {
        let Some(rest) = s.strip_prefix("etcd://") else {
            if s.contains("://") {
                return Err(format!("store {s:?}: use etcd://host:port[,host:port…][/prefix] or a directory"));
            }
            if s.is_empty() {
                return Err("store: empty path".into());
            }
            return Ok(Location::Dir(s.into()));
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoints: Vec<String> = hosts.split(',').map(str::trim).map(String::from).collect();
        if endpoints.iter().any(|h| h.is_empty() || h.contains('@') || !h.contains(':')) {
            return Err(format!("store {s:?}: every etcd endpoint is host:port"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("store {s:?}: the prefix has whitespace or control characters"));
        }
        let prefix = if prefix.is_empty() { DEFAULT_ETCD_PREFIX.to_string() } else { format!("/{prefix}/") };
        Ok(Location::Etcd { endpoints: endpoints.into_iter().map(|h| format!("http://{h}")).collect(), prefix })
    }
}

/// A client for the etcd cluster at `endpoints` (`http://host:port`): every request with a
/// deadline ([`REQUEST_TIMEOUT`]) and requiring a leader, so a cluster without quorum answers
/// promptly instead of hanging. Connects lazily: an unreachable cluster shows in the first request.
pub async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = etcd_client::ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_require_leader(true);
    etcd_client::Client::connect(endpoints, Some(options)).await
}

/// Grants a lease of `ttl_s` seconds and keeps it alive until the returned guard is dropped
/// (which revokes it). The receiver turns true once the lease may have expired: no renewal was
/// confirmed within its TTL.
pub async fn keep_lease(
    client: &etcd_client::Client,
    ttl_s: i64,
) -> Result<(i64, tokio::sync::watch::Receiver<bool>, LeaseGuard), etcd_client::Error> {
    let owner = client.clone();
    let mut client = client.clone();
    let granted = client.lease_grant(ttl_s, None).await?;
    let id = granted.id();
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let (lost_tx, lost) = tokio::sync::watch::channel(false);
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(async move {
        let mut valid_until = started + ttl;
        'reconnect: loop {
            if tokio::time::Instant::now() >= valid_until {
                break;
            }
            let Ok((mut keeper, mut answers)) = client.lease_keep_alive(id).await else {
                tokio::time::sleep(ttl / 6).await;
                continue;
            };
            loop {
                let sent = tokio::time::Instant::now();
                if keeper.keep_alive().await.is_err() {
                    continue 'reconnect;
                }
                let answer = tokio::time::timeout_at(valid_until.max(sent), answers.message()).await;
                match answer {
                    Ok(Ok(Some(a))) if a.ttl() > 0 => valid_until = sent + Duration::from_secs(a.ttl() as u64),
                    // TTL 0: etcd says the lease is gone.
                    Ok(Ok(Some(_))) => break 'reconnect,
                    Ok(_) => continue 'reconnect,
                    Err(_) => break 'reconnect,
                }
                tokio::time::sleep(ttl / 3).await;
            }
        }
        let _ = lost_tx.send(true);
    });
    Ok((id, lost, LeaseGuard { task, client: owner, id, revoked: false }))
}

/// Keeps a lease alive; revokes it when dropped (inside a tokio runtime).
pub struct LeaseGuard {
    task: tokio::task::JoinHandle<()>,
    client: etcd_client::Client,
    id: i64,
    revoked: bool,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard").field("id", &self.id).finish()
    }
}

impl LeaseGuard {
    /// Revokes the lease now: every key attached to it is deleted.
    pub async fn revoke(mut self) -> Result<(), etcd_client::Error> {
        self.task.abort();
        self.revoked = true;
        self.client.clone().lease_revoke(self.id).await.map(|_| ())
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.task.abort();
        if self.revoked {
            return;
        }
        let (mut client, id) = (self.client.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.lease_revoke(id).await;
            });
        }
    }
}
