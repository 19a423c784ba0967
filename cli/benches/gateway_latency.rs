//! Gateway added latency: the same small generation sent straight to a backend's gRPC and
//! through the gateway's HTTP API (JWT verification, policy, routing, gRPC forwarding, OpenAI
//! response), interleaved in one run against one backend process, and the percentiles of both.
//!
//! `cargo bench -p switchyard --bench gateway_latency [-- --requests N --max-tokens N --stream]`

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::*;
use switchyard_proto::v1 as pb;

const SECRET: &[u8] = b"benchmark-secret-benchmark-secret-benchmark";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let requests = arg("--requests", 300);
    let max_tokens = arg("--max-tokens", 1) as u32;
    let stream = std::env::args().any(|a| a == "--stream");
    let backend = start_backend(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[tenants.bench]\nadapters = [\"bench/*\"]\nload_prefixes = [\"file://{}/\"]\n",
            fixtures().join("adapters").display()
        ),
    )
    .expect("config");
    let state = dir.path().join("state");
    let gw = start_gateway(
        &[&backend.addr],
        &[
            "--state-dir",
            &state.display().to_string(),
            "--config",
            &config.display().to_string(),
            "--jwt-hs256-secret-file",
            &secret.display().to_string(),
        ],
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"tenant": "bench", "scope": "lora:load", "exp": now + 3600});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET).expect("key");
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http.get(format!("{}/readyz", gw.url)).send().await.is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load_through_gateway(&http, &gw, &token, "bench/a", "r8-qv").await;

    let (mut client, _) = connect(&backend).await;
    let content = "Say hello";
    let direct_request = pb::GenerateRequest {
        adapter: "bench/a".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage { role: "user".into(), content: content.into() }],
            add_generation_prompt: true,
        })),
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_p: 1.0, ..Default::default() }),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };
    let body = json!({"model": "bench/a", "temperature": 0, "max_tokens": max_tokens, "stream": stream,
                      "messages": [{"role": "user", "content": content}]});
    let url = format!("{}/v1/chat/completions", gw.url);

    let mut direct = Vec::with_capacity(requests);
    let mut through = Vec::with_capacity(requests);
    let warmup = 20;
    for i in 0..warmup + requests {
        let t = Instant::now();
        collect(&mut client, direct_request.clone()).await.expect("direct generation");
        let d = t.elapsed();
        let t = Instant::now();
        let r = http.post(&url).bearer_auth(&token).json(&body).send().await.expect("gateway answers");
        assert!(r.status().is_success(), "gateway request failed: {}", r.status());
        r.bytes().await.expect("body");
        let g = t.elapsed();
        if i >= warmup {
            direct.push(d);
            through.push(g);
        }
    }
    direct.sort();
    through.sort();
    println!(
        "{requests} requests each way, interleaved; chat with adapter, max_tokens {max_tokens}, {}; one tiny-llama CPU backend",
        if stream { "streamed (SSE)" } else { "not streamed" }
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms");
    for (name, xs) in [("backend gRPC, direct", &direct), ("gateway HTTP -> backend gRPC", &through)] {
        println!(
            "{name:<34} {:>9.3} {:>9.3} {:>9.3}",
            ms(percentile(xs, 0.5)),
            ms(percentile(xs, 0.9)),
            ms(percentile(xs, 0.99))
        );
    }
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "gateway added",
        ms(percentile(&through, 0.5)) - ms(percentile(&direct, 0.5)),
        ms(percentile(&through, 0.9)) - ms(percentile(&direct, 0.9)),
        ms(percentile(&through, 0.99)) - ms(percentile(&direct, 0.99)),
    );
}
