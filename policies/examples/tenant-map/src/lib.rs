//! `tenant-map`: each tenant gets its adapter from the deployment's configuration.
//!
//! ```json
//! {"tenants": {"acme": "acme/support"}, "default": "shared/general", "deny": ["mallory"]}
//! ```
//! A denied tenant is refused (403). A request for the base model or for a loaded adapter by
//! name goes there (the gateway still checks the tenant may use it); any other model name
//! goes to the tenant's adapter, else the default, else is answered 404.

use serde::Deserialize;
use std::collections::BTreeMap;
use switchyard_policy::{Decision, Policy, Request, config, reject, route};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    tenants: BTreeMap<String, String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    deny: Vec<String>,
}

struct TenantMap;

impl Policy for TenantMap {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Config = config()?;
        if cfg.deny.contains(&req.tenant) {
            return Ok(reject(403, "tenant_denied", format!("tenant {} may not use this service", req.tenant)));
        }
        if req.model == req.base_model {
            return Ok(route(None));
        }
        if req.adapters.iter().any(|a| a.name == req.model) {
            return Ok(route(Some(&req.model)));
        }
        match cfg.tenants.get(&req.tenant).or(cfg.default.as_ref()) {
            Some(adapter) => Ok(route(Some(adapter))),
            None => Ok(reject(404, "model_not_found", format!("no adapter is configured for tenant {}", req.tenant))),
        }
    }
}

switchyard_policy::export_policy!(TenantMap);
