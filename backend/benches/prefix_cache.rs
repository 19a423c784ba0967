//! What the prefix cache buys, on SmolLM2-135M-Instruct (the GGUF `scripts/fetch-smollm2`
//! fetches) and the CPU executor.
//!
//! `cargo bench -p switchyard-backend --bench prefix_cache` prints:
//!
//! - **time to first token** of a chat request whose system prompt (about `BENCH_SYSTEM_TOKENS`
//!   tokens, default 1000) is cached, against the same request computed in full (another cache
//!   salt each time, so nothing is found): the median of 5 each, and their ratio;
//! - **a multi-turn chat workload**: `BENCH_USERS` users (default 8) each hold a conversation of
//!   `BENCH_TURNS` turns (default 6) with the same system prompt (about `BENCH_CHAT_SYSTEM_TOKENS`
//!   tokens, default 300), each turn sent when the previous answer (up to 32 greedy tokens) has
//!   come back, with its whole history; the time the whole workload takes with the cache on
//!   and off, their ratio, and the share of prompt tokens the cache served.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::scheduler::SchedulerConfig;
use switchyard_backend::engine::{Engine, EngineConfig, Event, GenerateRequest};
use switchyard_backend::model::{ChatMessage, Model, Tokenizer};

const BLOCK: usize = 16;
const MAX_MODEL_LEN: usize = 4096;
const ANSWER_TOKENS: usize = 32;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
}

/// A system prompt of about `tokens` tokens: numbered house rules.
fn system_prompt(tokenizer: &Tokenizer, tokens: usize) -> String {
    let mut text = String::from("You are the support assistant of a railway company. Follow these rules.");
    let mut n = 1;
    while tokenizer.encode(&text).expect("encodes").len() < tokens {
        text.push_str(&format!(
            " Rule {n}: when a passenger asks about route {n}, give the departure times, the platform and the fare in one short paragraph."
        ));
        n += 1;
    }
    text
}

/// An engine on SmolLM2 with the prefix cache on or off.
fn engine(path: &std::path::Path, caching: bool, running: usize) -> (Arc<Engine>, Arc<Tokenizer>) {
    let model = Model::open(path).expect("SmolLM2 loads");
    let blocks = running * MAX_MODEL_LEN / BLOCK;
    let exec = CpuExecutor::new(&model.config, model.weights, blocks, BLOCK, 1, 8);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig { prefix_caching: caching, ..SchedulerConfig::new(BLOCK, blocks, 2048, running) },
        max_model_len: MAX_MODEL_LEN,
        max_waiting: 1024,
        max_waiting_per_tenant: 1024,
        max_loras: 1,
        max_lora_rank: 8,
    };
    let tokenizer = Arc::new(model.tokenizer);
    (Arc::new(Engine::start(&model.config, tokenizer.clone(), Box::new(exec), cfg)), tokenizer)
}

/// What one request took: time to first token, the text, prompt tokens and cached ones.
struct Outcome {
    first_token: Duration,
    text: String,
    prompt_tokens: usize,
    cached_tokens: usize,
}

