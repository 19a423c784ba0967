//! The state store on an etcd cluster, for fleets of gateways.
//!
//! Keys: `<prefix>state/<key>` for the desired state (what snapshots and watches cover) and
//! `<prefix>blobs/<name>` for blobs. A blob is written as chunks of [`BLOB_CHUNK`] bytes
//! (`…/<name>/00000`, …), each its own request because etcd refuses requests past 1.5 MiB by
//! default, and then its manifest (`…/<name>`: size, chunk count, SHA-256), so a reader that
//! finds the manifest finds every chunk, and checks what it reassembled against the digest. Chunking in etcd rather than keeping components beside it (an
//! object store) means a fleet needs nothing but etcd; the policy store's per-tenant byte quota
//! bounds what that costs etcd's database (2 GiB by default).
//!
//! Commits are one etcd transaction: a compare per expectation (`mod_revision` equal, or
//! `create_revision` 0 for absent), then the puts and deletes. When a compare fails the
//! transaction reads the keys instead, to name the one that changed.
//!
//! Counters are `<prefix>counters/<key>`, decimal text, each under a lease of its own that
//! ends it; an addition is a read and a transaction that applies only if the counter is still
//! at the revision read (retried on a race).
//!
//! Every request has a deadline ([`switchyard_fleet::REQUEST_TIMEOUT`]) and requires a leader, so a cluster that
//! has lost quorum answers [`StoreError::Unavailable`] promptly instead of hanging.

use super::{Batch, Change, Counted, Entry, Expect, Revision, Set, Snapshot, StateStore, StoreError, Watch, Write};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use futures::StreamExt;
use std::time::Duration;
use switchyard_fleet::{EtcdAccess, LeaseGuard};

/// Bytes per blob chunk: under etcd's default request limit (1.5 MiB) with room for the key.
pub const BLOB_CHUNK: usize = 1 << 20;
/// Seconds the leader's lease lives without a renewal: how long a dead leader keeps others
/// from driving the backends. Renewed every third of it.
pub const LEADER_TTL_S: i64 = 3;

/// The desired state in etcd under one prefix.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).field("prefix", &self.prefix).finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    match &e {
        etcd_client::Error::InvalidArgs(m) => StoreError::Invalid(m.clone()),
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::InvalidArgument => {
            StoreError::Invalid(format!("etcd refused the request: {}", s.message()))
        }
        etcd_client::Error::GRpcStatus(s)
            if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) =>
        {
            let reason = format!(
                "etcd does not allow this (check --store-user and the user's roles on the prefix): {}",
                s.message()
            );
            StoreError::Unavailable { reason }
        }
        etcd_client::Error::GRpcStatus(s) => StoreError::Unavailable { reason: format!("etcd: {}", s.message()) },
        etcd_client::Error::TransportError(t) => {
            // A transport error says what went wrong only in its sources (a refused handshake,
            // a certificate that does not verify): name them.
            let mut reason = format!("etcd: {t}");
            let mut cause = std::error::Error::source(t);
            while let Some(c) = cause {
                reason.push_str(": ");
                reason.push_str(&c.to_string());
                cause = c.source();
            }
            StoreError::Unavailable { reason }
        }
        _ => StoreError::Unavailable { reason: format!("etcd: {e}") },
    }
}

fn text(bytes: &[u8], key: &str) -> Result<String, StoreError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| StoreError::Corrupt(format!("etcd key {key} holds a non-UTF-8 value")))
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`http://host:port` or `https://host:port`) with
    /// `access`, keeping keys under `prefix`. Fails on malformed endpoints, missing TLS settings
    /// and a refused user: an unreachable cluster shows in the first request.
    pub async fn connect(endpoints: &[String], prefix: &str, access: &EtcdAccess) -> Result<EtcdStore, StoreError> {
        let client = switchyard_fleet::connect(endpoints, access).await.map_err(unavailable)?;
        Ok(EtcdStore { client, endpoints: endpoints.to_vec(), prefix: prefix.to_string() })
    }

    /// The etcd client, for the parts of the gateway that use etcd directly (leases).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The key prefix of this store (ends in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn state_key(&self, key: &str) -> String {
        switchyard_fleet::state_key(&self.prefix, key)
    }

    fn state_prefix(&self) -> String {
        switchyard_fleet::state_key(&self.prefix, "")
    }

    fn leader_key(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// Grants a lease of `ttl_s` seconds and keeps it alive (see [`switchyard_fleet::keep_lease`]).
    pub async fn keep_lease(
        &self,
        ttl_s: i64,
    ) -> Result<(i64, tokio::sync::watch::Receiver<bool>, LeaseGuard), StoreError> {
        switchyard_fleet::keep_lease(&self.client, ttl_s).await.map_err(unavailable)
    }

    fn blob_key(&self, name: &str) -> String {
        format!("{}blobs/{name}", self.prefix)
    }

    fn counter_key(&self, key: &str) -> String {
        format!("{}counters/{key}", self.prefix)
    }
}

