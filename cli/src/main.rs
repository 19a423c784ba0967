//! `switchyard`: the one binary users run.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use switchyard_backend::adapters::AdapterWeights;
use switchyard_backend::bench::{self, BLOCK_SIZE, blocks_needed, decode_tokens_per_s};
use switchyard_backend::engine::sampling::SamplingParams;
use switchyard_backend::model::Model;
use switchyard_backend::service::{
    self, AdapterOptions, DeviceChoice, DtypeChoice, SecurityOptions, ServeOptions, TlsFiles,
};

mod declare;
mod devtls;
mod up;

/// Defaults, named once.
const DEFAULT_BACKEND_LISTEN: &str = "127.0.0.1:50051";
const DEFAULT_MAX_LORAS: usize = 8;
const DEFAULT_MAX_LORA_RANK: usize = 64;
const DEFAULT_KV_CACHE_MIB: usize = 1024;
const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
const DEFAULT_MAX_RUNNING: usize = 64;
const DEFAULT_MAX_WAITING: usize = 1024;
const DEFAULT_LORA_CACHE_BYTES: &str = "20GiB";
const DEFAULT_MAX_ADAPTER_BYTES: &str = "4GiB";
const DEFAULT_ADAPTER_DOWNLOAD_TIMEOUT_S: u64 = 600;
const DEFAULT_UNLOAD_TIMEOUT_S: u64 = 30;
const DEFAULT_GATEWAY_LISTEN: &str = "127.0.0.1:8080";
/// Where `up` serves the gateway's metrics (the OpenTelemetry Prometheus exporter's port).
const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
const DEFAULT_MAX_BODY_BYTES: &str = "4MiB";
const DEFAULT_PROBE_INTERVAL_MS: u64 = 2000;

/// A byte count: a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB, TiB).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a byte count (e.g. 512MiB, 20GiB)"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use B, KB, MB, GB, KiB, MiB, GiB or TiB")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Serve many LoRA fine-tunes of one base model to many tenants")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a whole stack on this machine: a backend, a gateway, the demo adapters, the example
    /// tenant-map policy and two demo tenants, with tokens and snippets to try it.
    Up(up::UpArgs),
    /// Run a backend: one model, resident adapters, continuous batching, gRPC.
    Backend(BackendArgs),
    /// Run the gateway: OpenAI-compatible HTTP with JWT auth in front of one or more backends.
    Gateway(GatewayArgs),
    /// Mint a development token (HS256) for a tenant, signed with the gateway's secret.
    Token(TokenArgs),
    /// Work with routing policies (WebAssembly components).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Apply LoraAdapter manifests (a file or a directory) through a gateway's adapter API.
    Apply(declare::ApplyArgs),
    /// Show resources of a gateway.
    Get {
        #[command(subcommand)]
        what: declare::GetCommand,
    },
    /// Measure prefill, time to first token, and decode throughput at several batch sizes with
    /// 0, 1 and N distinct adapters in one batch.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Hugging Face model directory or synthetic:<preset> (tiny, smollm2-135m, llama-1b, llama-7b).
    #[arg(long, default_value = "synthetic:llama-7b")]
    model: PathBuf,
    /// auto, cpu, cuda, cuda:N or emulated-cuda (test builds).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// auto (bf16 on CUDA, q16 on the CPU), f32, bf16 (CUDA), q8 or q16 (CPU).
    #[arg(long, default_value = "auto")]
    dtype: DtypeChoice,
    /// Sequences decoded together, one case per size.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    batch: Vec<usize>,
    /// Distinct adapters in the batch, one case each (0 = base model only).
    #[arg(long, value_delimiter = ',', default_value = "0,1,64")]
    adapters: Vec<usize>,
    /// Rank of the synthetic adapters (on all seven projections).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Timed decode steps per case.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Also time the prefill of one prompt of this many tokens, up to its first token (0: no).
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// Rounds per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Threads for the CPU executor (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Sampling temperature of the decode steps (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling of the decode steps: the smallest set of most likely tokens holding
    /// this much of the probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct BackendArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or
    /// synthetic:<preset> for random weights of a known shape.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Where the model runs: auto (CUDA when usable, else CPU), cpu, cuda or cuda:N; test builds
    /// also have emulated-cuda (the CUDA kernels on a CPU emulation of the GPU).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// Address for the gRPC server; port 0 picks a free port (printed at start-up).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = DEFAULT_BACKEND_LISTEN)]
    listen: SocketAddr,
    /// Where to serve Prometheus metrics (GET /metrics) for operators, e.g. 127.0.0.1:9465. The
    /// series name tenants and adapters, so they are never served on --listen. Default: not
    /// served.
    #[arg(long, env = "SWITCHYARD_BACKEND_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    security: BackendSecurityArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

