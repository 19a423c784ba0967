//! The on-disk adapter cache for remote sources.
//!
//! - **Key**: the scheme and 128 bits of SHA-256 of the normalised URI (which includes an
//!   `hf://` revision), e.g. `s3-3f2a…`.
//! - **Atomic**: a fetch writes into `.tmp-<key>-*`, is validated there, and only then is
//!   renamed to `<key>/`. An interrupted fetch leaves a temp dir that the next start removes,
//!   never an entry.
//! - **Single flight**: one fetch per key at a time; concurrent loads of one URI wait for it
//!   and then share the entry.
//! - **Bounded**: a byte budget, kept by evicting the least recently used unpinned entries.
//!   An entry is pinned while an adapter loaded from it is in use ([`CachePin`]).
//! - **Integrity**: each entry records its files' sizes and the SHA-256 of its weights; a
//!   damaged entry is dropped and fetched again, and a requested digest is checked before use.
//! - **Restarts**: entries (and their recency, from the metadata file's mtime) are read back
//!   at start.

use super::{AdapterError, AdapterUri, WEIGHTS_FILE};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Metadata file inside each entry; an entry without a readable one is not an entry.
const META_FILE: &str = ".switchyard-entry.json";
const TMP_PREFIX: &str = ".tmp-";

/// What the cache records about an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub uri: String,
    /// What the source resolved the location to (an `hf://` commit), if it has versions.
    pub revision: Option<String>,
    /// Lower-case hex SHA-256 of the weights file.
    pub sha256: String,
    /// File name → size in bytes.
    pub files: BTreeMap<String, u64>,
}

impl EntryMeta {
    pub fn bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// Counters and sizes, for tests, metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub budget: u64,
    pub pinned_bytes: u64,
    /// Fetches started (cache misses that reached the source).
    pub fetches: u64,
    /// Loads served from an existing entry.
    pub hits: u64,
    /// Entries removed to make room.
    pub evictions: u64,
}

struct Entry {
    meta: EntryMeta,
    last_used: u64,
    pins: u32,
    /// Tells pins of this entry from pins of an earlier entry under the same key.
    generation: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    clock: u64,
    fetches: u64,
    hits: u64,
    evictions: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn used(&self) -> u64 {
        self.entries.values().map(|e| e.meta.bytes()).sum()
    }

    fn pinned_except(&self, key: &str) -> u64 {
        self.entries.iter().filter(|(k, e)| e.pins > 0 && k.as_str() != key).map(|(_, e)| e.meta.bytes()).sum()
    }
}

struct Inner {
    root: PathBuf,
    budget: u64,
    state: Mutex<State>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is plain counters and maps, each update complete before the lock is
        // released: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The adapter cache. Cheap to clone; clones share one cache.
#[derive(Clone)]
pub struct AdapterCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AdapterCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterCache").field("root", &self.inner.root).field("stats", &self.stats()).finish()
    }
}

/// Keeps an entry from being evicted while it lives.
pub struct CachePin {
    inner: Arc<Inner>,
    key: String,
    generation: u64,
}

impl std::fmt::Debug for CachePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CachePin").field(&self.key).finish()
    }
}

