//! Prometheus metrics of the backend, served on their own listener (`--metrics-listen`, never
//! the gRPC port: the series name tenants and adapters).
//!
//! Two kinds: counters and histograms recorded as things happen (requests, tokens, adapter
//! loads and their phases, evictions, engine steps), and gauges read from the engine, the
//! adapter table and the disk cache at each scrape (queues, KV blocks, slots, each adapter's
//! residency, the cache's bytes and counters). The queue, KV and LoRA gauges are also exported
//! under vLLM's names (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
//! `vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`), which routers such as the Gateway
//! API Inference Extension's endpoint picker and llm-d read by default.
//!
//! Tenant label values come from the gateway (the `tenant` of a request); at most
//! [`MAX_TENANTS`] distinct ones are kept, the rest (and requests without one) count as `-`.

use crate::adapters::{AdapterManager, AdapterState};
use crate::engine::Engine;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct tenant label values kept; later tenants count as [`OTHER`].
pub const MAX_TENANTS: usize = 256;
/// The label for a tenant outside the kept set, or none.
pub const OTHER: &str = "-";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: String,
    /// `finished`, `cancelled` (the caller went away), `failed`, or `refused` (never started).
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tenant: String,
    /// `prompt` or `generated`.
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    tenant: String,
    /// Why: `queue_full`, `tenant_queue_full`, `slots_full`, `unknown_adapter`,
    /// `invalid_request`, `out_of_memory`, `not_serving`, `adapter_unavailable` or `internal`.
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixLabels {
    /// The adapter's name; empty for the base model.
    adapter: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    /// `loaded`, `already_loaded` or `failed`.
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// `fetch` (from the source, or finding the cache entry), `validate`, `place` (on the
    /// executor's device).
    phase: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The backend's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    first_token: Histogram,
    prefix_prompt: Family<PrefixLabels, Counter>,
    prefix_hits: Family<PrefixLabels, Counter>,
    queue_wait: HistogramFamily<TenantLabels>,
    fairness: Mutex<FairnessWindow>,
    loads: Family<LoadLabels, Counter>,
    load_seconds: HistogramFamily<PhaseLabels>,
    slot_evictions: Counter,
    tenants: Mutex<HashSet<String>>,
}

