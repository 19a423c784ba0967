//! Adapters loaded over gRPC from the sources users keep them in — an S3-compatible server
//! (`s3s-fs`) and a Hugging Face Hub mirror (`olah`), both started here — through the disk
//! cache, with every way a load can go wrong answered by a precise code and nothing left
//! behind.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use sha2::{Digest, Sha256};
use support::*;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::backend_client::BackendClient;
use tonic::Code;
use tonic::transport::Channel;

fn tiny_llama() -> std::path::PathBuf {
    fixtures().join("models/tiny-llama")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn list(client: &mut BackendClient<Channel>) -> Vec<pb::AdapterInfo> {
    client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner().adapters
}

fn resident(adapters: &[pb::AdapterInfo]) -> Vec<&str> {
    adapters.iter().filter(|a| a.state() == pb::AdapterState::Resident).map(|a| a.name.as_str()).collect()
}

/// Asserts a load fails with `code` and a message containing `needle`.
async fn refused(client: &mut BackendClient<Channel>, req: pb::LoadAdapterRequest, code: Code, needle: &str) {
    let uri = req.source.as_ref().map(|s| s.uri.clone()).unwrap_or_default();
    match client.load_adapter(req).await {
        Ok(r) => panic!("{uri} loaded, expected {code:?}: {:?}", r.into_inner()),
        Err(e) => {
            assert_eq!(e.code(), code, "{uri}: {e:?}");
            assert!(e.message().contains(needle), "{uri}: message {:?} should mention {needle:?}", e.message());
        }
    }
}

/// A safetensors file rebuilt after `edit` changed its header (and data).
fn edit_safetensors(
    bytes: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>, &mut Vec<u8>),
) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

/// The first tensor key ending in `suffix`.
fn key_ending(header: &serde_json::Map<String, serde_json::Value>, suffix: &str) -> String {
    header.keys().find(|k| k.ends_with(suffix)).cloned().expect("tensor present")
}

