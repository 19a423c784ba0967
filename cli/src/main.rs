//! `switchyard`: the one binary users run.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use switchyard_backend::service::{self, ServeOptions};

/// Defaults, named once.
const DEFAULT_BACKEND_LISTEN: &str = "127.0.0.1:50051";
const DEFAULT_MAX_LORAS: usize = 8;
const DEFAULT_MAX_LORA_RANK: usize = 64;
const DEFAULT_KV_CACHE_MIB: usize = 1024;
const DEFAULT_MAX_BATCH_TOKENS: usize = 2048;
const DEFAULT_MAX_RUNNING: usize = 64;
const DEFAULT_MAX_WAITING: usize = 1024;

#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about = "Serve many LoRA fine-tunes of one base model to many tenants")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a backend: one model, resident adapters, continuous batching, gRPC.
    Backend(BackendArgs),
}

#[derive(clap::Args, Debug)]
struct BackendArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Address for the gRPC server; port 0 picks a free port (printed at start-up).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = DEFAULT_BACKEND_LISTEN)]
    listen: SocketAddr,
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
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Backend(args) => run_backend(args).await,
    }
}

async fn run_backend(a: BackendArgs) -> Result<()> {
    let opts = ServeOptions {
        model: a.model,
        listen: a.listen,
        max_loras: a.max_loras,
        max_lora_rank: a.max_lora_rank,
        max_model_len: a.max_model_len,
        kv_cache_mib: a.kv_cache_mib,
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        max_waiting: a.max_waiting,
    };
    let served = service::prepare(opts).await?;
    // One line on stdout, for scripts and tests that start the backend on port 0.
    println!("switchyard backend listening on {}", served.local_addr);
    served.run(shutdown_signal()).await?;
    tracing::info!("backend stopped");
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
