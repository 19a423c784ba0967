//! Decode step time while an adapter is placed: does a load pause every tenant's decoding?
//!
//! `cargo bench -p switchyard-backend --bench placement` runs SmolLM2-135M-Instruct (the GGUF
//! `scripts/fetch-smollm2` fetches) on the CPU executor with a batch of 4 sequences decoding,
//! and every few steps places a rank-64 adapter on all seven projections of every layer
//! (78 MB of f32 weights, already validated) through the engine, as a load does after
//! validation. It reports the time between consecutive tokens of one sequence (one engine step)
//! outside the placements and across them.
//!
//! Environment: `BENCH_ROUNDS` placements (default 8), `BENCH_GAP` steps between them
//! (default 12).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_backend::adapters::AdapterWeights;
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::scheduler::SchedulerConfig;
use switchyard_backend::engine::{Engine, EngineConfig, Event, GenerateRequest};
use switchyard_backend::model::Model;

const RANK: usize = 64;
const BATCH: usize = 4;
const BLOCK: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 8);
    let gap = env_usize("BENCH_GAP", 12);
    let path = switchyard_backend::paths::default_model().expect("a cache directory");
    assert!(path.is_file(), "{} not found: run scripts/fetch-smollm2", path.display());
    let Model { config, weights, tokenizer, .. } = Model::open(&path).expect("SmolLM2 loads");
    let steps = (rounds + 2) * gap * 2 + 64;
    let blocks = BATCH * (16 + steps).div_ceil(BLOCK) + 1;
    let exec = CpuExecutor::new(&config, weights, blocks, BLOCK, 2, RANK);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig::new(BLOCK, blocks, 512, BATCH),
        max_model_len: 16 + steps,
        max_waiting: 16,
        max_waiting_per_tenant: 16,
        max_loras: 2,
        max_lora_rank: RANK,
    };
    let engine = Arc::new(Engine::start(&config, Arc::new(tokenizer), Box::new(exec), cfg));
    // Made before decoding starts, so that making them takes nothing from the steps measured.
    let mut adapters: Vec<AdapterWeights> =
        (0..rounds).map(|r| AdapterWeights::synthetic(&config, RANK, r as u64)).collect();
    let adapter = &adapters[0];
    println!(
        "SmolLM2-135M-Instruct (GGUF) on the CPU, {} threads; batch {BATCH} decoding; {rounds} placements of a rank-{RANK} adapter on all projections ({:.0} MB f32), one every {gap} steps",
        rayon::current_num_threads(),
        adapter.size_bytes() as f64 / 1e6
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut streams = Vec::new();
        for i in 0..BATCH {
            let req = GenerateRequest {
                prompt: (0..16).map(|t| 100 + t + i as u32).collect(),
                max_tokens: steps,
                ignore_eos: true,
                ..Default::default()
            };
            streams.push(engine.generate(req).await.expect("accepted"));
        }
        // One sequence's token arrival times: the gaps between them are engine steps.
        let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let mut first = streams.remove(0);
        let reader = tokio::spawn({
            let arrivals = arrivals.clone();
            async move {
                while let Some(ev) = first.recv().await {
                    arrivals.lock().unwrap().push(Instant::now());
                    if matches!(ev, Event::Finished { .. } | Event::Failed { .. }) {
                        break;
                    }
                }
            }
        });
        let count = || arrivals.lock().unwrap().len();
        let wait_steps = async |n: usize| {
            let target = count() + n;
            while count() < target {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        wait_steps(gap).await;
        let mut windows = Vec::new();
        for round in 0..rounds {
            let weights = adapters.pop().expect("one per round");
            let started = Instant::now();
            engine.install_adapter(format!("a{round}"), format!("file:///a{round}"), weights).await.expect("placed");
            windows.push((started, Instant::now()));
            wait_steps(gap).await;
        }
        drop(streams);
        reader.abort();
        let times = arrivals.lock().unwrap().clone();
        let (mut normal, mut during) = (Vec::new(), Vec::new());
        for pair in times.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let ms = (b - a).as_secs_f64() * 1e3;
            if windows.iter().any(|&(s, e)| a < e && b > s) { during.push(ms) } else { normal.push(ms) }
        }
        let placing: Vec<f64> = windows.iter().map(|(s, e)| (*e - *s).as_secs_f64() * 1e3).collect();
        let median = percentile(&normal, 0.5);
        println!("{:<44} {:>9} {:>9} {:>9}", "", "median", "p90", "max");
        println!(
            "{:<44} {:>9.2} {:>9.2} {:>9.2}",
            format!("step, no placement ({} steps), ms", normal.len()),
            median,
            percentile(&normal, 0.9),
            percentile(&normal, 1.0)
        );
        println!(
            "{:<44} {:>9.2} {:>9.2} {:>9.2}",
            format!("step across a placement ({} steps), ms", during.len()),
            percentile(&during, 0.5),
            percentile(&during, 0.9),
            percentile(&during, 1.0)
        );
        println!(
            "{:<44} {:>9.2} {:>9.2} {:>9.2}",
            "placement (install_adapter), ms",
            percentile(&placing, 0.5),
            percentile(&placing, 0.9),
            percentile(&placing, 1.0)
        );
        println!(
            "worst step across a placement / median step: {:.2}x (median step across one: {:.2}x)",
            percentile(&during, 1.0) / median,
            percentile(&during, 0.5) / median
        );
    });
}
