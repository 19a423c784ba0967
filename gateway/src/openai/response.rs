//! Response bodies in OpenAI's shape, serialized straight from borrowed fields: a chat
//! completion, a text completion, and their streamed chunks.

use super::tools::Call;
use crate::upstream::TokenLogprobs;
use serde::Serialize;
use serde::ser::SerializeMap;

/// Which API a body answers: the object names and id prefix differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
}

impl Api {
    /// The prefix of response ids.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Api::Chat => "chatcmpl-",
            Api::Completion => "cmpl-",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
        }
    }
}

/// `usage`: tokens in, tokens out, their sum, and the prompt tokens served from the prefix
/// cache.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32, cached_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// What every body and chunk of one response shares.
#[derive(Debug, Clone)]
pub struct Head {
    pub api: Api,
    /// The full id (`chatcmpl-…` or `cmpl-…`).
    pub id: String,
    pub created: u64,
    /// `model` as the client sent it.
    pub model: String,
}

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Choices<'a>,
    usage: Option<Usage>,
}

/// The log-probabilities a body or chunk carries: of `tokens`, the first of which starts
/// `offset` characters into the completion (completions' `text_offset`).
#[derive(Debug, Clone, Copy)]
pub struct Logprobs<'a> {
    pub tokens: &'a [TokenLogprobs],
    pub offset: usize,
}

/// A token as OpenAI names it: its text (a part of a UTF-8 character shows as U+FFFD; `bytes`
/// has it exactly).
fn token_text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// Chat's `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
struct ChatLogprobs<'a>(&'a [TokenLogprobs]);

#[derive(Serialize)]
struct ChatToken<'a> {
    token: std::borrow::Cow<'a, str>,
    logprob: f32,
    bytes: &'a [u8],
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<Vec<ChatToken<'a>>>,
}

impl<'a> Serialize for ChatLogprobs<'a> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entry = |t: &'a crate::upstream::TokenLogprob, top: Option<Vec<ChatToken<'a>>>| ChatToken {
            token: token_text(&t.bytes),
            logprob: t.logprob,
            bytes: &t.bytes,
            top_logprobs: top,
        };
        let content: Vec<ChatToken<'a>> =
            self.0.iter().map(|l| entry(&l.token, Some(l.top.iter().map(|t| entry(t, None)).collect()))).collect();
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("content", &content)?;
        map.serialize_entry("refusal", &None::<()>)?;
        map.end()
    }
}

/// Completions' `logprobs`: `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
/// text_offset}`.
struct TextLogprobs<'a>(Logprobs<'a>);

/// One position's alternatives as a JSON object, most likely first (two tokens with the same
/// text keep the likelier).
struct TopMap<'a>(&'a [crate::upstream::TokenLogprob]);

impl Serialize for TopMap<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seen = std::collections::HashSet::new();
        let mut map = s.serialize_map(None)?;
        for t in self.0 {
            let text = token_text(&t.bytes);
            if seen.insert(text.clone()) {
                map.serialize_entry(&text, &t.logprob)?;
            }
        }
        map.end()
    }
}

impl Serialize for TextLogprobs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let tokens: Vec<_> = self.0.tokens.iter().map(|l| token_text(&l.token.bytes)).collect();
        let mut offset = self.0.offset;
        let offsets: Vec<usize> = tokens
            .iter()
            .map(|t| {
                let at = offset;
                offset += t.chars().count();
                at
            })
            .collect();
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("tokens", &tokens)?;
        map.serialize_entry("token_logprobs", &self.0.tokens.iter().map(|l| l.token.logprob).collect::<Vec<_>>())?;
        // An echoed prompt's first token follows nothing: no log-probability (NaN, written as
        // null) and no alternatives.
        let top: Vec<Option<TopMap<'_>>> =
            self.0.tokens.iter().map(|l| (!l.token.logprob.is_nan()).then_some(TopMap(&l.top))).collect();
        map.serialize_entry("top_logprobs", &top)?;
        map.serialize_entry("text_offset", &offsets)?;
        map.end()
    }
}

