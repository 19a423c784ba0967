//! The Switchyard gateway: an OpenAI-compatible HTTP endpoint in front of many backends. It
//! verifies each caller's JWT, asks the tenant's routing policy which adapter (and possibly
//! which backend) a request is for, picks a backend that has or can load that adapter, and
//! forwards the request over gRPC. It also serves the adapter load API and the policy deploy
//! API, over a state store that any number of gateways may share.
//!
//! Layout: [`assemble`] (configuration → gateway), [`error`] (the one error type and its
//! codes), [`auth`] (JWTs), [`authz`] (what a caller may do), [`openai`] (request bodies, and
//! errors in OpenAI's shape and statuses), [`policy`] (the routing decision), [`store`] (the
//! shared state and this gateway's replica of it), [`leader`] (who drives the backends),
//! [`members`] (the backends, configured and discovered), [`cluster`] (the routing table and
//! placement), [`upstream`] (the seam to a backend and its gRPC implementation), [`loras`] (the
//! desired set), [`admin`] (adapter operations), [`manifest`] and [`declare`] (declared
//! adapters), [`reconcile`] (probes, re-applying, discovery), [`dispatch`] (sending a request
//! to a backend), [`http`] (the axum servers), [`metrics`].

pub mod admin;
pub mod assemble;
pub mod auth;
pub mod authz;
pub mod cluster;
pub mod declare;
pub mod dispatch;
pub mod error;
pub mod files;
pub mod http;
pub mod leader;
pub mod loras;
pub mod manifest;
pub mod members;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod prefix;
pub mod quota;
pub mod reconcile;
pub mod store;
pub mod tenants;
pub mod upstream;

use crate::auth::Verifier;
use crate::cluster::BackendView;
use crate::loras::LoraStore;
use crate::members::{Connect, Members};
use crate::metrics::Metrics;
use crate::policy::PolicyEngine;
use crate::tenants::Tenant;
use crate::upstream::Upstream;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Default largest request body.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Default time between health probes of each backend.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Generous: a long prompt behind a full queue on a busy backend still gets its first token,
/// while a wedged engine does not hold a client (and a connection) forever.
pub const DEFAULT_FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(300);
/// `Retry-After` seconds sent with a 503.
pub const RETRY_AFTER_S: u64 = 2;

/// Knobs of the gateway that are not the components themselves.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub max_body_bytes: usize,
    pub probe_interval: Duration,
    /// How long a request may wait for its first token (across the backends it is tried on)
    /// before it is answered 504 and cancelled there.
    pub first_token_timeout: Duration,
    /// Request headers passed to routing policies (lower-case; `authorization` is never passed).
    pub policy_headers: Vec<String>,
    /// Names this gateway among its fleet (in leadership and operation records).
    pub instance: String,
    /// Route requests toward the backend that caches most of their prompt ([`prefix`]).
    pub prefix_routing: bool,
    /// What a request waiting or running on a backend costs, in prompt tokens, when routing by
    /// cached prefix.
    pub prefix_queue_cost: usize,
}

/// A name for this gateway process: the host's name (`$HOSTNAME`, as Kubernetes sets it to the
/// pod's), the process id and a random part, so restarts and replicas never share one.
pub fn default_instance() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "gateway".into());
    format!("{host}-{}-{:06x}", std::process::id(), random_u64() & 0xff_ffff)
}

/// Seconds since the Unix epoch (0 before it), for the times records carry.
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A random number from the operating system (for ids, not secrets: falls back to the clock).
pub(crate) fn random_u64() -> u64 {
    use rand::TryRngCore;
    rand::rngs::OsRng.try_next_u64().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (t.as_nanos() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    })
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            first_token_timeout: DEFAULT_FIRST_TOKEN_TIMEOUT,
            policy_headers: Vec::new(),
            instance: default_instance(),
            prefix_routing: true,
            prefix_queue_cost: prefix::DEFAULT_QUEUE_COST_TOKENS,
        }
    }
}

/// Everything a request handler needs, shared by all of them.
#[derive(Debug)]
pub struct Gateway {
    /// The backends, keyed by address: configured, and found by discovery.
    pub(crate) members: Members,
    /// Makes the client of a backend found by discovery; `None`: no discovery.
    connect: Option<Connect>,
    pub(crate) loras: LoraStore,
    pub(crate) tenants: Arc<BTreeMap<String, Tenant>>,
    pub(crate) policy: Arc<dyn PolicyEngine>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) metrics: Metrics,
    /// Every tenant's quota budgets, counted in the state store's counters.
    pub(crate) quotas: Arc<quota::Quotas>,
    pub(crate) options: GatewayOptions,
    /// What each backend caches, as its prefix cache watch says.
    pub(crate) prefixes: prefix::PrefixIndex,
    /// Per adapter name: admin operations and re-applies of one name run one at a time.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The base model's name, from the first backend that answered a probe.
    base_model: RwLock<Option<String>>,
    /// Deployed WebAssembly policies, when the policy host is enabled.
    pub(crate) policies: Option<Arc<policy::deploy::PolicyStore>>,
    /// Whether this gateway drives the backends now, and its fencing token.
    pub(crate) leadership: Arc<leader::Leadership>,
    /// The directory of `LoraAdapter` manifests to follow ([`declare`]).
    manifests: Option<std::path::PathBuf>,
}

