//! Golden tests of the CUDA executor: the same cases as `golden.rs`, on the GPU, against the
//! transformers + PEFT reference. In f32 the GPU must match as tightly as the CPU does (same
//! tolerance, same greedy tokens): that proves the executor and kernels compute the model. In
//! bf16, the serving dtype, the logits may drift no further from the f32 reference than the
//! reference itself drifts when PyTorch runs it in bf16 (recorded per case by the generator).
//!
//! Skipped, with a message, where no usable CUDA device is present; `SWITCHYARD_REQUIRE_CUDA=1`
//! (set by the device check) turns the skip into a failure.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use common::*;
use switchyard_backend::engine::cuda::{CudaExecutor, DeviceFloat};
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::model::{ModelConfig, ModelWeights};
use switchyard_backend::service::probe_cuda;

fn cuda<E: DeviceFloat>(
    config: &ModelConfig,
    weights: ModelWeights,
    blocks: usize,
    block_size: usize,
    loras: usize,
) -> Box<dyn Executor>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    Box::new(
        CudaExecutor::<E>::new(0, config, weights, blocks, block_size, loras, MAX_RANK).expect("CUDA executor starts"),
    )
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

/// Every model's cases in one mixed-adapter batch (half joining mid-generation, chunked
/// prefill), then every case alone. Returns the largest error seen.
fn check_all(make: &MakeExecutor, tolerance: f64, exact_greedy: bool, label: &str) -> f64 {
    let g = golden();
    let mut worst = 0f64;
    for model in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let cases: Vec<&Case> = g.cases.iter().filter(|c| c.model == model).collect();
        let (first, late) = cases.split_at(cases.len() / 2);
        worst = worst.max(check_batch(model, first, late, 3, 48, make, tolerance, exact_greedy));
    }
    for case in &g.cases {
        worst = worst.max(check_batch(&case.model, &[case], &[], 0, 4096, make, tolerance, exact_greedy));
    }
    eprintln!(
        "{} cases on cuda ({label}), in mixed batches and alone: max relative logit error {worst:.2e}",
        g.cases.len()
    );
    worst
}

#[test]
fn in_f32_the_gpu_matches_the_reference_as_tightly_as_the_cpu() {
    if cuda_present() {
        check_all(&cuda::<f32>, F32_TOLERANCE, true, "f32");
    }
}

#[test]
fn in_bf16_the_gpu_drifts_no_further_than_pytorch_in_bf16() {
    if cuda_present() {
        // The tiny random models have large activations, so bf16 drift is large for everyone:
        // judge against what PyTorch's own bf16 run of the same cases does.
        let torch_bf16 = golden().cases.iter().map(|c| c.bf16_drift).fold(0.0, f64::max);
        // Measure every case first, then judge, so a failure reports the worst error.
        let worst = check_all(&cuda::<half::bf16>, f64::INFINITY, false, "bf16");
        eprintln!("PyTorch bf16 on the same cases: max relative logit error {torch_bf16:.2e}");
        assert!(
            worst <= torch_bf16,
            "bf16 logits drift {worst:.2e} from the reference; PyTorch's bf16 run {torch_bf16:.2e}"
        );
    }
}
