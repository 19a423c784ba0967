//! The prefix cache through a real backend and gateway: repeated prompts report the tokens they
//! reused in OpenAI's `usage.prompt_tokens_details.cached_tokens` (streamed usage too), tenants
//! reuse only their own prompts unless the operator lets them share, a backend started with
//! `--no-prefix-cache` reuses nothing, a watcher of a backend's cache sees its blocks named as
//! the protocol documents, and a gateway sends a prompt to the backend that caches it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly

mod support;

use serde_json::{Value, json};
use support::*;
use switchyard_proto::prefix::BlockHash;
use switchyard_proto::v1 as pb;

/// Tokens per KV block of the backend.
const BLOCK: u64 = 16;

/// A chat whose prompt differs from the first block on with `topic`.
fn long_chat(model: &str, topic: usize, stream: bool) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 3, "stream": stream,
           "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
           "messages": [{"role": "system", "content": format!("{topic}. You answer questions about trains, briefly.")},
                        {"role": "user", "content": "Which trains run on the line between the two old towns by the river?"}]})
}

/// `(prompt_tokens, cached_tokens)` of one chat request, streamed or not.
async fn usage(http: &reqwest::Client, gw: &Gateway, tenant: &str, body: Value) -> (u64, u64) {
    let r = http.post(format!("{}/v1/chat/completions", gw.url)).bearer_auth(token(tenant, "")).json(&body);
    let r = r.send().await.expect("answers");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    let usage = if body["stream"] == json!(true) {
        let chunks: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        chunks.iter().rev().find(|c| !c["usage"].is_null()).expect("a usage chunk")["usage"].clone()
    } else {
        serde_json::from_str::<Value>(&text).expect("json")["usage"].clone()
    };
    let cached = usage["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
    (usage["prompt_tokens"].as_u64().expect("prompt_tokens"), cached)
}

#[tokio::test]
async fn repeated_prompts_report_their_cached_tokens_and_tenants_share_only_when_allowed() {
    let backend = start_backend(&["--metrics-listen", "127.0.0.1:0"]);
    let dir = tempfile::tempdir().expect("state dir");
    let tenants =
        "[tenants.a]\n[tenants.b]\n[tenants.c]\nshare_prefix_cache = true\n[tenants.d]\nshare_prefix_cache = true\n";
    let gw = gateway(dir.path(), &[&backend.addr], tenants, &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let (_, models) = get(&http, &gw, "/v1/models", &token("a", "")).await;
    let base = models["data"][0]["id"].as_str().expect("the base model").to_string();

    // The first time computes everything; the same prompt again reuses every full block short of
    // the last token, streamed or not.
    let (prompt_tokens, cached) = usage(&http, &gw, "a", long_chat(&base, 1, false)).await;
    assert!(prompt_tokens > 2 * BLOCK, "a prompt of several blocks ({prompt_tokens} tokens)");
    assert_eq!(cached, 0);
    let reusable = (prompt_tokens - 1) / BLOCK * BLOCK;
    assert_eq!(usage(&http, &gw, "a", long_chat(&base, 1, false)).await, (prompt_tokens, reusable));
    assert_eq!(usage(&http, &gw, "a", long_chat(&base, 1, true)).await, (prompt_tokens, reusable));

    // Another tenant's identical prompt finds nothing of a's: each has its own cache.
    assert_eq!(usage(&http, &gw, "b", long_chat(&base, 1, false)).await.1, 0);
    assert_eq!(usage(&http, &gw, "b", long_chat(&base, 1, false)).await.1, reusable);

    // Tenants the operator lets share reuse each other's prompts (and only each other's).
    assert_eq!(usage(&http, &gw, "c", long_chat(&base, 2, false)).await.1, 0);
    assert_eq!(usage(&http, &gw, "d", long_chat(&base, 2, false)).await.1, reusable);
    assert_eq!(usage(&http, &gw, "a", long_chat(&base, 2, false)).await.1, 0);

    // The backend's metrics count prompt tokens and the cached ones, by adapter.
    let metrics = http.get(format!("{}/metrics", backend.metrics.as_ref().expect("metrics"))).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    let value = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {text}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a count")
    };
    let hits = value("switchyard_backend_prefix_cache_hit_tokens_total{adapter=\"\"}");
    assert_eq!(hits, 4 * reusable, "a twice, then b and d once");
    assert_eq!(value("switchyard_backend_prefix_cache_prompt_tokens_total{adapter=\"\"}"), 8 * prompt_tokens);
}

#[tokio::test]
async fn a_backend_without_the_prefix_cache_computes_every_prompt() {
    let backend = start_backend(&["--no-prefix-cache"]);
    let (mut client, _) = connect(&backend).await;
    let prompt: Vec<u32> = (0..50).map(|i| 10 + i % 40).collect();
    for _ in 0..2 {
        let (_, _, _, last) = collect(&mut client, greedy(&prompt, "", 2)).await.expect("generates");
        assert_eq!(last.usage.map(|u| (u.prompt_tokens, u.cached_tokens)), Some((50, 0)));
    }
    // The same requests on a backend with the cache: the second reuses three blocks.
    let backend = start_backend(&[]);
    let (mut client, _) = connect(&backend).await;
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (_, _, _, last) = collect(&mut client, greedy(&prompt, "", 2)).await.expect("generates");
        cached.extend(last.usage.map(|u| u.cached_tokens));
    }
    assert_eq!(cached, vec![0, 48]);
}

