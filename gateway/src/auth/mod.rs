//! Caller authentication: bearer JWTs verified against configured keys.
//!
//! - Algorithms: HS256 (a shared secret), RS256, ES256 and EdDSA (public keys from PEM files or
//!   a JWKS file). Every key is bound to one algorithm, and a token is only ever checked with
//!   keys bound to the algorithm its header names — so `alg: none`, an unknown algorithm, and
//!   algorithm confusion (an HS256 token "signed" with an RSA public key) are all refused.
//! - Claims: `exp` is required; `nbf` is enforced when present; `iss` and `aud` are required and
//!   checked when configured; all with a small leeway for clock skew.
//! - Identity: the tenant comes from a configurable claim; scopes from `scope` (space-separated,
//!   RFC 8693) or `scp` (a list or a string).
//! - A JWKS file is re-read when it changes ([`Verifier::reload_if_changed`]); a bad new file is
//!   reported and the previous keys stay in use.
//! - Tokens that verified are remembered by their text until they expire, for the key set that
//!   verified them (as Envoy's `jwt_authn` cache does): a client sends the same token on every
//!   request, and the signature check and claim parsing are most of what authentication costs.

mod keys;

pub use jsonwebtoken::Algorithm;
pub use keys::{KeyError, KeySet, read_hs256_secret};

use crate::error::Code;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::ErrorKind;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// Clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The claim naming the caller's tenant, unless configured otherwise.
pub const DEFAULT_TENANT_CLAIM: &str = "tenant";

/// What the gateway may do on a caller's behalf beyond inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    LoraLoad,
    LoraUnload,
    LoraRead,
    PolicyDeploy,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::LoraLoad => "lora:load",
            Scope::LoraUnload => "lora:unload",
            Scope::LoraRead => "lora:read",
            Scope::PolicyDeploy => "policy:deploy",
        }
    }
}

/// How tokens are verified.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (the token's `aud` must contain it), when set.
    pub audience: Option<String>,
    pub leeway: Duration,
    /// The claim holding the caller's tenant.
    pub tenant_claim: String,
    /// File holding the HS256 shared secret (its bytes, trailing newline removed).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM public keys, each bound to the algorithm given with it (RS256, ES256 or EdDSA).
    pub public_keys: Vec<(Algorithm, PathBuf)>,
    /// A JWKS document (`{"keys": [...]}`), re-read when it changes.
    pub jwks_file: Option<PathBuf>,
}

/// Mints an HS256 token carrying `claims`. For development and tests (`switchyard token`):
/// in production, tokens come from the identity provider.
pub fn mint_hs256(secret: &[u8], claims: &serde_json::Map<String, Value>) -> Result<String, String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret).map_err(|e| e.to_string())?;
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), claims, &key).map_err(|e| e.to_string())
}

/// Reads `ALG=PATH` (e.g. `RS256=/etc/switchyard/issuer.pem`): a public key file bound to one
/// of the asymmetric algorithms the gateway accepts.
pub fn parse_public_key_arg(arg: &str) -> Result<(Algorithm, PathBuf), String> {
    let (alg, path) = arg.split_once('=').ok_or_else(|| format!("{arg:?} is not ALG=PATH (e.g. RS256=key.pem)"))?;
    let alg = match alg {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(format!("algorithm {other:?} is not one of RS256, ES256, EdDSA")),
    };
    if path.is_empty() {
        return Err(format!("{arg:?} names no file"));
    }
    Ok((alg, PathBuf::from(path)))
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            issuer: None,
            audience: None,
            leeway: DEFAULT_LEEWAY,
            tenant_claim: DEFAULT_TENANT_CLAIM.to_string(),
            hs256_secret_file: None,
            public_keys: Vec::new(),
            jwks_file: None,
        }
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`, when present.
    pub subject: Option<String>,
    pub tenant: String,
    pub scopes: BTreeSet<String>,
    /// Every claim of the verified token (routing policies may read them).
    pub claims: serde_json::Map<String, Value>,
}

impl Principal {
    /// Refuses unless the token carries `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.scopes.contains(scope.as_str()) {
            Ok(())
        } else {
            Err(AuthError::MissingScope { scope: scope.as_str() })
        }
    }
}

/// Why a caller was refused. Messages say what is wrong with the token, never its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token (send Authorization: Bearer <JWT>)")]
    MissingToken,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0} is not accepted here")]
    AlgorithmNotAccepted(String),
    #[error("no key with id {0:?} accepts this token")]
    UnknownKey(String),
    #[error("invalid token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token audience does not include this gateway")]
    WrongAudience,
    #[error("token issuer is not trusted")]
    WrongIssuer,
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("token has no tenant (claim {claim:?} must be a non-empty string)")]
    NoTenant { claim: String },
    #[error("token lacks the scope {scope:?}")]
    MissingScope { scope: &'static str },
}

impl AuthError {
    /// Its stable code (mapped to 401, or 403 for a token that authenticates but does not
    /// allow the call).
    pub fn code(&self) -> Code {
        match self {
            AuthError::MissingToken => Code::MissingToken,
            AuthError::Malformed(_) => Code::MalformedToken,
            AuthError::AlgorithmNotAccepted(_) => Code::AlgorithmNotAccepted,
            AuthError::UnknownKey(_) => Code::UnknownKey,
            AuthError::BadSignature => Code::InvalidSignature,
            AuthError::Expired => Code::TokenExpired,
            AuthError::NotYetValid => Code::TokenNotYetValid,
            AuthError::WrongAudience => Code::InvalidAudience,
            AuthError::WrongIssuer => Code::InvalidIssuer,
            AuthError::MissingClaim(_) => Code::MissingClaim,
            AuthError::NoTenant { .. } => Code::MissingTenant,
            AuthError::MissingScope { .. } => Code::InsufficientScope,
        }
    }
}

