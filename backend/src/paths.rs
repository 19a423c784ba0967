//! Where Switchyard keeps things on disk by default.

use std::path::PathBuf;

/// File name of the default model, as `scripts/fetch-smollm2` stores it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The user's Switchyard cache: `$SWITCHYARD_CACHE`, else `$XDG_CACHE_HOME/switchyard`, else
/// `$HOME/.cache/switchyard` (the same rule as `scripts/fetch-smollm2`).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SWITCHYARD_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("switchyard"))
}

/// Where the default model lives once fetched.
pub fn default_model() -> Option<PathBuf> {
    cache_dir().map(|c| c.join("models").join(DEFAULT_MODEL_FILE))
}
