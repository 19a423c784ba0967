//! `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

use super::{RequestId, principal, read_body};
use crate::Gateway;
use crate::authz::Caller;
use crate::dispatch::{self, Started};
use crate::error::{Code, Error};
use crate::metrics::OTHER;
use crate::openai::response::{Api, Chunk, Head, Logprobs, Usage};
use crate::openai::tools::{Call, CallReader, Read, Tools};
use crate::openai::{self, CompletionPrompt, Generation};
use crate::policy::{ConstraintKind, Decision, Endpoint, Features, PolicyInput};
use crate::prefix::RequestPrefix;
use crate::quota::{self, Ticket};
use crate::upstream::{self, ChatMessage, Finish, GenerateCall, Grammar, Piece, Prompt, ToolCall};
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

/// The endpoint's name in metrics.
fn endpoint(api: Api) -> &'static str {
    match api {
        Api::Chat => "chat_completions",
        Api::Completion => "completions",
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
    /// The request's admission by its tenant's quota: charged and released when it ends.
    ticket: Option<Ticket>,
    /// The rate-limit headers the answer carries.
    quota_headers: Option<quota::Headers>,
    /// Generated tokens received (a backend message is one token), and the prompt's size in
    /// characters: what an abandoned request is charged, once it reached a backend.
    tokens_seen: u32,
    prompt_chars: usize,
    dispatched: bool,
}

impl Record {
    /// Charges the tenant's quota for what the generation used.
    fn used(&mut self, usage: &upstream::Usage) {
        if let Some(ticket) = self.ticket.as_mut() {
            ticket.charge(usage.prompt_tokens, usage.completion_tokens);
        }
    }

    fn finish(&mut self, status: u16, usage: Option<&upstream::Usage>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(u) = usage {
            self.used(u);
        }
        if let Some(mut ticket) = self.ticket.take()
            && self.dispatched
        {
            // Not charged yet: the request ended without usage (an error, or the client went
            // away). It is charged what it generated, and its prompt at 4 characters a token.
            // (A request refused before it reached a backend is charged no tokens.)
            let prompt = u32::try_from(self.prompt_chars.div_ceil(CHARS_PER_TOKEN)).unwrap_or(u32::MAX);
            ticket.charge(prompt, self.tokens_seen);
        }
        self.gw.metrics.request(endpoint(self.api), status, &self.tenant, &self.model, self.started.elapsed());
        if let Some(u) = usage {
            self.gw.metrics.tokens(&self.tenant, &self.model, u.prompt_tokens, u.completion_tokens, u.cached_tokens);
        }
    }