/// The ids of the full blocks of `tokens` under `root`, as the contract names them.
fn block_ids(root: BlockHash, tokens: &[u32]) -> Vec<u64> {
    switchyard_proto::prefix::block_ids(root, tokens, BLOCK as usize)
}

#[tokio::test]
async fn a_watcher_sees_the_blocks_a_backend_caches_named_as_the_protocol_says() {
    let backend = start_backend(&[]);
    let (mut client, _) = connect(&backend).await;
    client.load_adapter(load_req("a", "r8-qv")).await.expect("the adapter loads");
    let mut watch = client.watch_prefix_cache(pb::WatchPrefixCacheRequest {}).await.expect("watches").into_inner();
    let first = watch.message().await.expect("a message").expect("the snapshot");
    assert!(first.snapshot && first.stored.is_empty(), "nothing cached yet: {first:?}");
    assert_eq!(first.block_size as u64, BLOCK);

    // A 40-token prompt (one token generated) leaves its two full blocks cached.
    let prompt: Vec<u32> = (10..50).collect();
    collect(&mut client, greedy(&prompt, "", 1)).await.expect("generates");
    let base = block_ids(BlockHash::root(None, ""), &prompt[..32]);
    let update = watch.message().await.expect("a message").expect("an update");
    assert_eq!((update.snapshot, update.stored.clone(), update.removed.len()), (false, base.clone(), 0));

    // Under the adapter, the root is its weights' digest as ListAdapters reports it.
    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner();
    let hex = &listed.adapters[0].weights_digest;
    assert_eq!(hex.len(), 64, "a digest for the resident adapter: {hex:?}");
    let digest: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")).collect();
    let digest: [u8; 32] = digest.try_into().expect("32 bytes");
    collect(&mut client, greedy(&prompt, "a", 1)).await.expect("generates");
    let adapted = block_ids(BlockHash::root(Some(&digest), ""), &prompt[..32]);
    let update = watch.message().await.expect("a message").expect("an update");
    assert_eq!(update.stored, adapted);

    // A watcher that comes later starts from a snapshot of all four.
    let mut late = client.watch_prefix_cache(pb::WatchPrefixCacheRequest {}).await.expect("watches").into_inner();
    let snapshot = late.message().await.expect("a message").expect("the snapshot");
    let mut all = [base, adapted].concat();
    let mut got = snapshot.stored.clone();
    all.sort_unstable();
    got.sort_unstable();
    assert!(snapshot.snapshot);
    assert_eq!(got, all);
}

/// `(prompt_tokens, cached_tokens)` of one base-model chat of `tenant` with `content`, sent once
/// the gateway has probed every backend idle again (its probes run every 200 ms) and followed
/// their prefix caches.
async fn cached_chat(http: &reqwest::Client, gw: &Gateway, tenant: &str, model: &str, content: &str) -> (u64, u64) {
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    let body =
        json!({"model": model, "temperature": 0, "max_tokens": 2, "messages": [{"role": "user", "content": content}]});
    usage(http, gw, tenant, body).await
}

