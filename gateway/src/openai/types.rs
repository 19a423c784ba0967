//! The OpenAI request bodies the gateway accepts, checked field by field. A field OpenAI
//! defines but this server does not implement is refused by name (never silently ignored);
//! an unknown field is refused too.

use super::tools::{self, Tools};
use crate::error::{Code, Error};
use crate::upstream::{Constraint, Sampling};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes (the backend's limit: while a stop sequence could still be
/// completing, this much generated text less one byte is held back).
pub const MAX_STOP_BYTES: usize = 1024;
/// Most `logit_bias` entries (the backend's limit).
pub const MAX_LOGIT_BIAS: usize = 1024;
/// Most choices one request may ask for (`n`): each is a generation of its own on the backend.
pub const MAX_N: u32 = 16;
/// Most alternatives per token in `top_logprobs` (chat) and `logprobs` (completions): OpenAI's
/// chat limit (vLLM's for both).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Fields of the chat API that exist in OpenAI's API but are not implemented here.
const CHAT_UNSUPPORTED: &[&str] = &[
    // Deprecated in favour of tools.
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "service_tier",
    "store",
    "metadata",
];
/// Fields both APIs take.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "logit_bias",
    // vLLM's extensions: keep generating past end-of-sequence (benchmarks use it for fixed
    // lengths), and its sampling knobs.
    "ignore_eos",
    "top_k",
    "min_p",
    "repetition_penalty",
    // Structured outputs: OpenAI's, and vLLM's extension (on completions too).
    "response_format",
    "structured_outputs",
];
const CHAT_FIELDS: &[&str] =
    &["messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"];
const COMPLETION_UNSUPPORTED: &[&str] = &["best_of", "suffix"];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo"];
/// Most choices one request may ask for: prompts times `n`.
pub const MAX_CHOICES: u32 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<RawToolCall>>,
    tool_call_id: Option<String>,
    /// The author's name; accepted, not shown to the model (OpenAI's models only use it).
    #[serde(default, rename = "name")]
    _name: Option<String>,
    /// What an assistant refused; accepted with a previous answer, not shown to the model.
    #[serde(default, rename = "refusal")]
    _refusal: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: RawFunctionCall,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunctionCall {
    name: String,
    arguments: String,
}

#[derive(Debug, Clone, Deserialize)]
struct RawCommon {
    model: String,
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logprobs: Option<Value>,
    top_logprobs: Option<u32>,
    logit_bias: Option<Map<String, Value>>,
    #[serde(default)]
    ignore_eos: bool,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    response_format: Option<Value>,
    structured_outputs: Option<Value>,
}

/// One chat message, text only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made: id, function name, arguments as JSON text.
    pub tool_calls: Vec<(String, String, String)>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// Sampling and streaming settings common to both APIs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The `model` field: the base model or an adapter name.
    pub model: String,
    pub sampling: Sampling,
    /// `None`: until the context is full.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate until `max_tokens` (or the context) even past end-of-sequence.
    pub ignore_eos: bool,
    /// `Some(n)`: each token's log-probability with the `n` most likely alternatives.
    pub logprobs: Option<u32>,
    /// What the generated text must match (structured outputs), if anything.
    pub constraint: Option<Constraint>,
    /// Choices to generate, each with a seed of its own (the request's plus its index).
    pub n: u32,
}

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub generation: Generation,
    /// The tools offered, and how they may be called.
    pub tools: Option<Tools>,
}

/// A completion's prompt: text, or token ids of the model's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionPrompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A validated `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// One or more prompts; each gets `n` choices.
    pub prompts: Vec<CompletionPrompt>,
    /// Each choice's text starts with its prompt (and, with `logprobs`, the prompt tokens'
    /// log-probabilities come first).
    pub echo: bool,
    pub generation: Generation,
}

