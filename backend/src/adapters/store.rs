//! The adapter store: URI → source → (cache) → validated adapter, with size limits and an
//! optional digest pin.

use super::AdapterError;
use super::cache::{AdapterCache, CachePin, CacheStats, EntryMeta, Room};
use super::files::{AdapterFiles, SourceScope};
use super::source::{AdapterUri, SourceRegistry};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A requested SHA-256 of an adapter's weights file (`adapter_model.safetensors`), as 64 hex
/// digits, optionally prefixed `sha256:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest(String);

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, String> {
        let hex = text.strip_prefix("sha256:").unwrap_or(text);
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("sha256 {text:?} is not 64 hex digits (optionally prefixed sha256:)"));
        }
        Ok(Digest(hex.to_ascii_lowercase()))
    }

    pub fn hex(&self) -> &str {
        &self.0
    }

    /// Checks the weights as read against this digest; returns their hash.
    fn verify_files(&self, uri: &str, files: &AdapterFiles) -> Result<String, AdapterError> {
        let actual = files.weights_sha256().unwrap_or_default();
        self.verify(uri, &actual)?;
        Ok(actual)
    }

    fn verify(&self, uri: &str, actual: &str) -> Result<(), AdapterError> {
        if self.0 == actual {
            return Ok(());
        }
        Err(AdapterError::DigestMismatch { uri: uri.to_string(), expected: self.0.clone(), actual: actual.to_string() })
    }
}

/// Limits and places of an [`AdapterStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Root of the disk cache for remote adapters.
    pub cache_dir: PathBuf,
    /// Byte budget of the disk cache.
    pub cache_bytes: u64,
    /// Largest adapter (config + weights) accepted from any source.
    pub max_adapter_bytes: u64,
}

/// A validated adapter and where it came from.
#[derive(Debug)]
pub struct Loaded<T> {
    /// What the validator made of the files (the weights).
    pub value: T,
    /// SHA-256 of the weights file, when known (always for cached adapters; for `file://`
    /// when a digest was requested).
    pub sha256: Option<String>,
    pub revision: Option<String>,
    /// Keeps the cache entry from eviction; `None` for in-place sources.
    pub pin: Option<CachePin>,
    /// Whether this load fetched from the source (a cache miss).
    pub fetched: bool,
    /// Where an in-place adapter's files resolved to (empty for cached ones).
    pub resolved: Vec<PathBuf>,
    /// How long the load took getting the files (from the source, the cache or in place) and
    /// validating them.
    pub fetch_time: Duration,
    pub validate_time: Duration,
}

/// Sources, the disk cache and the limits, in one place.
#[derive(Debug)]
pub struct AdapterStore {
    sources: SourceRegistry,
    cache: AdapterCache,
    max_adapter_bytes: u64,
}

/// Rewrites paths inside a temp or cache directory in an error as the adapter's URI, so
/// messages name what the user asked for.
fn relabel(err: AdapterError, dir: &Path, uri: &str) -> AdapterError {
    let rename = |p: PathBuf| match p.strip_prefix(dir) {
        Ok(rest) if rest.as_os_str().is_empty() => PathBuf::from(uri),
        Ok(rest) => PathBuf::from(format!("{uri}/{}", rest.display())),
        Err(_) => p,
    };
    match err {
        AdapterError::Invalid { path, reason } => AdapterError::Invalid { path: rename(path), reason },
        AdapterError::RankTooLarge { path, module, rank, max } => {
            AdapterError::RankTooLarge { path: rename(path), module, rank, max }
        }
        other => other,
    }
}

impl AdapterStore {
    pub fn new(sources: SourceRegistry, options: &StoreOptions) -> Result<AdapterStore, AdapterError> {
        let cache = AdapterCache::open(&options.cache_dir, options.cache_bytes)?;
        Ok(AdapterStore { sources, cache, max_adapter_bytes: options.max_adapter_bytes })
    }

