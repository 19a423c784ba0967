//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), validated against
//! the base model before any weight is handed to an executor.

use super::files::AdapterFiles;
use super::{AdapterError, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::{ModelConfig, Module};
use safetensors::SafeTensors;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One projection's LoRA matrices with the scale PEFT would apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `[rank, in]`.
    pub a: Vec<f32>,
    /// `[out, rank]`.
    pub b: Vec<f32>,
    pub rank: usize,
    /// `alpha / rank`, or `alpha / √rank` with rsLoRA.
    pub scale: f32,
}

/// A validated adapter in host memory, ready to be placed in a slot.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    /// Per layer, per [`Module::index`]: the module's matrices when the adapter targets it.
    pub layers: Vec<[Option<LoraModule>; 7]>,
    /// Largest rank over all modules.
    pub max_rank: usize,
    /// Projections the adapter targets in at least one layer.
    pub targets: BTreeSet<Module>,
    /// `base_model_name_or_path` from the config, for reporting.
    pub base_model: Option<String>,
}

impl AdapterWeights {
    /// A digest of what the adapter computes with: every module's matrices, rank and scale.
    /// The same weights get the same digest on every backend and at every load; any change of
    /// a weight or a scale gives another. The prefix cache names adapted blocks by it.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("switchyard adapter weights v1");
        let mut bytes = Vec::with_capacity(64 * 1024);
        for (layer, modules) in self.layers.iter().enumerate() {
            for (index, m) in modules.iter().enumerate() {
                let Some(m) = m else { continue };
                for n in [layer, index, m.rank, m.a.len(), m.b.len()] {
                    h.update(&(n as u64).to_le_bytes());
                }
                h.update(&m.scale.to_le_bytes());
                for chunk in m.a.chunks(16 * 1024).chain(m.b.chunks(16 * 1024)) {
                    bytes.clear();
                    bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                    h.update(&bytes);
                }
            }
        }
        *h.finalize().as_bytes()
    }

    /// Bytes of f32 weights.
    pub fn size_bytes(&self) -> u64 {
        let values: usize = self.layers.iter().flatten().flatten().map(|m| m.a.len() + m.b.len()).sum();
        values as u64 * 4
    }
}

impl AdapterWeights {
    /// A random adapter of `rank` on every projection of every layer, deterministic in
    /// `seed`: for benchmarks and tests that need an adapter's shape, not its behaviour.
    pub fn synthetic(model: &ModelConfig, rank: usize, seed: u64) -> AdapterWeights {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut random = |n: usize, bound: f32| (0..n).map(|_| rng.random_range(-bound..bound)).collect::<Vec<f32>>();
        let layers = (0..model.num_layers)
            .map(|_| {
                Module::ALL.map(|m| {
                    let (i, o) = model.module_shape(m);
                    let a = random(rank * i, (1.0 / i as f32).sqrt());
                    let b = random(o * rank, 0.01);
                    Some(LoraModule { a, b, rank, scale: 2.0 })
                })
            })
            .collect();
        AdapterWeights { layers, max_rank: rank, targets: Module::ALL.into_iter().collect(), base_model: None }
    }
}

#[derive(Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: u64,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    rank_pattern: Map<String, Value>,
    #[serde(default)]
    alpha_pattern: Map<String, Value>,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    modules_to_save: Option<Value>,
    base_model_name_or_path: Option<String>,
}

/// PEFT's rule for `rank_pattern`/`alpha_pattern`: the first key `k` (in file order) such that
/// the module path matches `(.*\.)?(k)$` wins.
fn pattern_value(path: &Path, pattern: &Map<String, Value>, module_key: &str) -> Result<Option<f64>, AdapterError> {
    for (key, value) in pattern {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| AdapterError::invalid(path, format!("pattern key {key:?} is not a valid regex: {e}")))?;
        if re.is_match(module_key) {
            let v = value.as_f64().filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
                AdapterError::invalid(path, format!("pattern {key:?} has non-positive value {value}"))
            })?;
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// A tensor's little-endian values as f32, refusing dtypes other than F32, BF16 and F16 and any
/// value that is not finite; one pass over the bytes.
fn finite_f32(dtype: safetensors::Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    use safetensors::Dtype;
    let values = match dtype {
        Dtype::F32 => widen::<4>(bytes, f32::from_le_bytes),
        // bf16 is the top half of an f32.
        Dtype::BF16 => widen::<2>(bytes, |b| f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)),
        Dtype::F16 => widen::<2>(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        other => return Err(format!("has dtype {other:?}; supported: F32, BF16, F16")),
    };
    match values {
        Ok(v) => Ok(v),
        Err(bad) => Err(format!("contains {bad}")),
    }
}

