//! An adapter's files as validation sees them, and the scope a load may read from.
//!
//! Validation never opens files by name after a source checked them: a source that reads in
//! place (`file://`) opens each file once, checks where the opened file really is, and hands
//! over its bytes ([`AdapterFiles`]); the disk cache (the backend's own directory) is read the
//! same way. So a symlink swapped after the check cannot change what is loaded.
//!
//! A [`SourceScope`] is the set of URI prefixes one load may come from (a tenant's
//! `load_prefixes`, sent by the gateway with each load). It is checked on the URI at a path
//! boundary, and for files read in place on the path each opened file resolved to.

use super::{AdapterError, AdapterUri, CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file's bytes: read into memory, or mapped. Only files in the backend's own directories
/// are mapped (cache entries, and fetches in their temp directories): they are written once,
/// before anything maps them, and after that only renamed or deleted, never truncated or
/// rewritten, so a mapping stays valid and unchanged. Files read in place are always read.
pub enum FileBytes {
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Read(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(v: Vec<u8>) -> FileBytes {
        FileBytes::Read(v)
    }
}

impl Clone for FileBytes {
    fn clone(&self) -> FileBytes {
        FileBytes::Read(self.to_vec())
    }
}

impl PartialEq for FileBytes {
    fn eq(&self, other: &FileBytes) -> bool {
        **self == **other
    }
}

impl Eq for FileBytes {}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if matches!(self, FileBytes::Mapped(_)) { "mapped" } else { "read" };
        write!(f, "{} bytes, {how}", self.len())
    }
}

/// An adapter's PEFT files, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFiles {
    /// Where they were read from (for messages).
    pub dir: PathBuf,
    /// `adapter_config.json`, if present.
    pub config: Option<Vec<u8>>,
    /// `adapter_model.safetensors`, if present.
    pub weights: Option<FileBytes>,
    /// Only pickle weights (`adapter_model.bin`) are present: refused, but named in the message.
    pub pickle_only: bool,
    /// The resolved path of every file read (what a [`SourceScope`] is checked against).
    pub resolved: Vec<PathBuf>,
}

impl AdapterFiles {
    /// Reads the files of a directory the backend owns (a cache entry), by name.
    pub fn read_dir(dir: &Path, max_bytes: u64) -> Result<AdapterFiles, AdapterError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(AdapterError::invalid(dir, "not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AdapterError::NotFound { path: dir.to_path_buf() });
            }
            Err(source) => return Err(AdapterError::Io { path: dir.to_path_buf(), source }),
        }
        let open = |name: &str| -> Result<Option<(std::fs::File, PathBuf)>, AdapterError> {
            let path = dir.join(name);
            match std::fs::File::open(&path) {
                Ok(f) => Ok(Some((f, path))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(AdapterError::Io { path, source }),
            }
        };
        let (config, weights) = (open(CONFIG_FILE)?, open(WEIGHTS_FILE)?);
        AdapterFiles::from_open(dir, config, weights, max_bytes)
    }