    pub fn sources(&self) -> &SourceRegistry {
        &self.sources
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Checks a URI's syntax and scheme without any I/O.
    pub fn check_uri(&self, uri: &str) -> Result<AdapterUri, AdapterError> {
        self.sources.resolve(uri).map(|(u, _)| u)
    }

    /// Fetches (or finds in the cache) the adapter at `uri`, checks it against `scope` (when
    /// given), checks `digest` and runs `validate` on its files off the async threads. A remote
    /// adapter is validated before it is cached, so one that fails validation leaves nothing in
    /// the cache.
    pub async fn load<T, V>(
        &self,
        uri: &str,
        digest: Option<&Digest>,
        scope: Option<&SourceScope>,
        validate: V,
    ) -> Result<Loaded<T>, AdapterError>
    where
        T: Send + 'static,
        V: Fn(&AdapterFiles) -> Result<T, AdapterError> + Send + Sync + 'static,
    {
        let started = Instant::now();
        // Validation is timed apart from getting the files (it runs inside the cache's fetch).
        let validating = Arc::new(Mutex::new(Duration::ZERO));
        let validate = {
            let validating = validating.clone();
            move |files: &AdapterFiles| {
                let began = Instant::now();
                let result = validate(files);
                *validating.lock().unwrap_or_else(|p| p.into_inner()) += began.elapsed();
                result
            }
        };
        let timings = move || {
            let validate_time = *validating.lock().unwrap_or_else(|p| p.into_inner());
            (started.elapsed().saturating_sub(validate_time), validate_time)
        };
        let (uri, source) = self.sources.resolve(uri)?;
        // The URI first, before any I/O: a load outside its scope learns nothing about the source.
        if let Some(scope) = scope {
            scope.check(&uri, &[])?;
        }
        let max = self.max_adapter_bytes;

        if source.in_place() {
            let fetched = source.fetch(&uri, Path::new(""), &Room::unbounded(&uri.uri, max)).await?;
            let (digest, scope) = (digest.cloned(), scope.cloned());
            let uri_parsed = uri.clone();
            let (value, sha256, resolved) = tokio::task::spawn_blocking(move || -> Result<_, AdapterError> {
                // A custom in-place source may hand over only its directory: read it once here.
                let files = match fetched.files {
                    Some(files) => files,
                    None => AdapterFiles::read_dir(&fetched.dir, max)?,
                };
                if let Some(scope) = &scope {
                    scope.check(&uri_parsed, &files.resolved)?;
                }
                let sha256 = digest.map(|d| d.verify_files(&uri_parsed.uri, &files)).transpose()?;
                Ok((validate(&files)?, sha256, files.resolved))
            })
            .await
            .map_err(|e| AdapterError::Unavailable {
                uri: uri.uri.clone(),
                reason: format!("loader task failed: {e}"),
            })??;
            let (fetch_time, validate_time) = timings();
            return Ok(Loaded {
                value,
                sha256,
                revision: None,
                pin: None,
                fetched: false,
                resolved,
                fetch_time,
                validate_time,
            });
        }

        let validate = Arc::new(validate);
        let check = {
            let (validate, digest, uri_text) = (validate.clone(), digest.cloned(), uri.uri.clone());
            move |dir: &Path, meta: &EntryMeta| -> Result<T, AdapterError> {
                if let Some(d) = &digest {
                    d.verify(&uri_text, &meta.sha256)?;
                }
                let files = AdapterFiles::map_owned_dir(dir, max)?;
                validate(&files).map_err(|e| relabel(e, dir, &uri_text))
            }
        };
        let fetch = |dir: PathBuf, room: Arc<Room>| {
            let (source, uri) = (source.clone(), uri.clone());
            async move { source.fetch(&uri, &dir, &room).await.map(|f| f.revision) }
        };
        // A cached copy with other weights than a pin asks for (the object was replaced at its
        // source) is fetched again; the copy stays until the new files pass their checks.
        let wanted = digest.map(Digest::hex);
        let (entry, checked) = self.cache.get_or_fetch(&uri, wanted, max, fetch, check).await?;
        let fetched = checked.is_some();
        let value = match checked {
            Some(value) => value,
            None => {
                // A cache hit: the entry was validated when fetched, but this backend may
                // serve a different model or limits than the one that fetched it. A pinned
                // digest is checked against the files as they are now, not as recorded.
                if let Some(d) = digest {
                    d.verify(&uri.uri, &entry.meta.sha256)?;
                }
                let dir = entry.dir.clone();
                let uri_text = uri.uri.clone();
                let digest = digest.cloned();
                tokio::task::spawn_blocking(move || {
                    let files = AdapterFiles::map_owned_dir(&dir, max)?;
                    if let Some(d) = digest {
                        d.verify_files(&uri_text, &files)?;
                    }
                    validate(&files).map_err(|e| relabel(e, &dir, &uri_text))
                })
                .await
                .map_err(|e| AdapterError::Unavailable {
                    uri: uri.uri.clone(),
                    reason: format!("loader task failed: {e}"),
                })??
            }
        };
        let (fetch_time, validate_time) = timings();
        Ok(Loaded {
            value,
            sha256: Some(entry.meta.sha256.clone()),
            revision: entry.meta.revision.clone(),
            pin: Some(entry.pin),
            fetched,
            resolved: Vec::new(),
            fetch_time,
            validate_time,
        })
    }
}