/// Each `W`-byte word of `bytes` as f32; the first value that is not finite as the error.
/// Converted a block at a time and checked while the block is in cache.
fn widen<const W: usize>(bytes: &[u8], f: impl Fn([u8; W]) -> f32) -> Result<Vec<f32>, f32> {
    const BLOCK: usize = 4096;
    let mut out = Vec::with_capacity(bytes.len() / W);
    for block in bytes.chunks(BLOCK * W) {
        let start = out.len();
        out.extend(block.chunks_exact(W).map(|w| {
            let mut b = [0u8; W];
            b.copy_from_slice(w);
            f(b)
        }));
        if !out[start..].iter().fold(true, |all, v| all & v.is_finite()) {
            return Err(out[start..].iter().copied().find(|v| !v.is_finite()).unwrap_or(f32::NAN));
        }
    }
    Ok(out)
}

/// Splits `base_model.model.model.layers.{l}.{block}.{module}.lora_{A|B}.weight`.
fn parse_key(key: &str) -> Option<(usize, &str, &str, char)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (block, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let which = match rest {
        "lora_A.weight" => 'A',
        "lora_B.weight" => 'B',
        _ => return None,
    };
    Some((layer.parse().ok()?, block, module, which))
}

/// Reads a PEFT adapter directory and checks it against `model` (see [`load_peft`]).
pub fn load_peft_dir(dir: &Path, model: &ModelConfig, max_rank: usize) -> Result<AdapterWeights, AdapterError> {
    load_peft(&AdapterFiles::read_dir(dir, u64::MAX)?, model, max_rank)
}

