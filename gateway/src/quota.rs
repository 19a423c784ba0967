//! Per-tenant quotas: requests and tokens per minute, concurrent requests, and caps on what one
//! request may ask (`max_tokens`, `ignore_eos`). Read from a tenant's `quota` table:
//!
//! ```toml
//! [tenants.acme.quota]
//! requests_per_minute = 600
//! tokens_per_minute = 200000        # prompt and completion tokens, weighted:
//! prompt_token_weight = 1.0         #   what a prompt token counts (default 1)
//! completion_token_weight = 1.0     #   what a completion token counts (default 1)
//! concurrent_requests = 32          # streamed or not
//! max_tokens = 1024                 # the most a request may ask for; also the default
//! ignore_eos = false                # may its requests set ignore_eos (default true)
//! shadow = false                    # count and log would-be refusals, refuse nothing
//! ```
//!
//! **Windows.** Budgets are per minute, in windows aligned to the Unix clock (`12:00:00` to
//! `12:01:00`), so every gateway agrees on them; a tenant may use a window's budget at any pace
//! within it. The `x-ratelimit-reset-*` headers say when the window ends.
//!
//! **Checked before, charged after.** A request is admitted while the tenant is under each
//! limit; its request counts at once, its tokens when it ends (streams included, and a stream
//! the client abandoned counts what it had generated). So a window's tokens can end over the
//! limit by what the requests in flight when it was reached go on to use: at most
//! `concurrent_requests` requests' tokens, per gateway. Requests never overshoot.
//!
//! **Across gateways.** The budgets are counters in the state store
//! ([`StateStore::add_to_counter`]): with etcd, every gateway of the fleet draws from the same
//! counters. A gateway takes budget in slices ([`SLICE_DIVISOR`]: a sixteenth of a limit at a
//! time) and spends them locally, so the store sees one write per slice, not per request. Slices
//! a gateway took and did not spend are not available to others until the next window: the
//! tenant may be refused up to one slice per gateway early. Tokens used past the slices taken
//! are added to the counters when they are charged. If the store cannot be reached, requests
//! are admitted (and the failure logged): a quota is not worth an outage.
//!
//! With the local store the counters are this gateway's own.

use crate::error::{Code, Error};
use crate::store::{StateStore, StoreError};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The quota window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// A gateway takes `limit / SLICE_DIVISOR` (at least 1) from the shared counters at a time.
pub const SLICE_DIVISOR: u64 = 16;
/// Tenants a gateway keeps quota state for at once (those idle for a window are dropped first).
const MAX_TRACKED: usize = 100_000;

/// A tenant's quota, as the tenants file states it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default = "one")]
    pub prompt_token_weight: f64,
    #[serde(default = "one")]
    pub completion_token_weight: f64,
    #[serde(default)]
    pub concurrent_requests: Option<u32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default = "yes")]
    pub ignore_eos: bool,
    #[serde(default)]
    pub shadow: bool,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl Default for QuotaConfig {
    fn default() -> QuotaConfig {
        QuotaConfig {
            requests_per_minute: None,
            tokens_per_minute: None,
            prompt_token_weight: 1.0,
            completion_token_weight: 1.0,
            concurrent_requests: None,
            max_tokens: None,
            ignore_eos: true,
            shadow: false,
        }
    }
}

impl QuotaConfig {
    /// Checks the values; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        for (field, w) in [
            ("prompt_token_weight", self.prompt_token_weight),
            ("completion_token_weight", self.completion_token_weight),
        ] {
            if !(w.is_finite() && (0.0..=1000.0).contains(&w)) {
                return Err(format!("{field}: {w} is out of range (0 to 1000)"));
            }
        }
        for (field, v) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("concurrent_requests", self.concurrent_requests.map(u64::from)),
            ("max_tokens", self.max_tokens.map(u64::from)),
        ] {
            if v == Some(0) {
                return Err(format!("{field}: 0 would refuse every request; leave it out for no limit"));
            }
        }
        Ok(())
    }

    /// Whether it limits requests, tokens or concurrency (else requests need no admission).
    pub fn limits_rates(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some() || self.concurrent_requests.is_some()
    }

    /// The weighted token count of a request that read `prompt` and generated `completion`.
    pub fn tokens(&self, prompt: u32, completion: u32) -> u64 {
        let t = f64::from(prompt) * self.prompt_token_weight + f64::from(completion) * self.completion_token_weight;
        t.ceil() as u64
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Requests,
    Tokens,
    Concurrency,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::Concurrency => "concurrent_requests",
        }
    }
}

