//! [`Upstream`] over the backend's gRPC service and `grpc.health.v1`.

use super::{Probe, TokenStream, Upstream, UpstreamCode, UpstreamError};
use async_trait::async_trait;
use futures::StreamExt;
use std::time::Duration;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::backend_client::BackendClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How long calls to a backend may take.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// Establishing the connection.
    pub connect: Duration,
    /// One health probe (health check, info and adapter list together).
    pub probe: Duration,
    /// One adapter load or unload (a load may download gigabytes).
    pub admin: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(2),
            probe: Duration::from_secs(3),
            admin: Duration::from_secs(15 * 60),
        }
    }
}

/// A backend reached over gRPC. The channel connects lazily and reconnects by itself, so a
/// backend that restarts on the same address is picked up again without a new client.
#[derive(Debug, Clone)]
pub struct GrpcUpstream {
    address: String,
    backend: BackendClient<Channel>,
    health: HealthClient<Channel>,
    timeouts: UpstreamTimeouts,
}

impl GrpcUpstream {
    /// A client for the backend at `address` (`http://host:port`). Fails only on an address
    /// that is not a valid URI; nothing is connected yet.
    pub fn new(address: &str, timeouts: UpstreamTimeouts) -> Result<GrpcUpstream, String> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| format!("backend address {address:?} is not a URI: {e}"))?
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if !matches!(endpoint.uri().scheme_str(), Some("http" | "https")) || endpoint.uri().host().is_none() {
            return Err(format!("backend address {address:?} must look like http://host:port"));
        }
        let channel = endpoint.connect_lazy();
        Ok(GrpcUpstream {
            address: address.to_string(),
            backend: BackendClient::new(channel.clone()),
            health: HealthClient::new(channel),
            timeouts,
        })
    }
}

fn from_status(status: tonic::Status) -> UpstreamError {
    use tonic::Code;
    let code = match status.code() {
        Code::NotFound => UpstreamCode::NotFound,
        Code::InvalidArgument | Code::OutOfRange => UpstreamCode::InvalidArgument,
        Code::PermissionDenied | Code::Unauthenticated => UpstreamCode::PermissionDenied,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => UpstreamCode::FailedPrecondition,
        Code::ResourceExhausted => UpstreamCode::ResourceExhausted,
        Code::Unavailable | Code::Cancelled => UpstreamCode::Unavailable,
        Code::DeadlineExceeded => UpstreamCode::Timeout,
        _ => UpstreamCode::Other,
    };
    let message = if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().into() };
    UpstreamError::new(code, message)
}

fn timed_out(what: &str, after: Duration) -> UpstreamError {
    UpstreamError::new(UpstreamCode::Timeout, format!("{what} took longer than {}s", after.as_secs()))
}

#[async_trait]
impl Upstream for GrpcUpstream {
    fn address(&self) -> &str {
        &self.address
    }

    async fn probe(&self) -> Result<Probe, UpstreamError> {
        let (mut health, mut backend) = (self.health.clone(), self.backend.clone());
        let calls = async move {
            let status = health.check(HealthCheckRequest { service: String::new() }).await.map_err(from_status)?;
            let info = backend.info(pb::InfoRequest {}).await.map_err(from_status)?.into_inner();
            let adapters = backend.list_adapters(pb::ListAdaptersRequest {}).await.map_err(from_status)?;
            Ok(Probe {
                serving: status.into_inner().status() == ServingStatus::Serving,
                info,
                adapters: adapters.into_inner().adapters,
            })
        };
        tokio::time::timeout(self.timeouts.probe, calls)
            .await
            .map_err(|_| timed_out("health probe", self.timeouts.probe))?
    }

    async fn generate(&self, request: pb::GenerateRequest) -> Result<TokenStream, UpstreamError> {
        let mut backend = self.backend.clone();
        let stream = backend.generate(request).await.map_err(from_status)?.into_inner();
        Ok(stream.map(|m| m.map_err(from_status)).boxed())
    }

    async fn load_adapter(&self, request: pb::LoadAdapterRequest) -> Result<pb::LoadAdapterResponse, UpstreamError> {
        let mut backend = self.backend.clone();
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeouts.admin);
        backend.load_adapter(request).await.map(tonic::Response::into_inner).map_err(from_status)
    }

    async fn unload_adapter(&self, name: &str) -> Result<(), UpstreamError> {
        let mut backend = self.backend.clone();
        let mut request = tonic::Request::new(pb::UnloadAdapterRequest { name: name.to_string() });
        request.set_timeout(self.timeouts.admin);
        backend.unload_adapter(request).await.map(|_| ()).map_err(from_status)
    }
}
