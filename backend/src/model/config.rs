//! The model's hyperparameters, read from a Hugging Face `config.json`.

use super::ModelError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// Architectures this engine runs. All are Llama-family decoders; they differ in biases,
/// embedding tying and attention windows, which [`ModelConfig`] captures.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// The projections of a decoder layer that carry weights LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    /// The module's name as Hugging Face checkpoints and PEFT spell it.
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The parent block in a checkpoint path (`self_attn` or `mlp`).
    pub fn block(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            Module::Gate | Module::Up | Module::Down => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Position in [`Module::ALL`], for per-module arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How rotary frequencies are derived from the base frequencies.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f32 },
    /// Llama 3's frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position: f32 },
}

/// Hyperparameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate, up and down (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Attention window in tokens (Mistral), if any.
    pub sliding_window: Option<usize>,
    /// End-of-sequence token ids from the config (more may come from `generation_config.json`).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: bool,
    eos_token_id: Option<Value>,
}

fn default_max_pos() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// Largest model dimensions accepted (see [`ModelConfig::from_json`]).
pub const MAX_VOCAB: usize = 4 << 20;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_POSITIONS: usize = 1 << 24;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;

impl ModelConfig {
    /// Reads and validates `config.json` in `dir`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        ModelConfig::from_json(&text).map_err(|reason| ModelError::Config { path, reason })
    }

    /// Parses a `config.json` document.
    pub fn from_json(text: &str) -> Result<ModelConfig, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let architecture = match raw.architectures.first() {
            Some(a) => a.clone(),
            None => match raw.model_type.as_deref() {
                Some("llama") => "LlamaForCausalLM".into(),
                Some("mistral") => "MistralForCausalLM".into(),
                Some("qwen2") => "Qwen2ForCausalLM".into(),
                other => {
                    return Err(format!("no `architectures` and unknown model_type {other:?}"));
                }
            },
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(format!(
                "unsupported architecture {architecture:?}; this engine runs {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(format!("unsupported hidden_act {act:?}; only \"silu\" (SwiGLU) is implemented"));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0 || num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({num_kv_heads})",
                raw.num_attention_heads
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {head_dim} must be even and positive"));
        }
        // Upper bounds well past any released model: a config (or a GGUF header) past them is
        // corrupt, and its sizes must not reach an allocation or overflow the products below.
        for (name, v, max) in [
            ("vocab_size", raw.vocab_size, MAX_VOCAB),
            ("hidden_size", raw.hidden_size, MAX_WIDTH),
            ("intermediate_size", raw.intermediate_size, MAX_WIDTH * 8),
            ("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS),
            ("max_position_embeddings", raw.max_position_embeddings, MAX_POSITIONS),
            ("num_attention_heads", raw.num_attention_heads, MAX_HEADS),
            ("head_dim", head_dim, MAX_HEAD_DIM),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
            if v > max {
                return Err(format!("{name} {v} is larger than this engine runs (at most {max})"));
            }
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        let sliding_window = match architecture.as_str() {
            "MistralForCausalLM" => raw.sliding_window,
            "Qwen2ForCausalLM" if raw.use_sliding_window => {
                return Err("Qwen2 with use_sliding_window=true is not supported".into());
            }
            _ => None,
        };
        let eos_token_ids = token_ids(raw.eos_token_id.as_ref()).map_err(|e| format!("eos_token_id: {e}"))?;
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: is_qwen2 || raw.attention_bias,
            o_bias: raw.attention_bias,
            mlp_bias: raw.mlp_bias,
            sliding_window,
            eos_token_ids,
        })
    }

    /// Output width of the query projection.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Output width of the key (and value) projection.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// `(in_features, out_features)` of a projection.
    pub fn module_shape(&self, m: Module) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        match m {
            Module::Q => (h, self.q_dim()),
            Module::K | Module::V => (h, self.kv_dim()),
            Module::O => (self.q_dim(), h),
            Module::Gate | Module::Up => (h, i),
            Module::Down => (i, h),
        }
    }

    /// Whether a projection has a bias vector.
    pub fn module_has_bias(&self, m: Module) -> bool {
        match m {
            Module::Q | Module::K | Module::V => self.qkv_bias,
            Module::O => self.o_bias,
            Module::Gate | Module::Up | Module::Down => self.mlp_bias,
        }
    }

    /// Rotary inverse frequencies (`head_dim / 2` of them) and the cos/sin scale, with the
    /// configured scaling applied. Computed in f32 as the reference implementation does.
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f32) {
        let dim = self.head_dim;
        let base: Vec<f32> = (0..dim / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / dim as f32)).collect();
        let inv = match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        (inv, 1.0)
    }
}