fn from_jwt(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.into_kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            AuthError::AlgorithmNotAccepted("(mismatched with the key)".into())
        }
        ErrorKind::InvalidClaimFormat(c) => AuthError::Malformed(format!("claim {c:?} has the wrong type")),
        other => AuthError::Malformed(format!("{other:?}")),
    }
}

/// Verified tokens the cache holds at most; past it, the expired go first, then all.
pub const CACHED_TOKENS: usize = 4096;

/// Verifies bearer tokens. Shared by every request; the key set is swapped whole on reload.
#[derive(Debug)]
pub struct Verifier {
    config: AuthConfig,
    keys: RwLock<Arc<KeySet>>,
    /// Modification time of the JWKS file the current keys were read from.
    jwks_seen: Mutex<Option<SystemTime>>,
    verified: Mutex<HashMap<String, Verified>>,
}

/// A token that verified: who it speaks for, until when, and with which keys.
#[derive(Debug)]
struct Verified {
    principal: Arc<Principal>,
    /// Unix seconds after which a fresh check would refuse it (`exp` plus the leeway).
    until: u64,
    /// The key set that verified it: after a reload, it is checked again.
    keys: Arc<KeySet>,
}

impl Verifier {
    /// Loads every configured key; any unreadable or invalid key is a configuration error.
    pub fn new(config: AuthConfig) -> Result<Verifier, KeyError> {
        let seen = config.jwks_file.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        let keys = KeySet::load(&config)?;
        Ok(Verifier {
            config,
            keys: RwLock::new(Arc::new(keys)),
            jwks_seen: Mutex::new(seen),
            verified: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    fn current(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a complete key set: it is only ever replaced whole.
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads the keys if the JWKS file changed since they were read. Returns whether new
    /// keys are in use; on error the previous keys stay.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let Some(path) = &self.config.jwks_file else {
            return Ok(false);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut seen = self.jwks_seen.lock().unwrap_or_else(|p| p.into_inner());
        if modified == *seen {
            return Ok(false);
        }
        let keys = KeySet::load(&self.config)?;
        *seen = modified;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        tracing::info!(jwks = %path.display(), "JWT keys reloaded");
        Ok(true)
    }

    /// Verifies an `Authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, header: Option<&str>) -> Result<Arc<Principal>, AuthError> {
        let value = header.ok_or(AuthError::MissingToken)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        self.verify(token)
    }

    /// Verifies a token and reads the caller's identity from it.
    pub fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let keys = self.current();
        let now = crate::unix_seconds();
        {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            match verified.get(token) {
                Some(v) if now <= v.until && Arc::ptr_eq(&v.keys, &keys) => return Ok(v.principal.clone()),
                Some(_) => {
                    verified.remove(token);
                }
                None => {}
            }
        }
        let (principal, exp) = self.check(token, &keys)?;
        let principal = Arc::new(principal);
        let until = exp.saturating_add(self.config.leeway.as_secs());
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= CACHED_TOKENS {
            verified.retain(|_, v| now <= v.until && Arc::ptr_eq(&v.keys, &keys));
            if verified.len() >= CACHED_TOKENS {
                verified.clear();
            }
        }
        verified.insert(token.to_string(), Verified { principal: principal.clone(), until, keys });
        Ok(principal)
    }

    /// Checks a token's signature and claims with `keys`: who it speaks for, and its `exp`.
    fn check(&self, token: &str, keys: &KeySet) -> Result<(Principal, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            // `alg` values the library does not know, `none` included, fail to parse.
            ErrorKind::Json(_) => AuthError::AlgorithmNotAccepted("(unknown or none)".into()),
            _ => AuthError::Malformed("not a JWS compact token".into()),
        })?;
        let candidates = keys.candidates(header.alg, header.kid.as_deref())?;
        let c = &self.config;
        let mut validation = Validation::new(header.alg);
        validation.leeway = c.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &c.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        let mut last = AuthError::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, key, &validation) {
                Ok(data) => {
                    // Required, and checked to be a number, by the validation.
                    let exp = data.claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0) as u64;
                    return Ok((self.principal(&data.claims)?, exp));
                }
                // Another key with the same algorithm (and no kid) may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => last = AuthError::BadSignature,
                Err(e) => return Err(from_jwt(e)),
            }
        }
        Err(last)
    }

    fn principal(&self, claims: &serde_json::Map<String, Value>) -> Result<Principal, AuthError> {
        let claim = &self.config.tenant_claim;
        let tenant = claims
            .get(claim)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::NoTenant { claim: claim.clone() })?
            .to_string();
        let mut scopes = BTreeSet::new();
        for name in ["scope", "scp"] {
            match claims.get(name) {
                Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
                Some(Value::Array(items)) => scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_string)),
                Some(_) => return Err(AuthError::Malformed(format!("claim {name:?} has the wrong type"))),
                None => {}
            }
        }
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_string);
        Ok(Principal { subject, tenant, scopes, claims: claims.clone() })
    }
}

/// Re-reads the JWKS file every `every` while the verifier is in use.
pub fn spawn_reloader(verifier: Arc<Verifier>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Err(e) = verifier.reload_if_changed() {
                tracing::warn!(error = %e, "JWKS file changed but could not be used; keeping the previous keys");
            }
        }
    })
}

#[cfg(test)]
mod tests;