/// What the rate-limit headers say of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
}

/// The state of a tenant's budgets as a response reports it: OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
    /// Until the window ends.
    pub reset: Duration,
    /// On a refusal: when to try again (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl Headers {
    /// The header names and values.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let reset = format_reset(self.reset);
        if let Some(s) = self.requests {
            out.push(("x-ratelimit-limit-requests", s.limit.to_string()));
            out.push(("x-ratelimit-remaining-requests", s.remaining.to_string()));
            out.push(("x-ratelimit-reset-requests", reset.clone()));
        }
        if let Some(s) = self.tokens {
            out.push(("x-ratelimit-limit-tokens", s.limit.to_string()));
            out.push(("x-ratelimit-remaining-tokens", s.remaining.to_string()));
            out.push(("x-ratelimit-reset-tokens", reset));
        }
        if let Some(after) = self.retry_after {
            out.push(("retry-after", after.as_secs_f64().ceil().max(1.0).to_string()));
            out.push(("retry-after-ms", after.as_millis().max(1).to_string()));
        }
        out
    }
}

/// A duration as OpenAI writes its resets: `6m0s`, `1s`, `20ms`.
fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", (ms as f64 / 1000.0 * 10.0).round() / 10.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// A refusal: which limit, and the headers to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub limit: Limit,
    pub error: Error,
    pub headers: Headers,
}

/// One limit's budget in the current window, as this gateway sees it.
#[derive(Debug, Clone, Default)]
struct Budget {
    /// Taken from the shared counter in this window.
    taken: u64,
    /// Spent of what was taken (may pass it: tokens are charged after the fact).
    spent: u64,
    /// The shared counter as last seen: what every gateway took.
    counter: u64,
    /// The counter said the window's budget is gone.
    exhausted: bool,
}

impl Budget {
    fn remaining(&self, limit: u64) -> u64 {
        // Everyone's takings, less what this gateway took and has not spent.
        let used = self.counter.saturating_sub(self.taken.saturating_sub(self.spent));
        limit.saturating_sub(used.max(self.spent))
    }
}

#[derive(Debug, Default)]
struct TenantState {
    window: u64,
    requests: Budget,
    tokens: Budget,
    in_flight: u32,
}

impl TenantState {
    /// The budget of `limit` (requests or tokens).
    fn budget(&mut self, limit: Limit) -> &mut Budget {
        if limit == Limit::Requests { &mut self.requests } else { &mut self.tokens }
    }
}

/// The quotas of every tenant, on one gateway.
pub struct Quotas {
    store: Arc<dyn StateStore>,
    state: Mutex<HashMap<String, TenantState>>,
    /// The clock: seconds since the Unix epoch (tests move it).
    clock: Box<dyn Fn() -> Duration + Send + Sync>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas").field("store", &self.store.describe()).finish()
    }
}

/// Admission of one request: while it lives, it counts against `concurrent_requests`; when
/// [`Ticket::charge`] is called (or it is dropped), its tokens count.
#[derive(Debug)]
pub struct Ticket {
    quotas: Arc<Quotas>,
    tenant: String,
    config: QuotaConfig,
    charged: bool,
    /// The rate-limit headers as of admission.
    pub headers: Headers,
    /// A refusal shadow mode let through.
    pub shadowed: Option<Limit>,
}

impl Ticket {
    /// Charges the tokens the request used; once.
    pub fn charge(&mut self, prompt: u32, completion: u32) {
        if std::mem::replace(&mut self.charged, true) {
            return;
        }
        let tokens = self.config.tokens(prompt, completion);
        self.quotas.charge(&self.tenant, &self.config, tokens);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.quotas.release(&self.tenant);
    }
}

fn window_of(now: Duration) -> u64 {
    now.as_secs() / WINDOW.as_secs()
}

fn window_end(now: Duration) -> Duration {
    Duration::from_secs((window_of(now) + 1) * WINDOW.as_secs()).saturating_sub(now)
}

fn slice(limit: u64) -> u64 {
    (limit / SLICE_DIVISOR).max(1)
}

