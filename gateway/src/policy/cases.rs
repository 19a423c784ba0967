//! Recorded requests and the decisions a policy must make for them: what
//! `switchyard policy test` runs, so policy authors can check a policy in their own CI with
//! the gateway's real host.
//!
//! ```json
//! [
//!   {"name": "acme goes to its adapter",
//!    "request": {"tenant": "acme", "model": "support", "adapters": ["acme/support"]},
//!    "expect": {"route": {"adapter": "acme/support"}}},
//!   {"name": "mallory is refused",
//!    "request": {"tenant": "mallory", "model": "x"},
//!    "expect": {"reject": {"status": 403, "code": "tenant_denied"}}}
//! ]
//! ```

use super::wasm::{CompiledPolicy, PolicyRuntime, WitDecision};
use super::{ConstraintKind, Endpoint, Features, PolicyInput};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// One recorded request and the decision expected for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    pub expect: Expected,
}

/// The request as the policy will see it. The cluster has no backends; `adapters` are the
/// loaded adapters (owned by `tenant`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub tenant: String,
    pub model: String,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub scopes: BTreeSet<String>,
    #[serde(default)]
    pub claims: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `chat` (the default) or `completions`.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default = "base")]
    pub base_model: String,
    #[serde(default)]
    pub adapters: Vec<String>,
    #[serde(default)]
    pub prompt_chars: usize,
    /// What the request asks of the model beyond free text (`host.features`).
    #[serde(default)]
    pub features: Option<CaseFeatures>,
}

/// `host.features` of a case: `{"constraint": "json-schema", "tools": 2, "logprobs": true}`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFeatures {
    #[serde(default)]
    pub constraint: Option<CaseConstraint>,
    #[serde(default)]
    pub tools: u32,
    #[serde(default)]
    pub logprobs: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CaseConstraint {
    JsonSchema,
    JsonObject,
    Regex,
    Grammar,
    ToolCall,
}

impl From<CaseFeatures> for Features {
    fn from(f: CaseFeatures) -> Features {
        let constraint = f.constraint.map(|c| match c {
            CaseConstraint::JsonSchema => ConstraintKind::JsonSchema,
            CaseConstraint::JsonObject => ConstraintKind::JsonObject,
            CaseConstraint::Regex => ConstraintKind::Regex,
            CaseConstraint::Grammar => ConstraintKind::Grammar,
            CaseConstraint::ToolCall => ConstraintKind::ToolCall,
        });
        Features { constraint, tools: f.tools, logprobs: f.logprobs }
    }
}

fn base() -> String {
    "base".into()
}

/// What the policy must answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Expected {
    Route {
        adapter: Option<String>,
        #[serde(default)]
        backend: Option<String>,
    },
    Reject {
        status: u16,
        #[serde(default)]
        code: Option<String>,
    },
    /// The policy fails (an error value, a trap or a limit).
    Error,
}

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// What the policy answered, in words.
    pub got: String,
}

/// Reads a cases file.
pub fn load(path: &std::path::Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs every case against `policy` with `config`.
pub async fn run(
    runtime: &PolicyRuntime,
    policy: &CompiledPolicy,
    config: &str,
    cases: &[Case],
) -> Result<Vec<CaseResult>, String> {
    let config: Arc<str> = Arc::from(config);
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        let r = &case.request;
        let endpoint = match r.endpoint.as_deref() {
            None | Some("chat") => Endpoint::ChatCompletions,
            Some("completions") => Endpoint::Completions,
            Some(other) => return Err(format!("case {:?}: endpoint {other:?} is not chat or completions", case.name)),
        };
        let input = PolicyInput {
            tenant: &r.tenant,
            subject: r.subject.as_deref(),
            scopes: &r.scopes,
            claims: &r.claims,
            endpoint,
            model: &r.model,
            base_model: &r.base_model,
            stream: r.stream,
            max_tokens: r.max_tokens,
            prompt_chars: r.prompt_chars,
            headers: r.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
            backends: Vec::new(),
            adapters: r.adapters.iter().map(|a| (a.clone(), r.tenant.clone())).collect(),
            prefix: None,
            features: r.features.map(Features::from).unwrap_or_default(),
        };
        let request = super::wasm::request(&input);
        let outcome =
            runtime.decide(policy, &request, input.host_view(), config.clone(), Arc::from("policy-test")).await;
        let (passed, got) = match (&outcome, &case.expect) {
            (Ok(WitDecision::Route(route)), Expected::Route { adapter, backend }) => {
                (route.adapter == *adapter && route.backend == *backend, describe(&outcome))
            }
            (Ok(WitDecision::Reject(reject)), Expected::Reject { status, code }) => {
                (reject.status == *status && code.as_ref().is_none_or(|c| *c == reject.code), describe(&outcome))
            }
            (Err(_), Expected::Error) => (true, describe(&outcome)),
            _ => (false, describe(&outcome)),
        };
        results.push(CaseResult { name: case.name.clone(), passed, got });
    }
    Ok(results)
}

fn describe(outcome: &Result<WitDecision, super::wasm::PolicyFault>) -> String {
    match outcome {
        Ok(WitDecision::Route(r)) => format!(
            "route to {}{}",
            r.adapter.as_deref().unwrap_or("the base model"),
            r.backend.as_deref().map(|b| format!(" on {b}")).unwrap_or_default()
        ),
        Ok(WitDecision::Reject(r)) => format!("reject {} {}: {}", r.status, r.code, r.message),
        Err(fault) => format!("error: {fault}"),
    }
}