    fn saw_text(&mut self) {
        if !std::mem::replace(&mut self.first_token, true) {
            self.gw.metrics.first_token(endpoint(self.api), &self.model, self.started.elapsed());
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
    head: Head,
    stream: bool,
    include_usage: bool,
    /// The client asked for log-probabilities.
    logprobs: bool,
    /// Tool calls are read out of the answer.
    reads_calls: bool,
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
        ticket: None,
        quota_headers: None,
        tokens_seen: 0,
        prompt_chars: 0,
        dispatched: false,
    };
    let begun = begin(&gw, &id, &headers, body, api, &mut record).await;
    let quota_headers = record.quota_headers.take();
    let mut response = match begun {
        Err(e) => {
            record.finish(openai::error::status(&e.code).0, None);
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
                        ([(CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
                    }
                    Err(e) => {
                        record.finish(openai::error::status(&e.code).0, None);
                        e.into_response()
                    }
                }
            };
            if let Some(v) = served {
                response.headers_mut().insert(SERVED_MODEL, v);
            }
            response
        }
    };
    for (name, value) in quota_headers.iter().flat_map(quota::Headers::pairs) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Prompt characters per token, where a count of tokens is estimated from a prompt's size.
const CHARS_PER_TOKEN: usize = 4;

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
) -> Result<(Job, Started), Error> {
    let who = principal(gw, headers)?;
    let caller = gw.caller(&who)?;
    record.tenant = caller.name.to_string();
    let bytes = read_body(gw, headers, body).await?;
    let (mut reads_calls, mut offered_tools) = (false, 0u32);
    let (prompt, mut generation, prompt_chars) = match api {
        Api::Chat => {
            let chat = openai::parse_chat(&bytes)?;
            let chars = chat.messages.iter().map(|m| m.content.len()).sum();
            let messages = chat
                .messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                    tool_calls: m
                        .tool_calls
                        .into_iter()
                        .map(|(id, name, arguments)| ToolCall { id, name, arguments })
                        .collect(),
                    tool_call_id: m.tool_call_id,
                })
                .collect();
            let tools = chat.tools.as_ref().map(Tools::for_template).unwrap_or_default();
            reads_calls = chat.tools.as_ref().is_some_and(Tools::reads_calls);
            if reads_calls {
                offered_tools = chat.tools.as_ref().map_or(0, |t| u32::try_from(t.functions.len()).unwrap_or(u32::MAX));
            }
            (Prompt::Chat { messages, tools }, chat.generation, chars)
        }
        Api::Completion => {
            let c = openai::parse_completion(&bytes)?;
            let (prompt, chars) = match c.prompt {
                CompletionPrompt::Text(text) => {
                    let chars = text.len();
                    (Prompt::Text(text), chars)
                }
                // Counted at the same 4 characters a token the estimates use.
                CompletionPrompt::Tokens(ids) => {
                    let chars = ids.len().saturating_mul(CHARS_PER_TOKEN);
                    (Prompt::Tokens(ids), chars)
                }
            };
            (prompt, c.generation, chars)
        }
    };
    record.prompt_chars = prompt_chars;
    admit(gw, &caller, &mut generation, record).await?;
    let Some(base) = gw.base_model() else {
        return Err(Error::new(Code::NoBackend, "no backend has answered yet"));
    };
    // The policy sees only the adapters this tenant may use, in the known set and on every backend.
    let loras = gw.loras.snapshot();
    let usable: Vec<(String, String)> =
        loras.values().filter(|l| caller.may_use(l)).map(|l| (l.name.clone(), l.owner.clone())).collect();
    let mut backends = gw.views();
    for b in &mut backends {
        b.adapters.retain(|name, _| loras.get(name).is_some_and(|l| caller.may_use(l)));
    }
    // Tenants keep their cached prompts apart unless the operator lets them share.
    let salt = if caller.tenant.share_prefix_cache { String::new() } else { who.tenant.clone() };
    let pin = caller.tenant.backend.clone();
    let prefix = Arc::new(RequestPrefix::new(gw.clone(), prompt, salt.clone(), &backends, pin));
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
            prefix: Some(prefix.clone()),
            features: Features {
                constraint: generation.constraint.as_ref().map(|c| match (&c.grammar, c.from) {
                    (_, "tools") => ConstraintKind::ToolCall,
                    (Grammar::JsonSchema(_), _) => ConstraintKind::JsonSchema,
                    (Grammar::JsonObject, _) => ConstraintKind::JsonObject,
                    (Grammar::Regex(_), _) => ConstraintKind::Regex,
                    (Grammar::Lark(_), _) => ConstraintKind::Grammar,
                }),
                tools: offered_tools,
                logprobs: generation.logprobs.is_some(),
            },
        })
        .await
        .map_err(|e| {
            let code = if e.busy { Code::PolicyBusy } else { Code::PolicyFailed };
            Error::new(code, e.to_string())
        })?;
    let route = match decision {
        Decision::Route(route) => route,
        Decision::Reject { status, code, message } => return Err(Error::new(Code::Refused { status, code }, message)),
    };
    let route = caller.route(&generation.model, route, &loras)?;
    record.model = route.adapter.clone().unwrap_or(base);
    let mut request = generate_call(&id.0, RequestPrefix::into_prompt(prefix), &generation, &who.tenant);
    request.tenant_weight = caller.tenant.weight.0;
    request.priority = route.priority;
    request.cache_salt = salt;
    let started = dispatch::start(gw, &route, request).await?;
    record.dispatched = true;
    tracing::debug!(backend = %started.backend, adapter = ?route.adapter, "generation started");
    let head = Head {
        api,
        id: format!("{}{}", api.id_prefix(), id.0),
        created: crate::unix_seconds(),
        model: generation.model,
    };
    let job = Job {
        head,
        stream: generation.stream,
        include_usage: generation.include_usage,
        logprobs: generation.logprobs.is_some(),
        reads_calls,
    };
    Ok((job, started))
}

