//! `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

use super::{RequestId, principal, read_body};
use crate::Gateway;
use crate::dispatch::{self, Started};
use crate::metrics::OTHER;
use crate::openai::{self, ApiError, Generation};
use crate::policy::{Decision, Endpoint, PolicyInput};
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use switchyard_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

impl Api {
    fn endpoint(self) -> &'static str {
        match self {
            Api::Chat => "chat_completions",
            Api::Completion => "completions",
        }
    }
}

pub(super) async fn chat(
    State(gw): State<Arc<Gateway>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(gw, id, headers, body, Api::Chat).await
}

pub(super) async fn completions(
    State(gw): State<Arc<Gateway>>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve(gw, id, headers, body, Api::Completion).await
}

/// Records one request's metrics exactly once: when it is answered, or (for a stream the client
/// abandoned) when it is dropped, as status 499.
#[derive(Debug)]
struct Record {
    gw: Arc<Gateway>,
    api: Api,
    tenant: String,
    model: String,
    started: Instant,
    first_token: bool,
    done: bool,
}

impl Record {
    fn finish(&mut self, status: u16, usage: Option<&pb::Usage>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.gw.metrics.request(self.api.endpoint(), status, &self.tenant, &self.model, self.started.elapsed());
        if let Some(u) = usage {
            self.gw.metrics.tokens(&self.tenant, &self.model, u.prompt_tokens, u.completion_tokens);
        }
    }

    fn saw_text(&mut self) {
        if !std::mem::replace(&mut self.first_token, true) {
            self.gw.metrics.first_token(self.api.endpoint(), &self.model, self.started.elapsed());
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.finish(499, None);
    }
}

/// What the answer needs to know about the request.
#[derive(Debug)]
struct Job {
    api: Api,
    id: String,
    /// `model` as the client sent it; echoed back.
    model: String,
    created: u64,
    stream: bool,
    include_usage: bool,
}

async fn serve(gw: Arc<Gateway>, id: RequestId, headers: HeaderMap, body: Body, api: Api) -> Response {
    let mut record = Record {
        gw: gw.clone(),
        api,
        tenant: OTHER.into(),
        model: OTHER.into(),
        started: Instant::now(),
        first_token: false,
        done: false,
    };
    match begin(&gw, &id, &headers, body, api, &mut record).await {
        Err(e) => {
            record.finish(e.status, None);
            e.into_response()
        }
        Ok((job, started)) => {
            // What actually serves the request: the adapter the policy chose, or the base model.
            let served = HeaderValue::from_str(&record.model).ok();
            let mut response = if job.stream {
                stream(job, started, record)
            } else {
                match collect(&job, started, &mut record).await {
                    Ok(body) => {
                        record.finish(200, None);
                        Json(body).into_response()
                    }
                    Err(e) => {
                        record.finish(e.status, None);
                        return e.into_response();
                    }
                }
            };
            if let Some(v) = served {
                response.headers_mut().insert(SERVED_MODEL, v);
            }
            response
        }
    }
}

/// The response header naming the adapter (or base model) that served the request.
pub const SERVED_MODEL: &str = "x-switchyard-model";

/// Authenticates, parses, routes and starts the generation.
async fn begin(
    gw: &Arc<Gateway>,
    id: &RequestId,
    headers: &HeaderMap,
    body: Body,
    api: Api,
    record: &mut Record,
) -> Result<(Job, Started), ApiError> {
    let who = principal(gw, headers)?;
    let caller = gw.caller(&who)?;
    record.tenant = caller.name.to_string();
    let bytes = read_body(gw, headers, body).await?;
    let (input, generation, prompt_chars) = match api {
        Api::Chat => {
            let chat = openai::parse_chat(&bytes)?;
            let chars = chat.messages.iter().map(|m| m.content.len()).sum();
            let messages =
                chat.messages.into_iter().map(|m| pb::ChatMessage { role: m.role, content: m.content }).collect();
            (
                pb::generate_request::Input::Chat(pb::ChatPrompt { messages, add_generation_prompt: true }),
                chat.generation,
                chars,
            )
        }
        Api::Completion => {
            let c = openai::parse_completion(&bytes)?;
            let chars = c.prompt.len();
            (pb::generate_request::Input::Prompt(c.prompt), c.generation, chars)
        }
    };
    let Some(base) = gw.base_model() else {
        return Err(ApiError::unavailable("no backend has answered yet", crate::RETRY_AFTER_S).with_code("no_backend"));
    };
    // The policy sees only the adapters this tenant may use, in the known set and on every backend.
    let loras = gw.loras.snapshot();
    let usable: Vec<(String, String)> =
        loras.values().filter(|l| caller.may_use(l)).map(|l| (l.name.clone(), l.owner.clone())).collect();
    let mut backends = gw.views();
    for b in &mut backends {
        b.adapters.retain(|name, _| loras.get(name).is_some_and(|l| caller.may_use(l)));
    }
    let decision = gw
        .policy
        .decide(&PolicyInput {
            tenant: &who.tenant,
            subject: who.subject.as_deref(),
            scopes: &who.scopes,
            claims: &who.claims,
            endpoint: match api {
                Api::Chat => Endpoint::ChatCompletions,
                Api::Completion => Endpoint::Completions,
            },
            model: &generation.model,
            base_model: &base,
            stream: generation.stream,
            max_tokens: generation.max_tokens,
            prompt_chars,
            headers: policy_headers(gw, headers),
            backends,
            adapters: usable,
        })
        .await
        .map_err(|e| {
            if e.busy {
                ApiError::unavailable(e.to_string(), crate::RETRY_AFTER_S).with_code("policy_busy")
            } else {
                ApiError::server(500, e.to_string(), "policy_failed")
            }
        })?;
    let route = match decision {
        Decision::Route(route) => route,
        Decision::Reject { status, code, message } => return Err(ApiError::client(status, message, &code)),
    };
    let route = caller.route(&generation.model, route, &loras)?;
    record.model = route.adapter.clone().unwrap_or(base);
    let request = generate_request(&id.0, input, &generation);
    let started = dispatch::start(gw, &route, request).await?;
    tracing::debug!(backend = %started.backend, adapter = ?route.adapter, "generation started");
    let job = Job {
        api,
        id: id.0.clone(),
        model: generation.model,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        stream: generation.stream,
        include_usage: generation.include_usage,
    };
    Ok((job, started))
}

/// The request headers the gateway is configured to show policies.
fn policy_headers(gw: &Gateway, headers: &HeaderMap) -> Vec<(String, String)> {
    gw.options
        .policy_headers
        .iter()
        .filter_map(|name| {
            let value = headers.get(name.as_str())?.to_str().ok()?;
            Some((name.clone(), value.to_string()))
        })
        .collect()
}

fn generate_request(id: &str, input: pb::generate_request::Input, g: &Generation) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.to_string(),
        adapter: String::new(),
        input: Some(input),
        sampling: Some(pb::SamplingParams { temperature: g.temperature, top_p: g.top_p, top_k: 0, seed: g.seed }),
        max_tokens: g.max_tokens.unwrap_or(0),
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    }
}

