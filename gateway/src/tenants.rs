//! Tenants: which adapters each may use, which names it may load adapters under, where its
//! tokens may load adapters from, and its static routing. Read from the `[tenants.<name>]`
//! tables of the gateway's TOML file; unknown keys are an error.
//!
//! ```toml
//! [tenants.acme]
//! adapters = ["acme/*", "support-v1"]    # names, or prefixes ending in '*', it may use
//! manage = ["acme/*"]                    # names it may load new adapters under (it then owns them)
//! load_prefixes = ["s3://acme-loras/"]   # where its tokens may load adapters from
//! base_model = true                      # may it call the base model (default true)
//! backend = "https://10.0.0.7:50051"     # optional: send all its requests to this backend
//! admin = false                          # an operator: manages every adapter and policy
//! weight = 1.0                           # its share of each backend against other tenants
//! priority = 0                           # its requests' scheduling priority (higher first)
//! max_priority = 0                       # the most its policy may ask for (default: priority)
//! [tenants.acme.quota]                   # optional: see crate::quota
//! requests_per_minute = 600
//! [tenants.acme.models]                  # optional aliases: the `model` clients send -> adapter
//! support = "acme/support-v2"
//! ```
//!
//! Using and managing are separate grants (see [`crate::authz`]): a tenant uses the adapters its
//! `adapters` patterns name, the adapters it owns and the adapters their owners marked shared;
//! it unloads or replaces only the adapters it owns, unless it is an admin.

use crate::quota::QuotaConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One tenant's rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Adapter names (exact, or a prefix followed by `*`) the tenant may use, whoever owns them.
    #[serde(default)]
    pub adapters: Vec<String>,
    /// Adapter names (same syntax) the tenant may load new adapters under; it owns what it loads.
    #[serde(default)]
    pub manage: Vec<String>,
    /// URI prefixes the tenant's tokens may load adapters from.
    #[serde(default)]
    pub load_prefixes: Vec<String>,
    /// Whether the tenant may call the base model without an adapter.
    #[serde(default = "yes")]
    pub base_model: bool,
    /// A backend address all of the tenant's requests go to.
    #[serde(default)]
    pub backend: Option<String>,
    /// Model aliases: the `model` a client sends, mapped to an adapter name.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// An operator tenant: it may load adapters under any name, unload or replace any adapter,
    /// and (with `policy:deploy`) manage every tenant's policy and the default one. Others
    /// manage only what they own.
    #[serde(default)]
    pub admin: bool,
    /// Its share of each backend relative to other tenants: tenants waiting for the same
    /// backend are served tokens in proportion to their weights.
    #[serde(default)]
    pub weight: Weight,
    /// The scheduling priority of its requests on the backends (higher is admitted first and
    /// preempts lower when a backend is full); its policy may choose another, up to
    /// `max_priority`.
    #[serde(default)]
    pub priority: u8,
    /// The highest priority its policy may give a request (default: `priority`).
    #[serde(default)]
    pub max_priority: Option<u8>,
    /// Its quota (see [`crate::quota`]); none by default.
    #[serde(default)]
    pub quota: QuotaConfig,
    /// Whether its requests may reuse cached prompt blocks of other tenants that share, and
    /// theirs its own. Off by default: each tenant's prefix cache is its own (a shared cache
    /// lets one tenant learn, from its time to first token, what others' prompts begin with).
    #[serde(default)]
    pub share_prefix_cache: bool,
}

/// A tenant's weight: from [`Weight::MIN`] to [`Weight::MAX`]; 1 unless set.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Weight(pub f64);

impl Weight {
    pub const MIN: f64 = 0.01;
    pub const MAX: f64 = 100.0;
}

impl Default for Weight {
    fn default() -> Weight {
        Weight(1.0)
    }
}

fn yes() -> bool {
    true
}

/// The gateway's TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    #[serde(default)]
    pub tenants: BTreeMap<String, Tenant>,
}

