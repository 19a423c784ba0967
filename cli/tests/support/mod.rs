//! What the `switchyard` binary's tests share: starting the backend as a user does, talking to
//! it with a real gRPC client, and the real servers adapter sources are tested against
//! (`s3s-fs` for S3, `olah` for the Hugging Face Hub) plus a TCP proxy that counts requests or
//! dies mid-download.

#![allow(dead_code)] // each test binary uses a different part

pub mod etcd;

use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::backend_client::BackendClient;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures").canonicalize().expect("fixtures exist")
}

pub fn fixture_adapter(name: &str) -> PathBuf {
    fixtures().join("adapters/tiny-llama").join(name)
}

#[derive(Deserialize)]
pub struct Case {
    pub key: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

/// A golden case of the tiny models (`scripts/golden/make_fixtures.py`).
pub fn case(key: &str) -> Case {
    let text = std::fs::read_to_string(fixtures().join("golden/cases.json")).expect("cases.json");
    let g: Golden = serde_json::from_str(&text).expect("parses");
    g.cases.into_iter().find(|c| c.key == key).expect("case exists")
}

/// A running `switchyard backend`; killed on drop.
pub struct Backend {
    child: Child,
    pub addr: String,
    /// `http://host:port` of `/metrics`, when started with `--metrics-listen`.
    pub metrics: Option<String>,
    /// The adapter disk cache (`--lora-cache-dir`), unless the test chose its own.
    pub cache: tempfile::TempDir,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend {
    /// The process's resident memory in bytes (`VmRSS`), where the OS reports it (Linux).
    pub fn resident_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    }
}

pub fn start_backend(extra: &[&str]) -> Backend {
    start_backend_with(&fixtures().join("models/tiny-llama"), extra, &[])
}

/// Starts the backend on `model` with extra flags and environment. File adapters may come from
/// the fixtures; the adapter cache is a fresh temp dir (an env entry may override either).
pub fn start_backend_with(model: &Path, extra: &[&str], env: &[(&str, String)]) -> Backend {
    let cache = tempfile::tempdir().expect("cache dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("backend").arg("--model").arg(model);
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .env("SWITCHYARD_ADAPTER_ROOTS", fixtures())
        .env("SWITCHYARD_LORA_CACHE_DIR", cache.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("switchyard binary starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reads the listening line");
    let addr = line.trim().rsplit(' ').next().expect("address").to_string();
    assert!(line.starts_with("switchyard backend listening on "), "unexpected first line: {line:?}");
    let metrics = extra.contains(&"--metrics-listen").then(|| {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("reads the metrics line");
        let addr = line.trim().strip_prefix("switchyard backend metrics on ");
        format!("http://{}", addr.unwrap_or_else(|| panic!("unexpected line: {line:?}")))
    });
    Backend { child, addr, metrics, cache }
}

pub async fn connect(b: &Backend) -> (BackendClient<Channel>, HealthClient<Channel>) {
    let channel = Channel::from_shared(format!("http://{}", b.addr)).expect("uri").connect().await.expect("connects");
    (BackendClient::new(channel.clone()), HealthClient::new(channel))
}

pub fn load_uri(name: &str, uri: &str) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        name: name.into(),
        source: Some(pb::AdapterSource { uri: uri.into(), ..Default::default() }),
        scope: None,
        fence: 0,
    }
}

/// Loads a fixture adapter of the tiny Llama by `file://`.
pub fn load_req(name: &str, adapter: &str) -> pb::LoadAdapterRequest {
    load_uri(name, &format!("file://{}", fixture_adapter(adapter).display()))
}

pub fn greedy(ids: &[u32], adapter: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        adapter: adapter.into(),
        input: Some(pb::generate_request::Input::TokenIds(pb::TokenIds { ids: ids.to_vec() })),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Collects a generation: token ids, text, the number of messages and the final message.
pub async fn collect(
    client: &mut BackendClient<Channel>,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, String, usize, pb::GenerateResponse), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ids, mut text, mut n, mut last) = (Vec::new(), String::new(), 0, None);
    while let Some(msg) = stream.message().await? {
        ids.extend(&msg.token_ids);
        text.push_str(&msg.text);
        n += 1;
        last = Some(msg);
    }
    Ok((ids, text, n, last.expect("at least one message")))
}

