//! Tenants: which adapters each may use and manage, where its tokens may load adapters from,
//! and its static routing. Read from the `[tenants.<name>]` tables of the gateway's TOML file;
//! unknown keys are an error.
//!
//! ```toml
//! [tenants.acme]
//! adapters = ["acme/*"]                  # names, or prefixes ending in '*', it may use, load and unload
//! load_prefixes = ["s3://acme-loras/"]   # where its tokens may load adapters from
//! base_model = true                      # may it call the base model (default true)
//! backend = "http://10.0.0.7:50051"      # optional: send all its requests to this backend
//! admin = false                          # may it deploy policies for other tenants
//! [tenants.acme.models]                  # optional aliases: the `model` clients send -> adapter
//! support = "acme/support-v2"
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One tenant's rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Adapter names (exact, or a prefix followed by `*`) the tenant may use, load and unload.
    #[serde(default)]
    pub adapters: Vec<String>,
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
    /// An operator tenant: with `policy:deploy` it may manage every tenant's policy and the
    /// default one (others manage only their own).
    #[serde(default)]
    pub admin: bool,
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
            for p in &t.adapters {
                if p.is_empty() || p.strip_suffix('*').unwrap_or(p).contains('*') {
                    return Err(format!("tenants.{name}.adapters: {p:?} must be a name or a prefix ending in '*'"));
                }
            }
            for p in &t.load_prefixes {
                if !(p.starts_with("file://") || p.starts_with("s3://") || p.starts_with("hf://")) {
                    return Err(format!("tenants.{name}.load_prefixes: {p:?} must start with file://, s3:// or hf://"));
                }
            }
            for (alias, adapter) in &t.models {
                if !t.may_use(adapter) {
                    return Err(format!(
                        "tenants.{name}.models: alias {alias:?} maps to {adapter:?}, which the tenant's adapters do not allow"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Tenant {
    /// Whether the tenant may use (and manage) the adapter `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.adapters.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
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
        assert!(t.may_use("acme/support") && t.may_use("shared-v1"));
        assert!(!t.may_use("shared-v2") && !t.may_use("beta/support") && !t.may_use("acme"));
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
    }
}
