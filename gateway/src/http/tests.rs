//! The HTTP surface against an in-process backend double: every bad-input case gets the right
//! status and an OpenAI error body; streams have OpenAI's shape; adapters are re-applied.
//! (The same behaviour against real backend processes and the official SDK is tested in the
//! `switchyard` crate's `gateway` test.)

use crate::auth::{AuthConfig, Verifier};
use crate::loras::LoraStore;
use crate::policy::StaticPolicy;
use crate::policy::WasmPolicies;
use crate::policy::deploy::PolicyStore;
use crate::policy::wasm::{PolicyRuntime, WasmLimits};
use crate::reconcile::{self, Failures};
use crate::tenants::GatewayFile;
use crate::upstream::{
    AdapterState, AdapterStatus, BackendInfo, Finish, GenerateCall, LoadCall, Loaded, Piece, Probe, TokenStream,
    Upstream, UpstreamCode, UpstreamError, Usage,
};
use crate::{Gateway, GatewayOptions};
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

/// The fake backend's address: its identity in the gateway's routing table.
const FAKE: &str = "http://fake:1";

/// A backend double: adapters by name → uri, and what generation does.
#[derive(Debug, Default)]
struct FakeBackend {
    adapters: Mutex<BTreeMap<String, String>>,
    down: Mutex<bool>,
    /// Messages before the stream breaks off (None: it finishes).
    die_after: Mutex<Option<usize>>,
    generations: Mutex<Vec<GenerateCall>>,
    /// Generate streams forever; `cancelled` is set when the gateway drops the stream.
    endless: Mutex<bool>,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

/// Sets its flag when dropped: stands for the backend seeing its stream cancelled.
struct OnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn err(code: UpstreamCode, m: &str) -> UpstreamError {
    UpstreamError::new(code, m)
}

#[async_trait]
impl Upstream for FakeBackend {
    fn address(&self) -> &str {
        FAKE
    }

    async fn probe(&self) -> Result<Probe, UpstreamError> {
        if *self.down.lock().unwrap() {
            return Err(err(UpstreamCode::Unavailable, "connection refused"));
        }
        let adapters = self.adapters.lock().unwrap();
        let list = adapters.iter().map(|(n, u)| AdapterStatus::new(n, u, AdapterState::Resident)).collect();
        let info = BackendInfo {
            model: "tiny".into(),
            max_loras: 4,
            loaded_loras: adapters.len() as u32,
            ..Default::default()
        };
        Ok(Probe { serving: true, info, adapters: list })
    }

    async fn generate(&self, request: GenerateCall) -> Result<TokenStream, UpstreamError> {
        if *self.down.lock().unwrap() {
            return Err(err(UpstreamCode::Unavailable, "connection refused"));
        }
        if let Some(a) = &request.adapter
            && !self.adapters.lock().unwrap().contains_key(a)
        {
            return Err(err(UpstreamCode::NotFound, "adapter not resident"));
        }
        self.generations.lock().unwrap().push(request);
        if *self.endless.lock().unwrap() {
            let guard = OnDrop(self.cancelled.clone());
            return Ok(futures::stream::unfold(guard, |guard| async move {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                Some((Ok(Piece { text: "x".into(), ..Default::default() }), guard))
            })
            .boxed());
        }
        let die_after = *self.die_after.lock().unwrap();
        let mut items: Vec<Result<Piece, UpstreamError>> =
            ["Hello", " there", ""].iter().map(|t| Ok(Piece { text: t.to_string(), ..Default::default() })).collect();
        if let Some(Ok(last)) = items.last_mut() {
            last.finish = Some(Finish::Length);
            last.usage = Some(Usage { prompt_tokens: 5, completion_tokens: 2, cached_tokens: 0 });
        }
        if let Some(n) = die_after {
            items.truncate(n);
            items.push(Err(err(UpstreamCode::Unavailable, "backend went away")));
        }
        Ok(futures::stream::iter(items).boxed())
    }

    async fn load_adapter(&self, r: LoadCall) -> Result<Loaded, UpstreamError> {
        let uri = r.uri;
        if uri.contains("bad") {
            return Err(err(UpstreamCode::InvalidArgument, "rank 512 exceeds the maximum 64"));
        }
        if uri.contains("missing") {
            return Err(err(UpstreamCode::NotFound, "no such bucket"));
        }
        let old = self.adapters.lock().unwrap().insert(r.name.clone(), uri.clone());
        Ok(Loaded {
            already_loaded: old.as_deref() == Some(uri.as_str()),
            hot_swap: old.is_some_and(|o| o != uri),
            ..Default::default()
        })
    }

    async fn tokenize(&self, _: &crate::upstream::Prompt) -> Result<Vec<u32>, UpstreamError> {
        Err(err(UpstreamCode::Other, "the fake backend has no tokenizer"))
    }

    async fn watch_prefix_cache(&self) -> Result<crate::upstream::PrefixStream, UpstreamError> {
        Err(err(UpstreamCode::Other, "the fake backend has no prefix cache"))
    }

