//! The gateway's seam to one backend. The router and the HTTP layer talk to [`Upstream`]; the
//! gRPC client behind it ([`GrpcUpstream`]) is the real implementation.

mod grpc;

pub use grpc::{GrpcUpstream, UpstreamSecurity, UpstreamTimeouts};

use async_trait::async_trait;
use futures::stream::BoxStream;
use switchyard_proto::v1 as pb;

/// The messages of one generation, as the backend streams them.
pub type TokenStream = BoxStream<'static, Result<pb::GenerateResponse, UpstreamError>>;

/// What went wrong talking to a backend, by the backend contract's status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamCode {
    NotFound,
    InvalidArgument,
    PermissionDenied,
    FailedPrecondition,
    ResourceExhausted,
    /// The backend is down, unreachable or shutting down.
    Unavailable,
    /// The call ran past its deadline.
    Timeout,
    /// The backend refused the call's fencing token: a newer leader drives it.
    Fenced,
    /// Anything else (a backend bug, a protocol error).
    Other,
}

/// A failed call to a backend: its code and the backend's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    pub code: UpstreamCode,
    pub message: String,
}

impl UpstreamError {
    pub fn new(code: UpstreamCode, message: impl Into<String>) -> UpstreamError {
        UpstreamError { code, message: message.into() }
    }

    /// Whether the backend itself is in trouble (as opposed to the request being refused): the
    /// router may try another backend.
    pub fn is_backend_failure(&self) -> bool {
        matches!(self.code, UpstreamCode::Unavailable | UpstreamCode::Timeout | UpstreamCode::Other)
    }
}

/// What one health probe learns about a backend.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `grpc.health.v1` says SERVING.
    pub serving: bool,
    pub info: pb::InfoResponse,
    pub adapters: Vec<pb::AdapterInfo>,
}

/// One backend, as the gateway uses it.
#[async_trait]
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// The address it was configured with; names the backend in answers, logs and metrics.
    fn address(&self) -> &str;
    /// Health, model facts and load, and the adapters it knows, in one round of calls.
    async fn probe(&self) -> Result<Probe, UpstreamError>;
    /// Starts a generation. Dropping the stream cancels it on the backend.
    async fn generate(&self, request: pb::GenerateRequest) -> Result<TokenStream, UpstreamError>;
    async fn load_adapter(&self, request: pb::LoadAdapterRequest) -> Result<pb::LoadAdapterResponse, UpstreamError>;
    /// Unloads `name`, with the caller's fencing token (0: unfenced).
    async fn unload_adapter(&self, name: &str, fence: u64) -> Result<(), UpstreamError>;
}