impl Quotas {
    pub fn new(store: Arc<dyn StateStore>) -> Quotas {
        let clock = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Quotas::with_clock(store, Box::new(clock))
    }

    pub(crate) fn with_clock(store: Arc<dyn StateStore>, clock: Box<dyn Fn() -> Duration + Send + Sync>) -> Quotas {
        Quotas { store, state: Mutex::default(), clock }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantState>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tenant's state in the current window (a new window starts with fresh budgets).
    fn with_state<R>(&self, tenant: &str, now: Duration, f: impl FnOnce(&mut TenantState) -> R) -> R {
        let window = window_of(now);
        let mut state = self.lock();
        if !state.contains_key(tenant) && state.len() >= MAX_TRACKED {
            state.retain(|_, s| s.in_flight > 0 || s.window == window);
        }
        let s = state.entry(tenant.to_string()).or_default();
        if s.window != window {
            *s = TenantState { window, in_flight: s.in_flight, ..TenantState::default() };
        }
        f(s)
    }

    fn counter_key(tenant: &str, limit: Limit, window: u64) -> String {
        format!("quota/{tenant}/{}/{window}", limit.as_str())
    }

    /// Takes more of a limit's budget from the shared counter: a slice, or `want` if more.
    async fn take(&self, tenant: &str, limit: Limit, cap: u64, want: u64, now: Duration) -> Result<(), StoreError> {
        let window = window_of(now);
        let key = Quotas::counter_key(tenant, limit, window);
        let counted = self.store.add_to_counter(&key, want.max(slice(cap)), Some(cap), WINDOW * 2).await?;
        self.with_state(tenant, now, |s| {
            let b = s.budget(limit);
            b.taken += counted.added;
            b.counter = b.counter.max(counted.total);
            b.exhausted = counted.added < want;
        });
        Ok(())
    }

    fn headers(&self, config: &QuotaConfig, s: &TenantState, now: Duration) -> Headers {
        Headers {
            requests: config.requests_per_minute.map(|l| Standing { limit: l, remaining: s.requests.remaining(l) }),
            tokens: config.tokens_per_minute.map(|l| Standing { limit: l, remaining: s.tokens.remaining(l) }),
            reset: window_end(now),
            retry_after: None,
        }
    }

    /// Checks a request of `tenant` against `config` and admits it, or says which limit refuses
    /// it. `max_tokens` and `ignore_eos` are what the request asked for (checked before this).
    pub async fn admit(self: &Arc<Self>, tenant: &str, config: &QuotaConfig) -> Result<Ticket, Box<Refusal>> {
        let now = (self.clock)();
        let refused = |limit: Limit, s: &TenantState, this: &Quotas| {
            let mut headers = this.headers(config, s, now);
            let (message, after) = match limit {
                Limit::Concurrency => (
                    format!(
                        "tenant {tenant:?} has {} requests in flight, its most (concurrent_requests); retry when one ends",
                        s.in_flight
                    ),
                    Duration::from_secs(1),
                ),
                Limit::Requests => (
                    format!(
                        "tenant {tenant:?} reached its limit of {} requests per minute; retry in {}",
                        config.requests_per_minute.unwrap_or_default(),
                        format_reset(window_end(now))
                    ),
                    window_end(now),
                ),
                Limit::Tokens => (
                    format!(
                        "tenant {tenant:?} reached its limit of {} tokens per minute; retry in {}",
                        config.tokens_per_minute.unwrap_or_default(),
                        format_reset(window_end(now))
                    ),
                    window_end(now),
                ),
            };
            headers.retry_after = Some(after);
            let code =
                if limit == Limit::Concurrency { Code::ConcurrencyLimitExceeded } else { Code::RateLimitExceeded };
            Box::new(Refusal { limit, error: Error::new(code, message), headers })
        };

        // Budgets this gateway has run out of locally are topped up from the shared counters.
        for (limit, cap) in [(Limit::Requests, config.requests_per_minute), (Limit::Tokens, config.tokens_per_minute)] {
            let Some(cap) = cap else { continue };
            let short = self.with_state(tenant, now, |s| {
                let b = s.budget(limit);
                (b.spent >= b.taken && !b.exhausted).then(|| b.spent + 1 - b.taken)
            });
            if let Some(want) = short
                && let Err(e) = self.take(tenant, limit, cap, want, now).await
            {
                // Fail open: a quota is not worth an outage.
                tracing::warn!(tenant, error = %e, "quota counters unavailable; admitting without them");
                self.with_state(tenant, now, |s| {
                    let b = s.budget(limit);
                    b.taken = b.taken.max(b.spent + 1);
                });
            }
        }

        let verdict = self.with_state(tenant, now, |s| {
            let over = if config.concurrent_requests.is_some_and(|c| s.in_flight >= c) {
                Some(Limit::Concurrency)
            } else if config.requests_per_minute.is_some() && s.requests.spent >= s.requests.taken {
                Some(Limit::Requests)
            } else if config.tokens_per_minute.is_some() && s.tokens.spent >= s.tokens.taken {
                Some(Limit::Tokens)
            } else {
                None
            };
            match over {
                Some(limit) if !config.shadow => Err(refused(limit, s, self)),
                over => {
                    s.in_flight += 1;
                    s.requests.spent += 1;
                    Ok((self.headers(config, s, now), over))
                }
            }
        });
        let (headers, shadowed) = verdict?;
        if let Some(limit) = shadowed {
            tracing::info!(tenant, limit = limit.as_str(), "quota would refuse this request (shadow mode)");
        }
        Ok(Ticket {
            quotas: self.clone(),
            tenant: tenant.to_string(),
            config: config.clone(),
            charged: false,
            headers,
            shadowed,
        })
    }

    /// Counts `tokens` against the tenant's window; what passes the budget taken goes to the
    /// shared counter too (uncapped: it was used).
    fn charge(self: &Arc<Self>, tenant: &str, config: &QuotaConfig, tokens: u64) {
        let Some(cap) = config.tokens_per_minute else { return };
        let now = (self.clock)();
        // What passes the budget taken is taken at once here (so an admission racing with
        // the write below does not take it again), and written to the shared counter after.
        let debt = self.with_state(tenant, now, |s| {
            let before = s.tokens.spent.max(s.tokens.taken);
            s.tokens.spent += tokens;
            let debt = s.tokens.spent.saturating_sub(before);
            s.tokens.taken += debt;
            debt
        });
        if debt == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(tenant, "no runtime to record tokens used in the quota counters");
            return;
        };
        let this = self.clone();
        let tenant = tenant.to_string();
        let key = Quotas::counter_key(&tenant, Limit::Tokens, window_of(now));
        let record = async move {
            match this.store.add_to_counter(&key, debt, None, WINDOW * 2).await {
                Ok(counted) => this.with_state(&tenant, now, |s| {
                    s.tokens.counter = s.tokens.counter.max(counted.total);
                    s.tokens.exhausted |= counted.total >= cap;
                }),
                Err(e) => tracing::warn!(tenant, error = %e, "could not record tokens used in the quota counters"),
            }
        };
        runtime.spawn(record);
    }

