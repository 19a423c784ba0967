//! Helpers for Switchyard routing policies.
//!
//! A policy is a type implementing [`Policy`], exported with [`export_policy!`]:
//!
//! ```ignore
//! use switchyard_policy::{Decision, Policy, Request, route};
//! struct Mine;
//! impl Policy for Mine {
//!     fn decide(req: Request) -> Result<Decision, String> {
//!         Ok(route(Some(&format!("{}/default", req.tenant))))
//!     }
//! }
//! switchyard_policy::export_policy!(Mine);
//! ```

/// The bindings generated from `wit/policy.wit`.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_policy_bindings",
    });
}

pub use bindings::switchyard::policy::host::{
    self, BackendPrefix, ConstraintKind, Level, PrefixOverlap, RequestFeatures,
};
pub use bindings::switchyard::policy::types::{
    AdapterState, Backend, BackendAdapter, Claim, Decision, Endpoint, Header, KnownAdapter, Reject, Request, Route,
};
pub use serde_json;

/// What a policy implements: one decision per request. An `Err` is the policy's own failure
/// (answered 500 by the gateway); refusing a request is `Ok(Decision::Reject(..))`.
pub use bindings::Guest as Policy;

/// Exports a [`Policy`] implementation as the component's `decide`.
#[macro_export]
macro_rules! export_policy {
    ($ty:ident) => {
        $crate::bindings::export_policy_bindings!($ty with_types_in $crate::bindings);
    };
}

/// Routes to `adapter` (`None`: the base model), letting the gateway choose the backend.
pub fn route(adapter: Option<&str>) -> Decision {
    Decision::Route(Route { adapter: adapter.map(str::to_string), backend: None, priority: 0 })
}

/// Refuses the request with an HTTP status (400–499), a code and a message.
pub fn reject(status: u16, code: &str, message: impl Into<String>) -> Decision {
    Decision::Reject(Reject { status, code: code.to_string(), message: message.into() })
}

/// This deployment's configuration, parsed into `T`.
pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, String> {
    serde_json::from_str(&host::config()).map_err(|e| format!("bad policy configuration: {e}"))
}

/// A claim of the caller's token, parsed from its JSON text.
pub fn claim(req: &Request, name: &str) -> Option<serde_json::Value> {
    req.claims.iter().find(|c| c.name == name).and_then(|c| serde_json::from_str(&c.value).ok())
}

/// A header the gateway passed (names are lower-case).
pub fn header<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str())
}

/// What each healthy backend holds of this request's prompt in its prefix cache for `adapter`
/// (`None`: the base model). The first call has a backend tokenize the prompt; see
/// `host.cached-prefix` in the contract for what it counts and when it fails.
pub fn cached_prefix(adapter: Option<&str>) -> Result<PrefixOverlap, String> {
    host::cached_prefix(adapter)
}

/// What this request asks of the model beyond free text: how its answer is constrained (a
/// JSON schema, JSON mode, a tool call…), the tools it offers, whether it wants
/// log-probabilities.
pub fn features() -> RequestFeatures {
    host::features()
}

/// Writes a line to the gateway's log.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

/// A stable hash of `key` into [0, 1): the same user always lands on the same side of a split.
pub fn unit_hash(key: &str) -> f64 {
    // FNV-1a, then MurmurHash3's 64-bit finaliser so similar keys ("user-1", "user-2") spread
    // evenly; stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64
}
