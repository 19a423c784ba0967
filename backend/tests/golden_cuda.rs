//! Golden tests of the CUDA executor: the same cases as `golden.rs`, on the GPU in bf16,
//! against the transformers + PEFT reference. Skipped, with a message, where no usable CUDA
//! device is present; `SWITCHYARD_REQUIRE_CUDA=1` (set by the device check) turns the skip
//! into a failure.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use common::*;
use switchyard_backend::engine::cuda::CudaExecutor;
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::model::{ModelConfig, ModelWeights};
use switchyard_backend::service::probe_cuda;

/// bf16 weights and activations against an f32 reference: ‖·‖∞-relative logit error per row.
const BF16_TOLERANCE: f64 = 6e-2;

fn cuda(
    config: &ModelConfig,
    weights: ModelWeights,
    blocks: usize,
    block_size: usize,
    loras: usize,
) -> Box<dyn Executor> {
    Box::new(CudaExecutor::new(0, config, weights, blocks, block_size, loras, MAX_RANK).expect("CUDA executor starts"))
}

fn cuda_present() -> bool {
    match probe_cuda(0) {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var_os("SWITCHYARD_REQUIRE_CUDA").is_none(), "SWITCHYARD_REQUIRE_CUDA is set but {why}");
            // Straight to stderr (not eprintln!, which the test harness captures) so the skip
            // shows in the test output.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "golden_cuda: skipped, no usable CUDA device ({why})");
            false
        }
    }
}

#[test]
fn every_model_in_a_mixed_adapter_batch_matches_the_reference_on_the_gpu() {
    if !cuda_present() {
        return;
    }
    let g = golden();
    for model in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let cases: Vec<&Case> = g.cases.iter().filter(|c| c.model == model).collect();
        let (first, late) = cases.split_at(cases.len() / 2);
        let err = check_batch(model, first, late, 3, 48, &cuda, BF16_TOLERANCE, false);
        eprintln!("{model} on cuda (bf16), {} requests: max relative logit error {err:.2e}", cases.len());
    }
}

#[test]
fn every_case_alone_matches_the_reference_on_the_gpu() {
    if !cuda_present() {
        return;
    }
    let g = golden();
    let mut worst = 0f64;
    for case in &g.cases {
        worst = worst.max(check_batch(&case.model, &[case], &[], 0, 4096, &cuda, BF16_TOLERANCE, false));
    }
    eprintln!("{} cases alone on cuda (bf16): max relative logit error {worst:.2e}", g.cases.len());
}
