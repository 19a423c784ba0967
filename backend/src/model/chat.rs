//! Chat templates: what a conversation (its messages, the tools it offers, the calls the
//! assistant made and their results) looks like to a model's Jinja template, rendered with
//! `minijinja` as Hugging Face renders it.
//!
//! Templates that know tools (they read `tools`) get them as `transformers` passes them: the
//! tool definitions in OpenAI's shape, and each assistant message's `tool_calls` with their
//! arguments as an object. Templates that know nothing of tools (SmolLM2's, most base
//! fine-tunes') are given tool use in the Hermes convention — the one Qwen2.5, Hermes and many
//! fine-tunes are trained on, and the one the gateway reads calls back in: the definitions in
//! the system message between `<tools>` tags, each call as `{"name": …, "arguments": …}`
//! between `<tool_call>` tags, each result between `<tool_response>` tags.

use serde::Serialize;
use serde_json::{Value, json};

/// One chat message.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The calls an assistant message made.
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// A function call an assistant made.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments, as JSON text (OpenAI's shape).
    pub arguments: String,
}

/// Tags of the Hermes tool-call convention (see the module documentation).
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// The template reads `tools`: it renders tool use itself.
    knows_tools: bool,
}

impl ChatTemplate {
    /// Compiles `source`, so a broken template fails when the model loads.
    pub fn compile(source: String) -> Result<ChatTemplate, minijinja::Error> {
        let knows_tools = source.contains("tools");
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)?;
        Ok(ChatTemplate { env, knows_tools })
    }

    /// The template's `messages` and `tools` for a conversation: JSON, so every string in it
    /// can be treated as data before rendering.
    pub fn context(&self, messages: &[ChatMessage], tools: &[Value]) -> Value {
        let uses_tools = !tools.is_empty() || messages.iter().any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        if self.knows_tools || !uses_tools {
            let messages: Vec<Value> = messages.iter().map(native_message).collect();
            let tools = if tools.is_empty() { Value::Null } else { Value::Array(tools.to_vec()) };
            return json!({"messages": messages, "tools": tools});
        }
        let mut out: Vec<Value> = Vec::with_capacity(messages.len() + 1);
        let mut rest = messages;
        if !tools.is_empty() {
            let definitions = tools.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
            let instructions = format!(
                "You can call these functions; each is described with a JSON schema of its arguments:\n\
                 <tools>\n{definitions}\n</tools>\n\
                 To call a function, answer with a JSON object of its name and arguments between \
                 {TOOL_CALL_OPEN} and {TOOL_CALL_CLOSE} tags, one block per call:\n\
                 {TOOL_CALL_OPEN}\n{{\"name\": \"a_function\", \"arguments\": {{\"an_argument\": \"a value\"}}}}\n\
                 {TOOL_CALL_CLOSE}"
            );
            let system = match messages.first() {
                Some(first) if first.role == "system" => {
                    rest = &messages[1..];
                    format!("{}\n\n{instructions}", first.content)
                }
                _ => instructions,
            };
            out.push(json!({"role": "system", "content": system}));
        }
        for m in rest {
            let content = match m.role.as_str() {
                "assistant" if !m.tool_calls.is_empty() => {
                    let calls: Vec<String> = m
                        .tool_calls
                        .iter()
                        .map(|c| {
                            let call = json!({"name": c.name, "arguments": arguments(&c.arguments)});
                            format!("{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}")
                        })
                        .collect();
                    let calls = calls.join("\n");
                    if m.content.is_empty() { calls } else { format!("{}\n{calls}", m.content) }
                }
                "tool" => format!("<tool_response>\n{}\n</tool_response>", m.content),
                _ => m.content.clone(),
            };
            out.push(json!({"role": m.role, "content": content}));
        }
        json!({"messages": out, "tools": Value::Null})
    }

    /// Renders a [`ChatTemplate::context`].
    pub fn render(
        &self,
        context: &Value,
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(&context["messages"]),
            tools => minijinja::Value::from_serialize(&context["tools"]),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(|e| format!("chat template failed: {e}"))
    }
}

/// A message as `transformers` gives it to a template that knows tools.
fn native_message(m: &ChatMessage) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": arguments(&c.arguments)}})
            })
            .collect();
        v["tool_calls"] = Value::Array(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = Value::String(id.clone());
    }
    v
}

