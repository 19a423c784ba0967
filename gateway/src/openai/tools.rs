//! Tools: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` read and checked, the grammar
//! that forces a call when one is required, and calls read back out of the generated text.
//!
//! Calls travel in the Hermes convention (the backend renders tools in it for templates that do
//! not know tools; Qwen2.5, Hermes and many fine-tunes write it themselves): each call is
//! `{"name": …, "arguments": {…}}` between `<tool_call>` and `</tool_call>` tags.
//!
//! - `auto` (the default with tools): the model decides; whatever it writes in that form comes
//!   back as `tool_calls`, the rest as `content`.
//! - `required` / a named function: decoding is constrained to one call (several when
//!   `parallel_tool_calls` allows) of the offered functions (of that one), its arguments to the
//!   function's JSON schema.
//! - `none`: the tools are not shown to the model, and nothing is read as a call.

use crate::error::Error;
use crate::upstream::{Constraint, Grammar};
use serde_json::{Map, Value, json};

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;
/// Largest tool definitions, in bytes as JSON (the grammar forcing a call holds them all).
pub const MAX_TOOLS_BYTES: usize = super::structured::MAX_GRAMMAR_BYTES;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// A function a request offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    /// The JSON schema of its arguments (an object schema with no properties when absent).
    pub parameters: Value,
    /// The definition as the client sent it, for the chat template.
    pub definition: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

/// What a chat request asks of tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// The model may make several calls in one answer.
    pub parallel: bool,
}

