//! `prefix-affinity`: each request goes to the backend that already holds most of its prompt in
//! its prefix cache, unless that backend is too much busier than the least busy one.
//!
//! ```json
//! {"min_cached_tokens": 64, "max_queue_gap": 2}
//! ```
//! `model` names the adapter (the base model's name: the base model). Among the healthy
//! backends, the one caching the most of the prompt for that adapter, and at least
//! `min_cached_tokens` (default 64) of it, is chosen when it has at most `max_queue_gap`
//! (default 2) more requests waiting or running than the least busy backend. Otherwise, or when
//! the gateway cannot say what is cached, the gateway's router chooses.

use serde::Deserialize;
use switchyard_policy::{BackendPrefix, Decision, Level, Policy, Request, Route, cached_prefix, config, log};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "min_cached_tokens")]
    min_cached_tokens: u32,
    #[serde(default = "max_queue_gap")]
    max_queue_gap: u32,
}

fn min_cached_tokens() -> u32 {
    64
}

fn max_queue_gap() -> u32 {
    2
}

/// The backend to pin, if one is worth it.
fn choose(req: &Request, cached: &[BackendPrefix], cfg: &Config) -> Option<String> {
    let queue = |address: &str| req.backends.iter().find(|b| b.address == address).map(|b| b.queue_depth);
    let least_busy = cached.iter().filter_map(|c| queue(&c.address)).min()?;
    let best = cached.iter().filter(|c| c.cached_tokens >= cfg.min_cached_tokens).max_by_key(|c| c.cached_tokens)?;
    (queue(&best.address)? <= least_busy.saturating_add(cfg.max_queue_gap)).then(|| best.address.clone())
}

struct PrefixAffinity;

impl Policy for PrefixAffinity {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Config = config()?;
        let adapter = (req.model != req.base_model).then(|| req.model.clone());
        let backend = match cached_prefix(adapter.as_deref()) {
            Ok(overlap) => choose(&req, &overlap.backends, &cfg),
            Err(e) => {
                log(Level::Debug, &format!("leaving the backend to the gateway: {e}"));
                None
            }
        };
        Ok(Decision::Route(Route { adapter, backend, priority: 0 }))
    }
}

switchyard_policy::export_policy!(PrefixAffinity);