#[tokio::test]
async fn s3_adapters_are_fetched_once_for_concurrent_loads_and_generate_like_peft() {
    let Some(s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/r8-qv", "r8-qv");
    let proxy = Proxy::start(&s3.endpoint, "adapter_model.safetensors", None).await;
    let backend = start_backend_with(&tiny_llama(), &["--max-loras", "8"], &s3.env(&proxy.endpoint));
    let (client, _) = connect(&backend).await;

    // Eight names, one URI, all at once: one download.
    let loads = (0..8).map(|i| {
        let mut c = client.clone();
        let req = load_uri(&format!("support-{i}"), &uri);
        async move { c.load_adapter(req).await.expect("loads").into_inner() }
    });
    let answers = futures::future::join_all(loads).await;
    assert_eq!(answers.iter().filter(|a| a.fetched).count(), 1, "exactly one load fetched: {answers:?}");
    assert_eq!(proxy.counted.load(std::sync::atomic::Ordering::SeqCst), 1, "the server saw one GET of the weights");
    let entries = cache_entries(backend.cache.path());
    assert_eq!(entries.len(), 1, "one cache entry: {entries:?}");

    let mut client = client;
    assert_generates(&mut client, "support-5", "tiny-llama.r8-qv.2").await;
    let weights = std::fs::read(fixture_adapter("r8-qv").join("adapter_model.safetensors")).unwrap();
    let listed = list(&mut client).await;
    assert_eq!(resident(&listed).len(), 8);
    assert!(listed.iter().all(|a| a.sha256 == sha256_hex(&weights) && a.uri == uri), "{listed:?}");

    // A digest pin that matches loads; loading again is served by the cache.
    let mut pinned = load_uri("pinned", &uri);
    pinned.source.as_mut().unwrap().sha256 = format!("sha256:{}", sha256_hex(&weights));
    let again = client.load_adapter(pinned).await.expect("digest matches").into_inner();
    assert!(!again.fetched);
    assert_eq!(proxy.counted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hub_adapters_load_at_the_commit_their_revision_names() {
    let Some(hub) = HfMirror::start() else { return };
    let v1 = hub.commit("testorg/support-lora", &adapter_files(&fixture_adapter("r2-k-down")), Some("v1"));
    let v2 = hub.commit("testorg/support-lora", &adapter_files(&fixture_adapter("r4-patterns")), None);
    assert_ne!(v1, v2);
    let hf_home = tempfile::tempdir().unwrap();
    let backend = start_backend_with(&tiny_llama(), &["--max-loras", "4"], &hub.env(hf_home.path()));
    let (mut client, _) = connect(&backend).await;

    let old = client.load_adapter(load_uri("old", "hf://testorg/support-lora@v1")).await.expect("v1").into_inner();
    assert_eq!(old.adapter.as_ref().map(|a| a.revision.as_str()), Some(v1.as_str()));
    assert_generates(&mut client, "old", "tiny-llama.r2-k-down.0").await;
    let new = client.load_adapter(load_uri("new", "hf://testorg/support-lora")).await.expect("main").into_inner();
    assert_eq!(new.adapter.as_ref().map(|a| a.revision.as_str()), Some(v2.as_str()));
    assert_generates(&mut client, "new", "tiny-llama.r4-patterns.0").await;
    // A commit sha is a revision too.
    let by_sha = client.load_adapter(load_uri("sha", &format!("hf://testorg/support-lora@{v1}"))).await.expect("sha");
    assert_eq!(by_sha.into_inner().adapter.map(|a| a.revision), Some(v1.clone()));

    assert_eq!(cache_entries(backend.cache.path()).len(), 3);

    // A commit already in the standard HF cache (HF_HUB_CACHE) is used from there, with no
    // request: this repository does not exist on the mirror.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = hf_home.path().join("hub/models--testorg--downloaded-lora/snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for (name, bytes) in adapter_files(&fixture_adapter("r16-all-rslora")) {
        std::fs::write(snapshot.join(name), bytes).unwrap();
    }
    let local = format!("hf://testorg/downloaded-lora@{commit}");
    let loaded = client.load_adapter(load_uri("local", &local)).await.expect("from the HF cache").into_inner();
    assert_eq!(loaded.adapter.map(|a| a.revision), Some(commit.to_string()));
    assert_generates(&mut client, "local", "tiny-llama.r16-all-rslora.0").await;
    assert_eq!(cache_entries(backend.cache.path()).len(), 4);

    // Not there: a repository, or a revision of one that is.
    refused(&mut client, load_uri("x", "hf://testorg/nope"), Code::NotFound, "repository testorg/nope not found").await;
    refused(&mut client, load_uri("x", "hf://testorg/support-lora@v9"), Code::NotFound, "revision \"v9\" not found")
        .await;
    assert_eq!(cache_entries(backend.cache.path()).len(), 4, "failed loads cached nothing");
}

#[tokio::test]
async fn bad_adapters_are_refused_by_name_and_leave_nothing_resident_or_cached() {
    let Some(s3) = S3Server::start() else { return };
    let args = ["--max-lora-rank", "16", "--max-adapter-bytes", "1MiB"];
    let backend = start_backend_with(&tiny_llama(), &args, &s3.env(&s3.endpoint));
    let (mut client, _) = connect(&backend).await;
    let files = adapter_files(&fixture_adapter("r8-qv"));
    let (config, weights) = (files[0].1.clone(), files[1].1.clone());
    let with_weights = |w: Vec<u8>| vec![("adapter_config.json", config.clone()), ("adapter_model.safetensors", w)];

    let mut bad_length = weights.clone();
    bad_length[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let overlapping = edit_safetensors(&weights, |h, _| {
        let key = key_ending(h, "layers.1.self_attn.q_proj.lora_A.weight");
        h[&key]["data_offsets"][0] = serde_json::json!(0);
    });
    let no_such_module = edit_safetensors(&weights, |h, _| {
        let key = key_ending(h, "layers.0.self_attn.q_proj.lora_A.weight");
        let v = h.remove(&key).unwrap();
        h.insert(key.replace("q_proj", "rotary_proj"), v);
    });
    let wrong_shape = edit_safetensors(&weights, |h, _| {
        let key = key_ending(h, "layers.0.self_attn.q_proj.lora_A.weight");
        let shape: Vec<u64> = serde_json::from_value(h[&key]["shape"].clone()).unwrap();
        h[&key]["shape"] = serde_json::json!([shape[0] / 2, shape[1] * 2]);
    });
    let nan = edit_safetensors(&weights, |h, data| {
        let key = key_ending(h, "layers.0.self_attn.v_proj.lora_B.weight");
        let start = h[&key]["data_offsets"][0].as_u64().unwrap() as usize;
        data[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let mut too_big = weights.clone();
    too_big.resize(2 << 20, 0);
    let cases: Vec<(String, Code, &str)> = vec![
        (
            s3.put("loras", "too-big", &with_weights(too_big)),
            Code::InvalidArgument,
            "above this backend's --max-adapter-bytes 1048576",
        ),
        (
            s3.put("loras", "no-config", &[("adapter_model.safetensors", weights.clone())]),
            Code::InvalidArgument,
            "no adapter_config.json",
        ),
        (s3.put("loras", "bad-length", &with_weights(bad_length)), Code::InvalidArgument, "invalid safetensors"),
        (s3.put("loras", "overlapping", &with_weights(overlapping)), Code::InvalidArgument, "invalid safetensors"),
        (
            s3.put("loras", "no-such-module", &with_weights(no_such_module)),
            Code::InvalidArgument,
            "self_attn.rotary_proj, which a LlamaForCausalLM layer does not have",
        ),
        (
            s3.put("loras", "wrong-shape", &with_weights(wrong_shape)),
            Code::InvalidArgument,
            "do not fit the base projection",
        ),
        (
            s3.put_fixture("loras", "rank-32", "r32-mlp-regex"),
            Code::InvalidArgument,
            "rank 32 in model.layers.0.mlp.gate_proj, above this backend's --max-lora-rank 16",
        ),
        (s3.put("loras", "nan", &with_weights(nan)), Code::InvalidArgument, "contains NaN"),
        (
            s3.put(
                "loras",
                "pickle",
                &[("adapter_config.json", config.clone()), ("adapter_model.bin", b"\x80\x02pickle".to_vec())],
            ),
            Code::InvalidArgument,
            "only pickle weights",
        ),
        ("s3://no-such-bucket/x".to_string(), Code::NotFound, "the bucket does not exist"),
        ("s3://loras/no/such/prefix".to_string(), Code::NotFound, "nothing there"),
    ];
    for (i, (uri, code, needle)) in cases.into_iter().enumerate() {
        refused(&mut client, load_uri(&format!("bad-{i}"), &uri), code, needle).await;
    }
    // A digest pin the weights do not match.
    let good = s3.put_fixture("loras", "good", "r8-qv");
    let mut pinned = load_uri("pinned", &good);
    pinned.source.as_mut().unwrap().sha256 = "0".repeat(64);
    refused(
        &mut client,
        pinned,
        Code::InvalidArgument,
        &format!("sha256 of adapter_model.safetensors is {}", sha256_hex(&weights)),
    )
    .await;
    let mut malformed = load_uri("pinned", &good);
    malformed.source.as_mut().unwrap().sha256 = "abc".into();
    refused(&mut client, malformed, Code::InvalidArgument, "not 64 hex digits").await;

    let listed = list(&mut client).await;
    assert!(resident(&listed).is_empty(), "{listed:?}");
    assert!(listed.iter().all(|a| a.state() == pb::AdapterState::Failed && !a.error.is_empty()), "{listed:?}");
    assert_eq!(cache_entries(backend.cache.path()), Vec::<String>::new(), "nothing cached, no leftovers");
    // And the good adapter still loads. An adapter naming another base model loads too (its
    // tensors fit), with a warning that says so.
    client.load_adapter(load_uri("good", &good)).await.expect("loads");
    let mut config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf".into();
    let other = s3.put(
        "loras",
        "other-base",
        &[("adapter_config.json", config.to_string().into_bytes()), ("adapter_model.safetensors", weights)],
    );
    let loaded = client.load_adapter(load_uri("other-base", &other)).await.expect("loads").into_inner();
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("trained on \"meta-llama/Llama-2-7b-hf\"") && w.contains("tiny-llama")),
        "{:?}",
        loaded.warnings
    );
}

#[tokio::test]
async fn a_load_in_progress_is_listed_as_fetching_then_resident() {
    let Some(s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/r8-qv", "r8-qv");
    let proxy = Proxy::start_slow(&s3.endpoint, std::time::Duration::from_millis(200)).await;
    let backend = start_backend_with(&tiny_llama(), &[], &s3.env(&proxy.endpoint));
    let (mut client, _) = connect(&backend).await;
    let load = tokio::spawn({
        let mut c = client.clone();
        let req = load_uri("support", &uri);
        async move { c.load_adapter(req).await }
    });
    let mut seen = Vec::new();
    while !load.is_finished() {
        for a in list(&mut client).await {
            if seen.last() != Some(&a.state()) {
                seen.push(a.state());
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    load.await.unwrap().expect("loads");
    assert_eq!(seen.first(), Some(&pb::AdapterState::Fetching), "{seen:?}");
    let listed = list(&mut client).await;
    assert_eq!(
        (listed.len(), listed[0].state(), listed[0].uri.as_str()),
        (1, pb::AdapterState::Resident, uri.as_str())
    );
}

#[tokio::test]
async fn refused_credentials_unreachable_and_dying_servers_are_reported_and_leave_nothing_behind() {
    let Some(s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/r8-qv", "r8-qv");

    // Wrong secret: the server refuses the signature.
    let mut env = s3.env(&s3.endpoint);
    env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret".into()));
    let backend = start_backend_with(&tiny_llama(), &[], &env);
    let (mut client, _) = connect(&backend).await;
    refused(&mut client, load_uri("a", &uri), Code::PermissionDenied, "SignatureDoesNotMatch").await;
    assert!(cache_entries(backend.cache.path()).is_empty());

    // Nothing listening (after the SDK's retries).
    let closed = format!("http://127.0.0.1:{}", free_port());
    let backend = start_backend_with(&tiny_llama(), &[], &s3.env(&closed));
    let (mut client, _) = connect(&backend).await;
    refused(&mut client, load_uri("a", &uri), Code::Unavailable, "is unavailable").await;
    assert!(cache_entries(backend.cache.path()).is_empty());

    // The server dies 64 KiB into a 4 MiB weights file.
    let mut files = adapter_files(&fixture_adapter("r8-qv"));
    files[1].1.resize(4 << 20, 0);
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let big = s3.put("loras", "big", &refs);
    let proxy = Proxy::start(&s3.endpoint, "adapter_model.safetensors", Some(64 << 10)).await;
    let backend = start_backend_with(&tiny_llama(), &[], &s3.env(&proxy.endpoint));
    let (mut client, _) = connect(&backend).await;
    refused(&mut client, load_uri("a", &big), Code::Unavailable, "adapter_model.safetensors").await;
    assert_eq!(cache_entries(backend.cache.path()), Vec::<String>::new(), "no entry and no partial download");
    assert!(resident(&list(&mut client).await).is_empty());
}

#[tokio::test]
async fn a_cache_full_of_adapters_in_use_refuses_a_new_one_until_one_is_unloaded() {
    let Some(s3) = S3Server::start() else { return };
    let a = s3.put_fixture("loras", "a", "r8-qv");
    let b = s3.put_fixture("loras", "b", "r4-patterns");
    let size = |name: &str| adapter_files(&fixture_adapter(name)).iter().map(|(_, b)| b.len()).sum::<usize>();
    // Room for either adapter, not both.
    let budget = (size("r8-qv").max(size("r4-patterns")) * 3 / 2).to_string();
    let backend = start_backend_with(&tiny_llama(), &["--lora-cache-bytes", &budget], &s3.env(&s3.endpoint));
    let (mut client, _) = connect(&backend).await;
    client.load_adapter(load_uri("a", &a)).await.expect("a fits");
    refused(&mut client, load_uri("b", &b), Code::ResourceExhausted, "the adapter cache is full").await;
    assert_eq!(cache_entries(backend.cache.path()).len(), 1);
    assert_eq!(resident(&list(&mut client).await), vec!["a"]);
    // Unloading a unpins its entry, which is then evicted for b.
    client.unload_adapter(pb::UnloadAdapterRequest { name: "a".into(), fence: 0 }).await.expect("unloads");
    client.load_adapter(load_uri("b", &b)).await.expect("b fits now");
    assert_eq!(cache_entries(backend.cache.path()).len(), 1);
    assert_generates(&mut client, "b", "tiny-llama.r4-patterns.1").await;
}

#[tokio::test]
async fn concurrent_downloads_share_the_cache_budget_instead_of_each_taking_all_of_it() {
    let Some(s3) = S3Server::start() else { return };
    let a = s3.put_fixture("loras", "a", "r8-qv");
    let b = s3.put_fixture("loras", "b", "r4-patterns");
    let size = |name: &str| adapter_files(&fixture_adapter(name)).iter().map(|(_, b)| b.len()).sum::<usize>();
    // Room for either adapter, not both.
    let budget = (size("r8-qv").max(size("r4-patterns")) * 3 / 2).to_string();
    // Slow enough that both downloads are under way at once.
    let weights = "adapter_model.safetensors";
    let proxy = Proxy::start_slow_counting(&s3.endpoint, weights, std::time::Duration::from_millis(20)).await;
    let backend = start_backend_with(&tiny_llama(), &["--lora-cache-bytes", &budget], &s3.env(&proxy.endpoint));
    let (client, _) = connect(&backend).await;
    let load = |name: &str, uri: &str| {
        let (mut c, req) = (client.clone(), load_uri(name, uri));
        async move { c.load_adapter(req).await }
    };
    let (ra, rb) = tokio::join!(load("a", &a), load("b", &b));
    let (loaded, refused): (Vec<_>, Vec<_>) = [("a", ra), ("b", rb)].into_iter().partition(|(_, r)| r.is_ok());
    assert_eq!(loaded.len(), 1, "exactly one fits: {loaded:?} {refused:?}");
    let (loser, Err(status)) = &refused[0] else { unreachable!() };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("the adapter cache is full"), "{}", status.message());
    // The refused load stopped before downloading its weights: at no point was more than the
    // budget written.
    assert_eq!(proxy.counted.load(std::sync::atomic::Ordering::SeqCst), 1, "one download of weights");
    assert_eq!(cache_entries(backend.cache.path()).len(), 1);
    // Its reservation was given back with it: once the winner is unloaded, the loser fits.
    let mut client = client;
    let winner = loaded[0].0;
    client.unload_adapter(pb::UnloadAdapterRequest { name: winner.into(), fence: 0 }).await.expect("unloads");
    let uri = if *loser == "a" { &a } else { &b };
    client.load_adapter(load_uri(loser, uri)).await.expect("fits now");
    assert_eq!(cache_entries(backend.cache.path()).len(), 1);
}

#[tokio::test]
async fn an_object_replaced_at_its_source_loads_with_its_new_pin_and_a_wrong_pin_loses_nothing() {
    let Some(s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/support", "r8-qv");
    let backend = start_backend_with(&tiny_llama(), &["--max-loras", "4"], &s3.env(&s3.endpoint));
    let (mut client, _) = connect(&backend).await;
    let weights = |name: &str| std::fs::read(fixture_adapter(name).join("adapter_model.safetensors")).unwrap();
    let pinned = |name: &str, sha: &str| {
        let mut req = load_uri(name, &uri);
        req.source.as_mut().unwrap().sha256 = sha.to_string();
        req
    };
    let (v1, v2) = (sha256_hex(&weights("r8-qv")), sha256_hex(&weights("r4-patterns")));
    assert!(client.load_adapter(pinned("v1", &v1)).await.expect("v1 loads").into_inner().fetched);

    // The object is replaced in place; a load pinned to the new weights fetches them again.
    s3.put_fixture("loras", "team/support", "r4-patterns");
    let again = client.load_adapter(pinned("v2", &v2)).await.expect("the new pin loads").into_inner();
    assert!(again.fetched, "the cached copy had the old weights");
    assert_generates(&mut client, "v2", "tiny-llama.r4-patterns.1").await;
    assert_generates(&mut client, "v1", "tiny-llama.r8-qv.2").await;

    // A pin the source does not have is refused by name, and the cached copy stays.
    let wrong = "0".repeat(64);
    refused(&mut client, pinned("wrong", &wrong), Code::InvalidArgument, &format!("the request pins {wrong}")).await;
    let hit = client.load_adapter(pinned("v2-again", &v2)).await.expect("still cached").into_inner();
    assert!(!hit.fetched);
    assert_eq!(cache_entries(backend.cache.path()).len(), 1);
}

#[tokio::test]
async fn an_adapter_evicted_from_its_slot_keeps_its_cached_files_and_reloads_without_its_source() {
    let Some(mut s3) = S3Server::start() else { return };
    let a = s3.put_fixture("loras", "a", "r8-qv");
    let b = s3.put_fixture("loras", "b", "r4-patterns");
    let c = s3.put_fixture("loras", "c", "r2-k-down");
    let size = |name: &str| adapter_files(&fixture_adapter(name)).iter().map(|(_, b)| b.len()).sum::<usize>();
    // Room for a and b, not for c as well.
    let budget = (size("r8-qv") + size("r4-patterns") + size("r2-k-down") / 2).to_string();
    let flags = ["--max-loras", "1", "--lora-cache-bytes", &budget];
    let backend = start_backend_with(&tiny_llama(), &flags, &s3.env(&s3.endpoint));
    let (mut client, _) = connect(&backend).await;
    client.load_adapter(load_uri("a", &a)).await.expect("a loads");
    client.load_adapter(load_uri("b", &b)).await.expect("b loads");
    let state = |listed: &[pb::AdapterInfo], name: &str| listed.iter().find(|i| i.name == name).map(|i| i.state());
    assert_eq!(state(&list(&mut client).await, "a"), Some(pb::AdapterState::Evicted), "one slot: a left it for b");
    // a is still loaded, so its cache entry is not room for c.
    refused(&mut client, load_uri("c", &c), Code::ResourceExhausted, "pinned by loaded adapters").await;
    // With the source gone, a request for a loads it again from the cache.
    s3.server.kill();
    assert_generates(&mut client, "a", "tiny-llama.r8-qv.2").await;
    assert_eq!(resident(&list(&mut client).await), vec!["a"]);
}

#[tokio::test]
async fn cached_adapters_survive_a_restart_and_load_without_their_source() {
    let Some(mut s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/r8-qv", "r8-qv");
    let cache = tempfile::tempdir().unwrap();
    let mut env = s3.env(&s3.endpoint);
    env.push(("SWITCHYARD_LORA_CACHE_DIR", cache.path().display().to_string()));
    {
        let backend = start_backend_with(&tiny_llama(), &[], &env);
        let (mut client, _) = connect(&backend).await;
        assert!(client.load_adapter(load_uri("a", &uri)).await.expect("loads").into_inner().fetched);
    }
    s3.server.kill();
    let backend = start_backend_with(&tiny_llama(), &[], &env);
    let (mut client, _) = connect(&backend).await;
    let again = client.load_adapter(load_uri("a", &uri)).await.expect("loads from the cache").into_inner();
    assert!(!again.fetched);
    assert_generates(&mut client, "a", "tiny-llama.r8-qv.3").await;
}

#[tokio::test]
async fn a_failed_hot_swap_leaves_the_old_adapter_serving() {
    let Some(s3) = S3Server::start() else { return };
    let v1 = s3.put_fixture("loras", "support/v1", "r8-qv");
    let v2 = s3.put_fixture("loras", "support/v2", "r4-patterns");
    let mut files = adapter_files(&fixture_adapter("r8-qv"));
    files[0].1 = b"{not json".to_vec();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let broken = s3.put("loras", "support/v3", &refs);
    let backend = start_backend_with(&tiny_llama(), &["--max-loras", "2"], &s3.env(&s3.endpoint));
    let (mut client, _) = connect(&backend).await;
    client.load_adapter(load_uri("support", &v1)).await.expect("v1");
    refused(
        &mut client,
        load_uri("support", &broken),
        Code::InvalidArgument,
        "adapter_config.json: key must be a string",
    )
    .await;
    assert_generates(&mut client, "support", "tiny-llama.r8-qv.0").await;
    let states: Vec<(String, pb::AdapterState)> =
        list(&mut client).await.iter().map(|a| (a.uri.clone(), a.state())).collect();
    assert_eq!(states, vec![(v1.clone(), pb::AdapterState::Resident), (broken, pb::AdapterState::Failed)]);
    let swapped = client.load_adapter(load_uri("support", &v2)).await.expect("v2").into_inner();
    assert!(swapped.hot_swap);
    assert_generates(&mut client, "support", "tiny-llama.r4-patterns.0").await;
    let states: Vec<(String, pb::AdapterState)> =
        list(&mut client).await.iter().map(|a| (a.uri.clone(), a.state())).collect();
    assert_eq!(states, vec![(v2, pb::AdapterState::Resident)]);
}

#[tokio::test]
async fn file_adapters_outside_the_allowed_roots_are_refused() {
    // The root holds one real adapter and a symlink to an adapter outside it.
    let root = tempfile::tempdir().unwrap();
    let root_path = root.path().canonicalize().unwrap();
    std::fs::create_dir(root_path.join("mine")).unwrap();
    for (name, bytes) in adapter_files(&fixture_adapter("r8-qv")) {
        std::fs::write(root_path.join("mine").join(name), bytes).unwrap();
    }
    std::os::unix::fs::symlink(fixture_adapter("r4-patterns"), root_path.join("escape")).unwrap();
    let env = [("SWITCHYARD_ADAPTER_ROOTS", root_path.display().to_string())];
    let backend = start_backend_with(&tiny_llama(), &[], &env);
    let (mut client, _) = connect(&backend).await;

    let file = |p: &str| format!("file://{}/{p}", root_path.display());
    client.load_adapter(load_uri("mine", &file("mine"))).await.expect("inside the root");
    let outside = format!("file://{}", fixture_adapter("r4-patterns").display());
    refused(&mut client, load_uri("x", &outside), Code::PermissionDenied, "outside the allowed roots").await;
    refused(&mut client, load_uri("x", &file("escape")), Code::PermissionDenied, "resolves to").await;
    refused(&mut client, load_uri("x", &file("../etc")), Code::InvalidArgument, "must not contain '..'").await;
    refused(&mut client, load_uri("x", "file://relative/path"), Code::InvalidArgument, "absolute path").await;
    assert_eq!(resident(&list(&mut client).await), vec!["mine"]);
}

#[tokio::test]
async fn a_load_whose_caller_gives_up_still_finishes_and_is_recorded() {
    let Some(s3) = S3Server::start() else { return };
    let uri = s3.put_fixture("loras", "team/r8-qv", "r8-qv");
    let proxy = Proxy::start_slow(&s3.endpoint, std::time::Duration::from_millis(200)).await;
    let backend = start_backend_with(&tiny_llama(), &[], &s3.env(&proxy.endpoint));
    let (mut client, _) = connect(&backend).await;
    let mut impatient = tonic::Request::new(load_uri("support", &uri));
    impatient.set_timeout(std::time::Duration::from_millis(100));
    let gave_up = client.load_adapter(impatient).await.expect_err("the deadline passes first");
    assert!(matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled), "{gave_up:?}");
    // The load runs to its end anyway: resident, recorded, usable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while resident(&list(&mut client).await).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the load never finished: {:?}", list(&mut client).await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_generates(&mut client, "support", "tiny-llama.r8-qv.1").await;
    let again = client.load_adapter(load_uri("support", &uri)).await.expect("loads").into_inner();
    assert!(again.already_loaded && !again.adapter.unwrap().sha256.is_empty());
}
