//! Declarative adapters: Kubernetes-style `LoraAdapter` manifests, applied with
//! `switchyard apply -f` or watched by the gateway in a directory (a mounted ConfigMap).
//!
//! ```yaml
//! apiVersion: switchyard.dev/v1alpha1
//! kind: LoraAdapter
//! metadata:
//!   name: acme-support          # the object's name: a DNS subdomain (RFC 1123)
//! spec:
//!   loraName: acme/support      # the adapter name clients send as `model` (may contain `/`)
//!   source:
//!     uri: s3://acme-loras/support
//!   sha256: "…"                 # optional pin of adapter_model.safetensors
//!   tenant: acme                # the owner
//!   replicas: 2                 # optional: how many backends keep it (default: all)
//!   shared: false               # optional: every tenant may use it
//! ```
//!
//! Parsing is strict, and every refusal names the document and the field: an unknown
//! `apiVersion` or `kind`, an unknown field anywhere (a misspelt `replica` is an error, not a
//! default), a bad name, URI or pin. `status` is accepted and ignored (it is the server's, as in
//! Kubernetes). `deploy/kubernetes/crd.yaml` carries the same rules as an OpenAPI schema.

use crate::loras;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The API version manifests declare.
pub const API_VERSION: &str = "switchyard.dev/v1alpha1";
/// The one kind.
pub const KIND: &str = "LoraAdapter";
/// Longest manifest file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// One `LoraAdapter` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraAdapter {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
    /// The server's; ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    /// Accepted as Kubernetes writes them; not used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub lora_name: String,
    pub source: Source,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub uri: String,
}

/// Why a set of manifests was refused: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ManifestError {
    /// `FILE`, or `FILE (document N)`.
    pub origin: String,
    pub message: String,
}

/// Checks a `metadata.name`: a DNS subdomain (RFC 1123): 1–253 of `a-z 0-9 - .`, each dot
/// separated label starting and ending with a letter or digit.
pub fn validate_object_name(name: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "metadata.name {name:?} is not a DNS subdomain name (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

impl LoraAdapter {
    /// Every check beyond the shape: versions, names, URI, pin, replicas.
    fn check(&self) -> Result<(), String> {
        if self.api_version != API_VERSION {
            return Err(format!("apiVersion {:?} is not supported; use {API_VERSION}", self.api_version));
        }
        if self.kind != KIND {
            return Err(format!("kind {:?} is not supported; use {KIND}", self.kind));
        }
        validate_object_name(&self.metadata.name)?;
        loras::validate_name(&self.spec.lora_name).map_err(|m| format!("spec.loraName: {m}"))?;
        loras::validate_uri(&self.spec.source.uri).map_err(|m| format!("spec.source.uri: {m}"))?;
        if let Some(pin) = &self.spec.sha256 {
            loras::normalize_sha256(pin).map_err(|m| format!("spec.sha256: {m}"))?;
        }
        if self.spec.replicas == Some(0) {
            return Err("spec.replicas must be at least 1 (omit it for every backend)".into());
        }
        crate::tenants::validate_tenant_name(&self.spec.tenant).map_err(|m| format!("spec.tenant: {m}"))?;
        Ok(())
    }
}

/// Parses the manifests in `text` (one or more YAML documents; JSON is YAML too), from `origin`.
pub fn parse(origin: &str, text: &str) -> Result<Vec<LoraAdapter>, ManifestError> {
    // YAML 1.2 booleans only: `shared: yes` is a mistake to report, not `true`.
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    // Through JSON values first, so types are what the YAML says (a quoted "true" is a string,
    // as a schema validator sees it), then strictly typed, naming the field at fault.
    let values: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| ManifestError { origin: origin.to_string(), message: e.to_string() })?;
    let many = values.len() > 1;
    let mut docs = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let at = if many { format!("{origin} (document {})", i + 1) } else { origin.to_string() };
        let doc: LoraAdapter = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let message = if field == "." { e.inner().to_string() } else { format!("{field}: {}", e.inner()) };
            ManifestError { origin: at.clone(), message }
        })?;
        doc.check().map_err(|message| ManifestError { origin: at, message })?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Reads manifests from a file, or from every `*.yaml`, `*.yml` and `*.json` file of a
