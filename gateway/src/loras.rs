//! The desired adapter set: which adapters should be loaded on the backends, from where. The
//! adapter API changes it; the leading gateway's reconcilers make the backends match it. Each
//! adapter is one record (`loras/<name>`) in the shared state store ([`crate::store`]), so
//! every gateway of a fleet reads the same set and two gateways changing one adapter cannot
//! both win.

use crate::files::{FileError, failed};
use crate::store::{Expect, Replica, Revision, StoreError, Write};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 256;

/// One adapter the operator (or a tenant) asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredLora {
    pub name: String,
    pub uri: String,
    /// Optional SHA-256 pin of `adapter_model.safetensors` (64 lowercase hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The tenant that owns it: the one whose token first loaded it. Only the owner (or an admin
    /// tenant) may replace or unload it; a hot swap by an admin keeps the owner.
    pub owner: String,
    /// Set by the owner: every configured tenant may use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// The tenant whose load grant admitted the current source, when not the owner (an admin
    /// that hot-swapped it). Its `load_prefixes` travel with every load of this adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_by: Option<String>,
    /// How many backends keep it loaded (`None`: all of them), chosen by rendezvous hashing
    /// ([`crate::cluster::placement`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// The `LoraAdapter` manifest that declares it, when it was declared ([`crate::manifest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared: Option<Declaration>,
}

/// Which manifest declares an adapter, and through which path it came: a prune removes only what
/// its own path declared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    /// The manifest's `metadata.name`.
    pub name: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `switchyard apply`, through the adapter API.
    Apply,
    /// The directory the gateways watch (`--manifests`).
    Directory,
}

impl DesiredLora {
    /// `name` from `uri`, owned by `owner`: private, on every backend, loaded by its owner.
    pub fn new(name: &str, uri: &str, owner: &str) -> DesiredLora {
        DesiredLora {
            name: name.to_string(),
            uri: uri.to_string(),
            sha256: None,
            owner: owner.to_string(),
            shared: false,
            loaded_by: None,
            replicas: None,
            declared: None,
        }
    }

    /// Dynamo's `lora_id`: stable across workers and gateway replicas.
    pub fn lora_id(&self) -> u32 {
        lora_id(&self.name)
    }

    /// The tenant whose `load_prefixes` bound where this adapter may be loaded from.
    pub fn loader(&self) -> &str {
        self.loaded_by.as_deref().unwrap_or(&self.owner)
    }
}

/// A name's `lora_id`: the first four bytes of its SHA-256 as a positive 31-bit integer.
pub fn lora_id(name: &str) -> u32 {
    let d = Sha256::digest(name.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) & 0x7fff_ffff
}

/// Checks an adapter name: 1–256 characters of `A-Z a-z 0-9 . _ - /`, `/` only between
/// non-empty segments, no `.` or `..` segment. Names are what clients send as `model`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("lora_name must be 1 to {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))) {
        return Err(format!("lora_name {name:?} contains {c:?}; use letters, digits, '.', '_', '-' and '/'"));
    }
    if name.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(format!("lora_name {name:?} has an empty, '.' or '..' path segment"));
    }
    Ok(())
}

/// Checks a source URI the way the gateway can without fetching: a known scheme, something
/// after it, and no `.`/`..` segment (so a prefix check cannot be walked out of).
pub fn validate_uri(uri: &str) -> Result<(), String> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(format!("source.uri {uri:?} is not a URI; use file://, s3:// or hf://"));
    };
    if !matches!(scheme, "file" | "s3" | "hf") {
        return Err(format!("source.uri scheme {scheme:?} is not supported; use file://, s3:// or hf://"));
    }
    if rest.trim_matches('/').is_empty() {
        return Err(format!("source.uri {uri:?} names no location"));
    }
    if rest.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("source.uri {uri:?} has a '.' or '..' path segment"));
    }
    if uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("source.uri contains whitespace or control characters".to_string());
    }
    Ok(())
}

/// A source URI as backends report it: without trailing `/` (`s3://bucket/prefix/` and
/// `s3://bucket/prefix` name the same adapter). Records are kept in this form, and listings
/// compared in it, so a URI written either way does not look changed at every probe.
pub fn canonical_uri(uri: &str) -> &str {
    match uri.split_once("://") {
        Some((scheme, rest)) if !rest.trim_end_matches('/').is_empty() => {
            &uri[..scheme.len() + 3 + rest.trim_end_matches('/').len()]
        }
        _ => uri,
    }
}

/// Normalises a `sha256` pin: 64 hex digits, optionally prefixed `sha256:`, to lowercase.
pub fn normalize_sha256(pin: &str) -> Result<String, String> {
    let hex = pin.strip_prefix("sha256:").unwrap_or(pin);
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("sha256 {pin:?} is not 64 hex digits"));
    }
    Ok(hex.to_ascii_lowercase())
}

