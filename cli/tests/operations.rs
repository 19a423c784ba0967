//! What operators see of a running stack: real `switchyard backend` and `switchyard gateway`
//! processes, the backend's Prometheus metrics as requests and loads happen, and what the
//! backend and the gateway say when an engine fails (faults injected through the executor seam
//! in test builds: `SWITCHYARD_FAULTS_FILE`, see `backend/src/engine/faults.rs`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;
use switchyard_proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// A tiny-llama backend whose executor fails as `faults` (a file) says.
fn faulty_backend(faults: &Path) -> Backend {
    let model = fixtures().join("models/tiny-llama");
    start_backend_with(&model, &[], &[("SWITCHYARD_FAULTS_FILE", faults.display().to_string())])
}

async fn serving(backend: &Backend) -> ServingStatus {
    let (_, mut health) = connect(backend).await;
    health.check(HealthCheckRequest { service: String::new() }).await.expect("health answers").into_inner().status()
}

/// Fails `fault` into the backend's next forward pass and drives one there directly; returns
/// what the backend's own health check and `Info` say then, at once.
async fn break_backend(backend: &Backend, faults: &Path, fault: &str) -> (ServingStatus, String) {
    std::fs::write(faults, fault).unwrap();
    let (mut client, _) = connect(backend).await;
    let err = collect(&mut client, greedy(&[1, 2, 3], "", 4)).await.expect_err("the generation fails");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let info = client.info(pb::InfoRequest {}).await.expect("Info still answers").into_inner();
    (serving(backend).await, info.not_serving_reason)
}

