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
//!   An entry is pinned while an adapter loaded from it is loaded ([`CachePin`]), resident or
//!   evicted from its slot. Fetches in progress count too: each reserves the bytes it is about
//!   to write ([`Room`]) before writing them, idle entries are evicted to make that room, and a
//!   fetch that cannot have it stops, so concurrent fetches never fill more than the budget.
//! - **Integrity**: each entry records its files' sizes and the SHA-256 of its weights; a
//!   damaged entry is dropped and fetched again, and a requested digest is checked before use.
//!   An entry whose weights differ from a requested digest (the object was replaced at its
//!   source) is fetched again, and replaced only if the new files pass their checks.
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
    /// Bytes fetches in progress have reserved.
    pub reserved_bytes: u64,
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
    /// Bytes reserved by fetches in progress ([`Room`]), not yet entries.
    reserved: u64,
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
            doomed.push(retire_dir(&self.root, &self.root.join(&victim)));
            state.evictions += 1;
        }
        true
    }

    /// Reserves `more` bytes for the fetch of `key`, which then holds `total`: refused when the
    /// entries loaded adapters pin and the other fetches' reservations leave too little;
    /// otherwise idle entries are evicted until the reservations fit beside what is cached.
    fn reserve(&self, key: &str, uri: &str, more: u64, total: u64) -> Result<(), AdapterError> {
        let mut doomed = Vec::new();
        {
            let mut state = self.state();
            let (pinned, others) = (state.pinned_except(key), state.reserved.saturating_sub(total - more));
            if pinned.saturating_add(others).saturating_add(total) > self.budget {
                return Err(AdapterError::CacheFull {
                    uri: uri.to_string(),
                    needed: total,
                    budget: self.budget,
                    pinned,
                    reserved: others,
                });
            }
            state.reserved += more;
            let limit = self.budget - state.reserved;
            // An entry under this key (being replaced) may keep the disk above the budget until
            // the new one takes its place; every other idle entry can go.
            self.evict_until(&mut state, limit, Some(key), &mut doomed);
        }
        if !doomed.is_empty() {
            // Nothing needs to wait for the deletion.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(move || delete_dirs(doomed))),
                Err(_) => delete_dirs(doomed),
            }
        }
        Ok(())
    }
}

/// The disk space one fetch may fill: at most the backend's `--max-adapter-bytes`, and for a
/// cached source no more than the cache's budget leaves once the entries loaded adapters pin
/// and the other fetches' reservations are counted. A source reserves what its listing
/// announces before downloading, and the running total of what it has written as it writes;
/// a reservation that does not fit fails, naming the limit.
pub struct Room {
    uri: String,
    max: u64,
    /// The cache the bytes are counted in, and the entry's key; `None` for in-place sources.
    cache: Option<(Arc<Inner>, String)>,
    /// Bytes reserved so far.
    held: Mutex<u64>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("uri", &self.uri).field("max", &self.max).field("held", &self.held()).finish()
    }
}

impl Room {
    /// Room bounded only by `max` bytes, for a source that reads adapters in place.
    pub fn unbounded(uri: &str, max: u64) -> Room {
        Room { uri: uri.to_string(), max, cache: None, held: Mutex::new(0) }
    }

    /// The most bytes one adapter may have (`--max-adapter-bytes`).
    pub fn max_bytes(&self) -> u64 {
        self.max
    }

