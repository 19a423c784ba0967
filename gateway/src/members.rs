//! The backends this gateway knows, keyed by identity (the address it reaches them at): the
//! static ones from `--backend`, and, with an etcd store, those that registered themselves under
//! a lease ([`switchyard_fleet::registration`]), added and removed as their records come and go.
//! Each has its client, its row of the routing table ([`BackendView`]) and its probe task.

use crate::cluster::BackendView;
use crate::upstream::Upstream;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// What makes a backend's client from its address (or says why it cannot).
type Connector = dyn Fn(&str) -> Result<Arc<dyn Upstream>, String> + Send + Sync;

/// Makes the client of a backend found by discovery, from its registered address.
#[derive(Clone)]
pub struct Connect(Arc<Connector>);

impl Connect {
    pub fn new(f: impl Fn(&str) -> Result<Arc<dyn Upstream>, String> + Send + Sync + 'static) -> Connect {
        Connect(Arc::new(f))
    }

    /// The client of the backend at `address`, or why it cannot be made.
    pub fn connect(&self, address: &str) -> Result<Arc<dyn Upstream>, String> {
        (self.0)(address)
    }
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connect")
    }
}

struct Member {
    upstream: Arc<dyn Upstream>,
    view: BackendView,
    /// Found by discovery (and so removed when its registration goes), not configured.
    registered: bool,
    probe: Option<tokio::task::AbortHandle>,
}

/// Every backend this gateway routes to.
#[derive(Default)]
pub struct Members {
    inner: RwLock<BTreeMap<String, Member>>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.ids()).finish()
    }
}

fn view_of(upstream: &dyn Upstream) -> BackendView {
    BackendView {
        address: upstream.address().to_string(),
        last_error: Some("not probed yet".into()),
        ..Default::default()
    }
}

impl Members {
    /// The configured backends.
    pub fn new(configured: Vec<Arc<dyn Upstream>>) -> Members {
        let members = Members::default();
        for upstream in configured {
            members.add(upstream, false);
        }
        members
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Member>> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Member>> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a backend unless one with its address is known. Returns whether it was added.
    pub fn add(&self, upstream: Arc<dyn Upstream>, registered: bool) -> bool {
        let id = upstream.address().to_string();
        let mut members = self.write();
        if members.contains_key(&id) {
            return false;
        }
        let view = view_of(upstream.as_ref());
        members.insert(id, Member { upstream, view, registered, probe: None });
        true
    }

    /// Removes a backend found by discovery (its probe task stops). Configured ones stay.
    pub fn remove_registered(&self, id: &str) -> bool {
        let mut members = self.write();
        if !members.get(id).is_some_and(|m| m.registered) {
            return false;
        }
        if let Some(probe) = members.remove(id).and_then(|m| m.probe) {
            probe.abort();
        }
        true
    }

    /// Records the task probing `id`, so removing the backend stops it.
    pub fn set_probe(&self, id: &str, probe: tokio::task::AbortHandle) {
        match self.write().get_mut(id) {
            Some(m) => m.probe = Some(probe),
            None => probe.abort(),
        }
    }

    pub fn upstream(&self, id: &str) -> Option<Arc<dyn Upstream>> {
        self.read().get(id).map(|m| m.upstream.clone())
    }

    /// Every backend's address, in order.
    pub fn ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The addresses of the backends found by discovery.
    pub fn registered(&self) -> Vec<String> {
        self.read().iter().filter(|(_, m)| m.registered).map(|(id, _)| id.clone()).collect()
    }

    /// The routing table as of now, in address order.
    pub fn views(&self) -> Vec<BackendView> {
        self.read().values().map(|m| m.view.clone()).collect()
    }

    /// Reads one backend's row without copying the table.
    pub fn read_view<R>(&self, id: &str, f: impl FnOnce(&BackendView) -> R) -> Option<R> {
        self.read().get(id).map(|m| f(&m.view))
    }

    pub fn with_view<R>(&self, id: &str, f: impl FnOnce(&mut BackendView) -> R) -> Option<R> {
        self.write().get_mut(id).map(|m| f(&mut m.view))
    }

    /// Stops every probe task (the gateway is shutting down).
    pub fn stop(&self) {
        for m in self.write().values_mut() {
            if let Some(p) = m.probe.take() {
                p.abort();
            }
        }
    }

    /// Whether at least one backend is healthy.
    pub fn any_healthy(&self) -> bool {
        self.read().values().any(|m| m.view.healthy)
    }
}
