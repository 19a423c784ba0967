//! `switchyard apply -f FILE|DIR` and `switchyard get loras`: declarative adapters through a
//! gateway's adapter API, the way `kubectl apply` and `kubectl get` work with resources.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::path::PathBuf;
use switchyard_gateway::manifest;

/// Where the gateway is and who asks.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// The gateway's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "SWITCHYARD_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// A token with the scopes the command needs (lora:load lora:read lora:unload).
    #[arg(long, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// A manifest file, or a directory of them (*.yaml, *.yml, *.json).
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// Also unload the adapters earlier applies declared that these files no longer declare.
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Subcommand, Debug)]
pub enum GetCommand {
    /// The adapters the token's tenant may see, with their placement and readiness.
    Loras {
        #[command(flatten)]
        target: Target,
    },
}

impl Target {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.trim_end_matches('/'))
    }

    /// Sends a request; the status and the JSON answer, or an error naming the gateway.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let r =
            request.bearer_auth(&self.token).send().await.with_context(|| format!("cannot reach {}", self.gateway))?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn loras(&self, http: &reqwest::Client) -> Result<Value> {
        let (status, v) = self.call(http.get(self.url("/v1/loras"))).await?;
        anyhow::ensure!(status == 200, "GET /v1/loras: {status} {}", error_text(&v));
        Ok(v)
    }
}

fn error_text(v: &Value) -> String {
    v["error"]["message"].as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Applies every manifest (idempotent: an adapter already as declared is left alone), then, with
/// `--prune`, unloads what earlier applies declared and these files do not. Stops at the first
/// refusal, naming the object.
pub async fn apply(a: ApplyArgs) -> Result<()> {
    let declared = manifest::read(&a.file).map_err(anyhow::Error::msg)?;
    let http = reqwest::Client::new();
    let current = a.target.loras(&http).await?;
    let listed = current["adapters"].as_array().cloned().unwrap_or_default();
    for m in &declared {
        let spec = &m.spec;
        let existing = listed.iter().find(|l| l["lora_name"] == spec.lora_name.as_str());
        let same = existing.is_some_and(|l| {
            l["source"]["uri"] == switchyard_gateway::loras::canonical_uri(&spec.source.uri)
                && l["owner"] == spec.tenant.as_str()
                && l["shared"] == spec.shared
                && l["replicas"].as_u64() == spec.replicas.map(u64::from)
                && l["sha256"].as_str().map(str::to_string)
                    == spec.sha256.as_deref().and_then(|p| switchyard_gateway::loras::normalize_sha256(p).ok())
                && l["declared"]["name"] == m.metadata.name.as_str()
        });
        if same {
            println!("loraadapter/{} unchanged", m.metadata.name);
            continue;
        }
        let body = json!({
            "lora_name": spec.lora_name,
            "source": {"uri": spec.source.uri},
            "sha256": spec.sha256,
            "owner": spec.tenant,
            "shared": spec.shared,
            "replicas": spec.replicas,
            "manifest": m.metadata.name,
            "hot_swap": true,
        });
        let (status, v) = a.target.call(http.post(a.target.url("/v1/loras")).json(&body)).await?;
        anyhow::ensure!(status == 200, "loraadapter/{}: {status} {}", m.metadata.name, error_text(&v));
        println!("loraadapter/{} {}", m.metadata.name, if existing.is_some() { "configured" } else { "created" });
    }
    if a.prune {
        let keep: std::collections::BTreeSet<&str> = declared.iter().map(|m| m.spec.lora_name.as_str()).collect();
        for l in &listed {
            let name = l["lora_name"].as_str().unwrap_or_default();
            if l["declared"]["origin"] != "apply" || keep.contains(name) {
                continue;
            }
            let (status, v) = a.target.call(http.delete(a.target.url(&format!("/v1/loras/{name}")))).await?;
            let object = l["declared"]["name"].as_str().unwrap_or(name);
            anyhow::ensure!(status == 200, "loraadapter/{object}: cannot prune: {status} {}", error_text(&v));
            println!("loraadapter/{object} pruned");
        }
    }
    Ok(())
}

/// Prints the adapters as a table, as `kubectl get` does.
pub async fn get(command: GetCommand) -> Result<()> {
    let GetCommand::Loras { target } = command;
    let v = target.loras(&reqwest::Client::new()).await?;
    let rows: Vec<[String; 7]> = v["adapters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let backends = l["backends"].as_array().map_or(0, Vec::len);
            let wanted = l["replicas"].as_u64().map_or_else(|| backends.to_string(), |r| r.to_string());
            [
                l["declared"]["name"].as_str().unwrap_or("-").to_string(),
                l["lora_name"].as_str().unwrap_or_default().to_string(),
                l["owner"].as_str().unwrap_or_default().to_string(),
                format!("{}/{wanted}", l["ready"].as_u64().unwrap_or(0)),
                if l["shared"] == true { "yes" } else { "no" }.to_string(),
                l["declared"]["origin"].as_str().unwrap_or("api").to_string(),
                l["source"]["uri"].as_str().unwrap_or_default().to_string(),
            ]
        })
        .collect();
    let header = ["NAME", "LORA", "TENANT", "READY", "SHARED", "FROM", "SOURCE"].map(String::from);
    let widths: Vec<usize> =
        (0..7).map(|i| std::iter::once(&header).chain(&rows).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", cells.join("   ").trim_end());
    }
    Ok(())
}
