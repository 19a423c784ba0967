//! Prometheus metrics of the gateway, served at `/metrics` in the text exposition format.
//! Label values come only from bounded sets: configured tenants, adapters in the desired set,
//! the base model and configured backends. Anything else (an unknown tenant, a model name a
//! client made up) is recorded as `-`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// The label for a value outside the bounded sets.
pub const OTHER: &str = "-";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: String,
    tenant: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    endpoint: &'static str,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
    tenant: String,
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    tenant: String,
    /// `requests`, `tokens`, `concurrent_requests`, `max_tokens` or `ignore_eos`.
    limit: &'static str,
    /// `true` when shadow mode let the request through.
    shadow: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CorrectionLabels {
    backend: String,
    call: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 1 ms to ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<LatencyLabels>,
    first_token: HistogramFamily<LatencyLabels>,
    tokens: Family<TokenLabels, Counter>,
    quota_refusals: Family<QuotaLabels, Counter>,
    backend_healthy: Family<BackendLabels, Gauge>,
    corrections: Family<CorrectionLabels, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("switchyard_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by endpoint, HTTP status, tenant and model",
            requests.clone(),
        );
        let duration: HistogramFamily<LatencyLabels> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "request_duration_seconds",
            "Time from request to the last byte of the answer",
            duration.clone(),
        );
        let first_token: HistogramFamily<LatencyLabels> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to the first generated text",
            first_token.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Prompt and completion tokens, by tenant and model", tokens.clone());
        let quota_refusals = Family::<QuotaLabels, Counter>::default();
        registry.register(
            "quota_refusals",
            "Requests a tenant's quota refused (or, in shadow mode, would have), by the limit reached",
            quota_refusals.clone(),
        );
        let backend_healthy = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_healthy",
            "1 when the backend's last health probe succeeded",
            backend_healthy.clone(),
        );
        let corrections = Family::<CorrectionLabels, Counter>::default();
        registry.register(
            "reconcile_calls",
            "Loads and unloads the reconcilers made to bring a backend to the desired set",
            corrections.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this gateway drives the backends' adapters", leader.clone());
        Metrics {
            registry,
            requests,
            duration,
            first_token,
            tokens,
            quota_refusals,
            backend_healthy,
            corrections,
            leader,
        }
    }

    /// Counts a request `tenant`'s quota refused at `limit` (or would have, in shadow mode).
    pub fn quota_refusal(&self, tenant: &str, limit: &'static str, shadow: bool) {
        let labels = QuotaLabels { tenant: tenant.to_string(), limit, shadow: if shadow { "true" } else { "false" } };
        self.quota_refusals.get_or_create(&labels).inc();
    }

    /// Counts a reconciler's `call` (`load` or `unload`) to `backend`.
    pub fn reconcile_call(&self, backend: &str, call: &'static str) {
        self.corrections.get_or_create(&CorrectionLabels { backend: backend.to_string(), call }).inc();
    }

    pub fn leading(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    /// Counts one answered request and its duration.
    pub fn request(&self, endpoint: &'static str, status: u16, tenant: &str, model: &str, took: Duration) {
        let labels = RequestLabels {
            endpoint,
            status: status.to_string(),
            tenant: tenant.to_string(),
            model: model.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration.get_or_create(&LatencyLabels { endpoint, model: model.to_string() }).observe(took.as_secs_f64());
    }

    pub fn first_token(&self, endpoint: &'static str, model: &str, after: Duration) {
        self.first_token
            .get_or_create(&LatencyLabels { endpoint, model: model.to_string() })
            .observe(after.as_secs_f64());
    }

    /// Tokens of a finished generation: `cached` of its `prompt` tokens came from the backend's
    /// prefix cache.
    pub fn tokens(&self, tenant: &str, model: &str, prompt: u32, completion: u32, cached: u32) {
        for (kind, n) in [("prompt", prompt), ("completion", completion), ("prompt_cached", cached)] {
            let labels = TokenLabels { kind, tenant: tenant.to_string(), model: model.to_string() };
            self.tokens.get_or_create(&labels).inc_by(u64::from(n));
        }
    }

    pub fn backend_health(&self, backend: &str, healthy: bool) {
        self.backend_healthy.get_or_create(&BackendLabels { backend: backend.to_string() }).set(i64::from(healthy));
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_carries_every_family_with_its_labels() {
        let m = Metrics::new();
        m.request("chat_completions", 200, "acme", "acme/support", Duration::from_millis(12));
        m.tokens("acme", "acme/support", 7, 3, 2);
        m.backend_health("http://127.0.0.1:50051", true);
        let text = m.render();
        for needle in [
            "switchyard_gateway_requests_total{endpoint=\"chat_completions\",status=\"200\",tenant=\"acme\",model=\"acme/support\"} 1",
            "switchyard_gateway_tokens_total{kind=\"completion\",tenant=\"acme\",model=\"acme/support\"} 3",
            "switchyard_gateway_tokens_total{kind=\"prompt_cached\",tenant=\"acme\",model=\"acme/support\"} 2",
            "switchyard_gateway_backend_healthy{backend=\"http://127.0.0.1:50051\"} 1",
            "switchyard_gateway_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
