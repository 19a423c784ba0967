//! The gateway's seam to one backend. The router and the HTTP layer talk to [`Upstream`] in the
//! gateway's own types (below); the gRPC client behind it ([`GrpcUpstream`]) is the real
//! implementation and the only code that sees the backend contract's protobuf types.

mod grpc;

pub use grpc::{GrpcUpstream, UpstreamSecurity, UpstreamTimeouts};

use async_trait::async_trait;
use futures::stream::BoxStream;

/// The pieces of one generation, as the backend streams them.
pub type TokenStream = BoxStream<'static, Result<Piece, UpstreamError>>;

/// One generation to run on a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateCall {
    /// Names the request in the backend's logs.
    pub request_id: String,
    /// The adapter to apply (`None`: the base model).
    pub adapter: Option<String>,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// `Some(n)`: each token's log-probability, with the `n` most likely alternatives.
    pub top_logprobs: Option<u32>,
    /// `Some(n)`: every prompt token's log-probability, with `n` alternatives, first.
    pub prompt_logprobs: Option<u32>,
    /// What the generated text must match, if anything.
    pub constraint: Option<Constraint>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// The verified tenant the request is for (the backend shares itself fairly between
    /// tenants and accounts per tenant), its weight, and the request's priority.
    pub tenant: String,
    pub tenant_weight: f64,
    pub priority: u8,
    /// Requests reuse each other's cached prompt blocks only under the same salt.
    pub cache_salt: String,
}

/// A grammar the generated text must match (the backend contract's `Constraint`), and the
/// client's field it came from, which a refusal of it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    pub grammar: Grammar,
    pub from: &'static str,
}

/// What the generated text must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grammar {
    /// A JSON schema, as JSON text.
    JsonSchema(String),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole text matches.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// How each next token is chosen, validated (the backend contract's `SamplingParams`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1].
    pub top_p: f32,
    /// 0 disables.
    pub top_k: u32,
    /// In [0, 1]; 0 disables.
    pub min_p: f32,
    /// Each in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Above 0; 1 disables.
    pub repetition_penalty: f32,
    /// Token id and bias in [-100, 100], ids unique.
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Sampling {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// What the model continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Raw text, tokenized as it is.
    Text(String),
    /// Messages, rendered by the model's chat template with the assistant's turn opened, and
    /// the tools the conversation offers (OpenAI tool definitions as a JSON array; empty for
    /// none).
    Chat { messages: Vec<ChatMessage>, tools: String },
    /// Token ids, as a backend's `tokenize` gave them.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// A function call an assistant made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// One streamed piece of a generation: new text, the log-probabilities of its tokens (when
/// asked for), and on the last piece why it ended and what it used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Piece {
    pub text: String,
    pub logprobs: Vec<TokenLogprobs>,
    /// On the first piece, when asked for: every prompt token's log-probability (the first
    /// token's is NaN: it follows nothing).
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub finish: Option<Finish>,
    pub usage: Option<Usage>,
}

/// A generated token's log-probability, and the most likely tokens' at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenLogprob,
    /// Most likely first.
    pub top: Vec<TokenLogprob>,
}

/// One token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// What the token decodes to on its own (part of a UTF-8 character, possibly).
    pub bytes: Vec<u8>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model's end-of-sequence token.
    Eos,
    /// `max_tokens` or the context length.
    Length,
    /// A stop string.
    Stop,
}

/// Tokens a generation used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the backend found in its prefix cache.
    pub cached_tokens: u32,
}

/// An adapter load to run on a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadCall {
    pub name: String,
    pub uri: String,
    /// The content pin, when the adapter has one.
    pub sha256: Option<String>,
    /// The URI prefixes the source must resolve under (the loading tenant's `load_prefixes`);
    /// empty allows nothing.
    pub allowed_prefixes: Vec<String>,
    /// The caller's fencing token (0: unfenced).
    pub fence: u64,
}

