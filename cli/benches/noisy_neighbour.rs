//! A noisy neighbour: tenant B's time to first token alone, then while tenant A floods the same
//! gateway and backend at ten times B's rate. A has a quota (`requests_per_minute`, and
//! `concurrent_requests`), so past it A gets 429s; what A is admitted shares the backend with B
//! through the backend's fair scheduler. SmolLM2-135M-Instruct on the CPU, one backend, one
//! gateway, real processes.
//!
//! B sends one streamed request every 1/`--rate` seconds (default 2 a second) for `--seconds`
//! (default 20) in each phase; A sends ten times as many, unstreamed, in the second. Prints B's
//! time to first token (p50, p90, p99) in each phase and their ratio, and what A got (served,
//! refused and why; every refusal checked for its `Retry-After` and `x-ratelimit-*` headers).
//!
//! `cargo bench -p switchyard --bench noisy_neighbour [-- --rate 2 --seconds 20 --a-rpm 120 --a-concurrency 4]`

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::*;

const MAX_TOKENS: u32 = 16;
const PROMPTS: [&str; 4] = [
    "Tell me about the city of Paris.",
    "Describe how a bicycle works.",
    "What do cats like to eat?",
    "Explain why the sky is blue.",
];

/// B's requests for `seconds`, one every `every`: their times to first token, sorted.
async fn tenant_b(http: &reqwest::Client, url: &str, model: &str, every: Duration, seconds: u64) -> Vec<Duration> {
    let token = token("b", "");
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(every);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0;
    while Instant::now() < until {
        tick.tick().await;
        let (http, url, token, model) = (http.clone(), url.to_string(), token.clone(), model.to_string());
        let prompt = PROMPTS[i % PROMPTS.len()];
        i += 1;
        tasks.push(tokio::spawn(async move { stream_once(&http, &url, &token, &model, prompt, MAX_TOKENS).await.0 }));
    }
    let mut ttft = Vec::new();
    for t in tasks {
        ttft.push(t.await.expect("every request of B is served"));
    }
    ttft.sort();
    ttft
}

/// A's flood: `(served, refused by code)`.
async fn tenant_a(http: &reqwest::Client, url: &str, model: &str, every: Duration, seconds: u64) -> (u64, Vec<String>) {
    let token = token("a", "");
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(every);
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tick.tick().await;
        let (http, url, token) = (http.clone(), url.to_string(), token.clone());
        let body = json!({"model": model, "max_tokens": MAX_TOKENS, "ignore_eos": true, "temperature": 0,
                          "messages": [{"role": "user", "content": PROMPTS[0]}]});
        tasks.push(tokio::spawn(async move {
            let r = http.post(format!("{url}/v1/chat/completions")).bearer_auth(token).json(&body).send().await;
            let r = r.expect("the gateway answers");
            let status = r.status().as_u16();
            if status == 429 {
                for h in ["retry-after", "retry-after-ms"] {
                    assert!(r.headers().contains_key(h), "a 429 without {h}");
                }
            }
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            match status {
                200 => None,
                429 => Some(body["error"]["code"].as_str().unwrap_or("?").to_string()),
                other => panic!("A got {other}: {body}"),
            }
        }));
    }
    let (mut served, mut refused) = (0, Vec::new());
    for t in tasks {
        match t.await.expect("A's request") {
            None => served += 1,
            Some(code) => refused.push(code),
        }
    }
    (served, refused)
}

#[tokio::main]
async fn main() {
    let rate = arg("--rate", 2) as u64;
    let seconds = arg("--seconds", 20) as u64;
    let (a_rpm, a_concurrency) = (arg("--a-rpm", 60 * rate as usize), arg("--a-concurrency", 4));
    let Some(model) = smollm2() else { return };
    let backend = start_backend_with(&model, &["--max-running", "8"], &[]);
    let dir = tempfile::tempdir().expect("state dir");
    let tenants = format!(
        "[tenants.a]\n[tenants.a.quota]\nrequests_per_minute = {a_rpm}\nconcurrent_requests = {a_concurrency}\n[tenants.b]\n"
    );
    let gw = gateway(dir.path(), &[&backend.addr], &tenants, &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let (_, models) = get(&http, &gw, "/v1/models", &token("b", "")).await;
    let base = models["data"][0]["id"].as_str().expect("the base model").to_string();
    stream_once(&http, &gw.url, &token("b", ""), &base, PROMPTS[0], 4).await; // warm-up

    let every = Duration::from_secs_f64(1.0 / rate as f64);
    println!(
        "SmolLM2-135M-Instruct on the CPU (--max-running 8), one gateway; B: {rate} streamed requests/s, A: {} requests/s \
         (quota: {a_rpm} requests/min, {a_concurrency} at once); {MAX_TOKENS} tokens each; {seconds} s per phase",
        10 * rate
    );
    let alone = tenant_b(&http, &gw.url, &base, every, seconds).await;
    let (flooded, (served, refused)) = tokio::join!(
        tenant_b(&http, &gw.url, &base, every, seconds),
        tenant_a(&http, &gw.url, &base, every / 10, seconds)
    );
    println!("{:<28} {:>9} {:>10} {:>10} {:>10}", "B's time to first token", "requests", "p50 ms", "p90 ms", "p99 ms");
    for (name, t) in [("alone", &alone), ("while A floods", &flooded)] {
        println!(
            "{name:<28} {:>9} {:>10.1} {:>10.1} {:>10.1}",
            t.len(),
            ms(percentile(t, 0.5)),
            ms(percentile(t, 0.9)),
            ms(percentile(t, 0.99))
        );
    }
    println!(
        "p99 while A floods / alone: {:.2}x (p50 {:.2}x)",
        ms(percentile(&flooded, 0.99)) / ms(percentile(&alone, 0.99)),
        ms(percentile(&flooded, 0.5)) / ms(percentile(&alone, 0.5))
    );
    let count = |code: &str| refused.iter().filter(|c| *c == code).count();
    println!(
        "A: {} sent, {served} served, {} refused ({} rate_limit_exceeded, {} concurrency_limit_exceeded)",
        served as usize + refused.len(),
        refused.len(),
        count("rate_limit_exceeded"),
        count("concurrency_limit_exceeded")
    );
}