impl Gateway {
    pub fn new(
        backends: Vec<Arc<dyn Upstream>>,
        loras: LoraStore,
        tenants: Arc<BTreeMap<String, Tenant>>,
        policy: Arc<dyn PolicyEngine>,
        verifier: Arc<Verifier>,
        options: GatewayOptions,
    ) -> Gateway {
        let quotas = Arc::new(quota::Quotas::new(loras.replica().store().clone()));
        Gateway {
            members: Members::new(backends),
            connect: None,
            quotas,
            loras,
            tenants,
            policy,
            verifier,
            metrics: Metrics::new(),
            turns: Mutex::new(HashMap::new()),
            prefixes: prefix::PrefixIndex::default(),
            base_model: RwLock::new(None),
            policies: None,
            leadership: Arc::new(leader::Leadership::new(options.instance.clone())),
            manifests: None,
            options,
        }
    }

    /// Serves the policy deploy API from `store` (the policy engine should consult it too).
    pub fn with_policy_store(mut self, store: Arc<policy::deploy::PolicyStore>) -> Gateway {
        self.policies = Some(store);
        self
    }

    /// Finds backends registered in the state store (`connect` makes their clients), besides
    /// the configured ones.
    pub fn with_discovery(mut self, connect: Connect) -> Gateway {
        self.connect = Some(connect);
        self
    }

    /// Follows the `LoraAdapter` manifests in `dir` (while this gateway leads).
    pub fn with_manifests(mut self, dir: std::path::PathBuf) -> Gateway {
        self.manifests = Some(dir);
        self
    }

    pub(crate) fn discovery(&self) -> Option<&Connect> {
        self.connect.as_ref()
    }

    /// The routing table as of now, in address order.
    pub fn views(&self) -> Vec<BackendView> {
        self.members.views()
    }

    /// Reads one backend's row without copying the table.
    pub(crate) fn read_view<R>(&self, id: &str, f: impl FnOnce(&BackendView) -> R) -> Option<R> {
        self.members.read_view(id, f)
    }

    pub(crate) fn with_view<R>(&self, id: &str, f: impl FnOnce(&mut BackendView) -> R) -> Option<R> {
        self.members.with_view(id, f)
    }

    /// Whether at least one backend is healthy.
    pub fn ready(&self) -> bool {
        self.members.any_healthy()
    }

    pub fn base_model(&self) -> Option<String> {
        self.base_model.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    pub(crate) fn set_base_model(&self, name: &str) {
        let mut base = self.base_model.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if base.as_deref() != Some(name) {
            if let Some(old) = base.as_deref() {
                tracing::warn!(old, new = name, "backends report a different base model");
            }
            *base = Some(name.to_string());
        }
    }

    /// The turn lock of one adapter name.
    pub(crate) fn turn(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget locks nobody holds or waits for.
        turns.retain(|_, t| Arc::strong_count(t) > 1);
        turns.entry(name.to_string()).or_default().clone()
    }

    /// The caller behind a verified token, if its tenant is configured (see [`authz`]).
    pub fn caller(&self, who: &auth::Principal) -> Result<authz::Caller<'_>, authz::Denied> {
        authz::caller(&self.tenants, who)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn loras(&self) -> &LoraStore {
        &self.loras
    }

    /// This gateway's copy of the shared desired state.
    pub fn replica(&self) -> &Arc<store::Replica> {
        self.loras.replica()
    }

    pub fn leadership(&self) -> &Arc<leader::Leadership> {
        &self.leadership
    }

    /// Starts what keeps the shared state moving: following the store, campaigning for the
    /// lead, and (while leading) running adapter operations. The probes are [`reconcile::spawn`].
    pub fn spawn_state_tasks(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let gw = self.clone();
        let gauge = tokio::spawn(async move {
            let mut lead = gw.leadership.subscribe();
            loop {
                let leads = lead.borrow_and_update().is_some();
                gw.metrics.leading(leads);
                if lead.changed().await.is_err() {
                    break;
                }
            }
        });
        let mut tasks = vec![
            self.replica().follow(),
            self.leadership.spawn(self.replica().store().clone()),
            admin::execute::spawn(self.clone()),
            gauge,
        ];
        tasks.extend(self.policies.as_ref().map(|p| p.follow()));
        tasks.extend(self.manifests.clone().map(|dir| declare::spawn(self.clone(), dir)));
        tasks
    }
}

/// Serves the gateway on `listener` (the public API) and, when given, `metrics` (the operators'
/// listener with `/metrics`) until `shutdown` resolves: the HTTP apps, one probe-and-reconcile
/// task per backend, and the JWKS reloader.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut tasks = gw.spawn_state_tasks();
    tasks.extend(reconcile::spawn(gw.clone()));
    if gw.verifier.config().jwks_file.is_some() {
        tasks.push(auth::spawn_reloader(gw.verifier.clone(), JWKS_RELOAD_INTERVAL));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tasks.push(tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    }));
    let signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let public = http::serve(listener, http::router(gw.clone()), signal());
    let served = match metrics {
        Some(m) => {
            let (a, b) = tokio::join!(public, http::serve(m, http::metrics_router(gw.clone()), signal()));
            a.and(b)
        }
        None => public.await,
    };
    for t in tasks {
        t.abort();
    }
    gw.members.stop();
    served
}

/// How often the JWKS file is checked for changes.
pub const JWKS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
