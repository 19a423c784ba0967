//! The Kubernetes deployment in `deploy/kubernetes/`: every file is Kubernetes YAML the
//! kustomization names; every `LoraAdapter` example (the manifests in the adapters ConfigMap)
//! passes the CRD's schema under a JSON-schema validator (`jsonschema`, through
//! `tests/python/crd_check.py`) and the gateway's parser; and of a set of bad manifests, the
//! gateway's parser refuses every one the schema refuses.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use support::*;
use switchyard_gateway::manifest;

fn deploy() -> PathBuf {
    fixtures().join("../deploy/kubernetes").canonicalize().expect("deploy/kubernetes exists")
}

fn checker() -> PathBuf {
    fixtures().join("../tests/python/crd_check.py")
}

/// Every YAML document of `files`, as JSON.
fn documents(python: &PathBuf, files: &[PathBuf]) -> Vec<Value> {
    let out = Command::new(python).arg(checker()).arg("documents").args(files).output().expect("python runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The schema's verdict on each document: `None` accepted, else why not.
fn schema_verdicts(python: &PathBuf, docs: &[Value]) -> Vec<Option<String>> {
    let mut child = Command::new(python)
        .arg(checker())
        .arg("validate")
        .arg(deploy().join("crd.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(serde_json::to_string(docs).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn parses(doc: &Value) -> Result<(), String> {
    manifest::parse("doc", &serde_json::to_string(doc).unwrap()).map(|_| ()).map_err(|e| e.to_string())
}

/// The LoraAdapter manifests the adapters ConfigMap carries.
fn examples(python: &PathBuf) -> Vec<(String, Value)> {
    let config = documents(python, &[deploy().join("config.yaml")]);
    let adapters =
        config.iter().find(|d| d["metadata"]["name"] == "switchyard-adapters").expect("the adapters ConfigMap");
    let mut found = Vec::new();
    for (file, text) in adapters["data"].as_object().expect("data") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file);
        std::fs::write(&path, text.as_str().unwrap()).unwrap();
        for doc in documents(python, &[path]) {
            found.push((file.clone(), doc));
        }
    }
    found
}

#[test]
fn every_file_is_named_by_the_kustomization_and_is_kubernetes_yaml() {
    let Some(python) = test_python() else { return };
    let mut files: Vec<String> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let kustomization = &documents(&python, &[deploy().join("kustomization.yaml")])[0];
    let mut named: Vec<String> =
        kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
    named.sort();
    assert_eq!(named, files, "the kustomization names every manifest file");
    let paths: Vec<PathBuf> = files.iter().map(|f| deploy().join(f)).collect();
    let kinds: Vec<String> =
        documents(&python, &paths).iter().map(|d| d["kind"].as_str().unwrap_or("?").to_string()).collect();
    for d in documents(&python, &paths) {
        assert!(d["apiVersion"].is_string() && d["metadata"]["name"].is_string(), "not a Kubernetes object: {d}");
    }
    for kind in ["CustomResourceDefinition", "StatefulSet", "Deployment", "Service", "ConfigMap"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    // The gateways watch the adapters ConfigMap where it is mounted, and the backends ask for GPUs.
    let all = documents(&python, &paths);
    let gateway = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert!(gateway["spec"]["replicas"].as_u64().unwrap() > 1, "several gateway replicas");
    let args = gateway["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--manifests=/etc/switchyard/adapters") && args.contains("--store=etcds://"), "{args}");
    assert!(args.contains("--store-cert-file="), "the gateways prove themselves to etcd: {args}");
    let backend =
        all.iter().find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "switchyard-backend").unwrap();
    let limits = &backend["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"], 1, "{limits}");
}

#[test]
fn the_examples_pass_the_crd_schema_and_the_gateways_parser() {
    let Some(python) = test_python() else { return };
    let examples = examples(&python);
    assert!(examples.len() >= 3, "{examples:?}");
    let docs: Vec<Value> = examples.iter().map(|(_, d)| d.clone()).collect();
    for ((file, doc), verdict) in examples.iter().zip(schema_verdicts(&python, &docs)) {
        assert_eq!(verdict, None, "{file}: the schema refuses it");
        parses(doc).unwrap_or_else(|e| panic!("{file}: the gateway refuses it: {e}"));
    }
}

#[test]
fn the_gateways_parser_refuses_whatever_the_schema_refuses() {
    let Some(python) = test_python() else { return };
    let base = examples(&python).into_iter().find(|(f, _)| f == "acme-support.yaml").expect("acme-support").1;
    let with = |path: &[&str], value: Value| {
        let mut d = base.clone();
        let mut at = &mut d;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        match value {
            Value::Null => {
                at.as_object_mut().unwrap().remove(path[path.len() - 1]);
            }
            v => at[path[path.len() - 1]] = v,
        }
        d
    };
    let cases = vec![
        with(&["kind"], json!("Deployment")),
        with(&["apiVersion"], json!("switchyard.dev/v2")),
        with(&["metadata", "name"], json!("Acme_Support")),
        with(&["metadata", "name"], json!("-acme")),
        with(&["metadata", "name"], json!("a".repeat(254))),
        with(&["spec", "loraName"], json!("acme//support")),
        with(&["spec", "loraName"], json!("acme/../x")),
        with(&["spec", "loraName"], json!("acme/sup port")),
        with(&["spec", "source", "uri"], json!("ftp://x/y")),
        with(&["spec", "source", "uri"], json!("s3://")),
        with(&["spec", "source", "uri"], json!("file:///srv/a/../b")),
        with(&["spec", "source", "uri"], json!("s3://b/p q")),
        with(&["spec", "sha256"], json!("abc")),
        with(&["spec", "tenant"], json!("dry-run")),
        with(&["spec", "tenant"], json!("-x")),
        with(&["spec", "replicas"], json!(0)),
        with(&["spec", "replicas"], json!("two")),
        with(&["spec", "shared"], json!("yes")),
        with(&["spec", "shared"], json!("true")),
        with(&["spec", "replicas"], json!("2")),
        with(&["spec", "replicas"], json!(1.5)),
        with(&["spec", "tenant"], Value::Null),
        with(&["spec", "source"], Value::Null),
        with(&["spec"], Value::Null),
        // Accepted by both: the edges of what is allowed.
        with(&["spec", "source", "uri"], json!("hf://org/repo@v1")),
        with(&["spec", "source", "uri"], json!("file:///srv/adapters/acme/")),
        with(&["spec", "loraName"], json!("org/...odd.name_v1-2")),
        with(&["metadata", "name"], json!("acme.support-v2")),
        with(&["spec", "sha256"], json!(format!("sha256:{}", "AB".repeat(32)))),
    ];
    let verdicts = schema_verdicts(&python, &cases);
    let mut refused = 0;
    for (doc, verdict) in cases.iter().zip(verdicts) {
        let ours = parses(doc);
        if let Some(why) = &verdict {
            refused += 1;
            assert!(ours.is_err(), "the schema refuses ({why}) what the gateway accepts: {doc}");
        } else {
            assert!(ours.is_ok(), "the gateway refuses what the schema accepts: {doc}: {ours:?}");
        }
    }
    assert_eq!(refused, 24, "the bad cases are bad");
}