/// Greedy tokens of a golden case through `adapter` equal the reference's.
pub async fn assert_generates(client: &mut BackendClient<Channel>, adapter: &str, key: &str) {
    let c = case(key);
    let (ids, _, _, _) = collect(client, greedy(&c.prompt_ids, adapter, c.greedy_ids.len() as u32))
        .await
        .unwrap_or_else(|e| panic!("generation with {adapter:?} failed: {e}"));
    assert_eq!(ids, c.greedy_ids, "adapter {adapter:?} on case {key}");
}

/// A free loopback port (for servers that cannot report the one they bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binds").local_addr().expect("addr").port()
}

/// A tool the tests need: `$VAR` if set, else where `scripts/install-test-servers` puts it,
/// else `name` on the PATH. `None` (the test is skipped, saying so) when absent, unless
/// `SWITCHYARD_REQUIRE_ADAPTER_SERVERS` is set, as CI does.
pub fn tool(var: &str, name: &str) -> Option<PathBuf> {
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/bin").join(name);
    let found =
        std::env::var_os(var).map(PathBuf::from).or_else(|| installed.is_file().then_some(installed)).or_else(|| {
            std::env::var_os("PATH")
                .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
        });
    if found.is_none() {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_ADAPTER_SERVERS").is_none(),
            "{name} is required: run scripts/install-test-servers (or set {var})"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: {name} not found (run scripts/install-test-servers)");
    }
    found
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the server on `port` is an olah mirror: it names a missing repository in its own
/// header.
fn is_olah(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = b"GET /api/models/none/none/revision/main HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    let mut response = String::new();
    if stream.write_all(request).is_err() || stream.read_to_string(&mut response).is_err() {
        return false;
    }
    response.to_ascii_lowercase().contains("x-error-code: reponotfound")
}

/// A child process killed on drop.
pub struct Server {
    child: Child,
}

impl Server {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const S3_ACCESS_KEY: &str = "switchyard-test";
pub const S3_SECRET_KEY: &str = "switchyard-test-secret";

/// `s3s-fs`: an S3-compatible server over a directory (bucket = directory, object = file).
pub struct S3Server {
    pub endpoint: String,
    pub root: tempfile::TempDir,
    /// Empty AWS config and credentials files, so the developer's own never leak in.
    aws: tempfile::TempDir,
    pub server: Server,
}

impl S3Server {
    pub fn start() -> Option<S3Server> {
        let bin = tool("SWITCHYARD_S3S_FS", "s3s-fs")?;
        let root = tempfile::tempdir().expect("s3 root");
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", "0", "--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let server = Server { child };
        let mut line = String::new();
        let endpoint = loop {
            line.clear();
            let n = out.read_line(&mut line).expect("reads s3s-fs output");
            assert!(n > 0, "s3s-fs exited before it was listening");
            if let Some(at) = line.find("server is running at ") {
                break line[at + "server is running at ".len()..].trim().to_string();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        let aws = tempfile::tempdir().expect("aws dir");
        for f in ["config", "credentials"] {
            std::fs::write(aws.path().join(f), "").expect("empty aws file");
        }
        Some(S3Server { endpoint, root, aws, server })
    }

    /// Puts `files` (name, bytes) under `s3://bucket/prefix/`.
    pub fn put(&self, bucket: &str, prefix: &str, files: &[(&str, Vec<u8>)]) -> String {
        let dir = self.root.path().join(bucket).join(prefix);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).expect("write object");
        }
        format!("s3://{bucket}/{prefix}")
    }

    /// Puts a fixture adapter's files under `s3://bucket/prefix/`.
    pub fn put_fixture(&self, bucket: &str, prefix: &str, adapter: &str) -> String {
        let files = adapter_files(&fixture_adapter(adapter));
        let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        self.put(bucket, prefix, &refs)
    }

    /// The environment that points a backend at this server, the way AWS tools are configured.
    pub fn env(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL_S3", endpoint.to_string()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ("AWS_CONFIG_FILE", self.aws.path().join("config").display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", self.aws.path().join("credentials").display().to_string()),
        ]
    }
}

/// The files of an adapter directory, by name.
pub fn adapter_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).expect("fixture file")))
        .collect()
}

