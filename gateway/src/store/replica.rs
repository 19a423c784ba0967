//! This gateway's copy of the desired state: the last snapshot it read, kept current by a watch.
//!
//! Reads ([`Replica::current`]) never wait on the store, so requests are served from the last
//! known state while the store is unreachable. The follower task ([`Replica::follow`]) watches
//! from the copy's revision; when the watch fails it watches again from where it got to, and
//! when the store no longer has that history it reads a new snapshot and watches on from it.
//! A commit through the replica returns once the copy holds it, so a caller reads its own
//! writes.

use super::{Batch, Revision, Snapshot, StateStore, StoreError, Write};
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long a commit waits for the watch to bring its write into the copy before reading a
/// snapshot instead.
pub const CATCH_UP: Duration = Duration::from_secs(2);
/// Pause before watching again after the watch failed.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The local copy of a [`StateStore`].
#[derive(Debug)]
pub struct Replica {
    store: Arc<dyn StateStore>,
    state: RwLock<Arc<Snapshot>>,
    /// The copy's revision; wakes whoever waits for a change.
    revision: tokio::sync::watch::Sender<Revision>,
    /// Why the last read of the store failed, while it is failing.
    trouble: RwLock<Option<String>>,
    /// Set from the watch's report that the store no longer has the history after the copy's
    /// revision until a new snapshot is in: the copy is known to miss changes.
    behind: AtomicBool,
    /// The copy's revision and the older one the store was found at, once the store went back
    /// (restored from an older backup), until the store is past the copy's revision.
    went_back: RwLock<Option<(Revision, Revision)>>,
}

impl Replica {
    /// Reads the first snapshot; fails when the store cannot be read.
    pub async fn open(store: Arc<dyn StateStore>) -> Result<Arc<Replica>, StoreError> {
        let first = store.snapshot().await?;
        let (revision, _) = tokio::sync::watch::channel(first.revision);
        Ok(Arc::new(Replica {
            store,
            state: RwLock::new(Arc::new(first)),
            revision,
            trouble: RwLock::new(None),
            behind: AtomicBool::new(false),
            went_back: RwLock::new(None),
        }))
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// The state as of now, without copying it.
    pub fn current(&self) -> Arc<Snapshot> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Wakes on every change of the copy.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// Why the store cannot be followed now (`None`: it can).
    pub fn trouble(&self) -> Option<String> {
        self.trouble.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the copy keeps up with the store now: it can be followed, and is not waiting for
    /// a new snapshot after its watch lost the history it needed. What acts on the absence of a
    /// record (the reconciler unloading what no gateway asked for) waits for this, since the
    /// copy may then lack what another gateway just recorded.
    pub fn in_step(&self) -> bool {
        self.trouble().is_none() && !self.behind.load(Ordering::SeqCst)
    }

    fn set_trouble(&self, why: Option<String>) {
        let mut t = self.trouble.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match (&*t, &why) {
            (None, Some(w)) => {
                tracing::warn!(store = %self.store.describe(), reason = %w, "cannot follow the state store; serving the last known state")
            }
            (Some(_), None) => tracing::info!(store = %self.store.describe(), "following the state store again"),
            _ => {}
        }
        *t = why;
    }

    fn apply(&self, batch: &Batch) {
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if batch.revision <= state.revision {
            return;
        }
        Arc::make_mut(&mut state).apply(batch);
        self.revision.send_replace(state.revision);
    }

    /// Installs `snapshot` if it is newer than the copy.
    fn install(&self, snapshot: Snapshot) {
        let mut state = self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if snapshot.revision > state.revision {
            *state = Arc::new(snapshot);
            self.revision.send_replace(state.revision);
        }
    }

    /// Reads a snapshot and installs it.
    pub async fn resync(&self) -> Result<(), StoreError> {
        let s = self.store.snapshot().await?;
        self.install(s);
        Ok(())
    }

    /// Commits `writes` to the store; returns once the copy holds them. Refused while the store
    /// is behind the copy ([`StoreError::WentBack`]): the revision it would return may be one
    /// the copy already had, for another state.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError> {
        if let Some((from, to)) = self.went_back() {
            return Err(StoreError::WentBack { from, to });
        }
        let revision = self.store.commit(writes).await?;
        let mut seen = self.subscribe();
        let caught_up = matches!(tokio::time::timeout(CATCH_UP, seen.wait_for(|r| *r >= revision)).await, Ok(Ok(_)));
        if !caught_up {
            self.resync().await?;
        }
        Ok(revision)
    }

    /// Follows the store until the task is aborted.
    pub fn follow(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let trouble = match me.went_back() {
                    // No watch from a revision the store hands out again: snapshots, until the
                    // store is past it.
                    Some((from, _)) => me.start_over(from).await.err(),
                    None => match me.follow_once().await {
                        // The history from the copy's revision is gone (etcd compacted it; the
                        // directory store keeps none): the store's state now is where the copy
                        // goes on from. That is routine, not trouble, unless the store cannot be
                        // read.
                        StoreError::Compacted { revision } => {
                            me.behind.store(true, Ordering::SeqCst);
                            me.start_over(revision).await.err()
                        }
                        other => Some(other),
                    },
                };
                let pause = trouble.is_some();
                me.set_trouble(trouble.map(|e| e.to_string()));
                if pause {
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        })
    }

