//! What Switchyard gateways and backends share about a fleet: where its state store is
//! ([`Location`], the `--store` flag of both), how to reach etcd and prove who is calling
//! ([`EtcdAccess`], [`connect`]), leases kept alive
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
    /// An etcd cluster: its endpoints (`http://host:port`, or `https://host:port` for
    /// `etcds://`) and the key prefix (ends in `/`).
    Etcd { endpoints: Vec<String>, prefix: String },
}

/// The default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/switchyard/";

impl std::str::FromStr for Location {
    type Err = String;

    /// `etcd://host:2379[,host:2379…][/prefix]` (`etcds://` for TLS), or a directory path.
    fn from_str(s: &str) -> Result<Location, String> {
        let (scheme, rest) = match (s.strip_prefix("etcd://"), s.strip_prefix("etcds://")) {
            (Some(rest), _) => ("http", rest),
            (_, Some(rest)) => ("https", rest),
            _ if s.contains("://") => {
                return Err(format!("store {s:?}: use etcd[s]://host:port[,host:port…][/prefix] or a directory"));
            }
            _ if s.is_empty() => return Err("store: empty path".into()),
            _ => return Ok(Location::Dir(s.into())),
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
        Ok(Location::Etcd { endpoints: endpoints.into_iter().map(|h| format!("{scheme}://{h}")).collect(), prefix })
    }
}

/// How a gateway or backend proves itself to etcd and checks etcd's certificates: the CA that
/// signed the members' certificates (`etcds://` stores), a client certificate for members
/// started with `--client-cert-auth`, and a user and password for clusters with RBAC on.
#[derive(Clone, Default)]
pub struct EtcdAccess {
    tls: Option<etcd_client::TlsOptions>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdAccess {
    /// Reads the files: `ca` (PEM) to trust the members' certificates, `client` (certificate
    /// and key, PEM) to present, and `password_file` (its first line that is not blank or a
    /// `#` comment) for `user`.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        client: Option<(&std::path::Path, &std::path::Path)>,
        user: Option<&str>,
        password_file: Option<&std::path::Path>,
    ) -> Result<EtcdAccess, String> {
        if client.is_some() && ca.is_none() {
            return Err("an etcd client certificate needs the members' CA (--store-ca-file) too".into());
        }
        let tls = ca.map(|ca| client_tls(ca, client)).transpose()?;
        let user = match (user, password_file) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err("an etcd user (--store-user) and its password (--store-password-file) go together".into());
            }
            (Some(user), Some(path)) => Some((user.to_string(), first_line(path, "password")?)),
        };
        Ok(EtcdAccess { tls, user })
    }

    /// Whether this can reach `endpoints`: TLS endpoints need a CA, and a CA is only for them.
    pub fn check(&self, endpoints: &[String]) -> Result<(), String> {
        let tls = endpoints.iter().any(|e| e.starts_with("https://"));
        match (tls, self.tls.is_some()) {
            (true, false) => {
                Err("an etcds:// store needs the CA that signed its members' certificates (--store-ca-file)".into())
            }
            (false, true) => Err("--store-ca-file is for an etcds:// store (TLS); this one is etcd://".into()),
            _ => Ok(()),
        }
    }
}

/// TLS settings for a client: trust the certificates `ca` (PEM) signed, and present `client`
/// (certificate and key, PEM) when given. Shared by the gateway's backend clients and etcd.
pub fn client_tls(
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<etcd_client::TlsOptions, String> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

/// The first line of the file at `path` that is not blank or a `#` comment, trimmed: how
/// credentials and passwords are kept. `what` names it in the error when there is none.
pub fn first_line(path: &std::path::Path, what: &str) -> Result<String, String> {
    let text = String::from_utf8(read(path)?).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| format!("{} holds no {what}", path.display()))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A client for the etcd cluster at `endpoints` (`http://host:port` or `https://host:port`),
/// authenticating with `access`: every request with a deadline ([`REQUEST_TIMEOUT`]) and
/// requiring a leader, so a cluster without quorum answers promptly instead of hanging.
/// Connects lazily, except that a user and password are checked at once (etcd hands out a token
/// for them): an unreachable cluster shows in the first request.
pub async fn connect(endpoints: &[String], access: &EtcdAccess) -> Result<etcd_client::Client, etcd_client::Error> {
    access.check(endpoints).map_err(etcd_client::Error::InvalidArgs)?;
    let mut options = etcd_client::ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
        .with_require_leader(true);
    if let Some(tls) = &access.tls {
        options = options.with_tls(tls.clone());
    }
    if let Some((user, password)) = &access.user {
        options = options.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
    }
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