impl Metrics {
    /// The recorded metrics; the engine's step times and the scrape-time gauges join them in
    /// [`Metrics::exporter`].
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("switchyard_backend");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Generation requests by tenant and outcome", requests.clone());
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "request_refusals",
            "Generation requests refused before they started, by tenant and reason",
            refusals.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Prompt tokens read and tokens generated, by tenant", tokens.clone());
        let queue_wait: HistogramFamily<TenantLabels> = Family::new_with_constructor(seconds_buckets);
        registry.register(
            "queue_wait_seconds",
            "Time requests waited for admission to the running batch, by tenant",
            queue_wait.clone(),
        );
        let first_token = seconds_buckets();
        registry.register(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token",
            first_token.clone(),
        );
        let prefix_prompt = Family::<PrefixLabels, Counter>::default();
        registry.register(
            "prefix_cache_prompt_tokens",
            "Prompt tokens of finished requests, by adapter (the hit rate's denominator)",
            prefix_prompt.clone(),
        );
        let prefix_hits = Family::<PrefixLabels, Counter>::default();
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens of finished requests found in the prefix cache, not computed, by adapter",
            prefix_hits.clone(),
        );
        let loads = Family::<LoadLabels, Counter>::default();
        registry.register("adapter_loads", "Adapter loads by result", loads.clone());
        let load_seconds: HistogramFamily<PhaseLabels> = Family::new_with_constructor(seconds_buckets);
        registry.register(
            "adapter_load_seconds",
            "Time adapter loads spent fetching, validating and placing the adapter",
            load_seconds.clone(),
        );
        let slot_evictions = Counter::default();
        registry.register(
            "adapter_slot_evictions",
            "Idle adapters evicted from their slot to make room for another (they reload from the cache)",
            slot_evictions.clone(),
        );
        Metrics {
            registry,
            requests,
            refusals,
            tokens,
            first_token,
            prefix_prompt,
            prefix_hits,
            queue_wait,
            fairness: Mutex::new(FairnessWindow::new(Instant::now())),
            loads,
            load_seconds,
            slot_evictions,
            tenants: Mutex::default(),
        }
    }

    /// The label for `tenant`: itself while fewer than [`MAX_TENANTS`] are known.
    fn tenant(&self, tenant: &str) -> String {
        if tenant.is_empty() {
            return OTHER.into();
        }
        let mut known = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if known.contains(tenant) || (known.len() < MAX_TENANTS && known.insert(tenant.to_string())) {
            tenant.to_string()
        } else {
            OTHER.into()
        }
    }

    /// Starts accounting for one generation request of `tenant`, whose weight is `weight`.
    pub fn request(self: &Arc<Self>, tenant: &str, weight: f64) -> RequestTally {
        RequestTally {
            metrics: self.clone(),
            tenant: self.tenant(tenant),
            weight,
            started: Instant::now(),
            first_token: false,
            outcome: None,
        }
    }

    /// Jain's fairness index of the last complete window, if one had tokens.
    pub fn fairness_index(&self) -> Option<f64> {
        let mut window = self.fairness.lock().unwrap_or_else(|p| p.into_inner());
        window.roll(Instant::now());
        window.last
    }

    /// Counts a load by its result.
    pub fn load(&self, result: &'static str) {
        self.loads.get_or_create(&LoadLabels { result }).inc();
    }

    /// Records how long one phase of a load took.
    pub fn load_phase(&self, phase: &'static str, took: Duration) {
        self.load_seconds.get_or_create(&PhaseLabels { phase }).observe(took.as_secs_f64());
    }

    /// Counts an idle adapter evicted from its slot.
    pub fn slot_eviction(&self) {
        self.slot_evictions.inc();
    }

    /// The exporter of these metrics with the engine's step times and the scrape-time gauges
    /// of `engine` and `adapters`.
    pub fn exporter(self: &Arc<Self>, engine: Arc<Engine>, adapters: Arc<AdapterManager>) -> Exporter {
        let mut live = Registry::with_prefix("switchyard_backend");
        live.register(
            "step_duration_seconds",
            "Time the engine took for one step (a forward pass over the batch, and sampling)",
            engine.step_seconds().clone(),
        );
        live.register_collector(Box::new(Fairness(self.clone())));
        let mut compat = Registry::default();
        compat.register_collector(Box::new(State { engine: engine.clone(), adapters: adapters.clone(), vllm: true }));
        live.register_collector(Box::new(State { engine, adapters, vllm: false }));
        Exporter { metrics: self.clone(), live, compat }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// One request's accounting: its tokens as they come, and its outcome when it ends. Dropped
/// before an outcome was recorded, the request was cancelled (its caller went away).
#[derive(Debug)]
pub struct RequestTally {
    metrics: Arc<Metrics>,
    tenant: String,
    weight: f64,
    started: Instant,
    first_token: bool,
    outcome: Option<&'static str>,
}

impl RequestTally {
    fn tokens(&self, kind: &'static str, n: usize) {
        let labels = TokenLabels { tenant: self.tenant.clone(), kind };
        self.metrics.tokens.get_or_create(&labels).inc_by(n as u64);
    }

    /// A token was generated.
    pub fn token(&mut self) {
        if !std::mem::replace(&mut self.first_token, true) {
            self.metrics.first_token.observe(self.started.elapsed().as_secs_f64());
        }
        self.tokens("generated", 1);
        let mut window = self.metrics.fairness.lock().unwrap_or_else(|p| p.into_inner());
        window.serve(Instant::now(), &self.tenant, 1.0 / self.weight);
    }

    /// Where the engine records how long this request waited for admission.
    pub fn queue_wait(&self) -> Histogram {
        self.metrics.queue_wait.get_or_create(&TenantLabels { tenant: self.tenant.clone() }).clone()
    }

    /// The request finished (the final token included) after reading `prompt_tokens`, of
    /// which `cached_tokens` were found in the prefix cache, with `adapter` (empty: none).
    pub fn finished(&mut self, prompt_tokens: usize, cached_tokens: usize, adapter: &str) {
        self.token();
        self.tokens("prompt", prompt_tokens);
        let labels = PrefixLabels { adapter: adapter.to_string() };
        self.metrics.prefix_prompt.get_or_create(&labels).inc_by(prompt_tokens as u64);
        self.metrics.prefix_hits.get_or_create(&labels).inc_by(cached_tokens as u64);
        self.outcome = Some("finished");
    }

    /// The request failed after it started.
    pub fn failed(&mut self) {
        self.outcome = Some("failed");
    }

    /// The request was refused before it started, for `reason`.
    pub fn refused(&mut self, reason: &'static str) {
        self.outcome = Some("refused");
        self.metrics.refusals.get_or_create(&RefusalLabels { tenant: self.tenant.clone(), reason }).inc();
    }
}

impl Drop for RequestTally {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or("cancelled");
        self.metrics.requests.get_or_create(&RequestLabels { tenant: self.tenant.clone(), outcome }).inc();
    }
}

