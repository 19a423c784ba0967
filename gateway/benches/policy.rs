//! Policy cost per request: the `tenant-map` component against the built-in static policy
//! doing the same mapping (acme's `support` → `acme/support`), interleaved in one run; then the
//! same component's latency for tenant acme while tenant evil's policy loops until its fuel
//! runs out on every request, back to back; and the time the default fuel lets a loop run.
//!
//! `cargo bench -p switchyard-gateway --bench policy [-- --requests N --yield-fuel N]`

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops at the first failure

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use switchyard_gateway::loras::LoraStore;
use switchyard_gateway::policy::deploy::PolicyStore;
use switchyard_gateway::policy::wasm::{PolicyRuntime, WasmLimits};
use switchyard_gateway::policy::{Endpoint, HostView, PolicyEngine, PolicyInput, StaticPolicy, WasmPolicies};
use switchyard_gateway::tenants::GatewayFile;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn built(name: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/build-policies")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(format!("{name}.wasm"))).unwrap()
}

async fn time(engine: &dyn PolicyEngine, input: &PolicyInput<'_>) -> Duration {
    let t = Instant::now();
    engine.decide(input).await.unwrap();
    t.elapsed()
}

fn row(name: &str, xs: &mut [Duration]) -> (f64, f64) {
    xs.sort();
    let (p50, p99) = (percentile(xs, 0.5), percentile(xs, 0.99));
    println!("{name:<52} {p50:>10.1} {p99:>10.1}");
    (p50, p99)
}

#[tokio::main]
async fn main() {
    // On a worker thread, as the gateway's request handlers run.
    tokio::spawn(bench()).await.unwrap();
}

