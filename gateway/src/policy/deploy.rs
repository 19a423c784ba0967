//! Deployed policies: uploaded component versions, and which one is active for each tenant
//! (or as the default), with the history that rollback walks back. They live in the shared
//! state store ([`crate::store`]), so every gateway of a fleet runs the same policies:
//!
//! - `policies/versions/<id>`: a version (name, size, SHA-256, uploader) and the name of the
//!   blob holding its component, written for it alone before the record (so deleting a version
//!   and its blob can never take a component from another record);
//! - `policies/active/<scope>`: a scope's activations, the current one last;
//! - `policies/usage/<tenant>`: what a tenant's versions take, changed in the same transaction
//!   as them, so a quota holds however many gateways take uploads.
//!
//! Every gateway follows its replica: it compiles the versions its scopes' current activations
//! name (fetching and checking the component), and swaps its active deployments whole; a
//! request takes the active deployment (an `Arc`) once, at its start. Changes are
//! compare-and-set transactions, retried when another gateway changed the same record first.
//!
//! The store is bounded: each tenant may keep at most [`StoreLimits::versions_per_tenant`]
//! versions and [`StoreLimits::bytes_per_tenant`] bytes of components, each scope remembers its
//! last [`StoreLimits::history_per_scope`] activations, and a version no activation (current or
//! in a history) names can be deleted, its blob and compiled code with it. Version ids are per
//! uploader (a hash of the tenant and the bytes), so two tenants uploading the same component
//! get two versions and learn nothing of each other.
//!
//! A version is validated before anyone can activate it (it must compile, link against the
//! world and run a dry decision without a fault), and an activation is validated with its
//! configuration before it replaces the previous one.

use super::HostView;
use super::wasm::{CompiledPolicy, Deployment, LoadError, PolicyFault, PolicyRuntime, WitDecision, WitRequest};
use crate::files::{FileError, failed};
use crate::store::{Expect, Replica, Revision, Snapshot, StoreError, Write};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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

/// The deployment a request runs: compiled, with its configuration.
#[derive(Debug)]
pub struct Active {
    pub version: Version,
    pub deployment: Arc<Deployment>,
}

const VERSIONS: &str = "policies/versions/";
const ACTIVE: &str = "policies/active/";
const USAGE: &str = "policies/usage/";
/// How often a change that lost a compare-and-set race is tried again.
const ATTEMPTS: usize = 8;

/// A version as stored: the version and its component's blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRecord {
    version: Version,
    blob: String,
}

