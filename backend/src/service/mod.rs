//! The `switchyard.backend.v1.Backend` gRPC service over an [`Engine`], and the server that
//! hosts it with the standard `grpc.health.v1` service.

mod error;
pub mod security;
mod server;

pub use error::ServiceError;
pub use security::{SecurityOptions, TlsFiles};
pub use server::{
    AdapterOptions, DeviceChoice, DtypeChoice, KV_BLOCK_SIZE, ServeError, ServeOptions, Served, build_executor,
    default_sources, dtype_for_weights, kv_value_bytes, open_store, prepare, prepare_with_sources, probe_cuda,
    resolve_device, resolve_dtype, serve,
};

use crate::adapters::{AdapterInfo, AdapterManager, AdapterState, Digest, LoadOutcome};
use crate::engine::grammar::GrammarSpec;
use crate::engine::sampling::{SamplingParams, TokenLogprobs};
use crate::engine::scheduler::{MAX_WEIGHT, MIN_WEIGHT};
use crate::engine::{Engine, Event, FinishReason, GenerateRequest, Health};
use crate::metrics;
use crate::model::{ChatMessage, ModelConfig, Module, Tokenizer, ToolCall};
use std::pin::Pin;
use std::sync::Arc;
use switchyard_proto::v1 as pb;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Static facts about what this backend serves.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub name: String,
    pub config: ModelConfig,
    pub device: String,
    pub dtype: String,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct BackendService {
    engine: Arc<Engine>,
    adapters: Arc<AdapterManager>,
    tokenizer: Arc<Tokenizer>,
    model: Arc<ServedModel>,
    fence: Arc<Fence>,
    metrics: Arc<metrics::Metrics>,
}

/// The highest fencing token seen on an adapter call: calls from gateways with a lower one are
/// refused, so a leader that was replaced (and does not know it yet) changes nothing.
#[derive(Debug, Default)]
pub struct Fence(std::sync::atomic::AtomicU64);

impl Fence {
    /// Admits a call with `token` (0: unfenced, always admitted) and raises the highest seen.
    pub fn admit(&self, token: u64) -> Result<(), ServiceError> {
        if token == 0 {
            return Ok(());
        }
        let highest = self.0.fetch_max(token, std::sync::atomic::Ordering::SeqCst);
        if token < highest {
            return Err(ServiceError::Fenced { got: token, highest });
        }
        Ok(())
    }
}

impl BackendService {
    pub fn new(
        engine: Arc<Engine>,
        adapters: Arc<AdapterManager>,
        tokenizer: Arc<Tokenizer>,
        model: ServedModel,
        metrics: Arc<metrics::Metrics>,
    ) -> BackendService {
        BackendService { engine, adapters, tokenizer, model: Arc::new(model), fence: Arc::default(), metrics }
    }

    /// The metrics exporter of this service's engine, adapters and requests.
    pub fn exporter(&self) -> metrics::Exporter {
        self.metrics.exporter(self.engine.clone(), self.adapters.clone())
    }

    /// The engine this service runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Turns the request's input (text, chat or ids) into prompt token ids.
    async fn prompt_ids(&self, input: Option<pb::generate_request::Input>) -> Result<Vec<u32>, ServiceError> {
        use pb::generate_request::Input;
        let tokenizer = self.tokenizer.clone();
        let input =
            input.ok_or_else(|| ServiceError::BadRequest("one of prompt, chat or token_ids is required".into()))?;
        let encode = move || -> Result<Vec<u32>, ServiceError> {
            let bad = |e: String| ServiceError::BadRequest(format!("cannot tokenize prompt: {e}"));
            match input {
                Input::TokenIds(ids) => Ok(ids.ids),
                Input::Prompt(text) => tokenizer.encode(&text).map_err(bad),
                Input::Chat(chat) => {
                    let messages: Vec<ChatMessage> = chat.messages.into_iter().map(chat_message).collect();
                    if messages.is_empty() {
                        return Err(ServiceError::BadRequest("chat has no messages".into()));
                    }
                    let tools = tool_definitions(&chat.tools)?;
                    // Everything in the conversation is data: special-token text in it never
                    // becomes a token.
                    tokenizer
                        .encode_chat_with_tools(&messages, &tools, chat.add_generation_prompt)
                        .map_err(ServiceError::BadRequest)
                }
            }
        };
        tokio::task::spawn_blocking(encode)
            .await
            .map_err(|e| ServiceError::BadRequest(format!("tokenizer task failed: {e}")))?
    }
}

