//! Bad models and bad adapters are refused with an error that names the problem, before any
//! weight reaches an executor.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use common::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::path::Path;
use switchyard_backend::adapters::{
    AdapterError, AdapterStore, FileSource, Room, SourceRegistry, SourceScope, StoreOptions, load_peft_dir,
};
use switchyard_backend::model::{Model, ModelConfig, ModelError};

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn read_tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).expect("readable");
    let st = SafeTensors::deserialize(&bytes).expect("valid");
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, v.shape().to_vec(), data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(path: &Path, tensors: &Tensors) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("written");
}

/// A copy of the r8-qv adapter whose tensors `edit` may change.
fn edited_adapter(edit: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let src = adapter_dir("tiny-llama", "r8-qv");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(src.join("adapter_config.json"), dir.path().join("adapter_config.json")).expect("copy config");
    let mut tensors = read_tensors(&src.join("adapter_model.safetensors"));
    edit(&mut tensors);
    write_tensors(&dir.path().join("adapter_model.safetensors"), &tensors);
    dir
}

fn llama_config() -> ModelConfig {
    ModelConfig::from_dir(&model_dir("tiny-llama")).expect("fixture config")
}

fn invalid_reason(r: Result<impl std::fmt::Debug, AdapterError>) -> String {
    match r {
        Err(AdapterError::Invalid { reason, .. }) => reason,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn the_unmodified_fixture_loads() {
    let w = load_peft_dir(&adapter_dir("tiny-llama", "r8-qv"), &llama_config(), 64).expect("loads");
    assert_eq!(w.max_rank, 8);
    assert_eq!(w.targets.iter().map(|m| m.name()).collect::<Vec<_>>(), vec!["q_proj", "v_proj"]);
}

#[test]
fn rank_above_the_maximum_is_refused_naming_module_rank_and_limit() {
    let err = load_peft_dir(&adapter_dir("tiny-llama", "r32-mlp-regex"), &llama_config(), 16).expect_err("refused");
    let AdapterError::RankTooLarge { rank, max, ref module, .. } = err else { panic!("{err:?}") };
    assert_eq!((rank, max), (32, 16));
    assert!(module.contains("mlp"), "{module}");
    assert!(err.to_string().contains("--max-lora-rank 16"), "{err}");
}

#[test]
fn a_module_the_model_does_not_have_is_refused() {
    let dir = edited_adapter(|t| {
        for (name, _, _) in t.iter_mut().filter(|(n, _, _)| n.contains("layers.0.self_attn.q_proj")) {
            *name = name.replace("q_proj", "qkv_proj");
        }
    });
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("qkv_proj"), "{reason}");
}

#[test]
fn a_layer_beyond_the_model_is_refused() {
    let dir = edited_adapter(|t| {
        for (name, _, _) in t.iter_mut().filter(|(n, _, _)| n.contains("layers.2.")) {
            *name = name.replace("layers.2.", "layers.7.");
        }
    });
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("layer 7") && reason.contains("3 layers"), "{reason}");
}

#[test]
fn matrices_that_do_not_fit_the_base_projection_are_refused() {
    // v_proj outputs 32 values in this model; pretend the adapter was trained for 48.
    let dir = edited_adapter(|t| {
        let b = t.iter_mut().find(|(n, _, _)| n.ends_with("layers.1.self_attn.v_proj.lora_B.weight")).expect("present");
        b.1 = vec![48, 8];
        b.2 = vec![0.1; 48 * 8];
    });
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("layers.1.self_attn.v_proj") && reason.contains("[48, 8]"), "{reason}");
}

#[test]
fn a_missing_half_of_a_pair_is_refused() {
    let dir = edited_adapter(|t| t.retain(|(n, _, _)| !n.ends_with("layers.0.self_attn.q_proj.lora_B.weight")));
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("layers.0.self_attn.q_proj") && reason.contains("lora_B"), "{reason}");
}

#[test]
fn non_finite_weights_are_refused() {
    let dir = edited_adapter(|t| t[0].2[3] = f32::NAN);
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("NaN"), "{reason}");
}

