//! Base-model weights from safetensors files, checked name by name and shape by shape.

use super::{ModelConfig, ModelError, Module};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use switchyard_kernels::quant::QuantMatrix;

/// A tensor in host memory: f32, or a matrix kept in the form it was stored in (bf16, f16, or a
/// GGUF block format).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// The values of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    /// A matrix stored in bf16, kept so (every value widens exactly to f32).
    Bf16(Vec<bf16>),
    /// A matrix stored in f16, kept so (every value widens exactly to f32).
    F16(Vec<f16>),
    /// A `[rows, cols]` matrix in a GGUF block format (see `switchyard_kernels::quant`).
    Quant(QuantMatrix),
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data: TensorData::F32(data) }
    }

    /// A quantized matrix, shaped `[rows, cols]`.
    pub fn quantized(matrix: QuantMatrix) -> HostTensor {
        HostTensor { shape: vec![matrix.rows(), matrix.cols()], data: TensorData::Quant(matrix) }
    }

    /// A bf16 tensor of `shape`.
    pub fn bf16(shape: Vec<usize>, data: Vec<bf16>) -> HostTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data: TensorData::Bf16(data) }
    }

    /// An f16 tensor of `shape`.
    pub fn f16(shape: Vec<usize>, data: Vec<f16>) -> HostTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data: TensorData::F16(data) }
    }

    /// The values as f32 (widened or dequantized if need be).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.data {
            TensorData::F32(v) => Cow::Borrowed(v),
            TensorData::Bf16(v) => Cow::Owned(v.iter().map(|v| v.to_f32()).collect()),
            TensorData::F16(v) => Cow::Owned(v.iter().map(|v| v.to_f32()).collect()),
            TensorData::Quant(q) => Cow::Owned(q.dequantize()),
        }
    }

    /// The values as f32, consuming the tensor.
    pub fn into_f32(self) -> Vec<f32> {
        match self.data {
            TensorData::F32(v) => v,
            data => HostTensor { shape: self.shape, data }.to_f32().into_owned(),
        }
    }
}

/// Weights of one decoder layer, in PyTorch layout (`[out, in]` for projections).
#[derive(Debug)]
pub struct LayerWeights {
    pub input_norm: HostTensor,
    pub post_attention_norm: HostTensor,
    /// Indexed by [`Module::index`].
    pub proj: [HostTensor; 7],
    /// Bias per projection, where the architecture has one.
    pub bias: [Option<HostTensor>; 7],
}

/// All weights of a Llama-family decoder.
#[derive(Debug)]
pub struct ModelWeights {
    pub embed_tokens: HostTensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: HostTensor,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<HostTensor>,
}

/// Converts a safetensors buffer of a float dtype to f32.
pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let words = |n: usize| bytes.chunks_exact(n);
    Some(match dtype {
        Dtype::F32 => words(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => words(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => words(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Memory-maps every `.safetensors` file of a directory.
struct Shards {
    files: Vec<(PathBuf, memmap2::Mmap)>,
}

impl Shards {
    fn open(dir: &Path) -> Result<Shards, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Weights { path: index.clone(), reason: e.to_string() })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Weights { path: index.clone(), reason: "no `weight_map` object".into() })?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(ModelError::Weights {
                        path: index.clone(),
                        reason: format!("shard name {f:?} leaves the directory"),
                    });
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(ModelError::Weights {
                    path: dir.to_path_buf(),
                    reason: "no model.safetensors or model.safetensors.index.json (pickle .bin weights are not loaded)"
                        .into(),
                });
            }
            vec![single]
        };
        let mut files = Vec::with_capacity(names.len());
        for path in names {
            let file = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the map is read-only and lives while we read it. A concurrent writer to the
            // file could change bytes under us, which at worst yields wrong weights; weights are
            // copied out and validated by shape, and the files are not ours to lock.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            files.push((path, map));
        }
        Ok(Shards { files })
    }
}