/// `olah` in offline mode: a Hugging Face Hub mirror serving local git repositories.
pub struct HfMirror {
    pub endpoint: String,
    dir: tempfile::TempDir,
    pub server: Server,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=switchyard",
            "-c",
            "user.email=test@switchyard.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl HfMirror {
    pub fn start() -> Option<HfMirror> {
        let bin = tool("SWITCHYARD_OLAH", "olah-cli")?;
        let dir = tempfile::tempdir().expect("mirror dir");
        std::fs::create_dir_all(dir.path().join("mirrors/models")).expect("mkdir");
        // A port is free when picked, but another test's server can take it before olah binds
        // it (olah then exits, and the port answers for someone else): wait for olah itself to
        // answer, and start again on another port when it does not.
        for attempt in 1.. {
            let port = free_port();
            let config = format!(
                r#"[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{repos}"
mirrors-path = ["{mirrors}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"

[accessibility]
offline = true
"#,
                repos = dir.path().join("cache").display(),
                mirrors = dir.path().join("mirrors").display(),
            );
            std::fs::write(dir.path().join("olah.toml"), config).expect("config");
            let child = Command::new(&bin)
                .args(["-c", "olah.toml"])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("olah starts");
            let mut server = Server { child };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && server.child.try_wait().ok().flatten().is_none() {
                if is_olah(port) {
                    return Some(HfMirror { endpoint: format!("http://127.0.0.1:{port}"), dir, server });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(attempt < 3, "olah did not start answering on a port of its own (three tries)");
        }
        unreachable!("the loop returns or fails")
    }

    /// Commits `files` to the model repo `org/name` (created on first use), tags the commit if
    /// `tag` is given, and returns the commit's sha.
    pub fn commit(&self, repo: &str, files: &[(String, Vec<u8>)], tag: Option<&str>) -> String {
        let dir = self.dir.path().join("mirrors/models").join(repo);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).expect("mkdir");
            git(&dir, &["init", "-q"]);
        }
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).expect("write");
        }
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-q", "-m", "adapter"]);
        if let Some(tag) = tag {
            git(&dir, &["tag", tag]);
        }
        git(&dir, &["rev-parse", "HEAD"])
    }

    pub fn env(&self, hf_home: &Path) -> Vec<(&'static str, String)> {
        vec![
            ("HF_ENDPOINT", self.endpoint.clone()),
            ("HF_HOME", hf_home.display().to_string()),
            ("HF_HUB_CACHE", hf_home.join("hub").display().to_string()),
            ("HF_TOKEN", String::new()),
            ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1".to_string()),
        ]
    }
}

/// A TCP proxy in front of a server: counts requests whose request line contains `count`; with
/// `die_after` set, stops dead (closing every connection and the port) once that many response
/// bytes have passed on one connection — a server dying mid-download; with `delay`, holds each
/// piece of a response that long — a slow server.
pub struct Proxy {
    pub endpoint: String,
    pub counted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start(upstream: &str, count: &'static str, die_after: Option<u64>) -> Proxy {
        Proxy::start_with(upstream, count, die_after, None).await
    }

    pub async fn start_slow(upstream: &str, delay: Duration) -> Proxy {
        Proxy::start_with(upstream, "", None, Some(delay)).await
    }

    /// Slow, and counting the GETs whose request line contains `count`.
    pub async fn start_slow_counting(upstream: &str, count: &'static str, delay: Duration) -> Proxy {
        Proxy::start_with(upstream, count, None, Some(delay)).await
    }