    async fn unload_adapter(&self, name: &str, _fence: u64) -> Result<(), UpstreamError> {
        match self.adapters.lock().unwrap().remove(name) {
            Some(_) => Ok(()),
            None => Err(err(UpstreamCode::NotFound, "unknown adapter")),
        }
    }
}

struct Harness {
    gw: Arc<Gateway>,
    backend: Arc<FakeBackend>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn harness() -> Harness {
    harness_with(false).await
}

/// With `policies`, the gateway hosts WebAssembly policies (state in the same temp dir).
async fn harness_with(policies: bool) -> Harness {
    harness_in(tempfile::tempdir().unwrap(), policies).await
}

async fn harness_in(dir: tempfile::TempDir, policies: bool) -> Harness {
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let file: GatewayFile = toml::from_str(
        r#"
        [tenants.acme]
        adapters = ["acme/*"]
        manage = ["acme/*"]
        load_prefixes = ["s3://acme/"]
        [tenants.beta]
        adapters = ["beta/*"]
        manage = ["beta/*"]
        load_prefixes = ["s3://beta/"]
        [tenants.ops]
        adapters = ["*"]
        load_prefixes = ["s3://ops/"]
        admin = true
        "#,
    )
    .unwrap();
    let verifier = Verifier::new(AuthConfig {
        issuer: Some("https://issuer.test".into()),
        audience: Some("switchyard".into()),
        hs256_secret_file: Some(secret),
        ..Default::default()
    })
    .unwrap();
    let backend = Arc::new(FakeBackend::default());
    let tenants = Arc::new(file.tenants);
    let fallback: Arc<dyn crate::policy::PolicyEngine> = Arc::new(StaticPolicy::new(tenants.clone()));
    let loras = LoraStore::open_dir(&dir.path().join("state")).await.unwrap();
    let store = match policies {
        true => {
            // The production limits: a looping policy must be stopped by its fuel (and say so),
            // not by the wall-clock guard, however loaded the machine running the tests is.
            let runtime = Arc::new(PolicyRuntime::new(WasmLimits::default()).unwrap());
            Some(PolicyStore::open(loras.replica().clone(), runtime, Default::default()).await.unwrap())
        }
        false => None,
    };
    let engine: Arc<dyn crate::policy::PolicyEngine> = match &store {
        Some(store) => Arc::new(WasmPolicies::new(store.clone(), fallback)),
        None => fallback,
    };
    let mut gateway = Gateway::new(
        vec![backend.clone()],
        loras,
        tenants,
        engine,
        Arc::new(verifier),
        GatewayOptions { max_body_bytes: 64 << 10, policy_headers: vec!["x-plan".into()], ..Default::default() },
    );
    if let Some(store) = store {
        gateway = gateway.with_policy_store(store);
    }
    let gw = Arc::new(gateway);
    let tasks = gw.spawn_state_tasks();
    // The only gateway on its directory leads at once.
    let mut lead = gw.leadership().subscribe();
    lead.wait_for(Option::is_some).await.unwrap();
    reconcile::round(&gw, FAKE, &mut Failures::default()).await;
    Harness { gw, backend, tasks, dir: Some(dir) }
}

fn token(tenant: &str, scopes: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({"iss": "https://issuer.test", "aud": "switchyard", "sub": "u1", "tenant": tenant,
        "scope": scopes, "exp": now + exp_offset});
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET).unwrap()).unwrap()
}

async fn call(
    h: &Harness,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Body,
) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(crate::http::router(h.gw.clone()), req.body(body).unwrap()).await
}

/// Sends `req` to `app`; the status, the body (JSON, else text) and the headers.
async fn send(app: axum::Router, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let resp = app.oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (parts.status, value, parts.headers)
}

async fn json_call(h: &Harness, method: &str, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
    let (s, v, _) = call(h, method, path, token, Body::from(body.to_string())).await;
    (s, v)
}

/// Asserts an OpenAI error body with this status, type and (when given) code.
fn assert_error(got: (StatusCode, Value), status: u16, kind: &str, code: Option<&str>) {
    let (s, v) = got;
    assert_eq!(s.as_u16(), status, "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    if let Some(code) = code {
        assert_eq!(v["error"]["code"], code, "{v}");
    }
}

