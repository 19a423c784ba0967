//! The shared state a fleet of gateways runs on, against the real thing: the directory store
//! and a three-member etcd cluster started by the test. Two handles on one store stand for two
//! gateway processes.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::etcd::EtcdCluster;
use support::*;
use switchyard_gateway::store::{self, Expect, Location, Replica, StateStore, StoreError, Write};

/// Two handles on one store, and what keeps it alive.
struct Shared {
    name: &'static str,
    a: Arc<dyn StateStore>,
    b: Arc<dyn StateStore>,
    _dir: Option<tempfile::TempDir>,
    etcd: Option<EtcdCluster>,
}

async fn file_store() -> Shared {
    let dir = tempfile::tempdir().expect("dir");
    let loc = Location::Dir(dir.path().to_path_buf());
    let a = store::open(&loc, &store::EtcdAccess::default()).await.expect("opens");
    let b = store::open(&loc, &store::EtcdAccess::default()).await.expect("opens");
    Shared { name: "dir", a, b, _dir: Some(dir), etcd: None }
}

async fn etcd_store(prefix: &str) -> Option<Shared> {
    let cluster = EtcdCluster::start(3)?;
    let loc: Location = cluster.url(prefix).parse().expect("parses");
    let a = store::open(&loc, &store::EtcdAccess::default()).await.expect("connects");
    let b = store::open(&loc, &store::EtcdAccess::default()).await.expect("connects");
    Some(Shared { name: "etcd", a, b, _dir: None, etcd: Some(cluster) })
}

async fn every_store(prefix: &str) -> Vec<Shared> {
    let mut all = vec![file_store().await];
    all.extend(etcd_store(prefix).await);
    all
}

