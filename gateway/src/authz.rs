//! The one authorization point. Every path that decides what a caller may do — the OpenAI
//! endpoints after the routing policy has decided, `/v1/models`, `/v1/loras`, `/v1/policies` —
//! asks a [`Caller`] here, and nothing else decides access.
//!
//! The rules:
//! - **The tenant must be configured.** A validly signed token for a tenant the tenants file
//!   does not name is refused (`unknown_tenant`) before any policy runs.
//! - **Using an adapter** is granted by the tenant's `adapters` patterns, by owning it, or by
//!   its owner marking it `shared`. A route to anything else — whatever the policy said — is
//!   answered like a model that does not exist, so names cannot be probed.
//! - **The base model** is used only by tenants with `base_model = true`.
//! - **A backend pin** (`backend` in the tenants file) holds for every route: a policy's route
//!   without a backend goes to the pin, a route to another backend is refused.
//! - **Managing an adapter** (replacing or unloading it) is for its owner or an admin tenant;
//!   loading a new name needs the tenant's `manage` patterns (or admin); the source must be under
//!   the tenant's `load_prefixes`.
//! - **Policies**: a tenant manages its own policy and the versions it uploaded; an admin tenant
//!   manages every tenant's and the default one.

use crate::auth::Principal;
use crate::error::Code;
use crate::loras::DesiredLora;
use crate::policy::Route;
use crate::tenants::Tenant;
use std::collections::BTreeMap;

/// Why a caller may not do what it asked. Messages name the problem, never another tenant's
/// private state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("tenant {0:?} is not configured on this gateway")]
    UnknownTenant(String),
    /// The same answer whether the model does not exist or belongs to someone else.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error(
        "the routing policy sent this request to backend {chosen}, but this tenant's requests are pinned to {pinned}"
    )]
    BackendNotAllowed { chosen: String, pinned: String },
    #[error("this tenant may not load adapters named {0:?}")]
    NameNotAllowed(String),
    #[error(
        "LoRA adapter '{name}' is owned by tenant {owner:?}; only its owner or an admin tenant may replace or unload it"
    )]
    NotOwner { name: String, owner: String },
    #[error("this tenant may not load adapters from {0:?}")]
    SourceNotAllowed(String),
    /// Dynamo's wording, listing only the adapters the caller may see.
    #[error("LoRA adapter '{name}' not found. Available LoRAs: [{available}]")]
    LoraNotFound { name: String, available: String },
    #[error("tenant {0:?} may only manage its own policies")]
    PolicyNotAllowed(String),
    #[error("no tenant {0:?} is configured (omit \"tenant\" for the default policy)")]
    NoSuchPolicyScope(String),
}

impl Denied {
    /// Its stable code.
    pub fn code(&self) -> Code {
        match self {
            Denied::UnknownTenant(_) => Code::UnknownTenant,
            Denied::ModelNotFound(_) => Code::ModelNotFound,
            Denied::BackendNotAllowed { .. } => Code::BackendNotAllowed,
            Denied::NameNotAllowed(_) => Code::AdapterNotAllowed,
            Denied::NotOwner { .. } => Code::AdapterNotOwned,
            Denied::SourceNotAllowed(_) => Code::SourceNotAllowed,
            Denied::LoraNotFound { .. } => Code::LoraNotFound,
            Denied::PolicyNotAllowed(_) => Code::PolicyNotAllowed,
            Denied::NoSuchPolicyScope(_) => Code::NoSuchTenant,
        }
    }
}

/// A verified caller whose tenant is configured.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The tenant's name.
    pub name: &'a str,
    pub tenant: &'a Tenant,
}

/// The caller behind `who`, if its tenant is configured.
pub fn caller<'a>(tenants: &'a BTreeMap<String, Tenant>, who: &Principal) -> Result<Caller<'a>, Denied> {
    match tenants.get_key_value(&who.tenant) {
        Some((name, tenant)) => Ok(Caller { name, tenant }),
        None => Err(Denied::UnknownTenant(who.tenant.clone())),
    }
}

