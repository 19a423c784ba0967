//! The gateway's one error type: a stable machine-readable [`Code`], a message that names the
//! problem, and the request field at fault when there is one. Every operation of the gateway
//! (authentication, authorisation, the adapter and policy APIs, dispatching a generation)
//! fails with it; [`crate::openai::error`] maps codes to HTTP statuses, once, and nothing else
//! in the gateway knows about statuses.
//!
//! Codes are part of the API: clients match on them, and adapter operations store them (an
//! operation's outcome is read back by whichever gateway took the request). A code is never
//! renamed or given another meaning; new failures get new codes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Defines [`Code`] with each variant's wire name, so the two cannot drift apart.
macro_rules! codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// What failed. Every variant but [`Code::Refused`] has a fixed name ([`Code::as_str`]).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Code {
            $($(#[doc = $doc])* $variant,)*
            /// A tenant's routing policy refused the request, with the 4xx status and the code
            /// it chose (the policy contract lets a tenant answer its own clients).
            Refused { status: u16, code: String },
        }

        impl Code {
            /// Every fixed name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The name clients see in `error.code`.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Code::$variant => $name,)*
                    Code::Refused { code, .. } => code,
                }
            }

            /// The fixed code named `name`.
            pub fn named(name: &str) -> Option<Code> {
                match name {
                    $($name => Some(Code::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    // The request itself.
    /// The request is malformed or asks for something unsupported.
    InvalidRequest = "invalid_request",
    /// The request names a parameter the endpoint does not have.
    UnknownParameter = "unknown_parameter",
    /// The request sets a parameter this server does not support.
    UnsupportedParameter = "unsupported_parameter",
    /// The request names a tenant that is not configured.
    NoSuchTenant = "no_such_tenant",
    /// The request carries more than one `Authorization` header.
    DuplicateAuthorization = "duplicate_authorization",
    /// The body is larger than the gateway accepts.
    RequestTooLarge = "request_too_large",
    /// The request's headers are larger than the gateway accepts.
    HeadersTooLarge = "headers_too_large",
    /// No endpoint has this path.
    UnknownUrl = "unknown_url",
    /// The endpoint does not take this method.
    MethodNotAllowed = "method_not_allowed",

    // Authentication: the token does not say who is calling.
    /// No bearer token.
    MissingToken = "missing_token",
    /// The token is not a well-formed JWT (or the header not a bearer token).
    MalformedToken = "malformed_token",
    /// The token is signed with an algorithm no configured key accepts.
    AlgorithmNotAccepted = "algorithm_not_accepted",
    /// No configured key has the token's key id.
    UnknownKey = "unknown_key",
    /// The signature does not verify.
    InvalidSignature = "invalid_signature",
    /// The token has expired.
    TokenExpired = "token_expired",
    /// The token is not valid yet.
    TokenNotYetValid = "token_not_yet_valid",
    /// The token is for another audience.
    InvalidAudience = "invalid_audience",
    /// The token's issuer is not trusted.
    InvalidIssuer = "invalid_issuer",
    /// The token lacks a required claim.
    MissingClaim = "missing_claim",
    /// The token names no tenant.
    MissingTenant = "missing_tenant",

    // Authorisation: the caller is known, and not allowed this.
    /// The token lacks the scope the operation needs.
    InsufficientScope = "insufficient_scope",
    /// The token's tenant is not configured.
    UnknownTenant = "unknown_tenant",
    /// The model does not exist for this caller (or is not theirs to see).
    ModelNotFound = "model_not_found",
    /// The routing policy chose a backend the tenant may not use.
    BackendNotAllowed = "backend_not_allowed",
    /// The tenant may not load or unload adapters of this name.
    AdapterNotAllowed = "adapter_not_allowed",
    /// The adapter belongs to another tenant.
    AdapterNotOwned = "adapter_not_owned",
    /// The tenant may not load from this source.
    SourceNotAllowed = "source_not_allowed",
    /// No adapter of this name exists for this caller.
    LoraNotFound = "lora_not_found",
    /// The tenant may not deploy or activate this policy.
    PolicyNotAllowed = "policy_not_allowed",
    /// Only an admin tenant loads adapters for another tenant.
    OwnerNotAllowed = "owner_not_allowed",
    /// The tenant may not set `ignore_eos` (its quota says so).
    IgnoreEosNotAllowed = "ignore_eos_not_allowed",

    // Quotas.
    /// The tenant used its requests or tokens of this minute (`Retry-After` says when to retry).
    RateLimitExceeded = "rate_limit_exceeded",
    /// The tenant has as many requests in flight as its quota allows.
    ConcurrencyLimitExceeded = "concurrency_limit_exceeded",

    // Adapters.
    /// An adapter of this name is loaded from another source (hot swap not asked for).
    LoraExists = "lora_exists",
    /// The named owner differs from the adapter's owner.
    AdapterOwnedByAnother = "adapter_owned_by_another",
    /// A backend found the adapter invalid (its files, its shapes, its rank).
    InvalidAdapter = "invalid_adapter",
    /// A backend could not find the source.
    AdapterSourceNotFound = "adapter_source_not_found",
    /// A backend refused the source (outside its roots or the tenant's load scope).
    AdapterSourceDenied = "adapter_source_denied",
    /// A backend cannot change the adapter now (requests are using it).
    AdapterBusy = "adapter_busy",
    /// Another operation on this adapter is pending.
    OperationInProgress = "operation_in_progress",
    /// The record changed between being read and being written.
    ChangedConcurrently = "changed_concurrently",
    /// The operation is still running after the gateway stopped waiting.
    OperationTimeout = "operation_timeout",
    /// The operation's record disappeared before it finished.
    OperationLost = "operation_lost",
    /// The operation was recorded too late to run.
    OperationExpired = "operation_expired",

    // Backends.
    /// No backend is healthy (or the one a policy chose is not).
    NoBackend = "no_backend",
    /// A backend has no room for the generation now.
    BackendBusy = "backend_busy",
    /// A backend has no room for the adapter (cache or slots).
    BackendResourceExhausted = "backend_resource_exhausted",
    /// A backend is down or timed out.
    BackendUnavailable = "backend_unavailable",
    /// A backend failed in a way it should not, or answered outside its contract.
    BackendError = "backend_error",
    /// A backend ended a generation without finishing it.
    IncompleteGeneration = "incomplete_generation",
    /// No backend produced the first token within the gateway's deadline.
    FirstTokenTimeout = "first_token_timeout",

    // Routing policies.
    /// The policy host is not enabled on this gateway.
    PoliciesDisabled = "policies_disabled",
    /// The component is not a valid routing policy.
    InvalidPolicy = "invalid_policy",
    /// The policy failed its dry run against the tenant's example requests.
    PolicyDryRunFailed = "policy_dry_run_failed",
    /// No policy version has this id (for this caller).
    PolicyNotFound = "policy_not_found",
    /// The tenant has as many policy versions as it may keep.
    PolicyQuotaExceeded = "policy_quota_exceeded",
    /// The version is active (or the rollback target) and cannot be removed.
    PolicyInUse = "policy_in_use",
    /// There is no earlier activation to roll back to.
    NothingToRollBack = "nothing_to_roll_back",
    /// The tenant's policy has faulted repeatedly and is resting.
    PolicyBusy = "policy_busy",
    /// The tenant's policy faulted on this request.
    PolicyFailed = "policy_failed",

    // The shared state.
    /// The state store cannot be written (or read) now.
    StateUnavailable = "state_unavailable",
    /// A record in the state store cannot be read.
    StateDamaged = "state_damaged",
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
        let name = String::deserialize(d)?;
        Code::named(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown error code {name:?}")))
    }
}

/// A failure: what failed, a message naming the problem, and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
#[serde(deny_unknown_fields)]
pub struct Error {
    pub code: Code,
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error { code, message: message.into(), param: None }
    }

    /// A malformed request, naming the field at fault.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Error {
        Error::new(Code::InvalidRequest, message).at(param)
    }

    /// A body over `limit` bytes.
    pub fn too_large(limit: usize) -> Error {
        Error::new(Code::RequestTooLarge, format!("the request body exceeds {limit} bytes"))
    }

    /// The same error, naming the request field at fault.
    pub fn at(mut self, param: Option<&str>) -> Error {
        self.param = param.map(str::to_string);
        self
    }
}

impl From<crate::auth::AuthError> for Error {
    fn from(e: crate::auth::AuthError) -> Error {
        Error::new(e.code(), e.to_string())
    }
}

impl From<crate::authz::Denied> for Error {
    fn from(e: crate::authz::Denied) -> Error {
        use crate::authz::Denied;
        let param = match e {
            Denied::ModelNotFound(_) => Some("model"),
            Denied::NoSuchPolicyScope(_) => Some("tenant"),
            _ => None,
        };
        Error::new(e.code(), e.to_string()).at(param)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip_through_their_names() {
        let mut seen = std::collections::HashSet::new();
        for name in Code::NAMES {
            assert!(seen.insert(name), "{name} is used twice");
            let code = Code::named(name).expect("every listed name parses");
            assert_eq!(code.as_str(), *name);
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(serde_json::from_str::<Code>(&json).expect("deserializes"), code);
        }
        let stored = r#"{"code":"nothing_like_this","message":"m"}"#;
        let refused = serde_json::from_str::<Error>(stored).expect_err("an unknown code is refused");
        assert!(refused.to_string().contains("nothing_like_this"), "{refused}");
    }

    #[test]
    fn auth_and_authz_failures_keep_their_codes() {
        let e = Error::from(crate::auth::AuthError::MissingScope { scope: "lora:load" });
        assert_eq!(e.code, Code::InsufficientScope);
        let e = Error::from(crate::authz::Denied::ModelNotFound("m".into()));
        assert_eq!((e.code, e.param.as_deref()), (Code::ModelNotFound, Some("model")));
    }
}
