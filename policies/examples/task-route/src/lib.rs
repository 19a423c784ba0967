//! `task-route`: each request goes to the adapter trained for what it asks of the model —
//! structured output, tool calls, or free text.
//!
//! ```json
//! {"json": "acme/extract", "tools": "acme/agent"}
//! ```
//! A request whose answer is constrained to JSON (a JSON schema, or JSON mode) goes to the
//! `json` adapter; one that offers tools to call (or requires a call) goes to the `tools`
//! adapter; any other to what its `model` names (the base model's name: the base model). A
//! kind the configuration leaves out goes where `model` says too.

use serde::Deserialize;
use switchyard_policy::{ConstraintKind, Decision, Policy, Request, config, features, route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    json: Option<String>,
    #[serde(default)]
    tools: Option<String>,
}

struct TaskRoute;

impl Policy for TaskRoute {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Config = config()?;
        let asked = features();
        let json = matches!(asked.constraint, Some(ConstraintKind::JsonSchema | ConstraintKind::JsonObject));
        let tools = asked.tools > 0 || matches!(asked.constraint, Some(ConstraintKind::ToolCall));
        let chosen = match (tools, json) {
            (true, _) => cfg.tools.as_deref(),
            (false, true) => cfg.json.as_deref(),
            (false, false) => None,
        };
        let named = (req.model != req.base_model).then_some(req.model.as_str());
        Ok(route(chosen.or(named)))
    }
}

switchyard_policy::export_policy!(TaskRoute);
