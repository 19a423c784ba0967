//! Routing policies as their authors and operators use them: the example components built
//! from `policies/`, checked with `switchyard policy test`, then deployed through the gateway's
//! API in front of a real backend, where the adapter each one picks must be the adapter that
//! generated the answer.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use switchyard_proto::v1 as pb;

fn built() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/build-policies")).output().expect("scripts/build-policies runs");
    assert!(out.status.success(), "building the policies failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The JavaScript policies, componentized; `None` (skipped, saying so) without
/// componentize-js, unless `SWITCHYARD_REQUIRE_TEST_CLIENTS` is set, as CI does.
fn built_js() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/build-js-policies")).output().expect("scripts/build-js-policies runs");
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_TEST_CLIENTS").is_none(),
            "building the JS policies failed: {why}"
        );
        eprintln!("skipped: JavaScript policies not built: {why}");
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/examples").join(name)
}

fn policy_test(wasm: &PathBuf, config: &PathBuf, cases: &PathBuf) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["policy", "test"])
        .arg(wasm)
        .arg("--config")
        .arg(config)
        .arg("--cases")
        .arg(cases)
        .output()
        .expect("switchyard runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn policy_test_checks_each_example_against_its_recorded_cases() {
    let dir = built();
    for name in ["tenant-map", "canary", "claims-route", "prefix-affinity", "task-route"] {
        let wasm = dir.join(format!("{}.wasm", name.replace('-', "_")));
        let (ok, out) = policy_test(&wasm, &example(name).join("config.json"), &example(name).join("cases.json"));
        assert!(ok, "{name}:\n{out}");
        assert!(out.contains(" passed, 0 failed"), "{out}");
    }
    // The JavaScript tenant-map, against the same WIT, meets the Rust one's cases.
    if let Some(js) = built_js() {
        let (ok, out) = policy_test(
            &js.join("tenant-map.wasm"),
            &example("tenant-map").join("config.json"),
            &example("tenant-map").join("cases.json"),
        );
        assert!(ok, "tenant-map (JavaScript):\n{out}");
    }
    // A case the policy does not meet fails the command, naming the case.
    let tmp = tempfile::tempdir().unwrap();
    let cases = tmp.path().join("cases.json");
    std::fs::write(
        &cases,
        r#"[{"name": "acme is refused", "request": {"tenant": "acme", "model": "x"},
             "expect": {"reject": {"status": 403}}}]"#,
    )
    .unwrap();
    let (ok, out) = policy_test(&dir.join("tenant_map.wasm"), &example("tenant-map").join("config.json"), &cases);
    assert!(!ok);
    assert!(out.contains("FAIL acme is refused: route to acme/support"), "{out}");
}

const SECRET: &[u8] = b"policy-test-secret-policy-test-secret";

fn token(tenant: &str, scope: &str, extra: Value) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut claims = json!({"tenant": tenant, "scope": scope, "exp": now + 600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

const PROMPT: &str = "Tell me about the sea";

/// What `adapter` generates for the test prompt, asked of the backend directly.
async fn direct(backend: &Backend, adapter: &str) -> String {
    let (mut client, _) = connect(backend).await;
    let request = pb::GenerateRequest {
        adapter: adapter.into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage { role: "user".into(), content: PROMPT.into(), ..Default::default() }],
            add_generation_prompt: true,
            ..Default::default()
        })),
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_p: 1.0, ..Default::default() }),
        max_tokens: 8,
        ..Default::default()
    };
    collect(&mut client, request).await.expect("direct generation").1
}

async fn chat(http: &reqwest::Client, gw: &Gateway, token: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = http.post(format!("{}/v1/chat/completions", gw.url)).bearer_auth(token).json(&json!({
        "model": "support", "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": PROMPT}]
    }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("gateway answers");
    (r.status().as_u16(), r.json().await.expect("json"))
}

async fn deploy(http: &reqwest::Client, gw: &Gateway, ops: &str, wasm: PathBuf, name: &str, config: Value) {
    let r = http
        .post(format!("{}/v1/policies?name={name}", gw.url))
        .bearer_auth(ops)
        .body(std::fs::read(wasm).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["policy"]["id"].as_str().unwrap().to_string();
    let r = http
        .post(format!("{}/v1/policies/{id}/activate", gw.url))
        .bearer_auth(ops)
        .json(&json!({"tenant": "acme", "config": config}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test]
async fn the_example_policies_route_real_requests_to_the_adapters_they_choose() {
    let dir = built();
    let backend = start_backend(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[tenants.ops]\nadapters = [\"*\"]\nadmin = true\nload_prefixes = [\"file://{}/\"]\n\n\
             [tenants.acme]\nadapters = [\"acme/*\"]\n",
            fixtures().join("adapters").display()
        ),
    )
    .unwrap();
    let gw = start_gateway(
        &[&backend.addr],
        &[
            "--state-dir",
            &tmp.path().join("state").display().to_string(),
            "--config",
            &config.display().to_string(),
            "--jwt-hs256-secret-file",
            &secret.display().to_string(),
            "--policy-headers",
            "x-user",
        ],
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(format!("{}/readyz", gw.url)).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "the gateway never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ops = token("ops", "lora:load policy:deploy", json!({}));
    let adapters = [
        ("acme/support", "r8-qv"),
        ("acme/support-v1", "r16-all-rslora"),
        ("acme/support-v2", "r4-patterns"),
        ("acme/pro", "r32-mlp-regex"),
        ("acme/free", "r2-k-down"),
    ];
    for (name, fixture) in adapters {
        load_through_gateway(&http, &gw, &ops, name, fixture).await;
    }
    let text = |v: &Value| v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
    let acme = token("acme", "", json!({}));

    // Without a policy, "support" is no model of acme's.
    assert_eq!(chat(&http, &gw, &acme, &[]).await.0, 404);

    deploy(&http, &gw, &ops, dir.join("tenant_map.wasm"), "tenant-map", json!({"tenants": {"acme": "acme/support"}}))
        .await;
    let (status, body) = chat(&http, &gw, &acme, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&body), direct(&backend, "acme/support").await);

    let canary =
        json!({"stable": "acme/support-v1", "canary": "acme/support-v2", "percent": 50, "sticky": "header:x-user"});
    deploy(&http, &gw, &ops, dir.join("canary.wasm"), "canary", canary).await;
    let (v1, v2) = (direct(&backend, "acme/support-v1").await, direct(&backend, "acme/support-v2").await);
    assert_ne!(v1, v2, "the two versions must answer differently for this test to mean anything");
    assert_eq!(text(&chat(&http, &gw, &acme, &[("x-user", "dave")]).await.1), v1);
    assert_eq!(text(&chat(&http, &gw, &acme, &[("x-user", "alice")]).await.1), v2);

    let claims = json!({"claim": "plan", "routes": {"pro": "acme/pro", "free": "acme/free"}});
    deploy(&http, &gw, &ops, dir.join("claims_route.wasm"), "claims-route", claims).await;
    let pro = token("acme", "", json!({"plan": "pro"}));
    assert_eq!(text(&chat(&http, &gw, &pro, &[]).await.1), direct(&backend, "acme/pro").await);
    let free = token("acme", "", json!({"plan": ["free"]}));
    assert_eq!(text(&chat(&http, &gw, &free, &[]).await.1), direct(&backend, "acme/free").await);
    let (status, body) = chat(&http, &gw, &acme, &[]).await;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("no_route")), "{body}");
}
