//! The gateway as users meet it: real `switchyard backend` and `switchyard gateway` processes,
//! the official `openai` SDK and PyJWT-minted tokens (`tests/python/gateway_client.py`), and a
//! backend killed and restarted under a running gateway.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;
use switchyard_proto::v1 as pb;

const ISSUER: &str = "https://issuer.switchyard.test";
const AUDIENCE: &str = "switchyard";

fn write_config(dir: &Path) -> String {
    let config = dir.join("gateway.toml");
    let adapters = fixtures().join("adapters");
    std::fs::write(
        &config,
        format!(
            "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"file://{}/\"]\n\n\
             [tenants.acme]\nadapters = [\"acme/*\"]\n\n[tenants.beta]\nadapters = [\"beta/*\"]\n",
            adapters.display()
        ),
    )
    .expect("config");
    config.display().to_string()
}

/// A gateway in front of `backend` with the test tenants, a state dir in `dir`, the test
/// issuer and audience, and `auth` (the key flags).
fn start_test_gateway(backend: &str, dir: &Path, auth: &[&str]) -> Gateway {
    let state = dir.join("state").display().to_string();
    let config = write_config(dir);
    let mut flags =
        vec!["--state-dir", &state, "--config", &config, "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE];
    flags.extend_from_slice(auth);
    start_gateway(&[backend], &flags)
}

async fn wait_until(what: &str, timeout: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn readyz(http: &reqwest::Client, gw: &Gateway) -> u16 {
    http.get(format!("{}/readyz", gw.url)).send().await.map_or(0, |r| r.status().as_u16())
}

#[tokio::test]
async fn the_openai_sdk_with_pyjwt_tokens_works_through_the_gateway() {
    let Some(python) = test_python() else { return };
    let script = fixtures().join("../tests/python/gateway_client.py");
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    let status = Command::new(&python).arg(&script).arg("keys").arg(&keys).status().expect("python runs");
    assert!(status.success(), "key generation failed");

    let backend = start_backend(&[]);
    let key = |f: &str| keys.join(f).display().to_string();
    let gw = start_test_gateway(
        &backend.addr,
        dir.path(),
        &[
            "--jwt-hs256-secret-file",
            &key("hs256.secret"),
            "--jwt-public-key",
            &format!("RS256={}", key("rs256.pub")),
            "--jwt-public-key",
            &format!("ES256={}", key("es256.pub")),
            "--jwt-public-key",
            &format!("EdDSA={}", key("eddsa.pub")),
        ],
    );
    let http = reqwest::Client::new();
    wait_until("the gateway is ready", Duration::from_secs(30), async || readyz(&http, &gw).await == 200).await;

    let out = Command::new(&python)
        .arg(&script)
        .args(["run", &gw.url])
        .arg(&keys)
        .arg(fixture_adapter("r8-qv"))
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "a client check failed:\n{stdout}");
    assert!(stdout.contains("checks passed"));
}

const SECRET: &[u8] = b"restart-test-secret-restart-test-secret";

fn token(tenant: &str, scope: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "tenant": tenant, "scope": scope, "exp": now + 600});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET).expect("key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
}

fn chat_body(model: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 8,
           "messages": [{"role": "user", "content": "Tell me about the sea"}]})
}

async fn chat(http: &reqwest::Client, gw: &Gateway, tok: &str, model: &str) -> (u16, Value, Option<String>) {
    let r = http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(tok)
        .json(&chat_body(model))
        .send()
        .await
        .expect("gateway answers");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, r.json().await.expect("json body"), retry_after)
}

async fn loras(http: &reqwest::Client, gw: &Gateway, tok: &str) -> Value {
    http.get(format!("{}/v1/loras", gw.url)).bearer_auth(tok).send().await.expect("answers").json().await.expect("json")
}

#[tokio::test]
async fn a_restarted_backend_is_marked_unhealthy_then_gets_its_adapters_back() {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut backend = start_backend(&["--listen", &listen]);
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let gw = start_test_gateway(&listen, dir.path(), &["--jwt-hs256-secret-file", &secret.display().to_string()]);
    let http = reqwest::Client::new();
    wait_until("the gateway is ready", Duration::from_secs(30), async || readyz(&http, &gw).await == 200).await;
    let admin = token("ops", "lora:load lora:read");
    let acme = token("acme", "");

    load_through_gateway(&http, &gw, &admin, "acme/support", "r8-qv").await;

    // Through the gateway, the adapter's output is the backend's own.
    let (status, body, _) = chat(&http, &gw, &acme, "acme/support").await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    let (mut client, _) = connect(&backend).await;
    let direct = pb::GenerateRequest {
        adapter: "acme/support".into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Tell me about the sea".into(),
                ..Default::default()
            }],
            add_generation_prompt: true,
            ..Default::default()
        })),
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_p: 1.0, ..Default::default() }),
        max_tokens: 8,
        ..Default::default()
    };
    let (_, direct_text, _, _) = collect(&mut client, direct).await.expect("direct generation");
    assert_eq!(text, direct_text);

    // The backend dies: the gateway notices, and answers 503 with Retry-After.
    drop(backend);
    wait_until("the gateway marks the backend unhealthy", Duration::from_secs(15), async || {
        readyz(&http, &gw).await == 503
    })
    .await;
    let (status, body, retry_after) = chat(&http, &gw, &acme, "acme/support").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "service_unavailable_error");
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert_eq!(loras(&http, &gw, &admin).await["adapters"][0]["backends"][0]["healthy"], false);

    // It comes back on the same address knowing no adapter; the gateway re-applies the
    // desired set by itself.
    backend = start_backend(&["--listen", &listen]);
    wait_until("the adapter is resident again", Duration::from_secs(30), async || {
        loras(&http, &gw, &admin).await["adapters"][0]["backends"][0]["state"] == "resident"
    })
    .await;
    let (mut client, _) = connect(&backend).await;
    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner().adapters;
    assert!(
        listed.iter().any(|a| a.name == "acme/support" && a.state() == pb::AdapterState::Resident),
        "the restarted backend has the adapter: {listed:?}"
    );
    let (status, body, _) = chat(&http, &gw, &acme, "acme/support").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], text.as_str());
}

/// `switchyard token` mints what the gateway accepts: the tenant, the scopes, the issuer and
/// audience it checks.
#[tokio::test]
async fn switchyard_token_mints_tokens_the_gateway_accepts() {
    let backend = start_backend(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let secret_flag = secret.display().to_string();
    let gw = start_test_gateway(&backend.addr, dir.path(), &["--jwt-hs256-secret-file", &secret_flag]);
    let mint = |tenant: &str, scope: &str, issuer: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["token", "--secret-file", &secret_flag, "--tenant", tenant, "--scope", scope])
            .args(["--issuer", issuer, "--audience", AUDIENCE])
            .output()
            .expect("switchyard runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let http = reqwest::Client::new();
    wait_until("the gateway is ready", Duration::from_secs(30), async || readyz(&http, &gw).await == 200).await;
    let get = async |token: &str| {
        http.get(format!("{}/v1/loras", gw.url)).bearer_auth(token).send().await.expect("answers").status().as_u16()
    };
    assert_eq!(get(&mint("ops", "lora:read", ISSUER)).await, 200);
    assert_eq!(get(&mint("ops", "", ISSUER)).await, 403, "no scope");
    assert_eq!(get(&mint("ops", "lora:read", "https://elsewhere.test")).await, 401, "wrong issuer");
    let short = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["token", "--secret-file", &secret_flag, "--tenant", "ops", "--ttl", "0"])
        .output()
        .expect("switchyard runs");
    assert!(!short.status.success());
}