fn parse_rope(raw: &RawConfig) -> Result<(f32, RopeScaling), String> {
    // Newer configs carry everything in `rope_parameters`; older ones use `rope_theta` plus an
    // optional `rope_scaling` object. Accept both.
    let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref()).filter(|v| !v.is_null());
    let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(raw.rope_theta).unwrap_or(10_000.0);
    if theta <= 0.0 || !theta.is_finite() {
        return Err(format!("rope_theta {theta} must be positive"));
    }
    let Some(p) = params else {
        return Ok((theta as f32, RopeScaling::None));
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f32, String> {
        p.get(key)
            .and_then(Value::as_f64)
            .map(|v| v as f32)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| format!("rope scaling {kind:?} needs a positive number `{key}`"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => {
            let original_max_position = num("original_max_position_embeddings")?;
            let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
            if high <= low {
                return Err("llama3 rope scaling needs high_freq_factor > low_freq_factor".into());
            }
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position,
            }
        }
        other => {
            return Err(format!("unsupported rope scaling type {other:?}; supported: default, linear, llama3"));
        }
    };
    Ok((theta as f32, scaling))
}

/// Reads a token id field that may be absent, a number, or a list of numbers.
pub(crate) fn token_ids(v: Option<&Value>) -> Result<Vec<u32>, String> {
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(format!("{v} is not a token id"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
        "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":[1,2]}"#;

    #[test]
    fn reads_llama3_config_with_legacy_rope_scaling() {
        let c = ModelConfig::from_json(LLAMA).expect("valid config");
        assert_eq!(c.head_dim, 2);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.module_shape(Module::K), (8, 4));
        assert!(!c.qkv_bias);
    }

    #[test]
    fn refuses_unknown_architectures_and_rope_types_by_name() {
        let e = ModelConfig::from_json(&LLAMA.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        let e = ModelConfig::from_json(&LLAMA.replace("\"llama3\"", "\"longrope\"")).unwrap_err();
        assert!(e.contains("longrope"), "{e}");
        let e = ModelConfig::from_json(&LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3"))
            .unwrap_err();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn sizes_past_any_model_are_refused_before_anything_is_allocated() {
        // Found by fuzzing GGUF headers: a layer count of billions reached an allocation.
        let e = ModelConfig::from_json(&LLAMA.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":4000000000"))
            .unwrap_err();
        assert!(e.contains("num_hidden_layers 4000000000 is larger than this engine runs (at most 1024)"), "{e}");
        let e = ModelConfig::from_json(&LLAMA.replace("\"vocab_size\":10", "\"vocab_size\":18446744073709551615"))
            .unwrap_err();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let mut c = ModelConfig::from_json(LLAMA).expect("valid config");
        c.rope_scaling = RopeScaling::None;
        let (plain, _) = c.rope_inv_freq();
        c.rope_scaling = RopeScaling::Linear { factor: 4.0 };
        let (scaled, _) = c.rope_inv_freq();
        for (p, s) in plain.iter().zip(&scaled) {
            assert_eq!(p / 4.0, *s);
        }
    }
}
