//! Adapter load latency: cold (fetched from a local S3-compatible server into an empty cache,
//! then validated) and warm (found in the disk cache, then validated), for a rank-16 adapter on
//! all seven projections of a 7B-shaped Llama (32 layers, hidden 4096, intermediate 11008;
//! synthetic bf16 weights, 80 MB).
//!
//! `cargo bench -p switchyard-backend --bench adapter_load` starts `s3s-fs` itself (from
//! `$SWITCHYARD_S3S_FS` or `scripts/install-test-servers`). Cold and warm loads are
//! interleaved over `BENCH_ROUNDS` rounds (default 5) and medians are reported. For where the
//! time goes, a cold load that skips validation (download, hash, rename) is measured too; the
//! warm load is essentially validation (mapping the cached weights, checking them and
//! converting them to f32), then preparing them for the CPU executor, which is what a load
//! does off the engine thread before the engine swaps the adapter into a slot.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use half::bf16;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, tensor::TensorView};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;
use switchyard_backend::adapters::{AdapterStore, S3Source, S3SourceOptions, SourceRegistry, StoreOptions, load_peft};
use switchyard_backend::engine::cpu::CpuPreparer;
use switchyard_backend::engine::executor::AdapterPreparer;
use switchyard_backend::model::synthetic::preset_config;
use switchyard_backend::model::{ModelConfig, Module};

const RANK: usize = 16;
const KEY: &str = "switchyard-bench";
const SECRET: &str = "switchyard-bench-secret";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes a PEFT adapter of `rank` on every projection of every layer (bf16).
fn write_adapter(config: &ModelConfig, dir: &Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..config.num_layers {
        for m in Module::ALL {
            let (i, o) = config.module_shape(m);
            let prefix = format!("base_model.model.model.layers.{layer}.{}.{}", m.block(), m.name());
            for (which, shape) in [("lora_A", vec![RANK, i]), ("lora_B", vec![o, RANK])] {
                let n: usize = shape.iter().product();
                let bytes = (0..n).flat_map(|_| bf16::from_f32(rng.random_range(-0.02..0.02)).to_le_bytes()).collect();
                tensors.push((format!("{prefix}.{which}.weight"), shape, bytes));
            }
        }
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), TensorView::new(Dtype::BF16, shape.clone(), bytes).unwrap()))
        .collect();
    let weights = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
    let cfg = serde_json::json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "base_model_name_or_path": "synthetic:llama-7b",
    });
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    weights.len() as u64
}

fn s3s_fs() -> PathBuf {
    std::env::var_os("SWITCHYARD_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/bin/s3s-fs"))
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let config = preset_config("llama-7b").expect("preset");
    let root = tempfile::tempdir().unwrap();
    let bytes = write_adapter(&config, &root.path().join("bench/llama7b-r16"));

    let bin = s3s_fs();
    assert!(bin.is_file(), "{} not found: run scripts/install-test-servers or set SWITCHYARD_S3S_FS", bin.display());
    let mut server = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", "0", "--access-key", KEY, "--secret-key", SECRET])
        .arg(root.path())
        .env("RUST_LOG", "info") // it reports its address at info level
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let endpoint = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "s3s-fs exited");
        if let Some(at) = line.find("server is running at ") {
            break line[at + 21..].trim().to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // SAFETY: no other thread reads or writes the environment: the runtime is not built yet and
    // the only other thread drains s3s-fs's output.
    unsafe {
        for (k, v) in [
            ("AWS_ENDPOINT_URL_S3", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            std::env::set_var(k, v);
        }
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let source = Arc::new(S3Source::new(S3SourceOptions::default()));
    let store = |cache: &Path| {
        let mut sources = SourceRegistry::new();
        sources.register("s3", source.clone());
        let opts = StoreOptions { cache_dir: cache.to_path_buf(), cache_bytes: 1 << 40, max_adapter_bytes: 1 << 40 };
        AdapterStore::new(sources, &opts).unwrap()
    };
    let uri = "s3://bench/llama7b-r16";
    let preparer = CpuPreparer { max_rank: RANK, bf16_decode: false };
    let load = |store: &AdapterStore| {
        let config = config.clone();
        let start = Instant::now();
        let loaded = runtime
            .block_on(store.load(uri, None, None, move |files| load_peft(files, &config, RANK)))
            .expect("adapter loads");
        let prepared = preparer.prepare(loaded.value).expect("prepared");
        assert_eq!(prepared.max_rank, RANK);
        (start.elapsed().as_secs_f64() * 1e3, loaded.fetched)
    };

    let warm_cache = tempfile::tempdir().unwrap();
    let warm_store = store(warm_cache.path());
    load(&warm_store); // fills the cache (and warms the S3 client)
    let (mut cold, mut warm, mut fetch_only) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let cache = tempfile::tempdir().unwrap();
        let start = Instant::now();
        runtime.block_on(store(cache.path()).load(uri, None, None, |_| Ok(()))).expect("fetches");
        fetch_only.push(start.elapsed().as_secs_f64() * 1e3);
        let cache = tempfile::tempdir().unwrap();
        let (ms, fetched) = load(&store(cache.path()));
        assert!(fetched);
        cold.push(ms);
        let (ms, fetched) = load(&warm_store);
        assert!(!fetched);
        warm.push(ms);
    }
    let _ = server.kill();
    let _ = server.wait();

    let mb = bytes as f64 / 1e6;
    println!("adapter: rank {RANK}, 7 projections x {} layers, bf16, {mb:.1} MB", config.num_layers);
    println!("{:<42} {:>10} {:>10}", "load (median of rounds)", "ms", "MB/s");
    for (name, v) in [
        ("cold: S3 -> cache -> validate -> prepared", median(cold)),
        ("cold, without validating", median(fetch_only)),
        ("warm: cache -> validate -> prepared", median(warm)),
    ] {
        println!("{name:<42} {v:>10.1} {:>10.0}", mb / (v / 1e3));
    }
}
