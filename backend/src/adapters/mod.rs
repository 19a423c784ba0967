//! LoRA adapters: reading a PEFT adapter from where it lives, validating it against the base
//! model, and the table of resident adapter slots.

mod peft;
mod slots;

pub use peft::{AdapterWeights, LoraModule, load_peft_dir};
pub use slots::{Resident, SlotError, SlotTable};

use std::path::{Path, PathBuf};

/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 256;

/// Why an adapter could not be read or does not fit the served model.
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

/// Resolves an adapter URI to a local directory. This backend reads `file://` URIs with an
/// absolute path.
pub fn resolve_uri(uri: &str) -> Result<PathBuf, AdapterError> {
    let bad = |reason: &str| AdapterError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
    let (scheme, rest) =
        uri.split_once("://").ok_or_else(|| bad("expected scheme://location, e.g. file:///srv/adapters/my-lora"))?;
    match scheme {
        "file" => {
            if !rest.starts_with('/') {
                return Err(bad("file:// URIs need an absolute path (file:///abs/dir)"));
            }
            let path = PathBuf::from(rest);
            if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(bad("the path must not contain '..'"));
            }
            Ok(path)
        }
        "s3" | "hf" => Err(bad("this backend loads file:// adapters only")),
        other => Err(bad(&format!("unknown scheme {other:?}"))),
    }
}
