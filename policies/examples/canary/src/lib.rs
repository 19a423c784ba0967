//! `canary`: a weighted split between two versions of an adapter, sticky per user.
//!
//! ```json
//! {"stable": "acme/support-v1", "canary": "acme/support-v2", "percent": 10, "sticky": "sub"}
//! ```
//! `percent` of users get the canary. `sticky` names what identifies a user: `sub` (the
//! token's subject, the default) or `header:<name>`. A request without one is split at random.

use serde::Deserialize;
use switchyard_policy::{Decision, Policy, Request, config, header, host, route, unit_hash};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    stable: String,
    canary: String,
    percent: f64,
    #[serde(default = "sub")]
    sticky: String,
}

fn sub() -> String {
    "sub".into()
}

struct Canary;

impl Policy for Canary {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Config = config()?;
        if !(0.0..=100.0).contains(&cfg.percent) {
            return Err(format!("percent must be between 0 and 100, got {}", cfg.percent));
        }
        let user = match cfg.sticky.strip_prefix("header:") {
            Some(name) => header(&req, name).map(str::to_string),
            None => req.subject.clone(),
        };
        let draw = match user {
            Some(u) => unit_hash(&u),
            None => (host::random() >> 11) as f64 / (1u64 << 53) as f64,
        };
        let adapter = if draw * 100.0 < cfg.percent { &cfg.canary } else { &cfg.stable };
        Ok(route(Some(adapter)))
    }
}

switchyard_policy::export_policy!(Canary);