async fn bench() {
    let requests = arg("--requests", 2000);
    let file: GatewayFile = toml::from_str(
        "[tenants.acme]\nadapters = [\"acme/*\"]\n[tenants.acme.models]\nsupport = \"acme/support\"\n\
         [tenants.evil]\nadapters = [\"evil/*\"]\n",
    )
    .unwrap();
    let tenants = Arc::new(file.tenants);
    let builtin = StaticPolicy::new(tenants.clone());
    let dir = tempfile::tempdir().unwrap();
    let limits = WasmLimits { yield_fuel: arg("--yield-fuel", 0).try_into().unwrap(), ..Default::default() };
    let limits = if limits.yield_fuel == 0 { WasmLimits::default() } else { limits };
    let runtime = Arc::new(PolicyRuntime::new(limits).unwrap());
    let replica = LoraStore::open_dir(dir.path()).await.unwrap().replica().clone();
    let store = PolicyStore::open(replica, runtime, Default::default()).await.unwrap();
    let map = store.upload("tenant-map", built("tenant_map"), "ops").await.unwrap();
    store.activate("acme", &map.id, serde_json::json!({"tenants": {"acme": "acme/support"}})).await.unwrap();
    let hostile = store.upload("hostile", built("hostile"), "ops").await.unwrap();
    store.activate("evil", &hostile.id, serde_json::json!({"mode": "loop", "only_live": true})).await.unwrap();
    let wasm = Arc::new(WasmPolicies::new(store, Arc::new(builtin.clone())));

    let scopes = BTreeSet::new();
    let claims = serde_json::Map::new();
    let input = |tenant: &'static str| PolicyInput {
        tenant,
        subject: Some("user-1"),
        scopes: &scopes,
        claims: &claims,
        endpoint: Endpoint::ChatCompletions,
        model: "support",
        base_model: "base",
        stream: false,
        max_tokens: Some(64),
        prompt_chars: 120,
        headers: Vec::new(),
        backends: Vec::new(),
        adapters: vec![("acme/support".into(), "acme".into())],
        prefix: None,
        features: Default::default(),
    };
    let acme = input("acme");
    assert_eq!(builtin.decide(&acme).await.unwrap(), wasm.decide(&acme).await.unwrap(), "same mapping");

    // The same component and configuration, instantiated at the call: the whole cost of a
    // decision, which requests pay only off their path (see `wasm::Deployment`).
    let runtime = wasm.store().runtime().clone();
    let compiled = runtime.compile(&built("tenant_map")).unwrap();
    let acme_request = switchyard_gateway::policy::wasm::request(&acme);
    let config: Arc<str> = Arc::from(r#"{"tenants": {"acme": "acme/support"}}"#);
    let inline = async || {
        let t = Instant::now();
        runtime
            .decide(&compiled, &acme_request, HostView::default(), config.clone(), Arc::from("inline"))
            .await
            .unwrap();
        t.elapsed()
    };
    for _ in 0..100 {
        time(&builtin, &acme).await;
        time(wasm.as_ref(), &acme).await;
        inline().await;
        tokio::task::yield_now().await;
    }
    let (mut s, mut w, mut c) = (Vec::with_capacity(requests), Vec::with_capacity(requests), Vec::new());
    for _ in 0..requests {
        s.push(time(&builtin, &acme).await);
        w.push(time(wasm.as_ref(), &acme).await);
        c.push(inline().await);
        // Where a request would wait for its backend: work the decision left runs here.
        tokio::task::yield_now().await;
    }
    println!(
        "{requests} decisions each, interleaved, one at a time (tenant-map vs the static policy); {} fuel between yields",
        wasm.store().runtime().limits().yield_fuel
    );
    println!("{:<52} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    let (s50, s99) = row("built-in static policy", &mut s);
    let (w50, w99) = row("tenant-map component, as requests run it", &mut w);
    row("tenant-map, instantiated and dropped in the call", &mut c);
    println!("{:<52} {:>10.1} {:>10.1}", "added to a request by the component", w50 - s50, w99 - s99);

    // How long the default fuel lets an endless loop run before it is stopped.
    // (On the runtime itself: through the engine, evil's breaker would open after three.)
    let looping = wasm.store().active_for("evil").unwrap();
    let evil_request = switchyard_gateway::policy::wasm::request(&PolicyInput { tenant: "evil", ..acme.clone() });
    let mut stopped = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let outcome = looping.deployment.decide(&evil_request, HostView::default()).await;
        assert!(outcome.is_err(), "the loop must be stopped");
        stopped.push(t.elapsed());
    }
    let (loop50, _) = row("an endless loop, until its fuel runs out", &mut stopped);

    // Tenant evil's policy loops until its fuel runs out on every request, back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let ran = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (wasm, stop, attacks, ran) = (wasm.clone(), stop.clone(), attacks.clone(), ran.clone());
        tokio::spawn(async move {
            let (scopes, claims) = (BTreeSet::new(), serde_json::Map::new());
            while !stop.load(Ordering::Relaxed) {
                let evil = PolicyInput {
                    tenant: "evil",
                    subject: None,
                    scopes: &scopes,
                    claims: &claims,
                    endpoint: Endpoint::ChatCompletions,
                    model: "x",
                    base_model: "base",
                    stream: false,
                    max_tokens: None,
                    prompt_chars: 1,
                    headers: Vec::new(),
                    backends: Vec::new(),
                    adapters: Vec::new(),
                    prefix: None,
                    features: Default::default(),
                };
                let t = Instant::now();
                assert!(wasm.decide(&evil).await.is_err(), "the attack must fail");
                attacks.fetch_add(1, Ordering::Relaxed);
                // A call that took most of a loop's run ran it; the rest were refused by the
                // breaker without running.
                if t.elapsed() >= Duration::from_secs_f64(loop50 * 0.5e-6) {
                    ran.fetch_add(1, Ordering::Relaxed);
                }
                // Between requests, as a request task waits for its client and its backend.
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut under = Vec::with_capacity(requests);
    for _ in 0..requests {
        under.push(time(wasm.as_ref(), &acme).await);
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    attacker.await.unwrap();
    let (_, a99) = row("tenant-map while evil's policy loops", &mut under);
    println!(
        "attack: {} requests of evil's, {} of them ran out of fuel (the rest were refused by the breaker); \
         acme p99 under attack / normal = {:.2}",
        attacks.load(Ordering::Relaxed),
        ran.load(Ordering::Relaxed),
        a99 / w99
    );
}
