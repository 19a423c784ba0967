//! What a backend knows about each adapter name beyond the slot table: loads in progress,
//! adapters evicted from their slot (and where to load them from again), and failed loads.
//! Plain data; the service owns one behind a lock.
//!
//! Resident adapters live in the engine's slot table; this table holds where each came from
//! (to reload it after an eviction) and the cache pin that keeps its files on disk while it is
//! loaded, resident or evicted from its slot: the next request for an evicted adapter loads it
//! again from the cache, never from its source.

use super::store::Digest;
use super::{CachePin, SourceScope};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Failed loads remembered for `ListAdapters`; older ones are forgotten.
const MAX_FAILED: usize = 64;

/// Where a name is in its life, when it is not simply resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Fetching,
    Validated,
    Evicted,
    Failed,
}

/// A name's source: enough to load it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub uri: String,
    /// The digest the load pinned, if any.
    pub digest: Option<Digest>,
    /// SHA-256 of the weights, when known.
    pub sha256: Option<String>,
    /// What the source resolved the location to (an `hf://` commit).
    pub revision: Option<String>,
    /// The scope the load was given: a reload after an eviction is held to it again.
    pub scope: Option<SourceScope>,
    /// Where an in-place adapter's files resolved to when it was loaded.
    pub resolved: Vec<std::path::PathBuf>,
    /// Its largest rank, once validated (kept for listings while it is evicted).
    pub rank: Option<usize>,
}

impl Origin {
    /// The origin of a load of `uri` that has not fetched anything yet.
    pub fn new(uri: &str, digest: Option<Digest>, scope: Option<SourceScope>) -> Origin {
        Origin { uri: uri.to_string(), digest, sha256: None, revision: None, scope, resolved: Vec::new(), rank: None }
    }
}

/// A name in a phase other than resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub phase: Phase,
    pub origin: Origin,
    /// Why the load failed ([`Phase::Failed`]).
    pub error: Option<String>,
}