/// Applies the tenant's quota to a request: its caps on `max_tokens` (also the default) and
/// `ignore_eos`, then its rates and concurrency. In shadow mode a refusal is only counted and
/// logged.
async fn admit(
    gw: &Gateway,
    caller: &Caller<'_>,
    generation: &mut Generation,
    record: &mut Record,
) -> Result<(), Error> {
    let quota = &caller.tenant.quota;
    let refuse = |limit: &'static str, e: Error| {
        gw.metrics.quota_refusal(caller.name, limit, quota.shadow);
        if quota.shadow {
            tracing::info!(tenant = caller.name, limit, error = %e.message, "quota would refuse this request (shadow mode)");
            Ok(())
        } else {
            Err(e)
        }
    };
    if generation.ignore_eos && !quota.ignore_eos {
        let message = format!("tenant {:?} may not set ignore_eos", caller.name);
        refuse("ignore_eos", Error::new(Code::IgnoreEosNotAllowed, message).at(Some("ignore_eos")))?;
    }
    if let Some(cap) = quota.max_tokens {
        match generation.max_tokens {
            None => generation.max_tokens = Some(cap),
            Some(asked) if asked > cap => {
                let message = format!("max_tokens is {asked}, more than tenant {:?} may ask for ({cap})", caller.name);
                refuse("max_tokens", Error::invalid(message, Some("max_tokens")))?;
            }
            Some(_) => {}
        }
    }
    if !quota.limits_rates() {
        return Ok(());
    }
    match gw.quotas.admit(caller.name, quota).await {
        Ok(ticket) => {
            if let Some(limit) = ticket.shadowed {
                gw.metrics.quota_refusal(caller.name, limit.as_str(), true);
            }
            record.quota_headers = Some(ticket.headers.clone());
            record.ticket = Some(ticket);
            Ok(())
        }
        Err(refusal) => {
            gw.metrics.quota_refusal(caller.name, refusal.limit.as_str(), false);
            record.quota_headers = Some(refusal.headers);
            Err(refusal.error)
        }
    }
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

fn generate_call(id: &str, prompt: Prompt, g: &Generation, tenant: &str) -> GenerateCall {
    GenerateCall {
        tenant: tenant.to_string(),
        tenant_weight: 1.0,
        priority: 0,
        cache_salt: String::new(),
        request_id: id.to_string(),
        adapter: None,
        prompt,
        sampling: g.sampling.clone(),
        top_logprobs: g.logprobs,
        constraint: g.constraint.clone(),
        max_tokens: g.max_tokens.unwrap_or(0),
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    }
}

/// OpenAI's `finish_reason`, on the piece that ends the generation.
fn finish_reason(m: &Piece) -> Option<&'static str> {
    m.finish.map(|f| match f {
        Finish::Length => "length",
        Finish::Eos | Finish::Stop => "stop",
    })
}

fn openai_usage(u: Option<&upstream::Usage>) -> Usage {
    let u = u.copied().unwrap_or_default();
    Usage::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
}

fn ended_early(backend: &str) -> Error {
    Error::new(Code::IncompleteGeneration, format!("backend {backend} ended the generation without finishing it"))
}