impl Caller<'_> {
    pub fn is_admin(&self) -> bool {
        self.tenant.admin
    }

    /// Whether the caller may send requests through `lora`.
    pub fn may_use(&self, lora: &DesiredLora) -> bool {
        lora.owner == self.name || lora.shared || self.tenant.uses(&lora.name)
    }

    /// Whether the caller may replace or unload `lora`.
    pub fn may_manage(&self, lora: &DesiredLora) -> bool {
        self.is_admin() || lora.owner == self.name
    }

    /// Whether the caller may know that `lora` exists (list it, be told who owns it).
    pub fn may_see(&self, lora: &DesiredLora) -> bool {
        self.may_use(lora) || self.may_manage(lora)
    }

    /// Checks a policy's route for a request that asked for `model`, and applies the tenant's
    /// backend pin. `loras` is the desired set the request is routed against.
    pub fn route(&self, model: &str, route: Route, loras: &BTreeMap<String, DesiredLora>) -> Result<Route, Denied> {
        let allowed = match &route.adapter {
            None => self.tenant.base_model,
            Some(name) => loras.get(name).is_some_and(|l| self.may_use(l)),
        };
        if !allowed {
            return Err(Denied::ModelNotFound(model.to_string()));
        }
        let backend = match (&self.tenant.backend, route.backend) {
            (None, chosen) => chosen,
            (Some(pin), None) => Some(pin.clone()),
            (Some(pin), Some(chosen)) if *pin == chosen => Some(chosen),
            (Some(pin), Some(chosen)) => return Err(Denied::BackendNotAllowed { chosen, pinned: pin.clone() }),
        };
        Ok(Route { adapter: route.adapter, backend, priority: self.tenant.priority(route.priority) })
    }

    /// Checks a load of `uri` under `name`, where `existing` is what the name holds now.
    pub fn check_load(&self, name: &str, uri: &str, existing: Option<&DesiredLora>) -> Result<(), Denied> {
        match existing {
            // Another tenant's private adapter: answered as if the name were outside the grant.
            Some(l) if !self.may_see(l) => return Err(Denied::NameNotAllowed(name.to_string())),
            Some(l) if !self.may_manage(l) => {
                return Err(Denied::NotOwner { name: name.to_string(), owner: l.owner.clone() });
            }
            None if !(self.is_admin() || self.tenant.manages(name)) => {
                return Err(Denied::NameNotAllowed(name.to_string()));
            }
            _ => {}
        }
        if !self.tenant.may_load_from(uri) {
            return Err(Denied::SourceNotAllowed(uri.to_string()));
        }
        Ok(())
    }

    /// Checks an unload of `name`, where `existing` is what the name holds now and `loras` the
    /// desired set (for the not-found message, which lists only what the caller may see).
    /// Returns the adapter to unload.
    pub fn check_unload<'l>(
        &self,
        name: &str,
        existing: Option<&'l DesiredLora>,
        loras: &BTreeMap<String, DesiredLora>,
    ) -> Result<&'l DesiredLora, Denied> {
        match existing {
            Some(l) if self.may_manage(l) => Ok(l),
            Some(l) if self.may_see(l) => Err(Denied::NotOwner { name: name.to_string(), owner: l.owner.clone() }),
            _ => {
                let available: Vec<String> =
                    loras.values().filter(|l| self.may_see(l)).map(|l| format!("'{}'", l.name)).collect();
                Err(Denied::LoraNotFound { name: name.to_string(), available: available.join(", ") })
            }
        }
    }

    /// The policy scope a call names: the caller's own tenant when `requested` is `None`, except
    /// for admins, whose default is the default policy ([`crate::policy::deploy::DEFAULT_SCOPE`]).
    /// Another tenant's scope is for admins only, and must be a configured tenant.
    pub fn policy_scope(&self, requested: Option<&str>, tenants: &BTreeMap<String, Tenant>) -> Result<String, Denied> {
        match requested {
            None if self.is_admin() => Ok(crate::policy::deploy::DEFAULT_SCOPE.to_string()),
            None => Ok(self.name.to_string()),
            Some(t) if t == self.name => Ok(t.to_string()),
            Some(_) if !self.is_admin() => Err(Denied::PolicyNotAllowed(self.name.to_string())),
            Some(t) if tenants.contains_key(t) => Ok(t.to_string()),
            Some(t) => Err(Denied::NoSuchPolicyScope(t.to_string())),
        }
    }

    /// Whether the caller may list a policy version uploaded by `uploaded_by`; `runs` says
    /// whether the caller's own activation history names it.
    pub fn may_see_version(&self, uploaded_by: &str, runs: bool) -> bool {
        self.is_admin() || uploaded_by == self.name || runs
    }

    /// Whether the caller may activate a version: one it may see, or one an admin tenant
    /// uploaded (operators publish components their tenants configure).
    pub fn may_activate_version(&self, uploaded_by: &str, by_admin: bool, runs: bool) -> bool {
        by_admin || self.may_see_version(uploaded_by, runs)
    }

    /// Whether the caller may delete a version: its uploader or an admin.
    pub fn may_delete_version(&self, uploaded_by: &str) -> bool {
        self.is_admin() || uploaded_by == self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::GatewayFile;

    fn tenants() -> BTreeMap<String, Tenant> {
        let file: GatewayFile = toml::from_str(
            r#"
            [tenants.ops]
            admin = true
            load_prefixes = ["s3://ops/"]
            [tenants.acme]
            adapters = ["acme/*", "french"]
            manage = ["acme/*"]
            load_prefixes = ["s3://acme/"]
            backend = "http://b2:1"
            [tenants.globex]
            manage = ["globex/*"]
            base_model = false
            "#,
        )
        .unwrap();
        file.tenants
    }

    fn lora(name: &str, owner: &str, shared: bool) -> DesiredLora {
        DesiredLora { shared, ..DesiredLora::new(name, &format!("s3://{owner}/{name}"), owner) }
    }

    fn who(tenant: &str) -> Principal {
        Principal { subject: None, tenant: tenant.into(), scopes: Default::default(), claims: Default::default() }
    }

    fn set(loras: &[DesiredLora]) -> BTreeMap<String, DesiredLora> {
        loras.iter().map(|l| (l.name.clone(), l.clone())).collect()
    }

    #[test]
    fn unknown_tenants_are_refused_whatever_their_token_says() {
        let t = tenants();
        assert_eq!(caller(&t, &who("mallory")).unwrap_err(), Denied::UnknownTenant("mallory".into()));
        assert_eq!(caller(&t, &who("*")).unwrap_err().code(), Code::UnknownTenant);
        assert_eq!(caller(&t, &who("acme")).unwrap().name, "acme");
    }

    #[test]
    fn routes_are_checked_against_use_grants_the_base_model_rule_and_the_pin() {
        let t = tenants();
        let loras = set(&[
            lora("acme/a", "acme", false),
            lora("french", "ops", false),
            lora("globex/g", "globex", false),
            lora("shared-v1", "ops", true),
            lora("ops/private", "ops", false),
        ]);
        let acme = caller(&t, &who("acme")).unwrap();
        let route = |adapter: Option<&str>, backend: Option<&str>| Route {
            adapter: adapter.map(Into::into),
            backend: backend.map(Into::into),
            priority: 0,
        };
        // Its own, a pattern grant and a shared adapter; never someone else's private one.
        for name in ["acme/a", "french", "shared-v1"] {
            assert_eq!(acme.route("m", route(Some(name), None), &loras), Ok(route(Some(name), Some("http://b2:1"))));
        }
        for name in ["globex/g", "ops/private", "acme/not-loaded"] {
            assert_eq!(acme.route("m", route(Some(name), None), &loras), Err(Denied::ModelNotFound("m".into())));
        }
        // The pin holds for a route without a backend, and refuses a route elsewhere.
        assert_eq!(acme.route("m", route(None, Some("http://b2:1")), &loras), Ok(route(None, Some("http://b2:1"))));
        assert_eq!(
            acme.route("m", route(None, Some("http://b1:1")), &loras).unwrap_err().code(),
            Code::BackendNotAllowed
        );
        // No base model for globex, whoever routes it there.
        let globex = caller(&t, &who("globex")).unwrap();
        assert_eq!(globex.route("base", route(None, None), &loras), Err(Denied::ModelNotFound("base".into())));
        assert_eq!(globex.route("x", route(Some("globex/g"), None), &loras), Ok(route(Some("globex/g"), None)));
    }

    #[test]
    fn using_is_not_managing() {
        let t = tenants();
        let french = lora("french", "ops", false);
        let acme = caller(&t, &who("acme")).unwrap();
        assert!(acme.may_use(&french) && !acme.may_manage(&french));
        assert_eq!(
            acme.check_unload("french", Some(&french), &set(std::slice::from_ref(&french))).unwrap_err().code(),
            Code::AdapterNotOwned
        );
        assert_eq!(
            acme.check_load("french", "s3://acme/french-v2", Some(&french)).unwrap_err().code(),
            Code::AdapterNotOwned,
            "a hot swap of another tenant's adapter"
        );
        let ops = caller(&t, &who("ops")).unwrap();
        assert!(ops.check_unload("french", Some(&french), &set(&[])).is_ok());
        assert!(ops.check_load("french", "s3://ops/french-v2", Some(&french)).is_ok());
        // A name it may not create, and a source outside its prefixes.
        assert_eq!(acme.check_load("json", "s3://acme/json", None).unwrap_err().code(), Code::AdapterNotAllowed);
        assert_eq!(acme.check_load("acme/j", "s3://ops/json", None).unwrap_err().code(), Code::SourceNotAllowed);
        assert!(acme.check_load("acme/j", "s3://acme/json", None).is_ok());
    }

    #[test]
    fn another_tenants_private_adapter_looks_like_no_adapter_at_all() {
        let t = tenants();
        let theirs = lora("globex/g", "globex", false);
        let acme = caller(&t, &who("acme")).unwrap();
        let loras = set(&[theirs.clone(), lora("acme/a", "acme", false)]);
        let e = acme.check_unload("globex/g", Some(&theirs), &loras).unwrap_err();
        assert_eq!(e, acme.check_unload("globex/g", None, &loras).unwrap_err(), "same answer as a missing name");
        assert_eq!(e.to_string(), "LoRA adapter 'globex/g' not found. Available LoRAs: ['acme/a']");
        assert_eq!(
            acme.check_load("globex/g", "s3://acme/x", Some(&theirs)).unwrap_err().code(),
            Code::AdapterNotAllowed
        );
    }

    #[test]
    fn policy_scopes_are_the_callers_own_unless_it_is_an_admin() {
        let t = tenants();
        let acme = caller(&t, &who("acme")).unwrap();
        assert_eq!(acme.policy_scope(None, &t).unwrap(), "acme");
        assert_eq!(acme.policy_scope(Some("globex"), &t).unwrap_err().code(), Code::PolicyNotAllowed);
        let ops = caller(&t, &who("ops")).unwrap();
        assert_eq!(ops.policy_scope(None, &t).unwrap(), "*");
        assert_eq!(ops.policy_scope(Some("globex"), &t).unwrap(), "globex");
        assert_eq!(ops.policy_scope(Some("*"), &t).unwrap_err().code(), Code::NoSuchTenant);
        assert_eq!(ops.policy_scope(Some("mallory"), &t).unwrap_err().code(), Code::NoSuchTenant);
    }
}