#[test]
fn missing_config_pickle_weights_and_missing_directories_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("adapter_config.json"), "{reason}");

    std::fs::copy(
        adapter_dir("tiny-llama", "r8-qv").join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .expect("copy");
    std::fs::write(dir.path().join("adapter_model.bin"), b"\x80\x02pickle").expect("write");
    let reason = invalid_reason(load_peft_dir(dir.path(), &llama_config(), 64));
    assert!(reason.contains("pickle"), "{reason}");

    let gone = dir.path().join("nope");
    assert!(matches!(load_peft_dir(&gone, &llama_config(), 64), Err(AdapterError::NotFound { .. })));
}

/// A `file://` source allowing one root that holds a copy of a fixture adapter, and, outside
/// it, another copy reachable only through symlinks.
struct Roots {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
    sources: SourceRegistry,
}

fn roots() -> Roots {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().canonicalize().expect("resolves");
    let (root, outside) = (base.join("allowed"), base.join("elsewhere"));
    for d in [root.join("good"), outside.join("secret")] {
        std::fs::create_dir_all(&d).expect("mkdir");
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter_dir("tiny-llama", "r8-qv").join(f), d.join(f)).expect("copy");
        }
    }
    std::os::unix::fs::symlink(outside.join("secret"), root.join("dir-link")).expect("symlink");
    std::fs::create_dir(root.join("file-link")).expect("mkdir");
    std::fs::copy(root.join("good/adapter_config.json"), root.join("file-link/adapter_config.json")).expect("copy");
    std::os::unix::fs::symlink(
        outside.join("secret/adapter_model.safetensors"),
        root.join("file-link/adapter_model.safetensors"),
    )
    .expect("symlink");
    let mut sources = SourceRegistry::new();
    sources.register("file", std::sync::Arc::new(FileSource::new(vec![root.clone()]).expect("root exists")));
    Roots { _dir: dir, root, outside, sources }
}

async fn fetch_file(r: &Roots, path: &Path) -> Result<std::path::PathBuf, AdapterError> {
    let (uri, source) = r.sources.resolve(&format!("file://{}", path.display()))?;
    source.fetch(&uri, Path::new(""), &Room::unbounded(&uri.uri, u64::MAX)).await.map(|f| f.dir)
}

#[tokio::test]
async fn file_adapters_are_read_only_from_inside_the_allowed_roots() {
    let r = roots();
    assert_eq!(fetch_file(&r, &r.root.join("good")).await.expect("inside"), r.root.join("good"));
    let denied = |res: Result<_, AdapterError>, needle: &str| match res {
        Err(e @ AdapterError::AccessDenied { .. }) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected access denied mentioning {needle:?}, got {other:?}"),
    };
    denied(fetch_file(&r, &r.outside.join("secret")).await, "outside the allowed roots");
    // A symlinked directory, or a symlinked weights file, that leads outside.
    denied(fetch_file(&r, &r.root.join("dir-link")).await, "resolves to");
    denied(fetch_file(&r, &r.root.join("file-link")).await, "adapter_model.safetensors resolves to");
    // `..` is refused before any path is looked at, as are relative paths and unknown schemes.
    let traversal = format!("file://{}/../elsewhere/secret", r.root.display());
    for uri in [traversal.as_str(), "file://relative/dir", "no-scheme", "ftp://x/y"] {
        assert!(matches!(r.sources.resolve(uri), Err(AdapterError::BadUri { .. })), "{uri}");
    }
    // Missing inside the roots is "not found"; outside, the answer does not say.
    assert!(matches!(fetch_file(&r, &r.root.join("nope")).await, Err(AdapterError::NotFound { .. })));
    denied(fetch_file(&r, &r.outside.join("nope")).await, "outside the allowed roots");
    // No roots at all: file:// is off.
    let mut off = SourceRegistry::new();
    off.register("file", std::sync::Arc::new(FileSource::new(vec![]).expect("no roots")));
    let (uri, source) = off.resolve(&format!("file://{}", r.root.join("good").display())).expect("syntax ok");
    denied(
        source.fetch(&uri, Path::new(""), &Room::unbounded(&uri.uri, u64::MAX)).await.map(|f| f.dir),
        "no --adapter-roots",
    );
}