    /// The copy's revision and the older one the store was found at, while the store is behind.
    fn went_back(&self) -> Option<(Revision, Revision)> {
        *self.went_back.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the store's state after a watch lost its history past `revision` (the copy's).
    ///
    /// A store behind that revision went back in time (restored from an older backup): it will
    /// hand out the revisions up to the copy's again, for other states, and a watch or a cache
    /// keyed by revision would take one for the other. So the copy stays where it is, saying
    /// why, and takes the store's state once the store is past its revision (a state it has
    /// never seen), or when the gateway restarts.
    async fn start_over(&self, revision: Revision) -> Result<(), StoreError> {
        let snapshot = self.store.snapshot().await?;
        let went_back = self.went_back();
        if snapshot.revision < revision || (went_back.is_some() && snapshot.revision == revision) {
            let (from, to) = went_back.unwrap_or((revision, snapshot.revision));
            *self.went_back.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((from, to));
            return Err(StoreError::WentBack { from, to });
        }
        self.install(snapshot);
        *self.went_back.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.behind.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// One watch, from the copy's revision, until it fails.
    async fn follow_once(&self) -> StoreError {
        let mut watch = match self.store.watch(self.revision()).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        let mut first = true;
        while let Some(item) = watch.next().await {
            match item {
                Ok(batch) => {
                    if first {
                        // The watch works: whatever was wrong is over.
                        self.set_trouble(None);
                        first = false;
                    }
                    self.apply(&batch);
                }
                Err(e) => return e,
            }
        }
        StoreError::Unavailable { reason: "the watch ended".into() }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)] // a test fails loudly on a broken fixture

    use super::*;
    use crate::store::file::FileStore;
    use crate::store::{Counted, Expect, Lead, Watch};
    use std::time::Instant;
    use tokio::sync::Notify;

    /// A directory store whose snapshot reads, once `hold` is set, wait for the test.
    #[derive(Debug)]
    struct Held {
        inner: FileStore,
        hold: AtomicBool,
        reached: Notify,
        release: Notify,
    }

    #[async_trait::async_trait]
    impl StateStore for Held {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        async fn snapshot(&self) -> Result<Snapshot, StoreError> {
            if self.hold.load(Ordering::SeqCst) {
                self.reached.notify_one();
                self.release.notified().await;
            }
            self.inner.snapshot().await
        }
        async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError> {
            self.inner.commit(writes).await
        }
        async fn watch(&self, after: Revision) -> Result<Watch, StoreError> {
            self.inner.watch(after).await
        }
        async fn put_blob(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
            self.inner.put_blob(name, bytes).await
        }
        async fn get_blob(&self, name: &str) -> Result<Vec<u8>, StoreError> {
            self.inner.get_blob(name).await
        }
        async fn delete_blob(&self, name: &str) -> Result<(), StoreError> {
            self.inner.delete_blob(name).await
        }
        async fn lead(&self, holder: &str) -> Result<Lead, StoreError> {
            self.inner.lead(holder).await
        }
        async fn add_to_counter(
            &self,
            key: &str,
            want: u64,
            cap: Option<u64>,
            ttl: Duration,
        ) -> Result<Counted, StoreError> {
            self.inner.add_to_counter(key, want, cap, ttl).await
        }
    }

