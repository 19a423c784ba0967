//! The policy deploy API (scope `policy:deploy`): `POST /v1/policies?name=N` uploads a
//! component (the body), `GET /v1/policies` lists versions and activations,
//! `POST /v1/policies/{id}/activate {"tenant"?, "config"?}` activates a version,
//! `POST /v1/policies/rollback {"tenant"?}` goes back one activation, and
//! `DELETE /v1/policies/{id}` deletes a version no activation names. A tenant manages its own
//! policy and the versions it uploaded; an `admin` tenant manages any tenant's and the default
//! (`"tenant"` omitted). Who may do what is decided by [`crate::authz`].

use super::{principal, read_body, read_body_up_to};
use crate::Gateway;
use crate::auth::{Principal, Scope};
use crate::authz::Caller;
use crate::error::{Code, Error};
use crate::policy::deploy::{DeployError, PolicyStore};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

fn store(gw: &Gateway) -> Result<&Arc<PolicyStore>, Error> {
    gw.policies
        .as_ref()
        .ok_or_else(|| Error::new(Code::PoliciesDisabled, "the policy host is not enabled on this gateway"))
}

/// The same answer for a version that does not exist and one the caller may not touch.
fn no_version(id: &str) -> Error {
    DeployError::UnknownVersion(id.to_string()).into()
}

/// The caller, with `policy:deploy`, whose tenant is configured.
fn deployer<'a>(gw: &'a Gateway, who: &Principal) -> Result<Caller<'a>, Error> {
    who.require(Scope::PolicyDeploy)?;
    Ok(gw.caller(who)?)
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
) -> Result<Response, Error> {
    let who = principal(&gw, &headers)?;
    let caller = deployer(&gw, &who)?;
    let store = store(&gw)?.clone();
    let Query(query) = query.map_err(|e| Error::invalid(format!("invalid query: {e}"), None))?;
    let name = query.name.ok_or_else(|| Error::invalid("`name` (a query parameter) is required", Some("name")))?;
    // The upload is read (up to the size limit) before the tenant's quota is checked (in
    // `PolicyStore::upload`, before anything is compiled): refused before, a client still sending
    // its component would see the connection closed under it instead of the refusal.
    let bytes = read_body_up_to(store.runtime().limits().max_component_bytes, &headers, body).await?;
    let tenant = caller.name.to_string();
    let version = store.upload(&name, bytes.to_vec(), &tenant).await?;
    tracing::info!(policy = %version.name, id = %version.id, tenant = %who.tenant, "policy uploaded");
    Ok((StatusCode::CREATED, Json(json!({"status": "success", "policy": version}))).into_response())
}

pub(super) async fn list(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Json<Value>, Error> {
    let who = principal(&gw, &headers)?;
    let caller = deployer(&gw, &who)?;
    let (mut versions, mut active) = store(&gw)?.list();
    if !caller.is_admin() {
        // A tenant sees its own activations and the versions it uploaded or runs.
        active.retain(|scope, _| scope == caller.name);
        let runs: std::collections::BTreeSet<&str> = active.values().flatten().map(|a| a.id.as_str()).collect();
        versions.retain(|v| caller.may_see_version(&v.uploaded_by, runs.contains(v.id.as_str())));
    }
    Ok(Json(json!({"status": "success", "policies": versions, "active": active})))
}

/// The caller, with `policy:deploy`, the store, and the optional JSON body (empty: defaults).
async fn deploy_call<T: serde::de::DeserializeOwned + Default>(
    gw: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Principal>, Arc<PolicyStore>, T), Error> {
    let who = principal(gw, headers)?;
    deployer(gw, &who)?;
    let store = store(gw)?.clone();
    let bytes = read_body(gw, headers, body).await?;
    let body = if bytes.is_empty() {
        T::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| Error::invalid(format!("invalid request body: {e}"), None))?
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
) -> Result<Json<Value>, Error> {
    let (who, store, body) = deploy_call::<ActivateBody>(&gw, &headers, body).await?;
    let caller = gw.caller(&who)?;
    let scope = caller.policy_scope(body.tenant.as_deref(), &gw.tenants)?;
    let version = store.version(&id).ok_or_else(|| no_version(&id))?;
    let by_admin = gw.tenants.get(&version.uploaded_by).is_some_and(|t| t.admin);
    if !caller.may_activate_version(&version.uploaded_by, by_admin, store.in_history(&scope, &id)) {
        return Err(no_version(&id));
    }
    let config = body.config.unwrap_or_else(|| json!({}));
    let activation = store.activate(&scope, &id, config).await?;
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
) -> Result<Json<Value>, Error> {
    let (who, store, body) = deploy_call::<RollbackBody>(&gw, &headers, body).await?;
    let scope = gw.caller(&who)?.policy_scope(body.tenant.as_deref(), &gw.tenants)?;
    let activation = store.rollback(&scope).await?;
    tracing::info!(id = %activation.id, scope = %scope, tenant = %who.tenant, "policy rolled back");
    Ok(Json(json!({"status": "success", "tenant": scope, "active": activation})))
}

/// `DELETE /v1/policies/{id}`: its uploader (or an admin) deletes a version no activation names.
pub(super) async fn delete(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, Error> {
    let who = principal(&gw, &headers)?;
    let caller = deployer(&gw, &who)?;
    let store = store(&gw)?.clone();
    let version = store.version(&id).ok_or_else(|| no_version(&id))?;
    if !caller.may_delete_version(&version.uploaded_by) {
        return Err(no_version(&id));
    }
    let deleted = store.delete(&id).await?;
    tracing::info!(id = %deleted.id, policy = %deleted.name, tenant = %caller.name, "policy version deleted");
    Ok(Json(json!({"status": "success", "deleted": deleted})))
}
