//! Structured outputs: OpenAI's `response_format` and vLLM's `structured_outputs`, read into the
//! grammar the backend constrains decoding with. The backend compiles it (and refuses what it
//! cannot compile, which the client hears as a 400 naming the field); here the shapes and sizes
//! are checked.

use crate::error::Error;
use crate::upstream::{Constraint, Grammar};
use serde_json::{Map, Value};

/// Longest schema, regular expression or grammar a request may give, in bytes once written as
/// JSON text (the backend's limit).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// Most alternatives of a `choice`.
pub const MAX_CHOICES: usize = 256;

const RESPONSE_FORMAT: &str = "response_format";
const STRUCTURED_OUTPUTS: &str = "structured_outputs";

fn bad(param: &str, message: String) -> Error {
    Error::invalid(message, Some(param))
}

/// Refuses keys of `object` (`what`, within `param`) outside `known`, naming the first.
fn only(object: &Map<String, Value>, known: &[&str], what: &str, param: &str) -> Result<(), Error> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(param, format!("{what} has an unknown field `{k}` (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

fn within(text: String, what: &str, param: &str) -> Result<String, Error> {
    match text.len() <= MAX_GRAMMAR_BYTES {
        true => Ok(text),
        false => Err(bad(param, format!("{what} is {} bytes; the most is {MAX_GRAMMAR_BYTES}", text.len()))),
    }
}

/// A JSON schema as the backend takes it: an object or a boolean, within the size limit.
fn schema(value: Value, what: &str, param: &str) -> Result<Grammar, Error> {
    if !(value.is_object() || value.is_boolean()) {
        return Err(bad(param, format!("{what} must be a JSON schema (an object), got {value}")));
    }
    Ok(Grammar::JsonSchema(within(value.to_string(), what, param)?))
}

/// OpenAI's `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
/// or `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
/// The schema is enforced whether `strict` is true or not: decoding cannot leave it.
pub fn response_format(value: Value) -> Result<Option<Constraint>, Error> {
    let p = RESPONSE_FORMAT;
    let Value::Object(mut format) = value else {
        return Err(bad(p, format!("{p} must be an object with a `type`, got {value}")));
    };
    let kind = format.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let grammar = match kind.as_str() {
        "text" => {
            only(&format, &["type"], p, p)?;
            return Ok(None);
        }
        "json_object" => {
            only(&format, &["type"], p, p)?;
            Grammar::JsonObject
        }
        "json_schema" => {
            only(&format, &["type", "json_schema"], p, p)?;
            let Some(Value::Object(mut spec)) = format.remove("json_schema") else {
                return Err(bad(p, format!("{p} of type json_schema needs a `json_schema` object")));
            };
            only(&spec, &["name", "schema", "strict", "description"], "response_format.json_schema", p)?;
            match spec.get("name").and_then(Value::as_str) {
                Some(name) if valid_name(name) => {}
                _ => {
                    return Err(bad(
                        p,
                        format!("{p}.json_schema.name must be 1 to 64 letters, digits, underscores or dashes"),
                    ));
                }
            }
            if spec.get("strict").is_some_and(|s| !(s.is_boolean() || s.is_null())) {
                return Err(bad(p, format!("{p}.json_schema.strict must be true or false")));
            }
            match spec.remove("schema") {
                // No schema: any JSON object, as OpenAI reads it.
                None | Some(Value::Null) => Grammar::JsonObject,
                Some(s) => schema(s, "response_format.json_schema.schema", p)?,
            }
        }
        other => {
            return Err(bad(p, format!("{p}.type must be text, json_object or json_schema, got {other:?}")));
        }
    };
    Ok(Some(Constraint { grammar, from: RESPONSE_FORMAT }))
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema), `json_object`, `regex`,
/// `choice` (a list of strings) and `grammar` (llguidance's Lark dialect).
pub fn structured_outputs(value: Value) -> Result<Option<Constraint>, Error> {
    let p = STRUCTURED_OUTPUTS;
    let Value::Object(spec) = value else {
        return Err(bad(p, format!("{p} must be an object, got {value}")));
    };
    let set: Vec<(String, Value)> =
        spec.into_iter().filter(|(_, v)| !v.is_null() && *v != Value::Bool(false)).collect();
    let [(key, value)] = <[(String, Value); 1]>::try_from(set).map_err(|set| {
        let names: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
        bad(p, format!("{p} takes exactly one of json, json_object, regex, choice, grammar; got {names:?}"))
    })?;
    let text = |v: Value, what: &str| match v {
        Value::String(s) if !s.is_empty() => within(s, what, p),
        other => Err(bad(p, format!("{what} must be a non-empty string, got {other}"))),
    };
    let grammar = match key.as_str() {
        "json" => match value {
            // vLLM takes the schema as an object or as its JSON text.
            Value::String(s) => {
                schema(serde_json::from_str(&s).map_err(|e| bad(p, format!("{p}.json is not JSON: {e}")))?, "json", p)?
            }
            v => schema(v, "structured_outputs.json", p)?,
        },
        "json_object" => Grammar::JsonObject,
        "regex" => Grammar::Regex(text(value, "structured_outputs.regex")?),
        "grammar" => Grammar::Lark(text(value, "structured_outputs.grammar")?),
        "choice" => {
            let choices: Vec<String> = match value {
                Value::Array(items) if !items.is_empty() && items.len() <= MAX_CHOICES => items
                    .into_iter()
                    .map(|i| match i {
                        Value::String(s) if !s.is_empty() => Ok(s),
                        other => Err(bad(p, format!("{p}.choice holds non-empty strings, got {other}"))),
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(bad(p, format!("{p}.choice must list 1 to {MAX_CHOICES} strings"))),
            };
            let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
            Grammar::Regex(within(format!("({})", alternatives.join("|")), "structured_outputs.choice", p)?)
        }
        other => return Err(bad(p, format!("{p} has an unknown field `{other}`"))),
    };
    Ok(Some(Constraint { grammar, from: STRUCTURED_OUTPUTS }))
}

/// OpenAI's rule for schema and function names.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(r: Result<Option<Constraint>, Error>) -> Error {
        r.expect_err("refused")
    }

    #[test]
    fn response_formats_read_as_openai_sends_them() {
        assert_eq!(response_format(json!({"type": "text"})).expect("text"), None);
        let object = response_format(json!({"type": "json_object"})).expect("json_object").expect("constrained");
        assert_eq!((object.grammar, object.from), (Grammar::JsonObject, "response_format"));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
        let format = json!({"type": "json_schema", "json_schema": {"name": "A_1", "schema": schema, "strict": true}});
        let c = response_format(format).expect("json_schema").expect("constrained");
        assert_eq!(c.grammar, Grammar::JsonSchema(schema.to_string()));
        let no_schema = json!({"type": "json_schema", "json_schema": {"name": "any"}});
        assert_eq!(response_format(no_schema).expect("ok").expect("constrained").grammar, Grammar::JsonObject);
    }

    #[test]
    fn bad_response_formats_are_refused_naming_the_parameter() {
        let cases = [
            (json!("json"), "must be an object"),
            (json!({"type": "yaml"}), "json_object or json_schema"),
            (json!({"type": "json_schema"}), "needs a `json_schema` object"),
            (json!({"type": "json_schema", "json_schema": {"schema": {}}}), "name must be 1 to 64"),
            (json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}), "name must be"),
            (json!({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}), "must be a JSON schema"),
            (json!({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}), "strict must be"),
            (json!({"type": "json_schema", "json_schema": {"name": "a", "extra": 1}}), "unknown field `extra`"),
            (json!({"type": "json_object", "schema": {}}), "unknown field `schema`"),
        ];
        for (format, says) in cases {
            let e = refused(response_format(format.clone()));
            assert_eq!(e.param.as_deref(), Some("response_format"), "{format}");
            assert!(e.message.contains(says), "{format}: {}", e.message);
        }
        let huge = json!({"type": "object", "description": "x".repeat(MAX_GRAMMAR_BYTES)});
        let e = refused(response_format(json!({"type": "json_schema", "json_schema": {"name": "a", "schema": huge}})));
        assert!(e.message.contains("the most is 65536"), "{}", e.message);
    }

    #[test]
    fn vllm_structured_outputs_take_one_kind_of_constraint() {
        let read = |v: Value| structured_outputs(v).expect("read").expect("constrained").grammar;
        assert_eq!(read(json!({"regex": "[0-9]+"})), Grammar::Regex("[0-9]+".into()));
        assert_eq!(read(json!({"choice": ["yes", "no (.)"]})), Grammar::Regex(r"(yes|no \(\.\))".into()));
        assert_eq!(read(json!({"grammar": "start: \"a\""})), Grammar::Lark("start: \"a\"".into()));
        assert_eq!(read(json!({"json": "{\"type\":\"object\"}"})), Grammar::JsonSchema("{\"type\":\"object\"}".into()));
        assert_eq!(read(json!({"json_object": true, "regex": null})), Grammar::JsonObject);
        for bad in [json!({}), json!({"regex": "a", "choice": ["b"]}), json!({"choice": []}), json!({"choice": [1]})] {
            assert_eq!(refused(structured_outputs(bad.clone())).param.as_deref(), Some("structured_outputs"), "{bad}");
        }
    }
}
