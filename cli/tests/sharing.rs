//! How tenants share a backend, through real `switchyard backend` and `switchyard gateway`
//! processes: the tenants file's priorities and the backend's fair shares decide who goes first.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::etcd::EtcdCluster;
use support::*;

/// A backend with one running place and a gateway with `tenants`: `batch` sends two requests,
/// then `other` one, all while the engine is wedged, so they wait in a known order (batch's
/// first one running, its second queued, other's queued last). Each is sent once the backend
/// counts the one before. Then the engine runs, a step every 20 ms, so that one request's end
/// is a quarter of a second from the next one's and no delay in answering (a loaded machine's)
/// can reorder what the clients see. Returns the order they end in.
async fn finishing_order(tenants: &str) -> Vec<&'static str> {
    let dir = tempfile::tempdir().unwrap();
    // The engine wedges while the file says "stall".
    let faults = dir.path().join("faults");
    let model = fixtures().join("models/tiny-llama");
    let env = [("SWITCHYARD_FAULTS_FILE", faults.display().to_string())];
    let backend = start_backend_with(&model, &["--max-running", "1", "--metrics-listen", "127.0.0.1:0"], &env);
    let gw = gateway(dir.path(), &[&backend.addr], tenants, &[]);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_ready(&http, &gw).await;

    let done = Arc::new(Mutex::new(Vec::new()));
    let send = |who: &'static str, tenant: &'static str| {
        let (http, url, done) = (http.clone(), gw.url.clone(), done.clone());
        tokio::spawn(async move {
            let body = json!({
                "model": "tiny-llama", "max_tokens": 12, "ignore_eos": true,
                "messages": [{"role": "user", "content": format!("hello from {who}")}],
            });
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(token(tenant, ""))
                .json(&body)
                .send()
                .await
                .expect("answers");
            assert_eq!(r.status(), 200, "{who}: {}", r.text().await.unwrap_or_default());
            done.lock().unwrap().push(who);
        })
    };
    // Until the backend has `n` requests, running or waiting (those a wedged engine has not
    // taken up count as waiting).
    let arrived = async |n: f64| {
        until(Duration::from_secs(30), &format!("the backend holding {n} requests"), async || {
            let now = scrape(&http, &backend).await;
            at(&now, "switchyard_backend_requests_waiting") + at(&now, "switchyard_backend_requests_running") >= n
        })
        .await
    };
    std::fs::write(&faults, "stall").unwrap();
    let first = send("batch-1", "batch");
    arrived(1.0).await;
    let second = send("batch-2", "batch");
    arrived(2.0).await;
    let third = send("other", "other");
    arrived(3.0).await;
    std::fs::write(&faults, "slow 20").unwrap();
    for task in [first, second, third] {
        task.await.unwrap();
    }
    done.lock().unwrap().clone()
}

#[tokio::test]
async fn a_tenant_arriving_behind_anothers_queue_is_served_before_it() {
    // Equal priorities: other has been served nothing, batch has, so other's request is admitted
    // before batch's second. First come, first served would end batch-1, batch-2, other.
    let order = finishing_order("[tenants.batch]\n[tenants.other]\n").await;
    assert_eq!(order, ["batch-1", "other", "batch-2"]);
}

#[tokio::test]
async fn a_high_priority_tenants_request_at_a_full_backend_starts_before_queued_ones() {
    // other's priority is higher: it preempts the running request instead of waiting for it,
    // and the preempted one resumes before the one queued after it.
    let order = finishing_order("[tenants.batch]\n[tenants.other]\npriority = 5\n").await;
    assert_eq!(order, ["other", "batch-1", "batch-2"]);
}

/// Waits, if needed, until at least `room` is left of the current quota minute, so a test's
/// requests all fall in one window.
async fn with_room_in_the_minute(room: Duration) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let into = Duration::from_millis((now.as_millis() % 60_000) as u64);
    if Duration::from_secs(60) - into < room {
        tokio::time::sleep(Duration::from_secs(60) - into + Duration::from_millis(100)).await;
    }
}