/// A backend's answer to a load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The adapter as the backend now lists it.
    pub adapter: Option<AdapterStatus>,
    /// The same source was already loaded there; nothing changed.
    pub already_loaded: bool,
    /// It replaced another source under the same name.
    pub hot_swap: bool,
    /// It was downloaded (not found in the backend's cache).
    pub fetched: bool,
    pub warnings: Vec<String>,
}

/// Where an adapter stands on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterState {
    Resident,
    Fetching,
    Validated,
    Evicted,
    Failed,
    Draining,
    /// A state this gateway does not know (a newer backend).
    Unknown,
}

impl AdapterState {
    /// The name answers and policies use.
    pub fn as_str(self) -> &'static str {
        match self {
            AdapterState::Resident => "resident",
            AdapterState::Fetching => "fetching",
            AdapterState::Validated => "validated",
            AdapterState::Evicted => "evicted",
            AdapterState::Failed => "failed",
            AdapterState::Draining => "draining",
            AdapterState::Unknown => "unknown",
        }
    }
}

/// One adapter a backend lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterStatus {
    pub name: String,
    /// The source it was loaded from, as the backend normalized it.
    pub uri: String,
    pub state: AdapterState,
    /// The digest of its files, when the backend computed one.
    pub sha256: Option<String>,
    /// Why it failed, for [`AdapterState::Failed`].
    pub error: Option<String>,
    /// While in a slot: the digest of its weights, the root of its cached blocks' names.
    pub weights_digest: Option<[u8; 32]>,
}

impl AdapterStatus {
    /// An adapter in `state`, loaded from `uri`, with no digest or error.
    pub fn new(name: &str, uri: &str, state: AdapterState) -> AdapterStatus {
        AdapterStatus { name: name.into(), uri: uri.into(), state, sha256: None, error: None, weights_digest: None }
    }
}

/// A change to what a backend holds in its prefix cache (block ids, see
/// [`switchyard_proto::prefix::BlockHash::id`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixUpdate {
    /// It lists every cached block: forget what came before.
    pub snapshot: bool,
    pub block_size: u32,
    /// Apply `removed`, then `stored`.
    pub removed: Vec<u64>,
    pub stored: Vec<u64>,
}

/// A backend's prefix cache updates, as it sends them.
pub type PrefixStream = BoxStream<'static, Result<PrefixUpdate, UpstreamError>>;

/// What a backend says about itself: its model, its adapter slots and its load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// The base model's name.
    pub model: String,
    pub max_loras: u32,
    pub loaded_loras: u32,
    pub queued_requests: u32,
    pub running_requests: u32,
    /// Why the backend cannot serve (its engine died, its device faulted); empty while it can.
    pub not_serving_reason: String,
}

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
    /// The request field an invalid argument concerns, where the backend names one (the
    /// contract's `switchyard-field` metadata).
    pub field: Option<String>,
}

impl UpstreamError {
    pub fn new(code: UpstreamCode, message: impl Into<String>) -> UpstreamError {
        UpstreamError { code, message: message.into(), field: None }
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
    pub info: BackendInfo,
    pub adapters: Vec<AdapterStatus>,
}

/// One backend, as the gateway uses it.
#[async_trait]
pub trait Upstream: Send + Sync + std::fmt::Debug {
    /// The address it was configured with; names the backend in answers, logs and metrics.
    fn address(&self) -> &str;
    /// Health, model facts and load, and the adapters it knows, in one round of calls.
    async fn probe(&self) -> Result<Probe, UpstreamError>;
    /// Starts a generation. Dropping the stream cancels it on the backend.
    async fn generate(&self, call: GenerateCall) -> Result<TokenStream, UpstreamError>;
    async fn load_adapter(&self, call: LoadCall) -> Result<Loaded, UpstreamError>;
    /// Unloads `name`, with the caller's fencing token (0: unfenced).
    async fn unload_adapter(&self, name: &str, fence: u64) -> Result<(), UpstreamError>;
    /// The token ids the backend would compute `prompt` as.
    async fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, UpstreamError>;
    /// Follows the backend's prefix cache: a snapshot, then changes.
    async fn watch_prefix_cache(&self) -> Result<PrefixStream, UpstreamError>;
}