/// Why the desired set could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path} is not a Switchyard adapter state file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] FileError),
}

/// The desired adapters by name, as of one moment; cheap to clone.
pub type Snapshot = Arc<BTreeMap<String, DesiredLora>>;

/// Keys of the desired set in the state store.
pub const KEY_PREFIX: &str = "loras/";

/// The store key of adapter `name`.
pub fn key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// The desired set decoded from one revision of the store.
#[derive(Debug, Default)]
struct Decoded {
    revision: Revision,
    loras: Snapshot,
    /// Each adapter's `mod_revision`: what a compare-and-set of it expects.
    revisions: BTreeMap<String, Revision>,
}

/// The desired set: a typed view of the `loras/` keys of the gateway's [`Replica`]. Reads come
/// from the replica (never waiting on the store); writes are compare-and-set transactions.
#[derive(Debug)]
pub struct LoraStore {
    replica: Arc<Replica>,
    decoded: Mutex<Arc<Decoded>>,
}

impl LoraStore {
    pub fn new(replica: Arc<Replica>) -> LoraStore {
        LoraStore { replica, decoded: Mutex::new(Arc::default()) }
    }

    /// The desired set in a directory store of its own (one gateway, or tests).
    pub async fn open_dir(dir: &Path) -> Result<LoraStore, StateError> {
        let store: Arc<dyn crate::store::StateStore> = Arc::new(crate::store::FileStore::open(dir)?);
        Ok(LoraStore::new(Replica::open(store).await?))
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// The decoded set as of the replica's revision (decoded again only after a change).
    fn decoded(&self) -> Arc<Decoded> {
        let snapshot = self.replica.current();
        let mut cached = self.decoded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.revision == snapshot.revision && snapshot.revision != 0 {
            return cached.clone();
        }
        let mut loras = BTreeMap::new();
        let mut revisions = BTreeMap::new();
        for (name, entry) in snapshot.under(KEY_PREFIX) {
            match serde_json::from_str::<DesiredLora>(&entry.value) {
                Ok(l) if l.name == name => {
                    loras.insert(name.to_string(), l);
                    revisions.insert(name.to_string(), entry.mod_revision);
                }
                Ok(l) => {
                    tracing::warn!(key = %key(name), holds = %l.name, "ignoring an adapter record stored under another name")
                }
                Err(e) => {
                    tracing::warn!(key = %key(name), error = %e, "ignoring an adapter record this gateway cannot read")
                }
            }
        }
        let decoded = Arc::new(Decoded { revision: snapshot.revision, loras: Arc::new(loras), revisions });
        *cached = decoded.clone();
        decoded
    }

    pub fn get(&self, name: &str) -> Option<DesiredLora> {
        self.decoded().loras.get(name).cloned()
    }

    /// `name`'s record and what a compare-and-set of it must expect.
    pub fn get_versioned(&self, name: &str) -> (Option<DesiredLora>, Expect) {
        let d = self.decoded();
        let expect = d.revisions.get(name).map_or(Expect::Absent, |r| Expect::At(*r));
        (d.loras.get(name).cloned(), expect)
    }

    /// Every desired adapter, by name.
    pub fn list(&self) -> Vec<DesiredLora> {
        self.decoded().loras.values().cloned().collect()
    }

    /// The desired set as of now, without copying it.
    pub fn snapshot(&self) -> Snapshot {
        self.decoded().loras.clone()
    }

    /// Records `lora` as desired if its record is still as `expect` says; nothing changes on a
    /// conflict or a failed write.
    pub async fn put(&self, lora: &DesiredLora, expect: Expect) -> Result<Revision, StateError> {
        Ok(self.replica.commit(vec![put_write(lora, expect)?]).await?)
    }

    /// Removes `name` from the desired set if its record is still as `expect` says.
    pub async fn remove(&self, name: &str, expect: Expect) -> Result<Revision, StateError> {
        Ok(self.replica.commit(vec![Write::delete(key(name), expect)]).await?)
    }

    /// Imports a desired set kept by an earlier version of the gateway (`loras.json` in the
    /// state dir) into a store that has never been written. Returns how many adapters it held.
    pub async fn import_legacy(&self, dir: &Path) -> Result<usize, StateError> {
        let path = dir.join(LEGACY_STATE_FILE);
        if self.replica.revision() != 0 || !path.exists() {
            return Ok(0);
        }
        let bytes = std::fs::read(&path).map_err(failed("read", &path))?;
        let legacy: LegacyStateFile = serde_json::from_slice(&bytes)
            .map_err(|e| StateError::Corrupt { path: path.clone(), reason: e.to_string() })?;
        let writes = legacy.loras.values().map(|l| put_write(l, Expect::Absent)).collect::<Result<Vec<_>, _>>()?;
        if writes.is_empty() {
            return Ok(0);
        }
        let n = writes.len();
        self.replica.commit(writes).await?;
        tracing::info!(adapters = n, file = %path.display(), "imported the desired adapters of an earlier version");
        Ok(n)
    }
}

/// The write that stores `lora` under its name.
pub(crate) fn put_write(lora: &DesiredLora, expect: Expect) -> Result<Write, StateError> {
    let value = serde_json::to_string(lora).map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok(Write::put(key(&lora.name), expect, value))
}

/// The file earlier versions kept the desired set in.
const LEGACY_STATE_FILE: &str = "loras.json";

#[derive(Debug, Deserialize)]
struct LegacyStateFile {
    loras: BTreeMap<String, DesiredLora>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, uri: &str) -> DesiredLora {
        DesiredLora::new(name, uri, "acme")
    }