fn finish_reason(m: &pb::GenerateResponse) -> Option<&'static str> {
    match m.finish_reason() {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Length => Some("length"),
        pb::FinishReason::Eos | pb::FinishReason::Stop => Some("stop"),
    }
}

fn usage_json(u: Option<&pb::Usage>) -> Value {
    let u = u.copied().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn ended_early(backend: &str) -> ApiError {
    ApiError::server(502, format!("backend {backend} ended the generation without finishing it"), "backend_error")
        .with_code("incomplete_generation")
}

/// Non-streaming: the whole generation in one body.
async fn collect(job: &Job, started: Started, record: &mut Record) -> Result<Value, ApiError> {
    let Started { backend, first, rest, in_flight } = started;
    let mut rest = rest.0;
    let mut pending = first;
    let mut text = String::new();
    let last = loop {
        let message = match pending.take() {
            Some(m) => m,
            None => match rest.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(dispatch::generation_error(&backend, &e)),
                None => return Err(ended_early(&backend)),
            },
        };
        if !message.text.is_empty() {
            record.saw_text();
        }
        text.push_str(&message.text);
        if finish_reason(&message).is_some() {
            break message;
        }
    };
    drop(in_flight);
    let usage = last.usage.as_ref();
    if let Some(u) = usage {
        record.gw.metrics.tokens(&record.tenant, &record.model, u.prompt_tokens, u.completion_tokens);
    }
    let reason = finish_reason(&last);
    Ok(match job.api {
        Api::Chat => json!({
            "id": format!("chatcmpl-{}", job.id),
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": reason,
            }],
            "usage": usage_json(usage),
        }),
        Api::Completion => json!({
            "id": format!("cmpl-{}", job.id),
            "object": "text_completion",
            "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason}],
            "usage": usage_json(usage),
        }),
    })
}

/// Where a stream is.
enum Phase {
    /// Chat streams open with the assistant role.
    Role,
    Body,
    /// The final text was sent; the finish reason goes next.
    Finish(&'static str),
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    Usage,
    Done,
    End,
}

struct StreamState {
    job: Job,
    backend: String,
    pending: Option<pb::GenerateResponse>,
    rest: crate::upstream::TokenStream,
    phase: Phase,
    record: Record,
    /// From the final message.
    usage: Option<pb::Usage>,
    _in_flight: dispatch::InFlight,
}

impl StreamState {
    fn after_finish(&self) -> Phase {
        if self.job.include_usage { Phase::Usage } else { Phase::Done }
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&'static str>, role: bool) -> Event {
        let body = match self.job.api {
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                    delta.insert("content".into(), "".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({
                    "id": format!("chatcmpl-{}", self.job.id),
                    "object": "chat.completion.chunk",
                    "created": self.job.created,
                    "model": self.job.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                    "usage": null,
                })
            }
            Api::Completion => json!({
                "id": format!("cmpl-{}", self.job.id),
                "object": "text_completion",
                "created": self.job.created,
                "model": self.job.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
                "usage": null,
            }),
        };
        Event::default().data(body.to_string())
    }

