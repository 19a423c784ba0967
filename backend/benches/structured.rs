//! What grammar-constrained decoding costs, on SmolLM2-135M-Instruct (the GGUF
//! `scripts/fetch-smollm2` fetches) and the CPU executor.
//!
//! `cargo bench -p switchyard-backend --bench structured` prints:
//!
//! - **decode tokens/s** at batch 1 and batch 8 (`BENCH_BATCHES`), every request constrained by
//!   a JSON schema against the same requests unconstrained, and their ratio. Both generate
//!   exactly `BENCH_TOKENS` tokens (default 96) per request: the schema asks for more items
//!   than fit, so no constrained request ends early, and the unconstrained ones ignore
//!   end-of-sequence. Decode time is from each request's first token to its last; the best of
//!   `BENCH_ROUNDS` rounds (default 3), the two kinds alternating so drift hits both;
//! - **grammar compile time** of a typical schema (nested objects, `$ref`s, enums, bounds: what
//!   an SDK makes of a Pydantic model): the median of 20, and the one-time indexing of the
//!   vocabulary.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark fails loudly on a broken setup

use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::grammar::{GrammarSpec, Grammars};
use switchyard_backend::engine::scheduler::SchedulerConfig;
use switchyard_backend::engine::{Engine, EngineConfig, Event, GenerateRequest};
use switchyard_backend::model::{ChatMessage, Model};

const BLOCK: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A schema of the kind SDKs send: a Pydantic model with a nested model, enums and bounds.
fn typical_schema() -> serde_json::Value {
    serde_json::json!({
        "$defs": {
            "Person": {
                "type": "object", "title": "Person", "additionalProperties": false,
                "properties": {"name": {"type": "string", "maxLength": 24, "title": "Name"},
                               "age": {"type": "integer", "minimum": 0, "maximum": 120, "title": "Age"},
                               "role": {"enum": ["host", "guest", "speaker"], "type": "string", "title": "Role"}},
                "required": ["name", "age", "role"],
            }
        },
        "type": "object", "title": "Meeting", "additionalProperties": false,
        "properties": {
            "title": {"type": "string", "maxLength": 48, "title": "Title"},
            "day": {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"], "type": "string"},
            "online": {"type": "boolean"},
            "attendees": {"type": "array", "items": {"$ref": "#/$defs/Person"}, "maxItems": 8},
        },
        "required": ["title", "day", "online", "attendees"],
    })
}

/// A schema whose answers are longer than the benchmark lets run: a list of at least 64 people.
fn long_schema() -> String {
    let mut schema = typical_schema();
    schema["properties"]["attendees"]["minItems"] = 64.into();
    schema["properties"]["attendees"]["maxItems"] = 64.into();
    schema.to_string()
}

/// Decode tokens per second of `batch` concurrent requests, constrained or not.
async fn decode_rate(engine: &Arc<Engine>, prompt: &[u32], batch: usize, tokens: usize, constrained: bool) -> f64 {
    let tasks: Vec<_> = (0..batch)
        .map(|_| {
            let engine = engine.clone();
            let req = GenerateRequest {
                prompt: prompt.to_vec(),
                max_tokens: tokens,
                ignore_eos: !constrained,
                grammar: constrained.then(|| GrammarSpec::JsonSchema(long_schema())),
                // Every request computes its own prompt: none rides on another's cache.
                cache_salt: next_salt().to_string(),
                ..Default::default()
            };
            tokio::spawn(async move {
                let mut events = engine.generate(req).await.expect("accepted");
                let (mut first, mut n) = (None, 0usize);
                loop {
                    match events.recv().await.expect("an answer") {
                        Event::Token { .. } => {
                            first.get_or_insert_with(Instant::now);
                            n += 1;
                        }
                        Event::Finished { completion_tokens, .. } => {
                            assert_eq!(completion_tokens, tokens, "every request runs its full length");
                            let first = first.expect("tokens before the last");
                            return (n as f64, first.elapsed());
                        }
                        Event::Failed { reason, .. } => panic!("{reason}"),
                        Event::Prompt { .. } => panic!("prompt log-probabilities were not asked for"),
                    }
                }
            })
        })
        .collect();
    let mut total_tokens = 0.0;
    let mut longest = Duration::ZERO;
    for t in tasks {
        let (n, took) = t.await.expect("task");
        total_tokens += n;
        longest = longest.max(took);
    }
    total_tokens / longest.as_secs_f64()
}

fn next_salt() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn main() {
    let path = switchyard_backend::paths::default_model().expect("a cache directory");
    let tokens = env_usize("BENCH_TOKENS", 96);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();

    // Compile time first, on an idle machine.
    let model = Model::open(&path).expect("SmolLM2 loads (run scripts/fetch-smollm2)");
    let tokenizer = Arc::new(model.tokenizer);
    let grammars = Grammars::new(tokenizer.clone(), model.config.vocab_size);
    let spec = GrammarSpec::JsonSchema(typical_schema().to_string());
    let started = Instant::now();
    grammars.compile_blocking(&spec).expect("compiles");
    let first = started.elapsed();
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            grammars.compile_blocking(&spec).expect("compiles");
            started.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "grammar compile, typical schema ({} bytes): median {:.2} ms (first, with indexing the vocabulary: {:.1} ms)",
        spec_len(&spec),
        times[times.len() / 2].as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3
    );

    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let model = Model::open(&path).expect("SmolLM2 loads");
    let blocks = max_batch * 1024 / BLOCK;
    let exec = CpuExecutor::new(&model.config, model.weights, blocks, BLOCK, 1, 8);
    let cfg = EngineConfig {
        scheduler: SchedulerConfig::new(BLOCK, blocks, 2048, max_batch),
        max_model_len: 1024,
        max_waiting: 64,
        max_waiting_per_tenant: 64,
        max_loras: 1,
        max_lora_rank: 8,
    };
    let engine = Arc::new(Engine::start(&model.config, tokenizer.clone(), Box::new(exec), cfg));
    let question = ChatMessage {
        role: "user".into(),
        content: "List the people at the team offsite as JSON.".into(),
        ..Default::default()
    };
    let prompt = tokenizer.encode_chat(&[question], true).expect("renders");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Warm up both paths (the first grammar indexes the vocabulary).
    runtime.block_on(decode_rate(&engine, &prompt, 1, 8, true));
    runtime.block_on(decode_rate(&engine, &prompt, 1, 8, false));
    for batch in batches {
        let (mut free, mut constrained) = (0f64, 0f64);
        for _ in 0..rounds {
            free = free.max(runtime.block_on(decode_rate(&engine, &prompt, batch, tokens, false)));
            constrained = constrained.max(runtime.block_on(decode_rate(&engine, &prompt, batch, tokens, true)));
        }
        println!(
            "decode, batch {batch}, {tokens} tokens a request: {free:.1} tokens/s unconstrained, {constrained:.1} tokens/s with a JSON schema: {:.3}x",
            constrained / free
        );
    }
}

fn spec_len(spec: &GrammarSpec) -> usize {
    match spec {
        GrammarSpec::JsonSchema(s) | GrammarSpec::Regex(s) | GrammarSpec::Lark(s) => s.len(),
        GrammarSpec::JsonObject => 0,
    }
}
