//! End to end, the way users meet Switchyard: the real `switchyard` binary started as separate
//! processes on free ports (`switchyard up`, or a backend and a gateway), a real S3-compatible
//! server (`s3s-fs`) and a real Hugging Face Hub mirror (`olah`), the real SmolLM2-135M-Instruct
//! with the demo adapters, and only public interfaces: the official `openai` SDK for inference
//! (`tests/python/e2e_client.py`), plain HTTP for `/v1/loras` and `/v1/policies`, `grpcurl` for
//! the backend's health, `switchyard token` for tokens.
//!
//! Needs what `.ci/run` installs (`scripts/fetch-smollm2`, `scripts/install-test-servers`);
//! without it each test is skipped with a message, unless CI's `SWITCHYARD_REQUIRE_*` say
//! otherwise.

#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../cli/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn demo_adapters() -> PathBuf {
    fixtures().join("adapters/smollm2")
}

fn e2e_client() -> PathBuf {
    fixtures().join("../tests/python/e2e_client.py")
}

/// `grpcurl` asks the backend's standard health service: over mutual TLS with the certificates
/// in `tls` (the `tls/` of a `switchyard up` data dir), else in plaintext.
fn assert_serving(grpcurl: &Path, backend: &str, tls: Option<&Path>) {
    let mut cmd = Command::new(grpcurl);
    match tls {
        Some(dir) => cmd
            .arg("-cacert")
            .arg(dir.join("ca.pem"))
            .arg("-cert")
            .arg(dir.join("gateway.pem"))
            .arg("-key")
            .arg(dir.join("gateway.key")),
        None => cmd.arg("-plaintext"),
    };
    let out = cmd.args(["-d", "{}", backend, "grpc.health.v1.Health/Check"]).output().expect("grpcurl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("SERVING"), "health of {backend}: {text} {out:?}");
}

/// `switchyard token` with `args`.
fn token(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("token").args(args).output().expect("switchyard token runs");
    assert!(out.status.success(), "switchyard token {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// `e2e_client.py ask`: one question as the tenant of `acme_token`, streamed and not.
fn ask(python: &Path, url: &str, acme_token: &str, model: &str, kind: &str) -> Output {
    Command::new(python)
        .arg(e2e_client())
        .args(["ask", url, model, kind])
        .env("ACME_TOKEN", acme_token)
        .output()
        .expect("python runs")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn up_routes_two_tenants_to_different_adapters_and_follows_policy_loads_and_unloads() {
    let (Some(python), Some(grpcurl), Some(_)) = (test_python(), tool("SWITCHYARD_GRPCURL", "grpcurl"), smollm2())
    else {
        return;
    };
    let data = tempfile::tempdir().expect("data dir");
    let up = start_up(data.path(), &[]);
    // The backend speaks only mutual TLS: plaintext does not reach it; the data dir's certificates do.
    let plaintext = Command::new(&grpcurl)
        .args(["-plaintext", "-d", "{}", &up.backend, "grpc.health.v1.Health/Check"])
        .output()
        .expect("grpcurl runs");
    assert!(!plaintext.status.success(), "up's backend answered plaintext");
    assert_serving(&grpcurl, &up.backend, Some(&data.path().join("tls")));
    let data_dir = data.path().to_str().expect("utf-8 path");

    // What the README's quickstart does: the printed tokens, the openai SDK, curl-style HTTP;
    // and a token `switchyard token` mints for a tenant the demo does not configure.
    let mallory = token(&["--data-dir", data_dir, "--tenant", "mallory", "--scope", "lora:read"]);
    let out = Command::new(&python)
        .arg(e2e_client())
        .args(["demo", &up.url])
        .arg(demo_adapters())
        .envs(up.tokens.iter().cloned())
        .env("MALLORY_TOKEN", mallory)
        .env("METRICS_URL", format!("{}/metrics", up.metrics))
        .output()
        .expect("python runs");
    assert_ok(&out, "the demo scenarios");

    // `switchyard token` signs with the key `up` made for this data dir.
    let acme = token(&["--data-dir", data_dir, "--tenant", "acme"]);
    assert_ok(&ask(&python, &up.url, &acme, "uppercase", "uppercase"), "a token from switchyard token");
    interrupt(up);

    // Started again on the same data dir, the stack is as it was left: the swapped routes, the
    // french adapter unloaded, the same signing key.
    let up = start_up(data.path(), &[]);
    let out = ask(&python, &up.url, &acme, "french", "french");
    assert!(!out.status.success(), "french was unloaded before the restart, yet it answered");
    let globex = token(&["--data-dir", data_dir, "--tenant", "globex"]);
    assert_ok(&ask(&python, &up.url, &globex, "assistant", "uppercase"), "globex's route survives a restart");
    interrupt(up);
}

/// Structured outputs and tool calls through the official SDK, on SmolLM2 with and without a demo
/// adapter (`tests/python/structured_client.py`).
#[test]
fn up_answers_pydantic_models_json_mode_and_choices_through_the_sdk() {
    let (Some(python), Some(_)) = (test_python(), smollm2()) else {
        return;
    };
    let data = tempfile::tempdir().expect("data dir");
    let up = start_up(data.path(), &[]);
    let out = Command::new(&python)
        .arg(fixtures().join("../tests/python/structured_client.py"))
        .args(["run", &up.url])
        .arg(demo_adapters())
        .envs(up.tokens.iter().cloned())
        .output()
        .expect("python runs");
    assert_ok(&out, "the structured-output scenarios");
    interrupt(up);
}

#[test]
fn up_refuses_a_busy_port_an_unwritable_data_dir_and_a_missing_model_in_one_line() {
    let data = tempfile::tempdir().expect("data dir");
    let run = |args: &[&str], env: &[(&str, String)]| {
        let out = Command::new(BIN)
            .arg("up")
            .arg("--no-demo")
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .output()
            .expect("switchyard up runs");
        assert!(!out.status.success(), "switchyard up {args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line, got:\n{stderr}");
        assert!(out.stdout.is_empty(), "nothing printed as if ready: {}", String::from_utf8_lossy(&out.stdout));
        errors[0].to_string()
    };
    let data_dir = data.path().join("state");
    let data_arg = data_dir.to_str().expect("utf-8 path");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let port = busy.local_addr().expect("addr").to_string();
    let e = run(&["--data-dir", data_arg, "--listen", &port, "--backend-listen", "127.0.0.1:0"], &[]);
    assert!(e.contains("port is in use") && e.contains("--listen"), "{e}");
    let e = run(&["--data-dir", data_arg, "--listen", "127.0.0.1:0", "--backend-listen", &port], &[]);
    assert!(e.contains("port is in use") && e.contains("--backend-listen"), "{e}");

    let file = data.path().join("a-file");
    std::fs::write(&file, b"").expect("write");
    let e = run(&["--data-dir", &file.join("state").display().to_string(), "--listen", "127.0.0.1:0"], &[]);
    assert!(e.contains("cannot write the data dir") && e.contains("--data-dir"), "{e}");

    // No cached model, and pip cannot reach an index; an earlier fetch was interrupted.
    let cache = tempfile::tempdir().expect("cache");
    std::fs::create_dir_all(cache.path().join("models/.fetch-interrupted")).expect("mkdir");
    let closed = free_port();
    let offline = [
        ("SWITCHYARD_CACHE", cache.path().display().to_string()),
        ("PIP_INDEX_URL", format!("http://127.0.0.1:{closed}/simple")),
        ("PIP_FIND_LINKS", String::new()),
        ("PIP_NO_CACHE_DIR", "1".to_string()),
    ];
    let e = run(&["--data-dir", data_arg, "--listen", "127.0.0.1:0", "--backend-listen", "127.0.0.1:0"], &offline);
    assert!(e.contains("cannot fetch the model") && e.contains("--model"), "{e}");
    let models = cache.path().join("models");
    let left: Vec<_> =
        std::fs::read_dir(&models).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "a failed fetch leaves nothing in the cache, and clears what one left: {left:?}");
    // Nothing was left listening on the ports it was given.
    assert!(std::net::TcpStream::connect(&port).is_ok(), "the test's own listener is still there");
}

/// A random HS256 secret (64 hex digits) for one test's gateway.
fn random_secret() -> String {
    use std::hash::{BuildHasher, RandomState};
    (0..4).map(|i| format!("{:016x}", RandomState::new().hash_one(i))).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn adapters_from_s3_and_the_hub_serve_and_survive_a_backend_restart() {
    let (Some(python), Some(grpcurl), Some(model)) = (test_python(), tool("SWITCHYARD_GRPCURL", "grpcurl"), smollm2())
    else {
        return;
    };
    let (Some(s3), Some(hf)) = (S3Server::start(), HfMirror::start()) else { return };
    s3.put(
        "demo-loras",
        "uppercase",
        &adapter_files(&demo_adapters().join("uppercase"))
            .iter()
            .map(|(n, b)| (n.as_str(), b.clone()))
            .collect::<Vec<_>>(),
    );
    hf.commit("switchyard/french", &adapter_files(&demo_adapters().join("french")), None);

    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("hs256.secret");
    std::fs::write(&secret, random_secret()).expect("secret");
    let config = dir.path().join("tenants.toml");
    std::fs::write(
        &config,
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"s3://demo-loras/\", \"hf://switchyard/\"]\n\n\
         [tenants.acme]\nadapters = [\"shout\", \"parle\"]\n",
    )
    .expect("config");
    let hf_home = dir.path().join("hf");
    let mut env = s3.env(&s3.endpoint);
    env.extend(hf.env(&hf_home));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = || start_backend_with(&model, &["--listen", &listen], &env);
    let backend = start();
    let state = dir.path().join("state");
    let key = secret.to_str().expect("utf-8 path");
    let gw = start_gateway(
        &[&listen],
        &[
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
            "--jwt-hs256-secret-file",
            key,
        ],
    );
    let ops = token(&["--secret-file", key, "--tenant", "ops", "--scope", "lora:load lora:read"]);
    let acme = token(&["--secret-file", key, "--tenant", "acme"]);
    assert_serving(&grpcurl, &listen, None);

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{}/readyz", gw.url)).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "the gateway never saw the backend healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, uri) in [("shout", "s3://demo-loras/uppercase"), ("parle", "hf://switchyard/french")] {
        load_uri_through_gateway(&http, &gw, &ops, name, uri).await;
    }
    assert_ok(&ask(&python, &gw.url, &acme, "shout", "uppercase"), "the adapter from S3");
    assert_ok(&ask(&python, &gw.url, &acme, "parle", "french"), "the adapter from the Hub");

    // The backend dies and comes back on the same address with an empty adapter cache: the
    // gateway notices, loads both again (from S3 and the Hub), and requests succeed again
    // without anyone calling the adapter API.
    drop(backend);
    let backend = start();
    assert_serving(&grpcurl, &backend.addr, None);
    let deadline = Instant::now() + Duration::from_secs(90);
    for (model, kind) in [("shout", "uppercase"), ("parle", "french")] {
        loop {
            let out = ask(&python, &gw.url, &acme, model, kind);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no recovery after the backend restart: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let listing: serde_json::Value = http
        .get(format!("{}/v1/loras", gw.url))
        .bearer_auth(&ops)
        .send()
        .await
        .expect("lists")
        .json()
        .await
        .expect("json");
    for a in listing["adapters"].as_array().expect("adapters") {
        assert_eq!(a["backends"][0]["state"], "resident", "after recovery: {a}");
    }
}

#[tokio::test]
async fn two_gateways_on_one_etcd_store_serve_what_either_was_told() {
    let (Some(python), Some(model)) = (test_python(), smollm2()) else { return };
    let Some(cluster) = support::etcd::EtcdCluster::start(3) else { return };
    let backend = start_backend_with(&model, &[], &[]);
    let tenants = format!(
        "[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [\"file://{}/\"]\n\n\
         [tenants.acme]\nadapters = [\"uppercase\", \"french\"]\n",
        demo_adapters().display()
    );
    let store = cluster.url("e2e");
    let GatewayPair { a, b, dirs: _dirs, .. } = two_gateways(&[&backend.addr], &tenants, &["--store", &store]).await;
    let out = Command::new(&python)
        .arg(e2e_client())
        .args(["fleet", &a.url, &b.url])
        .arg(demo_adapters())
        .arg(built_policies().join("tenant_map.wasm"))
        .env("OPS_TOKEN", support::token("ops", "lora:load lora:read policy:deploy"))
        .env("ACME_TOKEN", support::token("acme", ""))
        .output()
        .expect("python runs");
    assert_ok(&out, "the fleet scenarios");
}