impl ModelWeights {
    /// Loads and validates every tensor the configured architecture needs. Tensors may be F32,
    /// BF16 or F16 on disk; BF16 and F16 matrices are held as they are (half the memory of f32,
    /// and the CPU kernels read them so), everything else as f32.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<ModelWeights, ModelError> {
        let shards = Shards::open(dir)?;
        let mut parsed = Vec::with_capacity(shards.files.len());
        for (path, map) in &shards.files {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| ModelError::Weights { path: path.clone(), reason: format!("invalid safetensors: {e}") })?;
            parsed.push((path, st));
        }
        // name -> shard holding it
        let mut location: HashMap<String, usize> = HashMap::new();
        for (i, (_, st)) in parsed.iter().enumerate() {
            for name in st.names() {
                location.insert(name.to_string(), i);
            }
        }
        let expected = expected_tensors(config);
        for name in location.keys() {
            // Some exporters save the rotary buffers; they are derived from the config.
            if !expected.contains_key(name) && !name.ends_with("rotary_emb.inv_freq") {
                let path = parsed[location[name]].0.clone();
                return Err(ModelError::UnexpectedTensor {
                    path,
                    name: name.clone(),
                    architecture: config.architecture.clone(),
                });
            }
        }
        let take = |name: &str| -> Result<Option<HostTensor>, ModelError> {
            let Some(&i) = location.get(name) else {
                return Ok(None);
            };
            let (path, st) = &parsed[i];
            let view =
                st.tensor(name).map_err(|e| ModelError::Weights { path: (*path).clone(), reason: e.to_string() })?;
            let shape = view.shape().to_vec();
            let want = &expected[name];
            if &shape != want {
                return Err(ModelError::TensorShape {
                    path: (*path).clone(),
                    name: name.into(),
                    found: shape,
                    expected: want.clone(),
                });
            }
            let words = || view.data().chunks_exact(2).map(|b| [b[0], b[1]]);
            match view.dtype() {
                Dtype::BF16 if shape.len() == 2 => {
                    return Ok(Some(HostTensor::bf16(shape, words().map(bf16::from_le_bytes).collect())));
                }
                Dtype::F16 if shape.len() == 2 => {
                    return Ok(Some(HostTensor::f16(shape, words().map(f16::from_le_bytes).collect())));
                }
                _ => {}
            }
            let data = to_f32(view.dtype(), view.data()).ok_or_else(|| ModelError::TensorDtype {
                path: (*path).clone(),
                name: name.into(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            Ok(Some(HostTensor::new(shape, data)))
        };
        let missing = |name: &str| ModelError::MissingTensor { path: dir.to_path_buf(), name: name.into() };
        let need = |name: &str| take(name)?.ok_or_else(|| missing(name));

        let embed_tokens = need("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            let mut proj = Vec::with_capacity(7);
            let mut bias = Vec::with_capacity(7);
            for m in Module::ALL {
                proj.push(need(&format!("{p}.{}.{}.weight", m.block(), m.name()))?);
                bias.push(if config.module_has_bias(m) {
                    Some(need(&format!("{p}.{}.{}.bias", m.block(), m.name()))?)
                } else {
                    None
                });
            }
            layers.push(LayerWeights {
                input_norm: need(&format!("{p}.input_layernorm.weight"))?,
                post_attention_norm: need(&format!("{p}.post_attention_layernorm.weight"))?,
                proj: proj.try_into().map_err(|_| missing(&p))?,
                bias: bias.try_into().map_err(|_| missing(&p))?,
            });
        }
        let final_norm = need("model.norm.weight")?;
        let lm_head = if config.tie_word_embeddings { take("lm_head.weight")? } else { Some(need("lm_head.weight")?) };
        Ok(ModelWeights { embed_tokens, layers, final_norm, lm_head })
    }

    /// Random weights of the configured shape (normal-ish, deterministic in `seed`), for
    /// benchmarks and tests that need a model of a given size rather than a given behaviour.
    pub fn synthetic(config: &ModelConfig, seed: u64) -> ModelWeights {
        let mut next_seed = seed;
        let mut uniform = |shape: Vec<usize>, bound: f32| {
            next_seed = next_seed.wrapping_add(1);
            HostTensor::new(shape.clone(), fill_uniform(shape.iter().product(), bound, next_seed))
        };
        let h = config.hidden_size;
        let ones = |n: usize| HostTensor::new(vec![n], vec![1.0; n]);
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let proj = Module::ALL.map(|m| {
                let (i, o) = config.module_shape(m);
                uniform(vec![o, i], (3.0 / i as f32).sqrt())
            });
            let bias =
                Module::ALL.map(|m| config.module_has_bias(m).then(|| uniform(vec![config.module_shape(m).1], 0.1)));
            layers.push(LayerWeights { input_norm: ones(h), post_attention_norm: ones(h), proj, bias });
        }
        let embed_tokens = uniform(vec![config.vocab_size, h], 1.0);
        let lm_head =
            (!config.tie_word_embeddings).then(|| uniform(vec![config.vocab_size, h], (3.0 / h as f32).sqrt()));
        ModelWeights { embed_tokens, layers, final_norm: ones(h), lm_head }
    }

    /// Whether every tensor is held in f32 (nothing kept quantized or in 16 bits).
    pub fn all_f32(&self) -> bool {
        let f32 = |t: &HostTensor| matches!(t.data, TensorData::F32(_));
        f32(&self.embed_tokens)
            && f32(&self.final_norm)
            && self.lm_head.as_ref().is_none_or(f32)
            && self.layers.iter().all(|l| {
                f32(&l.input_norm)
                    && f32(&l.post_attention_norm)
                    && l.proj.iter().all(f32)
                    && l.bias.iter().flatten().all(f32)
            })
    }

    /// Every tensor widened or dequantized to f32: the values a model's stored forms stand for.
    pub fn into_f32(self) -> ModelWeights {
        let widen = |t: HostTensor| HostTensor::new(t.shape.clone(), t.into_f32());
        let layers = self
            .layers
            .into_iter()
            .map(|l| LayerWeights {
                input_norm: widen(l.input_norm),
                post_attention_norm: widen(l.post_attention_norm),
                proj: l.proj.map(widen),
                bias: l.bias.map(|b| b.map(widen)),
            })
            .collect();
        ModelWeights {
            embed_tokens: widen(self.embed_tokens),
            layers,
            final_norm: widen(self.final_norm),
            lm_head: self.lm_head.map(widen),
        }
    }

    /// The output projection (`[vocab, hidden]`), which may be the embedding table.
    pub fn lm_head(&self) -> &HostTensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

/// `n` values uniform in `[-bound, bound)`, filled in parallel from a SplitMix64 stream per
/// chunk (deterministic in `seed`). Synthetic models of billions of parameters are built in
/// seconds this way; their values only need to be non-degenerate.
fn fill_uniform(n: usize, bound: f32, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut state = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for v in chunk {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 random bits to a float in [-1, 1).
            *v = ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * bound;
        }
    });
    out
}

/// Every tensor name a model of this config may contain, with its shape.
fn expected_tensors(config: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut out = BTreeMap::new();
    out.insert("model.embed_tokens.weight".to_string(), vec![v, h]);
    out.insert("model.norm.weight".to_string(), vec![h]);
    out.insert("lm_head.weight".to_string(), vec![v, h]);
    for l in 0..config.num_layers {
        let p = format!("model.layers.{l}");
        out.insert(format!("{p}.input_layernorm.weight"), vec![h]);
        out.insert(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        for m in Module::ALL {
            let (i, o) = config.module_shape(m);
            out.insert(format!("{p}.{}.{}.weight", m.block(), m.name()), vec![o, i]);
            if config.module_has_bias(m) {
                out.insert(format!("{p}.{}.{}.bias", m.block(), m.name()), vec![o]);
            }
        }
    }
    out
}