/// Parses a JSON object, refusing unsupported and unknown fields by name (`fields` are the
/// API's own, beside [`COMMON_FIELDS`]).
fn object(body: &[u8], fields: &[&str], unsupported: &[&str]) -> Result<Map<String, Value>, Error> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let Value::Object(map) = value else {
        return Err(Error::invalid("the request body must be a JSON object", None));
    };
    for key in map.keys() {
        if unsupported.contains(&key.as_str()) {
            // Present but null is how some clients say "not set".
            if !map[key].is_null() {
                let message = format!("`{key}` is not supported by this server");
                return Err(Error::new(Code::UnsupportedParameter, message).at(Some(key)));
            }
        } else if !fields.contains(&key.as_str()) && !COMMON_FIELDS.contains(&key.as_str()) {
            return Err(Error::new(Code::UnknownParameter, format!("unknown parameter `{key}`")).at(Some(key)));
        }
    }
    Ok(map)
}

fn typed<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, Error> {
    serde_json::from_value(Value::Object(map)).map_err(|e| Error::invalid(format!("invalid request: {e}"), None))
}

/// Which API a body came in on: `logprobs` differs between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// `logprobs` and `top_logprobs` as the API reads them: chat takes `logprobs: true` and the
/// number of alternatives in `top_logprobs`; completions take the number in `logprobs`.
fn logprobs(kind: Kind, logprobs: Option<Value>, top: Option<u32>) -> Result<Option<u32>, Error> {
    let bad = |param: &str, msg: String| Error::invalid(msg, Some(param));
    let within = |param: &str, n: u32| match n <= MAX_TOP_LOGPROBS {
        true => Ok(Some(n)),
        false => Err(bad(param, format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"))),
    };
    match kind {
        Kind::Chat => {
            let asked = match logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(other) => return Err(bad("logprobs", format!("logprobs must be true or false, got {other}"))),
            };
            match (asked, top) {
                (true, top) => within("top_logprobs", top.unwrap_or(0)),
                (false, Some(_)) => Err(bad("top_logprobs", "top_logprobs needs logprobs: true".into())),
                (false, None) => Ok(None),
            }
        }
        Kind::Completion => match logprobs {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                Some(n) => within("logprobs", n),
                None => Err(bad(
                    "logprobs",
                    format!("logprobs must be a number of alternatives, 0 to {MAX_TOP_LOGPROBS}, got {v}"),
                )),
            },
        },
    }
}

fn generation(c: RawCommon, kind: Kind) -> Result<Generation, Error> {
    let max_tokens_field = match kind {
        Kind::Chat => "max_completion_tokens",
        Kind::Completion => "max_tokens",
    };
    let bad = |param: &str, msg: String| Err(Error::invalid(msg, Some(param)));
    if c.model.is_empty() {
        return bad("model", "`model` must name the base model or an adapter".into());
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return bad("temperature", format!("temperature must be between 0 and 2, got {temperature}"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return bad("top_p", format!("top_p must be in (0, 1], got {top_p}"));
    }
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return bad("n", format!("n must be between 1 and {MAX_N}, got {n}"));
    }
    let (presence_penalty, frequency_penalty) = (c.presence_penalty.unwrap_or(0.0), c.frequency_penalty.unwrap_or(0.0));
    for (name, v) in [("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)] {
        if !(-2.0..=2.0).contains(&v) {
            return bad(name, format!("{name} must be between -2 and 2, got {v}"));
        }
    }
    // vLLM's: -1 (and 0) disable.
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k => match u32::try_from(k) {
            Ok(k) => k,
            Err(_) => return bad("top_k", format!("top_k must be at least 1 (or -1 or 0 for all tokens), got {k}")),
        },
    };
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return bad("min_p", format!("min_p must be between 0 and 1, got {min_p}"));
    }
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return bad(
            "repetition_penalty",
            format!("repetition_penalty must be greater than 0, got {repetition_penalty}"),
        );
    }
    let logit_bias = match c.logit_bias {
        None => Vec::new(),
        Some(map) => logit_bias(map)?,
    };
    let logprobs = logprobs(kind, c.logprobs, c.top_logprobs)?;
    let max_tokens = c.max_completion_tokens.or(c.max_tokens);
    if max_tokens == Some(0) {
        return bad(max_tokens_field, format!("`{max_tokens_field}` must be at least 1"));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return bad("stop", format!("`stop` takes up to {MAX_STOP} non-empty strings"));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return bad("stop", format!("a `stop` sequence is {} bytes; the limit is {MAX_STOP_BYTES}", long.len()));
    }
    let constraint = match (c.response_format, c.structured_outputs) {
        (Some(_), Some(_)) => {
            return bad("structured_outputs", "give either response_format or structured_outputs, not both".into());
        }
        (Some(format), None) => super::structured::response_format(format)?,
        (None, Some(outputs)) => super::structured::structured_outputs(outputs)?,
        (None, None) => None,
    };
    if c.stream_options.is_some() && !c.stream {
        return bad("stream_options", "`stream_options` is only allowed with stream: true".into());
    }
    Ok(Generation {
        model: c.model,
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
            seed: c.seed,
        },
        max_tokens,
        stop,
        stream: c.stream,
        include_usage: c.stream_options.unwrap_or_default().include_usage,
        ignore_eos: c.ignore_eos,
        logprobs,
        constraint,
        n,
    })
}

