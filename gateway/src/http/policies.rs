//! The policy deploy API (scope `policy:deploy`): `POST /v1/policies?name=N` uploads a
//! component (the body), `GET /v1/policies` lists versions and activations,
//! `POST /v1/policies/{id}/activate {"tenant"?, "config"?}` activates a version, and
//! `POST /v1/policies/rollback {"tenant"?}` goes back one activation. A tenant manages its own
//! policy; an `admin` tenant manages any tenant's and the default (`"tenant"` omitted).

use super::{principal, read_body, read_body_up_to};
use crate::Gateway;
use crate::auth::{Principal, Scope};
use crate::openai::ApiError;
use crate::policy::deploy::{DEFAULT_SCOPE, DeployError, PolicyStore};
use crate::policy::wasm::LoadError;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> ApiError {
        let message = e.to_string();
        match e {
            DeployError::Load(LoadError::TooLarge { limit, .. }) => ApiError::too_large(limit),
            DeployError::Load(_) => ApiError::unprocessable(message, "invalid_policy"),
            DeployError::DryRun(_) => ApiError::unprocessable(message, "policy_dry_run_failed"),
            DeployError::UnknownVersion(_) => ApiError::not_found(message, None).with_code("policy_not_found"),
            DeployError::NothingToRollBack(_) => ApiError::conflict(message, "nothing_to_roll_back"),
            DeployError::Invalid(_) => ApiError::invalid(message, None),
            DeployError::Io(_) | DeployError::Corrupt { .. } => ApiError::server(500, message, "state_write_failed"),
        }
    }
}

fn store(gw: &Gateway) -> Result<&Arc<PolicyStore>, ApiError> {
    gw.policies.as_ref().ok_or_else(|| {
        ApiError::not_found("the policy host is not enabled on this gateway", None).with_code("policies_disabled")
    })
}

fn is_admin(gw: &Gateway, who: &Principal) -> bool {
    gw.tenants.get(&who.tenant).is_some_and(|t| t.admin)
}

/// The activation scope a caller names: its own tenant by default; another tenant or the
/// default only for admins.
fn scope(gw: &Gateway, who: &Principal, tenant: Option<String>) -> Result<String, ApiError> {
    let admin = is_admin(gw, who);
    let scope = match tenant {
        Some(t) => t,
        None if admin => DEFAULT_SCOPE.to_string(),
        None => who.tenant.clone(),
    };
    if scope != who.tenant && !admin {
        return Err(ApiError::forbidden(
            format!("tenant {:?} may only manage its own policy", who.tenant),
            "policy_not_allowed",
        ));
    }
    Ok(scope)
}

/// Runs blocking store work (compiling, dry runs, file writes) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DeployError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::server(500, format!("policy task failed: {e}"), "policy_task_failed"))?
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize)]
pub(super) struct UploadQuery {
    name: Option<String>,
}

pub(super) async fn upload(
    State(gw): State<Arc<Gateway>>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let who = principal(&gw, &headers)?;
    who.require(Scope::PolicyDeploy)?;
    let store = store(&gw)?.clone();
    let Query(query) = query.map_err(|e| ApiError::invalid(format!("invalid query: {e}"), None))?;
    let name = query.name.ok_or_else(|| ApiError::invalid("`name` (a query parameter) is required", Some("name")))?;
    let bytes = read_body_up_to(store.runtime().limits().max_component_bytes, &headers, body).await?;
    let tenant = who.tenant.clone();
    let version = blocking(move || store.upload(&name, &bytes, &tenant)).await?;
    tracing::info!(policy = %version.name, id = %version.id, tenant = %who.tenant, "policy uploaded");
    Ok((StatusCode::CREATED, Json(json!({"status": "success", "policy": version}))).into_response())
}

pub(super) async fn list(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = principal(&gw, &headers)?;
    who.require(Scope::PolicyDeploy)?;
    let (mut versions, mut active) = store(&gw)?.list();
    if !is_admin(&gw, &who) {
        // A tenant sees its own activations and the versions it uploaded or runs.
        active.retain(|scope, _| *scope == who.tenant);
        let runs: std::collections::BTreeSet<&str> = active.values().flatten().map(|a| a.id.as_str()).collect();
        versions.retain(|v| v.uploaded_by == who.tenant || runs.contains(v.id.as_str()));
    }
    Ok(Json(json!({"status": "success", "policies": versions, "active": active})))
}

/// The caller, with `policy:deploy`, the store, and the optional JSON body (empty: defaults).
async fn deploy_call<T: serde::de::DeserializeOwned + Default>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Principal, Arc<PolicyStore>, T), ApiError> {
    let who = principal(gw, headers)?;
    who.require(Scope::PolicyDeploy)?;
    let store = store(gw)?.clone();
    let bytes = read_body(gw, headers, body).await?;
    let body = if bytes.is_empty() {
        T::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?
    };
    Ok((who, store, body))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    config: Option<Value>,
}

pub(super) async fn activate(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (who, store, body) = deploy_call::<ActivateBody>(&gw, &headers, body).await?;
    let scope = scope(&gw, &who, body.tenant)?;
    let config = body.config.unwrap_or_else(|| json!({}));
    let target = scope.clone();
    let activation = blocking(move || store.activate(&target, &id, config)).await?;
    tracing::info!(id = %activation.id, scope = %scope, tenant = %who.tenant, "policy activated");
    Ok(Json(json!({"status": "success", "tenant": scope, "active": activation})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    tenant: Option<String>,
}

pub(super) async fn rollback(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (who, store, body) = deploy_call::<RollbackBody>(&gw, &headers, body).await?;
    let scope = scope(&gw, &who, body.tenant)?;
    let target = scope.clone();
    let activation = blocking(move || store.rollback(&target)).await?;
    tracing::info!(id = %activation.id, scope = %scope, tenant = %who.tenant, "policy rolled back");
    Ok(Json(json!({"status": "success", "tenant": scope, "active": activation})))
}
