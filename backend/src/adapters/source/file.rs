//! `file:///abs/dir`: adapters read in place, only from inside the configured roots.

use super::{AdapterSource, AdapterUri, Fetched};
use crate::adapters::{AdapterError, AdapterFiles, CONFIG_FILE, Room, WEIGHTS_FILE};
use std::path::{Component, Path, PathBuf};

/// Reads adapters from local directories under a set of allowed roots. Paths are resolved
/// (symlinks included) before they are checked, so neither `..` nor a symlink — of the
/// directory or of a file in it — reaches outside the roots. Each file is opened once and
/// checked as opened (the opened file must be the one its resolved path names), and its bytes
/// are what the fetch returns: nothing is opened again by name, so a path swapped after the
/// check cannot change what is loaded.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// Each root as configured and as resolved.
    roots: Vec<(PathBuf, PathBuf)>,
}

impl FileSource {
    /// A source allowing the given roots, each resolved now; a root that does not exist is
    /// a configuration error. No roots: every `file://` load is refused.
    pub fn new(roots: Vec<PathBuf>) -> Result<FileSource, AdapterError> {
        let roots = roots
            .into_iter()
            .map(|r| match std::fs::canonicalize(&r) {
                Ok(resolved) => Ok((r, resolved)),
                Err(source) => Err(AdapterError::Io { path: r, source }),
            })
            .collect::<Result<_, _>>()?;
        Ok(FileSource { roots })
    }

    /// The allowed roots, resolved.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|(_, resolved)| resolved.as_path())
    }

    /// Whether a resolved path is inside a resolved root.
    fn inside_roots(&self, path: &Path) -> bool {
        self.roots.iter().any(|(_, r)| path.starts_with(r))
    }

    fn denied(&self, uri: &AdapterUri, reason: String) -> AdapterError {
        AdapterError::AccessDenied { uri: uri.uri.clone(), reason }
    }

    fn roots_list(&self) -> String {
        self.roots.iter().map(|(r, _)| r.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    fn resolve(&self, uri: &AdapterUri) -> Result<PathBuf, AdapterError> {
        if self.roots.is_empty() {
            return Err(self.denied(uri, "file:// adapters are disabled on this backend (no --adapter-roots)".into()));
        }
        let path = PathBuf::from(&uri.location);
        // Refuse paths outside the roots before touching them, so the answer says nothing
        // about what exists elsewhere.
        if !self.roots.iter().any(|(given, resolved)| path.starts_with(given) || path.starts_with(resolved)) {
            return Err(
                self.denied(uri, format!("{} is outside the allowed roots ({})", path.display(), self.roots_list()))
            );
        }
        let dir = match std::fs::canonicalize(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(AdapterError::NotFound { path }),
            Err(source) => return Err(AdapterError::Io { path, source }),
        };
        if !self.inside_roots(&dir) {
            return Err(self.denied(
                uri,
                format!(
                    "{} resolves to {}, outside the allowed roots ({})",
                    path.display(),
                    dir.display(),
                    self.roots_list()
                ),
            ));
        }
        Ok(dir)
    }

    /// Opens `name` in the resolved directory `dir` and checks the file as opened: where its
    /// path resolves now, that this is the file that was opened, and that it is inside the
    /// roots. `None` when it does not exist.
    fn open_checked(
        &self,
        uri: &AdapterUri,
        dir: &Path,
        name: &str,
    ) -> Result<Option<(std::fs::File, PathBuf)>, AdapterError> {
        let path = dir.join(name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AdapterError::Io { path, source }),
        };
        let io = |source| AdapterError::Io { path: path.clone(), source };
        let opened = file.metadata().map_err(io)?;
        if !opened.is_file() {
            return Err(AdapterError::invalid(&path, "not a regular file"));
        }
        let resolved = std::fs::canonicalize(&path).map_err(io)?;
        if !self.inside_roots(&resolved) {
            return Err(self.denied(
                uri,
                format!("{name} resolves to {}, outside the allowed roots ({})", resolved.display(), self.roots_list()),
            ));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let named = std::fs::metadata(&resolved).map_err(io)?;
            if (named.dev(), named.ino()) != (opened.dev(), opened.ino()) {
                return Err(self.denied(uri, format!("{name} changed while it was being opened")));
            }
        }
        Ok(Some((file, resolved)))
    }
}

#[async_trait::async_trait]
impl AdapterSource for FileSource {
    fn check(&self, uri: &AdapterUri) -> Result<(), AdapterError> {
        let bad = |reason: &str| AdapterError::BadUri { uri: uri.uri.clone(), reason: reason.to_string() };
        if !uri.location.starts_with('/') {
            return Err(bad("file:// URIs need an absolute path (file:///abs/dir)"));
        }
        if Path::new(&uri.location).components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(bad("the path must not contain '..'"));
        }
        Ok(())
    }

    fn in_place(&self) -> bool {
        true
    }

    async fn fetch(&self, uri: &AdapterUri, _dest: &Path, room: &Room) -> Result<Fetched, AdapterError> {
        let max_bytes = room.max_bytes();
        let this = self.clone();
        let uri = uri.clone();
        tokio::task::spawn_blocking(move || {
            let dir = this.resolve(&uri)?;
            let config = this.open_checked(&uri, &dir, CONFIG_FILE)?;
            let weights = this.open_checked(&uri, &dir, WEIGHTS_FILE)?;
            let files = AdapterFiles::from_open(&dir, config, weights, max_bytes).map_err(|e| match e {
                AdapterError::TooLarge { bytes, max, .. } => {
                    AdapterError::TooLarge { uri: uri.uri.clone(), bytes, max }
                }
                other => other,
            })?;
            Ok(Fetched { dir, revision: None, files: Some(files) })
        })
        .await
        .map_err(|e| AdapterError::Unavailable {
            uri: String::new(),
            reason: format!("file reader task failed: {e}"),
        })?
    }
}
