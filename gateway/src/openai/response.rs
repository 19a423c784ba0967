//! Response bodies in OpenAI's shape, serialized straight from borrowed fields: a chat
//! completion, a text completion, and their streamed chunks.

use serde::Serialize;

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

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// What a chunk carries.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    /// A chat stream's first chunk: the assistant's role.
    Role,
    /// New text.
    Text(&'a str),
    /// Why the generation ended, with no text.
    Finish(&'static str),
    /// `stream_options.include_usage`: the usage, with no choices.
    Usage(Usage),
}

fn json(body: &impl Serialize) -> String {
    // The bodies hold strings, numbers and unit values only; serializing them cannot fail.
    serde_json::to_string(body).unwrap_or_else(|_| String::from("{}"))
}

impl Head {
    /// The whole answer of a request that was not streamed.
    pub fn complete(&self, text: &str, finish_reason: Option<&'static str>, usage: Usage) -> String {
        let choices = match self.api {
            Api::Chat => {
                let message = Message { role: "assistant", content: text, refusal: None };
                Choices::Message([ChatChoice { index: 0, message, logprobs: None, finish_reason }])
            }
            Api::Completion => Choices::Text([TextChoice { index: 0, text, logprobs: None, finish_reason }]),
        };
        json(&self.body(false, choices, Some(usage)))
    }

    fn body<'a>(&'a self, chunk: bool, choices: Choices<'a>, usage: Option<Usage>) -> Body<'a> {
        Body { id: &self.id, object: self.api.object(chunk), created: self.created, model: &self.model, choices, usage }
    }

    /// One streamed chunk.
    pub fn chunk(&self, chunk: Chunk<'_>) -> String {
        let (text, finish_reason) = match chunk {
            Chunk::Usage(usage) => return json(&self.body(true, Choices::None([]), Some(usage))),
            Chunk::Role => (None, None),
            Chunk::Text(t) => (Some(t), None),
            Chunk::Finish(reason) => (None, Some(reason)),
        };
        let choices = match self.api {
            Api::Chat => {
                let role = matches!(chunk, Chunk::Role).then_some("assistant");
                let content = if role.is_some() { Some("") } else { text };
                Choices::Delta([ChunkChoice {
                    index: 0,
                    delta: Delta { role, content },
                    logprobs: None,
                    finish_reason,
                }])
            }
            Api::Completion => {
                Choices::Text([TextChoice { index: 0, text: text.unwrap_or(""), logprobs: None, finish_reason }])
            }
        };
        json(&self.body(true, choices, None))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Choices<'a> {
    None([(); 0]),
    Message([ChatChoice<'a>; 1]),
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

    #[test]
    fn bodies_have_openai_shapes() {
        let chat = parse(&head(Api::Chat).complete("Hi", Some("stop"), Usage::new(3, 1, 0)));
        assert_eq!(
            chat,
            json!({"id": "chatcmpl-7", "object": "chat.completion", "created": 5, "model": "acme/support",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": null},
                    "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                    "prompt_tokens_details": {"cached_tokens": 0}}})
        );
        let text = parse(&head(Api::Completion).complete("Hi", Some("length"), Usage::new(3, 1, 0)));
        assert_eq!(text["choices"], json!([{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": "length"}]));
        assert_eq!((text["object"].as_str(), text["id"].as_str()), (Some("text_completion"), Some("cmpl-7")));
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let h = head(Api::Chat);
        let choice = |c| parse(&h.chunk(c))["choices"][0].clone();
        assert_eq!(choice(Chunk::Role)["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(choice(Chunk::Text("lo"))["delta"], json!({"content": "lo"}));
        let finish = choice(Chunk::Finish("stop"));
        assert_eq!((finish["delta"].clone(), finish["finish_reason"].clone()), (json!({}), json!("stop")));
        let usage = parse(&h.chunk(Chunk::Usage(Usage::new(2, 2, 1))));
        assert_eq!((usage["choices"].clone(), usage["usage"]["total_tokens"].clone()), (json!([]), json!(4)));
        assert_eq!(usage["usage"]["prompt_tokens_details"], json!({"cached_tokens": 1}));
        assert_eq!(parse(&h.chunk(Chunk::Text("x")))["usage"], Value::Null);
        let text = parse(&head(Api::Completion).chunk(Chunk::Text("lo")));
        assert_eq!(text["choices"][0], json!({"index": 0, "text": "lo", "logprobs": null, "finish_reason": null}));
    }
}
