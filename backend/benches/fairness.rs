//! Fair sharing between tenants that saturate one backend: how the generated tokens split.
//!
//! `cargo bench -p switchyard-backend --bench fairness` runs SmolLM2-135M-Instruct (the GGUF
//! `scripts/fetch-smollm2` fetches) on the CPU executor with room for `BENCH_RUNNING` requests
//! at once (default 4). Each tenant is a closed loop: it keeps a number of requests
//! outstanding (each a 16-token prompt and 32 generated tokens), sending the next as soon as
//! one ends, always more than the backend runs, so both stay backlogged. After a warm-up it
//! counts the tokens each tenant receives over `BENCH_SECONDS` (default 15) and prints the
//! split, Jain's fairness index of the tokens per unit of weight, (Σx)² / (n·Σx²), which is 1
//! for an exactly weighted split, and the ratio between the two tenants. Scenarios:
//!
//! - `flood`: A keeps three times as many requests outstanding as B, equal weights;
//! - `flood, one account`: the same requests under one tenant name, so the scheduler cannot
//!   tell them apart: the split first come, first served gives;
//! - `weights 3:1`: equal demand, A weighs 3 and B 1.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::scheduler::SchedulerConfig;
use switchyard_backend::engine::{Engine, EngineConfig, Event, GenerateRequest};
use switchyard_backend::model::Model;

const PROMPT: usize = 16;
const GENERATED: usize = 32;
const BLOCK: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The requests of one tenant.
struct Client {
    /// The tenant name the backend sees.
    tenant: &'static str,
    weight: f64,
    outstanding: usize,
}

/// Runs the clients against one engine; returns the tokens each received in the window.
async fn run(engine: Arc<Engine>, clients: &[Client], warmup: Duration, window: Duration) -> Vec<u64> {
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut counts = Vec::new();
    let mut loops = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let count = Arc::new(AtomicU64::new(0));
        counts.push(count.clone());
        for slot in 0..client.outstanding {
            let (engine, counting, stop, count) = (engine.clone(), counting.clone(), stop.clone(), count.clone());
            let (tenant, weight) = (client.tenant.to_string(), client.weight);
            loops.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let req = GenerateRequest {
                        prompt: (0..PROMPT as u32)
                            .map(|t| 100 + t + c as u32 * 31 + slot as u32 * 7 + n % 13)
                            .collect(),
                        max_tokens: GENERATED,
                        ignore_eos: true,
                        tenant: tenant.clone(),
                        tenant_weight: weight,
                        ..Default::default()
                    };
                    let mut events = engine.generate(req).await.expect("accepted");
                    while let Some(ev) = events.recv().await {
                        if counting.load(Ordering::Relaxed)
                            && matches!(ev, Event::Token { .. } | Event::Finished { .. })
                        {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        if matches!(ev, Event::Finished { .. } | Event::Failed { .. }) {
                            break;
                        }
                    }
                }
            }));
        }
    }
    tokio::time::sleep(warmup).await;
    counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(window).await;
    counting.store(false, Ordering::Relaxed);
    let counts = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.expect("client loop");
    }
    counts
}

/// Jain's fairness index of `x`.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * squares)
}

fn main() {
    let running = env_usize("BENCH_RUNNING", 4);
    let window = Duration::from_secs(env_usize("BENCH_SECONDS", 15) as u64);
    let warmup = Duration::from_secs(3);
    let path = switchyard_backend::paths::default_model().expect("a cache directory");
    assert!(path.is_file(), "{} not found: run scripts/fetch-smollm2", path.display());
    let config = Model::open(&path).expect("SmolLM2 loads").config;
    println!(
        "SmolLM2-135M-Instruct (GGUF) on the CPU, {} threads; {running} requests run at once; requests of {PROMPT} prompt and {GENERATED} generated tokens; {} s counted after {} s",
        rayon::current_num_threads(),
        window.as_secs(),
        warmup.as_secs()
    );
    let scenarios: [(&str, [Client; 2]); 3] = [
        (
            "flood (A 3x B's requests), equal weights",
            [
                Client { tenant: "a", weight: 1.0, outstanding: 3 * running },
                Client { tenant: "b", weight: 1.0, outstanding: running },
            ],
        ),
        (
            "flood, one account (first come, first served)",
            [
                Client { tenant: "", weight: 1.0, outstanding: 3 * running },
                Client { tenant: "", weight: 1.0, outstanding: running },
            ],
        ),
        (
            "equal demand, weights 3:1",
            [
                Client { tenant: "a", weight: 3.0, outstanding: 2 * running },
                Client { tenant: "b", weight: 1.0, outstanding: 2 * running },
            ],
        ),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("{:<48} {:>8} {:>8} {:>8} {:>12}", "scenario", "A tok", "B tok", "A/B", "Jain (x/w)");
    for (name, clients) in scenarios {
        // A fresh engine each time: no counters carried over.
        let model = Model::open(&path).expect("SmolLM2 loads");
        let blocks =
            (clients.iter().map(|c| c.outstanding).sum::<usize>() + running) * (PROMPT + GENERATED).div_ceil(BLOCK);
        let exec = CpuExecutor::new(&model.config, model.weights, blocks, BLOCK, 1, 8);
        let cfg = EngineConfig {
            scheduler: SchedulerConfig::new(BLOCK, blocks, 512, running),
            max_model_len: PROMPT + GENERATED,
            max_waiting: 1024,
            max_waiting_per_tenant: 1024,
            max_loras: 1,
            max_lora_rank: 8,
        };
        let engine = Arc::new(Engine::start(&config, Arc::new(model.tokenizer), Box::new(exec), cfg));
        let counts = runtime.block_on(run(engine, &clients, warmup, window));
        let per_weight: Vec<f64> = counts.iter().zip(&clients).map(|(&n, c)| n as f64 / c.weight).collect();
        println!(
            "{:<48} {:>8} {:>8} {:>8.2} {:>12.3}",
            name,
            counts[0],
            counts[1],
            counts[0] as f64 / counts[1].max(1) as f64,
            jain(&per_weight)
        );
    }
}