/// The table.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Names not (only) resident: loading, evicted or failed. A hot swap in progress has a
    /// record here while the old adapter is still resident.
    records: BTreeMap<String, Record>,
    failed_order: VecDeque<String>,
    /// Resident names: where they came from.
    loaded: HashMap<String, Origin>,
    /// The pins on the cache entries of loaded names (resident or evicted).
    pins: HashMap<String, CachePin>,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    /// A load of `name` starts.
    pub fn fetching(&mut self, name: &str, origin: Origin) {
        self.set(name, Phase::Fetching, origin, None);
    }

    /// The load's files passed validation.
    pub fn validated(&mut self, name: &str, sha256: Option<String>, revision: Option<String>) {
        if let Some(r) = self.records.get_mut(name) {
            r.phase = Phase::Validated;
            r.origin.sha256 = sha256;
            r.origin.revision = revision;
        }
    }

    /// The load finished: `name` is resident from `origin` (replacing whatever it was).
    pub fn resident(&mut self, name: &str, origin: Origin, pin: Option<CachePin>) {
        self.forget_record(name);
        self.loaded.insert(name.to_string(), origin);
        match pin {
            Some(pin) => self.pins.insert(name.to_string(), pin),
            None => self.pins.remove(name),
        };
    }

    /// The load failed; an adapter already resident under the name (a hot swap) stays.
    pub fn failed(&mut self, name: &str, origin: Origin, error: String) {
        self.set(name, Phase::Failed, origin, Some(error));
        self.failed_order.retain(|n| n != name);
        self.failed_order.push_back(name.to_string());
        while self.failed_order.len() > MAX_FAILED {
            if let Some(old) = self.failed_order.pop_front() {
                self.records.remove(&old);
                if !self.loaded.contains_key(&old) {
                    self.pins.remove(&old);
                }
            }
        }
    }

    /// A resident name is gone from its slot without an unload (a failed in-place swap
    /// overwrote it): forget where it came from.
    pub fn lost(&mut self, name: &str) {
        self.loaded.remove(name);
        self.pins.remove(name);
    }

    /// The engine evicted `name` from its slot: remember where to load it from again, and keep
    /// its cache entry pinned so that the reload finds it.
    pub fn evicted(&mut self, name: &str) {
        if let Some(origin) = self.loaded.remove(name) {
            self.set(name, Phase::Evicted, origin, None);
        }
    }

    /// `name` was unloaded (or forgotten): nothing of it remains, its cache pin included.
    pub fn unloaded(&mut self, name: &str) -> bool {
        let had_record = self.forget_record(name);
        let had_pin = self.pins.remove(name).is_some();
        self.loaded.remove(name).is_some() || had_record || had_pin
    }

    /// Whether `name`'s cache entry is pinned (it is loaded, resident or evicted).
    pub fn pinned(&self, name: &str) -> bool {
        self.pins.contains_key(name)
    }

    /// Where a resident name came from.
    pub fn origin(&self, name: &str) -> Option<&Origin> {
        self.loaded.get(name)
    }

    /// The record of a name that is not resident (or is being reloaded).
    pub fn record(&self, name: &str) -> Option<&Record> {
        self.records.get(name)
    }

    /// All records, by name.
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    fn set(&mut self, name: &str, phase: Phase, origin: Origin, error: Option<String>) {
        if phase != Phase::Failed {
            self.failed_order.retain(|n| n != name);
        }
        self.records.insert(name.to_string(), Record { name: name.to_string(), phase, origin, error });
    }

    fn forget_record(&mut self, name: &str) -> bool {
        self.failed_order.retain(|n| n != name);
        self.records.remove(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(uri: &str) -> Origin {
        Origin::new(uri, None, None)
    }

    fn phase(t: &Lifecycle, name: &str) -> Option<Phase> {
        t.record(name).map(|r| r.phase)
    }

    #[test]
    fn a_load_goes_from_fetching_to_validated_to_resident() {
        let mut t = Lifecycle::new();
        t.fetching("a", origin("s3://b/a"));
        assert_eq!(phase(&t, "a"), Some(Phase::Fetching));
        t.validated("a", Some("ab".into()), None);
        assert_eq!(phase(&t, "a"), Some(Phase::Validated));
        assert_eq!(t.record("a").and_then(|r| r.origin.sha256.as_deref()), Some("ab"));
        t.resident("a", origin("s3://b/a"), None);
        assert_eq!(phase(&t, "a"), None);
        assert_eq!(t.origin("a").map(|o| o.uri.as_str()), Some("s3://b/a"));
    }

    #[test]
    fn eviction_keeps_the_origin_for_a_reload_and_unload_forgets_everything() {
        let mut t = Lifecycle::new();
        t.resident("a", origin("s3://b/a"), None);
        t.evicted("a");
        assert_eq!(phase(&t, "a"), Some(Phase::Evicted));
        assert_eq!(t.record("a").map(|r| r.origin.uri.as_str()), Some("s3://b/a"));
        assert!(t.origin("a").is_none());
        assert!(t.unloaded("a"));
        assert!(t.record("a").is_none());
        assert!(!t.unloaded("a"));
    }

    #[tokio::test]
    async fn an_evicted_adapter_keeps_its_cache_entry_pinned_until_it_is_unloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = crate::adapters::AdapterCache::open(dir.path(), 1 << 20).expect("opens");
        let uri = crate::adapters::AdapterUri::parse("s3://b/a").expect("uri");
        let (entry, _) = cache
            .get_or_fetch(
                &uri,
                None,
                u64::MAX,
                |d, room| async move {
                    room.reserve(3)?;
                    std::fs::write(d.join(crate::adapters::WEIGHTS_FILE), b"abc").expect("write");
                    Ok(None)
                },
                |_, _| Ok(()),
            )
            .await
            .expect("cached");
        let mut t = Lifecycle::new();
        t.resident("a", origin("s3://b/a"), Some(entry.pin));
        t.evicted("a");
        assert!(t.pinned("a"));
        assert_eq!(cache.stats().pinned_bytes, 3, "the reload will find the entry");
        assert!(t.unloaded("a"));
        assert_eq!(cache.stats().pinned_bytes, 0);
    }

    #[test]
    fn a_failed_hot_swap_leaves_the_resident_origin_and_failures_are_bounded() {
        let mut t = Lifecycle::new();
        t.resident("a", origin("s3://b/v1"), None);
        t.fetching("a", origin("s3://b/v2"));
        t.failed("a", origin("s3://b/v2"), "bad weights".into());
        assert_eq!(phase(&t, "a"), Some(Phase::Failed));
        assert_eq!(t.origin("a").map(|o| o.uri.as_str()), Some("s3://b/v1"));
        for i in 0..(MAX_FAILED + 10) {
            t.failed(&format!("f{i}"), origin("s3://b/x"), "no".into());
            // Failing again does not count twice.
            t.failed(&format!("f{i}"), origin("s3://b/x"), "no".into());
        }
        assert_eq!(t.records().count(), MAX_FAILED);
        assert!(t.record("a").is_none(), "the oldest failure was forgotten");
    }
}
