//! The policy host against real components: the example policies decide as documented, every
//! hostile behaviour is contained to its own call, and components that are not policies are
//! refused at upload.

use super::built::component;
use super::deploy::{DEFAULT_SCOPE, PolicyStore};
use super::wasm::{
    CompiledPolicy, Deployment, LoadError, PolicyFault, PolicyRuntime, WasmLimits, WitDecision, request,
};
use super::{Decision, Endpoint, HostView, PolicyEngine, PolicyInput, Route, StaticPolicy, WasmPolicies};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn wasm_fuel() -> u64 {
    super::wasm::DEFAULT_FUEL
}

/// One runtime for these tests (compiled components belong to their engine), with the
/// production limits: the fuel, not the wall-clock guard, must be what stops a loop, however
/// loaded the machine running the tests is (the guard has its own test, with its own runtime).
fn runtime() -> Arc<PolicyRuntime> {
    static RUNTIME: std::sync::LazyLock<Arc<PolicyRuntime>> =
        std::sync::LazyLock::new(|| Arc::new(PolicyRuntime::new(WasmLimits::default()).unwrap()));
    RUNTIME.clone()
}

struct Req {
    tenant: String,
    model: String,
    subject: Option<String>,
    claims: serde_json::Map<String, serde_json::Value>,
    headers: Vec<(String, String)>,
    adapters: Vec<(String, String)>,
    backends: Vec<crate::cluster::BackendView>,
}

fn req(tenant: &str, model: &str) -> Req {
    Req {
        tenant: tenant.into(),
        model: model.into(),
        subject: None,
        claims: Default::default(),
        headers: Vec::new(),
        adapters: Vec::new(),
        backends: Vec::new(),
    }
}

static NO_SCOPES: std::sync::LazyLock<BTreeSet<String>> = std::sync::LazyLock::new(BTreeSet::new);

fn input(r: &Req) -> PolicyInput<'_> {
    PolicyInput {
        tenant: &r.tenant,
        subject: r.subject.as_deref(),
        scopes: &NO_SCOPES,
        claims: &r.claims,
        endpoint: Endpoint::ChatCompletions,
        model: &r.model,
        base_model: "base",
        stream: false,
        max_tokens: None,
        prompt_chars: 5,
        headers: r.headers.clone(),
        backends: r.backends.clone(),
        adapters: r.adapters.clone(),
        prefix: None,
        features: Default::default(),
    }
}

/// Compiles each component once (with the shared runtime).
fn compiled(rt: &PolicyRuntime, name: &str) -> CompiledPolicy {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: std::sync::LazyLock<Mutex<HashMap<String, CompiledPolicy>>> =
        std::sync::LazyLock::new(Default::default);
    let mut cache = CACHE.lock().unwrap();
    cache.entry(name.to_string()).or_insert_with(|| rt.compile(&component(name)).unwrap()).clone()
}

async fn decide(rt: &PolicyRuntime, name: &str, config: &str, r: &Req) -> Result<WitDecision, PolicyFault> {
    rt.decide(&compiled(rt, name), &request(&input(r)), HostView::default(), Arc::from(config), Arc::from(name)).await
}

fn routed(d: Result<WitDecision, PolicyFault>) -> Option<String> {
    match d {
        Ok(WitDecision::Route(r)) => r.adapter,
        other => panic!("expected a route, got {other:?}"),
    }
}