/// What one tenant's versions take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Usage {
    versions: usize,
    bytes: u64,
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
    Store(#[from] StoreError),
    #[error("{0} was changed by other requests too often; retry")]
    Contended(String),
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl From<DeployError> for crate::error::Error {
    fn from(e: DeployError) -> crate::error::Error {
        use crate::error::{Code, Error};
        let code = match &e {
            DeployError::Load(LoadError::TooLarge { limit, .. }) => return Error::too_large(*limit),
            DeployError::Load(_) => Code::InvalidPolicy,
            DeployError::DryRun(_) => Code::PolicyDryRunFailed,
            DeployError::UnknownVersion(_) => Code::PolicyNotFound,
            DeployError::Quota(_) => Code::PolicyQuotaExceeded,
            DeployError::InUse { .. } => Code::PolicyInUse,
            DeployError::NothingToRollBack(_) => Code::NothingToRollBack,
            DeployError::Invalid(_) | DeployError::Store(StoreError::Invalid(_)) => Code::InvalidRequest,
            DeployError::Contended(_) | DeployError::Store(StoreError::Conflict { .. }) => Code::ChangedConcurrently,
            DeployError::Store(StoreError::Unavailable { .. }) => Code::StateUnavailable,
            DeployError::Store(_) | DeployError::Io(_) | DeployError::Corrupt { .. } => Code::StateDamaged,
        };
        Error::new(code, e.to_string())
    }
}

/// The policy records of one replica revision, decoded.
#[derive(Debug, Default)]
struct Records {
    revision: Revision,
    versions: BTreeMap<String, (VersionRecord, Revision)>,
    /// Per tenant (or [`DEFAULT_SCOPE`]): activations, the current one last.
    active: BTreeMap<String, (Vec<Activation>, Revision)>,
    usage: BTreeMap<String, (Usage, Revision)>,
}

fn decode<T: serde::de::DeserializeOwned>(snapshot: &Snapshot, prefix: &str) -> BTreeMap<String, (T, Revision)> {
    snapshot
        .under(prefix)
        .filter_map(|(key, entry)| match serde_json::from_str(&entry.value) {
            Ok(v) => Some((key.to_string(), (v, entry.mod_revision))),
            Err(e) => {
                tracing::warn!(key = %format!("{prefix}{key}"), error = %e, "ignoring a policy record this gateway cannot read");
                None
            }
        })
        .collect()
}

impl Records {
    fn of(snapshot: &Snapshot) -> Records {
        Records {
            revision: snapshot.revision,
            versions: decode(snapshot, VERSIONS),
            active: decode(snapshot, ACTIVE),
            usage: decode(snapshot, USAGE),
        }
    }

    fn version(&self, id: &str) -> Option<&(VersionRecord, Revision)> {
        self.versions.get(id)
    }

    fn history(&self, scope: &str) -> (Vec<Activation>, Expect) {
        self.active.get(scope).map_or((Vec::new(), Expect::Absent), |(h, r)| (h.clone(), Expect::At(*r)))
    }

    fn usage(&self, tenant: &str) -> (Usage, Expect) {
        self.usage.get(tenant).map_or((Usage::default(), Expect::Absent), |(u, r)| (*u, Expect::At(*r)))
    }
}

fn json<T: Serialize>(value: &T) -> Result<String, DeployError> {
    serde_json::to_string(value).map_err(|e| DeployError::Invalid(e.to_string()))
}

fn usage_write(tenant: &str, usage: Usage, expect: Expect) -> Result<Write, DeployError> {
    Ok(Write::put(format!("{USAGE}{tenant}"), expect, json(&usage)?))
}

/// Deployed policies, as this gateway follows them.
pub struct PolicyStore {
    replica: Arc<Replica>,
    runtime: Arc<PolicyRuntime>,
    limits: StoreLimits,
    /// One sync at a time.
    syncing: tokio::sync::Mutex<()>,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    records: Arc<Records>,
    /// Compiled components, by version id.
    compiled: HashMap<String, CompiledPolicy>,
    active: HashMap<String, Arc<Active>>,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore").field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn now() -> u64 {
    crate::unix_seconds()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs blocking work (compiling, dry runs) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeployError> + Send + 'static,
) -> Result<T, DeployError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DeployError::Invalid(format!("policy task failed: {e}")))?
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
        prefix: None,
        features: super::Features::default(),
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
    /// The deployed policies of `replica`, with the versions its activations name compiled.
    pub async fn open(
        replica: Arc<Replica>,
        runtime: Arc<PolicyRuntime>,
        limits: StoreLimits,
    ) -> Result<Arc<PolicyStore>, DeployError> {
        let store = Arc::new(PolicyStore {
            replica,
            runtime,
            limits,
            syncing: tokio::sync::Mutex::new(()),
            state: RwLock::new(State::default()),
        });
        store.sync().await;
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

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// The records as of the replica now (decoded again only after a change).
    fn records(&self) -> Arc<Records> {
        let snapshot = self.replica.current();
        let cached = self.read().records.clone();
        if cached.revision == snapshot.revision && snapshot.revision != 0 {
            return cached;
        }
        Arc::new(Records::of(&snapshot))
    }

    /// Follows the replica: every change is synced. Runs until the task is aborted.
    pub fn follow(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut changes = me.replica.subscribe();
            while changes.changed().await.is_ok() {
                me.sync().await;
            }
        })
    }

    /// Brings the active deployments to the replica's records: compiles what the current
    /// activations name and this gateway lacks, then swaps them whole. A version that cannot
    /// be fetched or compiled keeps its scope on what it ran before (and says so).
    pub async fn sync(&self) {
        let _one = self.syncing.lock().await;
        let records = Arc::new(Records::of(&self.replica.current()));
        let wanted: Vec<String> = records.active.values().filter_map(|(h, _)| h.last()).map(|a| a.id.clone()).collect();
        for id in wanted {
            if self.read().compiled.contains_key(&id) {
                continue;
            }
            let Some((record, _)) = records.version(&id) else { continue };
            match self.fetch_and_compile(record).await {
                Ok(policy) => {
                    self.write().compiled.insert(id, policy);
                }
                Err(e) => tracing::warn!(id = %id, error = %e, "cannot compile an activated policy version"),
            }
        }
        let mut state = self.write();
        let mut active = HashMap::new();
        for (scope, (history, _)) in &records.active {
            let Some(current) = history.last() else { continue };
            let config = current.config.to_string();
            // An unchanged deployment stays as it is, with the instances it made ahead.
            let same =
                state.active.get(scope).filter(|a| a.version.id == current.id && **a.deployment.config() == *config);
            let built = same.cloned().or_else(|| {
                records.version(&current.id).zip(state.compiled.get(&current.id)).map(|((r, _), policy)| {
                    let label = Arc::from(format!("{}@{}", r.version.name, r.version.id));
                    let deployment = Deployment::new(self.runtime.clone(), policy.clone(), Arc::from(config), label);
                    Arc::new(Active { version: r.version.clone(), deployment: Arc::new(deployment) })
                })
            });
            if let Some(a) = built.or_else(|| state.active.get(scope).cloned()) {
                active.insert(scope.clone(), a);
            }
        }
        state.compiled.retain(|id, _| records.versions.contains_key(id));
        state.active = active;
        state.records = records;
    }

    /// Reads a version's component from the store, checks it against its digest and compiles it.
    async fn fetch_and_compile(&self, record: &VersionRecord) -> Result<CompiledPolicy, DeployError> {
        let bytes = self.replica.store().get_blob(&record.blob).await?;
        if crate::store::digest(&bytes) != record.version.sha256 {
            return Err(StoreError::Corrupt(format!(
                "policy version {}: its component does not match its SHA-256",
                record.version.id
            ))
            .into());
        }
        let runtime = self.runtime.clone();
        blocking(move || Ok(runtime.compile(&bytes)?)).await
    }

    /// The compiled component of version `id`: from this gateway's cache, else from the store.
    async fn compiled(&self, id: &str) -> Result<CompiledPolicy, DeployError> {
        if let Some(p) = self.read().compiled.get(id).cloned() {
            return Ok(p);
        }
        let records = self.records();
        let (record, _) = records.version(id).ok_or_else(|| DeployError::UnknownVersion(id.to_string()))?;
        let policy = self.fetch_and_compile(record).await?;
        self.write().compiled.insert(id.to_string(), policy.clone());
        Ok(policy)
    }

    /// The deployment for `tenant`: its own, else the default.
    pub fn active_for(&self, tenant: &str) -> Option<Arc<Active>> {
        let state = self.read();
        state.active.get(tenant).or_else(|| state.active.get(DEFAULT_SCOPE)).cloned()
    }

    /// Every version, and every scope's activation history (current last).
    pub fn list(&self) -> (Vec<Version>, BTreeMap<String, Vec<Activation>>) {
        let records = self.records();
        (
            records.versions.values().map(|(r, _)| r.version.clone()).collect(),
            records.active.iter().map(|(scope, (h, _))| (scope.clone(), h.clone())).collect(),
        )
    }

    /// Version `id`, if stored.
    pub fn version(&self, id: &str) -> Option<Version> {
        self.records().version(id).map(|(r, _)| r.version.clone())
    }

    /// Whether `scope`'s activation history names version `id`.
    pub fn in_history(&self, scope: &str, id: &str) -> bool {
        self.records().active.get(scope).is_some_and(|(h, _)| h.iter().any(|a| a.id == id))
    }

    /// Refuses an upload of `size` more bytes by `tenant` past its limits (`size` 0: only
    /// whether it may add a version at all).
    pub fn check_quota(&self, tenant: &str, size: usize) -> Result<(), DeployError> {
        let (usage, _) = self.records().usage(tenant);
        self.check_usage(tenant, usage, size)
    }

    fn check_usage(&self, tenant: &str, usage: Usage, size: usize) -> Result<(), DeployError> {
        let l = &self.limits;
        if usage.versions >= l.versions_per_tenant {
            return Err(DeployError::Quota(format!(
                "tenant {tenant:?} keeps {} policy versions, its limit; delete one it no longer needs (DELETE /v1/policies/{{id}})",
                usage.versions
            )));
        }
        if usage.bytes + size as u64 > l.bytes_per_tenant {
            return Err(DeployError::Quota(format!(
                "tenant {tenant:?} keeps {} bytes of policy components; {size} more would pass its limit of {}; delete versions it no longer needs (DELETE /v1/policies/{{id}})",
                usage.bytes, l.bytes_per_tenant
            )));
        }
        Ok(())
    }

    /// Validates and stores a component. The same tenant uploading the same bytes again gets
    /// the existing version; past the tenant's limits it is refused.
    pub async fn upload(&self, name: &str, bytes: Vec<u8>, tenant: &str) -> Result<Version, DeployError> {
        if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(DeployError::Invalid(format!("policy name {name:?}: use 1-128 of A-Z a-z 0-9 - _ .")));
        }
        let sha256 = crate::store::digest(&bytes);
        let id = hex(&Sha256::new().chain_update(tenant.as_bytes()).chain_update([0]).chain_update(&bytes).finalize())
            [..16]
            .to_string();
        if let Some(v) = self.version(&id) {
            return Ok(v);
        }
        self.check_quota(tenant, bytes.len())?;
        let runtime = self.runtime.clone();
        let size = bytes.len();
        let (policy, bytes) = blocking(move || Ok((runtime.compile(&bytes)?, bytes))).await?;
        // A fault (trap, deadline, limit) fails the upload; an error value is the policy
        // complaining about the empty configuration, which activation checks again.
        match dry_run(&self.runtime, &policy, "{}").await {
            Ok(_) | Err(PolicyFault::Failed(_)) => {}
            Err(fault) => return Err(DeployError::DryRun(fault)),
        }
        let blob = format!("policy-{id}-{:012x}", crate::random_u64() & 0xffff_ffff_ffff);
        self.replica.store().put_blob(&blob, &bytes).await?;
        let version = Version {
            id: id.clone(),
            name: name.to_string(),
            sha256,
            size,
            uploaded_at: now(),
            uploaded_by: tenant.to_string(),
        };
        let record = VersionRecord { version: version.clone(), blob: blob.clone() };
        let committed = async {
            for _ in 0..ATTEMPTS {
                let records = self.records();
                if let Some((existing, _)) = records.version(&id) {
                    // The same upload landed through another request meanwhile.
                    return Ok(Some(existing.version.clone()));
                }
                let (usage, at) = records.usage(tenant);
                self.check_usage(tenant, usage, size)?;
                let grown = Usage { versions: usage.versions + 1, bytes: usage.bytes + size as u64 };
                let writes = vec![
                    Write::put(format!("{VERSIONS}{id}"), Expect::Absent, json(&record)?),
                    usage_write(tenant, grown, at)?,
                ];
                match self.replica.commit(writes).await {
                    Ok(_) => return Ok(None),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(DeployError::from(e)),
                }
            }
            Err(DeployError::Contended(format!("tenant {tenant:?}'s policy versions")))
        };
        match committed.await {
            Ok(None) => {
                self.write().compiled.insert(id, policy);
                self.sync().await;
                Ok(version)
            }
            outcome => {
                // Nothing names the blob written for this request.
                let _ = self.replica.store().delete_blob(&blob).await;
                outcome.map(|existing| existing.unwrap_or(version))
            }
        }
    }

    /// Makes version `id` with `config` the active policy of `scope` (after a dry run).
    pub async fn activate(&self, scope: &str, id: &str, config: serde_json::Value) -> Result<Activation, DeployError> {
        check_scope(scope)?;
        let policy = self.compiled(id).await?;
        dry_run(&self.runtime, &policy, &config.to_string()).await.map_err(DeployError::DryRun)?;
        let activation = Activation { id: id.to_string(), config, activated_at: now() };
        for _ in 0..ATTEMPTS {
            let records = self.records();
            let (record, at) = records.version(id).ok_or_else(|| DeployError::UnknownVersion(id.to_string()))?;
            let (mut history, expect) = records.history(scope);
            history.push(activation.clone());
            let keep = self.limits.history_per_scope.max(1);
            if history.len() > keep {
                history.drain(..history.len() - keep);
            }
            // Rewriting the version's record moves its revision, so a delete that read it
            // before this activation fails instead of removing a version in use.
            let writes = vec![
                Write::put(format!("{ACTIVE}{scope}"), expect, json(&history)?),
                Write::put(format!("{VERSIONS}{id}"), Expect::At(*at), json(record)?),
            ];
            match self.replica.commit(writes).await {
                Ok(_) => {
                    self.sync().await;
                    return Ok(activation);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DeployError::Contended(format!("the activations of {scope}")))
    }

    /// Goes back to `scope`'s previous activation.
    pub async fn rollback(&self, scope: &str) -> Result<Activation, DeployError> {
        check_scope(scope)?;
        for _ in 0..ATTEMPTS {
            let (mut history, expect) = self.records().history(scope);
            if history.len() < 2 {
                return Err(DeployError::NothingToRollBack(scope.to_string()));
            }
            history.pop();
            let current = history.last().cloned().ok_or_else(|| DeployError::NothingToRollBack(scope.to_string()))?;
            // The version rolled back to is in the history, so no delete can have removed it;
            // this gateway may not have compiled it yet.
            self.compiled(&current.id).await?;
            match self.replica.commit(vec![Write::put(format!("{ACTIVE}{scope}"), expect, json(&history)?)]).await {
                Ok(_) => {
                    self.sync().await;
                    return Ok(current);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DeployError::Contended(format!("the activations of {scope}")))
    }

    /// Deletes version `id`: its record, its blob and its compiled code. Refused while any
    /// scope's activations (current or in the history rollback walks) name it.
    pub async fn delete(&self, id: &str) -> Result<Version, DeployError> {
        for _ in 0..ATTEMPTS {
            let records = self.records();
            let (record, at) = records.version(id).ok_or_else(|| DeployError::UnknownVersion(id.to_string()))?;
            let scopes: Vec<&str> = records
                .active
                .iter()
                .filter(|(_, (history, _))| history.iter().any(|a| a.id == id))
                .map(|(scope, _)| if scope == DEFAULT_SCOPE { "the default policy" } else { scope.as_str() })
                .collect();
            if !scopes.is_empty() {
                return Err(DeployError::InUse { id: id.to_string(), scopes: scopes.join(", ") });
            }
            let tenant = &record.version.uploaded_by;
            let (usage, usage_at) = records.usage(tenant);
            let shrunk = Usage {
                versions: usage.versions.saturating_sub(1),
                bytes: usage.bytes.saturating_sub(record.version.size as u64),
            };
            let writes =
                vec![Write::delete(format!("{VERSIONS}{id}"), Expect::At(*at)), usage_write(tenant, shrunk, usage_at)?];
            match self.replica.commit(writes).await {
                Ok(_) => {
                    // The record no longer names the blob: a failure to remove it leaves only an
                    // orphan, which no record will ever name.
                    if let Err(e) = self.replica.store().delete_blob(&record.blob).await {
                        tracing::warn!(blob = %record.blob, error = %e, "cannot remove a deleted policy version's blob");
                    }
                    self.sync().await;
                    return Ok(record.version.clone());
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DeployError::Contended(format!("policy version {id}")))
    }

    /// Imports the policies an earlier version of the gateway kept in `dir` (`policies.json`
    /// and `<id>.wasm`) into a store that holds none. Returns how many versions it imported.
    pub async fn import_legacy(&self, dir: &Path) -> Result<usize, DeployError> {
        let path = dir.join(LEGACY_REGISTRY_FILE);
        if !self.records().versions.is_empty() || !path.exists() {
            return Ok(0);
        }
        let bytes = std::fs::read(&path).map_err(failed("read", &path))?;
        let legacy: LegacyRegistry = serde_json::from_slice(&bytes)
            .map_err(|e| DeployError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        let mut writes = Vec::new();
        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        for (id, version) in &legacy.versions {
            let file = dir.join(format!("{id}.wasm"));
            let component = std::fs::read(&file).map_err(failed("read", &file))?;
            let blob = format!("policy-{id}-imported");
            self.replica.store().put_blob(&blob, &component).await?;
            let record = VersionRecord { version: version.clone(), blob };
            writes.push(Write::put(format!("{VERSIONS}{id}"), Expect::Absent, json(&record)?));
            let u = usage.entry(version.uploaded_by.clone()).or_default();
            u.versions += 1;
            u.bytes += version.size as u64;
        }
        for (tenant, u) in usage {
            writes.push(usage_write(&tenant, u, Expect::Absent)?);
        }
        for (scope, history) in &legacy.active {
            writes.push(Write::put(format!("{ACTIVE}{scope}"), Expect::Absent, json(history)?));
        }
        let n = legacy.versions.len();
        self.replica.commit(writes).await?;
        self.sync().await;
        tracing::info!(versions = n, file = %path.display(), "imported the policies of an earlier version");
        Ok(n)
    }
}

/// Runs `policy` once on the sample request.
async fn dry_run(runtime: &PolicyRuntime, policy: &CompiledPolicy, config: &str) -> Result<WitDecision, PolicyFault> {
    runtime.decide(policy, &sample_request(), HostView::default(), Arc::from(config), Arc::from("dry-run")).await
}

/// The registry file earlier versions kept in the policies directory.
const LEGACY_REGISTRY_FILE: &str = "policies.json";

#[derive(Debug, Deserialize)]
struct LegacyRegistry {
    versions: BTreeMap<String, Version>,
    active: BTreeMap<String, Vec<Activation>>,
}