/// How a backend joins a fleet whose gateways discover backends.
#[derive(clap::Args, Debug, Clone)]
struct FleetArgs {
    /// The fleet's state store, etcd://host:2379[,host:2379…][/prefix] (etcds:// for TLS),
    /// where this backend registers itself (needs --advertise).
    #[arg(long, env = "SWITCHYARD_STORE", requires = "advertise")]
    store: Option<switchyard_fleet::Location>,
    /// The address gateways reach this backend at, e.g. https://10.0.0.7:50051: registered in
    /// --store under a lease, so gateways add it, and drop it within --advertise-ttl-s of it dying.
    #[arg(long, env = "SWITCHYARD_ADVERTISE", requires = "store")]
    advertise: Option<String>,
    /// Seconds the registration outlives this backend if it dies without withdrawing it.
    #[arg(long, env = "SWITCHYARD_ADVERTISE_TTL_S", default_value_t = switchyard_fleet::registration::DEFAULT_TTL_S)]
    advertise_ttl_s: i64,
    #[command(flatten)]
    access: StoreAccessArgs,
}

/// How a gateway or backend proves itself to an etcd --store and checks its members.
#[derive(clap::Args, Debug, Clone, Default)]
struct StoreAccessArgs {
    /// The CA (PEM) that signed the etcd members' certificates; an etcds:// --store needs it.
    #[arg(long, env = "SWITCHYARD_STORE_CA_FILE")]
    store_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) to present to members that require one (etcd's
    /// --client-cert-auth); needs --store-key-file.
    #[arg(long, env = "SWITCHYARD_STORE_CERT_FILE", requires = "store_key_file")]
    store_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SWITCHYARD_STORE_KEY_FILE", requires = "store_cert_file")]
    store_key_file: Option<PathBuf>,
    /// The etcd user, for a cluster with authentication on; needs --store-password-file.
    #[arg(long, env = "SWITCHYARD_STORE_USER", requires = "store_password_file")]
    store_user: Option<String>,
    /// File whose first line that is not blank or a `#` comment is --store-user's password.
    #[arg(long, env = "SWITCHYARD_STORE_PASSWORD_FILE", requires = "store_user")]
    store_password_file: Option<PathBuf>,
}

impl StoreAccessArgs {
    fn access(&self) -> Result<switchyard_fleet::EtcdAccess> {
        let client = self.store_cert_file.as_deref().zip(self.store_key_file.as_deref());
        switchyard_fleet::EtcdAccess::from_files(
            self.store_ca_file.as_deref(),
            client,
            self.store_user.as_deref(),
            self.store_password_file.as_deref(),
        )
        .map_err(anyhow::Error::msg)
    }
}

impl FleetArgs {
    /// Registers the backend when asked to; `None` when it is not part of a discovered fleet.
    async fn register(&self) -> Result<Option<switchyard_fleet::registration::Registration>> {
        use anyhow::Context;
        use switchyard_fleet::registration::{BackendRecord, Registration};
        let (Some(store), Some(address)) = (&self.store, &self.advertise) else { return Ok(None) };
        let switchyard_fleet::Location::Etcd { endpoints, prefix } = store else {
            anyhow::bail!(
                "--advertise needs an etcd:// (or etcds://) --store (a directory cannot be shared with gateways elsewhere)"
            );
        };
        anyhow::ensure!(
            address.starts_with("http://") || address.starts_with("https://"),
            "--advertise {address:?} must be an http:// or https:// address gateways can reach"
        );
        anyhow::ensure!(self.advertise_ttl_s >= 1, "--advertise-ttl-s must be at least 1");
        let access = self.access.access()?;
        let client =
            switchyard_fleet::connect(endpoints, &access).await.context("cannot reach the --store etcd cluster")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let record = BackendRecord { address: address.clone(), registered_at: now };
        Ok(Some(Registration::spawn(client, prefix, record, self.advertise_ttl_s)))
    }
}

/// Who may call the backend.
#[derive(clap::Args, Debug, Clone)]
struct BackendSecurityArgs {
    /// File with the credential every call must carry (`authorization: Bearer <credential>`),
    /// one per line (several during a rotation). Without it, anyone who reaches the port may use
    /// the backend.
    #[arg(long, env = "SWITCHYARD_CREDENTIAL_FILE")]
    credential_file: Option<PathBuf>,
    /// The server certificate (PEM) for TLS; needs --tls-key.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "SWITCHYARD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

impl BackendSecurityArgs {
    fn options(self) -> SecurityOptions {
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: self.tls_client_ca }),
            _ => None,
        };
        SecurityOptions { credential_file: self.credential_file, tls }
    }
}

