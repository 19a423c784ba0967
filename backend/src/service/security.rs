//! Who may call a backend: a per-deployment credential that every call of the `Backend`
//! service must carry (the health and reflection services stay open, for probes and tools),
//! and TLS on the listener, mutual when a client CA is given.
//!
//! Without a credential, anyone who reaches the port may load any adapter the backend can read
//! (its `file://` roots, S3 and the Hub with its own credentials) and generate with it; the
//! backend says so at start-up.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Shortest credential accepted, in bytes.
pub const MIN_CREDENTIAL_BYTES: usize = 16;

/// TLS for the backend's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// How a backend authenticates its callers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityOptions {
    /// A file with the credential(s) callers must present, one per line (several allow a
    /// rotation: the new one is added, clients move, the old one is removed).
    pub credential_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
}

/// Why the security settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read { path: path.to_path_buf(), source })
}

/// The accepted credentials, kept as digests so that comparing one takes the same time
/// whichever byte differs.
#[derive(Clone)]
pub struct Credentials {
    digests: Arc<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} accepted)", self.digests.len())
    }
}

impl Credentials {
    /// Reads a credential file: one credential per line; blank lines and `#` comments ignored.
    pub fn read(path: &Path) -> Result<Credentials, SecurityError> {
        let bytes = read(path)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| SecurityError::Invalid { path: path.to_path_buf(), reason: "not UTF-8 text".into() })?;
        let mut digests = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.len() < MIN_CREDENTIAL_BYTES || !line.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(SecurityError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "a credential must be at least {MIN_CREDENTIAL_BYTES} printable ASCII characters without spaces"
                    ),
                });
            }
            digests.push(Sha256::digest(line.as_bytes()).into());
        }
        if digests.is_empty() {
            return Err(SecurityError::Invalid { path: path.to_path_buf(), reason: "holds no credential".into() });
        }
        Ok(Credentials { digests: Arc::new(digests) })
    }

    fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digests.iter().fold(false, |found, accepted| found | (*accepted == d))
    }
}

/// The `Backend` service's interceptor: without credentials every call passes; with them, a
/// call passes only with `authorization: Bearer <credential>`.
#[derive(Debug, Clone, Default)]
pub struct RequireCredential(pub Option<Credentials>);

impl tonic::service::Interceptor for RequireCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(credentials) = &self.0 else { return Ok(request) };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this backend requires its credential: send the metadata authorization: Bearer <credential>",
                )
            })?;
        if credentials.accepts(presented.trim()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("the backend credential is not valid"))
        }
    }
}

/// The listener's TLS configuration.
pub fn server_tls(files: &TlsFiles) -> Result<ServerTlsConfig, SecurityError> {
    let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &files.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn call(check: &mut RequireCredential, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        check.call(r).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn a_call_passes_only_with_an_accepted_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credential");
        std::fs::write(&file, "# rotating\nold-credential-0123456789\n\nnew-credential-0123456789\n").unwrap();
        let mut check = RequireCredential(Some(Credentials::read(&file).unwrap()));
        assert_eq!(call(&mut check, Some("Bearer old-credential-0123456789")), Ok(()));
        assert_eq!(call(&mut check, Some("Bearer new-credential-0123456789")), Ok(()));
        assert_eq!(call(&mut check, Some("Bearer new-credential-012345678")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut check, Some("new-credential-0123456789")), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut check, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(&mut RequireCredential(None), None), Ok(()), "no credential configured: open");
    }

    #[test]
    fn weak_or_empty_credential_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credential");
        for bad in ["", "# only a comment\n", "short\n", "has a space in it 0123456789\n"] {
            std::fs::write(&file, bad).unwrap();
            assert!(matches!(Credentials::read(&file), Err(SecurityError::Invalid { .. })), "{bad:?}");
        }
    }
}
