//! Tokens minted here with fresh keys of every accepted kind, and every way of forging one.

use super::*;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use std::path::Path;

fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64")).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A signing key and the public half as the gateway is configured with it.
struct Signer {
    alg: Algorithm,
    encoding: EncodingKey,
    /// PEM public key (or the HS256 secret).
    public: Vec<u8>,
    /// The key as a JWK (EC and Ed25519 only).
    jwk: Option<Value>,
}

fn es256() -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("keygen");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("parse");
    let spki = pair.public_key().as_der().expect("spki");
    let point = pair.public_key().as_ref().to_vec();
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    Signer {
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        public: pem("PUBLIC KEY", spki.as_ref()).into_bytes(),
        jwk: Some(jwk),
    }
}

fn ed25519() -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse");
    let spki = pair.public_key().as_der().expect("spki");
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())});
    Signer {
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
        public: pem("PUBLIC KEY", spki.as_ref()).into_bytes(),
        jwk: Some(jwk),
    }
}

fn rs256() -> Signer {
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("keygen");
    let private = pem("PRIVATE KEY", pair.as_der().expect("pkcs8").as_ref());
    let spki = pair.public_key().as_der().expect("spki");
    Signer {
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(private.as_bytes()).expect("rsa pem"),
        public: pem("PUBLIC KEY", spki.as_ref()).into_bytes(),
        jwk: None,
    }
}

fn hs256() -> Signer {
    let secret = b"a shared secret of at least thirty-two bytes".to_vec();
    Signer {
        alg: Algorithm::HS256,
        encoding: EncodingKey::from_secret(&secret).expect("secret"),
        public: secret,
        jwk: None,
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs()
}

fn claims() -> Value {
    json!({"sub": "alice", "tenant": "acme", "iss": "https://idp.test", "aud": "switchyard", "exp": now() + 300,
           "scope": "lora:read lora:load"})
}

fn mint(s: &Signer, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(s.alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &s.encoding).expect("encodes")
}

/// A verifier trusting `signers` (written to files in `dir`), with issuer and audience set.
fn verifier(dir: &Path, signers: &[&Signer]) -> Verifier {
    let mut config = AuthConfig {
        issuer: Some("https://idp.test".into()),
        audience: Some("switchyard".into()),
        ..AuthConfig::default()
    };
    for (i, s) in signers.iter().enumerate() {
        let path = dir.join(format!("key-{i}"));
        std::fs::write(&path, &s.public).expect("write key");
        match s.alg {
            Algorithm::HS256 => config.hs256_secret_file = Some(path),
            alg => config.public_keys.push((alg, path)),
        }
    }
    Verifier::new(config).expect("keys load")
}

#[test]
fn tokens_of_every_accepted_algorithm_verify_and_name_the_tenant_and_scopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signers = [hs256(), rs256(), es256(), ed25519()];
    let v = verifier(dir.path(), &signers.iter().collect::<Vec<_>>());
    for s in &signers {
        let p = v.verify(&mint(s, &claims(), None)).unwrap_or_else(|e| panic!("{:?}: {e}", s.alg));
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.subject.as_deref(), Some("alice"));
        assert_eq!(p.scopes, BTreeSet::from(["lora:read".to_string(), "lora:load".to_string()]));
        assert_eq!(p.require(Scope::LoraLoad), Ok(()));
        let denied = p.require(Scope::PolicyDeploy).expect_err("no policy scope");
        assert_eq!(denied.code(), crate::error::Code::InsufficientScope);
    }
    // `scp` as a list works too, and the header form is what HTTP carries.
    let mut c = claims();
    c.as_object_mut().expect("object").remove("scope");
    c["scp"] = json!(["lora:unload"]);
    let token = mint(&signers[2], &c, None);
    let p = v.verify_header(Some(&format!("Bearer {token}"))).expect("verifies");
    assert_eq!(p.scopes, BTreeSet::from(["lora:unload".to_string()]));
}

