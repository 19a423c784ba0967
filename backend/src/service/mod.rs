//! The `switchyard.backend.v1.Backend` gRPC service over an [`Engine`], and the server that
//! hosts it with the standard `grpc.health.v1` service.

mod error;
mod server;

pub use error::ServiceError;
pub use server::{
    DeviceChoice, KV_BLOCK_SIZE, ServeError, ServeOptions, Served, build_executor, kv_value_bytes, prepare, probe_cuda,
    resolve_device, serve,
};

use crate::adapters::{self, AdapterWeights};
use crate::engine::sampling::SamplingParams;
use crate::engine::{AdapterStatus, Engine, Event, FinishReason, GenerateRequest};
use crate::model::{ChatMessage, ModelConfig, Module, Tokenizer};
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
    tokenizer: Arc<Tokenizer>,
    model: Arc<ServedModel>,
}

impl BackendService {
    pub fn new(engine: Arc<Engine>, tokenizer: Arc<Tokenizer>, model: ServedModel) -> BackendService {
        BackendService { engine, tokenizer, model: Arc::new(model) }
    }

    /// Turns the request's input (text, chat or ids) into prompt token ids.
    async fn prompt_ids(&self, input: Option<pb::generate_request::Input>) -> Result<Vec<u32>, ServiceError> {
        use pb::generate_request::Input;
        let tokenizer = self.tokenizer.clone();
        let input =
            input.ok_or_else(|| ServiceError::BadRequest("one of prompt, chat or token_ids is required".into()))?;
        let encode = move || -> Result<Vec<u32>, ServiceError> {
            let text = match input {
                Input::TokenIds(ids) => return Ok(ids.ids),
                Input::Prompt(text) => text,
                Input::Chat(chat) => {
                    let messages: Vec<ChatMessage> =
                        chat.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
                    if messages.is_empty() {
                        return Err(ServiceError::BadRequest("chat has no messages".into()));
                    }
                    tokenizer
                        .apply_chat_template(&messages, chat.add_generation_prompt)
                        .map_err(ServiceError::BadRequest)?
                }
            };
            tokenizer.encode(&text).map_err(|e| ServiceError::BadRequest(format!("cannot tokenize prompt: {e}")))
        };
        tokio::task::spawn_blocking(encode)
            .await
            .map_err(|e| ServiceError::BadRequest(format!("tokenizer task failed: {e}")))?
    }
}

/// Whether an adapter's `base_model_name_or_path` names the served model. Names are compared
/// loosely: the last path segment, case-insensitively, either one a prefix of the other (so
/// `org/SmolLM2-135M-Instruct` matches a served `SmolLM2-135M-Instruct.Q4_1`). A mismatch is
/// reported, not refused: the tensors' shapes are what decide whether an adapter fits.
fn same_base_model(base: &str, served: &str) -> bool {
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_lowercase();
    let (base, served) = (last(base), last(served));
    !base.is_empty() && (served.starts_with(&base) || base.starts_with(&served))
}

fn adapter_info(a: &AdapterStatus) -> pb::AdapterInfo {
    let r = &a.resident;
    pb::AdapterInfo {
        name: r.name.clone(),
        uri: r.uri.clone(),
        state: pb::AdapterState::Resident as i32,
        rank: r.max_rank as u32,
        target_modules: r.targets.clone(),
        active_requests: r.active,
        slot: a.slot,
        size_bytes: r.size_bytes,
    }
}

fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Stop => pb::FinishReason::Stop,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::backend_server::Backend for BackendService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        let prompt = self.prompt_ids(req.input).await?;
        let s = req.sampling.unwrap_or_default();
        let sampling = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            seed: s.seed,
        };
        tracing::debug!(request_id = %req.request_id, adapter = %req.adapter, prompt_tokens = prompt.len(), "generate");
        let adapter = (!req.adapter.is_empty()).then_some(req.adapter);
        let engine_req = GenerateRequest {
            prompt,
            adapter,
            sampling,
            max_tokens: req.max_tokens as usize,
            stop: req.stop,
            ignore_eos: req.ignore_eos,
        };
        let events = self.engine.generate(engine_req).await.map_err(ServiceError::from)?;
        // Dropping the response stream (the client went away) drops the receiver, which the
        // engine notices at its next step and cancels the request.
        let stream = UnboundedReceiverStream::new(events).map(|event| match event {
            Event::Token { id, text } => Ok(pb::GenerateResponse { text, token_ids: vec![id], ..Default::default() }),
            Event::Finished { id, text, reason, prompt_tokens, completion_tokens } => Ok(pb::GenerateResponse {
                text,
                token_ids: id.into_iter().collect(),
                finish_reason: finish_reason(reason) as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: prompt_tokens as u32,
                    completion_tokens: completion_tokens as u32,
                }),
            }),
            Event::Failed(e) => Err(Status::internal(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let req = request.into_inner();
        adapters::validate_name(&req.name).map_err(ServiceError::from)?;
        let uri = req.source.map(|s| s.uri).unwrap_or_default();
        if uri.is_empty() {
            return Err(ServiceError::BadRequest("source.uri is required".into()).into());
        }
        // Already resident from the same source: nothing to read.
        if let Some(a) =
            self.engine.snapshot().adapters.iter().find(|a| a.resident.name == req.name && a.resident.uri == uri)
        {
            return Ok(Response::new(pb::LoadAdapterResponse { adapter: Some(adapter_info(a)), already_loaded: true }));
        }
        let dir = adapters::resolve_uri(&uri).map_err(ServiceError::from)?;
        let config = self.model.config.clone();
        let max_rank = self.engine.config().max_lora_rank;
        // Reading and validating happen off the engine thread; the engine only places the
        // validated weights in a slot.
        let weights: AdapterWeights =
            tokio::task::spawn_blocking(move || adapters::load_peft_dir(&dir, &config, max_rank))
                .await
                .map_err(|e| ServiceError::BadRequest(format!("adapter reader failed: {e}")))?
                .map_err(ServiceError::from)?;
        if let Some(base) = &weights.base_model
            && !same_base_model(base, &self.model.name)
        {
            tracing::warn!(adapter = %req.name, adapter_base = %base, served = %self.model.name, "adapter was trained on a differently named base model");
        }
        let (status, already_loaded) =
            self.engine.install_adapter(req.name, uri, weights).await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::LoadAdapterResponse { adapter: Some(adapter_info(&status)), already_loaded }))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let name = request.into_inner().name;
        self.engine.unload_adapter(name).await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::UnloadAdapterResponse {}))
    }

    async fn list_adapters(
        &self,
        _: Request<pb::ListAdaptersRequest>,
    ) -> Result<Response<pb::ListAdaptersResponse>, Status> {
        let adapters = self.engine.snapshot().adapters.iter().map(adapter_info).collect();
        Ok(Response::new(pb::ListAdaptersResponse { adapters }))
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
            queued_requests: snap.waiting as u32,
            running_requests: snap.running as u32,
            kv_cache_tokens: snap.kv_tokens_total as u64,
            kv_cache_free_tokens: snap.kv_tokens_free as u64,
            lora_target_modules: Module::ALL.iter().map(|m| m.name().to_string()).collect(),
            vocab_size: m.config.vocab_size as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::same_base_model;

    #[test]
    fn base_model_names_match_across_paths_cases_and_quantization_suffixes() {
        assert!(same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1"));
        assert!(same_base_model("/models/tiny-llama/", "tiny-llama"));
        assert!(same_base_model("Tiny-Llama", "tiny-llama"));
        assert!(!same_base_model("meta-llama/Llama-2-7b-hf", "SmolLM2-135M-Instruct"));
        assert!(!same_base_model("", "tiny-llama"));
    }
}