    fn value(r: &Replica, key: &str) -> Option<String> {
        r.current().entries.get(key).map(|e| e.value.clone())
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "{what} did not happen within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_watch_that_lost_its_history_reads_a_snapshot_without_reporting_trouble() {
        let dir = tempfile::tempdir().expect("dir");
        let held = Arc::new(Held {
            inner: FileStore::open(dir.path()).expect("opens"),
            hold: AtomicBool::new(false),
            reached: Notify::new(),
            release: Notify::new(),
        });
        let replica = Replica::open(held.clone()).await.expect("first snapshot");
        // Another gateway commits before this one watches: the directory store keeps no history,
        // so the first watch is told to read a snapshot.
        let other = FileStore::open(dir.path()).expect("opens");
        other.commit(vec![Write::put("loras/x", Expect::Absent, "v1")]).await.expect("commits");
        held.hold.store(true, Ordering::SeqCst);
        let follower = replica.follow();
        tokio::time::timeout(Duration::from_secs(10), held.reached.notified())
            .await
            .expect("the follower reads a snapshot");
        assert_eq!(replica.trouble(), None, "a routine snapshot read was reported as trouble");
        // But the copy is known to miss a change until the snapshot is in.
        assert!(!replica.in_step());
        held.hold.store(false, Ordering::SeqCst);
        held.release.notify_one();
        eventually("the commit reaching the copy", || value(&replica, "loras/x").as_deref() == Some("v1")).await;
        // (Out of step a moment longer than the copy is behind: a reader erring on the safe side.)
        eventually("the copy in step again", || replica.in_step()).await;
        assert_eq!(replica.trouble(), None);
        follower.abort();
    }

    #[tokio::test]
    async fn a_store_restored_from_an_older_backup_is_reported_and_not_followed_back() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Arc::new(FileStore::open(dir.path()).expect("opens"));
        store.commit(vec![Write::put("loras/x", Expect::Absent, "v1")]).await.expect("commits");
        let state = dir.path().join("store.json");
        let backup = std::fs::read(&state).expect("backs up");
        let newest = store.commit(vec![Write::put("loras/x", Expect::Any, "v2")]).await.expect("commits");
        let replica = Replica::open(store.clone()).await.expect("first snapshot");
        let follower = replica.follow();

        let restoring = dir.path().join("store.json.restore");
        std::fs::write(&restoring, &backup).expect("writes");
        std::fs::rename(&restoring, &state).expect("restores");
        eventually("the restore being reported", || replica.trouble().is_some()).await;
        let trouble = replica.trouble().unwrap_or_default();
        assert!(trouble.contains("went back from revision 2 to 1"), "{trouble}");
        assert!(!replica.in_step());
        let refused = replica.commit(vec![Write::put("loras/mine", Expect::Absent, "v")]).await;
        assert_eq!(refused, Err(StoreError::WentBack { from: 2, to: 1 }));
        // The copy keeps the last state it followed, even once the restored store hands out
        // revision 2 again for another state (another gateway's commit).
        store.commit(vec![Write::put("loras/y", Expect::Absent, "after")]).await.expect("commits");
        tokio::time::sleep(2 * RETRY_AFTER).await;
        assert_eq!((replica.revision(), value(&replica, "loras/x").as_deref()), (newest, Some("v2")));
        assert_eq!(value(&replica, "loras/y"), None);
        // Past the revisions it had, the store's history is new to the copy: it follows again.
        store.commit(vec![Write::put("loras/z", Expect::Absent, "later")]).await.expect("commits");
        eventually("the copy following again", || value(&replica, "loras/z").is_some()).await;
        assert_eq!(value(&replica, "loras/x").as_deref(), Some("v1"));
        assert_eq!(value(&replica, "loras/y").as_deref(), Some("after"));
        eventually("the copy in step again", || replica.in_step()).await;
        assert_eq!(replica.trouble(), None);
        replica.commit(vec![Write::put("loras/mine", Expect::Absent, "v")]).await.expect("commits again");
        follower.abort();
    }
}