    async fn open(dir: &Path) -> LoraStore {
        LoraStore::open_dir(dir).await.unwrap()
    }

    #[tokio::test]
    async fn the_desired_set_survives_a_restart_and_a_stale_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store.put(&lora("acme/support", "s3://acme/support"), Expect::Absent).await.unwrap();
        store.put(&lora("b", "hf://org/b"), Expect::Absent).await.unwrap();
        let (_, b_at) = store.get_versioned("b");
        store.remove("b", b_at).await.unwrap();
        let again = open(dir.path()).await;
        assert_eq!(again.list(), vec![lora("acme/support", "s3://acme/support")]);
        // A second gateway that read the record before the first one changed it loses.
        let (_, read) = again.get_versioned("acme/support");
        store.put(&lora("acme/support", "s3://acme/support-v2"), read).await.unwrap();
        let stale = again.put(&lora("acme/support", "s3://acme/other"), read).await;
        assert!(matches!(stale, Err(StateError::Store(StoreError::Conflict { .. }))), "{stale:?}");
        assert_eq!(open(dir.path()).await.get("acme/support").map(|l| l.uri), Some("s3://acme/support-v2".into()));
    }

    #[tokio::test]
    async fn the_desired_set_of_an_earlier_version_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = serde_json::json!({"version": 1, "removed": ["gone"],
            "loras": {"acme/a": lora("acme/a", "s3://acme/a")}});
        std::fs::write(dir.path().join(LEGACY_STATE_FILE), legacy.to_string()).unwrap();
        let store = open(dir.path()).await;
        assert_eq!(store.import_legacy(dir.path()).await.unwrap(), 1);
        assert_eq!(store.list(), vec![lora("acme/a", "s3://acme/a")]);
        let (_, at) = store.get_versioned("acme/a");
        store.remove("acme/a", at).await.unwrap();
        let again = open(dir.path()).await;
        assert_eq!(again.import_legacy(dir.path()).await.unwrap(), 0, "imported twice");
        assert!(again.list().is_empty());
    }

    #[test]
    fn names_uris_and_pins_are_checked() {
        assert!(validate_name("org/some-lora_v1.2").is_ok());
        for bad in ["", "/abs", "a//b", "a/../b", "a b", "a\u{0}", &"x".repeat(300)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_uri("s3://bucket/prefix").is_ok());
        assert!(validate_uri("hf://org/repo@v1").is_ok());
        for bad in ["bucket/prefix", "ftp://x/y", "s3://", "file:///srv/a/../b", "s3://b/p q"] {
            assert!(validate_uri(bad).is_err(), "{bad:?}");
        }
        let hex = "AB".repeat(32);
        assert_eq!(normalize_sha256(&format!("sha256:{hex}")), Ok("ab".repeat(32)));
        assert!(normalize_sha256("abc").is_err());
    }

    #[test]
    fn uris_with_and_without_a_trailing_slash_are_one_source() {
        assert_eq!(canonical_uri("s3://bucket/prefix/"), "s3://bucket/prefix");
        assert_eq!(canonical_uri("file:///srv/a//"), "file:///srv/a");
        assert_eq!(canonical_uri("hf://org/repo@v1"), "hf://org/repo@v1");
    }

    #[test]
    fn lora_ids_are_stable_positive_31_bit_integers() {
        assert_eq!(lora_id("my-lora"), lora_id("my-lora"));
        assert_ne!(lora_id("my-lora"), lora_id("my-lora2"));
        assert!(lora_id("org/some-lora") <= 0x7fff_ffff);
    }
}