fn chat_message(m: pb::ChatMessage) -> ChatMessage {
    ChatMessage {
        role: m.role,
        content: m.content,
        tool_calls: m
            .tool_calls
            .into_iter()
            .map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments })
            .collect(),
        tool_call_id: (!m.tool_call_id.is_empty()).then_some(m.tool_call_id),
    }
}

/// `ChatPrompt.tools`: empty, or a JSON array of objects.
fn tool_definitions(text: &str) -> Result<Vec<serde_json::Value>, ServiceError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let bad = |why: String| ServiceError::BadRequest(format!("chat.tools must be a JSON array of objects: {why}"));
    let tools: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    match tools.iter().position(|t| !t.is_object()) {
        Some(i) => Err(bad(format!("item {i} is not an object"))),
        None => Ok(tools),
    }
}

fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}

/// An adapter as the gRPC API reports it.
fn adapter_info(a: AdapterInfo) -> pb::AdapterInfo {
    let state = match a.state {
        AdapterState::Fetching => pb::AdapterState::Fetching,
        AdapterState::Validated => pb::AdapterState::Validated,
        AdapterState::Resident => pb::AdapterState::Resident,
        AdapterState::Draining => pb::AdapterState::Draining,
        AdapterState::Evicted => pb::AdapterState::Evicted,
        AdapterState::Failed => pb::AdapterState::Failed,
    };
    pb::AdapterInfo {
        name: a.name,
        uri: a.uri,
        state: state as i32,
        rank: a.rank as u32,
        target_modules: a.targets,
        active_requests: a.active_requests,
        slot: a.slot.unwrap_or(0),
        size_bytes: a.size_bytes,
        error: a.error.unwrap_or_default(),
        sha256: a.sha256.unwrap_or_default(),
        revision: a.revision.unwrap_or_default(),
        weights_digest: a.weights_digest.unwrap_or_default(),
    }
}

/// Longest `cache_salt` a generation request may carry.
pub const MAX_CACHE_SALT_BYTES: usize = 256;

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl BackendService {
    /// Checks and tokenizes a generation request and hands it to the engine: its events, or
    /// why it was refused.
    async fn start_generation(
        &self,
        req: pb::GenerateRequest,
        queue_wait: prometheus_client::metrics::histogram::Histogram,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ServiceError> {
        let priority = u8::try_from(req.priority)
            .map_err(|_| ServiceError::BadRequest(format!("priority {} is past the most, 255", req.priority)))?;
        let tenant_weight = match req.tenant_weight {
            0.0 => 1.0,
            w if (MIN_WEIGHT..=MAX_WEIGHT).contains(&w) => w,
            w => {
                return Err(ServiceError::BadRequest(format!(
                    "tenant_weight {w} is out of range: 0 (for 1) or {MIN_WEIGHT} to {MAX_WEIGHT}"
                )));
            }
        };
        if req.cache_salt.len() > MAX_CACHE_SALT_BYTES {
            return Err(ServiceError::BadRequest(format!(
                "cache_salt is {} bytes; the most is {MAX_CACHE_SALT_BYTES}",
                req.cache_salt.len()
            )));
        }
        let prompt = self.prompt_ids(req.input).await?;
        let s = req.sampling.unwrap_or_default();
        let mut logit_bias: Vec<(u32, f32)> = s.logit_bias.into_iter().collect();
        logit_bias.sort_unstable_by_key(|&(id, _)| id);
        let sampling = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            min_p: s.min_p,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: if s.repetition_penalty == 0.0 { 1.0 } else { s.repetition_penalty },
            logit_bias,
            seed: s.seed,
        };
        tracing::debug!(request_id = %req.request_id, adapter = %req.adapter, prompt_tokens = prompt.len(), "generate");
        if !req.adapter.is_empty() {
            self.adapters.ensure_resident(&req.adapter).await?;
        }
        let adapter = (!req.adapter.is_empty()).then_some(req.adapter);
        let engine_req = GenerateRequest {
            prompt,
            adapter,
            sampling,
            max_tokens: req.max_tokens as usize,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
            tenant: req.tenant,
            tenant_weight,
            priority,
            cache_salt: req.cache_salt,
            logprobs: req.top_logprobs.map(|n| n as usize),
            prompt_logprobs: req.prompt_logprobs.map(|n| n as usize),
            grammar: req.constraint.and_then(|c| c.kind).map(|kind| match kind {
                pb::constraint::Kind::JsonSchema(schema) => GrammarSpec::JsonSchema(schema),
                pb::constraint::Kind::JsonObject(_) => GrammarSpec::JsonObject,
                pb::constraint::Kind::Regex(rx) => GrammarSpec::Regex(rx),
                pb::constraint::Kind::Lark(lark) => GrammarSpec::Lark(lark),
            }),
            queue_wait: Some(queue_wait),
        };
        Ok(self.engine.generate(engine_req).await?)
    }
}

