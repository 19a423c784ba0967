//! The state store in a local directory: the embedded default (`switchyard up`, one gateway).
//!
//! - `store.json` holds every key with its revision and the store revision. A commit takes an
//!   exclusive lock on `store.lock`, reads the file, checks every expectation, and replaces the
//!   file atomically (temp file, fsync, rename), so gateways on one machine sharing the
//!   directory never lose each other's writes and a crash leaves the old file or the new one.
//! - `blobs/<name>` holds each blob, written the same way.
//! - A watch polls the file (every [`POLL_INTERVAL`], and at once after a commit through this
//!   handle) and reports the difference from what it last saw. It keeps no history: a watch
//!   asked to start from a revision older than the file's is told [`StoreError::Compacted`],
//!   and its owner reads a new snapshot.
//! - Counters ([`StateStore::add_to_counter`]) live in this process's memory: the directory is
//!   one gateway's, and counters only need to outlive their window.

use super::{Batch, Change, Counted, Entry, Revision, Snapshot, StateStore, StoreError, Watch, Write};
use crate::files;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a watch reads the file for changes made by other processes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
const STATE_FILE: &str = "store.json";
const LOCK_FILE: &str = "store.lock";
const BLOB_DIR: &str = "blobs";
/// Held (an exclusive lock) by the leading gateway for as long as it runs.
const LEADER_LOCK: &str = "leader.lock";
/// The last fencing token handed out, written under the leader lock.
const LEADER_EPOCH: &str = "leader.epoch";
/// How often a gateway that does not lead tries the leader lock again.
pub const LEADER_RETRY: Duration = Duration::from_millis(500);
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    revision: Revision,
    entries: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    value: String,
    mod_revision: Revision,
}

/// The desired state in a directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// Tells this process's watches that a commit landed (other processes are seen by polling).
    committed: std::sync::Arc<tokio::sync::watch::Sender<Revision>>,
    /// Counters: value and when it disappears.
    counters: std::sync::Arc<std::sync::Mutex<HashMap<String, (u64, Instant)>>>,
}

/// Counters one local store keeps (expired ones are dropped first); past it, adding to a new
/// counter fails.
pub const LOCAL_COUNTERS_MAX: usize = 100_000;

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::Unavailable { reason: files::failed(action, path)(e).to_string() }
}

impl FileStore {
    /// Opens the store in `dir`, creating the directory when absent. A damaged state file is
    /// an error, never an empty state.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        std::fs::create_dir_all(dir.join(BLOB_DIR)).map_err(io("create", dir))?;
        let store = FileStore { dir: dir.to_path_buf(), committed: Default::default(), counters: Default::default() };
        store.read()?;
        Ok(store)
    }

    fn read(&self) -> Result<Snapshot, StoreError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let file: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{} is not a Switchyard state file: {e}", path.display())))?;
        if file.format != FORMAT_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{} has format {} (this gateway reads {FORMAT_VERSION})",
                path.display(),
                file.format
            )));
        }
        Ok(Snapshot {
            revision: file.revision,
            entries: file
                .entries
                .into_iter()
                .map(|(k, e)| (k, Entry { value: e.value, mod_revision: e.mod_revision }))
                .collect(),
        })
    }

    /// Opens (creating when absent) the lock file `name`; the lock itself is the caller's.
    fn lock_file(&self, name: &str) -> Result<(std::fs::File, PathBuf), StoreError> {
        let path = self.dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        Ok((file, path))
    }

    fn commit_locked(&self, writes: &[Write]) -> Result<Revision, StoreError> {
        let (lock, lock_path) = self.lock_file(LOCK_FILE)?;
        lock.lock().map_err(io("lock", &lock_path))?;
        let mut state = self.read()?;
        for w in writes {
            let current = state.entries.get(&w.key).map(|e| e.mod_revision);
            let holds = match w.expect {
                super::Expect::Any => true,
                super::Expect::Absent => current.is_none(),
                super::Expect::At(r) => current == Some(r),
            };
            if !holds {
                return Err(StoreError::Conflict { key: w.key.clone() });
            }
        }
        let revision = state.revision + 1;
        for w in writes {
            match &w.change {
                super::Set::Put(v) => {
                    state.entries.insert(w.key.clone(), Entry { value: v.clone(), mod_revision: revision });
                }
                super::Set::Delete => {
                    state.entries.remove(&w.key);
                }
                super::Set::Keep => {}
            }
        }
        let file = StateFile {
            format: FORMAT_VERSION,
            revision,
            entries: state
                .entries
                .into_iter()
                .map(|(k, e)| (k, FileEntry { value: e.value, mod_revision: e.mod_revision }))
                .collect(),
        };
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Invalid(e.to_string()))?;
        files::replace(&path, &bytes).map_err(|e| StoreError::Unavailable { reason: e.to_string() })?;
        // The lock is released when `lock` is dropped, after the rename.
        drop(lock);
        Ok(revision)
    }

    /// Takes the leader lock if it is free: the next fencing token and the lock's file.
    fn try_lead(&self) -> Result<Option<(u64, std::fs::File)>, StoreError> {
        let (lock, path) = self.lock_file(LEADER_LOCK)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
        }
        let epoch_path = self.dir.join(LEADER_EPOCH);
        let last = match std::fs::read_to_string(&epoch_path) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .map_err(|e| StoreError::Corrupt(format!("{} does not hold a number: {e}", epoch_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("read", &epoch_path)(e)),
        };
        let token = last + 1;
        files::replace(&epoch_path, token.to_string().as_bytes())
            .map_err(|e| StoreError::Unavailable { reason: e.to_string() })?;
        Ok(Some((token, lock)))
    }

    fn blob_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        super::check_blob_name(name)?;
        Ok(self.dir.join(BLOB_DIR).join(name))
    }
}