impl Drop for CachePin {
    fn drop(&mut self) {
        if let Some(e) = self.inner.state().entries.get_mut(&self.key)
            && e.generation == self.generation
        {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

/// An entry handed to a loader: where its files are, what they are, and its pin.
#[derive(Debug)]
pub struct CacheEntry {
    pub dir: PathBuf,
    pub meta: EntryMeta,
    pub pin: CachePin,
}

/// The cache key of a URI.
pub fn key(uri: &AdapterUri) -> String {
    let hash = Sha256::digest(uri.uri.as_bytes());
    let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{hex}", uri.scheme.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// Lower-case hex SHA-256 of a file, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AdapterError + '_ {
    move |source| AdapterError::Io { path: path.to_path_buf(), source }
}

/// Sizes of the regular files directly in `dir` (the metadata file excluded).
fn file_sizes(dir: &Path) -> std::io::Result<BTreeMap<String, u64>> {
    let mut files = BTreeMap::new();
    for item in std::fs::read_dir(dir)? {
        let item = item?;
        let meta = item.metadata()?;
        let name = item.file_name().to_string_lossy().into_owned();
        if meta.is_file() && name != META_FILE {
            files.insert(name, meta.len());
        }
    }
    Ok(files)
}

/// Reads an entry back; `None` when it is incomplete or damaged.
fn read_entry(dir: &Path) -> Option<(EntryMeta, std::time::SystemTime)> {
    let meta_path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&meta_path).ok()?;
    let meta: EntryMeta = serde_json::from_str(&text).ok()?;
    let mtime = std::fs::metadata(&meta_path).and_then(|m| m.modified()).ok()?;
    (file_sizes(dir).ok()? == meta.files).then_some((meta, mtime))
}

/// Takes a directory out of the cache at once by renaming it to a temp name (so a crash before
/// it is deleted leaves something the next start cleans up, never a half entry). Returns what
/// to delete.
fn retire_dir(root: &Path, dir: &Path) -> PathBuf {
    let doomed = root.join(format!("{TMP_PREFIX}evicted-{}", rand::random::<u64>()));
    if std::fs::rename(dir, &doomed).is_ok() { doomed } else { dir.to_path_buf() }
}

fn delete_dirs(dirs: Vec<PathBuf>) {
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove adapter cache directory");
        }
    }
}

fn remove_entry_dir(root: &Path, dir: &Path) {
    delete_dirs(vec![retire_dir(root, dir)]);
}

impl AdapterCache {
    /// Opens (creating) the cache at `root` with a byte budget: removes leftovers of
    /// interrupted fetches and damaged entries, reads the others back, and evicts the least
    /// recently used ones if they exceed the budget.
    pub fn open(root: &Path, budget: u64) -> Result<AdapterCache, AdapterError> {
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        let mut found = Vec::new();
        for item in std::fs::read_dir(root).map_err(io_err(root))? {
            let item = item.map_err(io_err(root))?;
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if !path.is_dir() {
                continue;
            }
            if name.starts_with(TMP_PREFIX) {
                tracing::info!(dir = %path.display(), "removing an interrupted adapter fetch");
                remove_entry_dir(root, &path);
                continue;
            }
            match read_entry(&path) {
                Some((meta, mtime)) => found.push((mtime, name, meta)),
                None => {
                    tracing::warn!(dir = %path.display(), "removing a damaged adapter cache entry");
                    remove_entry_dir(root, &path);
                }
            }
        }
        found.sort_by_key(|(mtime, ..)| *mtime);
        let mut state = State::default();
        for (_, key, meta) in found {
            let last_used = state.tick();
            state.entries.insert(key, Entry { meta, last_used, pins: 0, generation: last_used });
        }
        let inner =
            Arc::new(Inner { root: root.to_path_buf(), budget, state: Mutex::new(state), flights: Mutex::default() });
        let cache = AdapterCache { inner };
        {
            let mut state = cache.inner.state();
            let mut doomed = Vec::new();
            cache.evict_until(&mut state, budget, None, &mut doomed);
            delete_dirs(doomed);
            tracing::info!(dir = %root.display(), entries = state.entries.len(), bytes = state.used(), budget, "adapter cache opened");
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn stats(&self) -> CacheStats {
        let s = self.inner.state();
        CacheStats {
            entries: s.entries.len(),
            bytes: s.used(),
            budget: self.inner.budget,
            pinned_bytes: s.pinned_except(""),
            fetches: s.fetches,
            hits: s.hits,
            evictions: s.evictions,
        }
    }

    /// Evicts unpinned entries, least recently used first, until at most `limit` bytes are
    /// used; `keep` is never evicted. Their directories are renamed away at once and added to
    /// `doomed`, for deleting outside the lock. Returns whether the limit was reached.
    fn evict_until(&self, state: &mut State, limit: u64, keep: Option<&str>, doomed: &mut Vec<PathBuf>) -> bool {
        while state.used() > limit {
            let victim = state
                .entries
                .iter()
                .filter(|(k, e)| e.pins == 0 && Some(k.as_str()) != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return false;
            };
            if let Some(e) = state.entries.remove(&victim) {
                tracing::info!(uri = %e.meta.uri, bytes = e.meta.bytes(), "evicting adapter cache entry");
            }
            doomed.push(retire_dir(&self.inner.root, &self.inner.root.join(&victim)));
            state.evictions += 1;
        }
        true
    }

    fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        flights.entry(key.to_string()).or_default().clone()
    }

    fn end_flight(&self, key: &str, flight: Arc<tokio::sync::Mutex<()>>) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and ours. Nobody else is waiting on this key.
        if Arc::strong_count(&flight) == 2 {
            flights.remove(key);
        }
    }

