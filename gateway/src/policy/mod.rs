//! Routing policy: maps a verified request to an adapter (or the base model) and optionally a
//! backend, or rejects it. The HTTP layer depends only on [`PolicyEngine`]; [`StaticPolicy`]
//! is the built-in implementation over the tenants file, and per-tenant WebAssembly policies
//! implement the same trait.

pub mod breaker;
pub mod cases;
pub mod deploy;
pub mod wasm;

use crate::cluster::BackendView;
use crate::tenants::Tenant;
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Which OpenAI API the request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
}

/// What a policy sees of a request.
#[derive(Debug, Clone)]
pub struct PolicyInput<'a> {
    pub tenant: &'a str,
    pub subject: Option<&'a str>,
    pub scopes: &'a BTreeSet<String>,
    /// Every claim of the caller's verified token.
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
    pub endpoint: Endpoint,
    /// The `model` field as the client sent it.
    pub model: &'a str,
    /// The base model's name, as the backends report it.
    pub base_model: &'a str,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    /// Prompt size in characters (a cheap estimate; tokens are counted by the backend). A
    /// prompt given as token ids counts 4 a token.
    pub prompt_chars: usize,
    /// Request headers the gateway passes to policies (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The routing table as of this request.
    pub backends: Vec<BackendView>,
    /// The desired adapters: (name, owner tenant).
    pub adapters: Vec<(String, String)>,
    /// What the backends cache of this request's prompt, worked out if a policy asks; `None`
    /// where there are no backends to ask (dry runs, test cases).
    pub prefix: Option<Arc<dyn PrefixProbe>>,
    /// What the request asks of the model beyond free text.
    pub features: Features,
}

/// What a request asks of the model beyond free text: structured output, tools,
/// log-probabilities (a policy's `host.features`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    pub constraint: Option<ConstraintKind>,
    /// Functions offered for the model to call (0 when `tool_choice` is `none`).
    pub tools: u32,
    pub logprobs: bool,
}

/// How a request's answer is constrained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstraintKind {
    JsonSchema,
    JsonObject,
    Regex,
    Grammar,
    ToolCall,
}

/// What a decision may ask the host about its request beyond the request record.
#[derive(Debug, Clone, Default)]
pub struct HostView {
    pub prefix: Option<Arc<dyn PrefixProbe>>,
    pub features: Features,
}

impl PolicyInput<'_> {
    pub fn host_view(&self) -> HostView {
        HostView { prefix: self.prefix.clone(), features: self.features }
    }
}

/// The part of a request's prompt each backend holds in its prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixOverlap {
    /// The prompt's length in tokens.
    pub prompt_tokens: usize,
    /// Per healthy backend (address), the leading prompt tokens it caches.
    pub backends: Vec<(String, usize)>,
}

/// Finds out, on demand, what the backends cache of one request's prompt for an adapter
/// (`None`: the base model). An `Err` names what stood in the way.
#[async_trait]
pub trait PrefixProbe: Send + Sync + std::fmt::Debug {
    async fn overlap(&self, adapter: Option<&str>) -> Result<PrefixOverlap, String>;
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The adapter to apply; `None` for the base model.
    pub adapter: Option<String>,
    /// A backend address the request must go to; `None` lets the router choose.
    pub backend: Option<String>,
    /// Scheduling priority on the backend (higher first); 0 leaves the tenant's default. The
    /// tenant's `max_priority` caps it.
    pub priority: u8,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Route(Route),
    /// Refuse the request with this HTTP status (4xx), machine-readable code and message.
    Reject {
        status: u16,
        code: String,
        message: String,
    },
}

/// A policy that could not decide (as opposed to deciding to reject).
#[derive(Debug, Clone, thiserror::Error)]
#[error("routing policy failed: {message}")]
pub struct PolicyError {
    pub message: String,
    /// The failure is the host being full, not the policy misbehaving: worth retrying.
    pub busy: bool,
}

/// Decides where each request goes.
#[async_trait]
pub trait PolicyEngine: Send + Sync + std::fmt::Debug {
    async fn decide(&self, input: &PolicyInput<'_>) -> Result<Decision, PolicyError>;
}

/// The built-in policy: the model name is the base model, an alias from the tenant's
/// `models` table, or an adapter name. It only maps names: whether the tenant may use what it
/// names, and where its requests may go, is decided after every policy by [`crate::authz`].
#[derive(Debug, Clone)]
pub struct StaticPolicy {
    tenants: Arc<BTreeMap<String, Tenant>>,
}

impl StaticPolicy {
    pub fn new(tenants: Arc<BTreeMap<String, Tenant>>) -> StaticPolicy {
        StaticPolicy { tenants }
    }
}

/// Tenants with an active WebAssembly policy get its decision; the others get the fallback
/// (the built-in static policy).
#[derive(Debug)]
pub struct WasmPolicies {
    store: Arc<deploy::PolicyStore>,
    fallback: Arc<dyn PolicyEngine>,
    /// Per deployment (scope and version label).
    breakers: std::sync::Mutex<std::collections::HashMap<Arc<str>, breaker::Breaker>>,
}

impl WasmPolicies {
    pub fn new(store: Arc<deploy::PolicyStore>, fallback: Arc<dyn PolicyEngine>) -> WasmPolicies {
        WasmPolicies { store, fallback, breakers: Default::default() }
    }