/// How a backend's engine and adapter store are sized: shared by `backend` and `up`.
#[derive(clap::Args, Debug, Clone)]
struct EngineArgs {
    /// What the model computes in: auto (bf16 on CUDA, q16 on the CPU), f32, bf16 (CUDA only),
    /// q8 or q16 (CPU only: a GGUF's quantized matrices kept as stored, times activations
    /// quantized to 8 or 16 bits).
    #[arg(long, env = "SWITCHYARD_DTYPE", default_value = "auto")]
    dtype: DtypeChoice,
    /// Adapter slots: adapters resident at once. Idle adapters are evicted least recently used first.
    #[arg(long, env = "SWITCHYARD_MAX_LORAS", default_value_t = DEFAULT_MAX_LORAS)]
    max_loras: usize,
    /// Largest adapter rank accepted.
    #[arg(long, env = "SWITCHYARD_MAX_LORA_RANK", default_value_t = DEFAULT_MAX_LORA_RANK)]
    max_lora_rank: usize,
    /// Longest prompt + completion (default: the model's max_position_embeddings).
    #[arg(long, env = "SWITCHYARD_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// Memory for the paged KV cache, in MiB.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MIB", default_value_t = DEFAULT_KV_CACHE_MIB)]
    kv_cache_mib: usize,
    /// Most tokens computed in one step (bounds prefill chunks).
    #[arg(long, env = "SWITCHYARD_MAX_BATCH_TOKENS", default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Most requests generating at once.
    #[arg(long, env = "SWITCHYARD_MAX_RUNNING", default_value_t = DEFAULT_MAX_RUNNING)]
    max_running: usize,
    /// Most requests waiting for admission; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING", default_value_t = DEFAULT_MAX_WAITING)]
    max_waiting: usize,
    /// Most requests of one tenant generating at once (default: --max-running). Tenants are
    /// admitted fairly either way; a cap keeps room free for a tenant that arrives later.
    #[arg(long, env = "SWITCHYARD_MAX_RUNNING_PER_TENANT")]
    max_running_per_tenant: Option<usize>,
    /// Most requests of one tenant waiting for admission (default: half of --max-waiting);
    /// more are refused with RESOURCE_EXHAUSTED, so one tenant cannot fill the queue.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING_PER_TENANT")]
    max_waiting_per_tenant: Option<usize>,
    /// Compute every prompt in full: no reuse of cached prompt blocks between requests.
    #[arg(long, env = "SWITCHYARD_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
    /// Directories file:// adapters may be loaded from (comma-separated). Without any, file://
    /// loads are refused.
    #[arg(long, env = "SWITCHYARD_ADAPTER_ROOTS", value_delimiter = ',')]
    adapter_roots: Vec<PathBuf>,
    /// Disk cache for s3:// and hf:// adapters (default: adapters/ in the Switchyard cache,
    /// $SWITCHYARD_CACHE or ~/.cache/switchyard).
    #[arg(long, env = "SWITCHYARD_LORA_CACHE_DIR")]
    lora_cache_dir: Option<PathBuf>,
    /// Byte budget of the adapter disk cache; least recently used adapters not in use are
    /// evicted past it.
    #[arg(long, env = "SWITCHYARD_LORA_CACHE_BYTES", default_value = DEFAULT_LORA_CACHE_BYTES, value_parser = parse_bytes)]
    lora_cache_bytes: u64,
    /// Largest adapter accepted (config and weights together).
    #[arg(long, env = "SWITCHYARD_MAX_ADAPTER_BYTES", default_value = DEFAULT_MAX_ADAPTER_BYTES, value_parser = parse_bytes)]
    max_adapter_bytes: u64,
    /// Seconds a fetch of one adapter from S3 or the Hub may take.
    #[arg(long, env = "SWITCHYARD_ADAPTER_DOWNLOAD_TIMEOUT", default_value_t = DEFAULT_ADAPTER_DOWNLOAD_TIMEOUT_S)]
    adapter_download_timeout: u64,
    /// Seconds an unload waits for the adapter's running requests before it is called off.
    #[arg(long, env = "SWITCHYARD_UNLOAD_TIMEOUT", default_value_t = DEFAULT_UNLOAD_TIMEOUT_S)]
    unload_timeout: u64,
}

impl EngineArgs {
    /// The backend's options: these settings plus what to serve, where and for whom.
    fn serve_options(
        self,
        model: PathBuf,
        device: DeviceChoice,
        listen: SocketAddr,
        security: SecurityOptions,
    ) -> ServeOptions {
        ServeOptions {
            model,
            device,
            dtype: self.dtype,
            listen,
            max_loras: self.max_loras,
            max_lora_rank: self.max_lora_rank,
            max_model_len: self.max_model_len,
            kv_cache_mib: self.kv_cache_mib,
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            max_running_per_tenant: self.max_running_per_tenant,
            max_waiting_per_tenant: self.max_waiting_per_tenant,
            prefix_cache: !self.no_prefix_cache,
            metrics_listen: None,
            adapters: AdapterOptions {
                roots: self.adapter_roots,
                cache_dir: self.lora_cache_dir,
                cache_bytes: self.lora_cache_bytes,
                max_adapter_bytes: self.max_adapter_bytes,
                download_timeout: Duration::from_secs(self.adapter_download_timeout),
                unload_timeout: Duration::from_secs(self.unload_timeout),
            },
            security,
        }
    }
}

