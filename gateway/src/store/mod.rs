//! The desired state (adapters, policy versions, activations) behind one seam, so that any
//! number of gateways can share it. The model is etcd's, because etcd is the store fleets use:
//! string keys under one prefix, each value with the store revision that last changed it, a
//! store-wide revision that grows with every write, transactions that apply only when every
//! key is still at the revision the writer read (compare-and-set), and a watch that reports
//! every change after a revision.
//!
//! Two implementations:
//! - [`FileStore`]: one JSON file in a local directory, the embedded default. Writers on one
//!   machine (gateway replicas sharing the directory) serialise through a file lock; watchers
//!   poll the file.
//! - [`EtcdStore`]: an etcd cluster (`etcd://host:2379,host:2379/prefix`).
//!
//! Values are JSON text. Policy components are too large for one etcd value (1.5 MiB by
//! default), so they are blobs: written under a name of their own before the record that names
//! them (with their SHA-256, which the reader checks), and removed after it. Every record names a
//! blob written for it alone, so removing one can never take away another's.
//!
//! What the gateway builds on top: a [`Replica`] holds the last snapshot it read and follows the
//! watch, so requests never wait on the store and keep being served from the last known state
//! when it is unreachable; writes go to the store and fail with [`StoreError::Unavailable`].

mod etcd;
mod file;
mod replica;

pub use etcd::EtcdStore;
pub use file::FileStore;
pub use file::LOCAL_COUNTERS_MAX;
pub use replica::Replica;

use async_trait::async_trait;
use futures::stream::BoxStream;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A store revision: the number of the write that produced a state. `0` is "before any write".
pub type Revision = i64;

/// One value with the revision of the write that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: String,
    pub mod_revision: Revision,
}

/// Every key under the store's prefix as of one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: Revision,
    pub entries: BTreeMap<String, Entry>,
}

impl Snapshot {
    /// The entries whose keys start with `prefix`, with the prefix removed.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.entries.range(prefix.to_string()..).map_while(move |(k, e)| k.strip_prefix(prefix).map(|rest| (rest, e)))
    }

    /// The revision a compare-and-set of `key` must name: its `mod_revision`, or absent.
    pub fn expect(&self, key: &str) -> Expect {
        self.entries.get(key).map_or(Expect::Absent, |e| Expect::At(e.mod_revision))
    }

    /// Applies a watched batch. Changes this snapshot already holds (at or before its
    /// revision) are skipped, so a batch that overlaps a newer snapshot changes nothing.
    pub fn apply(&mut self, batch: &Batch) {
        let known = self.revision;
        for change in batch.changes.iter().filter(|c| c.revision() > known) {
            self.apply_one(change);
        }
        self.revision = self.revision.max(batch.revision);
    }

    fn apply_one(&mut self, change: &Change) {
        match change {
            Change::Put { key, value, revision } => {
                self.entries.insert(key.clone(), Entry { value: value.clone(), mod_revision: *revision });
            }
            Change::Delete { key, .. } => {
                self.entries.remove(key);
            }
        }
    }
}

/// What a write expects of its key when it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key was last changed by this revision (nobody changed it since it was read).
    At(Revision),
    /// No condition.
    Any,
}

/// One key's part of a transaction: its precondition and what happens to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub expect: Expect,
    pub change: Set,
}

/// What a transaction does to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Set {
    Put(String),
    Delete,
    /// Nothing: the key is only a precondition.
    Keep,
}

impl Write {
    pub fn put(key: impl Into<String>, expect: Expect, value: impl Into<String>) -> Write {
        Write { key: key.into(), expect, change: Set::Put(value.into()) }
    }

    pub fn delete(key: impl Into<String>, expect: Expect) -> Write {
        Write { key: key.into(), expect, change: Set::Delete }
    }

    /// Makes the transaction depend on `key` being as `expect` says, without changing it.
    pub fn check(key: impl Into<String>, expect: Expect) -> Write {
        Write { key: key.into(), expect, change: Set::Keep }
    }
}

/// One change a watch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: String, value: String, revision: Revision },
    Delete { key: String, revision: Revision },
}

