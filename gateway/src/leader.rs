//! Which gateway drives the backends' adapters. Every gateway probes every backend and routes
//! requests; only the leader loads and unloads: it runs the adapter operations other gateways
//! record ([`crate::admin`]) and the reconcilers' corrections ([`crate::reconcile`]). Each of
//! its calls carries its fencing token, and a backend refuses tokens below the highest it has
//! seen, so a leader that was replaced while it stalled (and has not noticed) changes nothing.
//!
//! Why a leader, rather than each backend reconciling its own assignment from the store: static
//! `--backend` backends keep working the same way, backends stay free of the store's schema
//! (they only register themselves), and placement is decided with every backend's load and
//! slots in view, in one place.
//!
//! Leadership comes from the state store ([`crate::store::StateStore::lead`]): an etcd lease
//! (a dead leader is replaced within its TTL) or, in a local directory, a file lock held for
//! the life of the process.

use crate::store::StateStore;
use std::sync::Arc;
use std::time::Duration;

/// Pause before campaigning again after the store failed.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// This gateway's part in leadership: the fencing token while it leads.
#[derive(Debug)]
pub struct Leadership {
    /// Names this gateway in the store.
    holder: String,
    token: tokio::sync::watch::Sender<Option<u64>>,
}

impl Leadership {
    pub fn new(holder: impl Into<String>) -> Leadership {
        Leadership { holder: holder.into(), token: tokio::sync::watch::Sender::new(None) }
    }

    /// The fencing token, while this gateway leads.
    pub fn token(&self) -> Option<u64> {
        *self.token.borrow()
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Wakes whenever leadership is won or lost.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.token.subscribe()
    }

    /// Campaigns until the task is aborted: leads while it can, then campaigns again.
    pub fn spawn(self: &Arc<Self>, store: Arc<dyn StateStore>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match store.lead(&me.holder).await {
                    Ok(mut lead) => {
                        tracing::info!(holder = %me.holder, token = lead.token, "this gateway leads: it drives the backends' adapters");
                        me.token.send_replace(Some(lead.token));
                        lead.lost().await;
                        me.token.send_replace(None);
                        tracing::warn!(holder = %me.holder, "this gateway lost the lead (its lease could not be renewed)");
                    }
                    Err(e) => {
                        tracing::warn!(holder = %me.holder, error = %e, "cannot campaign for the lead");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
            }
        })
    }
}
