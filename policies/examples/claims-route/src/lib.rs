//! `claims-route`: the adapter is chosen by a claim of the caller's token (or a header), and a
//! request that matches no route is refused.
//!
//! ```json
//! {"claim": "plan", "routes": {"pro": "acme/pro", "free": "acme/free"}, "header": "x-adapter-hint"}
//! ```
//! The claim's value (a string, or the first string of a list) picks the route; when the token
//! has no such claim, the optional header does. No match: 403 `no_route`.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use switchyard_policy::{Decision, Policy, Request, claim, config, header, reject, route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    claim: String,
    routes: BTreeMap<String, String>,
    #[serde(default)]
    header: Option<String>,
}

struct ClaimsRoute;

impl Policy for ClaimsRoute {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Config = config()?;
        let from_claim = match claim(&req, &cfg.claim) {
            Some(Value::String(s)) => Some(s),
            Some(Value::Array(items)) => items.into_iter().find_map(|v| v.as_str().map(str::to_string)),
            _ => None,
        };
        let key = from_claim.or_else(|| cfg.header.as_deref().and_then(|h| header(&req, h)).map(str::to_string));
        match key.as_deref().and_then(|k| cfg.routes.get(k)) {
            Some(adapter) => Ok(route(Some(adapter))),
            None => Ok(reject(
                403,
                "no_route",
                format!("no route for {} = {}", cfg.claim, key.as_deref().unwrap_or("(absent)")),
            )),
        }
    }
}

switchyard_policy::export_policy!(ClaimsRoute);