#[derive(clap::Args, Debug)]
struct TokenArgs {
    /// The HS256 secret file the gateway verifies tokens with (default: the development key
    /// `switchyard up` keeps in its data dir).
    #[arg(long, env = "SWITCHYARD_JWT_HS256_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// The data dir of `switchyard up` whose development key signs the token, when no
    /// --secret-file is given.
    #[arg(long, env = "SWITCHYARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The tenant the token speaks for.
    #[arg(long)]
    tenant: String,
    /// Space-separated scopes, e.g. "lora:load lora:read lora:unload policy:deploy".
    #[arg(long, default_value = "")]
    scope: String,
    /// The `sub` claim.
    #[arg(long)]
    subject: Option<String>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// The `iss` claim (match the gateway's --jwt-issuer).
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    issuer: Option<String>,
    /// The `aud` claim (match the gateway's --jwt-audience).
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    audience: Option<String>,
    /// The claim that carries the tenant (match the gateway's --tenant-claim).
    #[arg(long, env = "SWITCHYARD_TENANT_CLAIM", default_value = switchyard_gateway::auth::DEFAULT_TENANT_CLAIM)]
    tenant_claim: String,
    /// An extra claim as NAME=JSON, e.g. plan='"pro"' or groups='["a","b"]' (repeatable).
    #[arg(long = "claim", value_parser = parse_claim)]
    claims: Vec<(String, serde_json::Value)>,
}

/// Reads NAME=JSON.
fn parse_claim(text: &str) -> Result<(String, serde_json::Value), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=JSON"))?;
    let value = serde_json::from_str(value).map_err(|e| format!("claim {name:?}: {value:?} is not JSON: {e}"))?;
    Ok((name.to_string(), value))
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Run a policy component against recorded requests and the decisions expected for them.
    Test(PolicyTestArgs),
}

#[derive(clap::Args, Debug)]
struct PolicyTestArgs {
    /// The policy component (.wasm).
    policy: PathBuf,
    /// The deployment configuration (a JSON file), as given at activation; default `{}`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The cases: a JSON list of {"name", "request", "expect"}.
    #[arg(long)]
    cases: PathBuf,
    #[command(flatten)]
    limits: PolicyHostArgs,
}

#[derive(clap::Args, Debug)]
struct GatewayArgs {
    /// Address for the HTTP server; port 0 picks a free port (printed at start-up).
    #[arg(long, env = "SWITCHYARD_GATEWAY_LISTEN", default_value = DEFAULT_GATEWAY_LISTEN)]
    listen: SocketAddr,
    /// A backend's gRPC address, e.g. https://10.0.0.7:50051 or http://127.0.0.1:50051 (repeat,
    /// or comma-separate). https:// needs --backend-ca-file. With an etcd --store, backends
    /// that register themselves (their --advertise) are found as well, and this may be empty.
    #[arg(long = "backend", env = "SWITCHYARD_BACKENDS", value_delimiter = ',')]
    backends: Vec<String>,
    /// Where to serve /metrics (and /healthz, /readyz) for operators, e.g. 127.0.0.1:9464. The
    /// metrics name every tenant and adapter, so they are never served on --listen. Default:
    /// not served.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    backend_security: UpstreamSecurityArgs,
    /// Directory for the gateway's local state (deployed policies; and the desired adapter set
    /// unless --store names a shared store).
    #[arg(long, env = "SWITCHYARD_STATE_DIR")]
    state_dir: PathBuf,
    /// The state store gateways of one fleet share: etcd://host:2379[,host:2379…][/prefix]
    /// (default prefix /switchyard/; etcds:// for TLS), or a directory. Default: the --state-dir.
    #[arg(long, env = "SWITCHYARD_STORE")]
    store: Option<switchyard_gateway::store::Location>,
    #[command(flatten)]
    store_access: StoreAccessArgs,
    /// TOML file with the tenants: their adapters, load prefixes and routing.
    #[arg(long, env = "SWITCHYARD_GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// A directory of LoraAdapter manifests (e.g. a mounted ConfigMap) the fleet's leading
    /// gateway applies, and follows as it changes.
    #[arg(long, env = "SWITCHYARD_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Required `iss` of tokens.
    #[arg(long, env = "SWITCHYARD_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` of tokens.
    #[arg(long, env = "SWITCHYARD_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "SWITCHYARD_JWT_LEEWAY", default_value_t = switchyard_gateway::auth::DEFAULT_LEEWAY.as_secs())]
    jwt_leeway: u64,
    /// The claim that names the caller's tenant.
    #[arg(long, env = "SWITCHYARD_TENANT_CLAIM", default_value = switchyard_gateway::auth::DEFAULT_TENANT_CLAIM)]
    tenant_claim: String,
    /// File holding the HS256 secret (at least 32 bytes).
    #[arg(long, env = "SWITCHYARD_JWT_HS256_SECRET_FILE")]
    jwt_hs256_secret_file: Option<PathBuf>,
    /// A PEM public key bound to its algorithm: RS256=PATH, ES256=PATH or EdDSA=PATH (repeatable).
    #[arg(long = "jwt-public-key", env = "SWITCHYARD_JWT_PUBLIC_KEYS", value_delimiter = ',',
          value_parser = switchyard_gateway::auth::parse_public_key_arg)]
    jwt_public_keys: Vec<(switchyard_gateway::auth::Algorithm, PathBuf)>,
    /// A JWKS file (`{"keys": [...]}`), re-read when it changes.
    #[arg(long, env = "SWITCHYARD_JWKS_FILE")]
    jwks_file: Option<PathBuf>,
    #[command(flatten)]
    tuning: GatewayTuning,
}

