//! One owner for every adapter's life on a backend: fetch → validate → resident (prepared off
//! the engine thread, swapped into a slot), hot swaps, draining unloads, evictions from a slot
//! and reloads from the cache, failures. Loads and unloads of one name run one at a time;
//! different names proceed concurrently.
//!
//! Each adapter is in one [`AdapterState`]; [`AdapterManager::list`] is the one view of them
//! that `ListAdapters` and the metrics both read. The slots themselves are the engine's (its
//! thread admits requests against them); the rest (where each name came from, its cache pin,
//! loads in progress, evictions, failures) is the manager's [`Lifecycle`] table.

use super::{
    self as adapters, AdapterError, AdapterStore, AdapterUri, AdapterWeights, Digest, Lifecycle, Origin, Phase,
    SourceScope, load_peft,
};
use crate::engine::{AdapterStatus, Engine, EngineError, Installed};
use crate::metrics::Metrics;
use crate::model::ModelConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Why an adapter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A bug: the task running the operation failed (panicked).
    #[error("adapter task failed: {0}")]
    Task(String),
}

/// Where an adapter is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdapterState {
    /// Its files are being fetched (or read in place).
    Fetching,
    /// Its files passed validation; it is being placed.
    Validated,
    /// In a slot, serving requests.
    Resident,
    /// In a slot, finishing its requests before it is unloaded or replaced.
    Draining,
    /// Gave its slot to another; its next request loads it again from its (pinned) files.
    Evicted,
    /// Its last load failed (the error says why).
    Failed,
}

impl AdapterState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterState::Fetching => "fetching",
            AdapterState::Validated => "validated",
            AdapterState::Resident => "resident",
            AdapterState::Draining => "draining",
            AdapterState::Evicted => "evicted",
            AdapterState::Failed => "failed",
        }
    }
}

/// An adapter as a backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    pub uri: String,
    pub state: AdapterState,
    /// Largest rank over its modules, once known.
    pub rank: usize,
    /// Projections it targets (while in a slot).
    pub targets: Vec<String>,
    /// Requests using it (while in a slot).
    pub active_requests: u32,
    /// Its slot, while in one.
    pub slot: Option<u32>,
    /// Bytes of its weights in the slot.
    pub size_bytes: u64,
    /// Why its last load failed.
    pub error: Option<String>,
    /// SHA-256 of its weights, when known.
    pub sha256: Option<String>,
    /// What its source resolved the location to (an `hf://` commit).
    pub revision: Option<String>,
    /// Whether its disk cache entry is pinned (kept while it is loaded).
    pub pinned: bool,
    /// A digest of its weights as computed with (hex), while in a slot: the root of its KV
    /// blocks' names in the prefix cache.
    pub weights_digest: Option<String>,
}

/// What a successful load did.
#[derive(Debug)]
pub struct LoadOutcome {
    pub installed: Installed,
    pub warnings: Vec<String>,
    pub fetched: bool,
    /// The adapter as it is now.
    pub adapter: AdapterInfo,
}

/// What placing validated weights did (before the table records it).
struct Placed {
    installed: Installed,
    warnings: Vec<String>,
    fetched: bool,
    pin: Option<adapters::CachePin>,
}

/// Owns the adapter store and the lifecycle table; talks to the engine for slots.
#[derive(Debug)]
pub struct AdapterManager {
    store: AdapterStore,
    engine: Arc<Engine>,
    model: ModelConfig,
    model_name: String,
    unload_timeout: Duration,
    table: Mutex<Lifecycle>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<Metrics>,
}

/// Whether an adapter's `base_model_name_or_path` names the served model. Names are compared
/// loosely: the last path segment, case-insensitively, either one a prefix of the other (so
/// `org/SmolLM2-135M-Instruct` matches a served `SmolLM2-135M-Instruct.Q4_1`). A mismatch is
/// reported, not refused: the tensors' shapes are what decide whether an adapter fits.
fn same_base_model(base: &str, served: &str) -> bool {
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_lowercase();
    let (base, served) = (last(base), last(served));
    !base.is_empty() && (served.starts_with(&base) || base.starts_with(&served))
}

