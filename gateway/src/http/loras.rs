//! The adapter API (Dynamo's shapes, extended): `POST /v1/loras`, `GET /v1/loras`,
//! `DELETE /v1/loras/{name}`. Success bodies carry Dynamo's fields (`status`, `message`,
//! `lora_name`, `lora_id`, …) plus per-backend results; errors are OpenAI error bodies with
//! precise statuses.

use super::{principal, read_body};
use crate::Gateway;
use crate::admin::{self, LoadRequest};
use crate::error::Error;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBody {
    lora_name: String,
    source: SourceBody,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    hot_swap: bool,
    /// Let every configured tenant use the adapter (only its owner or an admin may set it).
    #[serde(default)]
    shared: Option<bool>,
    /// How many backends keep it (default: all).
    #[serde(default)]
    replicas: Option<u32>,
    /// The owning tenant, when an admin loads for another tenant.
    #[serde(default)]
    owner: Option<String>,
    /// The `metadata.name` of the `LoraAdapter` manifest that declares it (`switchyard apply`).
    #[serde(default)]
    manifest: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceBody {
    uri: String,
    #[serde(default)]
    sha256: Option<String>,
}

pub(super) async fn load(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Result<Json<Value>, Error> {
    let who = principal(&gw, &headers)?;
    let bytes = read_body(&gw, &headers, body).await?;
    let body: LoadBody = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("invalid adapter load request: {e}"), None))?;
    let sha256 = match (body.sha256, body.source.sha256) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::invalid("`sha256` and `source.sha256` disagree", Some("sha256")));
        }
        (a, b) => a.or(b),
    };
    let request = LoadRequest {
        name: body.lora_name,
        uri: body.source.uri,
        sha256,
        hot_swap: body.hot_swap,
        shared: body.shared,
        replicas: body.replicas,
        owner: body.owner,
        declared: match body.manifest {
            Some(name) => {
                crate::manifest::validate_object_name(&name).map_err(|m| Error::invalid(m, Some("manifest")))?;
                Some(crate::loras::Declaration { name, origin: crate::loras::Origin::Apply })
            }
            None => None,
        },
    };
    let outcome = admin::load(&gw, &who, request).await?;
    let name = &outcome.lora.name;
    let message = if outcome.already_loaded {
        format!("LoRA adapter '{name}' is already loaded")
    } else {
        format!("LoRA adapter '{name}' loaded successfully")
    };
    Ok(Json(json!({
        "status": "success",
        "message": message,
        "lora_name": name,
        "lora_id": outcome.lora.lora_id(),
        "hot_swap": outcome.hot_swap,
        "already_loaded": outcome.already_loaded,
        "source": {"uri": outcome.lora.uri},
        "sha256": outcome.lora.sha256,
        "owner": outcome.lora.owner,
        "shared": outcome.lora.shared,
        "backends": outcome.backends,
    })))
}

pub(super) async fn list(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, Error> {
    let who = principal(&gw, &headers)?;
    let adapters = admin::list(&gw, &who)?;
    let operations = admin::operations(&gw, &who)?;
    let backends = admin::backends(&gw, &who)?;
    let loras: BTreeMap<&str, u32> = adapters.iter().map(|a| (a.lora_name.as_str(), a.lora_id)).collect();
    Ok(Json(json!({
        "status": "success",
        "loras": loras,
        "count": adapters.len(),
        "adapters": adapters,
        "operations": operations,
        "backends": backends,
    })))
}

pub(super) async fn unload(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Error> {
    let who = principal(&gw, &headers)?;
    let (lora, backends) = admin::unload(&gw, &who, &name).await?;
    Ok(Json(json!({
        "status": "success",
        "message": format!("LoRA adapter '{}' unloaded successfully", lora.name),
        "lora_name": lora.name,
        "lora_id": lora.lora_id(),
        "backends": backends,
    })))
}
