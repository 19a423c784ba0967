//! This gateway's copy of the desired state: the last snapshot it read, kept current by a watch.
//!
//! Reads ([`Replica::current`]) never wait on the store, so requests are served from the last
//! known state while the store is unreachable. The follower task ([`Replica::follow`]) watches
//! from the copy's revision; when the watch ends it watches again from where it got to, and
//! when the store has compacted that history it reads a new snapshot. A commit through the
//! replica returns once the copy holds it, so a caller reads its own writes.

use super::{Batch, Revision, Snapshot, StateStore, StoreError, Write};
use futures::StreamExt;
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
}

impl Replica {
    /// Reads the first snapshot; fails when the store cannot be read.
    pub async fn open(store: Arc<dyn StateStore>) -> Result<Arc<Replica>, StoreError> {
        let first = store.snapshot().await?;
        let (revision, _) = tokio::sync::watch::channel(first.revision);
        Ok(Arc::new(Replica { store, state: RwLock::new(Arc::new(first)), revision, trouble: RwLock::new(None) }))
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

    /// Commits `writes` to the store; returns once the copy holds them.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<Revision, StoreError> {
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
                let why = me.follow_once().await;
                me.set_trouble(Some(why.to_string()));
                if matches!(why, StoreError::Compacted { .. }) {
                    match me.resync().await {
                        Ok(()) => me.set_trouble(None),
                        Err(e) => me.set_trouble(Some(e.to_string())),
                    }
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        })
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