/// Checks a PEFT adapter's files against `model`: config fields, every tensor's name, dtype,
/// shape and values, and ranks against `max_rank`.
pub fn load_peft(files: &AdapterFiles, model: &ModelConfig, max_rank: usize) -> Result<AdapterWeights, AdapterError> {
    let dir = files.dir.as_path();
    let config_path = dir.join(CONFIG_FILE);
    let Some(config) = &files.config else {
        return Err(AdapterError::invalid(dir, "no adapter_config.json"));
    };
    let text = std::str::from_utf8(config)
        .map_err(|e| AdapterError::invalid(&config_path, format!("adapter_config.json is not UTF-8: {e}")))?;
    let cfg: PeftConfig = serde_json::from_str(text)
        .map_err(|e| AdapterError::invalid(&config_path, format!("adapter_config.json: {e}")))?;
    let unsupported = |what: &str| Err(AdapterError::invalid(&config_path, format!("{what} is not supported")));
    match cfg.peft_type.as_deref() {
        Some("LORA") | None => {}
        Some(other) => return unsupported(&format!("peft_type {other:?} (only LORA)")),
    }
    if cfg.fan_in_fan_out {
        return unsupported("fan_in_fan_out=true");
    }
    if cfg.use_dora {
        return unsupported("DoRA (use_dora=true)");
    }
    if cfg.lora_bias || cfg.bias.as_deref().is_some_and(|b| b != "none") {
        return unsupported("training biases (bias != \"none\")");
    }
    if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_null() && m.as_array().is_none_or(|a| !a.is_empty())) {
        return unsupported("modules_to_save");
    }
    if cfg.r == 0 || !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0) {
        return Err(AdapterError::invalid(&config_path, "r and lora_alpha must be positive"));
    }

    let weights_path = dir.join(WEIGHTS_FILE);
    let Some(bytes) = &files.weights else {
        let reason = if files.pickle_only {
            "only pickle weights (adapter_model.bin) found; they are refused because loading pickle can run code — convert to adapter_model.safetensors"
        } else {
            "no adapter_model.safetensors"
        };
        return Err(AdapterError::invalid(dir, reason));
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| AdapterError::invalid(&weights_path, format!("invalid safetensors: {e}")))?;

    // Names, layers and modules first (cheap), then every tensor's values converted and
    // checked in parallel: most of a load's time is this conversion.
    let mut tensors = Vec::new();
    for (key, view) in st.tensors() {
        let Some((layer, block, module_name, which)) = parse_key(&key) else {
            return Err(AdapterError::invalid(
                &weights_path,
                format!("tensor {key} is not a LoRA A/B matrix of a decoder layer projection"),
            ));
        };
        let module = Module::from_name(module_name).filter(|m| m.block() == block).ok_or_else(|| {
            AdapterError::invalid(
                &weights_path,
                format!(
                    "tensor {key} targets {block}.{module_name}, which a {} layer does not have",
                    model.architecture
                ),
            )
        })?;
        if layer >= model.num_layers {
            return Err(AdapterError::invalid(
                &weights_path,
                format!("tensor {key} is for layer {layer}, but the model has {} layers", model.num_layers),
            ));
        }
        tensors.push((key, layer, module, which, view));
    }
    let converted: Vec<Result<Vec<f32>, AdapterError>> = {
        use rayon::prelude::*;
        tensors
            .par_iter()
            .map(|(key, _, _, _, view)| {
                finite_f32(view.dtype(), view.data())
                    .map_err(|why| AdapterError::invalid(&weights_path, format!("tensor {key} {why}")))
            })
            .collect()
    };
    // (layer, module) -> [A, B], each (shape, values)
    type Pair = [Option<(Vec<usize>, Vec<f32>)>; 2];
    let mut found: BTreeMap<(usize, Module), Pair> = BTreeMap::new();
    for ((_, layer, module, which, view), data) in tensors.into_iter().zip(converted) {
        let slot = &mut found.entry((layer, module)).or_default()[usize::from(which == 'B')];
        *slot = Some((view.shape().to_vec(), data?));
    }
    if found.is_empty() {
        return Err(AdapterError::invalid(&weights_path, "contains no LoRA tensors"));
    }

    let mut layers: Vec<[Option<LoraModule>; 7]> = (0..model.num_layers).map(|_| Default::default()).collect();
    let mut targets = BTreeSet::new();
    let mut max_seen = 0;
    for ((layer, module), [a, b]) in found {
        let key = format!("model.layers.{layer}.{}.{}", module.block(), module.name());
        let (Some((a_shape, a)), Some((b_shape, b))) = (a, b) else {
            return Err(AdapterError::invalid(&weights_path, format!("{key} needs both lora_A and lora_B")));
        };
        let (in_dim, out_dim) = model.module_shape(module);
        let rank = a_shape.first().copied().unwrap_or(0);
        if a_shape != [rank, in_dim] || b_shape != [out_dim, rank] || rank == 0 {
            return Err(AdapterError::invalid(
                &weights_path,
                format!(
                    "{key}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit the base projection [{out_dim}, {in_dim}] (expected [r, {in_dim}] and [{out_dim}, r])"
                ),
            ));
        }
        let want_rank = pattern_value(&config_path, &cfg.rank_pattern, &key)?.map_or(cfg.r as usize, |r| r as usize);
        if rank != want_rank {
            return Err(AdapterError::invalid(
                &weights_path,
                format!("{key} has rank {rank} but adapter_config.json says {want_rank}"),
            ));
        }
        if rank > max_rank {
            return Err(AdapterError::RankTooLarge { path: dir.to_path_buf(), module: key, rank, max: max_rank });
        }
        let alpha = pattern_value(&config_path, &cfg.alpha_pattern, &key)?.unwrap_or(cfg.lora_alpha);
        let scale = if cfg.use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 } as f32;
        layers[layer][module.index()] = Some(LoraModule { a, b, rank, scale });
        targets.insert(module);
        max_seen = max_seen.max(rank);
    }
    Ok(AdapterWeights { layers, max_rank: max_seen, targets, base_model: cfg.base_model_name_or_path })
}