/// Where each of a completion's tokens starts, continuing from `offset` (a stream's chunks
/// count on from the last).
pub fn text_end(l: Logprobs<'_>) -> usize {
    l.offset + l.tokens.iter().map(|t| token_text(&t.token.bytes).chars().count()).sum::<usize>()
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<ChatLogprobs<'a>>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    /// Null when the answer is only tool calls.
    content: Option<&'a str>,
    refusal: Option<()>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: Vec<ToolCallOut<'a>>,
}

/// A tool call in a message, or (with its `index`) in a chunk's delta.
#[derive(Serialize)]
struct ToolCallOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    name: &'a str,
    arguments: &'a str,
}

impl<'a> ToolCallOut<'a> {
    fn new(index: Option<usize>, call: &'a Call) -> ToolCallOut<'a> {
        ToolCallOut {
            index,
            id: &call.id,
            kind: "function",
            function: FunctionOut { name: &call.name, arguments: &call.arguments },
        }
    }
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<TextLogprobs<'a>>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<ChatLogprobs<'a>>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: Vec<ToolCallOut<'a>>,
}

/// What a chunk carries.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    /// A chat stream's first chunk: the assistant's role.
    Role,
    /// New text, with its tokens' log-probabilities when asked for.
    Text(&'a str, Option<Logprobs<'a>>),
    /// Why the generation ended, with no text (and the last tokens' log-probabilities, when
    /// asked for and they came without text).
    Finish(&'static str, Option<Logprobs<'a>>),
    /// A whole tool call (the `index`-th of the answer), with the log-probabilities of the
    /// tokens that wrote it when asked for.
    ToolCall(usize, &'a Call, Option<Logprobs<'a>>),
    /// `stream_options.include_usage`: the usage, with no choices.
    Usage(Usage),
}

fn json(body: &impl Serialize) -> String {
    // The bodies hold strings, numbers, bytes and maps with string keys only; serializing them
    // cannot fail.
    serde_json::to_string(body).unwrap_or_else(|_| String::from("{}"))
}

/// One choice of an answer that was not streamed.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The text, less the tool calls read out of it.
    pub text: &'a str,
    pub calls: &'a [Call],
    pub logprobs: Option<Logprobs<'a>>,
    pub finish_reason: Option<&'static str>,
}