    fn usage_chunk(&self, usage: Option<&pb::Usage>) -> Event {
        let object = match self.job.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let prefix = if self.job.api == Api::Chat { "chatcmpl" } else { "cmpl" };
        let body = json!({
            "id": format!("{prefix}-{}", self.job.id),
            "object": object,
            "created": self.job.created,
            "model": self.job.model,
            "choices": [],
            "usage": usage_json(usage),
        });
        Event::default().data(body.to_string())
    }

    /// The next event, or `None` when the stream is over.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Role => {
                    self.phase = Phase::Body;
                    return Some(self.chunk(None, None, true));
                }
                Phase::Body => {
                    let message = match self.pending.take() {
                        Some(m) => Ok(m),
                        None => match self.rest.next().await {
                            Some(r) => r.map_err(|e| dispatch::generation_error(&self.backend, &e)),
                            None => Err(ended_early(&self.backend)),
                        },
                    };
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            // Headers are gone: the error travels as an SSE event, and the
                            // stream ends without [DONE].
                            tracing::warn!(backend = %self.backend, error = %e.message, "generation broke off mid-stream");
                            self.record.finish(e.status, None);
                            self.phase = Phase::End;
                            return Some(Event::default().event("error").data(e.body()));
                        }
                    };
                    let finish = finish_reason(&message);
                    if finish.is_some() {
                        self.record.finish(200, message.usage.as_ref());
                        self.usage = message.usage;
                    }
                    let text = (!message.text.is_empty()).then_some(message.text.as_str());
                    if text.is_some() {
                        self.record.saw_text();
                    }
                    match (text, finish) {
                        (None, None) => {
                            self.phase = Phase::Body;
                            continue;
                        }
                        (Some(t), None) => {
                            self.phase = Phase::Body;
                            return Some(self.chunk(Some(t), None, false));
                        }
                        // OpenAI sends the finish reason in a chunk of its own.
                        (Some(t), Some(reason)) => {
                            self.phase = Phase::Finish(reason);
                            return Some(self.chunk(Some(t), None, false));
                        }
                        (None, Some(reason)) => {
                            self.phase = self.after_finish();
                            return Some(self.chunk(None, Some(reason), false));
                        }
                    }
                }
                Phase::Finish(reason) => {
                    self.phase = self.after_finish();
                    return Some(self.chunk(None, Some(reason), false));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(self.usage_chunk(self.usage.as_ref()));
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    return Some(Event::default().data("[DONE]"));
                }
                Phase::End => return None,
            }
        }
    }
}

/// Streaming: OpenAI's SSE chunks, then `[DONE]`. When the client goes away, axum drops this
/// stream, which drops the backend call and cancels the generation there.
fn stream(job: Job, started: Started, record: Record) -> Response {
    let Started { backend, first, rest, in_flight } = started;
    let phase = if job.api == Api::Chat { Phase::Role } else { Phase::Body };
    let state =
        StreamState { job, backend, pending: first, rest: rest.0, phase, record, usage: None, _in_flight: in_flight };
    let events = futures::stream::unfold(state, |mut s| async move {
        let event = s.next_event().await?;
        Some((Ok::<Event, Infallible>(event), s))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// `GET /v1/models`: the base model (when the tenant may use it), the adapters the caller may
/// use, and the tenant's aliases of them.
pub(super) async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = principal(&gw, &headers)?;
    let caller = gw.caller(&who)?;
    let base = gw.base_model();
    let mut data = Vec::new();
    if let Some(base) = &base
        && caller.tenant.base_model
    {
        data.push(json!({"id": base, "object": "model", "created": 0, "owned_by": "switchyard", "root": base, "parent": null}));
    }
    let loras = gw.loras.snapshot();
    for l in loras.values().filter(|l| caller.may_use(l)) {
        data.push(
            json!({"id": l.name, "object": "model", "created": 0, "owned_by": l.owner, "root": l.name, "parent": base}),
        );
    }
    for (alias, adapter) in &caller.tenant.models {
        if loras.get(adapter).is_some_and(|l| caller.may_use(l)) {
            data.push(json!({"id": alias, "object": "model", "created": 0, "owned_by": caller.name, "root": adapter, "parent": base}));
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}