/// The window of [`Metrics::fairness_index`].
pub const FAIRNESS_WINDOW: Duration = Duration::from_secs(60);

/// Tokens generated per tenant, each divided by the tenant's weight, in consecutive windows.
#[derive(Debug)]
struct FairnessWindow {
    started: Instant,
    served: HashMap<String, f64>,
    /// Jain's index of the last complete window that served anyone.
    last: Option<f64>,
}

impl FairnessWindow {
    fn new(now: Instant) -> FairnessWindow {
        FairnessWindow { started: now, served: HashMap::new(), last: None }
    }

    /// Closes the current window if it is over (and, after a quiet spell, the empty ones).
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < FAIRNESS_WINDOW {
            return;
        }
        if !self.served.is_empty() {
            self.last = Some(jain(self.served.values().copied()));
            self.served.clear();
        }
        let windows = (elapsed.as_secs_f64() / FAIRNESS_WINDOW.as_secs_f64()).floor();
        self.started += FAIRNESS_WINDOW.mul_f64(windows);
    }

    fn serve(&mut self, now: Instant, tenant: &str, amount: f64) {
        self.roll(now);
        match self.served.get_mut(tenant) {
            Some(v) => *v += amount,
            None => {
                self.served.insert(tenant.to_string(), amount);
            }
        }
    }
}

/// Jain's fairness index, (Σx)² / (n·Σx²): 1 when every x is equal, 1/n when one has all.
fn jain(x: impl Iterator<Item = f64>) -> f64 {
    let (n, sum, squares) = x.fold((0.0, 0.0, 0.0), |(n, s, q), v| (n + 1.0, s + v, q + v * v));
    if squares == 0.0 { 1.0 } else { sum * sum / (n * squares) }
}

/// The fairness gauge, read at each scrape.
#[derive(Debug)]
struct Fairness(Arc<Metrics>);

impl Collector for Fairness {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.0.fairness_index() {
            Some(index) => one(
                &mut encoder,
                "tenant_fairness_index",
                "Jain's fairness index of the tokens generated per tenant, each divided by the tenant's weight, over the tenants served in the last complete 60 s window (1: shares exactly as weighted; 1/n: one tenant got everything). It judges the scheduler only while every tenant counted had requests waiting.",
                &ConstGauge::new(index),
            ),
            None => Ok(()),
        }
    }
}

/// Renders every metric in the Prometheus text format.
#[derive(Debug)]
pub struct Exporter {
    metrics: Arc<Metrics>,
    /// The engine's step times and the scrape-time gauges, under `switchyard_backend_`.
    live: Registry,
    /// The same gauges under vLLM's names.
    compat: Registry,
}