type PrefixStream = Pin<Box<dyn Stream<Item = Result<pb::PrefixCacheUpdate, Status>> + Send>>;

/// Where a prefix-cache watch stands.
enum Watch {
    /// About to send a snapshot (first, or after falling behind).
    Snapshot,
    Following {
        seq: u64,
        updates: tokio::sync::broadcast::Receiver<Arc<crate::engine::PrefixUpdate>>,
    },
}

/// The next message of a prefix-cache watch, or `None` when the engine has stopped.
async fn next_prefix_update(
    engine: &Engine,
    block_size: u32,
    watch: &mut Watch,
) -> Option<Result<pb::PrefixCacheUpdate, Status>> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match watch {
            Watch::Snapshot => {
                let (snapshot, updates) = match engine.watch_prefixes().await {
                    Ok(started) => started,
                    Err(e) => return Some(Err(ServiceError::from(e).into())),
                };
                *watch = Watch::Following { seq: snapshot.seq, updates };
                let stored = snapshot.blocks;
                return Some(Ok(pb::PrefixCacheUpdate { snapshot: true, block_size, removed: Vec::new(), stored }));
            }
            Watch::Following { seq, updates } => match updates.recv().await {
                Ok(update) if update.seq <= *seq => continue,
                Ok(update) => {
                    *seq = update.seq;
                    let (removed, stored) = (update.removed.clone(), update.stored.clone());
                    return Some(Ok(pb::PrefixCacheUpdate { snapshot: false, block_size, removed, stored }));
                }
                // Fell behind: updates were lost, so start again from what the cache holds now.
                Err(RecvError::Lagged(_)) => *watch = Watch::Snapshot,
                Err(RecvError::Closed) => return None,
            },
        }
    }
}

