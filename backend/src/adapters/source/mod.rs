//! Adapter sources: one [`AdapterSource`] per URI scheme, chosen in one place
//! ([`SourceRegistry::resolve`]).
//!
//! A source either reads adapters in place (`file://`) or downloads the PEFT files into a
//! directory the cache gives it (`s3://`, `hf://`). Remote sources fetch only the files an
//! adapter is made of ([`CONFIG_FILE`], [`WEIGHTS_FILE`]) and refuse pickle-only adapters
//! before downloading anything.
//!
//! Adding a scheme: implement [`AdapterSource`] and [`SourceRegistry::register`] it under its
//! scheme before the backend starts serving (`backend/tests/custom_source.rs` shows one).

mod file;
mod hf;
mod s3;

pub use file::FileSource;
pub use hf::{HfSource, HfSourceOptions};
pub use s3::{S3Source, S3SourceOptions};

use super::{AdapterError, CONFIG_FILE, PICKLE_FILE, Room, WEIGHTS_FILE};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A parsed `scheme://location` adapter URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterUri {
    /// The URI as the caller wrote it (trailing `/` removed).
    pub uri: String,
    /// Lower-case scheme, e.g. `s3`.
    pub scheme: String,
    /// Everything after `://`.
    pub location: String,
}

impl AdapterUri {
    pub fn parse(uri: &str) -> Result<AdapterUri, AdapterError> {
        let bad = |reason: &str| AdapterError::BadUri { uri: uri.to_string(), reason: reason.to_string() };
        if uri.len() > 4096 {
            return Err(bad("longer than 4096 bytes"));
        }
        if uri.chars().any(|c| c.is_control()) {
            return Err(bad("contains control characters"));
        }
        let (scheme, location) = uri
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://location, e.g. s3://bucket/prefix or hf://org/repo"))?;
        let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid_scheme {
            return Err(bad("the scheme must be letters, digits, '+', '-' or '.'"));
        }
        let location = location.trim_end_matches('/');
        if location.is_empty() && scheme != "file" {
            return Err(bad("nothing after scheme://"));
        }
        let scheme = scheme.to_ascii_lowercase();
        Ok(AdapterUri { uri: format!("{scheme}://{location}"), scheme, location: location.to_string() })
    }
}

impl fmt::Display for AdapterUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// What a fetch produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The directory holding the adapter's files.
    pub dir: PathBuf,
    /// What the location resolved to, when the source has versions (the commit of an `hf://`
    /// revision); cached with the files and reported in `ListAdapters`.
    pub revision: Option<String>,
    /// An in-place source's files as it opened and checked them: validation reads these bytes,
    /// never the files again by name. `None` from a remote source (its files are in the cache
    /// directory `dest`, which the backend owns).
    pub files: Option<super::AdapterFiles>,
}

/// Where adapters of one URI scheme come from.
#[async_trait::async_trait]
pub trait AdapterSource: Send + Sync + fmt::Debug {
    /// Checks the location's syntax without any I/O, so a malformed URI fails before a cache
    /// slot or a download is set up.
    fn check(&self, uri: &AdapterUri) -> Result<(), AdapterError>;

    /// `true` when the adapter is read where it is (nothing is copied into the cache).
    fn in_place(&self) -> bool {
        false
    }

    /// Makes the adapter's files available. A remote source writes them into `dest` (an empty
    /// directory it owns until it returns; on error the caller deletes it), reserving in
    /// `room` the total it will have written before writing it ([`Room::reserve`]: what a
    /// listing announces up front, then the running total as it writes) and stopping with the
    /// error a reservation returns. An in-place source ignores `dest`, returns its own
    /// directory, and refuses adapters above [`Room::max_bytes`].
    async fn fetch(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<Fetched, AdapterError>;
}

/// The sources a backend knows, by scheme.
#[derive(Debug, Clone, Default)]
pub struct SourceRegistry {
    sources: BTreeMap<String, Arc<dyn AdapterSource>>,
}

impl SourceRegistry {
    pub fn new() -> SourceRegistry {
        SourceRegistry::default()
    }

    /// Adds (or replaces) the source for `scheme` (lower case, without `://`).
    pub fn register(&mut self, scheme: &str, source: Arc<dyn AdapterSource>) {
        self.sources.insert(scheme.to_ascii_lowercase(), source);
    }

    /// Schemes with a source, sorted.
    pub fn schemes(&self) -> Vec<&str> {
        self.sources.keys().map(String::as_str).collect()
    }