async fn load(h: &Harness, tenant: &str, name: &str, uri: &str) -> (StatusCode, Value) {
    let t = token(tenant, "lora:load lora:read lora:unload", 600);
    json_call(h, "POST", "/v1/loras", Some(&t), json!({"lora_name": name, "source": {"uri": uri}})).await
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

#[tokio::test]
async fn inference_bad_input_gets_the_right_status_and_an_openai_error() {
    let h = harness().await;
    let t = token("acme", "", 600);
    let raw = |body: &'static str| Body::from(body);
    let (s, v, _) = call(&h, "POST", "/v1/chat/completions", Some(&t), raw("{\"model\": \"tiny\", ")).await;
    assert_error((s, v), 400, "invalid_request_error", None);
    let wrong_type = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"});
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&t), wrong_type).await,
        400,
        "invalid_request_error",
        None,
    );
    let huge = json!({"model": "tiny", "prompt": "x".repeat(100 << 10)});
    assert_error(
        json_call(&h, "POST", "/v1/completions", Some(&t), huge).await,
        413,
        "invalid_request_error",
        Some("request_too_large"),
    );
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("nope")).await,
        404,
        "not_found_error",
        Some("model_not_found"),
    );
    // beta's adapter exists, but acme may not use it: the same answer as a model that does not exist.
    assert_eq!(load(&h, "beta", "beta/secret", "s3://beta/secret").await.0, StatusCode::OK);
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("beta/secret")).await,
        404,
        "not_found_error",
        Some("model_not_found"),
    );
    // Tokens: none, expired, garbage, signed with another key.
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", None, chat("tiny")).await,
        401,
        "authentication_error",
        None,
    );
    let expired = token("acme", "", -3600);
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&expired), chat("tiny")).await,
        401,
        "authentication_error",
        None,
    );
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some("abc.def"), chat("tiny")).await,
        401,
        "authentication_error",
        None,
    );
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"iss": "https://issuer.test", "aud": "switchyard", "tenant": "acme", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(b"another-secret-another-secret-another").unwrap(),
    )
    .unwrap();
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&forged), chat("tiny")).await,
        401,
        "authentication_error",
        None,
    );
    // A tenant the gateway does not know.
    let stranger = token("gamma", "", 600);
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&stranger), chat("tiny")).await,
        403,
        "permission_error",
        Some("unknown_tenant"),
    );
    // Nothing reached the backend.
    assert!(h.backend.generations.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_adapter_api_checks_scopes_prefixes_and_names_and_keeps_no_half_state() {
    let h = harness().await;
    let read_only = token("acme", "lora:read", 600);
    let body = json!({"lora_name": "acme/a", "source": {"uri": "s3://acme/a"}});
    assert_error(
        json_call(&h, "POST", "/v1/loras", Some(&read_only), body).await,
        403,
        "permission_error",
        Some("insufficient_scope"),
    );
    assert_error(load(&h, "acme", "acme/a", "s3://beta/a").await, 403, "permission_error", Some("source_not_allowed"));
    assert_error(
        load(&h, "acme", "acme/a", "s3://acme-evil/a").await,
        403,
        "permission_error",
        Some("source_not_allowed"),
    );
    assert_error(load(&h, "acme", "beta/a", "s3://acme/a").await, 403, "permission_error", Some("adapter_not_allowed"));
    assert_error(load(&h, "acme", "acme/../x", "s3://acme/a").await, 400, "invalid_request_error", None);
    let t = token("acme", "lora:load", 600);
    let unknown_field = json!({"lora_name": "acme/a", "source": {"uri": "s3://acme/a"}, "lora_path": "/x"});
    assert_error(json_call(&h, "POST", "/v1/loras", Some(&t), unknown_field).await, 400, "invalid_request_error", None);
    // The backend refuses the adapter: 422, and nothing is recorded or left loaded.
    assert_error(
        load(&h, "acme", "acme/bad", "s3://acme/bad").await,
        422,
        "unprocessable_entity_error",
        Some("invalid_adapter"),
    );
    assert_error(
        load(&h, "acme", "acme/gone", "s3://acme/missing").await,
        422,
        "unprocessable_entity_error",
        Some("adapter_source_not_found"),
    );
    assert!(h.gw.loras.list().is_empty());
    assert!(h.backend.adapters.lock().unwrap().is_empty());

    let (s, v) = load(&h, "acme", "acme/a", "s3://acme/a").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "success");
    assert_eq!(v["lora_name"], "acme/a");
    assert_eq!(v["lora_id"], crate::loras::lora_id("acme/a"));
    assert_eq!(v["backends"][0]["status"], "loaded");
    assert_eq!(load(&h, "acme", "acme/a", "s3://acme/a").await.1["already_loaded"], true);
    assert_error(load(&h, "acme", "acme/a", "s3://acme/a2").await, 409, "conflict_error", Some("lora_exists"));
    let swap = json!({"lora_name": "acme/a", "source": {"uri": "s3://acme/a2"}, "hot_swap": true});
    let (s, v) = json_call(&h, "POST", "/v1/loras", Some(&token("acme", "lora:load", 600)), swap).await;
    assert_eq!((s, &v["hot_swap"]), (StatusCode::OK, &json!(true)), "{v}");

    let reader = token("acme", "lora:read", 600);
    let (s, v) = json_call(&h, "GET", "/v1/loras", Some(&reader), Value::Null).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["loras"], json!({"acme/a": crate::loras::lora_id("acme/a")}));
    assert_eq!(v["count"], 1);
    // beta sees none of acme's adapters, and cannot unload them: to beta they do not exist.
    let (_, v) = json_call(&h, "GET", "/v1/loras", Some(&token("beta", "lora:read", 600)), Value::Null).await;
    assert_eq!(v["count"], 0);
    let beta = token("beta", "lora:unload", 600);
    assert_error(
        json_call(&h, "DELETE", "/v1/loras/acme/a", Some(&beta), Value::Null).await,
        404,
        "not_found_error",
        Some("lora_not_found"),
    );
    assert_error(
        json_call(&h, "DELETE", "/v1/loras/acme/a", Some(&reader), Value::Null).await,
        403,
        "permission_error",
        Some("insufficient_scope"),
    );

    let unloader = token("acme", "lora:unload", 600);
    let (s, v) = json_call(&h, "DELETE", "/v1/loras/acme/a", Some(&unloader), Value::Null).await;
    assert_eq!((s, &v["lora_name"]), (StatusCode::OK, &json!("acme/a")), "{v}");
    assert!(h.backend.adapters.lock().unwrap().is_empty());
    let (s, v) = json_call(&h, "DELETE", "/v1/loras/acme/a", Some(&unloader), Value::Null).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"]["message"].as_str().unwrap().starts_with("LoRA adapter 'acme/a' not found. Available LoRAs: ["));
}

