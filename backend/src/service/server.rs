//! Starting a backend: load the model, build the executor and engine, serve gRPC.

use super::security::{self, Credentials, RequireCredential, SecurityError, SecurityOptions};
use super::{BackendService, ServedModel};
use crate::adapters::{
    AdapterManager, AdapterStore, FileSource, HfSource, HfSourceOptions, S3Source, S3SourceOptions, SourceRegistry,
    StoreOptions,
};
use crate::engine::cpu::CpuExecutor;
use crate::engine::cuda::CudaExecutor;
use crate::engine::executor::{Executor, ExecutorError};
use crate::engine::scheduler::SchedulerConfig;
use crate::engine::{Engine, EngineConfig, Health};
use crate::model::{Model, ModelError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard_kernels::quant::Precision;
use switchyard_proto::v1::backend_server::BackendServer;
use tonic::server::NamedService;

/// Tokens per KV cache block.
pub const KV_BLOCK_SIZE: usize = 16;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when a driver, a device, NVRTC and cuBLAS are present; else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    /// The CUDA executor on the CPU emulation of a CUDA device: the real kernels and executor
    /// logic, slowly, without a GPU. For tests; only builds with the kernels crate's
    /// `emulation` feature (test builds) have it.
    EmulatedCuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "emulated-cuda" => Ok(DeviceChoice::EmulatedCuda),
            other => {
                other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceChoice::Cuda).ok_or_else(|| {
                    format!("unknown device {other:?}; expected auto, cpu, cuda, cuda:N or emulated-cuda")
                })
            }
        }
    }
}

/// The element type the executor computes and keeps its KV cache in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeChoice {
    /// bf16 on CUDA devices, q16 on the CPU.
    Auto,
    F32,
    Bf16,
    /// CPU only: GGUF's block-quantized matrices stay in their blocks and multiply activations
    /// quantized to 8 bits per block (llama.cpp's arithmetic), bf16 matrices stay bf16, the KV
    /// cache holds f16; the rest is f32 (all of it, KV included, for a model of f32 matrices).
    Q8,
    /// CPU only: as `Q8`, with activations quantized to 16 bits per block (two 8-bit limbs):
    /// logits within about 5e-4 of f32's, for twice the integer multiply-adds.
    Q16,
}

impl std::str::FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<DtypeChoice, String> {
        match s {
            "auto" => Ok(DtypeChoice::Auto),
            "f32" | "float32" => Ok(DtypeChoice::F32),
            "bf16" | "bfloat16" => Ok(DtypeChoice::Bf16),
            "q8" => Ok(DtypeChoice::Q8),
            "q16" => Ok(DtypeChoice::Q16),
            other => Err(format!("unknown dtype {other:?}; expected auto, f32, bf16, q8 or q16")),
        }
    }
}

/// The dtype a resolved device runs in: `auto` made concrete, and what it cannot run refused.
pub fn resolve_dtype(device: DeviceChoice, dtype: DtypeChoice) -> Result<DtypeChoice, ServeError> {
    match (device, dtype) {
        (DeviceChoice::Cpu | DeviceChoice::Auto, DtypeChoice::Bf16) => {
            Err(ServeError::Device("--dtype bf16: the CPU executor computes in f32".into()))
        }
        (DeviceChoice::Cpu | DeviceChoice::Auto, DtypeChoice::Auto) => Ok(DtypeChoice::Q16),
        (DeviceChoice::Cpu | DeviceChoice::Auto, concrete) => Ok(concrete),
        (_, DtypeChoice::Q8 | DtypeChoice::Q16) => Err(ServeError::Device(
            "--dtype q8 and q16 (integer products on quantized weights) are the CPU executor's; use f32 or bf16".into(),
        )),
        (_, DtypeChoice::Auto) => Ok(DtypeChoice::Bf16),
        (_, concrete) => Ok(concrete),
    }
}

/// The dtype a loaded model runs in: `q8` and `q16` keep the matrices a file stores in a reduced
/// form (block-quantized, bf16), so a model of f32 matrices (an f32 checkpoint, a synthetic
/// model) runs in `f32`, its KV cache included.
pub fn dtype_for_weights(dtype: DtypeChoice, weights: &crate::model::ModelWeights) -> DtypeChoice {
    match dtype {
        DtypeChoice::Q8 | DtypeChoice::Q16 if weights.all_f32() => DtypeChoice::F32,
        dtype => dtype,
    }
}