/// Two backends, idle, so load alone always picks the same one first. A prompt computed on the
/// other (by a tenant pinned there) is found there by a gateway that routes by cached prefix,
/// and missed by one that routes by load.
#[tokio::test]
async fn a_gateway_sends_a_prompt_to_the_backend_that_caches_it() {
    let backends = [start_backend(&[]), start_backend(&[])];
    let addrs: Vec<String> = backends.iter().map(|b| format!("http://{}", b.addr)).collect();
    let tenants = format!(
        "[tenants.user]\nshare_prefix_cache = true\n\
         [tenants.warm-0]\nshare_prefix_cache = true\nbackend = \"{}\"\n\
         [tenants.warm-1]\nshare_prefix_cache = true\nbackend = \"{}\"\n",
        addrs[0], addrs[1]
    );
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let (dir_on, dir_off) = (tempfile::tempdir().expect("state dir"), tempfile::tempdir().expect("state dir"));
    let by_prefix = gateway(dir_on.path(), &refs, &tenants, &[]);
    let by_load = gateway(dir_off.path(), &refs, &tenants, &["--no-prefix-routing"]);
    let http = reqwest::Client::new();
    wait_ready(&http, &by_prefix).await;
    wait_ready(&http, &by_load).await;
    let (_, models) = get(&http, &by_prefix, "/v1/models", &token("user", "")).await;
    let base = models["data"][0]["id"].as_str().expect("the base model").to_string();
    let prompt =
        |n: usize| format!("Document {n}. The eastern line runs from the harbour to the old mill in nine stops.");

    // Each backend computes prompts of its own for the whole fleet (the tenants share a cache).
    for (n, warm) in [(1, "warm-0"), (2, "warm-1"), (3, "warm-0"), (4, "warm-1")] {
        assert_eq!(cached_chat(&http, &by_prefix, warm, &base, &prompt(n)).await.1, 0);
    }
    // Routed by cached prefix, both are found, whichever backend load would pick first.
    let (tokens, cached) = cached_chat(&http, &by_prefix, "user", &base, &prompt(1)).await;
    let full = (tokens - 1) / BLOCK * BLOCK;
    assert!(full >= BLOCK, "a prompt of at least a block ({tokens} tokens)");
    assert_eq!(cached, full, "prompt 1 is found on backend 0");
    assert_eq!(cached_chat(&http, &by_prefix, "user", &base, &prompt(2)).await.1, full, "prompt 2 on backend 1");
    // Routed by load, the idle backends tie and the same one is always first: one of the two
    // others is found, the other computed again.
    let mut found = Vec::new();
    for n in [3, 4] {
        found.push(cached_chat(&http, &by_load, "user", &base, &prompt(n)).await.1);
    }
    found.sort_unstable();
    assert_eq!(found, vec![0, full], "load routing finds only what is on its first backend");
}

/// A tenant's routing policy sees, per backend, how much of the request's prompt is cached
/// there, counted under its tenant's salt: prompts computed by the tenants it shares a cache
/// with show, a prompt of a tenant it does not share with does not, and an adapter it may not
/// use is refused.
#[tokio::test]
async fn a_policy_sees_what_each_backend_caches_of_its_prompt_within_its_tenants_share() {
    let backends = [start_backend(&[]), start_backend(&[])];
    let addrs: Vec<String> = backends.iter().map(|b| format!("http://{}", b.addr)).collect();
    let tenants = format!(
        "[tenants.user]\nshare_prefix_cache = true\n\
         [tenants.warm-0]\nshare_prefix_cache = true\nbackend = \"{0}\"\n\
         [tenants.warm-1]\nshare_prefix_cache = true\nbackend = \"{1}\"\n\
         [tenants.loner]\nbackend = \"{0}\"\n",
        addrs[0], addrs[1]
    );
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().expect("state dir");
    let gw = gateway(dir.path(), &refs, &tenants, &[]);
    let http = reqwest::Client::new();
    wait_ready(&http, &gw).await;
    let (_, models) = get(&http, &gw, "/v1/models", &token("user", "")).await;
    let base = models["data"][0]["id"].as_str().expect("the base model").to_string();
    let prompt =
        |n: usize| format!("Ledger {n}. The northern line runs from the quarry to the lighthouse in seven stops.");
    let mut tokens = 0;
    for (n, warm) in [(1, "warm-0"), (2, "warm-1"), (3, "loner")] {
        tokens = cached_chat(&http, &gw, warm, &base, &prompt(n)).await.0;
    }
    let full = (tokens - 1) / BLOCK * BLOCK;
    assert!(full >= BLOCK, "a prompt of at least a block ({tokens} tokens)");
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;

    // What user's policy learns, from its refusal.
    let seen = async |n: usize| -> Value {
        let body = json!({"model": base, "max_tokens": 2, "messages": [{"role": "user", "content": prompt(n)}]});
        let (s, v) = post(&http, &gw, "/v1/chat/completions", &token("user", ""), body).await;
        assert_eq!((s, &v["error"]["code"]), (409, &json!("prefix")), "{v}");
        serde_json::from_str(v["error"]["message"].as_str().expect("a report")).expect("json")
    };
    deploy_policy(&http, &gw, "user", "hostile.wasm", None, json!({"mode": "prefix"})).await;
    let cached =
        |a: u64, b: u64| json!({"prompt_tokens": tokens, "cached": {addrs[0].clone(): a, addrs[1].clone(): b}});
    assert_eq!(seen(1).await, cached(full, 0), "prompt 1 is on backend 0");
    assert_eq!(seen(2).await, cached(0, full), "prompt 2 is on backend 1");
    assert_eq!(seen(3).await, cached(0, 0), "loner's prompt is under loner's salt");
    assert_eq!(seen(4).await, cached(0, 0), "a prompt nobody sent");

    // An adapter the tenant may not use (here: that does not exist) is an error the policy sees.
    deploy_policy(&http, &gw, "user", "hostile.wasm", None, json!({"mode": "prefix", "adapter": "loner/a"})).await;
    let report = seen(1).await;
    assert!(report["error"].as_str().is_some_and(|e| e.contains("\"loner/a\"")), "{report}");
}