/// What changed between two states of the file, in revision order.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let mut changes: Vec<Change> = new
        .entries
        .iter()
        .filter(|(k, e)| old.entries.get(*k) != Some(*e))
        .map(|(k, e)| Change::Put { key: k.clone(), value: e.value.clone(), revision: e.mod_revision })
        .collect();
    changes.extend(
        old.entries
            .keys()
            .filter(|k| !new.entries.contains_key(*k))
            .map(|k| Change::Delete { key: k.clone(), revision: new.revision }),
    );
    changes.sort_by_key(Change::revision);
    changes
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable { reason: format!("the store task failed: {e}") })?
}

#[async_trait]
impl StateStore for FileStore {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let me = self.clone();
        blocking(move || me.read()).await
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError> {
        let me = self.clone();
        let revision = blocking(move || me.commit_locked(&writes)).await?;
        self.committed.send_replace(revision);
        Ok(revision)
    }

    async fn watch(&self, after: Revision) -> Result<Watch, StoreError> {
        let mut committed = self.committed.subscribe();
        committed.borrow_and_update();
        let base = self.snapshot().await?;
        if base.revision != after {
            // No history here: the caller must read a new snapshot.
            let compacted: Result<Batch, StoreError> = Err(StoreError::Compacted { revision: after });
            return Ok(Box::pin(futures::stream::iter([compacted])));
        }
        let me = self.clone();
        let stream = futures::stream::unfold(Some((base, committed)), move |state| {
            let me = me.clone();
            async move {
                let (last, mut committed) = state?;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL_INTERVAL) => {}
                        r = committed.changed() => if r.is_err() { return None },
                    }
                    let now = match me.snapshot().await {
                        Ok(s) => s,
                        Err(e) => return Some((Err(e), None)),
                    };
                    if now.revision < last.revision {
                        // The file was replaced by an older one (a restored backup): start over.
                        return Some((Err(StoreError::Compacted { revision: last.revision }), None));
                    }
                    if now.revision > last.revision {
                        let batch = Batch { revision: now.revision, changes: diff(&last, &now) };
                        return Some((Ok(batch), Some((now, committed))));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.blob_path(name)?;
        let bytes = bytes.to_vec();
        blocking(move || files::replace(&path, &bytes).map_err(|e| StoreError::Unavailable { reason: e.to_string() }))
            .await
    }

    async fn get_blob(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(name)?;
        let name = name.to_string();
        blocking(move || match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::BlobMissing { name }),
            Err(e) => Err(io("read", &path)(e)),
        })
        .await
    }

    async fn lead(&self, _holder: &str) -> Result<super::Lead, StoreError> {
        loop {
            let me = self.clone();
            if let Some((token, lock)) = blocking(move || me.try_lead()).await? {
                // A lock held by this process is never lost while it runs.
                let (keep, lost) = tokio::sync::watch::channel(false);
                return Ok(super::Lead::new(token, lost, Box::new((lock, keep))));
            }
            tokio::time::sleep(LEADER_RETRY).await;
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
        let now = Instant::now();
        let mut counters = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !counters.contains_key(key) && counters.len() >= LOCAL_COUNTERS_MAX {
            counters.retain(|_, (_, expires)| *expires > now);
            if counters.len() >= LOCAL_COUNTERS_MAX {
                return Err(StoreError::Invalid(format!("more than {LOCAL_COUNTERS_MAX} counters are live")));
            }
        }
        let entry = counters.entry(key.to_string()).or_insert((0, now + ttl));
        if entry.1 <= now {
            *entry = (0, now + ttl);
        }
        let counted = Counted::add(entry.0, want, cap);
        entry.0 = counted.total;
        Ok(counted)
    }

    async fn delete_blob(&self, name: &str) -> Result<(), StoreError> {
        let path = self.blob_path(name)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove", &path)(e)),
        })
        .await
    }
}
