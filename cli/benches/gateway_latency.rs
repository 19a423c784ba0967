//! Gateway added latency: the same small generation sent straight to a backend's gRPC and
//! through the gateway's HTTP API (JWT verification, policy, routing, gRPC forwarding, OpenAI
//! response), interleaved in one run against one backend process, and the percentiles of both;
//! with the machine's floor beside them (a round trip that does no work, over HTTP to the
//! gateway and over gRPC to the backend), since the gateway's path has one hop more.
//! With `--tls` both paths go over mutual TLS with the backend credential, as in a deployment.
//!
//! `cargo bench -p switchyard --bench gateway_latency [-- --requests N --max-tokens N --stream --tls]`

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::backend_client::BackendClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CREDENTIAL: &str = "benchmark-backend-credential-0123456789";

const SECRET: &[u8] = b"benchmark-secret-benchmark-secret-benchmark";

#[tokio::main]
async fn main() {
    let requests = arg("--requests", 300);
    let max_tokens = arg("--max-tokens", 1) as u32;
    let stream = std::env::args().any(|a| a == "--stream");
    let tls = std::env::args().any(|a| a == "--tls");
    let pki = TestPki::new();
    let credential = pki.dir.path().join("credential");
    std::fs::write(&credential, CREDENTIAL).expect("credential");
    let path = |p: &std::path::Path| p.display().to_string();
    let (cert, key, ca, cred) = (path(&pki.server_cert), path(&pki.server_key), path(&pki.ca), path(&credential));
    let backend_flags: Vec<&str> = if tls {
        vec!["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--credential-file", &cred]
    } else {
        Vec::new()
    };
    let backend = start_backend(&backend_flags);
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[tenants.bench]\nadapters = [\"bench/*\"]\nmanage = [\"bench/*\"]\nload_prefixes = [\"file://{}/\"]\n",
            fixtures().join("adapters").display()
        ),
    )
    .expect("config");
    let state = dir.path().join("state");
    let (client_cert, client_key) = (path(&pki.client_cert), path(&pki.client_key));
    let (state, config, secret) = (path(&state), path(&config), path(&secret));
    let mut gateway_flags = vec!["--state-dir", &state, "--config", &config, "--jwt-hs256-secret-file", &secret];
    let address = if tls { format!("https://{}", backend.addr) } else { backend.addr.clone() };
    if tls {
        gateway_flags.extend(["--backend-ca-file", &ca, "--backend-client-cert", &client_cert]);
        gateway_flags.extend(["--backend-client-key", &client_key, "--backend-credential-file", &cred]);
    }
    let gw = start_gateway(&[&address], &gateway_flags);
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

    let endpoint = Channel::from_shared(format!("{}://{}", if tls { "https" } else { "http" }, backend.addr)).unwrap();
    let endpoint = if tls {
        let read = |p: &std::path::Path| std::fs::read(p).expect("pki file");
        endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(&pki.ca)))
                    .identity(Identity::from_pem(read(&pki.client_cert), read(&pki.client_key))),
            )
            .unwrap()
    } else {
        endpoint
    };
    let mut client = BackendClient::new(endpoint.tcp_nodelay(true).connect().await.expect("connects"));
    let content = "Say hello";
    let direct_request = pb::GenerateRequest {
        adapter: "bench/a".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage { role: "user".into(), content: content.into(), ..Default::default() }],
            add_generation_prompt: true,
            ..Default::default()
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
    // The floors: a round trip that does no work, to each server. The gateway's path has one
    // more hop than the direct one (client to gateway), so what it adds is that hop's round
    // trip plus the gateway's own work.
    let (mut http_floor, mut grpc_floor) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
    let healthz = format!("{}/healthz", gw.url);
    let warmup = 20;
    for i in 0..warmup + requests {
        let t = Instant::now();
        http.get(&healthz).send().await.expect("healthz").bytes().await.expect("body");
        let h = t.elapsed();
        let t = Instant::now();
        let mut request = tonic::Request::new(pb::InfoRequest {});
        if tls {
            request.metadata_mut().insert("authorization", format!("Bearer {CREDENTIAL}").parse().unwrap());
        }
        client.info(request).await.expect("info");
        let g = t.elapsed();
        if i >= warmup {
            http_floor.push(h);
            grpc_floor.push(g);
        }
        let t = Instant::now();
        let mut request = tonic::Request::new(direct_request.clone());
        if tls {
            request.metadata_mut().insert("authorization", format!("Bearer {CREDENTIAL}").parse().unwrap());
        }
        let mut answer = client.generate(request).await.expect("direct generation").into_inner();
        while answer.message().await.expect("direct generation").is_some() {}
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
    for xs in [&mut direct, &mut through, &mut http_floor, &mut grpc_floor] {
        xs.sort();
    }
    println!(
        "{requests} requests each way, interleaved; chat with adapter, max_tokens {max_tokens}, {}; one tiny-llama CPU backend{}",
        if stream { "streamed (SSE)" } else { "not streamed" },
        if tls { "; gRPC over mutual TLS with the credential" } else { "" }
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "p50 ms", "p90 ms", "p99 ms");
    for (name, xs) in [
        ("backend gRPC, direct", &direct),
        ("gateway HTTP -> backend gRPC", &through),
        ("gRPC round trip, no work (Info)", &grpc_floor),
        ("HTTP round trip, no work (/healthz)", &http_floor),
    ] {
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
    let p50 = |xs: &[Duration]| ms(percentile(xs, 0.5));
    println!("{:<34} {:>9.3}", "added, less the HTTP round trip", p50(&through) - p50(&direct) - p50(&http_floor));
}
