//! `POST /v1/chat/completions`, `POST /v1/completions` and `GET /v1/models`.

use super::{RequestId, principal, read_body};
use crate::Gateway;
use crate::authz::Caller;
use crate::dispatch::{self, Started};
use crate::error::{Code, Error};
use crate::metrics::OTHER;
use crate::openai::response::{Answer, Api, Head, Logprobs, Usage};
use crate::openai::tools::{Call, CallReader, Read, Tools};
use crate::openai::{self, CompletionPrompt, Generation};
use crate::policy::Route;
use crate::policy::{ConstraintKind, Decision, Endpoint, Features, PolicyInput};
use crate::prefix::RequestPrefix;
use crate::quota::{self, Ticket};
use crate::upstream::{self, ChatMessage, Finish, GenerateCall, Grammar, Piece, Prompt, ToolCall};
use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
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
pub(super) struct Record {
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
    pub(super) tokens_seen: u32,
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

    pub(super) fn finish(&mut self, status: u16, usage: Option<&upstream::Usage>) {
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

    pub(super) fn saw_text(&mut self) {
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
pub(super) struct Job {
    pub(super) head: Head,
    stream: bool,
    pub(super) include_usage: bool,
    /// The client asked for log-probabilities.
    pub(super) logprobs: bool,
    /// Tool calls are read out of the answer.
    pub(super) reads_calls: bool,
    /// Choices per prompt.
    pub(super) n: u32,
    /// Per prompt, the text its choices start with (`None`: the text of its tokens, from their
    /// log-probabilities); no echo when absent.
    pub(super) echo: Option<Vec<Option<String>>>,
}

impl Job {
    /// Whether choice `index` starts with its prompt, and the prompt's text when known.
    pub(super) fn echo(&self, index: usize) -> Option<Option<&str>> {
        let prompt = index / self.n.max(1) as usize;
        self.echo.as_ref().map(|e| e.get(prompt).and_then(|t| t.as_deref()))
    }
}

/// The text of prompt tokens, from their log-probabilities' bytes.
pub(super) fn tokens_text(tokens: &[upstream::TokenLogprobs]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.token.bytes.iter().copied()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
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
                super::stream::stream(job, started, record)
            } else {
                let shared = Mutex::new(record);
                let collected = collect(&job, started, &shared).await;
                let mut record = shared.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
                match collected {
                    Ok((body, usage)) => {
                        record.finish(200, usage.as_ref());
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
) -> Result<(Job, Vec<Started>), Error> {
    let who = principal(gw, headers)?;
    let caller = gw.caller(&who)?;
    record.tenant = caller.name.to_string();
    let bytes = read_body(gw, headers, body).await?;
    let (mut reads_calls, mut offered_tools) = (false, 0u32);
    // Completions' further prompts, and what each prompt's choices echo (none: no echo).
    let (mut more_prompts, mut echo): (Vec<Prompt>, Option<Vec<Option<String>>>) = (Vec::new(), None);
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
            // Token ids are counted at the same 4 characters a token the estimates use.
            let chars = c
                .prompts
                .iter()
                .map(|p| match p {
                    CompletionPrompt::Text(text) => text.len(),
                    CompletionPrompt::Tokens(ids) => ids.len().saturating_mul(CHARS_PER_TOKEN),
                })
                .fold(0usize, usize::saturating_add);
            // A prompt of token ids is echoed as the text of its tokens, which the backend
            // gives with their log-probabilities.
            echo = c.echo.then(|| {
                c.prompts
                    .iter()
                    .map(|p| match p {
                        CompletionPrompt::Text(text) => Some(text.clone()),
                        CompletionPrompt::Tokens(_) => None,
                    })
                    .collect()
            });
            let mut prompts = c.prompts.into_iter().map(|p| match p {
                CompletionPrompt::Text(text) => Prompt::Text(text),
                CompletionPrompt::Tokens(ids) => Prompt::Tokens(ids),
            });
            let first = prompts.next().ok_or_else(|| Error::invalid("`prompt` is required", Some("prompt")))?;
            more_prompts = prompts.collect();
            (first, c.generation, chars)
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
    // Echoing a prompt of token ids needs their text; echoing with log-probabilities, theirs.
    let prompt_logprobs = |k: usize| {
        let echo = echo.as_ref()?;
        let text_unknown = echo.get(k).is_some_and(Option::is_none);
        (generation.logprobs.is_some() || text_unknown).then(|| generation.logprobs.unwrap_or(0))
    };
    request.prompt_logprobs = prompt_logprobs(0);
    let mut started = start_choices(gw, &route, request.clone(), generation.n, &id.0, 0).await?;
    record.dispatched = true;
    tracing::debug!(backend = %started[0].backend, adapter = ?route.adapter, "generation started");
    // Further prompts (completions) go as the first did, each with its own choices.
    let groups = more_prompts.into_iter().enumerate().map(|(k, prompt)| {
        let first_index = (k as u32 + 1) * generation.n;
        let call = GenerateCall { prompt_logprobs: prompt_logprobs(k + 1), prompt, ..request.clone() };
        start_choices(gw, &route, call, generation.n, &id.0, first_index)
    });
    for group in futures::future::join_all(groups).await {
        started.extend(group?);
    }
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
        n: generation.n,
        echo,
    };
    Ok((job, started))
}

/// Starts the `n` choices of one prompt, numbered from `first_index`: the first, then the others
/// where the first went, now that its prompt is computed. They find it in that backend's prefix
/// cache, so the prompt is computed once (less its last, partial block). Each samples with a
/// seed of its own: the request's plus its index.
async fn start_choices(
    gw: &Arc<Gateway>,
    route: &Route,
    call: GenerateCall,
    n: u32,
    id: &str,
    first_index: u32,
) -> Result<Vec<Started>, Error> {
    let numbered = |i: u32| {
        let index = first_index + i;
        let mut choice = call.clone();
        if index > 0 {
            choice.request_id = format!("{id}-{index}");
            choice.sampling.seed = choice.sampling.seed.map(|s| s.wrapping_add(u64::from(index)));
        }
        choice
    };
    let first = dispatch::start(gw, route, numbered(0)).await?;
    let pinned = Route { backend: Some(first.backend.clone()), ..route.clone() };
    let mut started = vec![first];
    let others = (1..n).map(|i| dispatch::start(gw, &pinned, numbered(i)));
    for other in futures::future::join_all(others).await {
        started.push(other?);
    }
    Ok(started)
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
        prompt_logprobs: None,
        constraint: g.constraint.clone(),
        max_tokens: g.max_tokens.unwrap_or(0),
        stop: g.stop.clone(),
        ignore_eos: g.ignore_eos,
    }
}

/// OpenAI's `finish_reason`, on the piece that ends the generation.
pub(super) fn finish_reason(m: &Piece) -> Option<&'static str> {
    m.finish.map(|f| match f {
        Finish::Length => "length",
        Finish::Eos | Finish::Stop => "stop",
    })
}

pub(super) fn openai_usage(u: Option<&upstream::Usage>) -> Usage {
    let u = u.copied().unwrap_or_default();
    Usage::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
}

pub(super) fn ended_early(backend: &str) -> Error {
    Error::new(Code::IncompleteGeneration, format!("backend {backend} ended the generation without finishing it"))
}

/// One choice's whole generation.
struct Collected {
    text: String,
    logprobs: Vec<upstream::TokenLogprobs>,
    prompt_logprobs: Vec<upstream::TokenLogprobs>,
    finish: Option<&'static str>,
    usage: Option<upstream::Usage>,
}

/// Reads one generation to its end.
async fn collect_one(started: Started, record: &Mutex<Record>) -> Result<Collected, Error> {
    let Started { backend, first, rest, in_flight } = started;
    let mut rest = rest.0;
    let mut pending = first;
    let (mut text, mut logprobs, mut prompt_logprobs) = (String::new(), Vec::new(), Vec::new());
    let last = loop {
        let mut message = match pending.take() {
            Some(m) => m,
            None => match rest.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(dispatch::generation_error(&backend, &e, None)),
                None => return Err(ended_early(&backend)),
            },
        };
        if message.prompt_logprobs.is_empty() {
            let mut record = record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !message.text.is_empty() {
                record.saw_text();
            }
            record.tokens_seen += 1;
        }
        prompt_logprobs.append(&mut message.prompt_logprobs);
        text.push_str(&message.text);
        logprobs.append(&mut message.logprobs);
        if finish_reason(&message).is_some() {
            break message;
        }
    };
    drop(in_flight);
    Ok(Collected { text, logprobs, prompt_logprobs, finish: finish_reason(&last), usage: last.usage })
}

/// Non-streaming: every choice's whole generation in one body, and their usage.
async fn collect(
    job: &Job,
    started: Vec<Started>,
    record: &Mutex<Record>,
) -> Result<(String, Option<upstream::Usage>), Error> {
    let collected = futures::future::join_all(started.into_iter().map(|s| collect_one(s, record))).await;
    let mut collected: Vec<Collected> = collected.into_iter().collect::<Result<_, _>>()?;
    // Echo: the prompt's text first, and its tokens' log-probabilities.
    for (index, c) in collected.iter_mut().enumerate() {
        if let Some(known) = job.echo(index) {
            let prompt = known.map_or_else(|| tokens_text(&c.prompt_logprobs), str::to_string);
            c.text.insert_str(0, &prompt);
            let mut all = std::mem::take(&mut c.prompt_logprobs);
            all.append(&mut c.logprobs);
            c.logprobs = all;
        }
    }
    let read: Vec<(String, Vec<Call>)> = collected
        .iter()
        .map(|c| match job.reads_calls {
            true => read_calls(&c.text),
            false => (c.text.clone(), Vec::new()),
        })
        .collect();
    let answers: Vec<Answer<'_>> = collected
        .iter()
        .zip(&read)
        .map(|(c, (text, calls))| Answer {
            text,
            calls,
            logprobs: job.logprobs.then_some(Logprobs { tokens: &c.logprobs, offset: 0 }),
            finish_reason: with_calls(c.finish, calls.len()),
        })
        .collect();
    let usage = super::stream::total_usage(&collected.iter().map(|c| c.usage).collect::<Vec<_>>(), job.n);
    Ok((job.head.complete(&answers, openai_usage(usage.as_ref())), usage))
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
pub(super) fn with_calls(finish: Option<&'static str>, calls: usize) -> Option<&'static str> {
    match finish {
        Some("stop") if calls > 0 => Some("tool_calls"),
        other => other,
    }
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