async fn generate(engine: &Engine, prompt: Vec<u32>, max_tokens: usize, salt: &str) -> Outcome {
    let started = Instant::now();
    let req = GenerateRequest { prompt, max_tokens, cache_salt: salt.into(), ..Default::default() };
    let mut events = engine.generate(req).await.expect("accepted");
    let mut first_token = None;
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        first_token.get_or_insert_with(|| started.elapsed());
        match ev {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Finished { text: t, prompt_tokens, cached_tokens, .. } => {
                text.push_str(&t);
                let first_token = first_token.unwrap_or_default();
                return Outcome { first_token, text, prompt_tokens, cached_tokens };
            }
            Event::Failed { reason, .. } => panic!("generation failed: {reason}"),
            Event::Prompt { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("the stream ended without finishing");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Median time to first token with the system prompt computed, and found cached.
async fn first_token(engine: &Engine, tokenizer: &Tokenizer, system: &str) -> (Duration, Duration, usize, usize) {
    let chat = |q: usize| {
        let user = format!("Question {q}: when does the first train leave?");
        tokenizer.encode_chat(&[message("system", system), message("user", &user)], true).expect("renders")
    };
    // Warm up the executor, then fill the cache under the salt `warm`.
    generate(engine, chat(0), 1, "warm-up").await;
    generate(engine, chat(0), 1, "warm").await;
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut sizes = (0, 0);
    for q in 1..=5 {
        let c = generate(engine, chat(q), 1, &format!("cold-{q}")).await;
        let w = generate(engine, chat(q), 1, "warm").await;
        assert_eq!(c.cached_tokens, 0, "a fresh salt finds nothing");
        cold.push(c.first_token);
        warm.push(w.first_token);
        sizes = (w.prompt_tokens, w.cached_tokens);
    }
    (median(cold), median(warm), sizes.0, sizes.1)
}

/// The multi-turn workload: its duration, prompt tokens and cached prompt tokens.
async fn conversations(
    engine: Arc<Engine>,
    tokenizer: Arc<Tokenizer>,
    system: &str,
    users: usize,
    turns: usize,
) -> (Duration, usize, usize) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for u in 0..users {
        let (engine, tokenizer, system) = (engine.clone(), tokenizer.clone(), system.to_string());
        tasks.push(tokio::spawn(async move {
            let mut history = vec![message("system", &system)];
            let (mut prompt_tokens, mut cached_tokens) = (0, 0);
            for t in 0..turns {
                history.push(message("user", &format!("I am passenger {u}. Tell me about route {}.", u * turns + t)));
                let prompt = tokenizer.encode_chat(&history, true).expect("renders");
                let outcome = generate(&engine, prompt, ANSWER_TOKENS, "").await;
                prompt_tokens += outcome.prompt_tokens;
                cached_tokens += outcome.cached_tokens;
                history.push(message("assistant", &outcome.text));
            }
            (prompt_tokens, cached_tokens)
        }));
    }
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for t in tasks {
        let (p, c) = t.await.expect("a conversation");
        prompt_tokens += p;
        cached_tokens += c;
    }
    (started.elapsed(), prompt_tokens, cached_tokens)
}

fn main() {
    let path = switchyard_backend::paths::default_model().expect("a cache directory");
    assert!(path.is_file(), "{} not found: run scripts/fetch-smollm2", path.display());
    let (users, turns) = (env_usize("BENCH_USERS", 8), env_usize("BENCH_TURNS", 6));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("SmolLM2-135M-Instruct (GGUF) on the CPU, {} threads", rayon::current_num_threads());

    let (engine_on, tokenizer) = engine(&path, true, 4);
    let system = system_prompt(&tokenizer, env_usize("BENCH_SYSTEM_TOKENS", 1000));
    let (cold, warm, prompt, cached) = runtime.block_on(first_token(&engine_on, &tokenizer, &system));
    drop(engine_on);
    println!(
        "time to first token, {prompt}-token prompt: computed {:.1} ms, {cached} tokens cached {:.1} ms: {:.3}x",
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        warm.as_secs_f64() / cold.as_secs_f64()
    );

    let system = system_prompt(&tokenizer, env_usize("BENCH_CHAT_SYSTEM_TOKENS", 300));
    let mut took = Vec::new();
    for caching in [false, true] {
        let (engine, tokenizer) = engine(&path, caching, users);
        let (time, prompt, cached) = runtime.block_on(conversations(engine, tokenizer, &system, users, turns));
        println!(
            "{users} users x {turns} turns, cache {}: {:.1} s, {prompt} prompt tokens, {cached} of them cached ({:.0}%)",
            if caching { "on " } else { "off" },
            time.as_secs_f64(),
            100.0 * cached as f64 / prompt.max(1) as f64
        );
        took.push(time.as_secs_f64());
    }
    println!("multi-turn workload, cache off / on: {:.2}x", took[0] / took[1]);
}