#[tokio::test]
async fn an_engine_that_dies_or_a_device_that_faults_stops_serving_and_the_gateway_routes_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let (panics, faults) = (dir.path().join("panics"), dir.path().join("faults"));
    let (a, b, healthy) = (faulty_backend(&panics), faulty_backend(&faults), start_backend(&[]));
    let gw = gateway(dir.path(), &[&a.addr, &b.addr, &healthy.addr], "[tenants.acme]\n", &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let acme = token("acme", "lora:read");
    for backend in [&a, &b, &healthy] {
        assert_eq!(serving(backend).await, ServingStatus::Serving);
    }

    // The engine thread of a dies (a bug); the device of b faults. Each says so at once.
    let (status, why) = break_backend(&a, &panics, "panic").await;
    assert_eq!(status, ServingStatus::NotServing);
    assert!(why.contains("the engine thread panicked: injected fault"), "{why}");
    let (status, why) = break_backend(&b, &faults, "device-fault").await;
    assert_eq!(status, ServingStatus::NotServing);
    assert!(why.contains("the device failed during a forward pass: injected fault: illegal address"), "{why}");
    // A device fault is sticky: clearing it does not bring the backend back.
    std::fs::write(&faults, "").unwrap();
    assert_eq!(serving(&b).await, ServingStatus::NotServing);

    // Within a probe (200 ms here) the gateway stops routing there and says why.
    let started = Instant::now();
    let reasons = loop {
        let (s, listed) = get(&http, &gw, "/v1/loras", &acme).await;
        assert_eq!(s, 200, "{listed}");
        let reasons = backend_reasons(&listed);
        if reasons.len() == 2 {
            break reasons;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the gateway still routes to a failed backend: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(reasons.iter().any(|r| r.contains("NOT_SERVING: the engine thread panicked")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("NOT_SERVING: the device failed")), "{reasons:?}");
    for _ in 0..12 {
        let (s, v) = post(&http, &gw, "/v1/chat/completions", &acme, chat("tiny-llama", "hello")).await;
        assert_eq!(s, 200, "served by the healthy backend: {v}");
    }

    // With the healthy one gone too, /readyz answers 503 and names each backend's trouble.
    drop(healthy);
    let started = Instant::now();
    let body = loop {
        let r = http.get(format!("{}/readyz", gw.url)).send().await.unwrap();
        if r.status() == 503 {
            break r.json::<Value>().await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the gateway stays ready without a healthy backend");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{}: backend reports NOT_SERVING: the engine thread panicked", a.addr)),
        "{message}"
    );
    assert!(message.contains(&format!("{}: backend reports NOT_SERVING: the device failed", b.addr)), "{message}");
}

/// Every `unhealthy_reason` the adapter listing reports for the gateway's backends.
fn backend_reasons(listed: &Value) -> Vec<String> {
    listed["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["unhealthy_reason"].as_str().map(str::to_string))
        .collect()
}

/// How much `series` grew from `before` to `after`.
fn grew(before: &Samples, after: &Samples, series: &str) -> f64 {
    at(after, series) - at(before, series)
}

/// Chat through the gateway as `token`; `stream` reads one chunk and goes away.
async fn chat_as(http: &reqwest::Client, gw: &Gateway, token: &str, model: &str, stream: bool) -> u16 {
    let mut body = chat(model, "Tell me about the sea");
    if stream {
        body["stream"] = json!(true);
        body["max_tokens"] = json!(100);
    }
    let mut r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers");
    let status = r.status().as_u16();
    if stream {
        r.chunk().await.expect("a first chunk");
    } else {
        r.bytes().await.expect("the whole answer");
    }
    status
}

#[tokio::test]
async fn the_backends_metrics_move_as_requests_and_loads_happen() {
    let Some(s3) = S3Server::start() else { return };
    let s3_uri = s3.put_fixture("loras", "acme/a", "r8-qv");
    let model = fixtures().join("models/tiny-llama");
    let flags = ["--metrics-listen", "127.0.0.1:0", "--max-loras", "1"];
    let backend = start_backend_with(&model, &flags, &s3.env(&s3.endpoint));
    let dir = tempfile::tempdir().unwrap();
    let tenants = format!(
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"s3://loras/\", \"file://{}/\"]\n\n\
         [tenants.acme]\nadapters = [\"acme/*\"]\n",
        fixtures().join("adapters").display()
    );
    let gw = gateway(dir.path(), &[&backend.addr], &tenants, &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let (ops, acme) = (token("ops", "lora:load lora:read"), token("acme", ""));
    let before = scrape(&http, &backend).await;
    assert_eq!(at(&before, "switchyard_backend_adapter_slots"), 1.0);
    assert!(at(&before, "switchyard_backend_kv_cache_blocks") > 0.0);
    assert_eq!(at(&before, "vllm:num_requests_running"), 0.0);

    // Loads: a from S3 (a cache miss), b from a file, which takes a's only slot; then a request
    // for a loads it again, from the cache.
    load_uri_through_gateway(&http, &gw, &ops, "acme/a", &s3_uri).await;
    load_through_gateway(&http, &gw, &ops, "acme/b", "r4-patterns").await;
    for model in ["acme/a", "acme/a", "tiny-llama"] {
        assert_eq!(chat_as(&http, &gw, &acme, model, false).await, 200);
    }
    // A stream whose client goes away after its first chunk, and a request the backend refuses.
    assert_eq!(chat_as(&http, &gw, &acme, "acme/b", true).await, 200);
    let (mut client, _) = connect(&backend).await;
    let mut refused = greedy(&[1, 2, 3], "acme/nowhere", 2);
    refused.tenant = "acme".into();
    assert!(collect(&mut client, refused).await.is_err());

    let cancelled = "switchyard_backend_requests_total{tenant=\"acme\",outcome=\"cancelled\"}";
    let started = Instant::now();
    let after = loop {
        let now = scrape(&http, &backend).await;
        if at(&now, cancelled) >= 1.0 && at(&now, "switchyard_backend_requests_running") == 0.0 {
            break now;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the stream was never counted cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let acme_requests =
        |outcome: &str| format!("switchyard_backend_requests_total{{tenant=\"acme\",outcome=\"{outcome}\"}}");
    assert_eq!(grew(&before, &after, &acme_requests("finished")), 3.0);
    assert_eq!(grew(&before, &after, &acme_requests("refused")), 1.0);
    let refusal = "switchyard_backend_request_refusals_total{tenant=\"acme\",reason=\"unknown_adapter\"}";
    assert_eq!(grew(&before, &after, refusal), 1.0, "{after:#?}");
    // Every request that started waited for admission once, however long.
    let waits = "switchyard_backend_queue_wait_seconds_count{tenant=\"acme\"}";
    assert_eq!(grew(&before, &after, waits), 4.0, "{after:#?}");
    assert_eq!(grew(&before, &after, cancelled), 1.0);
    let tokens = |kind: &str| format!("switchyard_backend_tokens_total{{tenant=\"acme\",kind=\"{kind}\"}}");
    assert!(grew(&before, &after, &tokens("generated")) >= 4.0, "{after:?}");
    assert!(grew(&before, &after, &tokens("prompt")) >= 3.0);
    assert!(grew(&before, &after, "switchyard_backend_time_to_first_token_seconds_count") >= 4.0);
    assert!(grew(&before, &after, "switchyard_backend_step_duration_seconds_count") >= 4.0);

    assert_eq!(grew(&before, &after, "switchyard_backend_adapter_loads_total{result=\"loaded\"}"), 4.0, "a, b, a, b");
    for phase in ["fetch", "validate", "place"] {
        let series = format!("switchyard_backend_adapter_load_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(grew(&before, &after, &series), 4.0, "{phase}");
    }
    assert_eq!(grew(&before, &after, "switchyard_backend_adapter_slot_evictions_total"), 3.0);
    assert_eq!(grew(&before, &after, "switchyard_backend_adapter_cache_misses_total"), 1.0);
    assert_eq!(grew(&before, &after, "switchyard_backend_adapter_cache_hits_total"), 1.0);
    assert!(at(&after, "switchyard_backend_adapter_cache_bytes{state=\"pinned\"}") > 0.0);

    // Each adapter's residency: b holds the slot; a waits in the cache, its files pinned.
    let adapter = |name: &str, state: &str, residency: &str, rank: u32, pinned: bool| {
        format!(
            "switchyard_backend_adapter{{adapter=\"{name}\",state=\"{state}\",residency=\"{residency}\",rank=\"{rank}\",pinned=\"{pinned}\"}}"
        )
    };
    assert_eq!(at(&after, &adapter("acme/b", "resident", "device", 12, false)), 1.0, "{after:#?}");
    assert_eq!(at(&after, &adapter("acme/a", "evicted", "disk", 8, true)), 1.0, "{after:#?}");
    assert_eq!(at(&after, "switchyard_backend_adapter_slots_used"), 1.0);
    assert_eq!(at(&after, "switchyard_backend_kv_cache_blocks_used"), 0.0);
    let lora_info = after.keys().find(|k| k.starts_with("vllm:lora_requests_info{")).expect("vLLM's LoRA series");
    assert!(lora_info.contains("max_lora=\"1\""), "{lora_info}");
}

#[tokio::test]
async fn a_first_token_that_never_comes_is_answered_504_and_the_request_is_cancelled_on_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let model = fixtures().join("models/tiny-llama");
    let env = [("SWITCHYARD_FAULTS_FILE", faults.display().to_string())];
    let backend = start_backend_with(&model, &["--metrics-listen", "127.0.0.1:0"], &env);
    let gw = gateway(dir.path(), &[&backend.addr], "[tenants.acme]\n", &["--first-token-timeout-ms", "500"]);
    // Without the gateway's deadline the request would wait as long as the stall: fail instead.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    wait_ready(&http, &gw).await;
    let acme = token("acme", "");
    let before = scrape(&http, &backend).await;

    // The engine wedges in its next forward pass.
    std::fs::write(&faults, "stall").unwrap();
    let started = Instant::now();
    let (status, body) = post(&http, &gw, "/v1/chat/completions", &acme, chat("tiny-llama", "hello")).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "first_token_timeout", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("500 ms"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());

    // Unwedged, the backend finds its caller gone and drops the request: it is counted
    // cancelled, never finished.
    std::fs::write(&faults, "").unwrap();
    let cancelled = "switchyard_backend_requests_total{tenant=\"acme\",outcome=\"cancelled\"}";
    let finished = "switchyard_backend_requests_total{tenant=\"acme\",outcome=\"finished\"}";
    let started = Instant::now();
    let after = loop {
        let now = scrape(&http, &backend).await;
        if grew(&before, &now, cancelled) >= 1.0 && at(&now, "switchyard_backend_requests_running") == 0.0 {
            break now;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the backend never dropped the request: {now:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(grew(&before, &after, cancelled), 1.0);
    assert_eq!(grew(&before, &after, finished), 0.0);
    assert!(grew(&before, &after, "switchyard_backend_tokens_total{tenant=\"acme\",kind=\"generated\"}") <= 1.0);
    // And the backend serves the next request as usual.
    let (status, body) = post(&http, &gw, "/v1/chat/completions", &acme, chat("tiny-llama", "hello")).await;
    assert_eq!(status, 200, "{body}");
}
