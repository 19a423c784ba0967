//! The desired adapter set: which adapters should be loaded on every backend, from where. The
//! adapter API changes it; the reconcilers make the backends match it. It lives in one JSON
//! file in the state dir, replaced atomically on every change and read again when another
//! process (a gateway replica sharing the directory) has changed it.

use crate::files::{self, FileError, failed};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The file in the state dir.
pub const STATE_FILE: &str = "loras.json";
/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 256;
const FORMAT_VERSION: u32 = 1;

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
}

impl DesiredLora {
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

/// Normalises a `sha256` pin: 64 hex digits, optionally prefixed `sha256:`, to lowercase.
pub fn normalize_sha256(pin: &str) -> Result<String, String> {
    let hex = pin.strip_prefix("sha256:").unwrap_or(pin);
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("sha256 {pin:?} is not 64 hex digits"));
    }
    Ok(hex.to_ascii_lowercase())
}

/// Why the desired set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Io(#[from] FileError),
    #[error("{path} is not a Switchyard adapter state file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The desired adapters by name, as of one moment; cheap to clone.
pub type Snapshot = std::sync::Arc<BTreeMap<String, DesiredLora>>;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    loras: Snapshot,
    /// Names unloaded through the API: a backend that still has one (it was unreachable when
    /// the unload ran) is told to unload it when it is next seen.
    removed: BTreeSet<String>,
}

#[derive(Debug)]
struct Inner {
    state: StateFile,
    /// The file's modification time when last read or written.
    seen: Option<SystemTime>,
}

/// The desired set, in memory and on disk.
#[derive(Debug)]
pub struct LoraStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl LoraStore {
    /// Opens (creating when absent) the state in `dir`.
    pub fn open(dir: &Path) -> Result<LoraStore, StateError> {
        std::fs::create_dir_all(dir).map_err(failed("create", dir))?;
        let path = dir.join(STATE_FILE);
        let (state, seen) = read(&path)?;
        Ok(LoraStore { path, inner: Mutex::new(Inner { state, seen }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is replaced whole under the lock, so a poisoned lock still holds a
        // consistent value.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the file again if another process changed it. Returns whether it did.
    pub fn refresh(&self) -> Result<bool, StateError> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        if modified == self.lock().seen {
            return Ok(false);
        }
        let (state, seen) = read(&self.path)?;
        let mut inner = self.lock();
        let changed = inner.state != state;
        *inner = Inner { state, seen };
        Ok(changed)
    }

    pub fn get(&self, name: &str) -> Option<DesiredLora> {
        self.lock().state.loras.get(name).cloned()
    }

    /// Every desired adapter, by name.
    pub fn list(&self) -> Vec<DesiredLora> {
        self.lock().state.loras.values().cloned().collect()
    }

    /// The desired set as of now, without copying it.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().state.loras.clone()
    }

    /// Names unloaded through the API.
    pub fn removed(&self) -> BTreeSet<String> {
        self.lock().state.removed.clone()
    }

    /// Records `lora` as desired (replacing an entry of the same name). On a write failure
    /// nothing changes.
    pub fn put(&self, lora: DesiredLora) -> Result<(), StateError> {
        self.update(|s| {
            s.removed.remove(&lora.name);
            std::sync::Arc::make_mut(&mut s.loras).insert(lora.name.clone(), lora);
        })
    }

    /// Removes `name` from the desired set and remembers it was removed.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        self.update(|s| {
            std::sync::Arc::make_mut(&mut s.loras).remove(name);
            s.removed.insert(name.to_string());
        })
    }

    /// Forgets that `name` was removed (every backend has unloaded it).
    pub fn forget_removed(&self, name: &str) -> Result<(), StateError> {
        if !self.lock().state.removed.contains(name) {
            return Ok(());
        }
        self.update(|s| {
            s.removed.remove(name);
        })
    }

    fn update(&self, change: impl FnOnce(&mut StateFile)) -> Result<(), StateError> {
        let mut inner = self.lock();
        let mut next = inner.state.clone();
        change(&mut next);
        next.version = FORMAT_VERSION;
        let seen = write(&self.path, &next)?;
        *inner = Inner { state: next, seen };
        Ok(())
    }
}

fn read(path: &Path) -> Result<(StateFile, Option<SystemTime>), StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((StateFile { version: FORMAT_VERSION, ..Default::default() }, None));
        }
        Err(e) => return Err(failed("read", path)(e).into()),
    };
    let state: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| StateError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    if state.version != FORMAT_VERSION {
        return Err(StateError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("format version {} (this gateway reads {FORMAT_VERSION})", state.version),
        });
    }
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((state, modified))
}

/// Replaces the state file with `state`.
fn write(path: &Path, state: &StateFile) -> Result<Option<SystemTime>, StateError> {
    let bytes = serde_json::to_vec_pretty(state)
        .map_err(|e| StateError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?;
    files::replace(path, &bytes)?;
    Ok(std::fs::metadata(path).and_then(|m| m.modified()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, uri: &str) -> DesiredLora {
        DesiredLora {
            name: name.into(),
            uri: uri.into(),
            sha256: None,
            owner: "acme".into(),
            shared: false,
            loaded_by: None,
        }
    }

    #[test]
    fn the_desired_set_survives_a_restart_and_removals_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = LoraStore::open(dir.path()).unwrap();
        store.put(lora("acme/support", "s3://acme/support")).unwrap();
        store.put(lora("b", "hf://org/b")).unwrap();
        store.remove("b").unwrap();
        let again = LoraStore::open(dir.path()).unwrap();
        assert_eq!(again.list(), vec![lora("acme/support", "s3://acme/support")]);
        assert!(again.removed().contains("b"));
        again.put(lora("b", "hf://org/b2")).unwrap();
        assert!(!again.removed().contains("b"), "loading a name again cancels its removal");
        // The first handle sees the other's change.
        assert!(store.refresh().unwrap() || store.get("b").is_some());
        assert_eq!(store.get("b").map(|l| l.uri), Some("hf://org/b2".into()));
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"version\":1,\"loras\":").unwrap();
        let err = LoraStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
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
    fn lora_ids_are_stable_positive_31_bit_integers() {
        assert_eq!(lora_id("my-lora"), lora_id("my-lora"));
        assert_ne!(lora_id("my-lora"), lora_id("my-lora2"));
        assert!(lora_id("org/some-lora") <= 0x7fff_ffff);
    }
}
