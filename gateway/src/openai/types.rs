//! The OpenAI request bodies the gateway accepts, checked field by field. A field OpenAI
//! defines but this server does not implement is refused by name (never silently ignored);
//! an unknown field is refused too.

use crate::error::{Code, Error};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes (the backend's limit: while a stop sequence could still be
/// completing, this much generated text less one byte is held back).
pub const MAX_STOP_BYTES: usize = 1024;

/// Fields of the chat API that exist in OpenAI's API but are not implemented here.
const CHAT_UNSUPPORTED: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "top_logprobs",
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
    // vLLM's extension: keep generating past end-of-sequence (benchmarks use it for fixed lengths).
    "ignore_eos",
];
const CHAT_FIELDS: &[&str] = &["messages", "max_completion_tokens"];
const COMPLETION_UNSUPPORTED: &[&str] = &["echo", "best_of", "suffix", "logit_bias"];
const COMPLETION_FIELDS: &[&str] = &["prompt"];

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
struct RawMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
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
    #[serde(default)]
    ignore_eos: bool,
}

/// One chat message, text only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Sampling and streaming settings common to both APIs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The `model` field: the base model or an adapter name.
    pub model: String,
    pub temperature: f32,
    pub top_p: f32,
    /// `None`: until the context is full.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
    /// Generate until `max_tokens` (or the context) even past end-of-sequence.
    pub ignore_eos: bool,
}

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub generation: Generation,
}

/// A validated `POST /v1/completions` body.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub prompt: String,
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

fn generation(c: RawCommon, max_tokens_field: &str) -> Result<Generation, Error> {
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
    if let Some(n) = c.n
        && n != 1
    {
        return bad("n", format!("only n=1 is supported, got {n}"));
    }
    for (name, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return bad(name, format!("`{name}` is not supported by this server (only 0)"));
        }
    }
    let asks_logprobs = |v: &Value| !(v.is_null() || v.as_bool() == Some(false) || v.as_u64() == Some(0));
    if c.logprobs.as_ref().is_some_and(asks_logprobs) {
        return bad("logprobs", "`logprobs` is not supported by this server".into());
    }
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
    if c.stream_options.is_some() && !c.stream {
        return bad("stream_options", "`stream_options` is only allowed with stream: true".into());
    }
    Ok(Generation {
        model: c.model,
        temperature,
        top_p,
        max_tokens,
        stop,
        seed: c.seed,
        stream: c.stream,
        include_usage: c.stream_options.unwrap_or_default().include_usage,
        ignore_eos: c.ignore_eos,
    })
}

/// Reads and checks a chat completion request.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, Error> {
    let mut map = object(body, CHAT_FIELDS, CHAT_UNSUPPORTED)?;
    let messages: Vec<RawMessage> = match map.remove("messages") {
        Some(v) => serde_json::from_value(v)
            .map_err(|e| Error::invalid(format!("invalid `messages`: {e}"), Some("messages")))?,
        None => return Err(Error::invalid("`messages` is required", Some("messages"))),
    };
    if messages.is_empty() {
        return Err(Error::invalid("`messages` must not be empty", Some("messages")));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
            return Err(Error::invalid(
                format!("role {:?} is not supported (system, developer, user, assistant)", m.role),
                Some(&param),
            ));
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
        out.push(Message { role, content });
    }
    let generation = generation(typed(map)?, "max_completion_tokens")?;
    Ok(ChatRequest { messages: out, generation })
}

/// Reads and checks a (legacy) completion request.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, Error> {
    let mut map = object(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)?;
    let prompt: Prompt = match map.remove("prompt") {
        Some(v) => serde_json::from_value(v).map_err(|_| {
            Error::invalid("`prompt` must be a string (token-id prompts are not supported)", Some("prompt"))
        })?,
        None => return Err(Error::invalid("`prompt` is required", Some("prompt"))),
    };
    let prompt = match prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(Error::invalid(
                format!("one prompt per request is supported, got {}", v.len()),
                Some("prompt"),
            ));
        }
    };
    if prompt.is_empty() {
        return Err(Error::invalid("`prompt` must not be empty", Some("prompt")));
    }
    let generation = generation(typed(map)?, "max_tokens")?;
    Ok(CompletionRequest { prompt, generation })
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
        assert_eq!(r.messages[0], Message { role: "system".into(), content: "Be brief.".into() });
        assert_eq!(r.messages[1].content, "Hi there");
        let g = &r.generation;
        assert_eq!(
            (g.model.as_str(), g.max_tokens, g.seed, g.stream, g.include_usage),
            ("support-v1", Some(16), Some(7), true, true)
        );
        assert_eq!((g.temperature, g.top_p, g.stop.clone()), (0.2, 1.0, vec!["\n".to_string()]));
    }

    #[test]
    fn unsupported_unknown_and_out_of_range_fields_are_refused_by_name() {
        let chat = |extra: &str| {
            parse_chat(format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#).as_bytes())
        };
        let cases: &[(&str, &str, &str)] = &[
            (r#","tools":[{"type":"function"}]"#, "tools", "not supported"),
            (r#","frobnicate":1"#, "frobnicate", "unknown parameter"),
            (r#","temperature":3"#, "temperature", "between 0 and 2"),
            (r#","top_p":0"#, "top_p", "(0, 1]"),
            (r#","n":2"#, "n", "only n=1"),
            (r#","max_completion_tokens":0"#, "max_completion_tokens", "at least 1"),
            (r#","stop":["a","b","c","d","e"]"#, "stop", "up to 4"),
            (&format!(r#","stop":["{}"]"#, "x".repeat(1025)), "stop", "the limit is 1024"),
            (r#","frequency_penalty":0.5"#, "frequency_penalty", "not supported"),
            (r#","logprobs":true"#, "logprobs", "not supported"),
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
    }

    #[test]
    fn completion_requests_take_one_text_prompt() {
        let r = parse_completion(br#"{"model":"base","prompt":["Once upon"],"max_tokens":8}"#).expect("valid");
        assert_eq!((r.prompt.as_str(), r.generation.max_tokens), ("Once upon", Some(8)));
        assert!(refused(parse_completion(br#"{"model":"m","prompt":["a","b"]}"#)).message.contains("one prompt"));
        assert!(refused(parse_completion(br#"{"model":"m","prompt":[1,2,3]}"#)).message.contains("token-id"));
        assert_eq!(
            refused(parse_completion(br#"{"model":"m","prompt":"x","echo":true}"#)).param.as_deref(),
            Some("echo")
        );
    }
}