impl AdapterManager {
    pub fn new(
        store: AdapterStore,
        engine: Arc<Engine>,
        model: ModelConfig,
        model_name: String,
        unload_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> AdapterManager {
        AdapterManager {
            store,
            engine,
            model,
            model_name,
            unload_timeout,
            table: Mutex::new(Lifecycle::new()),
            locks: Mutex::default(),
            metrics,
        }
    }

    /// Whether `name`'s disk cache entry is pinned (it is loaded from a cached source).
    pub fn pinned(&self, name: &str) -> bool {
        self.table().pinned(name)
    }

    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    fn table(&self) -> MutexGuard<'_, Lifecycle> {
        // Every update to the table is complete before its lock is released.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapter serving new requests under `name`, if any.
    fn resident(&self, name: &str) -> Option<AdapterStatus> {
        self.engine.snapshot().adapters.iter().find(|a| a.resident.name == name && !a.resident.draining).cloned()
    }

    /// Waits for this name's turn: loads and unloads of one name never interleave.
    async fn turn(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Drop locks nobody holds or waits for, so the map stays as small as the traffic.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(name.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Loads `uri` under `name`, held to `scope` when given (see the `LoadAdapter` contract in
    /// the proto).
    pub async fn load(
        self: &Arc<Self>,
        name: &str,
        uri: &str,
        digest: Option<Digest>,
        scope: Option<SourceScope>,
    ) -> Result<LoadOutcome, ManagerError> {
        adapters::validate_name(name)?;
        let uri: AdapterUri = self.store.check_uri(uri)?;
        let (this, name) = (self.clone(), name.to_string());
        detached(async move {
            let _turn = this.turn(&name).await;
            this.load_locked(&name, uri, digest, scope).await
        })
        .await
    }

    async fn load_locked(
        &self,
        name: &str,
        uri: AdapterUri,
        digest: Option<Digest>,
        scope: Option<SourceScope>,
    ) -> Result<LoadOutcome, ManagerError> {
        // Already resident from this source: only a digest pin and the scope can still disagree.
        // A pin on an adapter loaded without one (its digest unknown) goes the full way, which
        // checks it; the scope is checked on the URI and on where its files resolved to.
        let origin = self.table().origin(name).cloned();
        let known_sha = origin.as_ref().and_then(|o| o.sha256.clone());
        if let Some(status) = self.resident(name).filter(|a| a.resident.uri == uri.uri)
            && (digest.is_none() || known_sha.is_some())
        {
            if let Some(scope) = &scope {
                scope.check(&uri, origin.as_ref().map_or(&[][..], |o| &o.resolved))?;
            }
            if let (Some(d), Some(known)) = (&digest, known_sha.as_deref())
                && d.hex() != known
            {
                return Err(adapters::AdapterError::DigestMismatch {
                    uri: uri.uri,
                    expected: d.hex().to_string(),
                    actual: known.to_string(),
                }
                .into());
            }
            let origin = origin.unwrap_or_else(|| Origin::new(&uri.uri, digest, scope));
            self.metrics.load("already_loaded");
            let adapter = adapter_info(&status, Some(&origin), self.table().pinned(name));
            let installed = Installed { status, already_loaded: true, evicted: None, replaced: None };
            return Ok(LoadOutcome { installed, warnings: Vec::new(), fetched: false, adapter });
        }

        let mut origin = Origin::new(&uri.uri, digest.clone(), scope);
        self.table().fetching(name, origin.clone());
        let result = self.fetch_and_install(name, &uri, digest.as_ref(), &mut origin).await;
        let mut table = self.table();
        match result {
            Ok(Placed { installed, warnings, fetched, pin }) => {
                let adapter = adapter_info(&installed.status, Some(&origin), pin.is_some());
                table.resident(name, origin, pin);
                if let Some(evicted) = &installed.evicted {
                    table.evicted(evicted);
                    self.metrics.slot_eviction();
                }
                self.metrics.load(if installed.already_loaded { "already_loaded" } else { "loaded" });
                Ok(LoadOutcome { installed, warnings, fetched, adapter })
            }
            Err(e) => {
                self.metrics.load("failed");
                tracing::warn!(adapter = %name, uri = %uri, error = %e, "adapter load failed");
                if self.resident(name).is_none() {
                    table.lost(name);
                }
                if let ManagerError::Engine(EngineError::AdapterLoadFailed { dropped: Some(other), .. }) = &e {
                    table.evicted(other);
                }
                table.failed(name, origin, e.to_string());
                Err(e)
            }
        }
    }

    async fn fetch_and_install(
        &self,
        name: &str,
        uri: &AdapterUri,
        digest: Option<&Digest>,
        origin: &mut Origin,
    ) -> Result<Placed, ManagerError> {
        let (config, max_rank) = (self.model.clone(), self.engine.config().max_lora_rank);
        let loaded = self
            .store
            .load(&uri.uri, digest, origin.scope.as_ref(), move |files| load_peft(files, &config, max_rank))
            .await?;
        self.metrics.load_phase("fetch", loaded.fetch_time);
        self.metrics.load_phase("validate", loaded.validate_time);
        origin.sha256 = loaded.sha256.clone();
        origin.revision = loaded.revision.clone();
        origin.resolved = loaded.resolved.clone();
        self.table().validated(name, loaded.sha256.clone(), loaded.revision.clone());
        let weights: AdapterWeights = loaded.value;
        origin.rank = Some(weights.max_rank);
        let mut warnings = Vec::new();
        if let Some(base) = &weights.base_model
            && !same_base_model(base, &self.model_name)
        {
            warnings.push(format!(
                "adapter {name:?} was trained on {base:?}, but this backend serves {:?}; its tensors fit, so it was loaded",
                self.model_name
            ));
            tracing::warn!(adapter = %name, adapter_base = %base, served = %self.model_name, "adapter was trained on a differently named base model");
        }
        let placing = std::time::Instant::now();
        let installed = self.engine.install_adapter(name.to_string(), uri.uri.clone(), weights).await?;
        self.metrics.load_phase("place", placing.elapsed());
        tracing::info!(adapter = %name, uri = %uri, fetched = loaded.fetched, hot_swap = installed.replaced.is_some(), "adapter resident");
        Ok(Placed { installed, warnings, fetched: loaded.fetched, pin: loaded.pin })
    }

    /// Unloads `name` (see the `UnloadAdapter` contract in the proto).
    pub async fn unload(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move {
            let _turn = this.turn(&name).await;
            match this.engine.unload_adapter(name.clone(), this.unload_timeout).await {
                Ok(()) => {
                    this.table().unloaded(&name);
                    Ok(())
                }
                // Not resident: forgetting an evicted or failed name is an unload too.
                Err(EngineError::UnknownAdapter(_)) if this.table().unloaded(&name) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Makes sure an adapter a request names is resident: an adapter evicted from its slot is
    /// loaded again from where it came from (normally the disk cache).
    pub async fn ensure_resident(self: &Arc<Self>, name: &str) -> Result<(), ManagerError> {
        let evicted = |m: &AdapterManager, name: &str| match m.table().record(name) {
            Some(r) if r.phase == Phase::Evicted => Some(r.origin.clone()),
            _ => None,
        };
        if self.resident(name).is_some() || evicted(self, name).is_none() {
            return Ok(()); // Resident, or unknown: the engine reports the unknown adapter.
        }
        let (this, name) = (self.clone(), name.to_string());
        detached(async move {
            let _turn = this.turn(&name).await;
            // Whatever ran before us (an unload, another load) decides; only a name that is
            // still evicted is loaded again, from where it came from.
            let Some(origin) = evicted(&this, &name).filter(|_| this.resident(&name).is_none()) else {
                return Ok(());
            };
            tracing::info!(adapter = %name, uri = %origin.uri, "reloading an evicted adapter for a request");
            let uri = this.store.check_uri(&origin.uri)?;
            this.load_locked(&name, uri, origin.digest, origin.scope).await.map(|_| ())
        })
        .await
    }

    /// Every adapter this backend knows, in its state: what `ListAdapters` and the metrics
    /// report.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let snapshot = self.engine.snapshot();
        let table = self.table();
        let mut out: Vec<AdapterInfo> = snapshot
            .adapters
            .iter()
            .map(|a| {
                let name = &a.resident.name;
                let origin = if a.resident.draining { None } else { table.origin(name) };
                adapter_info(a, origin, !a.resident.draining && table.pinned(name))
            })
            .collect();
        out.extend(table.records().map(|r| AdapterInfo {
            name: r.name.clone(),
            uri: r.origin.uri.clone(),
            state: match r.phase {
                Phase::Fetching => AdapterState::Fetching,
                Phase::Validated => AdapterState::Validated,
                Phase::Evicted => AdapterState::Evicted,
                Phase::Failed => AdapterState::Failed,
            },
            rank: r.origin.rank.unwrap_or(0),
            targets: Vec::new(),
            active_requests: 0,
            slot: None,
            size_bytes: 0,
            error: r.error.clone(),
            sha256: r.origin.sha256.clone(),
            revision: r.origin.revision.clone(),
            pinned: r.phase != Phase::Failed && table.pinned(&r.name),
            weights_digest: None,
        }));
        out
    }
}

/// Runs a lifecycle operation as its own task: it finishes — and records what it did — even if
/// the RPC that started it is cancelled, so a client going away never leaves a half state.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ManagerError> {
    tokio::spawn(work).await.map_err(|e| ManagerError::Task(e.to_string()))?
}

/// A resident (or draining) adapter, with where it came from and whether its files are pinned.
fn adapter_info(a: &AdapterStatus, origin: Option<&Origin>, pinned: bool) -> AdapterInfo {
    let r = &a.resident;
    AdapterInfo {
        name: r.name.clone(),
        uri: r.uri.clone(),
        state: if r.draining { AdapterState::Draining } else { AdapterState::Resident },
        rank: r.max_rank,
        targets: r.targets.clone(),
        active_requests: r.active,
        slot: Some(a.slot),
        size_bytes: r.size_bytes,
        error: None,
        sha256: origin.and_then(|o| o.sha256.clone()),
        revision: origin.and_then(|o| o.revision.clone()),
        pinned,
        weights_digest: Some(r.weights_digest.iter().map(|b| format!("{b:02x}")).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::same_base_model;

    #[test]
    fn base_model_names_match_across_paths_cases_and_quantization_suffixes() {
        assert!(same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1"));
        assert!(same_base_model("/models/tiny-llama/", "tiny-llama"));
        assert!(same_base_model("Tiny-Llama", "tiny-llama"));
        assert!(!same_base_model("meta-llama/Llama-2-7b-hf", "SmolLM2-135M-Instruct"));
        assert!(!same_base_model("", "tiny-llama"));
    }
}