/// Whether CUDA device `ordinal` can run the CUDA executor, or why not (checked without
/// touching the model weights).
pub fn probe_cuda(ordinal: usize) -> Result<(), String> {
    use switchyard_kernels::cuda;
    cuda::open_device(ordinal).map_err(|e| e.to_string())?;
    if !cuda::nvrtc_available() {
        return Err(cuda::CudaError::NoNvrtc.to_string());
    }
    if !cuda::cublas_available() {
        return Err(cuda::CudaError::NoBlas.to_string());
    }
    Ok(())
}

/// Resolves `auto` to the device that will be used, saying why.
pub fn resolve_device(choice: DeviceChoice) -> Result<DeviceChoice, ServeError> {
    match choice {
        DeviceChoice::Cpu => Ok(DeviceChoice::Cpu),
        DeviceChoice::Cuda(n) => {
            probe_cuda(n).map_err(|e| ServeError::Device(format!("--device cuda:{n}: {e}")))?;
            Ok(DeviceChoice::Cuda(n))
        }
        DeviceChoice::EmulatedCuda => {
            if !switchyard_kernels::cuda::Emulator::available() {
                return Err(ServeError::Device(format!(
                    "--device emulated-cuda: {}",
                    switchyard_kernels::cuda::CudaError::NoEmulation
                )));
            }
            Ok(DeviceChoice::EmulatedCuda)
        }
        DeviceChoice::Auto => match probe_cuda(0) {
            Ok(()) => {
                tracing::info!("device auto: using CUDA device 0");
                Ok(DeviceChoice::Cuda(0))
            }
            Err(why) => {
                tracing::info!(reason = %why, "device auto: using the CPU");
                Ok(DeviceChoice::Cpu)
            }
        },
    }
}

/// Bytes of one KV cache value in a resolved dtype: bf16 on CUDA, f16 for the CPU's quantized
/// executor, f32 otherwise.
pub fn kv_value_bytes(dtype: DtypeChoice) -> usize {
    match dtype {
        DtypeChoice::Bf16 | DtypeChoice::Q8 | DtypeChoice::Q16 => 2,
        _ => 4,
    }
}

/// Builds the executor for a resolved device and dtype.
#[allow(clippy::too_many_arguments)]
pub fn build_executor(
    device: DeviceChoice,
    dtype: DtypeChoice,
    config: &crate::model::ModelConfig,
    weights: crate::model::ModelWeights,
    kv_blocks: usize,
    block_size: usize,
    max_loras: usize,
    max_rank: usize,
) -> Result<Box<dyn Executor>, ServeError> {
    use half::bf16;
    use switchyard_kernels::cuda::Emulator;
    let (b, s, l, r) = (kv_blocks, block_size, max_loras, max_rank);
    let on_cuda = |n: usize| move |e: ExecutorError| ServeError::Device(format!("cuda:{n}: {e}"));
    let emulated = |e: ExecutorError| ServeError::Device(format!("emulated-cuda: {e}"));
    let emulator = || Emulator::new().map_err(|e| ServeError::Device(format!("emulated-cuda: {e}")));
    let executor: Box<dyn Executor> = match (device, dtype) {
        (DeviceChoice::Cuda(n), DtypeChoice::F32) => {
            Box::new(CudaExecutor::<f32>::open(n, config, weights, b, s, l, r).map_err(on_cuda(n))?)
        }
        (DeviceChoice::Cuda(n), _) => {
            Box::new(CudaExecutor::<bf16>::open(n, config, weights, b, s, l, r).map_err(on_cuda(n))?)
        }
        (DeviceChoice::EmulatedCuda, DtypeChoice::F32) => {
            Box::new(CudaExecutor::<f32, _>::new(emulator()?, config, weights, b, s, l, r).map_err(emulated)?)
        }
        (DeviceChoice::EmulatedCuda, _) => {
            Box::new(CudaExecutor::<bf16, _>::new(emulator()?, config, weights, b, s, l, r).map_err(emulated)?)
        }
        (_, DtypeChoice::Q8) => Box::new(CpuExecutor::new_quantized(config, weights, b, s, l, r, Precision::Int8)),
        (_, DtypeChoice::Q16) => Box::new(CpuExecutor::new_quantized(config, weights, b, s, l, r, Precision::Int16)),
        _ => Box::new(CpuExecutor::new(config, weights, b, s, l, r)),
    };
    Ok(with_faults(executor))
}

