//! CPU decode throughput with and without LoRA adapters.
//!
//! `cargo bench -p switchyard-backend --bench engine` builds a model of SmolLM2-135M's shape
//! with random weights (30 layers, hidden 576, GQA 9/3, vocab 49152) and rank-16 adapters on
//! all seven projections, then measures decode tokens/s through the real scheduler and CPU
//! executor for: one stream without adapter, a batch of 8 without adapter, 8 on one adapter,
//! and 8 on 8 distinct adapters. Configurations are interleaved over several rounds and the
//! median is reported, so ratios within one run are meaningful on a noisy machine.
//!
//! Environment: `BENCH_ROUNDS` (default 3), `BENCH_STEPS` decode steps per run (default 32).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use switchyard_backend::adapters::AdapterWeights;
use switchyard_backend::bench::{BLOCK_SIZE, blocks_needed, decode_tokens_per_s};
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::engine::sampling::SamplingParams;
use switchyard_backend::model::ModelWeights;
use switchyard_backend::model::synthetic::preset_config;

const PROMPT_LEN: usize = 32;
const RANK: usize = 16;
const ADAPTERS: usize = 8;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let steps = env_usize("BENCH_STEPS", 32);
    let config = preset_config("smollm2-135m").expect("preset");
    let blocks = blocks_needed(ADAPTERS, PROMPT_LEN, steps);
    let mut exec = CpuExecutor::new(&config, ModelWeights::synthetic(&config, 1), blocks, BLOCK_SIZE, ADAPTERS, RANK);
    for slot in 0..ADAPTERS {
        exec.load_adapter(slot as u32, AdapterWeights::synthetic(&config, RANK, 100 + slot as u64)).expect("slot");
    }
    let cases: Vec<(&str, Vec<Option<u32>>)> = vec![
        ("1 stream, no adapter", vec![None]),
        ("batch 8, no adapter", vec![None; 8]),
        ("batch 8, 1 adapter", vec![Some(0); 8]),
        ("batch 8, 8 distinct adapters", (0..8).map(Some).collect()),
    ];
    println!(
        "SmolLM2-135M shape (synthetic weights), rank-{RANK} adapters on q,k,v,o,gate,up,down; {} threads; prompt {PROMPT_LEN}, {steps} decode steps, median of {rounds} rounds",
        rayon::current_num_threads()
    );
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (_, adapters)) in cases.iter().enumerate() {
            results[i].push(
                decode_tokens_per_s(
                    &mut exec,
                    config.vocab_size,
                    adapters,
                    PROMPT_LEN,
                    steps,
                    &SamplingParams::default(),
                )
                .expect("runs"),
            );
        }
    }
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    println!("{:<32} {:>12} {:>16}", "case", "tokens/s", "vs batch 8 base");
    for ((name, _), tps) in cases.iter().zip(&medians) {
        println!("{name:<32} {tps:>12.1} {:>16.2}", tps / medians[1]);
    }
}