    fn held(&self) -> u64 {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure this fetch may have written `total` bytes in all: a no-op when it already
    /// holds that much. Fails with [`AdapterError::TooLarge`] past `--max-adapter-bytes`, and
    /// with [`AdapterError::CacheFull`] when the cache cannot make the room.
    pub fn reserve(&self, total: u64) -> Result<(), AdapterError> {
        if total > self.max {
            return Err(AdapterError::TooLarge { uri: self.uri.clone(), bytes: total, max: self.max });
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if total <= *held {
            return Ok(());
        }
        if let Some((inner, key)) = &self.cache {
            inner.reserve(key, &self.uri, total - *held, total)?;
        }
        *held = total;
        Ok(())
    }

    /// Hands the reservation over (to the entry the fetched files become): returns what was
    /// held, which the caller takes off the cache's books.
    fn release(&self) -> u64 {
        std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        let held = self.release();
        if let Some((inner, _)) = &self.cache
            && held > 0
        {
            let mut state = inner.state();
            state.reserved = state.reserved.saturating_sub(held);
        }
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
            cache.inner.evict_until(&mut state, budget, None, &mut doomed);
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
            reserved_bytes: s.reserved,
        }
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

    /// Pins and returns an existing, intact entry whose weights have the `wanted` SHA-256 (when
    /// given). A damaged one is dropped (and fetched again); one with other weights is left
    /// until a fetch replaces it.
    async fn hit(&self, key: &str, wanted: Option<&str>) -> Option<CacheEntry> {
        let dir = self.inner.root.join(key);
        // The lock is released before anything is awaited.
        let found = {
            let mut state = self.inner.state();
            let now = state.tick();
            let entry = state.entries.get_mut(key)?;
            if let Some(wanted) = wanted
                && entry.meta.sha256 != wanted
            {
                tracing::info!(uri = %entry.meta.uri, cached = %entry.meta.sha256, wanted, "the cached adapter has other weights than the pin asks for; fetching it again");
                return None;
            }
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

    /// Returns the entry for `uri` whose weights have the `wanted` SHA-256 (any, when `None`),
    /// fetching it on a miss. On a miss, `fetch` gets an empty temp directory and the [`Room`]
    /// it may fill (at most `max_bytes`, within the cache's budget), and returns the resolved
    /// revision; `check` then inspects the fetched files (and may refuse them) before they
    /// become an entry. Concurrent calls for one URI fetch once. Returns the pinned entry and,
    /// when this call fetched it, what `check` returned.
    pub async fn get_or_fetch<T, F, Fut, C>(
        &self,
        uri: &AdapterUri,
        wanted: Option<&str>,
        max_bytes: u64,
        fetch: F,
        check: C,
    ) -> Result<(CacheEntry, Option<T>), AdapterError>
    where
        T: Send + 'static,
        F: FnOnce(PathBuf, Arc<Room>) -> Fut,
        Fut: Future<Output = Result<Option<String>, AdapterError>>,
        C: FnOnce(&Path, &EntryMeta) -> Result<T, AdapterError> + Send + 'static,
    {
        let key = key(uri);
        let flight = self.flight(&key);
        let result = {
            let _turn = flight.lock().await;
            match self.hit(&key, wanted).await {
                Some(entry) => Ok((entry, None)),
                None => self.fetch_entry(uri, &key, max_bytes, fetch, check).await.map(|(e, t)| (e, Some(t))),
            }
        };
        self.end_flight(&key, flight);
        result
    }

    async fn fetch_entry<T, F, Fut, C>(
        &self,
        uri: &AdapterUri,
        key: &str,
        max_bytes: u64,
        fetch: F,
        check: C,
    ) -> Result<(CacheEntry, T), AdapterError>
    where
        T: Send + 'static,
        F: FnOnce(PathBuf, Arc<Room>) -> Fut,
        Fut: Future<Output = Result<Option<String>, AdapterError>>,
        C: FnOnce(&Path, &EntryMeta) -> Result<T, AdapterError> + Send + 'static,
    {
        let root = &self.inner.root;
        // Dropped (and deleted) on every early return: a failed fetch leaves nothing.
        let tmp =
            tempfile::Builder::new().prefix(&format!("{TMP_PREFIX}{key}-")).tempdir_in(root).map_err(io_err(root))?;
        self.inner.state().fetches += 1;
        // Its reservation is given back when it drops, whatever happens to the fetch.
        let room = Arc::new(Room {
            uri: uri.uri.clone(),
            max: max_bytes,
            cache: Some((self.inner.clone(), key.to_string())),
            held: Mutex::new(0),
        });
        let revision = fetch(tmp.path().to_path_buf(), room.clone()).await?;

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
        let result = self.insert_entry(uri, key, tmp, meta, &room, &mut doomed);
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

    /// Makes room for a fetched and checked entry (its bytes were reserved in `room`; the
    /// reservation becomes the entry), then renames it into place, pinned, replacing an entry
    /// of the same key with other weights.
    fn insert_entry(
        &self,
        uri: &AdapterUri,
        key: &str,
        tmp: tempfile::TempDir,
        meta: EntryMeta,
        room: &Room,
        doomed: &mut Vec<PathBuf>,
    ) -> Result<CacheEntry, AdapterError> {
        let root = &self.inner.root;
        let bytes = meta.bytes();
        let budget = self.inner.budget;
        let held = room.release();
        let mut state = self.inner.state();
        state.reserved = state.reserved.saturating_sub(held);
        // The entry being replaced, if any, makes no room for its successor until it is gone.
        let replaced = state.entries.remove(key);
        let (pinned, reserved) = (state.pinned_except(key), state.reserved);
        // Evict nothing unless evicting makes enough room. (Pins taken on other entries since
        // the fetch reserved its bytes can leave too little.)
        if pinned.saturating_add(reserved).saturating_add(bytes) > budget {
            if let Some(old) = replaced {
                state.entries.insert(key.to_string(), old);
            }
            doomed.push(tmp.keep());
            return Err(AdapterError::CacheFull { uri: uri.uri.clone(), needed: bytes, budget, pinned, reserved });
        }
        self.inner.evict_until(&mut state, budget - reserved - bytes, None, doomed);
        let final_dir = root.join(key);
        // The replaced entry's files (or a stray directory, which must not block us).
        if final_dir.exists() {
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
                None,
                u64::MAX,
                |dir, room| async move {
                    room.reserve(bytes as u64 + 2)?;
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

    /// A room for `u` in `cache`, as a fetch gets one, outside any fetch.
    fn room(cache: &AdapterCache, u: &str) -> Room {
        Room {
            uri: u.to_string(),
            max: u64::MAX,
            cache: Some((cache.inner.clone(), key(&uri(u)))),
            held: Mutex::new(0),
        }
    }

    #[tokio::test]
    async fn fetches_in_progress_share_the_budget_and_make_room_by_evicting_idle_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AdapterCache::open(dir.path(), 250).expect("opens");
        drop(put(&cache, "s3://b/idle", 100).await.expect("idle"));
        let (a, b) = (room(&cache, "s3://b/a"), room(&cache, "s3://b/b"));
        // 180 reserved: the idle entry (102 bytes) must go to keep the disk within 250.
        a.reserve(180).expect("a fits");
        assert_eq!((cache.stats().entries, cache.stats().reserved_bytes), (0, 180));
        // b cannot have 150 of the 70 left, whatever is evicted.
        let err = b.reserve(150).expect_err("both do not fit");
        assert!(
            matches!(err, AdapterError::CacheFull { needed: 150, budget: 250, pinned: 0, reserved: 180, .. }),
            "{err}"
        );
        b.reserve(70).expect("what is left fits");
        // Reserving a running total already held costs nothing; growing it past the room fails.
        b.reserve(50).expect("already held");
        assert!(b.reserve(71).is_err());
        // A fetch that ends gives its room back.
        drop(a);
        assert_eq!(cache.stats().reserved_bytes, 70);
        b.reserve(250).expect("all of it, now");
        let mut small = room(&cache, "s3://b/c");
        small.max = 10;
        assert!(matches!(small.reserve(11), Err(AdapterError::TooLarge { bytes: 11, max: 10, .. })));
    }

    #[tokio::test]
    async fn an_entry_with_other_weights_than_asked_for_is_replaced_only_by_a_fetch_that_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AdapterCache::open(dir.path(), 1 << 20).expect("opens");
        let get = async |weights: &'static [u8], wanted: Option<String>, accept: bool| {
            cache
                .get_or_fetch(
                    &uri("s3://b/a"),
                    wanted.as_deref(),
                    u64::MAX,
                    |d, room| async move {
                        room.reserve(weights.len() as u64)?;
                        std::fs::write(d.join(WEIGHTS_FILE), weights).expect("write");
                        Ok(None)
                    },
                    move |p, _| if accept { Ok(()) } else { Err(AdapterError::invalid(p, "refused")) },
                )
                .await
                .map(|(entry, fetched)| (entry.meta.sha256, fetched.is_some()))
        };
        let (v1, fetched) = get(b"v1", None, true).await.expect("v1");
        assert!(fetched);
        let v2 = Sha256::digest(b"v2").iter().map(|b| format!("{b:02x}")).collect::<String>();
        // The same pin is a hit; another one fetches again, and a refused fetch keeps v1.
        assert_eq!(get(b"v2", Some(v1.clone()), true).await.expect("hit"), (v1.clone(), false));
        assert!(get(b"v2", Some(v2.clone()), false).await.is_err());
        assert_eq!(get(b"xx", None, true).await.expect("v1 kept"), (v1.clone(), false));
        assert_eq!(get(b"v2", Some(v2.clone()), true).await.expect("v2 replaces v1"), (v2.clone(), true));
        assert_eq!(get(b"xx", None, true).await.expect("v2 cached"), (v2, false));
        assert_eq!(cache.stats().entries, 1);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".tmp-evicted-"))
            .collect();
        assert_eq!(names, vec![key(&uri("s3://b/a"))]);
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
                None,
                u64::MAX,
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
