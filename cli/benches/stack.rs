//! The whole stack under load, as users run it: `switchyard up` on the CPU (one backend, one
//! gateway, tenant-map sending tenant acme to the `uppercase` adapter and globex to `french`)
//! and N concurrent streaming OpenAI clients, alternating between the two tenants, for each N;
//! every request generates exactly `--max-tokens` tokens (`ignore_eos`).
//! Prints, per level: generated tokens/s over the level's wall time, and time-to-first-token
//! p50/p99 (request sent → first content chunk).
//!
//! `cargo bench -p switchyard --bench stack [-- --levels 1,8,32 --requests 32 --max-tokens 64]`
//! (`--requests`: at least this many requests per level, at least 2 per client). Needs
//! SmolLM2-135M-Instruct (`scripts/fetch-smollm2`).

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::*;

const PROMPTS: [&str; 4] = [
    "Tell me about the city of Paris.",
    "Describe how a bicycle works.",
    "What do cats like to eat?",
    "Explain why the sky is blue.",
];

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main]
async fn main() {
    let levels: Vec<usize> = arg("--levels")
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(|l| l.trim().parse().expect("--levels: numbers"))
        .collect();
    let min_requests: usize = arg("--requests").map_or(32, |v| v.parse().expect("--requests: a number"));
    let max_tokens: u32 = arg("--max-tokens").map_or(64, |v| v.parse().expect("--max-tokens: a number"));
    if smollm2().is_none() {
        return;
    }
    let data = tempfile::tempdir().expect("data dir");
    let up = start_up(data.path(), &["--device", "cpu"]);
    let token = |name: &str| up.tokens.iter().find(|(n, _)| n == name).expect("token printed").1.clone();
    let tokens = [token("ACME_TOKEN"), token("GLOBEX_TOKEN")];
    let http = reqwest::Client::new();
    // Warm-up: both adapters, both code paths, once.
    for t in &tokens {
        stream_once(&http, &up.url, t, "assistant", PROMPTS[0], 8).await;
    }

    println!(
        "switchyard up on the CPU, SmolLM2-135M-Instruct, tenant-map over two tenants and two adapters; \
         streaming chat, {max_tokens} tokens per request (ignore_eos), temperature 0"
    );
    println!(
        "{:>8} {:>9} {:>12} {:>10} {:>14} {:>14}",
        "clients", "requests", "tokens/req", "tokens/s", "TTFT p50 ms", "TTFT p99 ms"
    );
    for &clients in &levels {
        let per_client = min_requests.div_ceil(clients).max(2);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (http, url, token) = (http.clone(), up.url.clone(), tokens[c % 2].clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..per_client {
                    out.push(
                        stream_once(&http, &url, &token, "assistant", PROMPTS[(c + i) % PROMPTS.len()], max_tokens)
                            .await,
                    );
                }
                out
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.extend(t.await.expect("client task"));
        }
        let wall = started.elapsed();
        let mut ttft: Vec<Duration> = results.iter().map(|r| r.0).collect();
        ttft.sort();
        let generated: u64 = results.iter().map(|r| r.1).sum();
        println!(
            "{clients:>8} {:>9} {:>12.1} {:>10.1} {:>14.1} {:>14.1}",
            results.len(),
            generated as f64 / results.len() as f64,
            generated as f64 / wall.as_secs_f64(),
            ms(percentile(&ttft, 0.5)),
            ms(percentile(&ttft, 0.99)),
        );
    }
    interrupt(up);
}
