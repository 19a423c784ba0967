//! A Llama-family model from a single GGUF file: the config from `{arch}.*` metadata, weights
//! dequantized into the engine's layout, and the tokenizer and chat template from
//! `tokenizer.*` metadata.

use super::gguf::{GgufFile, Value};
use super::{HostTensor, LayerWeights, Model, ModelConfig, ModelError, ModelWeights, Module, TensorData, Tokenizer};
use std::path::Path;

/// GGUF architectures and the Hugging Face architecture they load as.
const ARCHITECTURES: &[(&str, &str)] = &[("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")];

fn meta_err(g: &GgufFile, reason: String) -> ModelError {
    ModelError::Config { path: g.path.clone(), reason }
}

/// The `config.json` equivalent of a GGUF's metadata.
fn config(g: &GgufFile) -> Result<ModelConfig, ModelError> {
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("");
    let hf_arch = ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, h)| *h)
        .ok_or_else(|| meta_err(g, format!("GGUF architecture {arch:?} is not supported (llama, qwen2)")))?;
    let num = |key: &str| -> Result<f64, ModelError> {
        g.get(&format!("{arch}.{key}"))
            .and_then(Value::as_f64)
            .ok_or_else(|| meta_err(g, format!("missing metadata key {arch}.{key}")))
    };
    let opt = |key: &str| g.get(&format!("{arch}.{key}")).and_then(Value::as_f64);
    let heads = num("attention.head_count")?;
    let hidden = num("embedding_length")?;
    let vocab = match opt("vocab_size") {
        Some(v) => v,
        None => g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|t| t.len() as f64).unwrap_or(0.0),
    };
    let mut json = serde_json::json!({
        "architectures": [hf_arch],
        "vocab_size": vocab as u64,
        "hidden_size": hidden as u64,
        "intermediate_size": num("feed_forward_length")? as u64,
        "num_hidden_layers": num("block_count")? as u64,
        "num_attention_heads": heads as u64,
        "num_key_value_heads": opt("attention.head_count_kv").unwrap_or(heads) as u64,
        "head_dim": opt("attention.key_length").unwrap_or(hidden / heads) as u64,
        "max_position_embeddings": opt("context_length").unwrap_or(2048.0) as u64,
        "rms_norm_eps": opt("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": opt("rope.freq_base").unwrap_or(10000.0),
        "tie_word_embeddings": g.tensor_info("output.weight").is_none(),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64),
    });
    let scaling = g.get(&format!("{arch}.rope.scaling.type")).and_then(Value::as_str);
    if let Some(kind) = scaling.filter(|k| *k != "none") {
        json["rope_scaling"] = serde_json::json!({"rope_type": kind, "factor": opt("rope.scaling.factor")});
    }
    ModelConfig::from_json(&json.to_string()).map_err(|reason| meta_err(g, reason))
}

/// llama.cpp stores Llama's q and k rows interleaved per head (`[head][dim/2][2]`) for its
/// RoPE; the engine (like Hugging Face) wants `[head][2][dim/2]`. Undoes that permutation
/// (whole rows move, so quantized rows move with their blocks intact).
fn unpermute(t: HostTensor, heads: usize) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let half = rows / heads / 2;
    // order[to] = from
    let mut order = vec![0usize; rows];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                order[h * 2 * half + s * half + i] = h * 2 * half + 2 * i + s;
            }
        }
    }
    fn reorder<T: Copy>(data: &[T], order: &[usize], cols: usize) -> Vec<T> {
        order.iter().flat_map(|&from| data[from * cols..(from + 1) * cols].iter().copied()).collect()
    }
    match t.data {
        TensorData::Quant(q) => HostTensor::quantized(q.select_rows(&order)),
        TensorData::Bf16(data) => HostTensor::bf16(t.shape, reorder(&data, &order, cols)),
        TensorData::F16(data) => HostTensor::f16(t.shape, reorder(&data, &order, cols)),
        TensorData::F32(data) => HostTensor::new(t.shape, reorder(&data, &order, cols)),
    }
}

/// GGUF tensor names of a layer's projections.
fn gguf_name(m: Module) -> &'static str {
    match m {
        Module::Q => "attn_q",
        Module::K => "attn_k",
        Module::V => "attn_v",
        Module::O => "attn_output",
        Module::Gate => "ffn_gate",
        Module::Up => "ffn_up",
        Module::Down => "ffn_down",
    }
}

fn weights(g: &GgufFile, c: &ModelConfig) -> Result<ModelWeights, ModelError> {
    let arch = g.get("general.architecture").and_then(Value::as_str).unwrap_or("");
    // Matrices stay quantized where the CPU kernels compute on their format; vectors are f32.
    let take = |name: &str, shape: Vec<usize>| -> Result<HostTensor, ModelError> {
        let t = if shape.len() == 2 { g.weight(name)? } else { g.tensor(name)? };
        if t.shape != shape {
            return Err(ModelError::TensorShape {
                path: g.path.clone(),
                name: name.into(),
                found: t.shape,
                expected: shape,
            });
        }
        Ok(t)
    };
    let (h, v) = (c.hidden_size, c.vocab_size);
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let mut proj = Vec::with_capacity(7);
        let mut bias = Vec::with_capacity(7);
        for m in Module::ALL {
            let (i, o) = c.module_shape(m);
            let mut w = take(&format!("blk.{l}.{}.weight", gguf_name(m)), vec![o, i])?;
            if arch == "llama" {
                match m {
                    Module::Q => w = unpermute(w, c.num_heads),
                    Module::K => w = unpermute(w, c.num_kv_heads),
                    _ => {}
                }
            }
            proj.push(w);
            bias.push(if c.module_has_bias(m) {
                Some(take(&format!("blk.{l}.{}.bias", gguf_name(m)), vec![o])?)
            } else {
                None
            });
        }
        layers.push(LayerWeights {
            input_norm: take(&format!("blk.{l}.attn_norm.weight"), vec![h])?,
            post_attention_norm: take(&format!("blk.{l}.ffn_norm.weight"), vec![h])?,
            proj: proj.try_into().map_err(|_| meta_err(g, format!("layer {l}: projections")))?,
            bias: bias.try_into().map_err(|_| meta_err(g, format!("layer {l}: biases")))?,
        });
    }
    let lm_head = if c.tie_word_embeddings { None } else { Some(take("output.weight", vec![v, h])?) };
    Ok(ModelWeights {
        embed_tokens: take("token_embd.weight", vec![v, h])?,
        layers,
        final_norm: take("output_norm.weight", vec![h])?,
        lm_head,
    })
}

/// Loads a model from one GGUF file.
pub fn load_gguf(path: &Path) -> Result<Model, ModelError> {
    let g = GgufFile::open(path)?;
    let config = config(&g)?;
    let tokenizer = Tokenizer::from_gguf(&g, &config.eos_token_ids)?;
    let weights = weights(&g, &config)?;
    let name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
    Ok(Model { name, config, weights, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_moves_interleaved_rope_pairs_to_halves() {
        // One head of dimension 4, one column: GGUF order [a0, b0, a1, b1] → HF [a0, a1, b0, b1].
        let t = HostTensor::new(vec![4, 1], vec![0.0, 10.0, 1.0, 11.0]);
        assert_eq!(unpermute(t, 1).into_f32(), vec![0.0, 1.0, 10.0, 11.0]);
        // Two heads are permuted independently.
        let t = HostTensor::new(vec![8, 1], vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0, 3.0, 13.0]);
        assert_eq!(unpermute(t, 2).into_f32(), vec![0.0, 1.0, 10.0, 11.0, 2.0, 3.0, 12.0, 13.0]);
    }
}
