//! [`Upstream`] over the backend's gRPC service and `grpc.health.v1`.

use super::{
    AdapterState, AdapterStatus, BackendInfo, Finish, GenerateCall, Grammar, LoadCall, Loaded, Piece, PrefixStream,
    PrefixUpdate, Probe, Prompt, TokenLogprob, TokenLogprobs, TokenStream, Upstream, UpstreamCode, UpstreamError,
    Usage,
};
use async_trait::async_trait;
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;
use switchyard_proto::FIELD_METADATA;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::backend_client::BackendClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
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

/// How the gateway authenticates itself to backends and checks them: the CA that signed the
/// backends' certificates and the gateway's own client certificate (mutual TLS) for `https://`
/// addresses, and the backend credential sent on every call.
#[derive(Debug, Clone, Default)]
pub struct UpstreamSecurity {
    tls: Option<ClientTlsConfig>,
    credential: Option<MetadataValue<Ascii>>,
}

impl UpstreamSecurity {
    /// Reads the files: `ca` (PEM) to trust backends' certificates, `client` (certificate and
    /// key, PEM) to present, and `credential_file`, whose first line that is not blank or a
    /// `#` comment is the credential.
    pub fn from_files(
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
        credential_file: Option<&Path>,
    ) -> Result<UpstreamSecurity, String> {
        if client.is_some() && ca.is_none() {
            return Err("a backend client certificate needs the backends' CA (--backend-ca-file) too".into());
        }
        let tls = ca.map(|ca| switchyard_fleet::client_tls(ca, client)).transpose()?;
        let credential = match credential_file {
            None => None,
            Some(path) => Some(
                format!("Bearer {}", switchyard_fleet::first_line(path, "credential")?)
                    .parse()
                    .map_err(|_| format!("{}: the credential is not printable ASCII", path.display()))?,
            ),
        };
        Ok(UpstreamSecurity { tls, credential })
    }
}

/// Adds the backend credential to every call.
#[derive(Debug, Clone)]
pub struct AttachCredential(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for AttachCredential {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(c) = &self.0 {
            request.metadata_mut().insert("authorization", c.clone());
        }
        Ok(request)
    }
}

/// A backend reached over gRPC. The channel connects lazily and reconnects by itself, so a
/// backend that restarts on the same address is picked up again without a new client.
#[derive(Debug, Clone)]
pub struct GrpcUpstream {
    address: String,
    backend: BackendClient<InterceptedService<Channel, AttachCredential>>,
    health: HealthClient<Channel>,
    timeouts: UpstreamTimeouts,
}

impl GrpcUpstream {
    /// A client for the backend at `address` (`http://host:port`, or `https://host:port` with
    /// TLS configured in `security`). Fails only on an address or TLS settings that cannot be
    /// used; nothing is connected yet.
    pub fn new(address: &str, timeouts: UpstreamTimeouts, security: &UpstreamSecurity) -> Result<GrpcUpstream, String> {
        let mut endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| format!("backend address {address:?} is not a URI: {e}"))?
            .connect_timeout(timeouts.connect)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let scheme = endpoint.uri().scheme_str().unwrap_or_default().to_string();
        if !matches!(scheme.as_str(), "http" | "https") || endpoint.uri().host().is_none() {
            return Err(format!("backend address {address:?} must look like http://host:port or https://host:port"));
        }
        if scheme == "https" {
            let tls = security.tls.clone().ok_or_else(|| {
                format!("backend {address} is https:// but no CA is configured to check it (--backend-ca-file)")
            })?;
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("backend {address}: TLS: {e}"))?;
        }
        let channel = endpoint.connect_lazy();
        Ok(GrpcUpstream {
            address: address.to_string(),
            backend: BackendClient::with_interceptor(channel.clone(), AttachCredential(security.credential.clone())),
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
        Code::FailedPrecondition | Code::AlreadyExists => UpstreamCode::FailedPrecondition,
        Code::Aborted => UpstreamCode::Fenced,
        Code::ResourceExhausted => UpstreamCode::ResourceExhausted,
        Code::Unavailable | Code::Cancelled => UpstreamCode::Unavailable,
        Code::DeadlineExceeded => UpstreamCode::Timeout,
        _ => UpstreamCode::Other,
    };
    let message = if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().into() };
    let field = status.metadata().get(FIELD_METADATA).and_then(|v| v.to_str().ok()).map(str::to_string);
    UpstreamError { field, ..UpstreamError::new(code, message) }
}