#[tokio::test]
async fn an_unreachable_backend_gives_503_with_retry_after_and_loads_are_refused() {
    let h = harness().await;
    *h.backend.down.lock().unwrap() = true;
    reconcile::round(&h.gw, FAKE, &mut Failures::default()).await;
    let t = token("acme", "", 600);
    let (s, v, headers) =
        call(&h, "POST", "/v1/chat/completions", Some(&t), Body::from(chat("tiny").to_string())).await;
    assert_error((s, v), 503, "service_unavailable_error", Some("no_backend"));
    assert!(headers.get("retry-after").is_some());
    assert_error(load(&h, "acme", "acme/a", "s3://acme/a").await, 503, "service_unavailable_error", Some("no_backend"));
    assert!(h.gw.loras.list().is_empty(), "a load no backend took is not recorded");
    let (s, _, _) = call(&h, "GET", "/readyz", None, Body::empty()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (_, metrics, _) = metrics(&h).await;
    assert!(metrics.as_str().unwrap().contains("switchyard_gateway_backend_healthy{backend=\"http://fake:1\"} 0"));
}

/// `GET /metrics` on the operators' router.
async fn metrics(h: &Harness) -> (StatusCode, Value, axum::http::HeaderMap) {
    let req = Request::builder().uri("/metrics").body(Body::empty()).unwrap();
    send(crate::http::metrics_router(h.gw.clone()), req).await
}

#[tokio::test]
async fn metrics_are_served_to_operators_and_never_on_the_public_port() {
    let h = harness().await;
    let t = token("acme", "", 600);
    json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("tiny")).await;
    let (s, v, _) = metrics(&h).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("tenant=\"acme\""), "{v}");
    // The public port has no /metrics, with or without a token.
    for token in [None, Some(t.as_str()), Some(&*token("ops", "lora:read policy:deploy", 600))] {
        let (s, v, _) = call(&h, "GET", "/metrics", token, Body::empty()).await;
        assert_error((s, v), 404, "not_found_error", Some("unknown_url"));
    }
}

#[tokio::test]
async fn duplicate_authorization_and_oversized_headers_get_openai_errors() {
    let h = harness().await;
    let (a, b) = (token("acme", "", 600), token("beta", "", 600));
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {a}"))
        .header("authorization", format!("Bearer {b}"))
        .body(Body::from(chat("tiny").to_string()))
        .unwrap();
    let (s, v, _) = send(crate::http::router(h.gw.clone()), req).await;
    assert_error((s, v), 400, "invalid_request_error", Some("duplicate_authorization"));
    let big = format!("Bearer {}", "x".repeat(crate::http::MAX_HEADER_BYTES));
    let req = Request::builder().uri("/v1/models").header("authorization", big).body(Body::empty()).unwrap();
    let (s, v, _) = send(crate::http::router(h.gw.clone()), req).await;
    assert_error((s, v), 431, "invalid_request_error", Some("headers_too_large"));
    assert!(h.backend.generations.lock().unwrap().is_empty());
}