/// Non-streaming: the whole generation in one body.
async fn collect(job: &Job, started: Started, record: &mut Record) -> Result<String, Error> {
    let Started { backend, first, rest, in_flight } = started;
    let mut rest = rest.0;
    let mut pending = first;
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let last = loop {
        let mut message = match pending.take() {
            Some(m) => m,
            None => match rest.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(dispatch::generation_error(&backend, &e, None)),
                None => return Err(ended_early(&backend)),
            },
        };
        if !message.text.is_empty() {
            record.saw_text();
        }
        record.tokens_seen += 1;
        text.push_str(&message.text);
        logprobs.append(&mut message.logprobs);
        if finish_reason(&message).is_some() {
            break message;
        }
    };
    drop(in_flight);
    let usage = last.usage.as_ref();
    if let Some(u) = usage {
        record.gw.metrics.tokens(&record.tenant, &record.model, u.prompt_tokens, u.completion_tokens, u.cached_tokens);
        record.used(u);
    }
    let logprobs = job.logprobs.then_some(Logprobs { tokens: &logprobs, offset: 0 });
    let (text, calls) = match job.reads_calls {
        true => read_calls(&text),
        false => (text, Vec::new()),
    };
    let finish = with_calls(finish_reason(&last), calls.len());
    Ok(job.head.complete(&text, &calls, logprobs, finish, openai_usage(usage)))
}

/// An answer's text less its tool calls, and the calls.
fn read_calls(answer: &str) -> (String, Vec<Call>) {
    let mut reader = CallReader::default();
    let mut reads = reader.push(answer);
    reads.extend(reader.finish());
    let (mut text, mut calls) = (String::new(), Vec::new());
    for read in reads {
        match read {
            Read::Text(t) => text.push_str(&t),
            Read::Call(c) => calls.push(c),
        }
    }
    (text, calls)
}

