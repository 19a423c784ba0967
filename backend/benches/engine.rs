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

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

use std::time::Instant;
use switchyard_backend::adapters::AdapterWeights;
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::engine::sampling::argmax;
use switchyard_backend::engine::scheduler::{Scheduler, SchedulerConfig, Sequence};
use switchyard_backend::model::{ModelConfig, ModelWeights};

const SMOLLM2_135M: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
  "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
  "max_position_embeddings":8192,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#;
const PROMPT_LEN: usize = 32;
const RANK: usize = 16;
const ADAPTERS: usize = 8;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Decodes `steps` tokens for every sequence of the batch after a prefill; returns decode
/// tokens per second.
fn decode_tokens_per_s(exec: &mut CpuExecutor, adapters: &[Option<u32>], steps: usize) -> f64 {
    let cfg = SchedulerConfig { block_size: 16, num_blocks: 256, max_batch_tokens: 4096, max_running: 64 };
    let mut sched = Scheduler::new(cfg);
    for (i, &a) in adapters.iter().enumerate() {
        let prompt = (0..PROMPT_LEN as u32).map(|t| (t * 97 + i as u32 * 13) % 49152).collect();
        sched.add(Sequence::new(i as u64, prompt, a));
    }
    let mut run_step = |sched: &mut Scheduler| {
        let step = sched.schedule();
        let logits = exec.forward(&step.batch).expect("forward");
        sched.complete(&step);
        let vocab = logits.len() / step.logits_for.len();
        for (row, &id) in step.logits_for.iter().enumerate() {
            sched.push_token(id, argmax(&logits[row * vocab..(row + 1) * vocab]));
        }
    };
    run_step(&mut sched); // prefill, not timed
    let start = Instant::now();
    for _ in 0..steps {
        run_step(&mut sched);
    }
    (adapters.len() * steps) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let steps = env_usize("BENCH_STEPS", 32);
    let config = ModelConfig::from_json(SMOLLM2_135M).expect("valid config");
    let mut exec = CpuExecutor::new(&config, ModelWeights::synthetic(&config, 1), 256, 16, ADAPTERS, RANK);
    for slot in 0..ADAPTERS {
        exec.load_adapter(slot as u32, &AdapterWeights::synthetic(&config, RANK, 100 + slot as u64)).expect("slot");
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
            results[i].push(decode_tokens_per_s(&mut exec, adapters, steps));
        }
    }
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    let base_batch = medians[1];
    println!("{:<32} {:>12} {:>16}", "case", "tokens/s", "vs batch 8 base");
    for ((name, _), tps) in cases.iter().zip(&medians) {
        println!("{name:<32} {tps:>12.1} {:>16.2}", tps / base_batch);
    }
}
