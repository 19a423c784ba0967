//! KV-aware routing against routing by load, on a multi-turn chat workload: two backends
//! (SmolLM2-135M-Instruct on the CPU) behind one gateway, `--users` users (default 8) each
//! holding a conversation of `--turns` turns (default 6) with one shared system prompt, each
//! turn sent (with its whole history) when the previous answer (up to `--max-tokens`, default
//! 32) has come back. Run once with the gateway routing by cached prefix and once with
//! `--no-prefix-routing`, each on fresh backends, and once on a single backend, where every turn
//! finds its history: the hit rate no router of two backends can beat. `--kv-cache-mib M` gives
//! each backend M MiB of KV cache (the single backend 2M, the fleet's total) instead of the
//! backend's default, which holds every conversation: with less, a backend cannot keep every
//! user's history, and where each user's turns go decides what is still cached. Prints, for each, the
//! prompt tokens, those the backends found in their prefix caches
//! (`usage.prompt_tokens_details.cached_tokens`), the hit rate and the time the workload took,
//! then the ratios of the hit rates to routing by load.
//!
//! `cargo bench -p switchyard --bench prefix_routing [-- --users 8 --turns 6 --max-tokens 32
//! --queue-cost 32 --kv-cache-mib M]` (`--queue-cost`: the gateway's `--prefix-queue-cost-tokens`)

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use std::time::Instant;
use support::*;

const SYSTEM: &str = "You are the assistant of a railway company. Answer questions about timetables, \
    fares, platforms and connections briefly and politely, and say so when you do not know.";

/// One user's conversation: `(prompt tokens, cached prompt tokens)` over its turns.
async fn conversation(
    http: reqwest::Client,
    url: String,
    model: String,
    user: usize,
    turns: usize,
    max_tokens: usize,
) -> (u64, u64) {
    let token = token("chat", "");
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    let (mut prompt, mut cached) = (0, 0);
    for turn in 0..turns {
        let question =
            format!("I am passenger {user}. Which platform does train {} leave from, and when?", 100 * user + turn);
        messages.push(json!({"role": "user", "content": question}));
        let body = json!({"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": messages});
        let r = http.post(format!("{url}/v1/chat/completions")).bearer_auth(&token).json(&body).send().await;
        let answer: Value = r.expect("the gateway answers").json().await.expect("json");
        let usage = &answer["usage"];
        prompt += usage["prompt_tokens"].as_u64().expect("usage");
        cached += usage["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
        let reply = answer["choices"][0]["message"]["content"].as_str().expect("an answer").to_string();
        messages.push(json!({"role": "assistant", "content": reply}));
    }
    (prompt, cached)
}

#[tokio::main]
async fn main() {
    let (users, turns, max_tokens) = (arg("--users", 8), arg("--turns", 6), arg("--max-tokens", 32));
    let queue_cost = arg("--queue-cost", switchyard_gateway::prefix::DEFAULT_QUEUE_COST_TOKENS).to_string();
    let kv_mib = arg("--kv-cache-mib", 0);
    let Some(model) = smollm2() else { return };
    let memory = match kv_mib {
        0 => "the default KV cache".to_string(),
        m => format!("a {m} MiB KV cache each (one backend alone: {} MiB)", 2 * m),
    };
    println!(
        "SmolLM2-135M-Instruct on the CPU, two backends (--max-running 8, {memory}) behind one gateway; \
         {users} users x {turns} turns, one system prompt, answers of up to {max_tokens} tokens"
    );
    println!("{:<22} {:>14} {:>14} {:>10} {:>10}", "routing", "prompt tokens", "cached tokens", "hit rate", "seconds");
    let mut rates = Vec::new();
    let by_prefix = ["--prefix-queue-cost-tokens", queue_cost.as_str()];
    let runs = [
        ("by cached prefix", 2, &by_prefix[..]),
        ("by load alone", 2, &["--no-prefix-routing"][..]),
        ("one backend (ceiling)", 1, &[][..]),
    ];
    for (name, count, flags) in runs {
        let kv = (kv_mib * 2 / count).to_string();
        let mut backend_flags = vec!["--max-running", "8"];
        if kv_mib > 0 {
            backend_flags.extend(["--kv-cache-mib", kv.as_str()]);
        }
        let backends: Vec<_> = (0..count).map(|_| start_backend_with(&model, &backend_flags, &[])).collect();
        let addrs: Vec<&str> = backends.iter().map(|b| b.addr.as_str()).collect();
        let dir = tempfile::tempdir().expect("state dir");
        let gw = gateway(dir.path(), &addrs, "[tenants.chat]\n", flags);
        let http = reqwest::Client::new();
        wait_ready(&http, &gw).await;
        let (_, models) = get(&http, &gw, "/v1/models", &token("chat", "")).await;
        let base = models["data"][0]["id"].as_str().expect("the base model").to_string();
        let started = Instant::now();
        let tasks: Vec<_> = (0..users)
            .map(|u| tokio::spawn(conversation(http.clone(), gw.url.clone(), base.clone(), u, turns, max_tokens)))
            .collect();
        let (mut prompt, mut cached) = (0, 0);
        for t in tasks {
            let (p, c) = t.await.expect("a conversation");
            prompt += p;
            cached += c;
        }
        let rate = cached as f64 / prompt.max(1) as f64;
        rates.push(rate);
        println!(
            "{name:<22} {prompt:>14} {cached:>14} {:>9.1}% {:>10.1}",
            100.0 * rate,
            started.elapsed().as_secs_f64()
        );
    }
    let load = rates[1].max(f64::MIN_POSITIVE);
    println!("hit rate / by load alone: by cached prefix {:.2}x, one backend {:.2}x", rates[0] / load, rates[2] / load);
}