#[tonic::async_trait]
impl pb::backend_server::Backend for BackendService {
    type GenerateStream = GenerateStream;
    type WatchPrefixCacheStream = PrefixStream;

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        use pb::generate_request::Input;
        let input = request.into_inner().input.map(|input| match input {
            pb::tokenize_request::Input::Prompt(text) => Input::Prompt(text),
            pb::tokenize_request::Input::Chat(chat) => Input::Chat(chat),
        });
        let token_ids = self.prompt_ids(input).await?;
        Ok(Response::new(pb::TokenizeResponse { token_ids }))
    }

    async fn watch_prefix_cache(
        &self,
        _: Request<pb::WatchPrefixCacheRequest>,
    ) -> Result<Response<PrefixStream>, Status> {
        let engine = self.engine.clone();
        let block_size = engine.config().scheduler.block_size as u32;
        let stream = futures::stream::unfold((engine, Watch::Snapshot), move |(engine, mut watch)| async move {
            let next = next_prefix_update(&engine, block_size, &mut watch).await?;
            Some((next, (engine, watch)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        let weight = match req.tenant_weight {
            w if w > 0.0 && w.is_finite() => w,
            _ => 1.0,
        };
        let mut tally = self.metrics.request(&req.tenant, weight);
        let adapter = req.adapter.clone();
        let started = self.start_generation(req, tally.queue_wait()).await;
        let events = match started {
            Ok(events) => events,
            Err(e) => {
                tally.refused(e.reason());
                return Err(e.into());
            }
        };
        // Dropping the response stream (the client went away) drops the receiver, which the
        // engine notices at its next step and cancels the request; and the tally, which counts
        // it cancelled unless it ended otherwise.
        let tokenizer = self.tokenizer.clone();
        let logprobs = move |id: Option<u32>, l: Option<TokenLogprobs>| -> Vec<pb::TokenLogprobs> {
            let entry = |token_id: u32, logprob: f32| pb::TokenLogprob {
                token_id,
                logprob,
                bytes: tokenizer.token_bytes(token_id).to_vec(),
            };
            match (id, l) {
                (Some(id), Some(l)) => vec![pb::TokenLogprobs {
                    token: Some(entry(id, l.logprob)),
                    top: l.top.into_iter().map(|(t, lp)| entry(t, lp)).collect(),
                }],
                _ => Vec::new(),
            }
        };
        let stream = UnboundedReceiverStream::new(events).map(move |event| match event {
            Event::Prompt { tokens } => Ok(pb::GenerateResponse {
                prompt_logprobs: tokens
                    .into_iter()
                    .flat_map(|(id, l)| match l {
                        Some(l) => logprobs(Some(id), Some(l)),
                        None => logprobs(Some(id), Some(TokenLogprobs { logprob: f32::NAN, top: Vec::new() })),
                    })
                    .collect(),
                ..Default::default()
            }),
            Event::Token { id, text, logprobs: l } => {
                tally.token();
                Ok(pb::GenerateResponse {
                    text,
                    token_ids: vec![id],
                    logprobs: logprobs(Some(id), l),
                    ..Default::default()
                })
            }
            Event::Finished { id, text, logprobs: l, reason, prompt_tokens, completion_tokens, cached_tokens } => {
                tally.finished(prompt_tokens, cached_tokens, &adapter);
                Ok(pb::GenerateResponse {
                    text,
                    token_ids: id.into_iter().collect(),
                    logprobs: logprobs(id, l),
                    finish_reason: finish_reason(reason) as i32,
                    usage: Some(pb::Usage {
                        prompt_tokens: prompt_tokens as u32,
                        completion_tokens: completion_tokens as u32,
                        cached_tokens: cached_tokens as u32,
                    }),
                    ..Default::default()
                })
            }
            Event::Failed { reason, engine_stopped } => {
                tally.failed();
                Err(match engine_stopped {
                    true => ServiceError::from(crate::engine::EngineError::Failed(reason)).into(),
                    false => Status::internal(reason),
                })
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let req = request.into_inner();
        self.fence.admit(req.fence)?;
        let source = req.source.unwrap_or_default();
        if source.uri.is_empty() {
            return Err(ServiceError::BadRequest("source.uri is required".into()).into());
        }
        let digest = match source.sha256.as_str() {
            "" => None,
            text => Some(Digest::parse(text).map_err(ServiceError::BadRequest)?),
        };
        let scope = req.scope.map(|s| crate::adapters::SourceScope::new(s.prefixes));
        let outcome = self.adapters.load(&req.name, &source.uri, digest, scope).await.map_err(ServiceError::from)?;
        let LoadOutcome { installed, warnings, fetched, adapter } = outcome;
        Ok(Response::new(pb::LoadAdapterResponse {
            adapter: Some(adapter_info(adapter)),
            already_loaded: installed.already_loaded,
            hot_swap: installed.replaced.is_some(),
            warnings,
            fetched,
        }))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let req = request.into_inner();
        self.fence.admit(req.fence)?;
        self.adapters.unload(&req.name).await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::UnloadAdapterResponse {}))
    }

    async fn list_adapters(
        &self,
        _: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        Ok(Response::new(pb::ListAdaptersResponse {
            adapters: self.adapters.list().into_iter().map(adapter_info).collect(),
        }))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let snap = self.engine.snapshot();
        let cfg = self.engine.config();
        let m = &self.model;
        Ok(Response::new(pb::InfoResponse {
            model: m.name.clone(),
            architecture: m.config.architecture.clone(),
            dtype: m.dtype.clone(),
            device: m.device.clone(),
            max_lora_rank: cfg.max_lora_rank as u32,
            max_loras: cfg.max_loras as u32,
            loaded_loras: snap.adapters.len() as u32,
            max_model_len: cfg.max_model_len as u32,
            queued_requests: self.engine.requests_waiting() as u32,
            running_requests: snap.running as u32,
            kv_cache_tokens: snap.kv_tokens_total as u64,
            kv_cache_free_tokens: snap.kv_tokens_free as u64,
            lora_target_modules: Module::ALL.iter().map(|m| m.name().to_string()).collect(),
            vocab_size: m.config.vocab_size as u32,
            not_serving_reason: match self.engine.health() {
                Health::Serving => String::new(),
                Health::Failed(reason) => reason,
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_leaders_token_is_refused_and_unfenced_calls_pass() {
        let fence = Fence::default();
        assert!(fence.admit(5).is_ok());
        assert!(fence.admit(5).is_ok(), "the leader's own token stays good");
        assert!(fence.admit(0).is_ok(), "an operator's unfenced call");
        assert!(fence.admit(9).is_ok(), "a new leader");
        assert!(matches!(fence.admit(5), Err(ServiceError::Fenced { got: 5, highest: 9 })));
        assert!(fence.admit(9).is_ok());
    }
}
