//! LoRA adapters: where they come from ([`source`]), the disk cache that keeps remote ones
//! ([`cache`]), reading and validating a PEFT adapter against the base model ([`peft`]), the
//! store that ties those together ([`store`]), the table of resident slots ([`slots`], the
//! engine's), and the manager that owns every adapter's life ([`manager`]).

pub mod cache;
mod files;
mod lifecycle;
mod manager;
mod peft;
mod slots;
pub mod source;
mod store;

pub use cache::{AdapterCache, CachePin, CacheStats, Room};
pub use files::{AdapterFiles, FileBytes, SourceScope};
pub use lifecycle::{Lifecycle, Origin, Phase, Record};
pub use manager::{AdapterInfo, AdapterManager, AdapterState, LoadOutcome, ManagerError};
pub use peft::{AdapterWeights, LoraModule, load_peft, load_peft_dir};
pub use slots::{Released, Resident, SlotError, SlotTable, SlotWeights};
pub use source::{
    AdapterSource, AdapterUri, Fetched, FileSource, HfSource, HfSourceOptions, S3Source, S3SourceOptions,
    SourceRegistry,
};
pub use store::{AdapterStore, Digest, Loaded, StoreOptions};

use std::path::{Path, PathBuf};

/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 256;
/// The PEFT files an adapter is made of.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's pickle weights: recognised only to be refused by name.
pub const PICKLE_FILE: &str = "adapter_model.bin";

/// Why an adapter could not be fetched, read or used.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("invalid adapter name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("unsupported adapter source {uri:?}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("adapter not found: {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid adapter {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("adapter {path} has rank {rank} in {module}, above this backend's --max-lora-rank {max}")]
    RankTooLarge { path: PathBuf, module: String, rank: usize, max: usize },
    /// The source answered, and what was asked for is not there.
    #[error("adapter source {uri}: {reason}")]
    SourceNotFound { uri: String, reason: String },
    /// The source refused our credentials, or a `file://` path is outside the allowed roots.
    #[error("adapter source {uri}: access denied: {reason}")]
    AccessDenied { uri: String, reason: String },
    /// The source could not be reached or broke off (after retries).
    #[error("adapter source {uri} is unavailable: {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("adapter {uri} is {bytes} bytes, above this backend's --max-adapter-bytes {max}")]
    TooLarge { uri: String, bytes: u64, max: u64 },
    #[error("adapter {uri}: sha256 of {WEIGHTS_FILE} is {actual}, but the request pins {expected}")]
    DigestMismatch { uri: String, expected: String, actual: String },
    #[error(
        "the adapter cache is full: {uri} needs {needed} bytes, the budget is {budget} bytes, {pinned} bytes are pinned by loaded adapters and {reserved} bytes are reserved by other downloads in progress; unload adapters, retry later or raise --lora-cache-bytes"
    )]
    CacheFull { uri: String, needed: u64, budget: u64, pinned: u64, reserved: u64 },
}

impl AdapterError {
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> AdapterError {
        AdapterError::Invalid { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// Checks an adapter name: 1–256 printable characters; `/` is allowed (`org/adapter`).
pub fn validate_name(name: &str) -> Result<(), AdapterError> {
    let bad = |reason| Err(AdapterError::BadName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 256 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("must not contain whitespace or control characters");
    }
    Ok(())
}