/// In test builds, the executor wrapped to fail as `SWITCHYARD_FAULTS_FILE` says.
fn with_faults(executor: Box<dyn Executor>) -> Box<dyn Executor> {
    #[cfg(feature = "fault-injection")]
    {
        crate::engine::faults::Faulty::wrap_from_env(executor)
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        executor
    }
}

/// Everything `switchyard backend` is configured with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A Hugging Face model directory, or `synthetic:<preset>`.
    pub model: PathBuf,
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub listen: SocketAddr,
    pub max_loras: usize,
    pub max_lora_rank: usize,
    /// Upper bound on prompt + completion; the model's own limit applies when lower.
    pub max_model_len: Option<usize>,
    /// Memory for the KV cache, in MiB.
    pub kv_cache_mib: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    /// Most requests of one tenant running at once (default: `max_running`, no cap of its own).
    pub max_running_per_tenant: Option<usize>,
    /// Most requests of one tenant waiting (default: half of `max_waiting`), so that one
    /// tenant cannot fill the queue for everyone.
    pub max_waiting_per_tenant: Option<usize>,
    /// Reuse cached prompt blocks between requests with the same prefix, adapter weights and
    /// cache salt.
    pub prefix_cache: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`); never the gRPC port.
    pub metrics_listen: Option<SocketAddr>,
    pub adapters: AdapterOptions,
    /// The credential callers must present, and TLS.
    pub security: SecurityOptions,
}

/// Where adapters may come from and how they are kept.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Directories `file://` adapters may be read from; empty refuses every `file://` load.
    pub roots: Vec<PathBuf>,
    /// Disk cache for remote adapters (default: `adapters/` in the user's Switchyard cache).
    pub cache_dir: Option<PathBuf>,
    /// Byte budget of the disk cache.
    pub cache_bytes: u64,
    /// Largest adapter accepted, config and weights together.
    pub max_adapter_bytes: u64,
    /// Upper bound on fetching one adapter from a remote source.
    pub download_timeout: Duration,
    /// How long an unload waits for the adapter's running requests.
    pub unload_timeout: Duration,
}

impl Default for AdapterOptions {
    fn default() -> AdapterOptions {
        AdapterOptions {
            roots: Vec::new(),
            cache_dir: None,
            cache_bytes: 20 << 30,
            max_adapter_bytes: 4 << 30,
            download_timeout: Duration::from_secs(600),
            unload_timeout: Duration::from_secs(30),
        }
    }
}

/// The sources a backend reads by default: `file://` (inside the allowed roots), `s3://` and
/// `hf://`. Register more on the result to add schemes.
pub fn default_sources(opts: &AdapterOptions) -> Result<SourceRegistry, ServeError> {
    let mut sources = SourceRegistry::new();
    let file = FileSource::new(opts.roots.clone()).map_err(|e| ServeError::Config(format!("--adapter-roots: {e}")))?;
    sources.register("file", Arc::new(file));
    let s3 = S3Source::new(S3SourceOptions { download_timeout: opts.download_timeout, ..S3SourceOptions::default() });
    sources.register("s3", Arc::new(s3));
    let hf =
        HfSource::from_env(HfSourceOptions { download_timeout: opts.download_timeout, ..HfSourceOptions::default() })
            .map_err(|e| ServeError::Config(e.to_string()))?;
    sources.register("hf", Arc::new(hf));
    Ok(sources)
}