/// Tries an addition to a counter makes before it gives up to others racing for it.
const COUNTER_TRIES: usize = 32;

#[derive(serde::Serialize, serde::Deserialize)]
struct BlobManifest {
    size: usize,
    chunks: usize,
    sha256: String,
}

#[async_trait]
impl StateStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} under {}", self.endpoints.join(","), self.prefix)
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let prefix = self.state_prefix();
        let r = self
            .client
            .clone()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let revision = r.header().map_or(0, |h| h.revision());
        let mut entries = std::collections::BTreeMap::new();
        for kv in r.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            let Some(key) = key.strip_prefix(&prefix) else { continue };
            entries.insert(key.to_string(), Entry { value: text(kv.value(), key)?, mod_revision: kv.mod_revision() });
        }
        Ok(Snapshot { revision, entries })
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError> {
        let compares: Vec<Compare> = writes
            .iter()
            .filter_map(|w| {
                let key = self.state_key(&w.key);
                match w.expect {
                    Expect::Any => None,
                    Expect::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
                    Expect::At(r) => Some(Compare::mod_revision(key, CompareOp::Equal, r)),
                }
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .filter_map(|w| match &w.change {
                Set::Put(v) => Some(TxnOp::put(self.state_key(&w.key), v.clone(), None)),
                Set::Delete => Some(TxnOp::delete(self.state_key(&w.key), None)),
                Set::Keep => None,
            })
            .collect();
        let reads: Vec<TxnOp> = writes.iter().map(|w| TxnOp::get(self.state_key(&w.key), None)).collect();
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let r = self.client.clone().txn(txn).await.map_err(unavailable)?;
        if r.succeeded() {
            return Ok(r.header().map_or(0, |h| h.revision()));
        }
        // Name the first key whose expectation failed.
        for (w, answer) in writes.iter().zip(r.op_responses()) {
            let TxnOpResponse::Get(g) = answer else { continue };
            let current = g.kvs().first().map(|kv| kv.mod_revision());
            let holds = match w.expect {
                Expect::Any => true,
                Expect::Absent => current.is_none(),
                Expect::At(rev) => current == Some(rev),
            };
            if !holds {
                return Err(StoreError::Conflict { key: w.key.clone() });
            }
        }
        Err(StoreError::Conflict { key: writes.first().map(|w| w.key.clone()).unwrap_or_default() })
    }

    async fn watch(&self, after: Revision) -> Result<Watch, StoreError> {
        let prefix = self.state_prefix();
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1).with_progress_notify();
        let stream = self.client.clone().watch(prefix.clone(), Some(options)).await.map_err(unavailable)?;
        let changes = stream.map(move |message| {
            let message = message.map_err(unavailable)?;
            if message.compact_revision() > 0 {
                return Err(StoreError::Compacted { revision: message.compact_revision() });
            }
            if message.canceled() {
                return Err(StoreError::Unavailable {
                    reason: format!("etcd ended the watch: {}", message.cancel_reason()),
                });
            }
            let mut changes = Vec::with_capacity(message.events().len());
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let Some(key) = key.strip_prefix(&prefix) else { continue };
                changes.push(match event.event_type() {
                    EventType::Put => {
                        Change::Put { key: key.to_string(), value: text(kv.value(), key)?, revision: kv.mod_revision() }
                    }
                    EventType::Delete => Change::Delete { key: key.to_string(), revision: kv.mod_revision() },
                });
            }
            // A message without events is the watch's creation (history may follow it: no
            // progress) or a progress notification, which etcd sends only once every change up
            // to its header's revision has been sent.
            let revision = match changes.iter().map(Change::revision).max() {
                Some(r) => r,
                None if message.created() => 0,
                None => message.header().map_or(0, |h| h.revision()),
            };
            Ok(Batch { revision, changes })
        });
        Ok(Box::pin(changes))
    }

    async fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        super::check_blob_name(name)?;
        let key = self.blob_key(name);
        let mut client = self.client.clone();
        // The old manifest goes first, so no reader pairs it with new chunks.
        client.delete(key.clone(), None).await.map_err(unavailable)?;
        let chunks: Vec<&[u8]> = bytes.chunks(BLOB_CHUNK).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            client.put(format!("{key}/{i:05}"), chunk.to_vec(), None).await.map_err(unavailable)?;
        }
        let manifest = BlobManifest { size: bytes.len(), chunks: chunks.len(), sha256: super::digest(bytes) };
        let manifest = serde_json::to_string(&manifest).map_err(|e| StoreError::Invalid(e.to_string()))?;
        client.put(key, manifest, None).await.map_err(unavailable)?;
        Ok(())
    }

    async fn get_blob(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        super::check_blob_name(name)?;
        let key = self.blob_key(name);
        let mut client = self.client.clone();
        let r = client.get(key.clone(), None).await.map_err(unavailable)?;
        let Some(kv) = r.kvs().first() else {
            return Err(StoreError::BlobMissing { name: name.to_string() });
        };
        let manifest: BlobManifest = serde_json::from_slice(kv.value())
            .map_err(|e| StoreError::Corrupt(format!("blob {name}: bad manifest: {e}")))?;
        let at = r.header().map_or(0, |h| h.revision());
        let parts = client
            .get(format!("{key}/"), Some(GetOptions::new().with_prefix().with_revision(at)))
            .await
            .map_err(unavailable)?;
        // etcd returns a range sorted by key, and chunk keys sort in order.
        let bytes: Vec<u8> =
            parts.kvs().iter().take(manifest.chunks).flat_map(|kv| kv.value().iter().copied()).collect();
        if parts.kvs().len() < manifest.chunks
            || bytes.len() != manifest.size
            || super::digest(&bytes) != manifest.sha256
        {
            return Err(StoreError::Corrupt(format!("blob {name}: its chunks in etcd do not match its manifest")));
        }
        Ok(bytes)
    }

    async fn lead(&self, holder: &str) -> Result<super::Lead, StoreError> {
        let key = self.leader_key();
        let mut client = self.client.clone();
        loop {
            let (lease, lost, guard) = self.keep_lease(LEADER_TTL_S).await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), holder, Some(PutOptions::new().with_lease(lease)))])
                .or_else([TxnOp::get(key.clone(), None)]);
            let r = client.txn(txn).await.map_err(unavailable)?;
            let revision = r.header().map_or(0, |h| h.revision());
            if r.succeeded() {
                // The leader key's creation revision: etcd's revisions only grow, so every later
                // leader's token is greater.
                return Ok(super::Lead::new(revision as u64, lost, Box::new(guard)));
            }
            drop(guard);
            // Someone leads: wait for its key to go (its lease expired or was revoked).
            let mut watch = client
                .watch(key.clone(), Some(WatchOptions::new().with_start_revision(revision + 1)))
                .await
                .map_err(unavailable)?;
            let ttl = Duration::from_secs(LEADER_TTL_S as u64);
            loop {
                match tokio::time::timeout(ttl, watch.message()).await {
                    Ok(Ok(Some(m))) if m.events().iter().any(|e| e.event_type() == EventType::Delete) => break,
                    Ok(Ok(Some(_))) => {}
                    // The watch broke or nothing happened for a while: try again.
                    _ => break,
                }
            }
        }
    }

    async fn add_to_counter(
        &self,
        key: &str,
        want: u64,
        cap: Option<u64>,
        ttl: Duration,
    ) -> Result<Counted, StoreError> {
        super::check_counter_key(key)?;
        let key = self.counter_key(key);
        let mut client = self.client.clone();
        for _ in 0..COUNTER_TRIES {
            let r = client.get(key.clone(), None).await.map_err(unavailable)?;
            let (current, revision) = match r.kvs().first() {
                Some(kv) => {
                    let text = text(kv.value(), &key)?;
                    let n = text
                        .parse::<u64>()
                        .map_err(|_| StoreError::Corrupt(format!("counter {key} holds {text:?}")))?;
                    (n, kv.mod_revision())
                }
                None => (0, 0),
            };
            let counted = Counted::add(current, want, cap);
            if counted.added == 0 {
                return Ok(counted);
            }
            // A new counter gets a lease that ends it; an existing one keeps its own.
            let options = if revision == 0 {
                let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
                let lease = client.lease_grant(seconds, None).await.map_err(unavailable)?;
                PutOptions::new().with_lease(lease.id())
            } else {
                PutOptions::new().with_ignore_lease()
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
                .and_then([TxnOp::put(key.clone(), counted.total.to_string(), Some(options))]);
            if client.txn(txn).await.map_err(unavailable)?.succeeded() {
                return Ok(counted);
            }
        }
        Err(StoreError::Unavailable {
            reason: format!("counter {key} is contended: {COUNTER_TRIES} tries lost the race"),
        })
    }

    async fn delete_blob(&self, name: &str) -> Result<(), StoreError> {
        super::check_blob_name(name)?;
        // The manifest first, so no reader finds a manifest without its chunks.
        let key = self.blob_key(name);
        let mut client = self.client.clone();
        client.delete(key.clone(), None).await.map_err(unavailable)?;
        client.delete(format!("{key}/"), Some(DeleteOptions::new().with_prefix())).await.map_err(unavailable)?;
        Ok(())
    }
}
