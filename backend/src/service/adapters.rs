//! The adapter lifecycle behind the gRPC calls: fetch → validate → resident, hot swaps,
//! draining unloads, reloads after eviction. Loads and unloads of one name run one at a time;
//! different names proceed concurrently.

use super::ServiceError;
use super::metrics::Metrics;
use crate::adapters::{
    self, AdapterStore, AdapterUri, AdapterWeights, Digest, Lifecycle, Origin, Phase, SourceScope, load_peft,
};
use crate::engine::{AdapterStatus, Engine, EngineError, Installed};
use crate::model::ModelConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use switchyard_proto::v1 as pb;

/// What a successful load did.
#[derive(Debug)]
pub struct LoadOutcome {
    pub installed: Installed,
    pub warnings: Vec<String>,
    pub fetched: bool,
    pub origin: Origin,
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
    ) -> Result<LoadOutcome, ServiceError> {
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
    ) -> Result<LoadOutcome, ServiceError> {
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
            let installed = Installed { status, already_loaded: true, evicted: None, replaced: None };
            return Ok(LoadOutcome { installed, warnings: Vec::new(), fetched: false, origin });
        }

        let mut origin = Origin::new(&uri.uri, digest.clone(), scope);
        self.table().fetching(name, origin.clone());
        let result = self.fetch_and_install(name, &uri, digest.as_ref(), &mut origin).await;
        let mut table = self.table();
        match result {
            Ok((outcome, pin)) => {
                table.resident(name, origin, pin);
                if let Some(evicted) = &outcome.installed.evicted {
                    table.evicted(evicted);
                    self.metrics.slot_eviction();
                }
                self.metrics.load(if outcome.installed.already_loaded { "already_loaded" } else { "loaded" });
                Ok(outcome)
            }
            Err(e) => {
                self.metrics.load("failed");
                tracing::warn!(adapter = %name, uri = %uri, error = %e, "adapter load failed");
                if self.resident(name).is_none() {
                    table.lost(name);
                }
                if let ServiceError::Engine(EngineError::AdapterLoadFailed { dropped: Some(other), .. }) = &e {
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
    ) -> Result<(LoadOutcome, Option<adapters::CachePin>), ServiceError> {
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
        let outcome = LoadOutcome { installed, warnings, fetched: loaded.fetched, origin: origin.clone() };
        Ok((outcome, loaded.pin))
    }

    /// Unloads `name` (see the `UnloadAdapter` contract in the proto).
    pub async fn unload(self: &Arc<Self>, name: &str) -> Result<(), ServiceError> {
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
    pub async fn ensure_resident(self: &Arc<Self>, name: &str) -> Result<(), ServiceError> {
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

    /// Every adapter this backend knows, as `ListAdapters` reports them.
    pub fn list(&self) -> Vec<pb::AdapterInfo> {
        let snapshot = self.engine.snapshot();
        let table = self.table();
        let mut out: Vec<pb::AdapterInfo> = snapshot
            .adapters
            .iter()
            .map(|a| adapter_info(a, if a.resident.draining { None } else { table.origin(&a.resident.name) }))
            .collect();
        out.extend(table.records().map(|r| pb::AdapterInfo {
            name: r.name.clone(),
            uri: r.origin.uri.clone(),
            state: match r.phase {
                Phase::Fetching => pb::AdapterState::Fetching,
                Phase::Validated => pb::AdapterState::Validated,
                Phase::Evicted => pb::AdapterState::Evicted,
                Phase::Failed => pb::AdapterState::Failed,
            } as i32,
            error: r.error.clone().unwrap_or_default(),
            sha256: r.origin.sha256.clone().unwrap_or_default(),
            revision: r.origin.revision.clone().unwrap_or_default(),
            rank: r.origin.rank.unwrap_or(0) as u32,
            ..Default::default()
        }));
        out
    }
}

/// Runs a lifecycle operation as its own task: it finishes — and records what it did — even if
/// the RPC that started it is cancelled, so a client going away never leaves a half state.
async fn detached<T: Send + 'static>(
    work: impl Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::spawn(work).await.map_err(|e| ServiceError::Internal(format!("adapter task failed: {e}")))?
}

/// A resident (or draining) adapter as the gRPC API reports it.
pub fn adapter_info(a: &AdapterStatus, origin: Option<&Origin>) -> pb::AdapterInfo {
    let r = &a.resident;
    let state = if r.draining { pb::AdapterState::Draining } else { pb::AdapterState::Resident };
    pb::AdapterInfo {
        name: r.name.clone(),
        uri: r.uri.clone(),
        state: state as i32,
        rank: r.max_rank as u32,
        target_modules: r.targets.clone(),
        active_requests: r.active,
        slot: a.slot,
        size_bytes: r.size_bytes,
        error: String::new(),
        sha256: origin.and_then(|o| o.sha256.clone()).unwrap_or_default(),
        revision: origin.and_then(|o| o.revision.clone()).unwrap_or_default(),
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
