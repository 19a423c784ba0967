//! Synthetic models: the shape of a known model with random weights, built from a preset name,
//! so throughput can be measured without downloading anything (`--model synthetic:llama-7b`).

use super::{Model, ModelConfig, ModelError, ModelWeights, Tokenizer};
use std::path::PathBuf;

/// Prefix of a synthetic model spec.
pub const PREFIX: &str = "synthetic:";

/// Preset names and their `config.json`.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "tiny",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":512,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":512,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}"#,
    ),
    (
        "smollm2-135m",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,"intermediate_size":1536,
        "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"max_position_embeddings":8192,
        "rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#,
    ),
    (
        "llama-1b",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
        "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
        "max_position_embeddings":131072,"rms_norm_eps":1e-5,"tie_word_embeddings":true,
        "rope_scaling":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
    ),
    (
        "llama-7b",
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":4096,"intermediate_size":11008,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"max_position_embeddings":4096,
        "rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}"#,
    ),
];

/// The config of a preset.
pub fn preset_config(name: &str) -> Result<ModelConfig, ModelError> {
    let path = PathBuf::from(format!("{PREFIX}{name}"));
    let json = PRESETS.iter().find(|(n, _)| *n == name).map(|(_, j)| *j).ok_or_else(|| ModelError::Config {
        path: path.clone(),
        reason: format!(
            "unknown synthetic preset {name:?}; presets: {}",
            PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
    })?;
    ModelConfig::from_json(json).map_err(|reason| ModelError::Config { path, reason })
}

/// A model of the preset's shape with random weights (deterministic in `seed`).
pub fn synthetic_model(name: &str, seed: u64) -> Result<Model, ModelError> {
    let config = preset_config(name)?;
    let tokenizer = Tokenizer::synthetic(config.vocab_size)
        .map_err(|reason| ModelError::Tokenizer { path: PathBuf::from(format!("{PREFIX}{name}")), reason })?;
    let weights = ModelWeights::synthetic(&config, seed);
    Ok(Model { name: format!("{PREFIX}{name}"), config, weights, tokenizer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_unknown_presets_are_named() {
        for (name, _) in PRESETS {
            preset_config(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let err = preset_config("gpt-5").expect_err("unknown");
        assert!(err.to_string().contains("gpt-5") && err.to_string().contains("llama-7b"), "{err}");
    }

    #[test]
    fn the_tiny_preset_builds_a_model_that_tokenizes_its_own_words() {
        let m = synthetic_model("tiny", 1).expect("builds");
        assert_eq!(m.weights.layers.len(), 2);
        assert_eq!(m.tokenizer.encode("t5 t7").expect("encodes"), vec![5, 7]);
        assert_eq!(m.tokenizer.decode(&[5, 7]).expect("decodes"), "t5 t7");
    }
}