/// OpenAI's `logit_bias`: token ids (as the object's keys) to a bias from -100 to 100. Whether
/// an id is in the vocabulary is the backend's to say.
fn logit_bias(map: Map<String, Value>) -> Result<Vec<(u32, f32)>, Error> {
    let bad = |msg: String| Err(Error::invalid(msg, Some("logit_bias")));
    if map.len() > MAX_LOGIT_BIAS {
        return bad(format!("logit_bias has {} entries; the most is {MAX_LOGIT_BIAS}", map.len()));
    }
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let Ok(id) = key.parse::<u32>() else {
            return bad(format!("logit_bias keys are token ids, got {key:?}"));
        };
        match value.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => out.push((id, b as f32)),
            _ => return bad(format!("logit_bias for token {id} must be a number between -100 and 100, got {value}")),
        }
    }
    out.sort_unstable_by_key(|&(id, _)| id);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return bad(format!("logit_bias names token {} twice", w[0].0));
    }
    Ok(out)
}

/// Fields of a message this server reads.
const MESSAGE_FIELDS: &[&str] = &["role", "content", "tool_calls", "tool_call_id", "name", "refusal"];

/// `messages` less the fields it does not read that are null: an answer sent back as it came
/// (`"audio": null`, `"function_call": null`, `"annotations": null`) is accepted; such a field
/// with a value is refused by name.
fn without_null_extras(mut messages: Value) -> Result<Value, Error> {
    if let Value::Array(items) = &mut messages {
        for (i, m) in items.iter_mut().enumerate() {
            let Value::Object(fields) = m else { continue };
            fields.retain(|k, v| MESSAGE_FIELDS.contains(&k.as_str()) || !v.is_null());
            if let Some(k) = fields.keys().find(|k| !MESSAGE_FIELDS.contains(&k.as_str())) {
                let message = format!("messages[{i}] has a field this server does not read: `{k}`");
                return Err(Error::invalid(message, Some(&format!("messages[{i}]"))));
            }
        }
    }
    Ok(messages)
}