/// Polls `check` until it holds or `within` passes.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn value(r: &Replica, key: &str) -> Option<String> {
    r.current().entries.get(key).map(|e| e.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_writers_that_read_the_same_revision_exactly_one_wins() {
    for s in every_store("cas").await {
        let name = s.name;
        let r1 = s.a.commit(vec![Write::put("loras/a", Expect::Absent, "1")]).await.expect("created");
        let again = s.b.commit(vec![Write::put("loras/a", Expect::Absent, "2")]).await;
        assert_eq!(again, Err(StoreError::Conflict { key: "loras/a".into() }), "{name}: a second create");

        let seen = s.b.snapshot().await.expect("reads");
        assert_eq!(seen.expect("loras/a"), Expect::At(r1), "{name}");
        let (x, y) = tokio::join!(
            s.a.commit(vec![Write::put("loras/a", Expect::At(r1), "from-a")]),
            s.b.commit(vec![Write::put("loras/a", Expect::At(r1), "from-b")]),
        );
        let winner = match (&x, &y) {
            (Ok(_), Err(StoreError::Conflict { key })) if key == "loras/a" => "from-a",
            (Err(StoreError::Conflict { key }), Ok(_)) if key == "loras/a" => "from-b",
            other => panic!("{name}: expected one winner and one conflict, got {other:?}"),
        };
        let after = s.a.snapshot().await.expect("reads");
        assert_eq!(after.entries.get("loras/a").map(|e| e.value.as_str()), Some(winner), "{name}");

        // A transaction is all or nothing: the stale write stops the fresh one with it.
        let both =
            s.b.commit(vec![Write::put("loras/b", Expect::Absent, "new"), Write::delete("loras/a", Expect::At(r1))]);
        assert_eq!(both.await, Err(StoreError::Conflict { key: "loras/a".into() }), "{name}");
        let after = s.b.snapshot().await.expect("reads");
        assert!(!after.entries.contains_key("loras/b"), "{name}: half a transaction was applied");
        assert!(after.entries.contains_key("loras/a"), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_what_another_gateway_writes_and_reads_its_own_writes() {
    for s in every_store("follow").await {
        let name = s.name;
        let replica = Replica::open(s.a.clone()).await.expect("first snapshot");
        let follower = replica.follow();
        s.b.commit(vec![Write::put("loras/x", Expect::Absent, "v1")]).await.expect("commits");
        eventually(Duration::from_secs(5), "the put reaching the replica", || {
            value(&replica, "loras/x").as_deref() == Some("v1")
        })
        .await;
        s.b.commit(vec![Write::delete("loras/x", Expect::Any)]).await.expect("commits");
        eventually(Duration::from_secs(5), "the delete reaching the replica", || value(&replica, "loras/x").is_none())
            .await;
        // Its own commit is in the copy when the commit returns.
        let at = replica.commit(vec![Write::put("loras/y", Expect::Absent, "mine")]).await.expect("commits");
        assert_eq!(value(&replica, "loras/y").as_deref(), Some("mine"), "{name}");
        assert!(replica.revision() >= at, "{name}");
        assert!(replica.trouble().is_none(), "{name}: {:?}", replica.trouble());
        follower.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_larger_than_one_etcd_value_round_trip_and_are_replaced_whole() {
    for s in every_store("blobs").await {
        let name = s.name;
        let bytes: Vec<u8> = (0..3_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        s.a.put_blob("policy-1", &bytes).await.expect("stores");
        assert!(s.b.get_blob("policy-1").await.expect("reads") == bytes, "{name}: other bytes came back");
        // Replaced by a shorter blob: no chunk of the old one comes back with it.
        s.a.put_blob("policy-1", b"short").await.expect("replaces");
        assert_eq!(s.b.get_blob("policy-1").await.expect("reads"), b"short", "{name}");
        assert_eq!(s.b.get_blob("nothing").await, Err(StoreError::BlobMissing { name: "nothing".into() }), "{name}");
        assert!(matches!(s.b.get_blob("../../etc/passwd").await, Err(StoreError::Invalid(_))), "{name}");
        s.b.delete_blob("policy-1").await.expect("deletes");
        assert_eq!(s.a.get_blob("policy-1").await, Err(StoreError::BlobMissing { name: "policy-1".into() }), "{name}");
    }
}

/// The etcd store for direct access to the cluster (to compact it, to damage a blob).
async fn raw_etcd(cluster: &EtcdCluster, prefix: &str) -> store::EtcdStore {
    let endpoints: Vec<String> = cluster.endpoints().iter().map(|e| format!("http://{e}")).collect();
    store::EtcdStore::connect(&endpoints, &format!("/{prefix}/"), &store::EtcdAccess::default())
        .await
        .expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_is_refused_and_a_compacted_history_is_read_again() {
    let Some(s) = etcd_store("damage").await else { return };
    let cluster = s.etcd.as_ref().expect("etcd");
    let raw = raw_etcd(cluster, "damage").await;
    s.a.put_blob("component", &vec![7u8; 2 << 20]).await.expect("stores");
    let mut client = raw.client();
    client.put("/damage/blobs/component/00001", vec![8u8; 1 << 20], None).await.expect("tampers");
    assert!(matches!(s.b.get_blob("component").await, Err(StoreError::Corrupt(_))), "tampered bytes were accepted");

    // A replica that fell behind past a compaction reads a snapshot and carries on.
    let replica = Replica::open(s.a.clone()).await.expect("first snapshot");
    let mut last = 0;
    for i in 0..5 {
        last = s.b.commit(vec![Write::put(format!("loras/{i}"), Expect::Any, "v")]).await.expect("commits");
    }
    client.compact(last, None).await.expect("compacts");
    let follower = replica.follow();
    eventually(Duration::from_secs(10), "the replica reading past the compaction", || {
        (0..5).all(|i| value(&replica, &format!("loras/{i}")).is_some())
    })
    .await;
    s.b.commit(vec![Write::put("loras/after", Expect::Absent, "v")]).await.expect("commits");
    eventually(Duration::from_secs(5), "the watch resuming after the snapshot", || {
        value(&replica, "loras/after").is_some()
    })
    .await;
    follower.abort();
}

/// Commits until one succeeds or `within` passes (an election in progress fails requests).
async fn commit_within(s: &dyn StateStore, within: Duration, write: Write) -> Result<i64, StoreError> {
    let deadline = Instant::now() + within;
    loop {
        match s.commit(vec![write.clone()]).await {
            Err(StoreError::Unavailable { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_promptly_reads_serve_and_everything_converges_after() {
    let Some(mut s) = etcd_store("quorum").await else { return };
    let replica = Replica::open(s.a.clone()).await.expect("first snapshot");
    let follower = replica.follow();
    replica.commit(vec![Write::put("loras/kept", Expect::Absent, "v")]).await.expect("commits");

    // The leader dies: a new one is elected and writes carry on.
    let cluster = s.etcd.as_mut().expect("etcd");
    let leader = cluster.leader();
    cluster.kill(leader);
    commit_within(&*s.b, Duration::from_secs(15), Write::put("loras/after-leader", Expect::Absent, "v"))
        .await
        .expect("writes continue after the leader is killed");
    eventually(Duration::from_secs(10), "the write reaching the replica", || {
        value(&replica, "loras/after-leader").is_some()
    })
    .await;

    // A second member dies: no quorum. Writes fail, promptly and by name; reads serve.
    let second = (0..3).find(|&i| i != leader).expect("another member");
    cluster.kill(second);
    let started = Instant::now();
    let refused = s.b.commit(vec![Write::put("loras/lost", Expect::Absent, "v")]).await;
    assert!(matches!(refused, Err(StoreError::Unavailable { .. })), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "the refusal took {:?}", started.elapsed());
    assert!(value(&replica, "loras/kept").is_some() && value(&replica, "loras/after-leader").is_some());

    // Quorum returns: writes work again and the replica converges without being restarted.
    cluster.restart(leader);
    cluster.restart(second);
    commit_within(&*s.b, Duration::from_secs(30), Write::put("loras/back", Expect::Absent, "v"))
        .await
        .expect("writes work again once quorum is back");
    eventually(Duration::from_secs(15), "the replica converging", || value(&replica, "loras/back").is_some()).await;
    // (The refused write may appear now: etcd can commit a request whose client timed out once
    // quorum returns. The gateway's operations expire such late records; see admin::ops.)
    follower.abort();
}

#[test]
fn store_locations_are_parsed_and_bad_ones_named() {
    assert_eq!(
        "etcd://10.0.0.1:2379,10.0.0.2:2379/fleet-a".parse::<Location>(),
        Ok(Location::Etcd {
            endpoints: vec!["http://10.0.0.1:2379".into(), "http://10.0.0.2:2379".into()],
            prefix: "/fleet-a/".into()
        })
    );
    assert_eq!(
        "etcd://etcd:2379".parse::<Location>(),
        Ok(Location::Etcd { endpoints: vec!["http://etcd:2379".into()], prefix: store::DEFAULT_ETCD_PREFIX.into() })
    );
    assert_eq!(
        "etcds://etcd-0:2379,etcd-1:2379/fleet-a".parse::<Location>(),
        Ok(Location::Etcd {
            endpoints: vec!["https://etcd-0:2379".into(), "https://etcd-1:2379".into()],
            prefix: "/fleet-a/".into()
        })
    );
    assert_eq!("/var/lib/switchyard".parse::<Location>(), Ok(Location::Dir("/var/lib/switchyard".into())));
    for bad in ["etcd://", "etcd://host", "etcd://user@host:1", "etcds://host", "consul://x:1", ""] {
        assert!(bad.parse::<Location>().is_err(), "{bad:?} was accepted");
    }
}

/// The tenants of the fleet tests: an operator that loads from the fixtures, and acme.
fn fleet_tenants() -> String {
    format!(
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"file://{}/\"]\n\n\
         [tenants.acme]\nadapters = [\"acme/*\"]\n",
        fixtures().join("adapters").display()
    )
}

fn fixture_uri(name: &str) -> String {
    format!("file://{}", fixture_adapter(name).display())
}

/// The names `/v1/models` lists for `who` through `gw`.
async fn models(http: &reqwest::Client, gw: &Gateway, who: &str) -> Vec<String> {
    let (_, v) = get(http, gw, "/v1/models", &token(who, "")).await;
    v["data"]
        .as_array()
        .map_or_else(Vec::new, |d| d.iter().filter_map(|m| m["id"].as_str().map(String::from)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_etcd_share_adapters_and_never_both_win_a_race() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let backend = start_backend(&[]);
    let store = cluster.url("two-gateways");
    let tenants = fleet_tenants();
    let GatewayPair { a, b, http, dirs: _dirs } = two_gateways(&[&backend.addr], &tenants, &["--store", &store]).await;
    let ops = token("ops", "lora:load lora:read lora:unload");

    // Loaded through A: B lists it and serves it, with the same answer as A.
    let body = json!({"lora_name": "acme/support", "source": {"uri": fixture_uri("r8-qv")}});
    let (status, v) = post(&http, &a, "/v1/loras", &ops, body).await;
    assert_eq!(status, 200, "{v}");
    until(Duration::from_secs(5), "B listing the adapter", async || {
        models(&http, &b, "acme").await.contains(&"acme/support".to_string())
    })
    .await;
    let (status, through_b) =
        post(&http, &b, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hello")).await;
    assert_eq!(status, 200, "{through_b}");
    let (_, through_a) =
        post(&http, &a, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hello")).await;
    assert_eq!(through_b["choices"][0]["message"], through_a["choices"][0]["message"]);
    let (_, base) = post(&http, &b, "/v1/chat/completions", &token("ops", ""), chat("tiny-llama", "hello")).await;
    assert_ne!(through_b["choices"][0]["message"], base["choices"][0]["message"], "the adapter changes the answer");

    // Both gateways hot-swap it at once: one wins, the other is told, and both then agree.
    let swap = |uri: String| json!({"lora_name": "acme/support", "source": {"uri": uri}, "hot_swap": true});
    let (x, y) = tokio::join!(
        post(&http, &a, "/v1/loras", &ops, swap(fixture_uri("r4-patterns"))),
        post(&http, &b, "/v1/loras", &ops, swap(fixture_uri("r16-all-rslora"))),
    );
    let winner = match (x.0, y.0) {
        (200, 409) => (fixture_uri("r4-patterns"), &y.1),
        (409, 200) => (fixture_uri("r16-all-rslora"), &x.1),
        other => panic!("expected one 200 and one 409, got {other:?}: {} / {}", x.1, y.1),
    };
    let code = winner.1["error"]["code"].as_str().unwrap_or_default();
    assert!(matches!(code, "operation_in_progress" | "changed_concurrently"), "{}", winner.1);
    for gw in [&a, &b] {
        until(Duration::from_secs(5), "both gateways recording the winner", async || {
            let (_, v) = get(&http, gw, "/v1/loras", &ops).await;
            v["adapters"][0]["source"]["uri"] == winner.0.as_str()
        })
        .await;
    }

    // Unloaded through B: A stops serving it.
    let (status, v) = delete(&http, &b, "/v1/loras/acme/support", &ops).await;
    assert_eq!(status, 200, "{v}");
    until(Duration::from_secs(5), "A forgetting the adapter", async || {
        let (s, v) = post(&http, &a, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hello")).await;
        s == 404 && v["error"]["code"] == "model_not_found"
    })
    .await;
}

/// The sum of the gateway's `reconcile_calls` counter for `call` (`load`, `unload`).
async fn reconcile_calls(http: &reqwest::Client, gw: &Gateway, call: &str) -> u64 {
    let url = format!("{}/metrics", gw.metrics.as_deref().expect("a metrics listener"));
    let text = http.get(url).send().await.expect("metrics answer").text().await.expect("text");
    text.lines()
        .filter(|l| {
            l.starts_with("switchyard_gateway_reconcile_calls_total{") && l.contains(&format!("call=\"{call}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_quorum_gateways_serve_and_refuse_writes_then_converge_without_a_restart() {
    let Some(mut cluster) = EtcdCluster::start(3) else { return };
    let backend = start_backend(&[]);
    let store = cluster.url("quorum");
    let tenants = fleet_tenants();
    let flags = ["--store", &store, "--metrics-listen", "127.0.0.1:0"];
    let GatewayPair { a, b, http, dirs: _dirs } = two_gateways(&[&backend.addr], &tenants, &flags).await;
    let ops = token("ops", "lora:load lora:read lora:unload");
    let acme = token("acme", "");

    // A source written with a trailing '/' is the backend's source: no reload at every probe.
    let uri = format!("{}/", fixture_uri("r8-qv"));
    let (status, v) =
        post(&http, &a, "/v1/loras", &ops, json!({"lora_name": "acme/support", "source": {"uri": uri}})).await;
    assert_eq!(status, 200, "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await; // ten probe intervals
    for gw in [&a, &b] {
        assert_eq!(reconcile_calls(&http, gw, "load").await, 0, "the reconcilers reloaded an unchanged adapter");
    }

    // Two members die: no quorum.
    let leader = cluster.leader();
    let second = (0..3).find(|&i| i != leader).unwrap();
    cluster.kill(leader);
    cluster.kill(second);
    // Inference goes on from the last known state, through both gateways.
    for gw in [&a, &b] {
        let (status, v) = post(&http, gw, "/v1/chat/completions", &acme, chat("acme/support", "hello")).await;
        assert_eq!(status, 200, "{v}");
    }
    // Writes are refused, promptly, by name, with Retry-After.
    let started = Instant::now();
    let r = http
        .post(format!("{}/v1/loras", b.url))
        .bearer_auth(&ops)
        .json(&json!({"lora_name": "acme/other", "source": {"uri": fixture_uri("r4-patterns")}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"), "503 without Retry-After");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "state_unavailable", "{v}");
    assert!(started.elapsed() < Duration::from_secs(8), "the refusal took {:?}", started.elapsed());

    // Quorum returns: writes through either gateway work again and both see them, unrestarted.
    cluster.restart(leader);
    cluster.restart(second);
    until(Duration::from_secs(40), "a write through B succeeding", async || {
        let body = json!({"lora_name": "acme/other", "source": {"uri": fixture_uri("r4-patterns")}});
        post(&http, &b, "/v1/loras", &ops, body).await.0 == 200
    })
    .await;
    until(Duration::from_secs(10), "A serving the new adapter", async || {
        post(&http, &a, "/v1/chat/completions", &acme, chat("acme/other", "hello")).await.0 == 200
    })
    .await;
}

/// The backends `GET /v1/loras` lists for the first adapter, with their states.
async fn backend_states(http: &reqwest::Client, gw: &Gateway, token: &str) -> Vec<(String, String)> {
    let (_, v) = get(http, gw, "/v1/loras", token).await;
    v["adapters"][0]["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| {
                    (b["backend"].as_str().unwrap_or("").to_string(), b["state"].as_str().unwrap_or("").to_string())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_register_themselves_and_a_dead_one_leaves_the_routing_table_within_its_ttl() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let store = cluster.url("discovery");
    let backend_at = |listen: &str| {
        let advertise = format!("http://{listen}");
        start_backend(&["--listen", listen, "--store", &store, "--advertise", &advertise, "--advertise-ttl-s", "2"])
    };
    let (first, second) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let _a = backend_at(&first);
    let dir = tempfile::tempdir().unwrap();
    // No --backend: the gateway finds them.
    let gw = gateway(dir.path(), &[], &fleet_tenants(), &["--store", &store]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let ops = token("ops", "lora:load lora:read");
    let (status, v) = post(
        &http,
        &gw,
        "/v1/loras",
        &ops,
        json!({"lora_name": "acme/support", "source": {"uri": fixture_uri("r8-qv")}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // A second backend registers: it joins the table and is given the adapter.
    let b = backend_at(&second);
    let mut both =
        vec![(format!("http://{first}"), "resident".to_string()), (format!("http://{second}"), "resident".to_string())];
    both.sort(); // the table is in address order
    until(Duration::from_secs(15), "the second backend joining with the adapter", async || {
        backend_states(&http, &gw, &ops).await == both
    })
    .await;

    // It dies without a word: its registration expires with its lease, and it leaves the table.
    drop(b);
    let died = Instant::now();
    until(Duration::from_secs(10), "the dead backend leaving the table", async || {
        backend_states(&http, &gw, &ops).await.len() == 1
    })
    .await;
    let gone_after = died.elapsed();
    assert!(gone_after < Duration::from_secs(5), "a backend with a 2 s lease stayed {gone_after:?}");
    let (status, v) = post(&http, &gw, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hi")).await;
    assert_eq!(status, 200, "the survivor serves: {v}");

    // Restarted, it registers again and gets the adapter back without anyone asking.
    let _b = backend_at(&second);
    until(Duration::from_secs(15), "the restarted backend rejoining with the adapter", async || {
        backend_states(&http, &gw, &ops).await == both
    })
    .await;
}

/// Runs `switchyard gateway` with `args` (and the secret [`gateway`] wrote in `dir`), expecting
/// it to refuse to start; its stderr.
fn refused_gateway(dir: &std::path::Path, args: &[&str]) -> String {
    let state = dir.join("refused-state");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["gateway", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .arg("--jwt-hs256-secret-file")
        .arg(dir.join("secret"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("switchyard runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("waits").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the gateway {args:?} started; it should have been refused");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("exits");
    assert!(!out.status.success(), "the gateway {args:?} exited successfully");
    String::from_utf8_lossy(&out.stderr).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_an_etcd_that_requires_mutual_tls_the_fleet_works_and_who_cannot_prove_itself_is_refused() {
    let pki = TestPki::new();
    let tls = support::etcd::EtcdTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: pki.ca.clone(),
    };
    let Some(cluster) = EtcdCluster::start_tls(3, tls) else { return };
    let store = cluster.url("secure");
    assert!(store.starts_with("etcds://"), "{store}");
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client_cert), path(&pki.client_key));
    let access = ["--store-ca-file", ca.as_str(), "--store-cert-file", cert.as_str(), "--store-key-file", key.as_str()];

    // A backend registers itself over TLS; a gateway finds it there and shares adapters through it.
    let listen = format!("127.0.0.1:{}", free_port());
    let advertise = format!("http://{listen}");
    let mut backend_flags = vec!["--listen", &listen, "--store", &store, "--advertise", &advertise];
    backend_flags.extend(access);
    let _backend = start_backend(&backend_flags);
    let dir = tempfile::tempdir().unwrap();
    let mut gateway_flags = vec!["--store", store.as_str()];
    gateway_flags.extend(access);
    let gw = gateway(dir.path(), &[], &fleet_tenants(), &gateway_flags);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    load_through_gateway(&http, &gw, &token("ops", "lora:load lora:read"), "acme/support", "r8-qv").await;
    let (status, v) = post(&http, &gw, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hi")).await;
    assert_eq!(status, 200, "{v}");

    // Without a client certificate the members refuse the connection; without the CA the
    // gateway cannot check them; a CA for a plain etcd:// store is a mistake. Each is named.
    let no_cert = refused_gateway(dir.path(), &["--store", &store, "--store-ca-file", &ca]);
    assert!(no_cert.contains("cannot read the state store etcd https://"), "{no_cert}");
    let no_ca = refused_gateway(dir.path(), &["--store", &store]);
    assert!(no_ca.contains("an etcds:// store needs the CA"), "{no_ca}");
    let plain = store.replacen("etcds://", "etcd://", 1);
    let misplaced = refused_gateway(dir.path(), &["--store", &plain, "--store-ca-file", &ca]);
    assert!(misplaced.contains("--store-ca-file is for an etcds:// store"), "{misplaced}");
    let half = refused_gateway(dir.path(), &["--store", &store, "--store-ca-file", &ca, "--store-cert-file", &cert]);
    assert!(half.contains("--store-key-file"), "{half}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_authentication_on_a_user_limited_to_the_prefix_runs_the_fleet_and_others_are_refused() {
    use switchyard_fleet::etcd_client::{Permission, UserAddOptions};
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let endpoints: Vec<String> = cluster.endpoints().iter().map(|e| format!("http://{e}")).collect();
    let mut admin = switchyard_fleet::connect(&endpoints, &Default::default()).await.expect("connects");
    admin.role_add("root").await.expect("root role");
    admin.user_add("root", "root-password", None).await.expect("root user");
    admin.user_grant_role("root", "root").await.expect("grants root");
    // The gateways' user may read and write its own prefix only.
    admin.role_add("switchyard").await.expect("role");
    admin.role_grant_permission("switchyard", Permission::read_write("/authz/").with_prefix()).await.expect("grant");
    admin.user_add("switchyard", "fleet-password", Some(UserAddOptions::new())).await.expect("user");
    admin.user_grant_role("switchyard", "switchyard").await.expect("grants");
    admin.auth_enable().await.expect("authentication on");

    let dir = tempfile::tempdir().unwrap();
    let (right, wrong) = (dir.path().join("password"), dir.path().join("wrong"));
    std::fs::write(&right, "# the fleet's etcd password\nfleet-password\n").unwrap();
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let (right, wrong) = (right.display().to_string(), wrong.display().to_string());
    let backend = start_backend(&[]);
    let store = cluster.url("authz");
    let gw = gateway(
        dir.path(),
        &[&backend.addr],
        &fleet_tenants(),
        &["--store", &store, "--store-user", "switchyard", "--store-password-file", &right],
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    load_through_gateway(&http, &gw, &token("ops", "lora:load lora:read"), "acme/support", "r8-qv").await;

    // A wrong password, no user at all, and the right user on a prefix it was not granted.
    let backend_flag = format!("http://{}", backend.addr);
    let refused = |extra: &[&str]| {
        let mut args = vec!["--backend", backend_flag.as_str()];
        args.extend_from_slice(extra);
        refused_gateway(dir.path(), &args)
    };
    let bad_password = refused(&["--store", &store, "--store-user", "switchyard", "--store-password-file", &wrong]);
    assert!(bad_password.contains("authentication failed"), "{bad_password}");
    let anonymous = refused(&["--store", &store]);
    assert!(anonymous.contains("cannot read the state store"), "{anonymous}");
    let elsewhere = cluster.url("other");
    let not_granted = refused(&["--store", &elsewhere, "--store-user", "switchyard", "--store-password-file", &right]);
    assert!(
        not_granted.contains("etcd does not allow this") && not_granted.contains("permission denied"),
        "{not_granted}"
    );
}

/// Whether `gw` says (on its metrics listener) that it leads.
async fn leads(http: &reqwest::Client, gw: &Gateway) -> bool {
    let url = format!("{}/metrics", gw.metrics.as_deref().expect("a metrics listener"));
    let Ok(r) = http.get(url).send().await else { return false };
    r.text().await.is_ok_and(|t| t.lines().any(|l| l == "switchyard_gateway_leader 1"))
}

/// The adapters the backend itself has, by name.
async fn on_backend(backend: &Backend) -> Vec<String> {
    let (mut client, _) = connect(backend).await;
    let listed = client.list_adapters(switchyard_proto::v1::ListAdaptersRequest {}).await.expect("lists");
    let mut names: Vec<String> = listed.into_inner().adapters.into_iter().map(|a| a.name).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_during_a_load_leaves_the_operation_to_the_fleet_and_nothing_orphaned() {
    let (Some(cluster), Some(s3)) = (EtcdCluster::start(3), S3Server::start()) else { return };
    let slow_a = s3.put_fixture("loras", "slow/a", "r8-qv");
    let slow_b = s3.put_fixture("loras", "slow/b", "r4-patterns");
    // Each chunk of the download waits: a load takes seconds.
    let proxy = Proxy::start_slow(&s3.endpoint, Duration::from_millis(150)).await;
    let backend = start_backend_with(&fixtures().join("models/tiny-llama"), &[], &s3.env(&proxy.endpoint));
    let tenants = "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"s3://loras/\"]\n";
    let store = cluster.url("killed");
    let flags = ["--store", &store, "--metrics-listen", "127.0.0.1:0"];
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = gateway(da.path(), &[&backend.addr], tenants, &flags);
    let http = reqwest::Client::new();
    wait_ready(&http, &a).await;
    until(Duration::from_secs(10), "A leading", async || leads(&http, &a).await).await;
    let mut b = gateway(db.path(), &[&backend.addr], tenants, &flags);
    wait_ready(&http, &b).await;
    let ops = token("ops", "lora:load lora:read");

    // 1. B takes a load and dies before it is done: A, the leader, finishes it.
    let load = |gw: &Gateway, name: &str, uri: &str| {
        let (http, url, ops) = (http.clone(), format!("{}/v1/loras", gw.url), ops.clone());
        let body = json!({"lora_name": name, "source": {"uri": uri}});
        tokio::spawn(
            async move { http.post(url).bearer_auth(ops).json(&body).send().await.map(|r| r.status().as_u16()) },
        )
    };
    let dying = load(&b, "slow-a", &slow_a);
    until(Duration::from_secs(10), "the load running on the leader", async || {
        let (_, v) = get(&http, &a, "/v1/loras", &ops).await;
        v["operations"][0]["started_by"].is_string()
    })
    .await;
    b.server.kill();
    assert!(dying.await.unwrap().is_err(), "the killed gateway answered");
    until(Duration::from_secs(30), "A finishing the load B took", async || {
        let (_, v) = get(&http, &a, "/v1/loras", &ops).await;
        v["loras"].get("slow-a").is_some() && backend_states(&http, &a, &ops).await.iter().all(|(_, s)| s == "resident")
    })
    .await;
    assert_eq!(on_backend(&backend).await, vec!["slow-a"], "the backend holds exactly the desired set");

    // 2. The leader dies during a load another gateway took: the new leader runs it again, and
    // the gateway that took it answers its client.
    let b = gateway(db.path(), &[&backend.addr], tenants, &flags);
    wait_ready(&http, &b).await;
    let waiting = load(&b, "slow-b", &slow_b);
    until(Duration::from_secs(10), "the load running on the leader", async || {
        let (_, v) = get(&http, &b, "/v1/loras", &ops).await;
        v["operations"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["lora_name"] == "slow-b" && o["started_by"].is_string()))
    })
    .await;
    a.server.kill();
    let answered = tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("B answers").unwrap();
    assert_eq!(answered.expect("B answers"), 200, "the load B took went through after the leader died");
    assert!(leads(&http, &b).await, "B took over the lead");
    let (_, v) = get(&http, &b, "/v1/loras", &ops).await;
    assert!(v["loras"].get("slow-a").is_some() && v["loras"].get("slow-b").is_some(), "{v}");
    assert_eq!(on_backend(&backend).await, vec!["slow-a", "slow-b"], "the backend holds exactly the desired set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_with_one_replica_lives_on_one_backend_and_moves_when_that_one_dies() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let (x, y) = (start_backend(&[]), start_backend(&[]));
    // A third backend that never answers: it is not a place for the copy, and the load says so.
    let down = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let store = cluster.url("replicas");
    let gw = gateway(dir.path(), &[&x.addr, &y.addr, &down], &fleet_tenants(), &["--store", &store]);
    let http = reqwest::Client::new();
    let ops = token("ops", "lora:load lora:read");
    // Both live backends healthy first: one that turns healthy later may take the copy over.
    until(Duration::from_secs(20), "both live backends healthy", async || {
        let (_, v) = get(&http, &gw, "/v1/loras", &ops).await;
        let healthy = v["backends"].as_array().map_or(0, |b| b.iter().filter(|b| b["healthy"] == true).count());
        healthy == 2
    })
    .await;
    let body = json!({"lora_name": "acme/one", "source": {"uri": fixture_uri("r8-qv")}, "replicas": 1});
    let (status, v) = post(&http, &gw, "/v1/loras", &ops, body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["backends"].as_array().map(Vec::len), Some(1), "loaded on one backend: {v}");
    let holder = v["backends"][0]["backend"].as_str().unwrap().to_string();
    let (_, listed) = get(&http, &gw, "/v1/loras", &ops).await;
    assert_eq!(
        (listed["adapters"][0]["replicas"].as_u64(), listed["adapters"][0]["ready"].as_u64()),
        (Some(1), Some(1))
    );

    // The backend holding it dies: the copy moves to the other, and requests are served there.
    let survivor = if holder.ends_with(&x.addr) {
        drop(x);
        y
    } else {
        drop(y);
        x
    };
    until(Duration::from_secs(20), "the copy moving to the survivor", async || {
        let states = backend_states(&http, &gw, &ops).await;
        states.iter().any(|(b, s)| b.ends_with(&survivor.addr) && s == "resident")
    })
    .await;
    let (status, v) = post(&http, &gw, "/v1/chat/completions", &token("acme", ""), chat("acme/one", "hi")).await;
    assert_eq!(status, 200, "{v}");
}

fn manifest(object: &str, lora: &str, tenant: &str, fixture: &str) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: LoraAdapter\nmetadata:\n  name: {object}\nspec:\n  loraName: {lora}\n  \
         source:\n    uri: {}\n  tenant: {tenant}\n",
        fixture_uri(fixture)
    )
}

/// `switchyard apply`/`get` against `gw` with `token`: exit status, stdout, stderr.
fn cli(gw: &Gateway, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_GATEWAY", &gw.url)
        .env("SWITCHYARD_TOKEN", token)
        .output()
        .expect("switchyard runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_applied_from_a_watched_directory_and_by_switchyard_apply() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let backend = start_backend(&[]);
    let store = cluster.url("manifests");
    let fixtures_prefix = format!("file://{}/", fixtures().join("adapters").display());
    let tenants = format!(
        "{}\n[tenants.acme]\nadapters = [\"acme/*\"]\nload_prefixes = [\"{fixtures_prefix}\"]\n\n[tenants.globex]\nadapters = [\"globex/*\"]\n",
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"".to_string() + &fixtures_prefix + "\"]"
    );
    let watched = tempfile::tempdir().unwrap();
    let dir = watched.path().display().to_string();
    let flags = ["--store", &store, "--manifests", &dir];
    let GatewayPair { a, b, http, dirs: _dirs } = two_gateways(&[&backend.addr], &tenants, &flags).await;
    let ops = token("ops", "lora:load lora:read lora:unload");
    let listed = async |gw: &Gateway| {
        let (_, v) = get(&http, gw, "/v1/loras", &ops).await;
        v["adapters"].as_array().cloned().unwrap_or_default()
    };

    // The watched directory: a manifest appears, and the adapter is loaded, for its tenant.
    std::fs::write(watched.path().join("support.yaml"), manifest("acme-support", "acme/support", "acme", "r8-qv"))
        .unwrap();
    until(Duration::from_secs(20), "the declared adapter ready", async || {
        listed(&b).await.iter().any(|l| {
            l["lora_name"] == "acme/support"
                && l["owner"] == "acme"
                && l["ready"] == 1
                && l["declared"]["origin"] == "directory"
        })
    })
    .await;
    let (status, v) = post(&http, &a, "/v1/chat/completions", &token("acme", ""), chat("acme/support", "hi")).await;
    assert_eq!(status, 200, "{v}");
    // A half-edited file refuses the whole set: nothing is unloaded meanwhile.
    std::fs::write(
        watched.path().join("broken.yaml"),
        manifest("x", "acme/x", "acme", "r4-patterns") + "  replica: 3\n",
    )
    .unwrap();
    std::fs::remove_file(watched.path().join("support.yaml")).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await; // two polls
    assert!(listed(&a).await.iter().any(|l| l["lora_name"] == "acme/support"), "a bad set unloaded an adapter");
    // Fixed (the broken file removed): the set is applied, and what it no longer declares goes.
    std::fs::remove_file(watched.path().join("broken.yaml")).unwrap();
    until(Duration::from_secs(20), "the undeclared adapter unloaded", async || {
        !listed(&a).await.iter().any(|l| l["lora_name"] == "acme/support")
    })
    .await;

    // `switchyard apply`: created, then unchanged, then pruned; `switchyard get loras` shows them.
    let files = tempfile::tempdir().unwrap();
    let file_dir = files.path().display().to_string();
    std::fs::write(files.path().join("a.yaml"), manifest("acme-a", "acme/a", "acme", "r8-qv")).unwrap();
    std::fs::write(files.path().join("b.yaml"), manifest("acme-b", "acme/b", "acme", "r4-patterns")).unwrap();
    let (ok, out, err) = cli(&a, &ops, &["apply", "-f", &file_dir]);
    assert!(ok, "{err}");
    assert_eq!(out, "loraadapter/acme-a created\nloraadapter/acme-b created\n");
    let (ok, out, err) = cli(&b, &ops, &["apply", "-f", &file_dir]);
    assert!(ok, "{err}");
    assert_eq!(
        out, "loraadapter/acme-a unchanged\nloraadapter/acme-b unchanged\n",
        "apply is idempotent, through any gateway"
    );
    std::fs::remove_file(files.path().join("b.yaml")).unwrap();
    let (ok, out, err) = cli(&b, &ops, &["apply", "-f", &file_dir, "--prune"]);
    assert!(ok, "{err}");
    assert_eq!(out, "loraadapter/acme-a unchanged\nloraadapter/acme-b pruned\n");
    let (ok, out, err) = cli(&a, &ops, &["get", "loras"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("READY"), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("acme-a") && l.contains("acme/a") && l.contains("1/1")), "{out}");

    // Refused by name: an unknown kind, and a name another tenant owns.
    std::fs::write(
        files.path().join("a.yaml"),
        manifest("acme-a", "acme/a", "acme", "r8-qv").replace("kind: LoraAdapter", "kind: Secret"),
    )
    .unwrap();
    let (ok, _, err) = cli(&a, &ops, &["apply", "-f", &file_dir]);
    assert!(!ok && err.contains("a.yaml") && err.contains("kind \"Secret\""), "{err}");
    std::fs::write(files.path().join("a.yaml"), manifest("acme-a", "acme/a", "globex", "r8-qv")).unwrap();
    let (ok, _, err) = cli(&a, &ops, &["apply", "-f", &file_dir]);
    assert!(!ok && err.contains("loraadapter/acme-a") && err.contains("owned by tenant \"acme\""), "{err}");
}
