//! The files the gateway writes (the directory state store and its blobs): each is replaced
//! whole and atomically, so a reader sees the old file or the new one.

use std::path::{Path, PathBuf};

/// A file operation that failed, naming what was done to which file.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}: {source}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Maps an I/O error of `action` on `path` to a [`FileError`].
pub(crate) fn failed<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError { action, path: path.to_path_buf(), source }
}

/// Writes `bytes` to a temp file beside `path`, syncs it, and renames it over `path`.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed("create a temp file in", dir))?;
    tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all()).map_err(failed("write", path))?;
    tmp.persist(path).map_err(|e| FileError { action: "replace", path: path.to_path_buf(), source: e.error })?;
    Ok(())
}