/// OpenAI's finish reason for an answer that made `calls` tool calls: `tool_calls` when it
/// ended by itself.
fn with_calls(finish: Option<&'static str>, calls: usize) -> Option<&'static str> {
    match finish {
        Some("stop") if calls > 0 => Some("tool_calls"),
        other => other,
    }
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
    pending: Option<Piece>,
    rest: crate::upstream::TokenStream,
    phase: Phase,
    record: Record,
    /// From the final message.
    usage: Option<upstream::Usage>,
    /// Log-probabilities of tokens whose text has not been sent yet (it may be held back while
    /// it could still be a stop string), and where the next token's text starts.
    held: Vec<upstream::TokenLogprobs>,
    offset: usize,
    /// Reads tool calls out of the text, when the request offered tools to call.
    calls: Option<CallReader>,
    /// What the call reader gave back, still to send; then the finish reason, if it came.
    outbox: std::collections::VecDeque<Read>,
    finishing: Option<&'static str>,
    /// Tool calls sent so far.
    sent_calls: usize,
    _in_flight: dispatch::InFlight,
}

impl StreamState {
    fn after_finish(&self) -> Phase {
        if self.job.include_usage { Phase::Usage } else { Phase::Done }
    }

    fn chunk(&self, chunk: Chunk<'_>) -> Event {
        Event::default().data(self.job.head.chunk(chunk))
    }

    /// The held log-probabilities for the next chunk: when the client asked for them, and
    /// there are some (or `always`).
    fn logprobs(&self, always: bool) -> Option<Logprobs<'_>> {
        (self.job.logprobs && (always || !self.held.is_empty()))
            .then_some(Logprobs { tokens: &self.held, offset: self.offset })
    }

    /// After a chunk went out with the held log-probabilities (their text ending at `end`).
    fn sent(&mut self, end: Option<usize>) {
        if let Some(end) = end {
            self.offset = end;
        }
        self.held.clear();
    }

    /// The next event, or `None` when the stream is over.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::End) {
                Phase::Role => {
                    self.phase = Phase::Body;
                    return Some(self.chunk(Chunk::Role));
                }
                Phase::Body if !self.outbox.is_empty() || self.finishing.is_some() => {
                    self.phase = Phase::Body;
                    let event = match self.outbox.pop_front() {
                        Some(Read::Text(t)) => {
                            let l = self.logprobs(true);
                            self.chunk(Chunk::Text(&t, l))
                        }
                        Some(Read::Call(call)) => {
                            let l = self.logprobs(false);
                            let event = self.chunk(Chunk::ToolCall(self.sent_calls, &call, l));
                            self.sent_calls += 1;
                            event
                        }
                        None => {
                            let reason = self.finishing.take().unwrap_or("stop");
                            self.phase = self.after_finish();
                            let l = self.logprobs(false);
                            self.chunk(Chunk::Finish(reason, l))
                        }
                    };
                    self.sent(None);
                    return Some(event);
                }
                Phase::Body => {
                    let message = match self.pending.take() {
                        Some(m) => Ok(m),
                        None => match self.rest.next().await {
                            Some(r) => r.map_err(|e| dispatch::generation_error(&self.backend, &e, None)),
                            None => Err(ended_early(&self.backend)),
                        },
                    };
                    let message = match message {
                        Ok(m) => m,
                        Err(e) => {
                            // Headers are gone: the error travels as an SSE event, and the
                            // stream ends without [DONE].
                            tracing::warn!(backend = %self.backend, error = %e.message, "generation broke off mid-stream");
                            self.record.finish(openai::error::status(&e.code).0, None);
                            self.phase = Phase::End;
                            return Some(Event::default().event("error").data(openai::error::body(&e)));
                        }
                    };
                    self.record.tokens_seen += 1;
                    let finish = finish_reason(&message);
                    if finish.is_some() {
                        self.record.finish(200, message.usage.as_ref());
                        self.usage = message.usage;
                    }
                    self.held.extend(message.logprobs);
                    let text = (!message.text.is_empty()).then_some(message.text.as_str());
                    if text.is_some() {
                        self.record.saw_text();
                    }
                    if let Some(reader) = self.calls.as_mut() {
                        self.outbox.extend(reader.push(&message.text));
                        if finish.is_some() {
                            self.outbox.extend(reader.finish());
                            self.finishing = with_calls(finish, reader.calls());
                        }
                        self.phase = Phase::Body;
                        continue;
                    }
                    match (text, finish) {
                        (None, None) => {
                            self.phase = Phase::Body;
                            continue;
                        }
                        // OpenAI sends the finish reason in a chunk of its own.
                        (Some(t), finish) => {
                            self.phase = finish.map_or(Phase::Body, Phase::Finish);
                            let l = self.logprobs(true);
                            let event = self.chunk(Chunk::Text(t, l));
                            let end = l.map(openai::response::text_end);
                            self.sent(end);
                            return Some(event);
                        }
                        (None, Some(reason)) => {
                            self.phase = self.after_finish();
                            let l = self.logprobs(false);
                            let event = self.chunk(Chunk::Finish(reason, l));
                            let end = l.map(openai::response::text_end);
                            self.sent(end);
                            return Some(event);
                        }
                    }
                }
                Phase::Finish(reason) => {
                    self.phase = self.after_finish();
                    return Some(self.chunk(Chunk::Finish(reason, None)));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(self.chunk(Chunk::Usage(openai_usage(self.usage.as_ref()))));
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
    let phase = if job.head.api == Api::Chat { Phase::Role } else { Phase::Body };
    let reads_calls = job.reads_calls;
    let state = StreamState {
        job,
        backend,
        pending: first,
        rest: rest.0,
        phase,
        record,
        usage: None,
        held: Vec::new(),
        offset: 0,
        calls: reads_calls.then(CallReader::default),
        outbox: Default::default(),
        finishing: None,
        sent_calls: 0,
        _in_flight: in_flight,
    };
    let events = futures::stream::unfold(state, |mut s| async move {
        let event = s.next_event().await?;
        Some((Ok::<Event, Infallible>(event), s))
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// `GET /v1/models`: the base model (when the tenant may use it), the adapters the caller may
/// use, and the tenant's aliases of them.
pub(super) async fn models(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, Error> {
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