fn bad(param: &str, message: String) -> Error {
    Error::invalid(message, Some(param))
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls` (absent or null: not given).
pub fn parse(tools: Option<Value>, choice: Option<Value>, parallel: Option<Value>) -> Result<Option<Tools>, Error> {
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(bad("parallel_tool_calls", format!("parallel_tool_calls must be true or false, got {other}")));
        }
    };
    let functions = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => functions(items)?,
        Some(other) => return Err(bad("tools", format!("tools must be a list of tools, got {other}"))),
    };
    let choice = match choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice must be none, auto, required or a function, got {other:?}"),
                ));
            }
        }),
        Some(Value::Object(o)) => {
            let name = match (o.get("type").and_then(Value::as_str), o.get("function")) {
                (Some("function"), Some(Value::Object(f))) => f.get("name").and_then(Value::as_str),
                _ => None,
            };
            match name {
                Some(name) if functions.iter().any(|f| f.name == name) => Some(ToolChoice::Function(name.into())),
                Some(name) => {
                    return Err(bad("tool_choice", format!("tool_choice names {name:?}, which is not in tools")));
                }
                None => {
                    return Err(bad(
                        "tool_choice",
                        "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                    ));
                }
            }
        }
        Some(other) => {
            return Err(bad("tool_choice", format!("tool_choice must be a string or an object, got {other}")));
        }
    };
    if functions.is_empty() {
        return match choice {
            None | Some(ToolChoice::None) | Some(ToolChoice::Auto) => Ok(None),
            Some(_) => Err(bad("tool_choice", "tool_choice requires a call, but no tools are given".into())),
        };
    }
    Ok(Some(Tools { functions, choice: choice.unwrap_or(ToolChoice::Auto), parallel }))
}

fn functions(items: Vec<Value>) -> Result<Vec<Function>, Error> {
    if items.len() > MAX_TOOLS {
        return Err(bad("tools", format!("tools has {} tools; the most is {MAX_TOOLS}", items.len())));
    }
    let size: usize = items.iter().map(|i| i.to_string().len()).sum();
    if size > MAX_TOOLS_BYTES {
        return Err(bad("tools", format!("tools is {size} bytes; the most is {MAX_TOOLS_BYTES}")));
    }
    let mut out: Vec<Function> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |what: &str| format!("tools[{i}]{what}");
        let Value::Object(mut tool) = item else {
            return Err(bad("tools", format!("{} must be an object", at(""))));
        };
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad("tools", format!("{}.type must be \"function\"", at(""))));
        }
        let Some(Value::Object(mut function)) = tool.remove("function") else {
            return Err(bad("tools", format!("{}.function must be an object", at(""))));
        };
        let name = match function.get("name").and_then(Value::as_str) {
            Some(name) if super::structured::valid_name(name) => name.to_string(),
            Some(_) => {
                return Err(bad(
                    "tools",
                    format!("{}.function.name must be 1 to 64 letters, digits, underscores or dashes", at("")),
                ));
            }
            None => return Err(bad("tools", format!("{}.function has no name", at("")))),
        };
        if out.iter().any(|f| f.name == name) {
            return Err(bad("tools", format!("two tools are named {name:?}")));
        }
        if let Some(k) =
            function.keys().find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
        {
            return Err(bad("tools", format!("{}.function has an unknown field `{k}`", at(""))));
        }
        if function.get("description").is_some_and(|d| !(d.is_string() || d.is_null())) {
            return Err(bad("tools", format!("{}.function.description must be a string", at(""))));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(other) => {
                return Err(bad("tools", format!("{}.function.parameters must be a JSON schema, got {other}", at(""))));
            }
        };
        function.insert("parameters".into(), parameters.clone());
        let definition = json!({"type": "function", "function": Value::Object(function)});
        out.push(Function { name, parameters, definition });
    }
    Ok(out)
}

impl Tools {
    /// The tool definitions for the chat template, as a JSON array (empty when the model is not
    /// to see them).
    pub fn for_template(&self) -> String {
        match self.choice {
            ToolChoice::None => String::new(),
            _ => Value::Array(self.functions.iter().map(|f| f.definition.clone()).collect()).to_string(),
        }
    }

    /// Whether calls are read out of the answer.
    pub fn reads_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces a call, when one is required: one call block (or several, one
    /// per line, when parallel calls are allowed and no one function is named) of the allowed
    /// functions, each with arguments to its schema.
    pub fn constraint(&self) -> Option<Constraint> {
        let allowed: Vec<&Function> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.functions.iter().collect(),
            ToolChoice::Function(name) => self.functions.iter().filter(|f| &f.name == name).collect(),
        };
        let literal = |s: &str| Value::String(s.to_string()).to_string();
        let mut lark = String::new();
        let several = self.parallel && self.choice == ToolChoice::Required;
        lark.push_str(if several { "start: call (\"\\n\" call)*\n" } else { "start: call\n" });
        let bodies: Vec<String> = (0..allowed.len()).map(|i| format!("f{i}")).collect();
        lark.push_str(&format!(
            "call: {} ({}) {}\n",
            literal(&format!("{OPEN}\n")),
            bodies.join(" | "),
            literal(&format!("\n{CLOSE}"))
        ));
        for (i, f) in allowed.iter().enumerate() {
            let head = format!("{{\"name\": {}, \"arguments\": ", Value::String(f.name.clone()));
            let mut schema = f.parameters.clone();
            if let Value::Object(o) = &mut schema {
                // Arguments on one line, as the calls in the prompt's examples are written.
                o.entry("x-guidance").or_insert_with(
                    || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                );
            }
            lark.push_str(&format!("f{i}: {} a{i} \"}}\"\n", literal(&head)));
            lark.push_str(&format!("a{i}: %json {schema}\n"));
        }
        Some(Constraint { grammar: Grammar::Lark(lark), from: "tools" })
    }
}

/// A call read out of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// What the reader gives back, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Text(String),
    Call(Call),
}

/// Reads calls out of text as it streams in: text outside call blocks passes through (less
/// what could be the start of a block, held until it is known), each complete block that holds
/// a call becomes one; a block that does not stays text.
#[derive(Debug, Default)]
pub struct CallReader {
    held: String,
    inside: bool,
    calls: usize,
}

impl CallReader {
    pub fn push(&mut self, text: &str) -> Vec<Read> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.inside {
                let Some(end) = self.held.find(CLOSE) else { break };
                let body: String = self.held.drain(..end + CLOSE.len()).collect();
                let body = &body[..end];
                self.inside = false;
                match parse_call(body) {
                    Some((name, arguments)) => {
                        self.calls += 1;
                        out.push(Read::Call(Call { id: call_id(), name, arguments }));
                    }
                    None => out.push(Read::Text(format!("{OPEN}{body}{CLOSE}"))),
                }
            } else if let Some(start) = self.held.find(OPEN) {
                let before: String = self.held.drain(..start + OPEN.len()).collect();
                self.text(&before[..start], &mut out);
                self.inside = true;
            } else {
                // Keep what could be the start of an opening tag.
                let keep = (1..OPEN.len())
                    .rev()
                    .find(|&n| {
                        self.held.len() >= n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && OPEN.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let ready: String = self.held.drain(..self.held.len() - keep).collect();
                self.text(&ready, &mut out);
                break;
            }
        }
        out
    }

    /// The end of the answer: what is still held (an unfinished block) is text.
    pub fn finish(&mut self) -> Vec<Read> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        let rest = if std::mem::take(&mut self.inside) { format!("{OPEN}{held}") } else { held };
        self.text(&rest, &mut out);
        out
    }

    /// Calls read so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    fn text(&self, text: &str, out: &mut Vec<Read>) {
        // Line breaks around calls are the format's, not content.
        let between_calls = self.calls > 0 && text.trim().is_empty();
        if !text.is_empty() && !between_calls {
            out.push(Read::Text(text.to_string()));
        }
    }
}

/// `{"name": …, "arguments": {…}}` (arguments may also come as JSON text).
fn parse_call(body: &str) -> Option<(String, String)> {
    let mut call: Map<String, Value> = serde_json::from_str(body.trim()).ok()?;
    let name = call.remove("name")?.as_str()?.to_string();
    let arguments = match call.remove("arguments").or_else(|| call.remove("parameters")) {
        None => "{}".to_string(),
        Some(Value::String(text)) => text,
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => return None,
    };
    Some((name, arguments))
}

/// An id in OpenAI's style: `call_` and 24 letters and digits.
fn call_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const BASE: u64 = ALPHABET.len() as u64;
    // Eight characters from each random word (62^8 < 2^64).
    let mut words = [crate::random_u64(), crate::random_u64(), crate::random_u64()];
    let tail: String = (0..24)
        .map(|i| {
            let word = &mut words[i / 8];
            let c = ALPHABET[(*word % BASE) as usize] as char;
            *word /= BASE;
            c
        })
        .collect();
    format!("call_{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tools_and_tool_choice_read_as_openai_sends_them() {
        let t = parse(Some(json!([weather()])), None, None).expect("parses").expect("tools");
        assert_eq!(
            (t.choice.clone(), t.parallel, t.functions[0].name.as_str()),
            (ToolChoice::Auto, true, "get_weather")
        );
        assert!(t.for_template().contains("\"get_weather\""));
        assert!(t.constraint().is_none(), "auto does not constrain");
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = parse(Some(json!([weather()])), Some(named), Some(json!(false))).expect("parses").expect("tools");
        assert_eq!(t.choice, ToolChoice::Function("get_weather".into()));
        let c = t.constraint().expect("a named function is forced");
        let Grammar::Lark(lark) = &c.grammar else { panic!("a Lark grammar") };
        assert!(lark.starts_with("start: call\n") && lark.contains("a0: %json {"), "{lark}");
        assert!(lark.contains(r#"f0: "{\"name\": \"get_weather\", \"arguments\": " a0 "}""#), "{lark}");
        let t = parse(Some(json!([weather()])), Some(json!("none")), None).expect("parses").expect("tools");
        assert_eq!((t.for_template(), t.reads_calls()), (String::new(), false));
        let t = parse(Some(json!([weather()])), Some(json!("required")), None).expect("parses").expect("tools");
        let Grammar::Lark(lark) = t.constraint().expect("required is forced").grammar else { panic!() };
        assert!(lark.starts_with("start: call (\"\\n\" call)*"), "parallel calls allowed: {lark}");
        assert_eq!(parse(None, Some(json!("auto")), None).expect("no tools"), None);
    }

    #[test]
    fn bad_tools_are_refused_naming_the_parameter() {
        let cases = [
            (json!([{"type": "function", "function": {"description": "x"}}]), None, "tools", "has no name"),
            (json!([{"type": "function", "function": {"name": "a b"}}]), None, "tools", "must be 1 to 64"),
            (json!([{"type": "retrieval"}]), None, "tools", "must be \"function\""),
            (json!([weather(), weather()]), None, "tools", "two tools are named"),
            (json!([{"type": "function", "function": {"name": "f", "parameters": [1]}}]), None, "tools", "JSON schema"),
            (json!({"a": 1}), None, "tools", "a list of tools"),
            (json!([weather()]), Some(json!("always")), "tool_choice", "none, auto, required"),
            (
                json!([weather()]),
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice",
                "not in tools",
            ),
            (json!([]), Some(json!("required")), "tool_choice", "no tools are given"),
        ];
        for (tools, choice, param, says) in cases {
            let e = parse(Some(tools.clone()), choice, None).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{tools}");
            assert!(e.message.contains(says), "{tools}: {}", e.message);
        }
        let e = parse(None, None, Some(json!("yes"))).expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("parallel_tool_calls"));
    }

    #[test]
    fn calls_are_read_out_of_text_however_it_is_split() {
        let answer = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        for split in [1, 2, 3, 5, 7, answer.len()] {
            let mut reader = CallReader::default();
            let mut read = Vec::new();
            let bytes: Vec<char> = answer.chars().collect();
            for piece in bytes.chunks(split) {
                read.extend(reader.push(&piece.iter().collect::<String>()));
            }
            read.extend(reader.finish());
            let text: String =
                read.iter().filter_map(|r| if let Read::Text(t) = r { Some(t.as_str()) } else { None }).collect();
            let calls: Vec<(&str, &str)> = read
                .iter()
                .filter_map(
                    |r| if let Read::Call(c) = r { Some((c.name.as_str(), c.arguments.as_str())) } else { None },
                )
                .collect();
            assert_eq!(text, "Let me check.\n", "split {split}");
            assert_eq!(calls, vec![("get_weather", r#"{"city":"Oslo"}"#), ("get_time", "{}")], "split {split}");
            assert_eq!(reader.calls(), 2);
        }
        // Not a call: a block that is not JSON, and one never closed, stay text.
        let mut reader = CallReader::default();
        let mut read = reader.push("a <tool_call>oops</tool_call> b <tool_c");
        read.extend(reader.finish());
        let text: String = read.iter().map(|r| if let Read::Text(t) = r { t.clone() } else { String::new() }).collect();
        assert_eq!(text, "a <tool_call>oops</tool_call> b <tool_c");
        let mut reader = CallReader::default();
        let mut read = reader.push("<tool_call>{\"name\": \"f\"");
        read.extend(reader.finish());
        assert_eq!(read, vec![Read::Text("<tool_call>{\"name\": \"f\"".into())]);
    }
}