/// A chat request through `gw` as `tenant`: its status, its headers and its body.
async fn chat_call(
    http: &reqwest::Client,
    url: &str,
    tenant: &str,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let body = json!({"model": "tiny-llama", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let r = http.post(format!("{url}/v1/chat/completions")).bearer_auth(token(tenant, "")).json(&body).send().await;
    let r = r.expect("answers");
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or_default())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

#[tokio::test]
async fn a_tenant_over_its_quota_gets_429s_with_openai_headers_while_another_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let backend = start_backend(&[]);
    let tenants = "[tenants.flood]\n[tenants.flood.quota]\nrequests_per_minute = 5\nmax_tokens = 8\nignore_eos = false\n\
                   [tenants.steady]\n";
    let gw = gateway(dir.path(), &[&backend.addr], tenants, &["--metrics-listen", "127.0.0.1:0"]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    with_room_in_the_minute(Duration::from_secs(20)).await;

    // flood sends ten times what steady does.
    let mut flood = Vec::new();
    for i in 0..20 {
        flood.push(chat_call(&http, &gw.url, "flood").await);
        if i % 10 == 0 {
            let (status, _, body) = chat_call(&http, &gw.url, "steady").await;
            assert_eq!(status, 200, "steady is never refused: {body}");
        }
    }
    let served: Vec<_> = flood.iter().filter(|(s, _, _)| *s == 200).collect();
    assert_eq!(served.len(), 5, "five requests a minute");
    for (n, (_, headers, _)) in served.iter().enumerate() {
        assert_eq!(header(headers, "x-ratelimit-limit-requests"), "5");
        assert_eq!(header(headers, "x-ratelimit-remaining-requests"), (4 - n).to_string());
        assert!(header(headers, "x-ratelimit-reset-requests").ends_with('s'));
    }
    let (status, headers, body) = &flood[5];
    assert_eq!(*status, 429);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("5 requests per minute"), "{body}");
    assert_eq!(header(headers, "x-ratelimit-remaining-requests"), "0");
    let retry: u64 = header(headers, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert!(flood[5..].iter().all(|(s, _, _)| *s == 429));

    // The caps on a request: ignore_eos refused by name, max_tokens past the cap refused, and
    // max_tokens left out taken as the cap.
    let send = |body: serde_json::Value| {
        let r = http.post(format!("{}/v1/chat/completions", gw.url)).bearer_auth(token("flood", "")).json(&body).send();
        async move {
            let r = r.await.expect("answers");
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let (status, body) =
        send(json!({"model": "tiny-llama", "ignore_eos": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("ignore_eos_not_allowed")), "{body}");
    let (status, body) =
        send(json!({"model": "tiny-llama", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("max_tokens")), "{body}");

    // The refusals are counted by limit.
    let metrics =
        http.get(format!("{}/metrics", gw.metrics.as_ref().unwrap())).send().await.unwrap().text().await.unwrap();
    for (limit, n) in [("requests", 15), ("ignore_eos", 1), ("max_tokens", 1)] {
        let series = format!(
            "switchyard_gateway_quota_refusals_total{{tenant=\"flood\",limit=\"{limit}\",shadow=\"false\"}} {n}"
        );
        assert!(metrics.contains(&series), "no {series:?} in\n{metrics}");
    }
}

#[tokio::test]
async fn the_openai_sdk_retries_our_429s_as_told() {
    let Some(python) = test_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults");
    let model = fixtures().join("models/tiny-llama");
    let backend = start_backend_with(&model, &[], &[("SWITCHYARD_FAULTS_FILE", faults.display().to_string())]);
    let tenants = "[tenants.acme]\n[tenants.acme.quota]\nconcurrent_requests = 1\n\
                   [tenants.capped]\n[tenants.capped.quota]\nrequests_per_minute = 1\n";
    let gw = gateway(dir.path(), &[&backend.addr], tenants, &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    with_room_in_the_minute(Duration::from_secs(20)).await;
    let script = fixtures().join("../tests/python/quota_client.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(&gw.url)
        .arg(token("acme", ""))
        .arg(token("capped", ""))
        .arg(&faults)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "a client check failed:\n{stdout}");
    assert!(stdout.contains("checks passed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_etcd_enforce_one_request_budget() {
    let Some(cluster) = EtcdCluster::start(3) else { return };
    let backend = start_backend(&[]);
    let store = cluster.url("quota");
    let tenants = "[tenants.acme]\n[tenants.acme.quota]\nrequests_per_minute = 32\n\
                   [tenants.wordy]\n[tenants.wordy.quota]\ntokens_per_minute = 200\n";
    let GatewayPair { a, b, http, dirs: _dirs } = two_gateways(&[&backend.addr], tenants, &["--store", &store]).await;
    with_room_in_the_minute(Duration::from_secs(30)).await;
    let (mut served, mut refused) = (0, 0);
    for _ in 0..40 {
        for gw in [&a, &b] {
            match chat_call(&http, &gw.url, "acme").await.0 {
                200 => served += 1,
                429 => refused += 1,
                other => panic!("status {other}"),
            }
        }
    }
    // Requests never overshoot: the gateways draw from one counter. Each may stop short by
    // the unspent part of its last slice (32 / 16 = 2 requests).
    assert!((28..=32).contains(&served), "{served} served of a budget of 32 ({refused} refused)");
    assert_eq!(served + refused, 80);

    // Tokens are charged when a request ends, so a budget can be passed by what the requests in
    // flight when it ran out use: here one at a time, so by less than two requests' tokens (the
    // other gateway may not have seen the last charge yet).
    let (mut tokens, mut largest, mut refused) = (0, 0, 0);
    for _ in 0..40 {
        for gw in [&a, &b] {
            let (status, _, body) = chat_call(&http, &gw.url, "wordy").await;
            match status {
                200 => {
                    let used = body["usage"]["total_tokens"].as_u64().expect("usage");
                    tokens += used;
                    largest = largest.max(used);
                }
                429 => refused += 1,
                other => panic!("status {other}: {body}"),
            }
        }
    }
    assert!(refused > 0, "the budget ran out");
    assert!(tokens >= 200 - 2 * largest && tokens <= 200 + 2 * largest, "{tokens} tokens served of a budget of 200");
}