    fn release(&self, tenant: &str) {
        if let Some(s) = self.lock().get_mut(tenant) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Quotas over a local store, with a clock the test moves (milliseconds since the epoch).
    fn quotas(store: Arc<dyn StateStore>) -> (Arc<Quotas>, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(1_000_000 * 60_000 + 5_000));
        let clock = now.clone();
        let q = Quotas::with_clock(store, Box::new(move || Duration::from_millis(clock.load(Ordering::SeqCst))));
        (Arc::new(q), now)
    }

    fn local() -> (Arc<dyn StateStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Arc::new(FileStore::open(dir.path()).unwrap()), dir)
    }

    #[tokio::test]
    async fn requests_past_the_limit_are_refused_until_the_window_ends() {
        let (store, _dir) = local();
        let (q, now) = quotas(store);
        let config = QuotaConfig { requests_per_minute: Some(3), ..QuotaConfig::default() };
        let mut tickets = Vec::new();
        for remaining in [2, 1, 0] {
            let t = q.admit("acme", &config).await.expect("under the limit");
            assert_eq!(t.headers.requests, Some(Standing { limit: 3, remaining }));
            tickets.push(t);
        }
        drop(tickets);
        let refusal = q.admit("acme", &config).await.expect_err("the fourth request of the minute");
        assert_eq!((refusal.limit, refusal.error.code.clone()), (Limit::Requests, Code::RateLimitExceeded));
        assert!(refusal.error.message.contains("3 requests per minute"), "{}", refusal.error.message);
        // The window started 5 s ago: it ends in 55 s.
        assert_eq!(refusal.headers.retry_after, Some(Duration::from_secs(55)));
        let pairs = refusal.headers.pairs();
        assert!(pairs.contains(&("x-ratelimit-remaining-requests", "0".into())), "{pairs:?}");
        assert!(pairs.contains(&("x-ratelimit-reset-requests", "55s".into())), "{pairs:?}");
        assert!(pairs.contains(&("retry-after", "55".into())), "{pairs:?}");
        // Another tenant has its own budget; the next window has a fresh one.
        q.admit("globex", &config).await.expect("another tenant");
        now.fetch_add(55_000, Ordering::SeqCst);
        q.admit("acme", &config).await.expect("a new window");
    }

    #[tokio::test]
    async fn tokens_are_charged_when_a_request_ends_weighted_and_refuse_once_spent() {
        let (store, _dir) = local();
        let (q, _) = quotas(store);
        let config = QuotaConfig {
            tokens_per_minute: Some(100),
            prompt_token_weight: 0.5,
            completion_token_weight: 2.0,
            ..QuotaConfig::default()
        };
        assert_eq!(config.tokens(10, 10), 25);
        let mut first = q.admit("acme", &config).await.expect("nothing spent yet");
        assert_eq!(first.headers.tokens, Some(Standing { limit: 100, remaining: 100 }));
        // Admitted while under the limit, however much it then uses: 40 + 70 = 110.
        let mut second = q.admit("acme", &config).await.expect("still nothing charged");
        first.charge(80, 20);
        first.charge(1000, 1000); // charged once only
        second.charge(0, 35);
        drop((first, second));
        tokio::task::yield_now().await;
        let refusal = q.admit("acme", &config).await.expect_err("110 of 100 spent");
        assert_eq!(refusal.limit, Limit::Tokens);
        assert_eq!(refusal.headers.tokens, Some(Standing { limit: 100, remaining: 0 }));
    }

    #[tokio::test]
    async fn concurrent_requests_are_capped_while_they_run_and_shadow_mode_refuses_nothing() {
        let (store, _dir) = local();
        let (q, _) = quotas(store);
        let config = QuotaConfig { concurrent_requests: Some(2), ..QuotaConfig::default() };
        let a = q.admit("acme", &config).await.unwrap();
        let _b = q.admit("acme", &config).await.unwrap();
        let refusal = q.admit("acme", &config).await.expect_err("two in flight");
        assert_eq!((refusal.limit, refusal.error.code.clone()), (Limit::Concurrency, Code::ConcurrencyLimitExceeded));
        assert_eq!(refusal.headers.retry_after, Some(Duration::from_secs(1)));
        drop(a);
        q.admit("acme", &config).await.expect("one ended");

        let shadow = QuotaConfig { requests_per_minute: Some(1), shadow: true, ..QuotaConfig::default() };
        assert_eq!(q.admit("beta", &shadow).await.unwrap().shadowed, None);
        assert_eq!(q.admit("beta", &shadow).await.unwrap().shadowed, Some(Limit::Requests));
    }

    #[tokio::test]
    async fn gateways_sharing_counters_admit_no_more_requests_than_the_limit_between_them() {
        let (store, _dir) = local();
        let (a, _) = quotas(store.clone());
        let (b, _) = quotas(store);
        // Slices of 64 / 16 = 4: each gateway takes four at a time from the shared counter.
        let config = QuotaConfig { requests_per_minute: Some(64), ..QuotaConfig::default() };
        let mut admitted = 0;
        for _ in 0..100 {
            for q in [&a, &b] {
                if q.admit("acme", &config).await.is_ok() {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, 64);
    }

    #[test]
    fn resets_are_written_as_openai_writes_them() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn bad_quotas_are_refused_by_field() {
        let bad = QuotaConfig { requests_per_minute: Some(0), ..QuotaConfig::default() };
        assert!(bad.check().unwrap_err().starts_with("requests_per_minute"));
        let bad = QuotaConfig { completion_token_weight: f64::NAN, ..QuotaConfig::default() };
        assert!(bad.check().unwrap_err().starts_with("completion_token_weight"));
        assert!(QuotaConfig::default().check().is_ok() && !QuotaConfig::default().limits_rates());
    }
}