#[test]
fn forged_expired_and_misdirected_tokens_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, ec) = (rs256(), es256());
    let v = verifier(dir.path(), &[&rsa, &ec]);
    let good = mint(&rsa, &claims(), None);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        c
    };
    let refused = |token: &str| v.verify(token).expect_err("refused");

    // alg none: an unsigned token.
    let parts: Vec<&str> = good.split('.').collect();
    let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    assert!(matches!(refused(&none), AuthError::AlgorithmNotAccepted(_)));
    // HS/RS confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    let confused =
        encode(&Header::new(Algorithm::HS256), &claims(), &EncodingKey::from_secret(&rsa.public).expect("k"))
            .expect("encodes");
    assert!(matches!(refused(&confused), AuthError::AlgorithmNotAccepted(_)));
    // A key the gateway does not trust.
    assert_eq!(refused(&mint(&es256(), &claims(), None)), AuthError::BadSignature);
    // The payload changed after signing.
    let tampered_claims = URL_SAFE_NO_PAD.encode(with(&|c| c["tenant"] = json!("other")).to_string());
    assert_eq!(refused(&format!("{}.{tampered_claims}.{}", parts[0], parts[2])), AuthError::BadSignature);
    // Time, audience, issuer, tenant.
    assert_eq!(refused(&mint(&rsa, &with(&|c| c["exp"] = json!(now() - 120)), None)), AuthError::Expired);
    assert_eq!(refused(&mint(&rsa, &with(&|c| c["nbf"] = json!(now() + 120)), None)), AuthError::NotYetValid);
    assert_eq!(refused(&mint(&rsa, &with(&|c| c["aud"] = json!("someone-else")), None)), AuthError::WrongAudience);
    assert_eq!(refused(&mint(&rsa, &with(&|c| c["iss"] = json!("https://evil.test")), None)), AuthError::WrongIssuer);
    let no_aud = with(&|c| {
        c.as_object_mut().expect("object").remove("aud");
    });
    assert_eq!(refused(&mint(&rsa, &no_aud, None)), AuthError::MissingClaim("aud".into()));
    let no_exp = with(&|c| {
        c.as_object_mut().expect("object").remove("exp");
    });
    assert_eq!(refused(&mint(&rsa, &no_exp, None)), AuthError::MissingClaim("exp".into()));
    let no_tenant = with(&|c| c["tenant"] = json!(""));
    assert!(matches!(refused(&mint(&rsa, &no_tenant, None)), AuthError::NoTenant { .. }));
    // Within the leeway, a just-expired token still passes.
    v.verify(&mint(&rsa, &with(&|c| c["exp"] = json!(now() - 5)), None)).expect("inside the leeway");
    // Not a token at all, or no token.
    assert!(matches!(refused("not-a-jwt"), AuthError::Malformed(_)));
    assert_eq!(v.verify_header(None), Err(AuthError::MissingToken));
    assert_eq!(v.verify_header(Some("Basic YWxpY2U6cHc=")), Err(AuthError::MissingToken));
    v.verify(&good).expect("the unmodified token verifies");
}

#[test]
fn a_verified_token_is_remembered_only_until_it_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hs = hs256();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, &hs.public).expect("write");
    let config = AuthConfig { leeway: Duration::ZERO, hs256_secret_file: Some(secret), ..AuthConfig::default() };
    let v = Verifier::new(config).expect("loads");
    let mut short = claims();
    short["exp"] = json!(now() + 1);
    let token = mint(&hs, &short, None);
    let first = v.verify(&token).expect("valid now");
    assert_eq!(v.verify(&token).expect("valid still"), first, "the same caller, from the cache");
    // Another tenant's token is its own entry.
    let mut other = claims();
    other["tenant"] = json!("globex");
    assert_eq!(v.verify(&mint(&hs, &other, None)).expect("valid").tenant, "globex");
    while now() <= short["exp"].as_u64().expect("exp") {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(v.verify(&token), Err(AuthError::Expired), "served from the cache past its exp");
}

#[test]
fn a_jwks_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_old_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let (a, b, c) = (es256(), es256(), ed25519());
    let with_kid = |s: &Signer, kid: &str| {
        let mut jwk = s.jwk.clone().expect("jwk");
        jwk["kid"] = json!(kid);
        jwk
    };
    std::fs::write(&path, json!({"keys": [with_kid(&a, "a")]}).to_string()).expect("write");
    let config = AuthConfig { jwks_file: Some(path.clone()), ..AuthConfig::default() };
    let v = Verifier::new(config).expect("loads");
    let token_a = mint(&a, &claims(), Some("a"));
    let token_b = mint(&b, &claims(), Some("b"));
    v.verify(&token_a).expect("a is trusted");
    assert_eq!(v.verify(&token_b), Err(AuthError::UnknownKey("b".into())));
    assert!(!v.reload_if_changed().expect("unchanged"), "nothing changed");

    let touch = |text: String, secs: u64| {
        std::fs::write(&path, text).expect("write");
        let f = std::fs::File::options().append(true).open(&path).expect("open");
        f.set_modified(SystemTime::now() + Duration::from_secs(secs)).expect("mtime");
    };
    touch(json!({"keys": [with_kid(&b, "b"), with_kid(&c, "c")]}).to_string(), 10);
    assert!(v.reload_if_changed().expect("reloads"));
    v.verify(&token_b).expect("b is trusted now");
    v.verify(&mint(&c, &claims(), Some("c"))).expect("an Ed25519 JWK works too");
    // Token a verified before, with the keys replaced since: checked again, and refused.
    assert_eq!(v.verify(&token_a), Err(AuthError::UnknownKey("a".into())));

    touch("{not json".into(), 20);
    assert!(matches!(v.reload_if_changed(), Err(KeyError::Invalid { .. })));
    v.verify(&token_b).expect("the previous keys stay");
}

#[test]
fn unusable_key_configurations_fail_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(Verifier::new(AuthConfig::default()), Err(KeyError::NoKeys)));
    let short = dir.path().join("short");
    std::fs::write(&short, "too short\n").expect("write");
    let config = AuthConfig { hs256_secret_file: Some(short), ..AuthConfig::default() };
    assert!(matches!(Verifier::new(config), Err(KeyError::Invalid { .. })));
    let not_pem = dir.path().join("not-pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let config = AuthConfig { public_keys: vec![(Algorithm::RS256, not_pem)], ..AuthConfig::default() };
    assert!(matches!(Verifier::new(config), Err(KeyError::Invalid { .. })));
    let missing = AuthConfig { jwks_file: Some(dir.path().join("nope.json")), ..AuthConfig::default() };
    assert!(matches!(Verifier::new(missing), Err(KeyError::Io { .. })));
}