fn timed_out(what: &str, after: Duration) -> UpstreamError {
    UpstreamError::new(UpstreamCode::Timeout, format!("{what} took longer than {}s", after.as_secs()))
}

fn chat_prompt(messages: &[super::ChatMessage], tools: &str) -> pb::ChatPrompt {
    pb::ChatPrompt {
        messages: messages
            .iter()
            .map(|m| pb::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| pb::ToolCall { id: c.id.clone(), name: c.name.clone(), arguments: c.arguments.clone() })
                    .collect(),
                tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
            })
            .collect(),
        add_generation_prompt: true,
        tools: tools.to_string(),
    }
}

fn generate_request(c: GenerateCall) -> pb::GenerateRequest {
    let input = match c.prompt {
        Prompt::Text(text) => pb::generate_request::Input::Prompt(text),
        Prompt::Chat { messages, tools } => pb::generate_request::Input::Chat(chat_prompt(&messages, &tools)),
        Prompt::Tokens(ids) => pb::generate_request::Input::TokenIds(pb::TokenIds { ids }),
    };
    pb::GenerateRequest {
        request_id: c.request_id,
        adapter: c.adapter.unwrap_or_default(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: c.sampling.temperature,
            top_p: c.sampling.top_p,
            top_k: c.sampling.top_k,
            seed: c.sampling.seed,
            min_p: c.sampling.min_p,
            presence_penalty: c.sampling.presence_penalty,
            frequency_penalty: c.sampling.frequency_penalty,
            repetition_penalty: c.sampling.repetition_penalty,
            logit_bias: c.sampling.logit_bias.into_iter().collect(),
        }),
        max_tokens: c.max_tokens,
        stop: c.stop,
        ignore_eos: c.ignore_eos,
        tenant: c.tenant,
        priority: u32::from(c.priority),
        tenant_weight: c.tenant_weight,
        cache_salt: c.cache_salt,
        top_logprobs: c.top_logprobs,
        prompt_logprobs: c.prompt_logprobs,
        constraint: c.constraint.map(|c| pb::Constraint {
            kind: Some(match c.grammar {
                Grammar::JsonSchema(schema) => pb::constraint::Kind::JsonSchema(schema),
                Grammar::JsonObject => pb::constraint::Kind::JsonObject(true),
                Grammar::Regex(rx) => pb::constraint::Kind::Regex(rx),
                Grammar::Lark(lark) => pb::constraint::Kind::Lark(lark),
            }),
        }),
    }
}

fn piece(m: pb::GenerateResponse) -> Piece {
    let finish = match m.finish_reason() {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Eos => Some(Finish::Eos),
        pb::FinishReason::Length => Some(Finish::Length),
        pb::FinishReason::Stop => Some(Finish::Stop),
    };
    let usage = m.usage.map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_tokens: u.cached_tokens,
    });
    let entry = |t: pb::TokenLogprob| TokenLogprob { logprob: t.logprob, bytes: t.bytes };
    let read = |all: Vec<pb::TokenLogprobs>| -> Vec<TokenLogprobs> {
        all.into_iter()
            .map(|l| TokenLogprobs {
                token: l.token.map_or(TokenLogprob { logprob: f32::NAN, bytes: Vec::new() }, entry),
                top: l.top.into_iter().map(entry).collect(),
            })
            .collect()
    };
    let (logprobs, prompt_logprobs) = (read(m.logprobs), read(m.prompt_logprobs));
    Piece { text: m.text, logprobs, prompt_logprobs, finish, usage }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn adapter_status(a: pb::AdapterInfo) -> AdapterStatus {
    let state = match a.state() {
        pb::AdapterState::Resident => AdapterState::Resident,
        pb::AdapterState::Fetching => AdapterState::Fetching,
        pb::AdapterState::Validated => AdapterState::Validated,
        pb::AdapterState::Evicted => AdapterState::Evicted,
        pb::AdapterState::Failed => AdapterState::Failed,
        pb::AdapterState::Draining => AdapterState::Draining,
        pb::AdapterState::Unspecified => AdapterState::Unknown,
    };
    let weights_digest = switchyard_proto::prefix::parse_digest(&a.weights_digest);
    AdapterStatus {
        name: a.name,
        uri: a.uri,
        state,
        sha256: non_empty(a.sha256),
        error: non_empty(a.error),
        weights_digest,
    }
}