/// How the gateway reaches its backends.
#[derive(clap::Args, Debug, Clone, Default)]
struct UpstreamSecurityArgs {
    /// The CA (PEM) that signed the backends' certificates, for https:// backends.
    #[arg(long, env = "SWITCHYARD_BACKEND_CA_FILE")]
    backend_ca_file: Option<PathBuf>,
    /// The gateway's client certificate (PEM) for backends that require mutual TLS.
    #[arg(long, env = "SWITCHYARD_BACKEND_CLIENT_CERT", requires = "backend_client_key")]
    backend_client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "SWITCHYARD_BACKEND_CLIENT_KEY", requires = "backend_client_cert")]
    backend_client_key: Option<PathBuf>,
    /// File with the backend credential the gateway sends on every call (its first line).
    #[arg(long, env = "SWITCHYARD_BACKEND_CREDENTIAL_FILE")]
    backend_credential_file: Option<PathBuf>,
}

/// The gateway's limits: shared by `gateway` and `up`.
#[derive(clap::Args, Debug, Clone)]
struct GatewayTuning {
    /// Largest request body accepted.
    #[arg(long, env = "SWITCHYARD_MAX_BODY_BYTES", default_value = DEFAULT_MAX_BODY_BYTES, value_parser = parse_bytes)]
    max_body_bytes: u64,
    /// Milliseconds between health probes of each backend.
    #[arg(long, env = "SWITCHYARD_PROBE_INTERVAL_MS", default_value_t = DEFAULT_PROBE_INTERVAL_MS)]
    probe_interval_ms: u64,
    /// Milliseconds a request may wait for its first token before it is answered 504
    /// (`first_token_timeout`) and cancelled on the backend.
    #[arg(long, env = "SWITCHYARD_FIRST_TOKEN_TIMEOUT_MS",
          default_value_t = switchyard_gateway::DEFAULT_FIRST_TOKEN_TIMEOUT.as_millis() as u64)]
    first_token_timeout_ms: u64,
    /// Route by load alone: do not prefer the backend that caches most of a request's prompt.
    #[arg(long, env = "SWITCHYARD_NO_PREFIX_ROUTING")]
    no_prefix_routing: bool,
    /// Routing by cached prefix: what one request already waiting or running on a backend
    /// costs, in prompt tokens to compute (a backend caching this many more tokens of the
    /// prompt is worth one more request in its queue).
    #[arg(long, env = "SWITCHYARD_PREFIX_QUEUE_COST_TOKENS",
          default_value_t = switchyard_gateway::prefix::DEFAULT_QUEUE_COST_TOKENS)]
    prefix_queue_cost_tokens: usize,
    #[command(flatten)]
    policy: PolicyHostArgs,
}

/// Limits of the WebAssembly policy host.
#[derive(clap::Args, Debug, Clone)]
struct PolicyHostArgs {
    /// Linear memory one policy instance may use.
    #[arg(long, env = "SWITCHYARD_POLICY_MEMORY", default_value = "32MiB", value_parser = parse_bytes)]
    policy_memory: u64,
    /// Fuel (about one unit per WebAssembly instruction) one policy decision may use: the bound
    /// on the policy's own work, the same on an idle machine and a loaded one.
    #[arg(long, env = "SWITCHYARD_POLICY_FUEL", default_value_t = switchyard_gateway::policy::wasm::DEFAULT_FUEL)]
    policy_fuel: u64,
    /// Milliseconds one policy decision may take on the wall clock: a generous guard behind the
    /// fuel, for a host too loaded to run the policy at all.
    #[arg(long, env = "SWITCHYARD_POLICY_DEADLINE_MS", default_value_t = 1000)]
    policy_deadline_ms: u64,
    /// Largest policy component accepted.
    #[arg(long, env = "SWITCHYARD_POLICY_MAX_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    policy_max_bytes: u64,
    /// Request headers passed to policies (comma-separated; `authorization` never is).
    #[arg(long, env = "SWITCHYARD_POLICY_HEADERS", value_delimiter = ',')]
    policy_headers: Vec<String>,
    /// Policy versions one tenant may keep (delete unused ones with DELETE /v1/policies/{id}).
    #[arg(long, env = "SWITCHYARD_POLICY_VERSIONS_PER_TENANT",
          default_value_t = switchyard_gateway::policy::deploy::DEFAULT_VERSIONS_PER_TENANT)]
    policy_versions_per_tenant: usize,
    /// Bytes of policy components one tenant may keep.
    #[arg(long, env = "SWITCHYARD_POLICY_BYTES_PER_TENANT", default_value = "64MiB", value_parser = parse_bytes)]
    policy_bytes_per_tenant: u64,
    /// Activations each tenant's (and the default) policy remembers for rollback.
    #[arg(long, env = "SWITCHYARD_POLICY_HISTORY",
          default_value_t = switchyard_gateway::policy::deploy::DEFAULT_HISTORY_PER_SCOPE)]
    policy_history: usize,
}