    async fn start_with(upstream: &str, count: &'static str, die_after: Option<u64>, delay: Option<Duration>) -> Proxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let counted = Arc::new(AtomicU64::new(0));
        let (dead_tx, dead_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn({
            let counted = counted.clone();
            async move {
                let mut dead = dead_rx.clone();
                loop {
                    let (client, _) = tokio::select! {
                        accepted = listener.accept() => match accepted { Ok(c) => c, Err(_) => return },
                        _ = dead.changed() => return, // dropping the listener closes the port
                    };
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { continue };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let counted = counted.clone();
                    let mut dead_up = dead_rx.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        loop {
                            let n = tokio::select! {
                                n = cr.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                                _ = dead_up.changed() => return,
                            };
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let hits = text.lines().filter(|l| l.starts_with("GET ") && l.contains(count)).count();
                            counted.fetch_add(hits as u64, Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    let dead_tx = dead_tx.clone();
                    let mut dead_down = dead_rx.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 << 10];
                        let mut passed = 0u64;
                        loop {
                            let n = tokio::select! {
                                n = sr.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                                _ = dead_down.changed() => return,
                            };
                            passed += n as u64;
                            if let Some(delay) = delay {
                                tokio::time::sleep(delay).await;
                            }
                            if die_after.is_some_and(|limit| passed > limit) {
                                let _ = dead_tx.send(true);
                                return;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Proxy { endpoint, counted, task }
    }
}

/// Entries of an adapter cache directory: completed ones and leftovers of fetches alike, but not
/// evicted entries, which are renamed away at once and deleted in the background.
pub fn cache_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !n.starts_with(".tmp-evicted-"));
    names.sort();
    names
}

/// A running `switchyard gateway`; killed on drop.
pub struct Gateway {
    pub server: Server,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` of the operators' listener, when `--metrics-listen` was given.
    pub metrics: Option<String>,
}

/// Starts the gateway in front of `backends` (`host:port`, reached over plain gRPC, or a full
/// `https://…` address) with extra flags (keys, config, state dir).
pub fn start_gateway(backends: &[&str], extra: &[&str]) -> Gateway {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("gateway").args(["--listen", "127.0.0.1:0"]).args(["--probe-interval-ms", "200"]);
    for b in backends {
        let address = if b.contains("://") { b.to_string() } else { format!("http://{b}") };
        cmd.args(["--backend", &address]);
    }
    cmd.args(extra).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("switchyard binary starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let mut next = || lines.next().expect("the gateway exited before it was listening").expect("reads stdout");
    let line = next();
    let addr = line
        .strip_prefix("switchyard gateway listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    let url = format!("http://{addr}");
    let metrics = extra.contains(&"--metrics-listen").then(|| {
        let line = next();
        let addr =
            line.strip_prefix("switchyard gateway metrics on ").unwrap_or_else(|| panic!("unexpected line: {line:?}"));
        format!("http://{addr}")
    });
    // Keep reading, so the gateway never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Gateway { server: Server { child }, url, metrics }
}

/// Loads the fixture adapter `fixture` under `name` through the gateway's adapter API.
pub async fn load_through_gateway(http: &reqwest::Client, gw: &Gateway, token: &str, name: &str, fixture: &str) {
    let uri = format!("file://{}", fixture_adapter(fixture).display());
    load_uri_through_gateway(http, gw, token, name, &uri).await;
}

/// Loads the adapter at `uri` under `name` through the gateway's adapter API.
pub async fn load_uri_through_gateway(http: &reqwest::Client, gw: &Gateway, token: &str, name: &str, uri: &str) {
    let r = http
        .post(format!("{}/v1/loras", gw.url))
        .bearer_auth(token)
        .json(&json!({"lora_name": name, "source": {"uri": uri}}))
        .send()
        .await
        .expect("the gateway answers");
    let status = r.status();
    assert!(status.is_success(), "loading {uri}: {status} {}", r.text().await.unwrap_or_default());
}

/// The Python with the test clients (`openai`, `PyJWT`): `$SWITCHYARD_TEST_PYTHON`, else the
/// venv `scripts/install-test-servers` makes. `None` (skipped, saying so) when absent, unless
/// `SWITCHYARD_REQUIRE_TEST_CLIENTS` is set, as CI does.
pub fn test_python() -> Option<PathBuf> {
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools/py/bin/python");
    let found = std::env::var_os("SWITCHYARD_TEST_PYTHON")
        .map(PathBuf::from)
        .or_else(|| installed.is_file().then_some(installed));
    if found.is_none() {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_TEST_CLIENTS").is_none(),
            "the Python test clients are required: run scripts/install-test-servers (or set SWITCHYARD_TEST_PYTHON)"
        );
        use std::io::Write;
        let _ =
            writeln!(std::io::stderr(), "skipped: Python test clients not found (run scripts/install-test-servers)");
    }
    found
}

/// SmolLM2-135M-Instruct at `SWITCHYARD_SMOLLM2_GGUF`, else where `scripts/fetch-smollm2`
/// places it, if present. `None` (skipped, saying so) when absent, unless
/// `SWITCHYARD_REQUIRE_SMOLLM2` is set, as CI does.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("SWITCHYARD_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(switchyard_backend::paths::default_model);
    let found = path.filter(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_SMOLLM2").is_none(),
            "SWITCHYARD_REQUIRE_SMOLLM2 is set but the GGUF is missing"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: SmolLM2 not found (run scripts/fetch-smollm2)");
    }
    found
}

/// A running `switchyard up`.
pub struct Up {
    child: Child,
    pub url: String,
    pub backend: String,
    /// `http://…` of the operators' metrics listener.
    pub metrics: String,
    /// The `export NAME_TOKEN=…` lines it printed, as (NAME_TOKEN, token).
    pub tokens: Vec<(String, String)>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchyard up` on free ports with its state in `data`, and reads its ready message.
pub fn start_up(data: &Path, extra: &[&str]) -> Up {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("up").arg("--data-dir").arg(data).args(["--listen", "127.0.0.1:0", "--backend-listen", "127.0.0.1:0"]);
    cmd.args(["--metrics-listen", "127.0.0.1:0"]);
    // The default model is the one in the Switchyard cache; name it only when it lives elsewhere.
    let model = smollm2().expect("checked by the caller");
    if Some(&model) != switchyard_backend::paths::default_model().as_ref() {
        cmd.arg("--model").arg(model);
    }
    cmd.args(extra);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("switchyard up starts");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let (mut url, mut backend, mut metrics, mut tokens) = (None, None, None, Vec::new());
    loop {
        let line = lines.next().expect("switchyard up exited before it was ready").expect("reads stdout");
        if let Some(addr) = line.strip_prefix("switchyard gateway listening on ") {
            url = Some(format!("http://{addr}"));
        } else if let Some(addr) = line.strip_prefix("switchyard backend listening on ") {
            backend = Some(addr.to_string());
        } else if let Some(addr) = line.strip_prefix("switchyard gateway metrics on ") {
            metrics = Some(format!("http://{addr}"));
        } else if let Some((name, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
            tokens.push((name.to_string(), value.to_string()));
        } else if line == "Ctrl-C stops everything." {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Up {
        child,
        url: url.expect("gateway address printed"),
        backend: backend.expect("backend address printed"),
        metrics: metrics.expect("metrics address printed"),
        tokens,
    }
}

/// Ctrl-C: the stack stops by itself, cleanly, and its port is closed.
pub fn interrupt(mut up: Up) {
    let status = Command::new("kill").args(["-INT", &up.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = up.child.try_wait().expect("waits") {
            break s;
        }
        assert!(Instant::now() < deadline, "switchyard up did not stop within 20 s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "switchyard up exited with {exit} on Ctrl-C");
    let addr = up.url.trim_start_matches("http://");
    assert!(std::net::TcpStream::connect(addr).is_err(), "the gateway still listens after Ctrl-C");
}

/// The example and fixture policies, built by `scripts/build-policies` (once per test binary):
/// the directory holding `<crate>.wasm`.
pub fn built_policies() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/build-policies")).output().expect("scripts/build-policies runs");
        assert!(out.status.success(), "building the policies failed:\n{}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, as PEM files in a temp dir.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("pki dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "switchyard test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("signs");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("writes");
            path
        };
        TestPki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client),
            client_key: write("client.key", &client_key),
            dir,
        }
    }
}

/// Polls `GET /readyz` until the gateway sees a healthy backend.
pub async fn wait_ready(http: &reqwest::Client, gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(format!("{}/readyz", gw.url)).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "the gateway never saw a healthy backend");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// A gateway whose tokens the tests sign (HS256), and plain JSON calls to it.

/// The HS256 secret of [`gateway`]s; [`token`] signs with it.
pub const SECRET: &[u8] = b"isolation-test-secret-isolation-test-secret";

/// A token for `tenant` with `scope`, valid for ten minutes.
pub fn token(tenant: &str, scope: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"tenant": tenant, "scope": scope, "exp": now + 600});
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

/// A gateway over `backends` with the tenants file `tenants`, its state in `dir`.
pub fn gateway(dir: &Path, backends: &[&str], tenants: &str, extra: &[&str]) -> Gateway {
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let config = dir.join("tenants.toml");
    std::fs::write(&config, tenants).unwrap();
    let (state, config, secret) =
        (dir.join("state").display().to_string(), config.display().to_string(), secret.display().to_string());
    let mut flags = vec!["--state-dir", &state, "--config", &config, "--jwt-hs256-secret-file", &secret];
    flags.extend_from_slice(extra);
    start_gateway(backends, &flags)
}

/// POSTs JSON with a bearer token; the status and the JSON answer.
pub async fn post(http: &reqwest::Client, gw: &Gateway, path: &str, token: &str, body: Value) -> (u16, Value) {
    let r = http.post(format!("{}{path}", gw.url)).bearer_auth(token).json(&body).send().await.expect("answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// GETs with a bearer token; the status and the JSON answer.
pub async fn get(http: &reqwest::Client, gw: &Gateway, path: &str, token: &str) -> (u16, Value) {
    let r = http.get(format!("{}{path}", gw.url)).bearer_auth(token).send().await.expect("answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// DELETEs with a bearer token; the status and the JSON answer.
pub async fn delete(http: &reqwest::Client, gw: &Gateway, path: &str, token: &str) -> (u16, Value) {
    let r = http.delete(format!("{}{path}", gw.url)).bearer_auth(token).send().await.expect("answers");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A short greedy chat request for `model`.
pub fn chat(model: &str, content: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
}

/// Two gateways over `backends` with the tenants file `tenants` and the same `flags` (a shared
/// `--store`), each with a state dir of its own, both ready; and the client that waited.
pub struct GatewayPair {
    pub a: Gateway,
    pub b: Gateway,
    pub http: reqwest::Client,
    /// Their state dirs: they live as long as whoever binds them.
    pub dirs: (tempfile::TempDir, tempfile::TempDir),
}

pub async fn two_gateways(backends: &[&str], tenants: &str, flags: &[&str]) -> GatewayPair {
    let dirs = (tempfile::tempdir().expect("state dir"), tempfile::tempdir().expect("state dir"));
    let a = gateway(dirs.0.path(), backends, tenants, flags);
    let b = gateway(dirs.1.path(), backends, tenants, flags);
    let http = reqwest::Client::new();
    wait_ready(&http, &a).await;
    wait_ready(&http, &b).await;
    GatewayPair { a, b, http, dirs }
}

/// One streamed chat completion of `max_tokens` tokens (`ignore_eos`), temperature 0: the time
/// from sending it to its first content chunk, and its completion tokens.
pub async fn stream_once(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> (Duration, u64) {
    use futures::StreamExt;
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let sent = Instant::now();
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("the gateway answers");
    assert!(r.status().is_success(), "{}: {}", r.status(), r.text().await.unwrap_or_default());
    let (mut first, mut tokens, mut pending) = (None, None, String::new());
    let mut body = r.bytes_stream();
    while let Some(bytes) = body.next().await {
        pending.push_str(std::str::from_utf8(&bytes.expect("stream")).expect("utf-8"));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(data).expect("a JSON chunk");
            if first.is_none() && chunk["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                first = Some(sent.elapsed());
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n);
            }
        }
    }
    (first.expect("a content chunk"), tokens.expect("a usage chunk"))
}

// What the benchmarks share.

/// The number after `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `p` quantile (0 to 1) of `sorted`, by nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Uploads a built policy component as `who` and activates it for `tenant` (`None`: the
/// default for an operator, its own tenant for a tenant).
pub async fn deploy_policy(
    http: &reqwest::Client,
    gw: &Gateway,
    who: &str,
    wasm: &str,
    tenant: Option<&str>,
    config: Value,
) {
    let t = token(who, "policy:deploy");
    let bytes = std::fs::read(built_policies().join(wasm)).unwrap();
    let r = http.post(format!("{}/v1/policies?name=p", gw.url)).bearer_auth(&t).body(bytes).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["policy"]["id"].as_str().unwrap().to_string();
    let mut body = json!({"config": config});
    if let Some(t) = tenant {
        body["tenant"] = t.into();
    }
    let (s, v) = post(http, gw, &format!("/v1/policies/{id}/activate"), &t, body).await;
    assert_eq!(s, 200, "{v}");
}

/// A scrape: every sample by its name and labels, as written (`name{a="x",b="y"}`).
pub type Samples = BTreeMap<String, f64>;

/// What a backend started with `--metrics-listen` reports now.
pub async fn scrape(http: &reqwest::Client, backend: &Backend) -> Samples {
    let url = format!("{}/metrics", backend.metrics.as_deref().expect("started with --metrics-listen"));
    let text = http.get(url).send().await.expect("metrics answer").text().await.expect("text");
    assert!(text.ends_with("# EOF\n"), "not an OpenMetrics exposition: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {l:?}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

/// The value of `series`, 0 when absent.
pub fn at(samples: &Samples, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Polls an async `check` until it holds or `within` passes.
pub async fn until(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