fn rejected(d: Result<WitDecision, PolicyFault>) -> (u16, String) {
    match d {
        Ok(WitDecision::Reject(r)) => (r.status, r.code),
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[tokio::test]
async fn the_example_policies_decide_as_documented() {
    let rt = runtime();
    let cfg = r#"{"tenants": {"acme": "acme/support"}, "default": "shared/general", "deny": ["mallory"]}"#;
    assert_eq!(routed(decide(&rt, "tenant-map", cfg, &req("acme", "anything")).await).as_deref(), Some("acme/support"));
    assert_eq!(
        routed(decide(&rt, "tenant-map", cfg, &req("beta", "anything")).await).as_deref(),
        Some("shared/general")
    );
    assert_eq!(routed(decide(&rt, "tenant-map", cfg, &req("acme", "base")).await), None);
    let mut named = req("acme", "acme/support-v2");
    named.adapters.push(("acme/support-v2".into(), "acme".into()));
    assert_eq!(routed(decide(&rt, "tenant-map", cfg, &named).await).as_deref(), Some("acme/support-v2"));
    assert_eq!(rejected(decide(&rt, "tenant-map", cfg, &req("mallory", "x")).await), (403, "tenant_denied".into()));

    // canary: sticky per user, and about `percent` of users.
    let cfg = r#"{"stable": "a/v1", "canary": "a/v2", "percent": 30}"#;
    let mut canaries = 0;
    for i in 0..200 {
        let mut r = req("acme", "x");
        r.subject = Some(format!("user-{i}"));
        let first = routed(decide(&rt, "canary", cfg, &r).await);
        assert_eq!(routed(decide(&rt, "canary", cfg, &r).await), first, "user-{i} moved between versions");
        canaries += usize::from(first.as_deref() == Some("a/v2"));
    }
    assert!((35..=85).contains(&canaries), "{canaries} of 200 users on a 30% canary");
    let all = r#"{"stable": "a/v1", "canary": "a/v2", "percent": 100}"#;
    assert_eq!(routed(decide(&rt, "canary", all, &req("acme", "x")).await).as_deref(), Some("a/v2"));
    assert!(matches!(decide(&rt, "canary", "{}", &req("acme", "x")).await, Err(PolicyFault::Failed(_))));

    // claims-route: a claim (or a header) picks the adapter; nothing matching is refused.
    let cfg = r#"{"claim": "plan", "routes": {"pro": "acme/pro", "free": "acme/free"}, "header": "x-plan"}"#;
    let mut pro = req("acme", "x");
    pro.claims.insert("plan".into(), serde_json::json!("pro"));
    assert_eq!(routed(decide(&rt, "claims-route", cfg, &pro).await).as_deref(), Some("acme/pro"));
    let mut listed = req("acme", "x");
    listed.claims.insert("plan".into(), serde_json::json!(["free", "pro"]));
    assert_eq!(routed(decide(&rt, "claims-route", cfg, &listed).await).as_deref(), Some("acme/free"));
    let mut by_header = req("acme", "x");
    by_header.headers.push(("x-plan".into(), "pro".into()));
    assert_eq!(routed(decide(&rt, "claims-route", cfg, &by_header).await).as_deref(), Some("acme/pro"));
    assert_eq!(rejected(decide(&rt, "claims-route", cfg, &req("acme", "x")).await), (403, "no_route".into()));
}

#[tokio::test]
async fn a_policy_built_against_contract_0_1_0_still_deploys_and_decides() {
    // tenant-map as built against `switchyard:policy@0.1.0` (before `cached-prefix`): it
    // imports a subset of the 0.1.1 host and links by semver.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/policies/tenant_map-0.1.0.wasm");
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.windows(24).any(|w| w == b"switchyard:policy/host@0"), "the fixture names its contract");
    let rt = runtime();
    let old = rt.compile(&bytes).unwrap();
    let cfg: Arc<str> = Arc::from(r#"{"tenants": {"acme": "acme/support"}, "default": "shared/general"}"#);
    let decided =
        rt.decide(&old, &request(&input(&req("acme", "x"))), HostView::default(), cfg.clone(), Arc::from("old")).await;
    assert_eq!(routed(decided).as_deref(), Some("acme/support"));
    let decided =
        rt.decide(&old, &request(&input(&req("beta", "x"))), HostView::default(), cfg, Arc::from("old")).await;
    assert_eq!(routed(decided).as_deref(), Some("shared/general"));
}

/// A probe that reports one fixed overlap for adapter `a/x` (and none for others), counting
/// the calls that reach it.
#[derive(Debug, Default)]
struct FixedProbe {
    calls: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl super::PrefixProbe for FixedProbe {
    async fn overlap(&self, adapter: Option<&str>) -> Result<super::PrefixOverlap, String> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match adapter {
            Some("a/x") => Ok(super::PrefixOverlap {
                prompt_tokens: 700,
                backends: vec![("http://b1:1".into(), 640), ("http://b2:1".into(), 0)],
            }),
            other => Err(format!("adapter {other:?} is not one this tenant may use")),
        }
    }
}

/// What the `prefix` mode of the hostile component learned, from its refusal.
async fn learned(probe: Option<Arc<FixedProbe>>, adapter: &str, calls: u32) -> serde_json::Value {
    let rt = runtime();
    let config = format!(r#"{{"mode": "prefix", "adapter": "{adapter}", "calls": {calls}}}"#);
    let probe = probe.map(|p| p as Arc<dyn super::PrefixProbe>);
    let (policy, wit) = (compiled(&rt, "hostile"), request(&input(&req("acme", "x"))));
    match rt.decide(&policy, &wit, HostView { prefix: probe, ..Default::default() }, config.into(), "p".into()).await {
        Ok(WitDecision::Reject(r)) if r.code == "prefix" => serde_json::from_str(&r.message).unwrap(),
        other => panic!("expected the policy's report, got {other:?}"),
    }
}

#[tokio::test]
async fn a_policy_sees_what_its_probe_reports_for_the_adapter_it_names_a_few_times_per_decision() {
    let probe = Arc::new(FixedProbe::default());
    let seen = learned(Some(probe.clone()), "a/x", 1).await;
    assert_eq!(seen, serde_json::json!({"prompt_tokens": 700, "cached": {"http://b1:1": 640, "http://b2:1": 0}}));
    let seen = learned(Some(probe.clone()), "b/y", 1).await;
    assert!(seen["error"].as_str().unwrap().contains("not one this tenant may use"), "{seen}");
    // The host stops a policy that keeps asking (each call may hash the whole prompt) before
    // the probe sees a fifth call.
    let seen = learned(Some(probe.clone()), "a/x", 10).await;
    assert!(seen["error"].as_str().unwrap().contains("at most 4 times"), "{seen}");
    assert_eq!(probe.calls.load(std::sync::atomic::Ordering::Relaxed), 2 + 4);
    // With no backends to ask (a dry run, a test case), the call fails and says why.
    let seen = learned(None, "a/x", 1).await;
    assert!(seen["error"].as_str().unwrap().contains("no backends to ask"), "{seen}");
}

#[tokio::test]
async fn a_policy_sees_what_each_request_asks_of_the_model_and_routes_on_it() {
    use super::{ConstraintKind, Features};
    let rt = runtime();
    let config = r#"{"json": "acme/extract", "tools": "acme/agent"}"#;
    let route = async |features: Features| {
        let view = HostView { features, ..Default::default() };
        let (policy, wit) = (compiled(&rt, "task-route"), request(&input(&req("acme", "acme/chat"))));
        routed(rt.decide(&policy, &wit, view, config.into(), "t".into()).await)
    };
    let json = Features { constraint: Some(ConstraintKind::JsonSchema), ..Default::default() };
    assert_eq!(route(json).await.as_deref(), Some("acme/extract"));
    let tools = Features { tools: 3, logprobs: true, ..Default::default() };
    assert_eq!(route(tools).await.as_deref(), Some("acme/agent"));
    let regex = Features { constraint: Some(ConstraintKind::Regex), ..Default::default() };
    assert_eq!(route(regex).await.as_deref(), Some("acme/chat"));
    assert_eq!(route(Features::default()).await.as_deref(), Some("acme/chat"), "free text: the model named");
}

#[tokio::test]
async fn prefix_affinity_pins_the_backend_caching_most_of_the_prompt_unless_it_is_much_busier() {
    let rt = runtime();
    let probe: Arc<dyn super::PrefixProbe> = Arc::new(FixedProbe::default());
    // b1 caches 640 of the prompt's 700 tokens for a/x, b2 nothing.
    let with_queues = |b1: u32, b2: u32, model: &str| {
        let mut r = req("acme", model);
        for (address, in_flight) in [("http://b1:1", b1), ("http://b2:1", b2)] {
            let view =
                crate::cluster::BackendView { address: address.into(), healthy: true, in_flight, ..Default::default() };
            r.backends.push(view);
        }
        r
    };
    let route = async |r: Req, config: &str| match rt
        .decide(
            &compiled(&rt, "prefix-affinity"),
            &request(&input(&r)),
            HostView { prefix: Some(probe.clone()), ..Default::default() },
            config.into(),
            "p".into(),
        )
        .await
    {
        Ok(WitDecision::Route(route)) => (route.adapter, route.backend),
        other => panic!("expected a route, got {other:?}"),
    };
    let (a, b1) = (Some("a/x".to_string()), Some("http://b1:1".to_string()));
    assert_eq!(route(with_queues(2, 0, "a/x"), "{}").await, (a.clone(), b1.clone()), "two more queued is allowed");
    assert_eq!(route(with_queues(3, 0, "a/x"), "{}").await, (a.clone(), None), "three more is not");
    assert_eq!(route(with_queues(3, 0, "a/x"), r#"{"max_queue_gap": 3}"#).await, (a.clone(), b1));
    assert_eq!(route(with_queues(0, 0, "a/x"), r#"{"min_cached_tokens": 641}"#).await, (a, None));
    // The probe knows nothing of the base model (an error): the gateway chooses.
    assert_eq!(route(with_queues(0, 0, "base"), "{}").await, (None, None));
}

async fn hostile(rt: &PolicyRuntime, mode: &str) -> Result<WitDecision, PolicyFault> {
    decide(rt, "hostile", &format!(r#"{{"mode": "{mode}"}}"#), &req("evil", "x")).await
}

#[tokio::test]
async fn no_request_sees_anything_of_the_requests_before_it() {
    // A policy that keeps what it sees in a global, run as requests run it: through a
    // deployment, from instances made ahead while earlier requests were answered.
    let rt = runtime();
    let config = Arc::from(r#"{"mode": "remember"}"#);
    let deployment = Arc::new(Deployment::new(rt.clone(), compiled(&rt, "hostile"), config, Arc::from("remember")));
    let mut from_ahead = 0;
    for subject in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut r = req("acme", "x");
        r.subject = Some(subject.into());
        from_ahead += usize::from(deployment.ready() > 0);
        match deployment.decide(&request(&input(&r)), HostView::default()).await {
            Ok(WitDecision::Reject(r)) => assert_eq!(r.message, "earlier: []", "{subject} saw an earlier request"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The answer goes out; the instance is dropped and the next one made meanwhile.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    assert!(from_ahead >= 5, "only {from_ahead} of 6 requests found an instance made ahead");
    // Instances made ahead stay within a quarter of the pool, over all deployments.
    let small = Arc::new(PolicyRuntime::new(WasmLimits { pool_instances: 4, ..Default::default() }).unwrap());
    let policy = small.compile(&component("tenant-map")).unwrap();
    let config: Arc<str> = Arc::from(r#"{"tenants": {"acme": "acme/support"}}"#);
    let deployments: Vec<_> = (0..3)
        .map(|i| Arc::new(Deployment::new(small.clone(), policy.clone(), config.clone(), Arc::from(format!("d{i}")))))
        .collect();
    for d in &deployments {
        for _ in 0..3 {
            assert_eq!(
                routed(d.decide(&request(&input(&req("acme", "x"))), HostView::default()).await).as_deref(),
                Some("acme/support")
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(deployments.iter().map(|d| d.ready()).sum::<usize>(), 1);
}

#[tokio::test]
async fn the_fuel_bounds_the_guests_own_work_and_the_wall_clock_is_a_guard() {
    // Honest work within the fuel succeeds however slow the wall clock is: a machine so loaded
    // that the call takes longer than a tight deadline would allow still gets its decision.
    let rt = runtime();
    let work = async |iterations: u64| {
        let cfg = format!(r#"{{"mode": "work", "iterations": {iterations}, "adapter": "acme/a"}}"#);
        decide(&rt, "hostile", &cfg, &req("acme", "x")).await
    };
    assert_eq!(routed(work(100_000).await).as_deref(), Some("acme/a"));
    // The same work past the fuel fails, and says so.
    assert_eq!(work(100_000_000).await.map(|_| ()), Err(PolicyFault::Fuel(wasm_fuel())));
    // With fuel to spare and a wall clock too short for it, the guard still stops the loop.
    let tight =
        PolicyRuntime::new(WasmLimits { fuel: u64::MAX, deadline: Duration::from_millis(20), ..Default::default() })
            .unwrap();
    let bytes = component("hostile");
    let policy = tight.compile(&bytes).unwrap();
    let loop_cfg: Arc<str> = Arc::from(r#"{"mode": "loop"}"#);
    assert_eq!(
        tight.decide(&policy, &request(&input(&req("evil", "x"))), HostView::default(), loop_cfg, Arc::from("t")).await,
        Err(PolicyFault::Deadline(20))
    );
}

#[tokio::test]
async fn hostile_components_fail_their_own_call_and_nothing_else() {
    let rt = runtime();
    let started = Instant::now();
    assert_eq!(hostile(&rt, "loop").await, Err(PolicyFault::Fuel(wasm_fuel())));
    assert!(started.elapsed() < Duration::from_secs(2), "the fuel did not stop the loop in time");
    assert_eq!(hostile(&rt, "memory").await, Err(PolicyFault::Memory(32)));
    assert_eq!(hostile(&rt, "recurse").await, Err(PolicyFault::StackOverflow));
    assert!(matches!(hostile(&rt, "trap").await, Err(PolicyFault::Trap(_))), "{:?}", hostile(&rt, "trap").await);
    assert!(matches!(hostile(&rt, "huge").await, Err(PolicyFault::InvalidDecision(_))));
    assert_eq!(hostile(&rt, "error").await, Err(PolicyFault::Failed("the policy could not decide".into())));
    // After all that, the same runtime still serves a well-behaved policy.
    let cfg = r#"{"tenants": {"acme": "acme/support"}}"#;
    assert_eq!(routed(decide(&rt, "tenant-map", cfg, &req("acme", "x")).await).as_deref(), Some("acme/support"));
}

#[test]
fn components_that_are_not_policies_are_refused_with_the_reason() {
    let rt = runtime();
    let core = wat::parse_str("(module)").unwrap();
    assert!(matches!(rt.compile(&core), Err(LoadError::NotAComponent(m)) if m.contains("core WebAssembly module")));
    assert!(matches!(rt.compile(b"definitely not wasm"), Err(LoadError::NotAComponent(_))));
    // A component importing what the world does not offer.
    let sneaky = wat::parse_str(
        r#"(component
             (import "evil:net/socket@1.0.0" (instance (export "connect" (func (param "host" string)))))
           )"#,
    )
    .unwrap();
    let err = rt.compile(&sneaky).unwrap_err();
    assert!(matches!(&err, LoadError::WrongWorld(m) if m.contains("evil:net/socket")), "{err}");
    // A component that offers no `decide`.
    let empty = wat::parse_str("(component)").unwrap();
    assert!(matches!(rt.compile(&empty), Err(LoadError::WrongWorld(_))));
    let limited = PolicyRuntime::new(WasmLimits { max_component_bytes: 1000, ..Default::default() }).unwrap();
    assert!(matches!(limited.compile(&component("tenant-map")), Err(LoadError::TooLarge { .. })));
}

async fn open_store(dir: &std::path::Path, rt: Arc<PolicyRuntime>) -> Arc<PolicyStore> {
    let loras = crate::loras::LoraStore::open_dir(dir).await.unwrap();
    PolicyStore::open(loras.replica().clone(), rt, Default::default()).await.unwrap()
}

#[tokio::test]
async fn deployments_activate_atomically_roll_back_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let store = open_store(dir.path(), rt.clone()).await;
    let map = store.upload("tenant-map", component("tenant-map"), "ops").await.unwrap();
    let canary = store.upload("canary", component("canary"), "ops").await.unwrap();
    assert_eq!(
        store.upload("tenant-map", component("tenant-map"), "ops").await.unwrap(),
        map,
        "same bytes, same version"
    );
    // A version that faults in its dry run is refused before anyone can activate it.
    assert!(store.upload("hostile", component("hostile"), "ops").await.is_ok(), "an error value is not a fault");
    let hostile_id = store.list().0.into_iter().find(|v| v.name == "hostile").unwrap().id;
    assert!(store.activate("acme", &hostile_id, serde_json::json!({"mode": "loop"})).await.is_err());
    assert!(store.activate("acme", &canary.id, serde_json::json!({})).await.is_err(), "canary needs its config");
    assert!(store.active_for("acme").is_none(), "a refused activation changes nothing");

    store.activate(DEFAULT_SCOPE, &map.id, serde_json::json!({"default": "shared/general"})).await.unwrap();
    store.activate("acme", &map.id, serde_json::json!({"tenants": {"acme": "acme/v1"}})).await.unwrap();
    store
        .activate("acme", &canary.id, serde_json::json!({"stable": "acme/v1", "canary": "acme/v2", "percent": 100}))
        .await
        .unwrap();
    let engine = WasmPolicies::new(store.clone(), Arc::new(StaticPolicy::new(Arc::new(Default::default()))));
    let route = |adapter: &str| Decision::Route(Route { adapter: Some(adapter.into()), backend: None, priority: 0 });
    let acme = req("acme", "x");
    assert_eq!(engine.decide(&input(&acme)).await.unwrap(), route("acme/v2"));
    assert_eq!(engine.decide(&input(&req("beta", "x"))).await.unwrap(), route("shared/general"), "the default");

    store.rollback("acme").await.unwrap();
    assert_eq!(engine.decide(&input(&acme)).await.unwrap(), route("acme/v1"));
    store.rollback("acme").await.unwrap_err();

    // A new gateway process over the same state dir serves the same policies.
    drop(engine);
    drop(store);
    let again = open_store(dir.path(), rt).await;
    let engine = WasmPolicies::new(again, Arc::new(StaticPolicy::new(Arc::new(Default::default()))));
    assert_eq!(engine.decide(&input(&acme)).await.unwrap(), route("acme/v1"));
}

#[tokio::test]
async fn the_policies_of_an_earlier_version_are_imported_with_their_activations() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("policies");
    std::fs::create_dir_all(&legacy).unwrap();
    let bytes = component("tenant-map");
    let sha: String = <sha2::Sha256 as sha2::Digest>::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(legacy.join("0123456789abcdef.wasm"), &bytes).unwrap();
    let registry = serde_json::json!({"version": 1,
        "versions": {"0123456789abcdef": {"id": "0123456789abcdef", "name": "tenant-map", "sha256": sha,
            "size": bytes.len(), "uploaded_at": 1, "uploaded_by": "ops"}},
        "active": {"acme": [{"id": "0123456789abcdef", "config": {"tenants": {"acme": "acme/v1"}}, "activated_at": 2}]}});
    std::fs::write(legacy.join("policies.json"), registry.to_string()).unwrap();
    let store = open_store(dir.path(), runtime()).await;
    assert_eq!(store.import_legacy(&legacy).await.unwrap(), 1);
    assert_eq!(store.import_legacy(&legacy).await.unwrap(), 0, "imported twice");
    let engine = WasmPolicies::new(store.clone(), Arc::new(StaticPolicy::new(Arc::new(Default::default()))));
    let route = Decision::Route(Route { adapter: Some("acme/v1".into()), backend: None, priority: 0 });
    assert_eq!(engine.decide(&input(&req("acme", "x"))).await.unwrap(), route);
    // The tenant's usage came with it: its quota counts the imported version.
    assert!(store.check_quota("ops", 0).is_ok());
    assert_eq!(store.list().0.len(), 1);
}