impl PolicyHostArgs {
    fn limits(&self) -> Result<switchyard_gateway::policy::wasm::WasmLimits> {
        use anyhow::Context;
        anyhow::ensure!(self.policy_deadline_ms > 0, "--policy-deadline-ms must be at least 1");
        anyhow::ensure!(self.policy_fuel > 0, "--policy-fuel must be at least 1");
        Ok(switchyard_gateway::policy::wasm::WasmLimits {
            memory_bytes: usize::try_from(self.policy_memory).context("--policy-memory")?,
            fuel: self.policy_fuel,
            deadline: Duration::from_millis(self.policy_deadline_ms),
            max_component_bytes: usize::try_from(self.policy_max_bytes).context("--policy-max-bytes")?,
            ..Default::default()
        })
    }

    fn store_limits(&self) -> Result<switchyard_gateway::policy::deploy::StoreLimits> {
        anyhow::ensure!(
            self.policy_versions_per_tenant > 0 && self.policy_history > 0,
            "--policy-versions-per-tenant and --policy-history must be at least 1"
        );
        Ok(switchyard_gateway::policy::deploy::StoreLimits {
            versions_per_tenant: self.policy_versions_per_tenant,
            bytes_per_tenant: self.policy_bytes_per_tenant,
            history_per_scope: self.policy_history,
        })
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why (the error chain), no backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run() -> Result<()> {
    let cli = Cli::parse();
    // `up` shows its own progress; its components' logs are for when something goes wrong.
    let default_filter = if matches!(cli.command, Command::Up(_)) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Backend(args) => run_backend(args).await,
        Command::Gateway(args) => run_gateway(args).await,
        Command::Token(args) => run_token(args),
        Command::Policy { command: PolicyCommand::Test(args) } => run_policy_test(args).await,
        Command::Bench(args) => tokio::task::spawn_blocking(move || run_bench(args)).await?,
        Command::Apply(args) => declare::apply(args).await,
        Command::Get { what } => declare::get(what).await,
    }
}

async fn run_backend(a: BackendArgs) -> Result<()> {
    let mut options = a.engine.serve_options(a.model, a.device, a.listen, a.security.options());
    options.metrics_listen = a.metrics_listen;
    let served = service::prepare(options).await?;
    // A line on stdout (two with metrics), for scripts and tests that start the backend on port 0.
    println!("switchyard backend listening on {}", served.local_addr);
    if let Some(addr) = served.metrics_addr {
        println!("switchyard backend metrics on {addr}");
    }
    let registration = a.fleet.register().await?;
    // On shutdown the registration goes first, so gateways stop routing here while the
    // requests already running finish.
    let stop = async move {
        shutdown_signal().await;
        if let Some(r) = registration {
            r.withdraw().await;
        }
    };
    served.run(stop).await?;
    tracing::info!("backend stopped");
    Ok(())
}

/// Builds the gateway from its flags (the gateway crate does the assembly and its checks).
async fn build_gateway(a: GatewayArgs) -> Result<std::sync::Arc<switchyard_gateway::Gateway>> {
    use anyhow::Context;
    let s = a.backend_security;
    let config = switchyard_gateway::assemble::GatewayConfig {
        backends: a.backends,
        backend_ca_file: s.backend_ca_file,
        backend_client: s.backend_client_cert.zip(s.backend_client_key),
        backend_credential_file: s.backend_credential_file,
        state_dir: a.state_dir,
        store: a.store,
        store_access: a.store_access.access()?,
        tenants_file: a.config,
        manifests: a.manifests,
        auth: switchyard_gateway::auth::AuthConfig {
            issuer: a.jwt_issuer,
            audience: a.jwt_audience,
            leeway: Duration::from_secs(a.jwt_leeway),
            tenant_claim: a.tenant_claim,
            hs256_secret_file: a.jwt_hs256_secret_file,
            public_keys: a.jwt_public_keys,
            jwks_file: a.jwks_file,
        },
        options: switchyard_gateway::GatewayOptions {
            max_body_bytes: usize::try_from(a.tuning.max_body_bytes).context("--max-body-bytes")?,
            probe_interval: Duration::from_millis(a.tuning.probe_interval_ms),
            first_token_timeout: Duration::from_millis(a.tuning.first_token_timeout_ms),
            policy_headers: a.tuning.policy.policy_headers.clone(),
            instance: switchyard_gateway::default_instance(),
            prefix_routing: !a.tuning.no_prefix_routing,
            prefix_queue_cost: a.tuning.prefix_queue_cost_tokens,
        },
        policy_limits: a.tuning.policy.limits()?,
        store_limits: a.tuning.policy.store_limits()?,
    };
    Ok(config.build().await?)
}

async fn run_gateway(a: GatewayArgs) -> Result<()> {
    use anyhow::Context;
    let (listen, metrics_listen) = (a.listen, a.metrics_listen);
    let gw = build_gateway(a).await?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let metrics = match metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?,
        ),
        None => None,
    };
    // One line on stdout, for scripts and tests that start the gateway on port 0 (and one for
    // the metrics listener).
    println!("switchyard gateway listening on {}", listener.local_addr()?);
    if let Some(m) = &metrics {
        println!("switchyard gateway metrics on {}", m.local_addr()?);
    }
    switchyard_gateway::serve(gw, listener, metrics, shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    Ok(())
}