/// A call's arguments as templates take them: the object its JSON text holds (text that is
/// not JSON stays text).
fn arguments(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Every string in `v` (keys included), for checks.
pub fn any_string(v: &Value, found: &mut impl FnMut(&str) -> bool) -> bool {
    match v {
        Value::String(s) => found(s),
        Value::Array(items) => items.iter().any(|i| any_string(i, found)),
        Value::Object(map) => map.iter().any(|(k, v)| found(k) || any_string(v, found)),
        _ => false,
    }
}

/// Replaces every string value in `v` (not keys: templates look fields up by name) with
/// `f` of it.
pub fn map_strings(v: &mut Value, f: &mut impl FnMut(&str) -> String) {
    match v {
        Value::String(s) => *s = f(s),
        Value::Array(items) => items.iter_mut().for_each(|i| map_strings(i, f)),
        Value::Object(map) => map.values_mut().for_each(|v| map_strings(v, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    const WITH_TOOLS: &str = "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: \
        {{ m.content }}{% for c in m.tool_calls %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}\
        {% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}";

    fn conversation() -> (Vec<ChatMessage>, Vec<Value>) {
        let call = ToolCall { id: "call_1".into(), name: "weather".into(), arguments: r#"{"city":"Oslo"}"#.into() };
        let messages = vec![
            ChatMessage { role: "user".into(), content: "Weather in Oslo?".into(), ..Default::default() },
            ChatMessage { role: "assistant".into(), tool_calls: vec![call], ..Default::default() },
            ChatMessage {
                role: "tool".into(),
                content: "-3 C".into(),
                tool_call_id: Some("call_1".into()),
                ..Default::default()
            },
        ];
        let tools =
            vec![json!({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}})];
        (messages, tools)
    }

    #[test]
    fn a_template_that_knows_tools_gets_them_as_transformers_passes_them() {
        let t = ChatTemplate::compile(WITH_TOOLS.into()).expect("compiles");
        let (messages, tools) = conversation();
        let text = t.render(&t.context(&messages, &tools), false, "", "").expect("renders");
        assert!(text.starts_with("TOOLS [{") && text.contains("\"name\":\"weather\""), "{text}");
        assert!(text.contains("assistant: [weather {\"city\":\"Oslo\"}]"), "arguments are an object: {text}");
        assert!(text.contains("tool: -3 C(call_1)"), "{text}");
        // No tools: `tools` is none, and the template's tool branch stays shut.
        let text = t.render(&t.context(&messages[..1], &[]), false, "", "").expect("renders");
        assert_eq!(text, "user: Weather in Oslo?");
    }

    #[test]
    fn a_template_without_tools_is_given_them_in_the_hermes_convention() {
        let t = ChatTemplate::compile(CHATML.into()).expect("compiles");
        let (messages, tools) = conversation();
        let text = t.render(&t.context(&messages, &tools), false, "", "").expect("renders");
        let system = text.split("<|im_end|>").next().expect("a first turn");
        assert!(system.starts_with("<|im_start|>system\nYou can call these functions"), "{text}");
        assert!(system.contains("<tools>\n{\"type\":\"function\",\"function\":{\"name\":\"weather\""), "{text}");
        assert!(
            text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call><|im_end|>"),
            "{text}"
        );
        assert!(text.contains("<|im_start|>tool\n<tool_response>\n-3 C\n</tool_response><|im_end|>"), "{text}");
        // A system message of the caller's comes first, the tools after it.
        let mut with_system = messages.clone();
        with_system.insert(0, ChatMessage { role: "system".into(), content: "Be brief.".into(), ..Default::default() });
        let text = t.render(&t.context(&with_system, &tools), false, "", "").expect("renders");
        assert!(text.starts_with("<|im_start|>system\nBe brief.\n\nYou can call"), "{text}");
        assert_eq!(text.matches("<|im_start|>system").count(), 1);
        // A conversation without tools renders as it always did.
        let plain = t.render(&t.context(&messages[..1], &[]), false, "", "").expect("renders");
        assert_eq!(plain, "<|im_start|>user\nWeather in Oslo?<|im_end|>\n");
    }
}