#[tokio::test]
async fn owners_manage_their_adapters_and_others_use_them_only_when_granted() {
    let h = harness().await;
    let ops = token("ops", "lora:load lora:unload lora:read", 600);
    let load_as = |who: &str, name: &str, uri: &str, extra: Value| {
        let mut body = json!({"lora_name": name, "source": {"uri": uri}});
        body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        (token(who, "lora:load lora:unload lora:read", 600), body)
    };
    // ops publishes one adapter to everyone and keeps one to itself.
    let (t, body) = load_as("ops", "published", "s3://ops/published", json!({"shared": true}));
    let (s, v) = json_call(&h, "POST", "/v1/loras", Some(&t), body).await;
    assert_eq!((s, &v["owner"], &v["shared"]), (StatusCode::OK, &json!("ops"), &json!(true)), "{v}");
    let (t, body) = load_as("ops", "private", "s3://ops/private", json!({}));
    assert_eq!(json_call(&h, "POST", "/v1/loras", Some(&t), body).await.0, StatusCode::OK);

    // acme uses the shared one, not the private one, and sees only the shared one.
    let acme = token("acme", "lora:read lora:unload lora:load", 600);
    let (s, _) = json_call(&h, "POST", "/v1/chat/completions", Some(&acme), chat("published")).await;
    assert_eq!(s, StatusCode::OK);
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&acme), chat("private")).await,
        404,
        "not_found_error",
        Some("model_not_found"),
    );
    let (_, v) = json_call(&h, "GET", "/v1/loras", Some(&acme), Value::Null).await;
    assert_eq!(v["loras"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["published"], "{v}");
    assert_eq!((&v["adapters"][0]["owner"], &v["adapters"][0]["shared"]), (&json!("ops"), &json!(true)));

    // Using is not managing: acme can neither unload it nor swap its weights.
    assert_error(
        json_call(&h, "DELETE", "/v1/loras/published", Some(&acme), Value::Null).await,
        403,
        "permission_error",
        Some("adapter_not_owned"),
    );
    let (_, body) = load_as("acme", "published", "s3://acme/evil", json!({"hot_swap": true}));
    assert_error(
        json_call(&h, "POST", "/v1/loras", Some(&acme), body).await,
        403,
        "permission_error",
        Some("adapter_not_owned"),
    );
    assert_eq!(h.backend.adapters.lock().unwrap().get("published").map(String::as_str), Some("s3://ops/published"));
    // A name outside its manage patterns is not acme's to create either.
    let (_, body) = load_as("acme", "json", "s3://acme/json", json!({}));
    assert_error(
        json_call(&h, "POST", "/v1/loras", Some(&acme), body).await,
        403,
        "permission_error",
        Some("adapter_not_allowed"),
    );

    // An admin's hot swap keeps the owner; the owner's load grant no longer bounds the source.
    let (_, body) = load_as("ops", "acme/x", "s3://acme/x", json!({}));
    let (s, _) = json_call(&h, "POST", "/v1/loras", Some(&acme), body).await;
    assert_eq!(s, StatusCode::OK);
    let (_, body) = load_as("ops", "acme/x", "s3://ops/x2", json!({"hot_swap": true}));
    let (s, v) = json_call(&h, "POST", "/v1/loras", Some(&ops), body).await;
    assert_eq!((s, &v["owner"]), (StatusCode::OK, &json!("acme")), "{v}");
    let lora = h.gw.loras.get("acme/x").unwrap();
    assert_eq!((lora.owner.as_str(), lora.loader()), ("acme", "ops"));
    // The owner unloads its own adapter; the admin unloads anyone's.
    assert_eq!(json_call(&h, "DELETE", "/v1/loras/acme/x", Some(&acme), Value::Null).await.0, StatusCode::OK);
    assert_eq!(json_call(&h, "DELETE", "/v1/loras/published", Some(&ops), Value::Null).await.0, StatusCode::OK);
}

fn sse_data(text: &str) -> Vec<(Option<String>, String)> {
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        if !data.is_empty() {
            events.push((event, data));
        }
    }
    events
}

#[tokio::test]
async fn streams_have_openai_chunks_usage_and_done_and_a_dying_backend_gives_an_error_event() {
    let h = harness().await;
    assert_eq!(load(&h, "acme", "acme/a", "s3://acme/a").await.0, StatusCode::OK);
    let t = token("acme", "", 600);
    let mut body = chat("acme/a");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["ignore_eos"] = json!(true);
    let (s, v, headers) = call(&h, "POST", "/v1/chat/completions", Some(&t), Body::from(body.to_string())).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        headers[crate::http::inference::SERVED_MODEL],
        "acme/a",
        "the response names the adapter that served it"
    );
    assert!(h.backend.generations.lock().unwrap()[0].ignore_eos, "vLLM's ignore_eos reaches the backend");
    let events = sse_data(v.as_str().unwrap());
    let datas: Vec<&str> = events.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(datas.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = datas[..datas.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello there");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 7);
    assert_eq!(h.backend.generations.lock().unwrap()[0].adapter.as_deref(), Some("acme/a"));
    let (s, _, headers) =
        call(&h, "POST", "/v1/chat/completions", Some(&t), Body::from(chat("tiny").to_string())).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers[crate::http::inference::SERVED_MODEL], "tiny", "the base model, named as such");
    assert!(!h.backend.generations.lock().unwrap()[1].ignore_eos);

    *h.backend.die_after.lock().unwrap() = Some(1);
    let (_, v, _) = call(&h, "POST", "/v1/chat/completions", Some(&t), Body::from(body.to_string())).await;
    let events = sse_data(v.as_str().unwrap());
    let (event, data) = events.last().unwrap();
    assert_eq!(event.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["error"]["code"], "backend_unavailable");
    assert!(!events.iter().any(|(_, d)| d == "[DONE]"), "a broken stream does not claim to be done");
}