/// Reads and checks a chat completion request.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, Error> {
    let mut map = object(body, CHAT_FIELDS, CHAT_UNSUPPORTED)?;
    let messages: Vec<RawMessage> = match map.remove("messages") {
        Some(v) => serde_json::from_value(without_null_extras(v)?)
            .map_err(|e| Error::invalid(format!("invalid `messages`: {e}"), Some("messages")))?,
        None => return Err(Error::invalid("`messages` is required", Some("messages"))),
    };
    if messages.is_empty() {
        return Err(Error::invalid("`messages` must not be empty", Some("messages")));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(Error::invalid(
                format!("role {:?} is not supported (system, developer, user, assistant, tool)", m.role),
                Some(&param),
            ));
        }
        let calls = m.tool_calls.unwrap_or_default();
        if !calls.is_empty() && m.role != "assistant" {
            return Err(Error::invalid("only assistant messages carry tool_calls", Some(&param)));
        }
        let tool_call_id = match (m.role.as_str(), m.tool_call_id) {
            ("tool", Some(id)) if !id.is_empty() => Some(id),
            ("tool", _) => {
                return Err(Error::invalid("a tool message needs the tool_call_id it answers", Some(&param)));
            }
            (_, Some(_)) => return Err(Error::invalid("only tool messages carry a tool_call_id", Some(&param))),
            (_, None) => None,
        };
        let mut tool_calls = Vec::with_capacity(calls.len());
        for call in calls {
            if call.kind != "function" || call.id.is_empty() || !super::structured::valid_name(&call.function.name) {
                return Err(Error::invalid(
                    "each tool call needs an id, type \"function\" and a function name of letters, digits, _ or -",
                    Some(&param),
                ));
            }
            tool_calls.push((call.id, call.function.name, call.function.arguments));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(Error::invalid(
                                format!("content part type {:?} is not supported (text only)", kind.unwrap_or("?")),
                                Some(&param),
                            ));
                        }
                    }
                }
                text
            }
        };
        // "developer" is OpenAI's newer name for "system".
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        out.push(Message { role, content, tool_calls, tool_call_id });
    }
    let tools = tools::parse(map.remove("tools"), map.remove("tool_choice"), map.remove("parallel_tool_calls"))?;
    let mut generation = generation(typed(map)?, Kind::Chat)?;
    if let Some(forced) = tools.as_ref().and_then(Tools::constraint) {
        if generation.constraint.is_some() {
            return Err(Error::invalid(
                "tool_choice requires a tool call, which response_format would not allow; give one or the other",
                Some("tool_choice"),
            ));
        }
        generation.constraint = Some(forced);
    }
    Ok(ChatRequest { messages: out, generation, tools })
}

/// `prompt` as OpenAI takes it: a string, a list of token ids, or a list of prompts each of
/// either kind.
fn completion_prompts(v: Value) -> Result<Vec<CompletionPrompt>, Error> {
    let bad = |msg: &str| Error::invalid(msg, Some("prompt"));
    const NOT_IDS: &str = "`prompt` token ids must be integers from 0 to 4294967295";
    const SHAPE: &str = "`prompt` must be a string, a list of token ids, or a list of prompts";
    let tokens = |items: &[Value]| -> Option<Vec<u32>> {
        items.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
    };
    let one = |v: Value| -> Result<CompletionPrompt, Error> {
        match v {
            Value::String(text) => Ok(CompletionPrompt::Text(text)),
            Value::Array(ids) if ids.iter().all(Value::is_number) => match tokens(&ids) {
                Some(ids) => Ok(CompletionPrompt::Tokens(ids)),
                None => Err(bad(NOT_IDS)),
            },
            _ => Err(bad(SHAPE)),
        }
    };
    let prompts = match v {
        Value::String(text) => vec![CompletionPrompt::Text(text)],
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => match tokens(&items) {
            Some(ids) => vec![CompletionPrompt::Tokens(ids)],
            None => return Err(bad(NOT_IDS)),
        },
        Value::Array(items) if !items.is_empty() => items.into_iter().map(one).collect::<Result<_, _>>()?,
        _ => return Err(bad(SHAPE)),
    };
    if prompts.len() > MAX_CHOICES as usize {
        return Err(bad(&format!("`prompt` holds {} prompts; the most is {MAX_CHOICES}", prompts.len())));
    }
    let empty = |p: &CompletionPrompt| match p {
        CompletionPrompt::Text(text) => text.is_empty(),
        CompletionPrompt::Tokens(ids) => ids.is_empty(),
    };
    if prompts.iter().any(empty) {
        return Err(bad("`prompt` must not be empty"));
    }
    Ok(prompts)
}