    /// Reads a cache entry (or a fetch in its temp directory): as [`AdapterFiles::read_dir`],
    /// with the weights mapped rather than copied (see [`FileBytes`]).
    pub(crate) fn map_owned_dir(dir: &Path, max_bytes: u64) -> Result<AdapterFiles, AdapterError> {
        let weights_path = dir.join(WEIGHTS_FILE);
        let file = match std::fs::File::open(&weights_path) {
            Ok(f) => f,
            // Without weights there is nothing to map; reading says what is wrong.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return AdapterFiles::read_dir(dir, max_bytes),
            Err(source) => return Err(AdapterError::Io { path: weights_path, source }),
        };
        let io = |source| AdapterError::Io { path: weights_path.clone(), source };
        let size = file.metadata().map_err(io)?.len();
        let too_large = |bytes| AdapterError::TooLarge { uri: dir.display().to_string(), bytes, max: max_bytes };
        // The config is small: it is read, within what the weights leave of the budget.
        let config_budget = max_bytes.checked_sub(size).ok_or_else(|| too_large(size))?;
        let config_path = dir.join(CONFIG_FILE);
        let config = match std::fs::File::open(&config_path) {
            Ok(f) => Some((f, config_path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(AdapterError::Io { path: config_path, source }),
        };
        let mut files = AdapterFiles::from_open(dir, config, None, config_budget)?;
        // SAFETY: `dir` is the backend's own (see `FileBytes`): nothing truncates or rewrites
        // the file while it is mapped, and the mapping is read-only.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        files.weights = Some(FileBytes::Mapped(map));
        files.pickle_only = false;
        files.resolved.push(weights_path);
        Ok(files)
    }

    /// Reads opened files (each with the path it resolved to), at most `max_bytes` together.
    pub(crate) fn from_open(
        dir: &Path,
        config: Option<(std::fs::File, PathBuf)>,
        weights: Option<(std::fs::File, PathBuf)>,
        max_bytes: u64,
    ) -> Result<AdapterFiles, AdapterError> {
        let size = |o: &Option<(std::fs::File, PathBuf)>| -> Result<u64, AdapterError> {
            match o {
                Some((f, path)) => {
                    f.metadata().map(|m| m.len()).map_err(|source| AdapterError::Io { path: path.clone(), source })
                }
                None => Ok(0),
            }
        };
        let total = size(&config)? + size(&weights)?;
        let too_large = |bytes: u64| AdapterError::TooLarge { uri: dir.display().to_string(), bytes, max: max_bytes };
        if total > max_bytes {
            return Err(too_large(total));
        }
        let mut resolved = Vec::new();
        let mut budget = max_bytes;
        let mut read = |opened: Option<(std::fs::File, PathBuf)>| -> Result<Option<Vec<u8>>, AdapterError> {
            let Some((file, path)) = opened else { return Ok(None) };
            // Room for the whole file at once: growing a buffer of tens of megabytes by doubling
            // copies it over and over.
            let expected = file.metadata().map_or(0, |m| m.len()).min(budget);
            let mut bytes = Vec::with_capacity(usize::try_from(expected).unwrap_or(0).saturating_add(1));
            // One byte past the budget tells a file that grew since its size was read.
            file.take(budget.saturating_add(1))
                .read_to_end(&mut bytes)
                .map_err(|source| AdapterError::Io { path: path.clone(), source })?;
            if bytes.len() as u64 > budget {
                return Err(too_large(max_bytes - budget + bytes.len() as u64));
            }
            budget -= bytes.len() as u64;
            resolved.push(path);
            Ok(Some(bytes))
        };
        let config = read(config)?;
        let weights = read(weights)?.map(FileBytes::Read);
        let pickle_only = weights.is_none() && dir.join(PICKLE_FILE).exists();
        Ok(AdapterFiles { dir: dir.to_path_buf(), config, weights, pickle_only, resolved })
    }

    /// SHA-256 of the weights, as 64 lowercase hex digits.
    pub fn weights_sha256(&self) -> Option<String> {
        use sha2::Digest;
        self.weights.as_ref().map(|w| sha2::Sha256::digest(&**w).iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// The URI prefixes one load may read from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceScope {
    pub prefixes: Vec<String>,
}

impl SourceScope {
    pub fn new(prefixes: Vec<String>) -> SourceScope {
        SourceScope { prefixes }
    }

    /// Whether `uri` starts with one of the prefixes at a path boundary (`s3://acme` does not
    /// admit `s3://acme-evil/x`).
    pub fn admits_uri(&self, uri: &AdapterUri) -> bool {
        self.prefixes.iter().any(|p| {
            let p = normalize(p);
            match uri.uri.strip_prefix(p.as_str()) {
                Some(rest) => p.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('@'),
                None => false,
            }
        })
    }

    /// Whether `resolved` (a file's path after every symlink) lies under the resolved path of one
    /// of the scope's `file://` prefixes. A prefix that does not resolve admits nothing.
    pub fn admits_path(&self, resolved: &Path) -> bool {
        self.prefixes
            .iter()
            .filter_map(|p| p.strip_prefix("file://"))
            .any(|p| std::fs::canonicalize(p.trim_end_matches('/')).is_ok_and(|root| resolved.starts_with(root)))
    }

    /// Checks a load of `uri` whose files, read in place, resolved to `resolved` (empty: none
    /// read yet, or a remote source).
    pub fn check(&self, uri: &AdapterUri, resolved: &[PathBuf]) -> Result<(), AdapterError> {
        let denied = |reason: String| AdapterError::AccessDenied { uri: uri.uri.clone(), reason };
        if !self.admits_uri(uri) {
            return Err(denied(format!("the load may only read from {}", self.describe())));
        }
        if uri.scheme == "file"
            && let Some(outside) = resolved.iter().find(|p| !self.admits_path(p))
        {
            return Err(denied(format!(
                "{} resolves to {}, outside what the load may read ({})",
                uri.location,
                outside.display(),
                self.describe()
            )));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        if self.prefixes.is_empty() { "nothing".into() } else { self.prefixes.join(", ") }
    }
}

/// A prefix as URIs are normalised ([`AdapterUri::parse`]): lower-case scheme.
fn normalize(prefix: &str) -> String {
    match prefix.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => prefix.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> AdapterUri {
        AdapterUri::parse(s).unwrap()
    }

    #[test]
    fn uris_are_admitted_at_path_boundaries_only() {
        let scope = SourceScope::new(vec!["s3://acme".into(), "hf://acme-org/".into(), "file:///srv/acme/".into()]);
        assert!(scope.admits_uri(&uri("s3://acme/support")));
        assert!(scope.admits_uri(&uri("hf://acme-org/support@v2")));
        assert!(scope.admits_uri(&uri("file:///srv/acme/a")));
        assert!(!scope.admits_uri(&uri("s3://acme-evil/support")));
        assert!(!scope.admits_uri(&uri("file:///srv/acmeother/a")));
        assert!(!SourceScope::new(vec![]).admits_uri(&uri("s3://acme/x")), "an empty scope admits nothing");
    }

    #[test]
    fn a_symlink_out_of_the_scope_is_caught_on_the_resolved_path() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        std::fs::create_dir_all(b.join("secret")).unwrap();
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(b.join("secret").join(CONFIG_FILE), b"{}").unwrap();
        std::os::unix::fs::symlink(b.join("secret"), a.join("evil")).unwrap();
        let scope = SourceScope::new(vec![format!("file://{}/", a.display())]);
        let u = uri(&format!("file://{}/evil", a.display()));
        assert!(scope.admits_uri(&u), "the URI itself looks inside");
        let files = AdapterFiles::read_dir(&a.join("evil"), 1 << 20).unwrap();
        let resolved: Vec<PathBuf> = files.resolved.iter().map(|p| std::fs::canonicalize(p).unwrap()).collect();
        assert!(scope.check(&u, &[]).is_ok(), "before anything is read, only the URI is checked");
        let e = scope.check(&u, &resolved).unwrap_err();
        assert!(matches!(e, AdapterError::AccessDenied { .. }) && e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn files_past_the_size_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{}").unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), vec![0u8; 100]).unwrap();
        assert!(AdapterFiles::read_dir(dir.path(), 102).is_ok());
        assert!(matches!(AdapterFiles::read_dir(dir.path(), 101), Err(AdapterError::TooLarge { .. })));
        let files = AdapterFiles::read_dir(dir.path(), 1000).unwrap();
        assert_eq!(files.weights_sha256().map(|h| h.len()), Some(64));
    }
}
