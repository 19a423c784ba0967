//! What `switchyard up` secures the gateway–backend link with, made by itself in the data dir:
//! a development CA, a server certificate for the backend and a client certificate for the
//! gateway (mutual TLS), and the backend credential.
//!
//! The certificates are made afresh at every start (signing takes milliseconds, so none ever
//! expires under a running stack and no CA key is kept on disk); the credential is made once
//! and kept, so tools pointed at the backend keep working across restarts. Private keys and the
//! credential are readable by the user only.

use anyhow::{Context, Result, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The directory in the data dir holding the certificates.
pub const TLS_DIR: &str = "tls";
/// The backend credential, in the data dir.
pub const CREDENTIAL_FILE: &str = "backend-credential";

/// The files one start of `up` made.
#[derive(Debug, Clone)]
pub struct DevTls {
    pub ca: PathBuf,
    pub backend_cert: PathBuf,
    pub backend_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
    pub credential: PathBuf,
}

/// Writes `bytes` to `path` (replacing it) readable by the user only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    // NamedTempFile creates its file with mode 0600.
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Makes the certificates for a backend reached at `backend_ip` (and on loopback), and the
/// credential if the data dir has none yet.
pub fn prepare(data: &Path, backend_ip: IpAddr) -> Result<DevTls> {
    let dir = data.join(TLS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = DevTls {
        ca: dir.join("ca.pem"),
        backend_cert: dir.join("backend.pem"),
        backend_key: dir.join("backend.key"),
        gateway_cert: dir.join("gateway.pem"),
        gateway_key: dir.join("gateway.key"),
        credential: data.join(CREDENTIAL_FILE),
    };
    let tls = |e: rcgen::Error| anyhow!("cannot make the development certificates: {e}");

    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "switchyard up development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(tls)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !backend_ip.is_unspecified() && !backend_ip.is_loopback() {
        names.push(backend_ip.to_string());
    }
    let backend_key = KeyPair::generate().map_err(tls)?;
    let mut backend = CertificateParams::new(names).map_err(tls)?;
    backend.distinguished_name.push(DnType::CommonName, "switchyard backend");
    backend.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let backend_cert = backend.signed_by(&backend_key, &issuer).map_err(tls)?;

    let gateway_key = KeyPair::generate().map_err(tls)?;
    let mut gateway = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    gateway.distinguished_name.push(DnType::CommonName, "switchyard gateway");
    gateway.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let gateway_cert = gateway.signed_by(&gateway_key, &issuer).map_err(tls)?;

    std::fs::write(&files.ca, ca_cert.pem()).with_context(|| format!("cannot write {}", files.ca.display()))?;
    std::fs::write(&files.backend_cert, backend_cert.pem())
        .with_context(|| format!("cannot write {}", files.backend_cert.display()))?;
    std::fs::write(&files.gateway_cert, gateway_cert.pem())
        .with_context(|| format!("cannot write {}", files.gateway_cert.display()))?;
    write_private(&files.backend_key, backend_key.serialize_pem().as_bytes())?;
    write_private(&files.gateway_key, gateway_key.serialize_pem().as_bytes())?;
    if !files.credential.exists() {
        write_private(&files.credential, format!("{}\n", crate::up::random_hex(32)?).as_bytes())?;
    }
    Ok(files)
}