/// The claims of a development token.
#[derive(Default)]
struct TokenClaims<'a> {
    tenant: &'a str,
    /// Space-separated; empty for none.
    scope: &'a str,
    ttl: u64,
    tenant_claim: Option<&'a str>,
    subject: Option<&'a str>,
    issuer: Option<&'a str>,
    audience: Option<&'a str>,
    extra: Vec<(String, serde_json::Value)>,
}

/// Signs `c` with the HS256 `secret`.
fn mint_token(secret: &[u8], c: TokenClaims<'_>) -> Result<String> {
    use serde_json::Value;
    anyhow::ensure!(c.ttl > 0, "a token must live at least 1 second");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let mut claims: serde_json::Map<String, Value> = c.extra.into_iter().collect();
    let tenant_claim = c.tenant_claim.unwrap_or(switchyard_gateway::auth::DEFAULT_TENANT_CLAIM);
    claims.insert(tenant_claim.to_string(), c.tenant.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + c.ttl).into());
    if !c.scope.trim().is_empty() {
        claims.insert("scope".into(), c.scope.into());
    }
    for (name, value) in [("sub", c.subject), ("iss", c.issuer), ("aud", c.audience)] {
        if let Some(v) = value {
            claims.insert(name.into(), v.into());
        }
    }
    switchyard_gateway::auth::mint_hs256(secret, &claims).map_err(anyhow::Error::msg)
}

fn run_token(a: TokenArgs) -> Result<()> {
    anyhow::ensure!(a.ttl > 0, "--ttl must be at least 1 second");
    let secret_file = match a.secret_file {
        Some(f) => f,
        None => {
            let data = a
                .data_dir
                .or_else(up::default_data_dir)
                .ok_or_else(|| anyhow::anyhow!("no --secret-file given and no data dir (set --data-dir or HOME)"))?;
            let f = data.join(up::DEV_SECRET_FILE);
            anyhow::ensure!(
                f.is_file(),
                "no --secret-file given and {} does not exist (switchyard up creates it)",
                f.display()
            );
            f
        }
    };
    let secret = switchyard_gateway::auth::read_hs256_secret(&secret_file)?;
    let token = mint_token(
        &secret,
        TokenClaims {
            tenant: &a.tenant,
            scope: &a.scope,
            ttl: a.ttl,
            tenant_claim: Some(&a.tenant_claim),
            subject: a.subject.as_deref(),
            issuer: a.issuer.as_deref(),
            audience: a.audience.as_deref(),
            extra: a.claims,
        },
    )?;
    println!("{token}");
    Ok(())
}

