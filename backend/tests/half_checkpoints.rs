//! A bf16 or f16 safetensors checkpoint stays in its 16 bits in memory on the CPU and computes
//! what its values widened to f32 compute.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::model::synthetic::synthetic_model;
use switchyard_backend::model::{HostTensor, ModelWeights, Module, TensorData};
use switchyard_kernels::quant::Precision;

#[test]
fn a_bf16_checkpoint_is_kept_in_bf16_and_runs_as_its_values_widened_to_f32() {
    let kept = |t: &TensorData| matches!(t, TensorData::Bf16(_));
    runs_as_its_values_widened_to_f32(Dtype::BF16, |v| bf16::from_f32(v).to_le_bytes(), kept, "bf16");
}

#[test]
fn an_f16_checkpoint_is_kept_in_f16_and_runs_as_its_values_widened_to_f32() {
    let kept = |t: &TensorData| matches!(t, TensorData::F16(_));
    runs_as_its_values_widened_to_f32(Dtype::F16, |v| f16::from_f32(v).to_le_bytes(), kept, "f16");
}

/// The tiny preset written as a checkpoint of `dtype` (projections, embeddings, norms; `bytes`
/// rounds a value to it), loaded (`kept` tells the matrices' form) and run beside the same file
/// widened to f32 at load.
fn runs_as_its_values_widened_to_f32(
    dtype: Dtype,
    bytes: fn(f32) -> [u8; 2],
    kept: fn(&TensorData) -> bool,
    name: &str,
) {
    let model = synthetic_model("tiny", 5).expect("preset");
    let config = model.config.clone();
    let w = &model.weights;
    let mut tensors: Vec<(String, &HostTensor)> =
        vec![("model.embed_tokens.weight".into(), &w.embed_tokens), ("model.norm.weight".into(), &w.final_norm)];
    if let Some(head) = &w.lm_head {
        tensors.push(("lm_head.weight".into(), head));
    }
    for (l, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), &layer.input_norm));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), &layer.post_attention_norm));
        for (m, t) in Module::ALL.iter().zip(&layer.proj) {
            tensors.push((format!("{p}.{}.{}.weight", m.block(), m.name()), t));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let data = t.to_f32().iter().flat_map(|v| bytes(*v)).collect();
            (name.clone(), t.shape.clone(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| (name.clone(), TensorView::new(dtype, shape.clone(), data).expect("sized")));
    let dir = tempfile::tempdir().expect("tempdir");
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).expect("written");

    let load = || ModelWeights::load(dir.path(), &config).expect("the checkpoint loads");
    let weights = load();
    assert!(kept(&weights.layers[0].proj[0].data), "projections stay {name}");
    assert!(kept(&weights.embed_tokens.data), "embeddings stay {name}");
    assert!(matches!(weights.final_norm.data, TensorData::F32(_)), "vectors are f32");
    assert!(!weights.all_f32());
    // The same checkpoint widened to f32 at load, in the same executor (so the same f16 KV
    // cache).
    let wide = load().into_f32();
    assert!(wide.all_f32());
    let executor =
        |w| -> Box<dyn Executor> { Box::new(CpuExecutor::new_quantized(&config, w, 16, 16, 1, 8, Precision::Int16)) };
    let (mut stored, mut widened) = (executor(weights), executor(wide));
    assert_eq!((stored.dtype(), widened.dtype()), (name, "f32"));

    // A prompt long enough for the GEMM path, then greedy decode steps (the few-row path). The
    // same f32 products; only the order of their additions differs.
    let prompt: Vec<u32> = (1..40).collect();
    let got = common::greedy_run(stored.as_mut(), prompt.clone(), 6);
    let want = common::greedy_run(widened.as_mut(), prompt, 6);
    common::assert_same_run(&got, &want, 1e-4);
}
