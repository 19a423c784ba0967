//! The base model: its configuration, weights and tokenizer, loaded from a Hugging Face model
//! directory and validated before anything runs.

pub mod chat;
mod config;
pub mod gguf;
mod gguf_model;
pub mod synthetic;
mod tokenizer;
mod weights;

pub use chat::{ChatMessage, ToolCall};
pub use config::{ModelConfig, Module, RopeScaling, SUPPORTED_ARCHITECTURES};
pub use tokenizer::Tokenizer;
pub use weights::{HostTensor, LayerWeights, ModelWeights, TensorData};

use std::path::{Path, PathBuf};

/// Why a model directory could not be loaded. Every variant names the file (and tensor or key)
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid model config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: missing tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor {name} has dtype {dtype}; supported: F32, BF16, F16")]
    TensorDtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: unexpected tensor {name} (not part of a {architecture} model)")]
    UnexpectedTensor { path: PathBuf, name: String, architecture: String },
    #[error("{path}: invalid tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

/// A loaded base model: everything the engine needs besides an executor.
#[derive(Debug)]
pub struct Model {
    /// Name reported to clients: `_name_or_path`-like, here the directory's name.
    pub name: String,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
}

impl Model {
    /// Opens a model by spec: `synthetic:<preset>` builds random weights of a known shape; a
    /// `.gguf` path is a llama.cpp model file; anything else is a Hugging Face model directory.
    pub fn open(spec: &Path) -> Result<Model, ModelError> {
        match spec.to_str().and_then(|s| s.strip_prefix(synthetic::PREFIX)) {
            Some(preset) => synthetic::synthetic_model(preset, 0),
            None if spec.extension().is_some_and(|e| e == "gguf") => gguf_model::load_gguf(spec),
            None => Model::load(spec),
        }
    }

    /// Loads `config.json`, `*.safetensors` (single file or sharded with an index) and the
    /// tokenizer from `dir`.
    pub fn load(dir: &Path) -> Result<Model, ModelError> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = ModelWeights::load(dir, &config)?;
        let tokenizer = Tokenizer::load(dir, &config)?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Model { name, config, weights, tokenizer })
    }
}
