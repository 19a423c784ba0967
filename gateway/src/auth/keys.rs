//! The keys tokens are verified with, each bound to one algorithm.

use super::{AuthConfig, AuthError};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::path::{Path, PathBuf};

/// Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_HS256_SECRET: usize = 32;

/// Why the configured keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no JWT keys configured: give an HS256 secret, a public key or a JWKS file")]
    NoKeys,
}

struct VerifyingKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Every key a gateway accepts tokens from.
pub struct KeySet {
    keys: Vec<VerifyingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| (k.kid.as_deref(), k.alg))).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io { path: path.to_path_buf(), source })
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

/// The algorithm a JWK is for: its `alg`, else the one its key type implies.
fn jwk_algorithm(alg: Option<KeyAlgorithm>, params: &AlgorithmParameters) -> Result<Algorithm, String> {
    let implied = match params {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Some(Algorithm::ES256),
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        AlgorithmParameters::OctetKey(_) => Some(Algorithm::HS256),
        _ => None,
    };
    let alg = match alg {
        Some(a) => Algorithm::try_from(a).map_err(|_| format!("algorithm {a:?} is not a signature algorithm"))?,
        None => implied.ok_or("key type not supported (RSA, EC P-256, Ed25519 or oct)")?,
    };
    if !ACCEPTED.contains(&alg) {
        return Err(format!("algorithm {alg:?} is not accepted (HS256, RS256, ES256, EdDSA)"));
    }
    Ok(alg)
}

/// The algorithms tokens may use.
const ACCEPTED: [Algorithm; 4] = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Reads an HS256 secret file: its bytes, trailing newline removed, at least
/// [`MIN_HS256_SECRET`] of them.
pub fn read_hs256_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let mut secret = read(path)?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_HS256_SECRET {
        return Err(invalid(path, format!("an HS256 secret needs at least {MIN_HS256_SECRET} bytes")));
    }
    Ok(secret)
}

impl KeySet {
    /// Reads every configured key.
    pub fn load(config: &AuthConfig) -> Result<KeySet, KeyError> {
        let mut keys = Vec::new();
        if let Some(path) = &config.hs256_secret_file {
            let secret = read_hs256_secret(path)?;
            let key = DecodingKey::from_secret(&secret).map_err(|e| invalid(path, e.to_string()))?;
            keys.push(VerifyingKey { kid: None, alg: Algorithm::HS256, key });
        }
        for (alg, path) in &config.public_keys {
            let pem = read(path)?;
            let key = match alg {
                Algorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                Algorithm::ES256 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                other => {
                    return Err(invalid(
                        path,
                        format!("{other:?} keys are not PEM public keys; use RS256, ES256 or EdDSA"),
                    ));
                }
            }
            .map_err(|e| invalid(path, format!("not a {alg:?} public key in PEM: {e}")))?;
            keys.push(VerifyingKey { kid: None, alg: *alg, key });
        }
        if let Some(path) = &config.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(path)?).map_err(|e| invalid(path, format!("not a JWKS document: {e}")))?;
            for jwk in &set.keys {
                let kid = jwk.common.key_id.clone();
                if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                    continue;
                }
                let name = kid.as_deref().unwrap_or("(no kid)");
                let alg = jwk_algorithm(jwk.common.key_algorithm, &jwk.algorithm)
                    .map_err(|reason| invalid(path, format!("key {name}: {reason}")))?;
                let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(path, format!("key {name}: {e}")))?;
                keys.push(VerifyingKey { kid, alg, key });
            }
        }
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        Ok(KeySet { keys })
    }

    /// The keys that may have signed a token with this header: bound to its algorithm, and
    /// with its `kid` when it names one.
    pub(super) fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Result<Vec<&DecodingKey>, AuthError> {
        let not_accepted = || AuthError::AlgorithmNotAccepted(format!("{alg:?}"));
        if !ACCEPTED.contains(&alg) || !self.keys.iter().any(|k| k.alg == alg) {
            return Err(not_accepted());
        }
        let keys: Vec<&DecodingKey> = match kid {
            Some(kid) => {
                let named: Vec<&VerifyingKey> = self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).collect();
                if named.is_empty() {
                    return Err(AuthError::UnknownKey(kid.to_string()));
                }
                named.into_iter().filter(|k| k.alg == alg).map(|k| &k.key).collect()
            }
            None => self.keys.iter().filter(|k| k.alg == alg).map(|k| &k.key).collect(),
        };
        if keys.is_empty() {
            return Err(not_accepted());
        }
        Ok(keys)
    }
}
