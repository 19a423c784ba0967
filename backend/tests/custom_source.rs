//! Adding an adapter source for a new URI scheme: implement `AdapterSource`, register it, and
//! the store gives it the cache, single-flight fetching, limits and validation for free.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use common::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use switchyard_backend::adapters::{
    AdapterError, AdapterSource, AdapterStore, AdapterUri, Fetched, Room, SourceRegistry, StoreOptions, load_peft,
    load_peft_dir,
};
use switchyard_backend::model::ModelConfig;

/// `vault://<name>`: adapters kept by some in-house service — here, fixture files in memory,
/// handed out slowly so that concurrent loads overlap.
#[derive(Debug, Default)]
struct Vault {
    adapters: HashMap<String, Vec<(String, Vec<u8>)>>,
    fetches: AtomicUsize,
}

#[async_trait::async_trait]
impl AdapterSource for Vault {
    fn check(&self, uri: &AdapterUri) -> Result<(), AdapterError> {
        if uri.location.contains('/') {
            return Err(AdapterError::BadUri { uri: uri.uri.clone(), reason: "expected vault://<name>".into() });
        }
        Ok(())
    }

    async fn fetch(&self, uri: &AdapterUri, dest: &Path, room: &Room) -> Result<Fetched, AdapterError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let files = self.adapters.get(&uri.location).ok_or_else(|| AdapterError::SourceNotFound {
            uri: uri.uri.clone(),
            reason: "no such adapter in the vault".into(),
        })?;
        // Reserve the bytes in the cache before writing them; what does not fit is refused.
        room.reserve(files.iter().map(|(_, b)| b.len() as u64).sum())?;
        for (name, data) in files {
            std::fs::write(dest.join(name), data)
                .map_err(|source| AdapterError::Io { path: dest.join(name), source })?;
        }
        Ok(Fetched { dir: dest.to_path_buf(), revision: None, files: None })
    }
}

fn vault() -> Vault {
    let dir = adapter_dir("tiny-llama", "r8-qv");
    let files = ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).expect("fixture")))
        .collect();
    Vault { adapters: HashMap::from([("support".to_string(), files)]), fetches: AtomicUsize::new(0) }
}

#[tokio::test]
async fn a_registered_scheme_loads_through_the_cache_once_per_uri() {
    let vault = Arc::new(vault());
    let mut sources = SourceRegistry::new();
    sources.register("vault", vault.clone());
    let cache = tempfile::tempdir().expect("cache");
    let opts = StoreOptions { cache_dir: cache.path().to_path_buf(), cache_bytes: 1 << 30, max_adapter_bytes: 1 << 30 };
    let store = Arc::new(AdapterStore::new(sources, &opts).expect("store"));
    let config = ModelConfig::from_dir(&model_dir("tiny-llama")).expect("fixture config");

    let loads = (0..6).map(|_| {
        let (store, config) = (store.clone(), config.clone());
        tokio::spawn(async move { store.load("vault://support", None, None, move |f| load_peft(f, &config, 64)).await })
    });
    let results = futures::future::join_all(loads).await;
    let loaded: Vec<_> = results.into_iter().map(|r| r.expect("task").expect("loads")).collect();
    assert_eq!(vault.fetches.load(Ordering::SeqCst), 1, "one fetch for six concurrent loads");
    assert_eq!(loaded.iter().filter(|l| l.fetched).count(), 1);
    let stats = store.cache_stats();
    assert_eq!((stats.fetches, stats.hits, stats.entries), (1, 5, 1));
    let expected = load_peft_dir(&adapter_dir("tiny-llama", "r8-qv"), &config, 64).expect("fixture");
    assert_eq!(loaded[3].value.layers, expected.layers, "the weights are the fixture's");

    // The source's own errors and checks come through unchanged.
    let err = store.load("vault://missing", None, None, |_| Ok(())).await.expect_err("missing");
    assert!(matches!(err, AdapterError::SourceNotFound { .. }), "{err}");
    let err = store.load("vault://a/b", None, None, |_| Ok(())).await.expect_err("bad syntax");
    assert!(matches!(err, AdapterError::BadUri { .. }), "{err}");
}
