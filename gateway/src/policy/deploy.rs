//! Deployed policies: uploaded component versions, and which one is active for each tenant
//! (or as the default), with the history that rollback walks back. Persisted in the state dir
//! (`policies/<id>.wasm` and `policies/policies.json`, each replaced atomically) and compiled
//! again at start-up, so a restarted gateway serves the same policies.
//!
//! The store is bounded: each tenant may keep at most [`StoreLimits::versions_per_tenant`]
//! versions and [`StoreLimits::bytes_per_tenant`] bytes of components, each scope remembers its
//! last [`StoreLimits::history_per_scope`] activations, and a version no activation (current or
//! in a history) names can be deleted, its file and compiled code with it. Version ids are per
//! uploader (a hash of the tenant and the bytes), so two tenants uploading the same component
//! get two versions and learn nothing of each other.
//!
//! Activation is atomic: a request takes the active deployment (an `Arc`) once, at its start,
//! and a new activation replaces it whole. A version is validated before anyone can activate
//! it (it must compile, link against the world and run a dry decision without a fault), and an
//! activation is validated with its configuration before it replaces the previous one.

use super::wasm::{CompiledPolicy, LoadError, PolicyFault, PolicyRuntime, WitDecision, WitRequest};
use crate::files::{self, FileError, failed};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// The activation key of the default policy (tenants without their own).
pub const DEFAULT_SCOPE: &str = "*";
/// Default limits of the store.
pub const DEFAULT_VERSIONS_PER_TENANT: usize = 16;
pub const DEFAULT_BYTES_PER_TENANT: u64 = 64 << 20;
pub const DEFAULT_HISTORY_PER_SCOPE: usize = 16;

/// How much each tenant may keep in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Versions one tenant may have uploaded and not deleted.
    pub versions_per_tenant: usize,
    /// Bytes of components one tenant may keep.
    pub bytes_per_tenant: u64,
    /// Activations each scope remembers for rollback (the current one included).
    pub history_per_scope: usize,
}

impl Default for StoreLimits {
    fn default() -> StoreLimits {
        StoreLimits {
            versions_per_tenant: DEFAULT_VERSIONS_PER_TENANT,
            bytes_per_tenant: DEFAULT_BYTES_PER_TENANT,
            history_per_scope: DEFAULT_HISTORY_PER_SCOPE,
        }
    }
}
const REGISTRY_FILE: &str = "policies.json";
const FORMAT_VERSION: u32 = 1;

/// One uploaded version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    /// 16 hex digits: a SHA-256 of the uploading tenant and the component.
    pub id: String,
    pub name: String,
    pub sha256: String,
    pub size: usize,
    /// Seconds since the Unix epoch.
    pub uploaded_at: u64,
    /// The tenant whose token uploaded it.
    pub uploaded_by: String,
}

/// One activation of a version, for a tenant or the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    pub id: String,
    /// The JSON the policy reads through `config()`.
    pub config: serde_json::Value,
    pub activated_at: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    version: u32,
    versions: BTreeMap<String, Version>,
    /// Per tenant (or [`DEFAULT_SCOPE`]): activations, the current one last.
    active: BTreeMap<String, Vec<Activation>>,
}

/// The deployment a request runs: compiled, with its configuration.
#[derive(Debug)]
pub struct Active {
    pub version: Version,
    pub policy: CompiledPolicy,
    pub config: Arc<str>,
    /// `name@id`, for logs.
    pub label: Arc<str>,
}