impl Head {
    /// The whole answer of a request that was not streamed: its choices, in order.
    pub fn complete(&self, answers: &[Answer<'_>], usage: Usage) -> String {
        let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        let choices = match self.api {
            Api::Chat => Choices::Messages(
                answers
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let content = (a.calls.is_empty() || !a.text.is_empty()).then_some(a.text);
                        let tool_calls = a.calls.iter().map(|c| ToolCallOut::new(None, c)).collect();
                        let message = Message { role: "assistant", content, refusal: None, tool_calls };
                        let logprobs = a.logprobs.map(|l| ChatLogprobs(l.tokens));
                        ChatChoice { index: index(i), message, logprobs, finish_reason: a.finish_reason }
                    })
                    .collect(),
            ),
            Api::Completion => Choices::Texts(
                answers
                    .iter()
                    .enumerate()
                    .map(|(i, a)| TextChoice {
                        index: index(i),
                        text: a.text,
                        logprobs: a.logprobs.map(TextLogprobs),
                        finish_reason: a.finish_reason,
                    })
                    .collect(),
            ),
        };
        json(&self.body(false, choices, Some(usage)))
    }

    fn body<'a>(&'a self, chunk: bool, choices: Choices<'a>, usage: Option<Usage>) -> Body<'a> {
        Body { id: &self.id, object: self.api.object(chunk), created: self.created, model: &self.model, choices, usage }
    }

    /// One streamed chunk, of choice `index`.
    pub fn chunk(&self, index: u32, chunk: Chunk<'_>) -> String {
        let (text, logprobs, finish_reason) = match chunk {
            Chunk::Usage(usage) => return json(&self.body(true, Choices::None([]), Some(usage))),
            Chunk::Role => (None, None, None),
            Chunk::Text(t, l) => (Some(t), l, None),
            Chunk::Finish(reason, l) => (None, l, Some(reason)),
            Chunk::ToolCall(_, _, l) => (None, l, None),
        };
        let choices = match self.api {
            Api::Chat => {
                let role = matches!(chunk, Chunk::Role).then_some("assistant");
                let content = if role.is_some() { Some("") } else { text };
                let tool_calls = match chunk {
                    Chunk::ToolCall(index, call, _) => vec![ToolCallOut::new(Some(index), call)],
                    _ => Vec::new(),
                };
                Choices::Delta([ChunkChoice {
                    index,
                    delta: Delta { role, content, tool_calls },
                    logprobs: logprobs.map(|l| ChatLogprobs(l.tokens)),
                    finish_reason,
                }])
            }
            Api::Completion => Choices::Text([TextChoice {
                index,
                text: text.unwrap_or(""),
                logprobs: logprobs.map(TextLogprobs),
                finish_reason,
            }]),
        };
        json(&self.body(true, choices, None))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Choices<'a> {
    None([(); 0]),
    Messages(Vec<ChatChoice<'a>>),
    Texts(Vec<TextChoice<'a>>),
    Delta([ChunkChoice<'a>; 1]),
    Text([TextChoice<'a>; 1]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn head(api: Api) -> Head {
        Head { api, id: format!("{}7", api.id_prefix()), created: 5, model: "acme/support".into() }
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).expect("json")
    }

    fn answer<'a>(text: &'a str, logprobs: Option<Logprobs<'a>>, finish_reason: Option<&'static str>) -> Answer<'a> {
        Answer { text, calls: &[], logprobs, finish_reason }
    }

    #[test]
    fn several_choices_are_indexed_in_bodies_and_chunks() {
        let h = head(Api::Chat);
        let body = parse(
            &h.complete(&[answer("a", None, Some("stop")), answer("b", None, Some("length"))], Usage::new(3, 2, 0)),
        );
        let choices = body["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 2);
        assert_eq!((choices[1]["index"].clone(), choices[1]["message"]["content"].clone()), (json!(1), json!("b")));
        assert_eq!(parse(&h.chunk(2, Chunk::Text("x", None)))["choices"][0]["index"], 2);
        let text = parse(
            &head(Api::Completion).complete(&[answer("a", None, None), answer("b", None, None)], Usage::new(1, 2, 0)),
        );
        assert_eq!(text["choices"][1]["text"], "b");
    }

    #[test]
    fn bodies_have_openai_shapes() {
        let chat = parse(&head(Api::Chat).complete(&[answer("Hi", None, Some("stop"))], Usage::new(3, 1, 0)));
        assert_eq!(
            chat,
            json!({"id": "chatcmpl-7", "object": "chat.completion", "created": 5, "model": "acme/support",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": null},
                    "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                    "prompt_tokens_details": {"cached_tokens": 0}}})
        );
        let text = parse(&head(Api::Completion).complete(&[answer("Hi", None, Some("length"))], Usage::new(3, 1, 0)));
        assert_eq!(text["choices"], json!([{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": "length"}]));
        assert_eq!((text["object"].as_str(), text["id"].as_str()), (Some("text_completion"), Some("cmpl-7")));
    }

    #[test]
    fn tool_calls_have_openai_shapes() {
        let call = Call { id: "call_1".into(), name: "get_weather".into(), arguments: r#"{"city":"Oslo"}"#.into() };
        let function = json!({"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"});
        let answer = Answer { calls: std::slice::from_ref(&call), ..answer("", None, Some("tool_calls")) };
        let body = parse(&head(Api::Chat).complete(&[answer], Usage::new(3, 9, 0)));
        assert_eq!(
            body["choices"][0]["message"],
            json!({"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": function}]})
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        let chunk = parse(&head(Api::Chat).chunk(0, Chunk::ToolCall(1, &call, None)));
        assert_eq!(
            chunk["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 1, "id": "call_1", "type": "function", "function": function}]})
        );
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let h = head(Api::Chat);
        let choice = |c| parse(&h.chunk(0, c))["choices"][0].clone();
        assert_eq!(choice(Chunk::Role)["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(choice(Chunk::Text("lo", None))["delta"], json!({"content": "lo"}));
        let finish = choice(Chunk::Finish("stop", None));
        assert_eq!((finish["delta"].clone(), finish["finish_reason"].clone()), (json!({}), json!("stop")));
        let usage = parse(&h.chunk(0, Chunk::Usage(Usage::new(2, 2, 1))));
        assert_eq!((usage["choices"].clone(), usage["usage"]["total_tokens"].clone()), (json!([]), json!(4)));
        assert_eq!(usage["usage"]["prompt_tokens_details"], json!({"cached_tokens": 1}));
        assert_eq!(parse(&h.chunk(0, Chunk::Text("x", None)))["usage"], Value::Null);
        let text = parse(&head(Api::Completion).chunk(0, Chunk::Text("lo", None)));
        assert_eq!(text["choices"][0], json!({"index": 0, "text": "lo", "logprobs": null, "finish_reason": null}));
    }

    fn tokens() -> Vec<TokenLogprobs> {
        use crate::upstream::TokenLogprob;
        let t = |logprob: f32, bytes: &[u8]| TokenLogprob { logprob, bytes: bytes.to_vec() };
        vec![
            TokenLogprobs { token: t(-0.5, b"Hi"), top: vec![t(-0.5, b"Hi"), t(-1.5, b"Yo")] },
            // Half of "é": a token text cannot show it, its bytes do.
            TokenLogprobs { token: t(-0.25, &[0xC3]), top: vec![t(-0.25, &[0xC3]), t(-2.0, &[0xC2])] },
        ]
    }

    #[test]
    fn logprobs_have_openai_shapes() {
        let tokens = tokens();
        let l = Some(Logprobs { tokens: &tokens, offset: 0 });
        let chat = parse(&head(Api::Chat).complete(&[answer("Hi\u{fffd}", l, Some("stop"))], Usage::new(3, 2, 0)));
        assert_eq!(
            chat["choices"][0]["logprobs"],
            json!({"content": [
                {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                    "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                                     {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]},
                {"token": "\u{fffd}", "logprob": -0.25, "bytes": [195],
                    "top_logprobs": [{"token": "\u{fffd}", "logprob": -0.25, "bytes": [195]},
                                     {"token": "\u{fffd}", "logprob": -2.0, "bytes": [194]}]}],
                "refusal": null})
        );
        // Completions count text offsets on from where the stream got to; two alternatives
        // with the same text keep the likelier.
        let l = Some(Logprobs { tokens: &tokens, offset: 7 });
        let text = parse(&head(Api::Completion).chunk(0, Chunk::Text("Hi", l)));
        assert_eq!(
            text["choices"][0]["logprobs"],
            json!({"tokens": ["Hi", "\u{fffd}"], "token_logprobs": [-0.5, -0.25],
                "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {"\u{fffd}": -0.25}], "text_offset": [7, 9]})
        );
        assert_eq!(text_end(Logprobs { tokens: &tokens, offset: 7 }), 10);
        let chunk = parse(&head(Api::Chat).chunk(0, Chunk::Finish("stop", l)));
        assert_eq!(chunk["choices"][0]["logprobs"]["content"].as_array().map(Vec::len), Some(2));
    }
}
