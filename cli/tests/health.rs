//! What operators and the gateway see when a backend's engine fails: real `switchyard backend`
//! processes with faults injected through the executor seam (test builds only:
//! `SWITCHYARD_FAULTS_FILE`, see `backend/src/engine/faults.rs`) and a real gateway in front.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::Value;
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