/// Opens the adapter store: the sources and the disk cache.
pub fn open_store(opts: &AdapterOptions, sources: SourceRegistry) -> Result<AdapterStore, ServeError> {
    let cache_dir = match &opts.cache_dir {
        Some(dir) => dir.clone(),
        None => crate::paths::cache_dir()
            .map(|c| c.join("adapters"))
            .ok_or_else(|| ServeError::Config("no cache directory: set --lora-cache-dir or HOME".into()))?,
    };
    if opts.max_adapter_bytes == 0 || opts.cache_bytes == 0 {
        return Err(ServeError::Config("--max-adapter-bytes and --lora-cache-bytes must be at least 1".into()));
    }
    let store_opts =
        StoreOptions { cache_dir, cache_bytes: opts.cache_bytes, max_adapter_bytes: opts.max_adapter_bytes };
    AdapterStore::new(sources, &store_opts).map_err(|e| ServeError::Config(format!("adapter cache: {e}")))
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Device(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Security(#[from] SecurityError),
}

/// A backend that is loaded and bound, ready to serve.
#[derive(Debug)]
pub struct Served {
    pub local_addr: SocketAddr,
    /// Where `/metrics` is served (`--metrics-listen`), if anywhere.
    pub metrics_addr: Option<SocketAddr>,
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    service: BackendService,
    credentials: Option<Credentials>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Sizes the engine from the options and the model.
fn engine_config(opts: &ServeOptions, model: &Model, value_bytes: usize) -> Result<EngineConfig, ServeError> {
    let c = &model.config;
    for (name, v) in [
        ("--max-loras", opts.max_loras),
        ("--max-lora-rank", opts.max_lora_rank),
        ("--max-batch-tokens", opts.max_batch_tokens),
        ("--max-running", opts.max_running),
        ("--max-waiting", opts.max_waiting),
        ("--max-running-per-tenant", opts.max_running_per_tenant.unwrap_or(1)),
        ("--max-waiting-per-tenant", opts.max_waiting_per_tenant.unwrap_or(1)),
        ("--kv-cache-mib", opts.kv_cache_mib),
    ] {
        if v == 0 {
            return Err(ServeError::Config(format!("{name} must be at least 1")));
        }
    }
    // K and V, every layer.
    let bytes_per_token = 2 * c.num_layers * c.kv_dim() * value_bytes;
    let budget_tokens = opts.kv_cache_mib * (1 << 20) / bytes_per_token;
    let model_len = opts.max_model_len.unwrap_or(c.max_position_embeddings).min(c.max_position_embeddings);
    // No point holding more than every running sequence at full length.
    let useful_tokens = opts.max_running.saturating_mul(model_len);
    let num_blocks = budget_tokens.min(useful_tokens).div_ceil(KV_BLOCK_SIZE);
    let kv_tokens = num_blocks * KV_BLOCK_SIZE;
    if kv_tokens < 2 {
        return Err(ServeError::Config(format!(
            "--kv-cache-mib {} holds fewer than 2 tokens of this model",
            opts.kv_cache_mib
        )));
    }
    // One sequence must always fit on its own, or it could never finish.
    let max_model_len = model_len.min(kv_tokens);
    if max_model_len < model_len {
        tracing::warn!(
            max_model_len,
            kv_tokens,
            "KV cache is smaller than the model context; limiting requests to what it holds"
        );
    }
    Ok(EngineConfig {
        scheduler: SchedulerConfig {
            block_size: KV_BLOCK_SIZE,
            num_blocks,
            max_batch_tokens: opts.max_batch_tokens.max(1),
            max_running: opts.max_running,
            max_running_per_tenant: opts.max_running_per_tenant.unwrap_or(opts.max_running).min(opts.max_running),
            prefix_caching: opts.prefix_cache,
        },
        max_model_len,
        max_waiting: opts.max_waiting,
        max_waiting_per_tenant: opts
            .max_waiting_per_tenant
            .unwrap_or(opts.max_waiting.div_ceil(2))
            .min(opts.max_waiting),
        max_loras: opts.max_loras,
        max_lora_rank: opts.max_lora_rank,
    })
}

/// Loads the model, starts the engine and binds the listener. Fails before binding when the
/// model or the configuration is bad.
pub async fn prepare(opts: ServeOptions) -> Result<Served, ServeError> {
    let sources = default_sources(&opts.adapters)?;
    prepare_with_sources(opts, sources).await
}

/// [`prepare`] with the adapter sources given (e.g. [`default_sources`] plus a custom scheme).
pub async fn prepare_with_sources(opts: ServeOptions, sources: SourceRegistry) -> Result<Served, ServeError> {
    // Bad security settings fail before anything slow, and before the port is bound.
    let credentials = opts.security.credential_file.as_deref().map(Credentials::read).transpose()?;
    let tls = opts.security.tls.as_ref().map(security::server_tls).transpose()?;
    let store = open_store(&opts.adapters, sources)?;
    let device = resolve_device(opts.device)?;
    let dtype = resolve_dtype(device, opts.dtype)?;
    let dir = opts.model.clone();
    let model = tokio::task::spawn_blocking(move || Model::open(&dir))
        .await
        .map_err(|e| ServeError::Config(format!("model loader failed: {e}")))??;
    let dtype = dtype_for_weights(dtype, &model.weights);
    let cfg = engine_config(&opts, &model, kv_value_bytes(dtype))?;
    let Model { name, config, weights, tokenizer } = model;
    let (blocks, loras, rank) = (cfg.scheduler.num_blocks, cfg.max_loras, cfg.max_lora_rank);
    let executor = tokio::task::spawn_blocking({
        let config = config.clone();
        move || build_executor(device, dtype, &config, weights, blocks, KV_BLOCK_SIZE, loras, rank)
    })
    .await
    .map_err(|e| ServeError::Config(format!("executor start-up failed: {e}")))??;
    let served =
        ServedModel { name, config: config.clone(), device: executor.device(), dtype: executor.dtype().to_string() };
    tracing::info!(
        model = %served.name,
        architecture = %config.architecture,
        device = %served.device,
        max_model_len = cfg.max_model_len,
        kv_cache_tokens = cfg.scheduler.num_blocks * KV_BLOCK_SIZE,
        max_loras = cfg.max_loras,
        max_lora_rank = cfg.max_lora_rank,
        "model loaded"
    );
    let tokenizer = Arc::new(tokenizer);
    let engine = Arc::new(Engine::start(&config, tokenizer.clone(), executor, cfg));
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let adapters = Arc::new(AdapterManager::new(
        store,
        engine.clone(),
        config.clone(),
        served.name.clone(),
        opts.adapters.unload_timeout,
        metrics.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: opts.listen, source })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind { addr: opts.listen, source })?;
    if credentials.is_none() {
        tracing::warn!(
            address = %local_addr,
            "NO BACKEND CREDENTIAL (--credential-file): anyone who can reach this port may load any adapter this \
             backend can read (its --adapter-roots, S3 and the Hub with its own credentials) and generate with it"
        );
    }
    if tls.is_none() {
        tracing::warn!(
            address = %local_addr,
            "no TLS (--tls-cert, --tls-key): prompts, completions and the credential cross the network in the clear"
        );
    }
    let metrics_listener = match opts.metrics_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?)
        }
        None => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()
        .map_err(|source| ServeError::Bind { addr: opts.listen, source })?;
    let service = BackendService::new(engine, adapters, tokenizer, served, metrics);
    Ok(Served { local_addr, metrics_addr, listener, metrics_listener, service, credentials, tls })
}