/// directory (not recursing; Kubernetes' `..data` links of a mounted ConfigMap are followed to
/// the files they name). Refuses the whole set on the first bad file, and when two objects share
/// a `metadata.name` or a `spec.loraName`.
pub fn read(path: &Path) -> Result<Vec<LoraAdapter>, ManifestError> {
    let failed = |origin: &Path, e: std::io::Error| ManifestError {
        origin: origin.display().to_string(),
        message: format!("cannot read it: {e}"),
    };
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| failed(path, e))? {
            let p = entry.map_err(|e| failed(path, e))?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let wanted = [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext));
            if wanted && !name.starts_with('.') && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut all = Vec::new();
    for file in files {
        let size = std::fs::metadata(&file).map_err(|e| failed(&file, e))?.len();
        if size > MAX_FILE_BYTES {
            return Err(ManifestError {
                origin: file.display().to_string(),
                message: format!("{size} bytes is past the limit of {MAX_FILE_BYTES}"),
            });
        }
        let text = std::fs::read_to_string(&file).map_err(|e| failed(&file, e))?;
        all.extend(parse(&file.display().to_string(), &text)?);
    }
    let mut names = BTreeMap::new();
    let mut loras = BTreeMap::new();
    for m in &all {
        let twice = |what: &str, value: &str| ManifestError {
            origin: path.display().to_string(),
            message: format!("two objects declare {what} {value:?}"),
        };
        if names.insert(m.metadata.name.clone(), ()).is_some() {
            return Err(twice("metadata.name", &m.metadata.name));
        }
        if loras.insert(m.spec.lora_name.clone(), ()).is_some() {
            return Err(twice("spec.loraName", &m.spec.lora_name));
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: switchyard.dev/v1alpha1\nkind: LoraAdapter\nmetadata:\n  name: acme-support\n\
        spec:\n  loraName: acme/support\n  source:\n    uri: s3://acme/support\n  tenant: acme\n  replicas: 2\n";

    #[test]
    fn a_manifest_parses_and_every_bad_one_is_refused_by_name() {
        let docs = parse("good.yaml", GOOD).unwrap();
        assert_eq!(docs[0].spec.lora_name, "acme/support");
        assert_eq!(docs[0].spec.replicas, Some(2));
        let two =
            format!("{GOOD}---\n{}", GOOD.replace("acme-support", "acme-other").replace("acme/support", "acme/other"));
        assert_eq!(parse("two.yaml", &two).unwrap().len(), 2);
        let cases = [
            (GOOD.replace("kind: LoraAdapter", "kind: Deployment"), "kind \"Deployment\""),
            (GOOD.replace("v1alpha1", "v9"), "apiVersion"),
            (GOOD.replace("  replicas: 2", "  replica: 2"), "replica"),
            (GOOD.replace("name: acme-support", "name: Acme_Support"), "metadata.name"),
            (GOOD.replace("s3://acme/support", "ftp://x/y"), "spec.source.uri"),
            (GOOD.replace("replicas: 2", "replicas: 0"), "spec.replicas"),
            (GOOD.replace("loraName: acme/support", "loraName: acme//x"), "spec.loraName"),
            (format!("{GOOD}  sha256: abc\n"), "spec.sha256"),
            (GOOD.replace("  tenant: acme\n", ""), "tenant"),
            (GOOD.replace("replicas: 2", "replicas: \"2\""), "spec.replicas: invalid type"),
            (format!("{GOOD}  shared: yes\n"), "spec.shared: invalid type"),
        ];
        for (text, says) in cases {
            let e = parse("bad.yaml", &text).unwrap_err();
            assert!(e.to_string().contains(says), "{says}: {e}");
            assert!(e.to_string().starts_with("bad.yaml"), "{e}");
        }
        let e =
            parse("multi.yaml", &format!("{GOOD}---\n{}", GOOD.replace("tenant: acme", "tenant: '*'"))).unwrap_err();
        assert!(e.origin.contains("document 2"), "{e}");
        // `status` is the server's: accepted and ignored.
        assert!(parse("s.yaml", &format!("{GOOD}status:\n  ready: 1\n")).is_ok());
    }

    #[test]
    fn a_directory_is_read_whole_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        assert_eq!(read(dir.path()).unwrap().len(), 1);
        std::fs::write(dir.path().join("b.yml"), GOOD.replace("acme-support", "acme-again")).unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(e.message.contains("spec.loraName \"acme/support\""), "{e}");
    }
}