fn backend_info(i: pb::InfoResponse) -> BackendInfo {
    BackendInfo {
        model: i.model,
        max_loras: i.max_loras,
        loaded_loras: i.loaded_loras,
        queued_requests: i.queued_requests,
        running_requests: i.running_requests,
        not_serving_reason: i.not_serving_reason,
    }
}

fn load_request(c: LoadCall) -> pb::LoadAdapterRequest {
    pb::LoadAdapterRequest {
        name: c.name,
        source: Some(pb::AdapterSource { uri: c.uri, sha256: c.sha256.unwrap_or_default() }),
        scope: Some(pb::SourceScope { prefixes: c.allowed_prefixes }),
        fence: c.fence,
    }
}

fn loaded(r: pb::LoadAdapterResponse) -> Loaded {
    Loaded {
        adapter: r.adapter.map(adapter_status),
        already_loaded: r.already_loaded,
        hot_swap: r.hot_swap,
        fetched: r.fetched,
        warnings: r.warnings,
    }
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
                info: backend_info(info),
                adapters: adapters.into_inner().adapters.into_iter().map(adapter_status).collect(),
            })
        };
        tokio::time::timeout(self.timeouts.probe, calls)
            .await
            .map_err(|_| timed_out("health probe", self.timeouts.probe))?
    }

    async fn generate(&self, call: GenerateCall) -> Result<TokenStream, UpstreamError> {
        let mut backend = self.backend.clone();
        let stream = backend.generate(generate_request(call)).await.map_err(from_status)?.into_inner();
        Ok(stream.map(|m| m.map(piece).map_err(from_status)).boxed())
    }

    async fn load_adapter(&self, call: LoadCall) -> Result<Loaded, UpstreamError> {
        let mut backend = self.backend.clone();
        let mut request = tonic::Request::new(load_request(call));
        request.set_timeout(self.timeouts.admin);
        backend.load_adapter(request).await.map(|r| loaded(r.into_inner())).map_err(from_status)
    }

    async fn unload_adapter(&self, name: &str, fence: u64) -> Result<(), UpstreamError> {
        let mut backend = self.backend.clone();
        let mut request = tonic::Request::new(pb::UnloadAdapterRequest { name: name.to_string(), fence });
        request.set_timeout(self.timeouts.admin);
        backend.unload_adapter(request).await.map(|_| ()).map_err(from_status)
    }

    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, UpstreamError> {
        use pb::tokenize_request::Input;
        let input = match prompt {
            Prompt::Text(text) => Input::Prompt(text.clone()),
            Prompt::Chat { messages, tools } => Input::Chat(chat_prompt(messages, tools)),
            Prompt::Tokens(ids) => return Ok(ids.clone()),
        };
        let mut backend = self.backend.clone();
        let mut request = tonic::Request::new(pb::TokenizeRequest { input: Some(input) });
        request.set_timeout(self.timeouts.probe);
        backend.tokenize(request).await.map(|r| r.into_inner().token_ids).map_err(from_status)
    }

    async fn watch_prefix_cache(&self) -> Result<PrefixStream, UpstreamError> {
        let mut backend = self.backend.clone();
        let stream = backend.watch_prefix_cache(pb::WatchPrefixCacheRequest {}).await.map_err(from_status)?;
        let updates = stream.into_inner().map(|m| {
            m.map(|u| PrefixUpdate {
                snapshot: u.snapshot,
                block_size: u.block_size,
                removed: u.removed,
                stored: u.stored,
            })
            .map_err(from_status)
        });
        Ok(updates.boxed())
    }
}
