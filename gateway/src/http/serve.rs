//! The accept loop of the gateway's listeners: what `axum::serve` does (HTTP/1.1 and h2c,
//! `TCP_NODELAY`, graceful shutdown), with hyper's request-head limits set.
//!
//! hyper answers a request head past its own limits with a bare 431 and no body, before any
//! handler runs. Its limits are therefore set well above the gateway's ([`MAX_HEADER_BYTES`],
//! checked by `check_headers` in the parent module), so that an oversized header gets an
//! OpenAI error body like every other refusal. Only a head past [`HYPER_MAX_HEAD_BYTES`] (a
//! client that is not speaking HTTP in good faith) still gets hyper's bare answer.

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Largest request head the gateway accepts (all header names and values together); a larger
/// one is answered 431 with an OpenAI error body. Bearer tokens of identity providers are a few
/// KiB; this leaves room for many of them.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// What hyper itself buffers for a request head before giving up (its default is ~400 KiB).
pub const HYPER_MAX_HEAD_BYTES: usize = 2 << 20;
/// Most header fields hyper parses in one HTTP/1.1 request (its default is 100).
const HYPER_MAX_HEADERS: usize = 1024;
/// How long a client may take to send a request head: a connection trickling its headers in
/// (holding up to [`HYPER_MAX_HEAD_BYTES`] of buffer) is closed after this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the loop waits after an accept error that is not about one connection (for
/// example, out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(HYPER_MAX_HEAD_BYTES)
        .max_headers(HYPER_MAX_HEADERS)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().max_header_list_size(HYPER_MAX_HEAD_BYTES as u32);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "cannot accept connections; retrying in 1 s");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small responses and SSE events go out at once instead of waiting on Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone().map_request(|r: hyper::Request<Incoming>| r.map(Body::new)));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(tcp), service).into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Errors about one connection that went away before it was accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
