//! Shared fixtures of the backend's integration tests: the committed tiny models, their PEFT
//! adapters and the outputs transformers + PEFT computed for them (`scripts/golden/`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture
#![allow(dead_code)]

use safetensors::SafeTensors;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use switchyard_backend::adapters::{AdapterWeights, load_peft_dir};
use switchyard_backend::model::Model;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn adapter_dir(model: &str, name: &str) -> PathBuf {
    fixtures().join("adapters").join(model).join(name)
}

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub key: String,
    pub model: String,
    pub adapter: Option<String>,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCase {
    pub messages: Vec<serde_json::Value>,
    pub add_generation_prompt: bool,
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub steps: usize,
    pub cases: Vec<Case>,
    pub chat: HashMap<String, ChatCase>,
    #[serde(skip)]
    pub logits: HashMap<String, Vec<f32>>,
}

pub fn golden() -> Golden {
    let dir = fixtures().join("golden");
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("fixtures/golden/cases.json");
    let mut g: Golden = serde_json::from_str(&text).expect("cases.json parses");
    let bytes = std::fs::read(dir.join("logits.safetensors")).expect("logits.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    for (name, view) in st.tensors() {
        let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        g.logits.insert(name, data);
    }
    g
}

pub fn load_model(name: &str) -> Model {
    Model::load(&model_dir(name)).expect("fixture model loads")
}

pub fn load_adapter(model: &Model, name: &str) -> AdapterWeights {
    load_peft_dir(&adapter_dir(&model_dirname(model), name), &model.config, 64).expect("fixture adapter loads")
}

fn model_dirname(model: &Model) -> String {
    model.name.clone()
}

/// Largest |got - want| over a row, relative to the row's largest |want|.
pub fn row_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|v| v.abs() as f64).fold(1e-6, f64::max);
    got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).abs()).fold(0.0, f64::max) / scale
}

/// f32 tolerance of the golden tests: the reference runs the same f32 math in another order.
pub const F32_TOLERANCE: f64 = 1e-4;