    /// Pins and returns an existing, intact entry. A damaged one is dropped (and fetched again).
    async fn hit(&self, key: &str) -> Option<CacheEntry> {
        let dir = self.inner.root.join(key);
        // The lock is released before anything is awaited.
        let found = {
            let mut state = self.inner.state();
            let now = state.tick();
            let entry = state.entries.get_mut(key)?;
            if file_sizes(&dir).ok().as_ref() == Some(&entry.meta.files) {
                entry.last_used = now;
                entry.pins += 1;
                let found = (entry.meta.clone(), entry.generation);
                state.hits += 1;
                Ok(found)
            } else {
                tracing::warn!(uri = %entry.meta.uri, "adapter cache entry was damaged on disk; fetching it again");
                state.entries.remove(key);
                Err(retire_dir(&self.inner.root, &dir))
            }
        };
        let (meta, generation) = match found {
            Ok(found) => found,
            Err(doomed) => {
                let _ = tokio::task::spawn_blocking(move || delete_dirs(vec![doomed])).await;
                return None;
            }
        };
        // Recency survives restarts through the metadata file's mtime (best effort).
        if let Ok(f) = std::fs::File::options().append(true).open(dir.join(META_FILE)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(CacheEntry { dir, meta, pin: CachePin { inner: self.inner.clone(), key: key.to_string(), generation } })
    }

    /// Returns the entry for `uri`, fetching it on a miss. On a miss, `fetch` gets an empty
    /// temp directory and the bytes it may write (the budget minus what other loaded adapters
    /// pin), and returns the resolved revision; `check` then inspects the fetched files (and
    /// may refuse them) before they become an entry. Concurrent calls for one URI fetch once.
    /// Returns the pinned entry and, when this call fetched it, what `check` returned.
    pub async fn get_or_fetch<T, F, Fut, C>(
        &self,
        uri: &AdapterUri,
        fetch: F,
        check: C,
    ) -> Result<(CacheEntry, Option<T>), AdapterError>
    where
        T: Send + 'static,
        F: FnOnce(PathBuf, u64) -> Fut,
        Fut: Future<Output = Result<Option<String>, AdapterError>>,
        C: FnOnce(&Path, &EntryMeta) -> Result<T, AdapterError> + Send + 'static,
    {
        let key = key(uri);
        let flight = self.flight(&key);
        let result = {
            let _turn = flight.lock().await;
            match self.hit(&key).await {
                Some(entry) => Ok((entry, None)),
                None => self.fetch_entry(uri, &key, fetch, check).await.map(|(e, t)| (e, Some(t))),
            }
        };
        self.end_flight(&key, flight);
        result
    }

    async fn fetch_entry<T, F, Fut, C>(
        &self,
        uri: &AdapterUri,
        key: &str,
        fetch: F,
        check: C,
    ) -> Result<(CacheEntry, T), AdapterError>
    where
        T: Send + 'static,
        F: FnOnce(PathBuf, u64) -> Fut,
        Fut: Future<Output = Result<Option<String>, AdapterError>>,
        C: FnOnce(&Path, &EntryMeta) -> Result<T, AdapterError> + Send + 'static,
    {
        let root = &self.inner.root;
        // Dropped (and deleted) on every early return: a failed fetch leaves nothing.
        let tmp =
            tempfile::Builder::new().prefix(&format!("{TMP_PREFIX}{key}-")).tempdir_in(root).map_err(io_err(root))?;
        let room = {
            let mut state = self.inner.state();
            state.fetches += 1;
            self.inner.budget.saturating_sub(state.pinned_except(key))
        };
        let revision = fetch(tmp.path().to_path_buf(), room).await?;

        let dir = tmp.path().to_path_buf();
        let uri_text = uri.uri.clone();
        let (meta, checked) = tokio::task::spawn_blocking(move || -> Result<(EntryMeta, T), AdapterError> {
            let files = file_sizes(&dir).map_err(io_err(&dir))?;
            let weights = dir.join(WEIGHTS_FILE);
            let sha256 = sha256_file(&weights).map_err(io_err(&weights))?;
            let meta = EntryMeta { uri: uri_text, revision, sha256, files };
            let checked = check(&dir, &meta)?;
            let meta_path = dir.join(META_FILE);
            let text = serde_json::to_string_pretty(&meta)
                .map_err(|e| AdapterError::Io { path: meta_path.clone(), source: std::io::Error::other(e) })?;
            std::fs::write(&meta_path, text).map_err(io_err(&meta_path))?;
            Ok((meta, checked))
        })
        .await
        .map_err(|e| AdapterError::Unavailable { uri: uri.uri.clone(), reason: format!("cache task failed: {e}") })??;

        let bytes = meta.bytes();
        let mut doomed = Vec::new();
        let result = self.insert_entry(uri, key, tmp, meta, &mut doomed);
        if !doomed.is_empty() {
            // Deleting evicted entries can take a while and nothing needs to wait for it; a
            // refused fetch, though, has left nothing behind once it returns.
            let deleting = tokio::task::spawn_blocking(move || delete_dirs(doomed));
            if result.is_err() {
                let _ = deleting.await;
            }
        }
        let entry = result?;
        tracing::info!(uri = %uri, bytes, "adapter cached");
        Ok((entry, checked))
    }

    /// Makes room for a fetched and checked entry, then renames it into place, pinned.
    fn insert_entry(
        &self,
        uri: &AdapterUri,
        key: &str,
        tmp: tempfile::TempDir,
        meta: EntryMeta,
        doomed: &mut Vec<PathBuf>,
    ) -> Result<CacheEntry, AdapterError> {
        let root = &self.inner.root;
        let bytes = meta.bytes();
        let budget = self.inner.budget;
        let mut state = self.inner.state();
        let pinned = state.pinned_except(key);
        // Evict nothing unless evicting makes enough room.
        if pinned.saturating_add(bytes) > budget
            || !self.evict_until(&mut state, budget.saturating_sub(bytes), Some(key), doomed)
        {
            doomed.push(tmp.keep());
            return Err(AdapterError::CacheFull { uri: uri.uri.clone(), needed: bytes, budget, pinned });
        }
        let final_dir = root.join(key);
        // Not expected (misses are single-flight), but a stray directory must not block us.
        if final_dir.exists() {
            state.entries.remove(key);
            doomed.push(retire_dir(root, &final_dir));
        }
        let tmp_path = tmp.keep();
        if let Err(e) = std::fs::rename(&tmp_path, &final_dir) {
            doomed.push(tmp_path);
            return Err(AdapterError::Io { path: final_dir, source: e });
        }
        let last_used = state.tick();
        let generation = last_used;
        state.entries.insert(key.to_string(), Entry { meta: meta.clone(), last_used, pins: 1, generation });
        let pin = CachePin { inner: self.inner.clone(), key: key.to_string(), generation };
        Ok(CacheEntry { dir: final_dir, meta, pin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> AdapterUri {
        AdapterUri::parse(s).expect("valid uri")
    }

    async fn put(cache: &AdapterCache, u: &str, bytes: usize) -> Result<(CacheEntry, Option<()>), AdapterError> {
        cache
            .get_or_fetch(
                &uri(u),
                |dir, _room| async move {
                    std::fs::write(dir.join("adapter_config.json"), b"{}").expect("write");
                    std::fs::write(dir.join(WEIGHTS_FILE), vec![7u8; bytes]).expect("write");
                    Ok(None)
                },
                |_, _| Ok(()),
            )
            .await
    }

    #[tokio::test]
    async fn entries_are_evicted_least_recently_used_first_and_pins_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AdapterCache::open(dir.path(), 250).expect("opens");
        let a = put(&cache, "s3://b/a", 100).await.expect("a");
        let b = put(&cache, "s3://b/b", 100).await.expect("b");
        drop(b);
        // Room for c means evicting b (unpinned); a is pinned.
        let c = put(&cache, "s3://b/c", 100).await.expect("c");
        assert_eq!(cache.stats().evictions, 1);
        assert!(a.0.dir.exists() && c.0.dir.exists());
        assert!(!dir.path().join(key(&uri("s3://b/b"))).exists());
        // Everything left is pinned: a fourth cannot fit and leaves nothing behind.
        let err = put(&cache, "s3://b/d", 100).await.expect_err("full");
        assert!(matches!(err, AdapterError::CacheFull { needed: 102, budget: 250, pinned: 204, .. }), "{err}");
        // Evicted entries are renamed away at once and deleted in the background.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".tmp-evicted-"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        drop(a);
        put(&cache, "s3://b/d", 100).await.expect("a was unpinned and evicted");
    }

    #[tokio::test]
    async fn a_fetch_that_cannot_fit_evicts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AdapterCache::open(dir.path(), 250).expect("opens");
        let _a = put(&cache, "s3://b/a", 100).await.expect("a");
        drop(put(&cache, "s3://b/b", 100).await.expect("b"));
        // 102 pinned + 202 needed > 250: evicting b would not help, so b stays.
        let err = put(&cache, "s3://b/c", 200).await.expect_err("cannot fit");
        assert!(matches!(err, AdapterError::CacheFull { needed: 202, .. }), "{err}");
        assert_eq!((cache.stats().entries, cache.stats().evictions), (2, 0));
    }

    #[tokio::test]
    async fn entries_survive_a_restart_and_interrupted_fetches_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let cache = AdapterCache::open(dir.path(), 1 << 20).expect("opens");
            put(&cache, "s3://b/a", 10).await.expect("a");
        }
        std::fs::create_dir(dir.path().join(".tmp-s3-deadbeef-x")).expect("leftover");
        let damaged = dir.path().join("s3-0000");
        std::fs::create_dir(&damaged).expect("damaged");
        let cache = AdapterCache::open(dir.path(), 1 << 20).expect("reopens");
        assert_eq!(cache.stats().entries, 1);
        assert!(!dir.path().join(".tmp-s3-deadbeef-x").exists() && !damaged.exists());
        let (_, fetched) = put(&cache, "s3://b/a", 10).await.expect("hit");
        assert!(fetched.is_none());
        assert_eq!((cache.stats().hits, cache.stats().fetches), (1, 0));
    }

    #[tokio::test]
    async fn a_failed_check_caches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AdapterCache::open(dir.path(), 1 << 20).expect("opens");
        let err = cache
            .get_or_fetch::<(), _, _, _>(
                &uri("s3://b/a"),
                |d, _| async move {
                    std::fs::write(d.join(WEIGHTS_FILE), b"x").expect("write");
                    Ok(None)
                },
                |p, _| Err(AdapterError::invalid(p, "refused")),
            )
            .await
            .expect_err("refused");
        assert!(matches!(err, AdapterError::Invalid { .. }));
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        assert_eq!(cache.stats().entries, 0);
    }
}
