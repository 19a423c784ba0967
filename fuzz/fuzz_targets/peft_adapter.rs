//! A PEFT adapter as a load reads it: `adapter_config.json` and `adapter_model.safetensors`,
//! validated against the tiny-llama test model. The input is the config's length (two bytes,
//! little-endian), the config, then the weights.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use switchyard_backend::adapters::{AdapterFiles, load_peft};
use switchyard_backend::model::ModelConfig;

static MODEL: LazyLock<ModelConfig> = LazyLock::new(|| {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-llama");
    ModelConfig::from_dir(&dir).expect("the tiny-llama fixture")
});

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else { return };
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (config, weights) = rest.split_at(len);
    let files = AdapterFiles {
        dir: "fuzz".into(),
        config: Some(config.to_vec()),
        weights: Some(weights.to_vec().into()),
        pickle_only: false,
        resolved: Vec::new(),
    };
    let _ = load_peft(&files, &MODEL, 64);
});
