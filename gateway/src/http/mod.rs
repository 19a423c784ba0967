//! The gateway's HTTP servers (axum): the public one with the OpenAI endpoints, the adapter and
//! policy APIs, health and readiness; and the operators' one ([`metrics_router`]) with the
//! Prometheus metrics, on a listener of its own that tenants are not given. Handlers are thin:
//! they read the request, call [`crate::admin`] or [`crate::dispatch`], and shape the answer.
//! Every error leaves as an OpenAI error body.

mod inference;
mod loras;
mod policies;
mod serve;
mod stream;
#[cfg(test)]
mod tests;

pub use serve::{HYPER_MAX_HEAD_BYTES, MAX_HEADER_BYTES, serve};

use crate::Gateway;
use crate::auth::Principal;
use crate::error::{Code, Error};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use std::sync::Arc;
use tracing::Instrument;

/// The header that carries a request's id, in and out.
pub const REQUEST_ID: &str = "x-request-id";

/// A request's id: the client's `x-request-id` when it is sane, else a fresh random one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Every failure leaves as an OpenAI error body with the status its code maps to; a 503 says
/// when to retry, a 401 which scheme authenticates.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, _) = crate::openai::error::status(&self.code);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], crate::openai::error::body(&self)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(crate::RETRY_AFTER_S));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The public HTTP application (what tenants reach).
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(inference::chat))
        .route("/v1/completions", post(inference::completions))
        .route("/v1/models", get(inference::models))
        .route("/v1/loras", get(loras::list).post(loras::load))
        .route("/v1/loras/{*name}", delete(loras::unload))
        .route("/v1/policies", get(policies::list).post(policies::upload))
        .route("/v1/policies/rollback", post(policies::rollback))
        .route("/v1/policies/{id}", delete(policies::delete))
        .route("/v1/policies/{id}/activate", post(policies::activate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(check_headers))
        .layer(middleware::from_fn(request_id))
        .with_state(gw)
}

/// The operators' HTTP application: `/metrics` (the Prometheus text exposition, whose labels
/// name every tenant and adapter), `/healthz` and `/readyz`. Serve it on a listener tenants
/// cannot reach.
pub fn metrics_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gw)
}

async fn unknown_url() -> Error {
    Error::new(Code::UnknownUrl, "no such endpoint")
}

async fn method_not_allowed() -> Error {
    Error::new(Code::MethodNotAllowed, "this method is not allowed on this endpoint")
}

/// Refuses a request whose head is larger than [`MAX_HEADER_BYTES`] (431) or that carries more
/// than one `Authorization` header (400: which one speaks for the caller would be a guess), with
/// an OpenAI error body like every other refusal.
async fn check_headers(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        let message = format!("the request headers take {bytes} bytes; the limit is {MAX_HEADER_BYTES}");
        return Error::new(Code::HeadersTooLarge, message).into_response();
    }
    if headers.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        let message = "the request has more than one Authorization header; send exactly one";
        return Error::new(Code::DuplicateAuthorization, message).into_response();
    }
    next.run(request).await
}

/// A fresh request id: 24 hex digits. The first 16 are a bijective mix of a per-process
/// counter (so unique within the process), the last 8 come from a key drawn once at start (so
/// processes differ). Ids name requests in logs; they are not secrets.
fn fresh_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEY: std::sync::LazyLock<u64> = std::sync::LazyLock::new(crate::random_u64);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // splitmix64's finalizer: a bijection on u64.
    let mut z = n.wrapping_add(*KEY).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!("{z:016x}{:08x}", *KEY >> 32)
}

/// Gives every request an id (in a tracing span, the response header and the handlers'
/// extensions) and logs one line per request: method, path, status, duration. Never bodies.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(fresh_id, str::to_string);
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", id = %id, method = %request.method(), path = %request.uri().path());
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "answered");
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.ready() {
        return "ready".into_response();
    }
    let why: Vec<String> = gw.views().iter().map(|v| format!("{}: {}", v.address, v.reason())).collect();
    let message = match why.is_empty() {
        true => "no backend is healthy: none is known".to_string(),
        false => format!("no backend is healthy ({})", why.join("; ")),
    };
    Error::new(Code::NoBackend, message).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], gw.metrics.render())
        .into_response()
}

/// The caller, from the `Authorization: Bearer` header.
pub(crate) fn principal(gw: &Gateway, headers: &HeaderMap) -> Result<Arc<Principal>, Error> {
    let header = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(v) => Some(
            v.to_str().map_err(|_| Error::new(Code::MalformedToken, "the Authorization header is not valid text"))?,
        ),
    };
    Ok(gw.verifier.verify_header(header)?)
}

/// The request body, up to the configured limit.
pub(crate) async fn read_body(gw: &Gateway, headers: &HeaderMap, body: Body) -> Result<Bytes, Error> {
    read_body_up_to(gw.options.max_body_bytes, headers, body).await
}

/// The request body, up to `limit` bytes.
pub(crate) async fn read_body_up_to(limit: usize, headers: &HeaderMap, body: Body) -> Result<Bytes, Error> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Error::too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        let mut too_large = false;
        while let Some(c) = cause {
            too_large |= c.is::<http_body_util::LengthLimitError>();
            cause = c.source();
        }
        if too_large {
            Error::too_large(limit)
        } else {
            Error::invalid(format!("cannot read the request body: {e}"), None)
        }
    })
}