impl Exporter {
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.metrics.registry);
        let _ = encode_registry(&mut out, &self.live);
        let _ = encode_registry(&mut out, &self.compat);
        let _ = encode_eof(&mut out);
        out
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdapterLabels {
    adapter: String,
    /// `resident`, `draining`, `evicted`, `fetching`, `validated` or `failed`.
    state: &'static str,
    /// Where its weights are: `device` (in a slot of the executor's device), `disk` (evicted:
    /// its files in the cache, or in place for `file://`), or `none` (loading, failed).
    residency: &'static str,
    rank: String,
    /// Whether its disk cache entry is pinned (kept while the adapter is loaded).
    pinned: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    /// `used`, `pinned` (by loaded adapters) or `reserved` (by downloads in progress).
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoraInfoLabels {
    running_lora_adapters: String,
    waiting_lora_adapters: String,
    max_lora: String,
}

/// The gauges read at each scrape.
#[derive(Debug)]
struct State {
    engine: Arc<Engine>,
    adapters: Arc<AdapterManager>,
    /// Export vLLM's names instead of ours.
    vllm: bool,
}

/// Encodes one unlabelled gauge or counter.
fn one(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl State {
    /// Names of the adapters in `slots` (one per request), each once, comma-separated.
    fn names(snap: &crate::engine::Snapshot, slots: &[u32]) -> String {
        let names: std::collections::BTreeSet<&str> = slots
            .iter()
            .filter_map(|s| snap.adapters.iter().find(|a| a.slot == *s).map(|a| a.resident.name.as_str()))
            .collect();
        names.into_iter().collect::<Vec<_>>().join(",")
    }

    fn encode_vllm(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.engine.snapshot();
        let usage = 1.0 - snap.kv_tokens_free as f64 / snap.kv_tokens_total.max(1) as f64;
        one(
            &mut encoder,
            "vllm:num_requests_waiting",
            "Requests waiting (vLLM's name)",
            &ConstGauge::new(self.engine.requests_waiting() as i64),
        )?;
        one(
            &mut encoder,
            "vllm:num_requests_running",
            "Requests running (vLLM's name)",
            &ConstGauge::new(snap.running as i64),
        )?;
        one(
            &mut encoder,
            "vllm:kv_cache_usage_perc",
            "KV cache in use, 0 to 1 (vLLM's name)",
            &ConstGauge::new(usage),
        )?;
        // Older vLLM releases, and the pickers that read them, use this name.
        one(
            &mut encoder,
            "vllm:gpu_cache_usage_perc",
            "KV cache in use, 0 to 1 (vLLM's older name)",
            &ConstGauge::new(usage),
        )?;
        // vLLM's shape: one series whose labels list the adapters, valued with the time it
        // was read.
        let labels = LoraInfoLabels {
            running_lora_adapters: Self::names(&snap, &snap.running_slots),
            waiting_lora_adapters: Self::names(&snap, &snap.waiting_slots),
            max_lora: self.engine.config().max_loras.to_string(),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let gauge = ConstGauge::new(now);
        let mut family = encoder.encode_descriptor(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests (vLLM's name and shape)",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(family.encode_family(&labels)?)
    }

    fn encode_ours(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.engine.snapshot();
        let cfg = self.engine.config();
        let block = cfg.scheduler.block_size.max(1);
        one(
            &mut encoder,
            "requests_waiting",
            "Requests waiting for admission, those the engine thread has not taken up yet included",
            &ConstGauge::new(self.engine.requests_waiting() as i64),
        )?;
        one(&mut encoder, "requests_running", "Requests being generated", &ConstGauge::new(snap.running as i64))?;
        let (total, free) = (snap.kv_tokens_total / block, snap.kv_tokens_free / block);
        one(&mut encoder, "kv_cache_blocks", "KV cache blocks in all", &ConstGauge::new(total as i64))?;
        one(&mut encoder, "kv_cache_blocks_used", "KV cache blocks in use", &ConstGauge::new((total - free) as i64))?;
        one(
            &mut encoder,
            "adapter_slots",
            "Adapter slots in all (--max-loras)",
            &ConstGauge::new(cfg.max_loras as i64),
        )?;
        one(
            &mut encoder,
            "adapter_slots_used",
            "Adapter slots holding an adapter",
            &ConstGauge::new(snap.adapters.len() as i64),
        )?;

        // Every adapter this backend knows, as ListAdapters reports it.
        let mut adapters = BTreeMap::new();
        for a in self.adapters.list() {
            let residency = match a.state {
                AdapterState::Resident | AdapterState::Draining => "device",
                AdapterState::Evicted => "disk",
                AdapterState::Fetching | AdapterState::Validated | AdapterState::Failed => "none",
            };
            let labels = AdapterLabels {
                adapter: a.name.clone(),
                state: a.state.as_str(),
                residency,
                rank: a.rank.to_string(),
                pinned: if a.pinned { "true" } else { "false" },
            };
            adapters.insert((a.name, a.state), labels);
        }
        let gauge = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "adapter",
            "1 for each adapter this backend knows, with its state, where its weights are, its rank and whether its cached files are pinned",
            None,
            gauge.metric_type(),
        )?;
        for labels in adapters.values() {
            gauge.encode(family.encode_family(labels)?)?;
        }

        let cache = self.adapters.store().cache_stats();
        one(
            &mut encoder,
            "adapter_cache_entries",
            "Adapters in the disk cache",
            &ConstGauge::new(cache.entries as i64),
        )?;
        one(
            &mut encoder,
            "adapter_cache_budget_bytes",
            "The disk cache's budget (--lora-cache-bytes)",
            &ConstGauge::new(cache.budget as i64),
        )?;
        let mut family = encoder.encode_descriptor(
            "adapter_cache_bytes",
            "Bytes of the disk cache: used by entries, pinned by loaded adapters, reserved by downloads in progress",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (state, bytes) in
            [("used", cache.bytes), ("pinned", cache.pinned_bytes), ("reserved", cache.reserved_bytes)]
        {
            ConstGauge::new(bytes as i64).encode(family.encode_family(&BytesLabels { state })?)?;
        }
        one(&mut encoder, "adapter_cache_hits", "Loads served by a cache entry", &ConstCounter::new(cache.hits))?;
        one(
            &mut encoder,
            "adapter_cache_misses",
            "Loads that fetched from the source",
            &ConstCounter::new(cache.fetches),
        )?;
        one(
            &mut encoder,
            "adapter_cache_evictions",
            "Cache entries removed to make room",
            &ConstCounter::new(cache.evictions),
        )?;
        Ok(())
    }
}

impl Collector for State {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.vllm { self.encode_vllm(encoder) } else { self.encode_ours(encoder) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fairness_index_is_jains_over_the_last_complete_window() {
        let t0 = Instant::now();
        let mut w = FairnessWindow::new(t0);
        // Equal service at equal weights: 1.
        w.serve(t0, "a", 10.0);
        w.serve(t0, "b", 10.0);
        assert_eq!(w.last, None, "the window is not over");
        // Served 3:1 at weights 3:1 (each token counts 1/weight): 1 too.
        w.serve(t0 + FAIRNESS_WINDOW, "a", 30.0 / 3.0);
        assert_eq!(w.last, Some(1.0));
        w.serve(t0 + FAIRNESS_WINDOW, "b", 10.0);
        w.roll(t0 + FAIRNESS_WINDOW * 2);
        assert!((w.last.unwrap() - 1.0).abs() < 1e-12);
        // One tenant got everything of two: 1/2.
        w.serve(t0 + FAIRNESS_WINDOW * 2, "a", 5.0);
        w.serve(t0 + FAIRNESS_WINDOW * 2, "b", 0.0);
        // A quiet spell of several windows keeps the last index and starts a fresh window.
        w.roll(t0 + FAIRNESS_WINDOW * 7 + Duration::from_secs(1));
        assert_eq!(w.last, Some(0.5));
        assert!(w.served.is_empty());
        assert_eq!(w.started, t0 + FAIRNESS_WINDOW * 7);
        assert!((jain([3.0, 1.0].into_iter()) - 0.8).abs() < 1e-12);
    }
}