/// Reads and checks a (legacy) completion request.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, Error> {
    let mut map = object(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)?;
    let prompts = match map.remove("prompt") {
        Some(v) => completion_prompts(v)?,
        None => return Err(Error::invalid("`prompt` is required", Some("prompt"))),
    };
    let echo = match map.remove("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(Error::invalid(format!("echo must be true or false, got {other}"), Some("echo"))),
    };
    let generation = generation(typed(map)?, Kind::Completion)?;
    let choices = prompts.len() as u32 * generation.n;
    if choices > MAX_CHOICES {
        return Err(Error::invalid(
            format!(
                "{} prompts times n = {} is {choices} choices; the most is {MAX_CHOICES}",
                prompts.len(),
                generation.n
            ),
            Some("n"),
        ));
    }
    Ok(CompletionRequest { prompts, echo, generation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(r: Result<impl std::fmt::Debug, Error>) -> Error {
        r.expect_err("refused")
    }

    #[test]
    fn a_chat_request_reads_like_the_openai_sdk_sends_it() {
        let body = br#"{"model":"support-v1","messages":[{"role":"developer","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
            "temperature":0.2,"max_completion_tokens":16,"stop":"\n","seed":7,"n":1,
            "stream":true,"stream_options":{"include_usage":true},"user":"u1","presence_penalty":0}"#;
        let r = parse_chat(body).expect("valid");
        assert_eq!(r.messages[0], Message { role: "system".into(), content: "Be brief.".into(), ..Default::default() });
        assert_eq!(r.messages[1].content, "Hi there");
        let g = &r.generation;
        assert_eq!(
            (g.model.as_str(), g.max_tokens, g.sampling.seed, g.stream, g.include_usage),
            ("support-v1", Some(16), Some(7), true, true)
        );
        assert_eq!((g.sampling.temperature, g.sampling.top_p, g.stop.clone()), (0.2, 1.0, vec!["\n".to_string()]));
    }

    #[test]
    fn unsupported_unknown_and_out_of_range_fields_are_refused_by_name() {
        let chat = |extra: &str| {
            parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#).as_bytes())
        };
        let cases: &[(&str, &str, &str)] = &[
            (r#","functions":[{"name":"f"}]"#, "functions", "not supported"),
            (r#","tools":[{"type":"function","function":{"description":"no name"}}]"#, "tools", "has no name"),
            (r#","frobnicate":1"#, "frobnicate", "unknown parameter"),
            (r#","temperature":3"#, "temperature", "between 0 and 2"),
            (r#","top_p":0"#, "top_p", "(0, 1]"),
            (r#","n":0"#, "n", "between 1 and 16"),
            (r#","n":17"#, "n", "between 1 and 16"),
            (r#","max_completion_tokens":0"#, "max_completion_tokens", "at least 1"),
            (r#","stop":["a","b","c","d","e"]"#, "stop", "up to 4"),
            (&format!(r#","stop":["{}"]"#, "x".repeat(1025)), "stop", "the limit is 1024"),
            (r#","frequency_penalty":2.5"#, "frequency_penalty", "between -2 and 2"),
            (r#","presence_penalty":-3"#, "presence_penalty", "between -2 and 2"),
            (r#","top_k":-2"#, "top_k", "at least 1"),
            (r#","min_p":1.5"#, "min_p", "between 0 and 1"),
            (r#","repetition_penalty":0"#, "repetition_penalty", "greater than 0"),
            (r#","logit_bias":{"abc":1}"#, "logit_bias", "token ids"),
            (r#","logit_bias":{"5":101}"#, "logit_bias", "between -100 and 100"),
            (r#","logit_bias":{"5":"up"}"#, "logit_bias", "between -100 and 100"),
            (r#","logit_bias":{"5":1,"05":2}"#, "logit_bias", "twice"),
            (r#","logprobs":3"#, "logprobs", "true or false"),
            (r#","top_logprobs":2"#, "top_logprobs", "needs logprobs: true"),
            (r#","logprobs":true,"top_logprobs":21"#, "top_logprobs", "between 0 and 20"),
            (r#","stream_options":{"include_usage":true}"#, "stream_options", "only allowed with stream"),
        ];
        for (extra, param, needle) in cases {
            let e = refused(chat(extra));
            assert_eq!(
                (crate::openai::error::status(&e.code).0, e.param.as_deref()),
                (400, Some(*param)),
                "{extra}: {e:?}"
            );
            assert!(e.message.contains(needle), "{extra}: {}", e.message);
        }
        assert!(refused(parse_chat(b"{not json")).message.contains("not valid JSON"));
        assert!(refused(parse_chat(b"[]")).message.contains("JSON object"));
        assert!(
            refused(parse_chat(br#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#))
                .message
                .contains("invalid request")
        );
        assert_eq!(refused(parse_chat(br#"{"model":"m"}"#)).param.as_deref(), Some("messages"));
        let image =
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
        assert!(refused(parse_chat(image)).message.contains("image_url"));
        let tool = br#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#;
        assert_eq!(refused(parse_chat(tool)).param.as_deref(), Some("messages[0]"));
        let user_calls = br#"{"model":"m","messages":[{"role":"user","content":"x","tool_calls":[
            {"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]}]}"#;
        assert!(refused(parse_chat(user_calls)).message.contains("only assistant messages"));
        let both =
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"},
            "tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required"}"#;
        assert_eq!(refused(parse_chat(both)).param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn a_tool_round_trip_reads_as_the_sdk_sends_it() {
        let body = br#"{"model":"m","tools":[{"type":"function","function":{"name":"get_weather",
            "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],"tool_choice":"auto",
            "messages":[{"role":"user","content":"Weather in Oslo?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                "function":{"name":"get_weather","arguments":"{\"city\": \"Oslo\"}"}}]},
            {"role":"tool","tool_call_id":"call_1","content":"-3 C"}]}"#;
        let chat = parse_chat(body).expect("valid");
        let tools = chat.tools.expect("tools");
        assert_eq!((tools.functions.len(), tools.choice), (1, tools::ToolChoice::Auto));
        assert_eq!(chat.generation.constraint, None, "auto does not constrain");
        assert_eq!(
            chat.messages[1].tool_calls,
            vec![("call_1".into(), "get_weather".into(), r#"{"city": "Oslo"}"#.into())]
        );
        assert_eq!(
            (chat.messages[2].role.as_str(), chat.messages[2].tool_call_id.as_deref()),
            ("tool", Some("call_1"))
        );
        // An answer sent back as the SDK returned it, nulls and all.
        let echoed = br#"{"model":"m","messages":[{"role":"assistant","content":"hi","refusal":null,
            "audio":null,"function_call":null,"annotations":null,"tool_calls":null}]}"#;
        assert!(parse_chat(echoed).is_ok());
        let audio = br#"{"model":"m","messages":[{"role":"user","content":"hi","audio":{"id":"x"}}]}"#;
        let e = refused(parse_chat(audio));
        assert!(e.message.contains("`audio`") && e.param.as_deref() == Some("messages[0]"), "{e:?}");
    }

    #[test]
    fn sampling_knobs_of_openai_and_vllm_are_read() {
        let body = br#"{"model":"m","prompt":"x","temperature":0.7,"top_p":0.9,"top_k":40,"min_p":0.05,
            "presence_penalty":0.5,"frequency_penalty":-0.25,"repetition_penalty":1.1,"logit_bias":{"50256":-100,"7":2.5},"seed":3}"#;
        let s = parse_completion(body).expect("valid").generation.sampling;
        let want = Sampling {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            min_p: 0.05,
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            repetition_penalty: 1.1,
            logit_bias: vec![(7, 2.5), (50256, -100.0)],
            seed: Some(3),
        };
        assert_eq!(s, want);
        // Left out, each is off; vLLM's -1 is "every token" for top_k.
        let s = parse_completion(br#"{"model":"m","prompt":"x","top_k":-1}"#).expect("valid").generation.sampling;
        assert_eq!(s, Sampling::default());
        let many: Map<String, Value> = (0..=MAX_LOGIT_BIAS).map(|i| (i.to_string(), Value::from(1))).collect();
        let body = serde_json::json!({"model": "m", "prompt": "x", "logit_bias": many}).to_string();
        assert!(refused(parse_completion(body.as_bytes())).message.contains("the most is 1024"));
    }

    #[test]
    fn logprobs_are_asked_for_as_each_api_asks() {
        let chat = |extra: &str| {
            parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#).as_bytes())
                .map(|r| r.generation.logprobs)
        };
        assert_eq!(chat("").ok(), Some(None));
        assert_eq!(chat(r#","logprobs":false"#).ok(), Some(None));
        assert_eq!(chat(r#","logprobs":true"#).ok(), Some(Some(0)));
        assert_eq!(chat(r#","logprobs":true,"top_logprobs":5"#).ok(), Some(Some(5)));
        let completion = |extra: &str| {
            parse_completion(format!(r#"{{"model":"m","prompt":"x"{extra}}}"#).as_bytes())
                .map(|r| r.generation.logprobs)
        };
        assert_eq!(completion(r#","logprobs":null"#).ok(), Some(None));
        assert_eq!(completion(r#","logprobs":0"#).ok(), Some(Some(0)));
        assert_eq!(completion(r#","logprobs":5"#).ok(), Some(Some(5)));
        for bad in [r#","logprobs":true"#, r#","logprobs":21"#, r#","logprobs":-1"#] {
            assert_eq!(refused(completion(bad)).param.as_deref(), Some("logprobs"), "{bad}");
        }
        let e = refused(completion(r#","top_logprobs":2"#));
        assert_eq!((e.param.as_deref(), e.message.contains("unknown")), (Some("top_logprobs"), true));
    }

    #[test]
    fn completion_requests_take_prompts_of_text_or_token_ids_and_echo() {
        let r = parse_completion(br#"{"model":"base","prompt":["Once upon"],"max_tokens":8}"#).expect("valid");
        assert_eq!((r.prompts, r.generation.max_tokens), (vec![CompletionPrompt::Text("Once upon".into())], Some(8)));
        let prompts =
            |p: &str| parse_completion(format!(r#"{{"model":"m","prompt":{p}}}"#).as_bytes()).map(|r| r.prompts);
        assert_eq!(prompts("[1,2,3]").ok(), Some(vec![CompletionPrompt::Tokens(vec![1, 2, 3])]));
        assert_eq!(prompts("[[7,0]]").ok(), Some(vec![CompletionPrompt::Tokens(vec![7, 0])]));
        let mixed = vec![CompletionPrompt::Text("a".into()), CompletionPrompt::Tokens(vec![1])];
        assert_eq!(prompts(r#"["a",[1]]"#).ok(), Some(mixed));
        for (p, needle) in [
            ("[1,-2]", "token ids must be integers"),
            ("[1.5]", "token ids must be integers"),
            ("[4294967296]", "token ids must be integers"),
            (r#"[1,"a"]"#, "a list of prompts"),
            ("[]", "a list of prompts"),
            ("[[]]", "must not be empty"),
            (r#"["a",""]"#, "must not be empty"),
            ("\"\"", "must not be empty"),
            ("{}", "a list of prompts"),
        ] {
            let e = refused(prompts(p));
            assert_eq!(e.param.as_deref(), Some("prompt"), "{p}");
            assert!(e.message.contains(needle), "{p}: {}", e.message);
        }
        let many = format!(r#"{{"model":"m","prompt":["a","b","c","d","e"],"n":{}}}"#, MAX_N);
        assert_eq!(refused(parse_completion(many.as_bytes())).param.as_deref(), Some("n"), "5 x 16 > 64 choices");
        let echo = parse_completion(br#"{"model":"m","prompt":"x","echo":true,"logprobs":0}"#).expect("valid");
        assert!(echo.echo && echo.generation.logprobs == Some(0));
        assert_eq!(refused(parse_completion(br#"{"model":"m","prompt":"x","echo":1}"#)).param.as_deref(), Some("echo"));
        let chat_echo = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"echo":true}"#;
        assert_eq!(refused(parse_chat(chat_echo)).param.as_deref(), Some("echo"), "chat has no echo");
    }
}