    /// Parses `uri` and finds its source; the URI's syntax is checked by that source.
    pub fn resolve(&self, uri: &str) -> Result<(AdapterUri, Arc<dyn AdapterSource>), AdapterError> {
        let parsed = AdapterUri::parse(uri)?;
        let source = self.sources.get(&parsed.scheme).cloned().ok_or_else(|| AdapterError::BadUri {
            uri: uri.to_string(),
            reason: format!("unknown scheme {:?}; this backend reads {}", parsed.scheme, self.schemes().join(", ")),
        })?;
        source.check(&parsed)?;
        Ok((parsed, source))
    }
}

/// Runs a remote fetch under the source's download timeout.
pub(crate) async fn within<T>(
    uri: &AdapterUri,
    limit: std::time::Duration,
    fetch: impl Future<Output = Result<T, AdapterError>>,
) -> Result<T, AdapterError> {
    tokio::time::timeout(limit, fetch).await.unwrap_or_else(|_| {
        Err(AdapterError::Unavailable {
            uri: uri.uri.clone(),
            reason: format!("the download did not finish within {limit:?}"),
        })
    })
}

/// Decides which of a remote listing's files to download: the config and the safetensors
/// weights. `listing` maps file names (relative to the adapter's location) to sizes, where
/// known. Refuses a missing config and pickle-only weights, and reserves the announced total
/// in `room` (which refuses what does not fit) before anything is downloaded.
pub(crate) fn plan_download(
    uri: &AdapterUri,
    listing: &BTreeMap<String, Option<u64>>,
    room: &Room,
) -> Result<Vec<String>, AdapterError> {
    let has = |f: &str| listing.contains_key(f);
    if listing.is_empty() {
        return Err(AdapterError::SourceNotFound { uri: uri.uri.clone(), reason: "nothing there".to_string() });
    }
    if !has(CONFIG_FILE) {
        let found: Vec<&str> = listing.keys().map(String::as_str).take(8).collect();
        let reason = format!("no {CONFIG_FILE} (found: {})", found.join(", "));
        return Err(AdapterError::Invalid { path: PathBuf::from(&uri.uri), reason });
    }
    if !has(WEIGHTS_FILE) {
        let reason = if has(PICKLE_FILE) {
            format!(
                "only pickle weights ({PICKLE_FILE}) found; they are refused because loading pickle can run code — convert to {WEIGHTS_FILE}"
            )
        } else {
            format!("no {WEIGHTS_FILE}")
        };
        return Err(AdapterError::Invalid { path: PathBuf::from(&uri.uri), reason });
    }
    let files = vec![CONFIG_FILE.to_string(), WEIGHTS_FILE.to_string()];
    let total: u64 = files.iter().filter_map(|f| listing.get(f).copied().flatten()).sum();
    room.reserve(total)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_into_scheme_and_location() {
        let u = AdapterUri::parse("S3://bucket/some/prefix/").expect("valid");
        assert_eq!(
            (u.scheme.as_str(), u.location.as_str(), u.uri.as_str()),
            ("s3", "bucket/some/prefix", "s3://bucket/some/prefix")
        );
        for bad in ["", "bucket/prefix", "s3://", "://x", "1x://y", "s3://a\nb"] {
            assert!(matches!(AdapterUri::parse(bad), Err(AdapterError::BadUri { .. })), "{bad:?}");
        }
    }

    #[test]
    fn unknown_schemes_name_the_known_ones() {
        let mut reg = SourceRegistry::new();
        reg.register("file", Arc::new(FileSource::new(vec![]).expect("no roots")));
        let err = reg.resolve("gs://bucket/x").expect_err("no gs source");
        assert!(err.to_string().contains("unknown scheme \"gs\"; this backend reads file"), "{err}");
    }

    #[test]
    fn a_download_plan_takes_the_peft_files_and_refuses_pickle_and_size() {
        let uri = AdapterUri::parse("s3://b/a").expect("valid");
        let listing = |files: &[(&str, u64)]| files.iter().map(|(f, s)| (f.to_string(), Some(*s))).collect();
        let ok = listing(&[(CONFIG_FILE, 10), (WEIGHTS_FILE, 100), ("README.md", 5000)]);
        let room = |max| Room::unbounded(&uri.uri, max);
        assert_eq!(plan_download(&uri, &ok, &room(110)).expect("fits"), vec![CONFIG_FILE, WEIGHTS_FILE]);
        assert!(matches!(
            plan_download(&uri, &ok, &room(109)),
            Err(AdapterError::TooLarge { bytes: 110, max: 109, .. })
        ));
        let pickle = listing(&[(CONFIG_FILE, 10), (PICKLE_FILE, 100)]);
        let err = plan_download(&uri, &pickle, &room(1000)).expect_err("pickle");
        assert!(err.to_string().contains("only pickle weights"), "{err}");
        let no_config = listing(&[(WEIGHTS_FILE, 100)]);
        let err = plan_download(&uri, &no_config, &room(1000)).expect_err("no config");
        assert!(err.to_string().contains("no adapter_config.json (found: adapter_model.safetensors)"), "{err}");
        assert!(matches!(plan_download(&uri, &BTreeMap::new(), &room(1000)), Err(AdapterError::SourceNotFound { .. })));
    }
}