impl Served {
    /// Serves the backend and `grpc.health.v1` until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // grpc.health.v1 follows the engine: SERVING while it can generate, NOT_SERVING for good
        // once its thread has died or its device has faulted (`Info` says why).
        let mut engine_health = self.service.engine().watch_health();
        tokio::spawn(async move {
            loop {
                let status = match &*engine_health.borrow_and_update() {
                    Health::Serving => tonic_health::ServingStatus::Serving,
                    Health::Failed(_) => tonic_health::ServingStatus::NotServing,
                };
                health.set_service_status("", status).await;
                health.set_service_status(<BackendServer<BackendService> as NamedService>::NAME, status).await;
                if engine_health.changed().await.is_err() {
                    return;
                }
            }
        });
        // Server reflection, so grpcurl and other generic clients need no .proto files; both
        // versions, as older clients only speak v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(switchyard_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        if let Some(listener) = self.metrics_listener {
            let exporter = Arc::new(self.service.exporter());
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let exporter = exporter.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            exporter.render(),
                        )
                    }
                }),
            );
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            });
        }
        let reflection_error = |e: tonic_reflection::server::Error| ServeError::Config(format!("gRPC reflection: {e}"));
        let reflection_v1 = reflection().build_v1().map_err(reflection_error)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_error)?;
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            server = server.tls_config(tls)?;
        }
        // Health and reflection stay open (probes and tools); the Backend service checks the
        // credential on every call.
        server
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(BackendServer::with_interceptor(self.service, RequireCredential(self.credentials)))
            // TCP_NODELAY on every connection: without it small gRPC frames wait on Nagle and the
            // peer's delayed ACK (~40 ms a message).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await?;
        Ok(())
    }
}

/// [`prepare`] then [`Served::run`].
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
    prepare(opts).await?.run(shutdown).await
}
