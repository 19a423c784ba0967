//! The fleet's propagation times, on a real three-member etcd cluster, one backend and two
//! gateways (`switchyard` processes on loopback):
//! - an adapter load, and a policy activation, made through gateway A: from A's answer until
//!   gateway B serves it (B polled every millisecond);
//! - a backend registered with `--advertise-ttl-s T` and killed (SIGKILL): until the gateway's
//!   routing table no longer lists it.
//!
//! `cargo bench -p switchyard --bench fleet [-- --changes N --kills N --ttl S]`

// A benchmark, like a test, stops at the first thing that goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::etcd::EtcdCluster;
use support::*;

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[(((samples.len() - 1) as f64) * p).round() as usize].as_secs_f64() * 1e3;
    println!(
        "{what:<48} n={:<4} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms",
        samples.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Polls `check` every millisecond until it holds; how long that took.
async fn time_until(mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(30), "did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

async fn get(http: &reqwest::Client, gw: &Gateway, path: &str, token: &str) -> Value {
    let r = http.get(format!("{}{path}", gw.url)).bearer_auth(token).send().await.expect("answers");
    r.json().await.unwrap_or(Value::Null)
}

#[tokio::main]
async fn main() {
    let changes = arg("--changes", 50);
    let kills = arg("--kills", 5);
    let ttl = arg("--ttl", 2);
    let cluster = EtcdCluster::start(3).expect("etcd is installed (Debian: etcd-server)");
    let store = cluster.url("bench");
    let backend = start_backend(&[]);
    let adapters = fixtures().join("adapters");
    let tenants = format!(
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"file://{}/\"]\n[tenants.acme]\nadapters = [\"*\"]\n",
        adapters.display()
    );
    let GatewayPair { a, b, http, dirs: _dirs } = two_gateways(&[&backend.addr], &tenants, &["--store", &store]).await;
    let ops = token("ops", "lora:load lora:read lora:unload policy:deploy");
    let acme = token("acme", "");
    let uri = format!("file://{}", fixture_adapter("r8-qv").display());

    // Adapter loads: from A's 200 until B lists the adapter for acme.
    let mut loads = Vec::new();
    for i in 0..changes {
        let name = format!("bench/a{i}");
        let (status, v) = post(&http, &a, "/v1/loras", &ops, json!({"lora_name": name, "source": {"uri": uri}})).await;
        assert_eq!(status, 200, "{v}");
        loads.push(
            time_until(async || {
                let models = get(&http, &b, "/v1/models", &acme).await;
                models["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == name.as_str()))
            })
            .await,
        );
    }
    report("adapter load, A answered -> B lists it", loads);

    // Policy activations: from A's 200 until B routes by the new configuration.
    let wasm = std::fs::read(built_policies().join("tenant_map.wasm")).expect("built policy");
    let r =
        http.post(format!("{}/v1/policies?name=tenant-map", a.url)).bearer_auth(&ops).body(wasm).send().await.unwrap();
    let id = r.json::<Value>().await.unwrap()["policy"]["id"].as_str().unwrap().to_string();
    let mut activations = Vec::new();
    for i in 0..changes {
        let target = format!("bench/a{}", i % changes.max(1));
        let body = json!({"config": {"tenants": {"acme": target}}});
        let (status, v) = post(&http, &a, &format!("/v1/policies/{id}/activate"), &ops, body).await;
        assert_eq!(status, 200, "{v}");
        activations.push(
            time_until(async || {
                let r = http
                    .post(format!("{}/v1/completions", b.url))
                    .bearer_auth(&acme)
                    .json(&json!({"model": "anything", "prompt": "hi", "max_tokens": 1}))
                    .send()
                    .await
                    .unwrap();
                r.headers().get("x-switchyard-model").is_some_and(|m| m.as_bytes() == target.as_bytes())
            })
            .await,
        );
    }
    report("policy activation, A answered -> B routes by it", activations);

    // Killed backends: until the routing table (GET /v1/loras) no longer lists them.
    let mut gone = Vec::new();
    for _ in 0..kills {
        let listen = format!("127.0.0.1:{}", free_port());
        let advertise = format!("http://{listen}");
        let ttl_s = ttl.to_string();
        let extra = start_backend(&[
            "--listen",
            &listen,
            "--store",
            &store,
            "--advertise",
            &advertise,
            "--advertise-ttl-s",
            &ttl_s,
        ]);
        let listed = async || {
            let v = get(&http, &a, "/v1/loras", &ops).await;
            v["adapters"][0]["backends"]
                .as_array()
                .is_some_and(|bs| bs.iter().any(|x| x["backend"] == advertise.as_str()))
        };
        time_until(listed).await;
        drop(extra); // SIGKILL
        gone.push(time_until(async || !listed().await).await);
    }
    report(&format!("killed backend (lease TTL {ttl} s) -> out of the table"), gone);
}