    fn breaker<R>(&self, key: &Arc<str>, f: impl FnOnce(&mut breaker::Breaker) -> R) -> R {
        let mut breakers = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(breakers.entry(key.clone()).or_default())
    }

    pub fn store(&self) -> &Arc<deploy::PolicyStore> {
        &self.store
    }
}

#[async_trait]
impl PolicyEngine for WasmPolicies {
    async fn decide(&self, input: &PolicyInput<'_>) -> Result<Decision, PolicyError> {
        let Some(active) = self.store.active_for(input.tenant) else {
            return self.fallback.decide(input).await;
        };
        let label = active.deployment.label();
        let key: Arc<str> = Arc::from(format!("{}:{label}", input.tenant));
        if let Err(wait) = self.breaker(&key, |b| b.allow(std::time::Instant::now())) {
            return Err(PolicyError {
                message: format!(
                    "routing policy {} is suspended after repeated faults; retried in {} s",
                    label,
                    wait.as_secs() + 1
                ),
                busy: false,
            });
        }
        let request = wasm::request(input);
        let outcome = active.deployment.decide(&request, input.host_view()).await;
        let costly = matches!(
            outcome,
            Err(wasm::PolicyFault::Fuel(_)
                | wasm::PolicyFault::Deadline(_)
                | wasm::PolicyFault::Memory(_)
                | wasm::PolicyFault::StackOverflow
                | wasm::PolicyFault::Trap(_))
        );
        self.breaker(&key, |b| b.record(costly, std::time::Instant::now()));
        match outcome {
            Ok(wasm::WitDecision::Route(r)) => {
                Ok(Decision::Route(Route { adapter: r.adapter, backend: r.backend, priority: r.priority }))
            }
            Ok(wasm::WitDecision::Reject(r)) => {
                Ok(Decision::Reject { status: r.status, code: r.code, message: r.message })
            }
            Err(fault) => {
                tracing::warn!(tenant = input.tenant, error = %fault, "routing policy fault");
                Err(PolicyError { busy: matches!(fault, wasm::PolicyFault::Busy(_)), message: fault.to_string() })
            }
        }
    }
}

#[async_trait]
impl PolicyEngine for StaticPolicy {
    async fn decide(&self, input: &PolicyInput<'_>) -> Result<Decision, PolicyError> {
        if input.model == input.base_model {
            return Ok(Decision::Route(Route { adapter: None, backend: None, priority: 0 }));
        }
        let alias = self.tenants.get(input.tenant).and_then(|t| t.models.get(input.model));
        let adapter = alias.map_or(input.model, String::as_str);
        Ok(Decision::Route(Route { adapter: Some(adapter.to_string()), backend: None, priority: 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(tenant: &'a str, model: &'a str, scopes: &'a BTreeSet<String>) -> PolicyInput<'a> {
        static CLAIMS: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
            std::sync::LazyLock::new(serde_json::Map::new);
        PolicyInput {
            tenant,
            subject: None,
            scopes,
            claims: &CLAIMS,
            headers: Vec::new(),
            backends: Vec::new(),
            adapters: Vec::new(),
            prefix: None,
            features: Features::default(),
            endpoint: Endpoint::ChatCompletions,
            model,
            base_model: "base",
            stream: false,
            max_tokens: None,
            prompt_chars: 10,
        }
    }

    #[tokio::test]
    async fn the_static_policy_maps_the_base_model_aliases_and_adapter_names() {
        let file: crate::tenants::GatewayFile = toml::from_str(
            "[tenants.a]\nadapters=[\"a/*\"]\nbackend=\"http://b1:1\"\n[tenants.a.models]\nsupport=\"a/support\"\n",
        )
        .unwrap();
        let p = StaticPolicy::new(Arc::new(file.tenants));
        let s = BTreeSet::new();
        let route = |adapter: Option<&str>| {
            Decision::Route(Route { adapter: adapter.map(Into::into), backend: None, priority: 0 })
        };
        assert_eq!(p.decide(&input("a", "a/x", &s)).await.unwrap(), route(Some("a/x")));
        assert_eq!(p.decide(&input("a", "support", &s)).await.unwrap(), route(Some("a/support")));
        assert_eq!(p.decide(&input("a", "base", &s)).await.unwrap(), route(None));
        // Access is not its business: the authorization point refuses what the tenant may not use.
        assert_eq!(p.decide(&input("b", "b/x", &s)).await.unwrap(), route(Some("b/x")));
    }
}

/// Built policy components for tests: `scripts/build-policies` runs once per test process.
#[cfg(test)]
pub(crate) mod built {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn dir() -> &'static PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = std::process::Command::new(root.join("scripts/build-policies"))
                .output()
                .expect("scripts/build-policies runs");
            assert!(out.status.success(), "building the policies failed:\n{}", String::from_utf8_lossy(&out.stderr));
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
    }

    /// The component of crate `name` (`tenant-map`, `canary`, `claims-route`, `hostile`).
    pub fn component(name: &str) -> Vec<u8> {
        let file = dir().join(format!("{}.wasm", name.replace('-', "_")));
        std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
    }
}

#[cfg(test)]
mod tests_wasm;