/// Why a deploy operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the policy failed its dry run: {0}")]
    DryRun(PolicyFault),
    #[error("{0}")]
    Quota(String),
    #[error(
        "policy version {id} is still named by the activations of {scopes}; activate another version (or roll back) first"
    )]
    InUse { id: String, scopes: String },
    #[error("no policy version {0:?}")]
    UnknownVersion(String),
    #[error("{0} has no earlier activation to roll back to")]
    NothingToRollBack(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Deployed policies.
pub struct PolicyStore {
    dir: PathBuf,
    runtime: Arc<PolicyRuntime>,
    limits: StoreLimits,
    /// Serialises changes (each writes the registry).
    changes: Mutex<()>,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    registry: Registry,
    compiled: HashMap<String, CompiledPolicy>,
    active: HashMap<String, Arc<Active>>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads and compiles the stored component of version `id`.
fn compile_stored(dir: &Path, runtime: &PolicyRuntime, id: &str) -> Result<CompiledPolicy, DeployError> {
    let file = dir.join(format!("{id}.wasm"));
    let bytes = std::fs::read(&file).map_err(failed("read", &file))?;
    Ok(runtime.compile(&bytes)?)
}

/// The request a version is dry-run with: a plain chat request on an empty cluster.
pub fn sample_request() -> WitRequest {
    super::wasm::request(&super::PolicyInput {
        tenant: "dry-run",
        subject: Some("dry-run-user"),
        scopes: &Default::default(),
        claims: &Default::default(),
        endpoint: super::Endpoint::ChatCompletions,
        model: "base",
        base_model: "base",
        headers: Vec::new(),
        stream: false,
        max_tokens: Some(16),
        prompt_chars: 32,
        backends: Vec::new(),
        adapters: Vec::new(),
    })
}

/// Checks a scope name: a tenant name or [`DEFAULT_SCOPE`].
fn check_scope(scope: &str) -> Result<(), DeployError> {
    let ok = scope == DEFAULT_SCOPE
        || (!scope.is_empty()
            && scope.len() <= 128
            && scope.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    if ok { Ok(()) } else { Err(DeployError::Invalid(format!("{scope:?} is not a tenant name or \"*\""))) }
}

impl PolicyStore {
    /// Opens the store in `dir`, compiling the versions its activations name.
    pub fn open(dir: &Path, runtime: Arc<PolicyRuntime>, limits: StoreLimits) -> Result<PolicyStore, DeployError> {
        std::fs::create_dir_all(dir).map_err(failed("create", dir))?;
        let path = dir.join(REGISTRY_FILE);
        let registry = match std::fs::read(&path) {
            Ok(bytes) => {
                let r: Registry = serde_json::from_slice(&bytes)
                    .map_err(|e| DeployError::Corrupt { path: path.clone(), reason: e.to_string() })?;
                if r.version != FORMAT_VERSION {
                    return Err(DeployError::Corrupt { path, reason: format!("format version {}", r.version) });
                }
                r
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Registry { version: FORMAT_VERSION, ..Default::default() }
            }
            Err(e) => return Err(failed("read", &path)(e).into()),
        };
        // Only versions some activation history names are compiled now (rollback may need
        // them); the others when they are activated.
        let mut compiled = HashMap::new();
        for id in registry.active.values().flatten().map(|a| &a.id) {
            if !compiled.contains_key(id) {
                compiled.insert(id.clone(), compile_stored(dir, &runtime, id)?);
            }
        }
        let store = PolicyStore {
            dir: dir.to_path_buf(),
            runtime,
            limits,
            changes: Mutex::new(()),
            state: RwLock::new(State::default()),
        };
        let active = store.resolve(&registry, &compiled)?;
        *store.write() = State { registry, compiled, active };
        Ok(store)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn runtime(&self) -> &Arc<PolicyRuntime> {
        &self.runtime
    }

    /// The current activation of every scope.
    fn resolve(
        &self,
        registry: &Registry,
        compiled: &HashMap<String, CompiledPolicy>,
    ) -> Result<HashMap<String, Arc<Active>>, DeployError> {
        let mut active = HashMap::new();
        for (scope, history) in &registry.active {
            let Some(current) = history.last() else { continue };
            let version =
                registry.versions.get(&current.id).ok_or_else(|| DeployError::UnknownVersion(current.id.clone()))?;
            let policy = compiled.get(&current.id).ok_or_else(|| DeployError::UnknownVersion(current.id.clone()))?;
            active.insert(
                scope.clone(),
                Arc::new(Active {
                    version: version.clone(),
                    policy: policy.clone(),
                    config: Arc::from(current.config.to_string()),
                    label: Arc::from(format!("{}@{}", version.name, version.id)),
                }),
            );
        }
        Ok(active)
    }

    /// The deployment for `tenant`: its own, else the default.
    pub fn active_for(&self, tenant: &str) -> Option<Arc<Active>> {
        let state = self.read();
        state.active.get(tenant).or_else(|| state.active.get(DEFAULT_SCOPE)).cloned()
    }

    /// Every version, and every scope's activation history (current last).
    pub fn list(&self) -> (Vec<Version>, BTreeMap<String, Vec<Activation>>) {
        let state = self.read();
        (state.registry.versions.values().cloned().collect(), state.registry.active.clone())
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Version `id`, if stored.
    pub fn version(&self, id: &str) -> Option<Version> {
        self.read().registry.versions.get(id).cloned()
    }

    /// Whether `scope`'s activation history names version `id`.
    pub fn in_history(&self, scope: &str, id: &str) -> bool {
        self.read().registry.active.get(scope).is_some_and(|h| h.iter().any(|a| a.id == id))
    }

    /// Refuses an upload of `size` more bytes by `tenant` past its limits (`size` 0: only
    /// whether it may add a version at all).
    pub fn check_quota(&self, tenant: &str, size: usize) -> Result<(), DeployError> {
        let state = self.read();
        let mine = state.registry.versions.values().filter(|v| v.uploaded_by == tenant);
        let (count, bytes) = mine.fold((0usize, 0u64), |(n, b), v| (n + 1, b + v.size as u64));
        let l = &self.limits;
        if count >= l.versions_per_tenant {
            return Err(DeployError::Quota(format!(
                "tenant {tenant:?} keeps {count} policy versions, its limit; delete one it no longer needs (DELETE /v1/policies/{{id}})"
            )));
        }
        if bytes + size as u64 > l.bytes_per_tenant {
            return Err(DeployError::Quota(format!(
                "tenant {tenant:?} keeps {bytes} bytes of policy components; {size} more would pass its limit of {}; delete versions it no longer needs (DELETE /v1/policies/{{id}})",
                l.bytes_per_tenant
            )));
        }
        Ok(())
    }

    /// Deletes version `id`: its registry entry, its file and its compiled code. Refused while
    /// any scope's activations (current or in the history rollback walks) name it.
    pub fn delete(&self, id: &str) -> Result<Version, DeployError> {
        let _change = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut registry = self.read().registry.clone();
        let scopes: Vec<&str> = registry
            .active
            .iter()
            .filter(|(_, history)| history.iter().any(|a| a.id == id))
            .map(|(scope, _)| if scope == DEFAULT_SCOPE { "the default policy" } else { scope.as_str() })
            .collect();
        if !scopes.is_empty() {
            return Err(DeployError::InUse { id: id.to_string(), scopes: scopes.join(", ") });
        }
        let version = registry.versions.remove(id).ok_or_else(|| DeployError::UnknownVersion(id.to_string()))?;
        self.persist(&registry)?;
        {
            let mut state = self.write();
            state.registry = registry;
            state.compiled.remove(id);
        }
        // The registry no longer names the file: a failure to remove it leaves only an orphan
        // that the next upload of the same bytes overwrites.
        let file = self.dir.join(format!("{id}.wasm"));
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(file = %file.display(), error = %e, "cannot remove a deleted policy version's file");
        }
        Ok(version)
    }

    /// Runs `policy` once on the sample request (blocking).
    fn dry_run(&self, policy: &CompiledPolicy, config: &str) -> Result<WitDecision, PolicyFault> {
        self.runtime.decide(policy, &sample_request(), Arc::from(config), Arc::from("dry-run"))
    }

    /// Validates and stores a component (blocking: compiles it). The same tenant uploading the
    /// same bytes again gets the existing version; past the tenant's limits it is refused.
    pub fn upload(&self, name: &str, bytes: &[u8], tenant: &str) -> Result<Version, DeployError> {
        if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(DeployError::Invalid(format!("policy name {name:?}: use 1-128 of A-Z a-z 0-9 - _ .")));
        }
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let sha256 = hex(&Sha256::digest(bytes));
        let id = hex(&Sha256::new().chain_update(tenant.as_bytes()).chain_update([0]).chain_update(bytes).finalize())
            [..16]
            .to_string();
        if let Some(v) = self.read().registry.versions.get(&id) {
            return Ok(v.clone());
        }
        self.check_quota(tenant, bytes.len())?;
        let policy = self.runtime.compile(bytes)?;
        // A fault (trap, deadline, limit) fails the upload; an error value is the policy
        // complaining about the empty configuration, which activation checks again.
        match self.dry_run(&policy, "{}") {
            Ok(_) | Err(PolicyFault::Failed(_)) => {}
            Err(fault) => return Err(DeployError::DryRun(fault)),
        }
        let _change = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Again under the lock: another upload of this tenant's may have finished meanwhile.
        self.check_quota(tenant, bytes.len())?;
        let file = self.dir.join(format!("{id}.wasm"));
        files::replace(&file, bytes)?;
        let version = Version {
            id: id.clone(),
            name: name.to_string(),
            sha256,
            size: bytes.len(),
            uploaded_at: now(),
            uploaded_by: tenant.to_string(),
        };
        let mut registry = self.read().registry.clone();
        registry.versions.insert(id.clone(), version.clone());
        self.persist(&registry)?;
        let mut state = self.write();
        state.registry = registry;
        state.compiled.insert(id, policy);
        Ok(version)
    }

    /// Makes version `id` with `config` the active policy of `scope` (blocking: dry-runs it).
    pub fn activate(&self, scope: &str, id: &str, config: serde_json::Value) -> Result<Activation, DeployError> {
        check_scope(scope)?;
        let cached = self.read().compiled.get(id).cloned();
        let policy = match cached {
            Some(policy) => policy,
            None => {
                if !self.read().registry.versions.contains_key(id) {
                    return Err(DeployError::UnknownVersion(id.to_string()));
                }
                let policy = compile_stored(&self.dir, &self.runtime, id)?;
                self.write().compiled.insert(id.to_string(), policy.clone());
                policy
            }
        };
        self.dry_run(&policy, &config.to_string()).map_err(DeployError::DryRun)?;
        let _change = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let activation = Activation { id: id.to_string(), config, activated_at: now() };
        let mut registry = self.read().registry.clone();
        let history = registry.active.entry(scope.to_string()).or_default();
        history.push(activation.clone());
        let keep = self.limits.history_per_scope.max(1);
        if history.len() > keep {
            history.drain(..history.len() - keep);
        }
        self.commit(registry)?;
        Ok(activation)
    }

    /// Goes back to `scope`'s previous activation.
    pub fn rollback(&self, scope: &str) -> Result<Activation, DeployError> {
        check_scope(scope)?;
        let _change = self.changes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut registry = self.read().registry.clone();
        let history = registry.active.get_mut(scope).filter(|h| h.len() >= 2);
        let Some(history) = history else { return Err(DeployError::NothingToRollBack(scope.to_string())) };
        history.pop();
        let current = history.last().cloned().ok_or_else(|| DeployError::NothingToRollBack(scope.to_string()))?;
        self.commit(registry)?;
        Ok(current)
    }

    /// Persists `registry`, then swaps the active deployments in one step.
    fn commit(&self, registry: Registry) -> Result<(), DeployError> {
        let active = self.resolve(&registry, &self.read().compiled)?;
        self.persist(&registry)?;
        let mut state = self.write();
        state.registry = registry;
        state.active = active;
        Ok(())
    }

    fn persist(&self, registry: &Registry) -> Result<(), DeployError> {
        let path = self.dir.join(REGISTRY_FILE);
        let bytes = serde_json::to_vec_pretty(registry)
            .map_err(|e| DeployError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        Ok(files::replace(&path, &bytes)?)
    }
}
