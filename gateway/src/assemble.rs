//! The gateway's assembly: a [`GatewayConfig`] (what `switchyard gateway`'s flags say) becomes a
//! [`Gateway`] with its tenants, keys, backends, state store and replica, policies, manifests and
//! discovery. Everything that can be wrong with the configuration is found here, before any port
//! is bound, and said in one line naming the setting ([`BuildError`]).

use crate::auth::{AuthConfig, KeyError, Verifier};
use crate::loras::{LoraStore, StateError};
use crate::members::Connect;
use crate::policy::deploy::{DeployError, PolicyStore, StoreLimits};
use crate::policy::wasm::{PolicyRuntime, WasmLimits};
use crate::policy::{StaticPolicy, WasmPolicies};
use crate::store::{self, EtcdAccess, Location, Replica, StoreError};
use crate::tenants::GatewayFile;
use crate::upstream::{GrpcUpstream, Upstream, UpstreamSecurity, UpstreamTimeouts};
use crate::{Gateway, GatewayOptions};
use std::path::PathBuf;
use std::sync::Arc;

/// Everything a gateway is built from.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Configured backends' addresses (`http://` or `https://`).
    pub backends: Vec<String>,
    /// The CA of `https://` backends.
    pub backend_ca_file: Option<PathBuf>,
    /// The gateway's client certificate and key, for backends that require mutual TLS.
    pub backend_client: Option<(PathBuf, PathBuf)>,
    /// The credential sent on every backend call.
    pub backend_credential_file: Option<PathBuf>,
    /// Local state: the store when `store` is `None`, and where an earlier version kept its state.
    pub state_dir: PathBuf,
    /// The shared state store.
    pub store: Option<Location>,
    /// How to authenticate to an etcd store and check its members.
    pub store_access: EtcdAccess,
    /// The tenants file.
    pub tenants_file: Option<PathBuf>,
    /// A directory of `LoraAdapter` manifests to follow.
    pub manifests: Option<PathBuf>,
    pub auth: AuthConfig,
    pub options: GatewayOptions,
    pub policy_limits: WasmLimits,
    pub store_limits: StoreLimits,
}

/// Why a gateway cannot be built from its configuration. Variants that wrap another error
/// return it as their source (shown after the message by `{:#}`), not in their message.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("tenants file: {0}")]
    Tenants(String),
    #[error("JWT keys")]
    Keys(#[from] KeyError),
    #[error("no backend: pass --backend (or an etcd --store, where backends register themselves)")]
    NoBackend,
    #[error("tenants.{tenant}.backend {backend:?} is not one of the --backend addresses ({known})")]
    UnknownPin { tenant: String, backend: String, known: String },
    #[error("{0}")]
    Backend(String),
    #[error("cannot open the state store (--store): {0}")]
    Store(StoreError),
    #[error("cannot read the state store {store}")]
    StoreRead { store: String, source: StoreError },
    #[error("cannot import the adapter state of an earlier version")]
    ImportAdapters(#[from] StateError),
    #[error("deployed policies")]
    Policies(#[from] DeployError),
    #[error("policy host: {0}")]
    PolicyHost(String),
    #[error("--manifests: {0}")]
    Manifests(String),
    #[error("{0}")]
    Option(String),
}

impl GatewayConfig {
    /// Builds the gateway (connecting to the store and reading it; nothing is served yet).
    pub async fn build(mut self) -> Result<Arc<Gateway>, BuildError> {
        if self.options.probe_interval.is_zero() {
            return Err(BuildError::Option("--probe-interval-ms must be at least 1".into()));
        }
        if self.options.first_token_timeout.is_zero() {
            return Err(BuildError::Option("--first-token-timeout-ms must be at least 1".into()));
        }
        self.options.policy_headers =
            self.options.policy_headers.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        if self.options.policy_headers.iter().any(|h| h == "authorization") {
            return Err(BuildError::Option("--policy-headers may not pass authorization".into()));
        }
        let file = match &self.tenants_file {
            Some(path) => GatewayFile::load(path).map_err(BuildError::Tenants)?,
            None => GatewayFile::default(),
        };
        if file.tenants.is_empty() {
            tracing::warn!("no tenants configured (--config): every request will be refused");
        }
        let verifier = Verifier::new(self.auth.clone())?;
        let location = self.store.clone().unwrap_or_else(|| Location::Dir(self.state_dir.clone()));
        let discovers = matches!(location, Location::Etcd { .. });
        if !discovers && self.backends.is_empty() {
            return Err(BuildError::NoBackend);
        }
        for (name, t) in &file.tenants {
            // A discovered backend's address is known only once it registers.
            if let Some(b) = t.backend.as_ref().filter(|b| !discovers && !self.backends.contains(b)) {
                return Err(BuildError::UnknownPin {
                    tenant: name.clone(),
                    backend: b.clone(),
                    known: self.backends.join(", "),
                });
            }
        }
        let client = self.backend_client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let security = UpstreamSecurity::from_files(
            self.backend_ca_file.as_deref(),
            client,
            self.backend_credential_file.as_deref(),
        )
        .map_err(BuildError::Backend)?;
        if self.backend_credential_file.is_none() {
            tracing::warn!("no --backend-credential-file: backends that require a credential will refuse this gateway");
        }
        let mut backends: Vec<Arc<dyn Upstream>> = Vec::new();
        for address in &self.backends {
            let upstream =
                GrpcUpstream::new(address, UpstreamTimeouts::default(), &security).map_err(BuildError::Backend)?;
            backends.push(Arc::new(upstream));
        }
        let shared = store::open(&location, &self.store_access).await.map_err(BuildError::Store)?;
        let described = shared.describe();
        let replica =
            Replica::open(shared).await.map_err(|source| BuildError::StoreRead { store: described, source })?;
        let loras = LoraStore::new(replica.clone());
        loras.import_legacy(&self.state_dir).await?;
        let tenants = Arc::new(file.tenants);
        let runtime = Arc::new(PolicyRuntime::new(self.policy_limits).map_err(BuildError::PolicyHost)?);
        let policies = PolicyStore::open(replica, runtime, self.store_limits).await?;
        policies.import_legacy(&self.state_dir.join("policies")).await?;
        let engine = WasmPolicies::new(policies.clone(), Arc::new(StaticPolicy::new(tenants.clone())));
        let mut gateway = Gateway::new(backends, loras, tenants, Arc::new(engine), Arc::new(verifier), self.options)
            .with_policy_store(policies);
        if let Some(dir) = self.manifests {
            if !dir.is_dir() {
                return Err(BuildError::Manifests(format!("{} is not a directory", dir.display())));
            }
            crate::manifest::read(&dir).map_err(|e| BuildError::Manifests(e.to_string()))?;
            gateway = gateway.with_manifests(dir);
        }
        if discovers {
            gateway = gateway.with_discovery(Connect::new(move |address| {
                let upstream = GrpcUpstream::new(address, UpstreamTimeouts::default(), &security)?;
                Ok(Arc::new(upstream) as Arc<dyn Upstream>)
            }));
        }
        Ok(Arc::new(gateway))
    }
}