#[tokio::test]
async fn a_load_reads_the_files_it_checked_and_holds_its_scope_on_resolved_paths() {
    let r = roots();
    let cache = tempfile::tempdir().expect("cache");
    let options =
        StoreOptions { cache_dir: cache.path().to_path_buf(), cache_bytes: 1 << 30, max_adapter_bytes: 1 << 30 };
    let store = AdapterStore::new(r.sources.clone(), &options).expect("store");
    let good = r.root.join("good");
    let weights = good.join("adapter_model.safetensors");
    let original = std::fs::read(&weights).expect("fixture");
    let secret = r.outside.join("secret/adapter_model.safetensors");
    std::fs::copy(adapter_dir("tiny-llama", "r4-patterns").join("adapter_model.safetensors"), &secret).expect("copy");
    let uri = format!("file://{}", good.display());
    // Between the check and the validation, the weights become a symlink out of the roots: the
    // validation still sees the bytes that were checked.
    let (w, s) = (weights.clone(), secret.clone());
    let loaded = store
        .load(&uri, None, None, move |files| {
            std::fs::remove_file(&w).and_then(|()| std::os::unix::fs::symlink(&s, &w)).expect("swap");
            Ok(files.weights.clone())
        })
        .await
        .expect("the checked files load");
    assert_eq!(loaded.value.as_deref(), Some(&original[..]), "the swapped-in file was read");
    // The next load of the same path checks again, and refuses it.
    let again = store.load(&uri, None, None, |_| Ok(())).await;
    assert!(matches!(again, Err(AdapterError::AccessDenied { .. })), "{again:?}");

    // A scope is checked on where the files resolve to, not on the path that names them.
    std::fs::remove_file(&weights).expect("unswap");
    std::fs::write(&weights, &original).expect("restore");
    let scoped = |prefix: &Path| SourceScope::new(vec![format!("file://{}/", prefix.display())]);
    assert!(store.load(&uri, None, Some(&scoped(&r.root)), |_| Ok(())).await.is_ok());
    // Inside the backend's roots, but out of the load's scope through a symlink.
    let a = r.root.join("tenant-a");
    std::fs::create_dir(&a).expect("mkdir");
    std::os::unix::fs::symlink(&good, a.join("borrowed")).expect("symlink");
    let borrowed = format!("file://{}", a.join("borrowed").display());
    let e = store.load(&borrowed, None, Some(&scoped(&a)), |_| Ok(())).await.expect_err("refused");
    assert!(matches!(e, AdapterError::AccessDenied { .. }) && e.to_string().contains("resolves to"), "{e}");
    let e = store.load(&uri, None, Some(&scoped(&r.root.join("other"))), |_| Ok(())).await.expect_err("refused");
    assert!(e.to_string().contains("may only read from"), "{e}");
}

/// A copy of the tiny Llama whose tensors `edit` may change.
fn edited_model(edit: impl FnOnce(&mut Tensors)) -> tempfile::TempDir {
    let src = model_dir("tiny-llama");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
    {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let mut tensors = read_tensors(&src.join("model.safetensors"));
    edit(&mut tensors);
    write_tensors(&dir.path().join("model.safetensors"), &tensors);
    dir
}

#[test]
fn models_with_missing_or_mismatched_tensors_are_refused_by_name() {
    let dir = edited_model(|t| t.retain(|(n, _, _)| n != "model.layers.2.mlp.up_proj.weight"));
    match Model::load(dir.path()) {
        Err(ModelError::MissingTensor { name, .. }) => {
            assert_eq!(name, "model.layers.2.mlp.up_proj.weight")
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let dir = edited_model(|t| {
        let w = t.iter_mut().find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight").expect("present");
        w.1 = vec![64, 32];
    });
    let err = Model::load(dir.path()).expect_err("refused");
    assert!(
        matches!(err, ModelError::TensorShape { ref name, .. } if name == "model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("[32, 64]"), "{err}");
    let dir = edited_model(|t| t.push(("model.layers.0.self_attn.q_norm.weight".into(), vec![16], vec![1.0; 16])));
    let err = Model::load(dir.path()).expect_err("refused");
    assert!(err.to_string().contains("q_norm"), "{err}");
}

#[test]
fn an_unknown_architecture_is_refused_by_name() {
    let dir = edited_model(|_| {});
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).expect("read");
    std::fs::write(dir.path().join("config.json"), cfg.replace("LlamaForCausalLM", "FalconForCausalLM"))
        .expect("write");
    let err = Model::load(dir.path()).expect_err("refused");
    assert!(err.to_string().contains("FalconForCausalLM") && err.to_string().contains("config.json"), "{err}");
}