impl GatewayFile {
    /// Reads and checks the file; the error names the file and the problem.
    pub fn load(path: &Path) -> Result<GatewayFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: GatewayFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        file.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        for (name, t) in &self.tenants {
            validate_tenant_name(name).map_err(|e| format!("tenants.{name}: {e}"))?;
            for (field, patterns) in [("adapters", &t.adapters), ("manage", &t.manage)] {
                if let Some(p) =
                    patterns.iter().find(|p| p.is_empty() || p.strip_suffix('*').unwrap_or(p).contains('*'))
                {
                    return Err(format!("tenants.{name}.{field}: {p:?} must be a name or a prefix ending in '*'"));
                }
            }
            for p in &t.load_prefixes {
                if !(p.starts_with("file://") || p.starts_with("s3://") || p.starts_with("hf://")) {
                    return Err(format!("tenants.{name}.load_prefixes: {p:?} must start with file://, s3:// or hf://"));
                }
            }
            if !(Weight::MIN..=Weight::MAX).contains(&t.weight.0) {
                return Err(format!(
                    "tenants.{name}.weight: {} is out of range ({} to {})",
                    t.weight.0,
                    Weight::MIN,
                    Weight::MAX
                ));
            }
            if t.max_priority.is_some_and(|max| max < t.priority) {
                return Err(format!(
                    "tenants.{name}.max_priority: {} is below its priority, {}",
                    t.max_priority.unwrap_or_default(),
                    t.priority
                ));
            }
            t.quota.check().map_err(|e| format!("tenants.{name}.quota.{e}"))?;
            for (alias, adapter) in &t.models {
                if !t.uses(adapter) && !t.manages(adapter) {
                    return Err(format!(
                        "tenants.{name}.models: alias {alias:?} maps to {adapter:?}, which neither the tenant's adapters nor its manage patterns name"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Tenant names the gateway keeps for itself: `*` scopes the default policy, `-` is the metrics
/// label for anything outside the configured sets, `dry-run` is the tenant of policy dry runs.
pub const RESERVED_TENANT_NAMES: [&str; 3] = ["*", "-", "dry-run"];
/// Longest tenant name.
pub const MAX_TENANT_NAME: usize = 64;

/// Checks a tenant name: 1–64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit, and not
/// one of [`RESERVED_TENANT_NAMES`].
pub fn validate_tenant_name(name: &str) -> Result<(), String> {
    if RESERVED_TENANT_NAMES.contains(&name) {
        return Err(format!("the tenant name {name:?} is reserved"));
    }
    let charset = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty()
        || name.len() > MAX_TENANT_NAME
        || !charset
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err(format!(
            "{name:?} is not a tenant name: use 1 to {MAX_TENANT_NAME} of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// Whether `name` matches one of `patterns` (exact names, or prefixes followed by `*`).
fn matches_any(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

impl Tenant {
    /// Whether the tenant's `adapters` patterns name `name` (a grant to use it, whoever owns it).
    pub fn uses(&self, name: &str) -> bool {
        matches_any(&self.adapters, name)
    }

    /// Whether the tenant's `manage` patterns name `name` (it may load a new adapter there).
    pub fn manages(&self, name: &str) -> bool {
        matches_any(&self.manage, name)
    }

    /// The priority of a request whose policy asked for `asked` (0: the tenant's default),
    /// capped at the tenant's most.
    pub fn priority(&self, asked: u8) -> u8 {
        match asked {
            0 => self.priority,
            asked => asked.min(self.max_priority.unwrap_or(self.priority)),
        }
    }

    /// Whether the tenant's tokens may load from `uri`. A prefix that does not end in `/` only
    /// matches at a path boundary (`s3://acme` does not admit `s3://acme-evil/x`).
    pub fn may_load_from(&self, uri: &str) -> bool {
        self.load_prefixes.iter().any(|p| match uri.strip_prefix(p.as_str()) {
            Some(rest) => p.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('@'),
            None => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(adapters: &[&str], prefixes: &[&str]) -> Tenant {
        Tenant {
            adapters: adapters.iter().map(|s| s.to_string()).collect(),
            load_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn adapter_patterns_and_load_prefixes_match_whole_segments() {
        let t = tenant(&["acme/*", "shared-v1"], &["s3://acme-loras/", "hf://acme", "file:///srv/acme"]);
        assert!(t.uses("acme/support") && t.uses("shared-v1"));
        assert!(!t.uses("shared-v2") && !t.uses("beta/support") && !t.uses("acme"));
        assert!(!t.manages("acme/support"), "using is not managing");
        assert!(t.may_load_from("s3://acme-loras/support-v1"));
        assert!(t.may_load_from("hf://acme/support@v2") && t.may_load_from("file:///srv/acme/a"));
        assert!(!t.may_load_from("hf://acme-evil/support"));
        assert!(!t.may_load_from("file:///srv/acmeother/a"));
        assert!(!t.may_load_from("s3://beta-loras/x"));
    }

    #[test]
    fn the_file_refuses_unknown_keys_and_aliases_outside_the_acl() {
        let ok: GatewayFile = toml::from_str(
            "[tenants.acme]\nadapters = [\"acme/*\"]\nload_prefixes = [\"s3://acme/\"]\n[tenants.acme.models]\nsupport = \"acme/s\"\n",
        )
        .unwrap();
        assert!(ok.check().is_ok());
        assert!(ok.tenants["acme"].base_model, "the base model is allowed unless turned off");
        let typo = toml::from_str::<GatewayFile>("[tenants.acme]\nadapter = [\"acme/*\"]\n").unwrap_err();
        assert!(typo.to_string().contains("adapter"), "{typo}");
        let bad: GatewayFile =
            toml::from_str("[tenants.acme]\nadapters = [\"acme/*\"]\n[tenants.acme.models]\nx = \"beta/s\"\n").unwrap();
        assert!(bad.check().unwrap_err().contains("beta/s"));
        let bad: GatewayFile = toml::from_str("[tenants.acme]\nload_prefixes = [\"/srv\"]\n").unwrap();
        assert!(bad.check().is_err());
        let bad: GatewayFile = toml::from_str("[tenants.acme]\nmanage = [\"a*b\"]\n").unwrap();
        assert!(bad.check().unwrap_err().contains("manage"));
    }

    #[test]
    fn weights_and_priorities_are_checked_and_a_policy_gets_no_more_than_the_most() {
        let file: GatewayFile =
            toml::from_str("[tenants.a]\n[tenants.b]\nweight = 3\npriority = 2\nmax_priority = 5\n").unwrap();
        assert!(file.check().is_ok());
        let (a, b) = (&file.tenants["a"], &file.tenants["b"]);
        assert_eq!((a.weight, b.weight), (Weight(1.0), Weight(3.0)));
        // a: priority 0 and no grant above it; b: 2 unless its policy asks, at most 5.
        assert_eq!([a.priority(0), a.priority(7)], [0, 0]);
        assert_eq!([b.priority(0), b.priority(1), b.priority(4), b.priority(9)], [2, 1, 4, 5]);
        for (text, needle) in [
            ("weight = 0", "weight: 0 is out of range"),
            ("weight = 1000", "out of range"),
            ("weight = nan", "out of range"),
            ("priority = 3\nmax_priority = 1", "max_priority: 1 is below its priority, 3"),
        ] {
            let file: GatewayFile = toml::from_str(&format!("[tenants.a]\n{text}\n")).unwrap();
            let err = file.check().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(toml::from_str::<GatewayFile>("[tenants.a]\npriority = 256\n").is_err());
    }

    #[test]
    fn reserved_and_malformed_tenant_names_are_refused() {
        for name in ["*", "-", "dry-run", "", "-acme", "a b", "ac/me", &"x".repeat(65)] {
            assert!(validate_tenant_name(name).is_err(), "{name:?}");
            let file: GatewayFile = toml::from_str(&format!("[tenants.{:?}]\n", name)).unwrap();
            assert!(file.check().is_err(), "{name:?} in the tenants file");
        }
        for name in ["acme", "acme-2", "a.b_c", "7up"] {
            assert!(validate_tenant_name(name).is_ok(), "{name:?}");
        }
    }
}