impl Change {
    pub fn revision(&self) -> Revision {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

/// What a watch reports: changes in revision order, and the revision the state is at once they
/// are applied (it may be past the last change: progress, or changes outside the watch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub revision: Revision,
    pub changes: Vec<Change>,
}

/// Batches of changes, in revision order; an error ends the watch.
pub type Watch = BoxStream<'static, Result<Batch, StoreError>>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A key of the transaction was changed (or created, or deleted) since it was read: the
    /// writer lost a race and must read again.
    #[error("{key} was changed by someone else since it was read")]
    Conflict { key: String },
    /// The store cannot be reached or cannot commit (an etcd cluster without quorum).
    #[error("the state store is unavailable: {reason}")]
    Unavailable { reason: String },
    /// The watch asked for history the store no longer keeps: read a new snapshot.
    #[error("the store compacted its history past revision {revision}")]
    Compacted { revision: Revision },
    /// The store is at an older revision than a copy of it already held: it was restored from
    /// an older backup, and will hand out the revisions in between again.
    #[error(
        "the store went back from revision {from} to {to} (restored from an older backup?); this gateway keeps serving revision {from} until the store is past it or the gateway restarts"
    )]
    WentBack { from: Revision, to: Revision },
    /// A blob was asked for that the store does not hold.
    #[error("blob {name} is not in the store")]
    BlobMissing { name: String },
    /// The store holds something this gateway cannot read (a damaged file, a blob whose bytes
    /// do not match its digest).
    #[error("{0}")]
    Corrupt(String),
    /// The store refused the request itself (a value past its size limit, a bad address).
    #[error("{0}")]
    Invalid(String),
}

/// The shared desired state.
#[async_trait]
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// Where it is, for logs (no credentials).
    fn describe(&self) -> String;
    /// Every key, as of one revision.
    async fn snapshot(&self) -> Result<Snapshot, StoreError>;
    /// Applies every write, or none of them if any write's expectation does not hold
    /// ([`StoreError::Conflict`] names a key whose expectation failed). Returns the new revision.
    async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError>;
    /// The changes after `after`, in order, as they happen.
    async fn watch(&self, after: Revision) -> Result<Watch, StoreError>;
    /// Stores `bytes` as blob `name` (1–128 of `a-z 0-9 -`), replacing any blob of that name.
    async fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The bytes of blob `name`, whole (a blob is never read half written).
    async fn get_blob(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Removes blob `name` (absent is fine).
    async fn delete_blob(&self, name: &str) -> Result<(), StoreError>;
    /// Campaigns to be the one gateway that drives the backends, as `holder`: returns once this
    /// holder leads, with a fencing token greater than every earlier leader's.
    async fn lead(&self, holder: &str) -> Result<Lead, StoreError>;
    /// Adds up to `want` to counter `key` (1–200 of `A-Z a-z 0-9 . _ - /`), never taking it
    /// past `cap` (`None`: no cap), atomically across everyone sharing the store; a counter
    /// disappears `ttl` after it was created. Returns what was added and the counter after it.
    /// Counters are not part of the desired state (no snapshot or watch shows them): quotas
    /// count in them.
    async fn add_to_counter(
        &self,
        key: &str,
        want: u64,
        cap: Option<u64>,
        ttl: std::time::Duration,
    ) -> Result<Counted, StoreError>;
}

/// What [`StateStore::add_to_counter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// What was added: `want`, or less at the cap.
    pub added: u64,
    /// The counter after the addition.
    pub total: u64,
}

impl Counted {
    /// The addition to a counter at `current`: up to `want`, never past `cap`.
    pub fn add(current: u64, want: u64, cap: Option<u64>) -> Counted {
        let added = match cap {
            Some(cap) => want.min(cap.saturating_sub(current)),
            None => want,
        };
        Counted { added, total: current.saturating_add(added) }
    }
}

/// Checks a counter key: 1–200 of `A-Z a-z 0-9 . _ - /`.
pub(crate) fn check_counter_key(key: &str) -> Result<(), StoreError> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/');
    if !key.is_empty() && key.len() <= 200 && key.bytes().all(ok) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{key:?} is not a counter key (1-200 of A-Z a-z 0-9 . _ - /)")))
    }
}

/// Leadership held: the fencing token backends check, and whether it has been lost. Dropping it
/// gives leadership up.
pub struct Lead {
    pub token: u64,
    lost: tokio::sync::watch::Receiver<bool>,
    _hold: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Lead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lead").field("token", &self.token).field("lost", &*self.lost.borrow()).finish()
    }
}

impl Lead {
    pub(crate) fn new(token: u64, lost: tokio::sync::watch::Receiver<bool>, hold: Box<dyn Send + Sync>) -> Lead {
        Lead { token, lost, _hold: hold }
    }

    /// Whether this holder may have been replaced (its lease could not be renewed in time).
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|l| *l).await;
    }
}

/// The SHA-256 of `bytes` as lowercase hex.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a blob name: 1–128 of `a-z 0-9 -` (it becomes a file name and an etcd key).
pub(crate) fn check_blob_name(name: &str) -> Result<(), StoreError> {
    if !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z' | b'-')) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("{name:?} is not a blob name (1-128 of a-z 0-9 -)")))
    }
}

pub use switchyard_fleet::{DEFAULT_ETCD_PREFIX, EtcdAccess, Location};

/// Opens the store at `location` (an etcd store with `access`).
pub async fn open(location: &Location, access: &EtcdAccess) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(match location {
        Location::Dir(dir) => Arc::new(FileStore::open(dir)?),
        Location::Etcd { endpoints, prefix } => Arc::new(EtcdStore::connect(endpoints, prefix, access).await?),
    })
}