#[tokio::test]
async fn a_restarted_backend_gets_the_desired_adapters_back() {
    let h = harness().await;
    assert_eq!(load(&h, "acme", "acme/a", "s3://acme/a").await.0, StatusCode::OK);
    assert_eq!(load(&h, "beta", "beta/b", "s3://beta/b").await.0, StatusCode::OK);
    // The backend restarts: it knows no adapter.
    h.backend.adapters.lock().unwrap().clear();
    // A request for an adapter it lacks loads it there first, before the reconciler runs.
    let t = token("acme", "", 600);
    let (s, v) = json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("acme/a")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello there");
    assert_eq!(v["usage"]["total_tokens"], 7);
    // The reconciler brings back the rest.
    reconcile::round(&h.gw, FAKE, &mut Failures::default()).await;
    let loaded: Vec<String> = h.backend.adapters.lock().unwrap().keys().cloned().collect();
    assert_eq!(loaded, vec!["acme/a".to_string(), "beta/b".to_string()]);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_generation_on_the_backend() {
    use http_body_util::BodyExt;
    let h = harness().await;
    *h.backend.endless.lock().unwrap() = true;
    let mut body = chat("tiny");
    body["stream"] = json!(true);
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {}", token("acme", "", 600)))
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = crate::http::router(h.gw.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The stream is running: text keeps coming.
    for _ in 0..3 {
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
    }
    assert!(!h.backend.cancelled.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(h.gw.views()[0].in_flight, 1);
    drop(body);
    assert!(h.backend.cancelled.load(std::sync::atomic::Ordering::SeqCst), "the backend stream was not dropped");
    assert_eq!(h.gw.views()[0].in_flight, 0, "the request still counts against the backend's queue");
    let metrics = h.gw.metrics.render();
    assert!(metrics.contains("status=\"499\""), "an abandoned stream is counted as 499:\n{metrics}");
}

async fn upload(h: &Harness, name: &str, bytes: Vec<u8>) -> (StatusCode, Value) {
    let t = token("ops", "policy:deploy", 600);
    let (s, v, _) = call(h, "POST", &format!("/v1/policies?name={name}"), Some(&t), Body::from(bytes)).await;
    (s, v)
}

async fn activate(h: &Harness, who: &str, id: &str, body: Value) -> (StatusCode, Value) {
    let t = token(who, "policy:deploy", 600);
    json_call(h, "POST", &format!("/v1/policies/{id}/activate"), Some(&t), body).await
}

#[tokio::test]
async fn policies_are_deployed_activated_rolled_back_and_survive_a_restart_through_the_api() {
    let h = harness_with(true).await;
    for name in ["acme/v1", "acme/v2", "acme/pro"] {
        assert_eq!(load(&h, "acme", name, &format!("s3://acme/{name}")).await.0, StatusCode::OK);
    }
    // Not a component; a core module; no token; no scope.
    assert_error(
        upload(&h, "junk", b"not wasm".to_vec()).await,
        422,
        "unprocessable_entity_error",
        Some("invalid_policy"),
    );
    let (s, _, _) = call(&h, "POST", "/v1/policies?name=x", None, Body::from(vec![0u8; 8])).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let no_scope = token("ops", "lora:load", 600);
    let (s, v, _) = call(&h, "POST", "/v1/policies?name=x", Some(&no_scope), Body::from(vec![0u8; 8])).await;
    assert_error((s, v), 403, "permission_error", Some("insufficient_scope"));

    let (s, v) = upload(&h, "tenant-map", crate::policy::built::component("tenant-map")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let map = v["policy"]["id"].as_str().unwrap().to_string();
    let (_, v) = upload(&h, "canary", crate::policy::built::component("canary")).await;
    let canary = v["policy"]["id"].as_str().unwrap().to_string();

    // acme may manage only its own policy; ops (admin) may set anyone's and the default.
    assert_error(
        activate(&h, "acme", &map, json!({"tenant": "beta"})).await,
        403,
        "permission_error",
        Some("policy_not_allowed"),
    );
    assert_error(
        activate(&h, "acme", "0000000000000000", json!({})).await,
        404,
        "not_found_error",
        Some("policy_not_found"),
    );
    assert_error(
        activate(&h, "acme", &canary, json!({"config": {"percent": 5}})).await,
        422,
        "unprocessable_entity_error",
        Some("policy_dry_run_failed"),
    );
    let (s, v) = activate(&h, "acme", &map, json!({"config": {"tenants": {"acme": "acme/v1"}}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let t = token("acme", "", 600);
    let content = |v: Value| v["choices"][0]["message"]["content"].as_str().map(str::to_string);
    let (s, v) = json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("anything")).await;
    assert_eq!((s, content(v).as_deref()), (StatusCode::OK, Some("Hello there")));
    assert_eq!(h.backend.generations.lock().unwrap().last().unwrap().adapter.as_deref(), Some("acme/v1"));

    let (s, v) =
        activate(&h, "acme", &canary, json!({"config": {"stable": "acme/v1", "canary": "acme/v2", "percent": 100}}))
            .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("anything")).await;
    assert_eq!(h.backend.generations.lock().unwrap().last().unwrap().adapter.as_deref(), Some("acme/v2"));

    let deployer = token("acme", "policy:deploy", 600);
    let (s, v) = json_call(&h, "POST", "/v1/policies/rollback", Some(&deployer), json!({})).await;
    assert_eq!((s, &v["active"]["id"]), (StatusCode::OK, &json!(map)), "{v}");
    json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("anything")).await;
    assert_eq!(h.backend.generations.lock().unwrap().last().unwrap().adapter.as_deref(), Some("acme/v1"));
    assert_error(
        json_call(&h, "POST", "/v1/policies/rollback", Some(&deployer), json!({})).await,
        409,
        "conflict_error",
        Some("nothing_to_roll_back"),
    );
    let (_, v) = json_call(&h, "GET", "/v1/policies", Some(&deployer), Value::Null).await;
    // acme sees the version it runs, not every upload (ops uploaded both).
    let ids: Vec<&str> = v["policies"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![map.as_str()]);
    assert_eq!(v["active"].as_object().unwrap().keys().collect::<Vec<_>>(), vec!["acme"], "acme sees only its own");

    // Restart: a new gateway over the same state dir routes acme the same way.
    let mut h = h;
    let dir = h.dir.take().unwrap();
    drop(h);
    let h = harness_in(dir, true).await;
    json_call(&h, "POST", "/v1/chat/completions", Some(&t), chat("anything")).await;
    assert_eq!(h.backend.generations.lock().unwrap().last().unwrap().adapter.as_deref(), Some("acme/v1"));
}

#[tokio::test]
async fn a_hostile_policy_fails_its_tenants_requests_and_no_one_elses() {
    let h = harness_with(true).await;
    assert_eq!(load(&h, "acme", "acme/v1", "s3://acme/v1").await.0, StatusCode::OK);
    let (_, v) = upload(&h, "hostile", crate::policy::built::component("hostile")).await;
    let hostile = v["policy"]["id"].as_str().unwrap().to_string();
    let (_, v) = upload(&h, "tenant-map", crate::policy::built::component("tenant-map")).await;
    let map = v["policy"]["id"].as_str().unwrap().to_string();
    let (s, v) = activate(&h, "ops", &map, json!({"tenant": "acme", "config": {"tenants": {"acme": "acme/v1"}}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // An activation whose dry run faults is refused; one whose faults show only on real
    // requests (here: the ghost adapter) is the tenant's own problem.
    assert_error(
        activate(&h, "ops", &hostile, json!({"tenant": "beta", "config": {"mode": "loop"}})).await,
        422,
        "unprocessable_entity_error",
        Some("policy_dry_run_failed"),
    );
    let (s, _) = activate(&h, "ops", &hostile, json!({"tenant": "beta", "config": {"mode": "ghost"}})).await;
    assert_eq!(s, StatusCode::OK);
    let beta = token("beta", "", 600);
    assert_error(
        json_call(&h, "POST", "/v1/chat/completions", Some(&beta), chat("x")).await,
        404,
        "not_found_error",
        Some("model_not_found"),
    );
    // A policy that passes its dry run and loops on real requests: beta's requests fail
    // with a clear 500, promptly; acme's are served.
    let (s, v) =
        activate(&h, "ops", &hostile, json!({"tenant": "beta", "config": {"mode": "loop", "only_live": true}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let started = std::time::Instant::now();
    let (s, v) = json_call(&h, "POST", "/v1/chat/completions", Some(&beta), chat("x")).await;
    assert_error((s, v.clone()), 500, "server_error", Some("policy_failed"));
    assert!(v["error"]["message"].as_str().unwrap().contains("fuel"), "{v}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let acme = token("acme", "", 600);
    let (s, _) = json_call(&h, "POST", "/v1/chat/completions", Some(&acme), chat("x")).await;
    assert_eq!(s, StatusCode::OK, "acme is unaffected");
    // Faults that keep costing their fuel suspend the policy: beta is refused at once.
    for _ in 1..crate::policy::breaker::FAULTS_TO_OPEN {
        json_call(&h, "POST", "/v1/chat/completions", Some(&beta), chat("x")).await;
    }
    // The breaker answers before any instance runs (a timing bound here would only measure
    // how loaded the machine is): the message says the policy was suspended, not what it did.
    let (s, v) = json_call(&h, "POST", "/v1/chat/completions", Some(&beta), chat("x")).await;
    assert_error((s, v.clone()), 500, "server_error", Some("policy_failed"));
    assert!(v["error"]["message"].as_str().unwrap().contains("suspended"), "{v}");
    let (s, _) = json_call(&h, "POST", "/v1/chat/completions", Some(&acme), chat("x")).await;
    assert_eq!(s, StatusCode::OK);
}

/// A valid component with different bytes: the same policy with a custom section appended.
fn variant(bytes: &[u8], n: u32) -> Vec<u8> {
    let name = b"variant";
    let payload = n.to_le_bytes();
    let mut out = bytes.to_vec();
    // Custom section: id 0, size, name (length-prefixed), payload; sizes < 128 fit one LEB byte.
    out.extend([0u8, (1 + name.len() + payload.len()) as u8, name.len() as u8]);
    out.extend(name);
    out.extend(payload);
    out
}

#[tokio::test]
async fn the_policy_store_is_bounded_per_tenant_and_unused_versions_can_be_deleted() {
    let h = harness_with(true).await;
    let acme = token("acme", "policy:deploy", 600);
    let put = |n: u32| {
        let body = variant(&crate::policy::built::component("tenant-map"), n);
        let acme = acme.clone();
        let h = &h;
        async move {
            let (s, v, _) = call(h, "POST", "/v1/policies?name=mine", Some(&acme), Body::from(body)).await;
            (s, v)
        }
    };
    let limit = crate::policy::deploy::DEFAULT_VERSIONS_PER_TENANT as u32;
    let mut ids = Vec::new();
    for n in 0..limit {
        let (s, v) = put(n).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        ids.push(v["policy"]["id"].as_str().unwrap().to_string());
    }
    assert_error(put(limit).await, 403, "permission_error", Some("policy_quota_exceeded"));
    // Other tenants are not held to acme's count.
    let (s, v) = upload(&h, "tenant-map", crate::policy::built::component("tenant-map")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(!ids.contains(&v["policy"]["id"].as_str().unwrap().to_string()), "ids are per uploader");

    // A version an activation names cannot be deleted; an unused one can, and frees room.
    let (s, v) = activate(&h, "acme", &ids[0], json!({"config": {"tenants": {}}})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let delete = |id: String, who: &str| {
        let t = token(who, "policy:deploy", 600);
        let h = &h;
        async move { json_call(h, "DELETE", &format!("/v1/policies/{id}"), Some(&t), Value::Null).await }
    };
    assert_error(delete(ids[0].clone(), "acme").await, 409, "conflict_error", Some("policy_in_use"));
    assert_error(delete(ids[1].clone(), "beta").await, 404, "not_found_error", Some("policy_not_found"));
    let (s, v) = delete(ids[1].clone(), "acme").await;
    assert_eq!((s, &v["deleted"]["id"]), (StatusCode::OK, &json!(ids[1])), "{v}");
    assert_error(delete(ids[1].clone(), "acme").await, 404, "not_found_error", Some("policy_not_found"));
    assert!(!h.gw.policies.as_ref().unwrap().list().0.iter().any(|v| v.id == ids[1]));
    assert_eq!(put(limit).await.0, StatusCode::CREATED, "deleting made room");

    // A token whose tenant is "*" (the default policy's key) is no tenant at all.
    let star = token("*", "policy:deploy", 600);
    for (method, path) in [("GET", "/v1/policies"), ("POST", "/v1/policies/rollback")] {
        assert_error(
            json_call(&h, method, path, Some(&star), json!({})).await,
            403,
            "permission_error",
            Some("unknown_tenant"),
        );
    }
    // Nor may an admin name it (or a tenant that does not exist) instead of omitting the tenant.
    for tenant in ["*", "mallory"] {
        assert_error(
            activate(&h, "ops", &ids[0], json!({"tenant": tenant})).await,
            400,
            "invalid_request_error",
            Some("no_such_tenant"),
        );
    }
}

#[tokio::test]
async fn an_operation_recorded_too_late_is_failed_unrun_and_a_finished_one_blocks_nothing() {
    use crate::admin::ops::{self, Action, Operation, Outcome};
    use crate::error::Code;
    use crate::store::{Expect, Write};
    let h = harness().await;
    let lora = crate::loras::DesiredLora::new("acme/late", "s3://acme/late", "acme");
    // What a write that timed out during a store outage looks like when etcd commits it later.
    let late = Operation {
        id: "late".into(),
        action: Action::Load { lora },
        expect: None,
        requested_by: "acme".into(),
        gateway: "another".into(),
        requested_at: ops::now() - ops::ACCEPT_WITHIN_S - 5,
        started: None,
        outcome: None,
    };
    let record = vec![Write::put(ops::key("acme/late"), Expect::Absent, serde_json::to_string(&late).unwrap())];
    h.gw.replica().commit(record).await.unwrap();
    let mut changes = h.gw.replica().subscribe();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Some((op, _)) = ops::read(&h.gw.replica().current(), "acme/late")
                && let Some(outcome) = op.outcome
            {
                return outcome;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the leader settles the record");
    assert!(
        matches!(outcome, Outcome::Failed { ref error, .. } if error.code == Code::OperationExpired),
        "{outcome:?}"
    );
    assert!(h.backend.adapters.lock().unwrap().get("acme/late").is_none(), "an expired operation reached a backend");
    assert!(h.gw.loras.get("acme/late").is_none());
    // Its finished record (nobody read it) does not stand in the way of the next request.
    let (status, v) = load(&h, "acme", "acme/late", "s3://acme/late").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(h.backend.adapters.lock().unwrap().get("acme/late").map(String::as_str), Some("s3://acme/late"));
}