async fn run_policy_test(a: PolicyTestArgs) -> Result<()> {
    use anyhow::Context;
    use switchyard_gateway::policy::{cases, wasm};
    let config = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
            value.to_string()
        }
        None => "{}".to_string(),
    };
    let cases = cases::load(&a.cases).map_err(anyhow::Error::msg)?;
    let runtime = wasm::PolicyRuntime::new(a.limits.limits()?).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(&a.policy).with_context(|| format!("cannot read {}", a.policy.display()))?;
    let policy = runtime.compile(&bytes).with_context(|| format!("{}", a.policy.display()))?;
    let results = cases::run(&runtime, &policy, &config, &cases).await.map_err(anyhow::Error::msg)?;
    let failed = results.iter().filter(|r| !r.passed).count();
    for r in &results {
        println!("{} {}: {}", if r.passed { "ok  " } else { "FAIL" }, r.name, r.got);
    }
    println!("{} passed, {failed} failed", results.len() - failed);
    anyhow::ensure!(failed == 0, "{failed} of {} cases failed", results.len());
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(
        a.batch.iter().all(|&b| b > 0) && a.steps > 0 && a.rounds > 0,
        "--batch, --steps and --rounds must be at least 1"
    );
    if let Some(threads) = a.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        switchyard_backend::engine::cpu::set_threads(threads).map_err(anyhow::Error::msg)?;
    }
    let device = service::resolve_device(a.device)?;
    let dtype = service::resolve_dtype(device, a.dtype)?;
    let model = Model::open(&a.model)?;
    let dtype = service::dtype_for_weights(dtype, &model.weights);
    let slots = a.adapters.iter().copied().max().unwrap_or(0).max(1);
    let config = model.config.clone();
    let sampling = SamplingParams { temperature: a.temperature, top_p: a.top_p, ..SamplingParams::default() };
    sampling.validate(config.vocab_size).map_err(|e| anyhow::anyhow!("--{}", e.replace('_', "-")))?;
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let blocks = blocks_needed(max_batch, a.prompt_len, a.steps).max(blocks_needed(1, a.prefill, 1));
    let mut exec = service::build_executor(device, dtype, &config, model.weights, blocks, BLOCK_SIZE, slots, a.rank)?;
    for slot in 0..slots {
        exec.load_adapter(slot as u32, AdapterWeights::synthetic(&config, a.rank, 1000 + slot as u64))?;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut prefill = None;
    if a.prefill > 0 {
        let mut runs = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds {
            runs.push(bench::prefill(exec.as_mut(), config.vocab_size, None, a.prefill, DEFAULT_MAX_BATCH_TOKENS)?);
        }
        let tps = median(runs.iter().map(|p| p.tokens_per_s).collect());
        prefill = Some((tps, median(runs.iter().map(|p| p.ttft_ms).collect())));
    }
    // Every case once per round, so that drift on a noisy machine spreads over all of them.
    let cases: Vec<(usize, usize)> = a.batch.iter().flat_map(|&b| a.adapters.iter().map(move |&n| (b, n))).collect();
    let mut runs = vec![Vec::with_capacity(a.rounds); cases.len()];
    for _ in 0..a.rounds {
        for (&(batch, n), runs) in cases.iter().zip(&mut runs) {
            // Row i uses adapter i mod n: n distinct adapters spread over the batch.
            let rows: Vec<Option<u32>> = (0..batch).map(|i| (n > 0).then(|| (i % n) as u32)).collect();
            runs.push(decode_tokens_per_s(exec.as_mut(), config.vocab_size, &rows, a.prompt_len, a.steps, &sampling)?);
        }
    }
    let decode: Vec<(usize, usize, f64)> = cases.iter().zip(runs).map(|(&(b, n), r)| (b, n, median(r))).collect();
    if a.json {
        let out = serde_json::json!({
            "model": model.name,
            "device": exec.device(),
            "dtype": exec.dtype(),
            "rank": a.rank,
            "prompt_len": a.prompt_len,
            "steps": a.steps,
            "rounds": a.rounds,
            "temperature": a.temperature,
            "top_p": a.top_p,
            "prefill_tokens": a.prefill,
            "prefill_tokens_per_s": prefill.map(|p| p.0),
            "ttft_ms": prefill.map(|p| p.1),
            "decode": decode
                .iter()
                .map(|&(batch, adapters, tps)| serde_json::json!({"batch": batch, "adapters": adapters, "tokens_per_s": tps}))
                .collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(());
    }
    let sampled = match sampling.is_greedy() {
        true => "greedy".to_string(),
        false => format!("sampled at temperature {} and top-p {}", a.temperature, a.top_p),
    };
    println!(
        "{} on {} ({}), prompt {}, {} decode steps ({sampled}), rank-{} adapters on all projections, median of {} rounds",
        model.name,
        exec.device(),
        exec.dtype(),
        a.prompt_len,
        a.steps,
        a.rank,
        a.rounds
    );
    if let Some((tps, ttft)) = prefill {
        println!("prefill of {} tokens: {tps:.1} tokens/s, first token after {ttft:.1} ms", a.prefill);
    }
    println!("{:<8} {:<18} {:>12} {:>14}", "batch", "distinct adapters", "tokens/s", "vs no adapter");
    for &(batch, n, tps) in &decode {
        let base = decode.iter().find(|&&(b, _, _)| b == batch).map_or(tps, |d| d.2);
        println!("{batch:<8} {n:<18} {tps:>12.1} {:>14.2}", tps / base);
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_decimal_and_binary_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("20GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("3MB"), Ok(3_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
