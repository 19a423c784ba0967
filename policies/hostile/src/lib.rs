//! A policy that misbehaves as its configuration's `mode` says, so the gateway's tests can
//! show that each kind of misbehaviour is contained:
//! `loop` (never returns), `memory` (grows memory until stopped), `recurse` (overflows the
//! stack), `trap` (panics, which aborts: a trap), `huge` (returns a 4 MiB adapter name),
//! `error` (returns an error value), `ghost` (routes to an adapter that does not exist),
//! `base` (routes to the base model, whatever the tenant may use), `elsewhere` (routes to the
//! backend its configuration names), `echo` (refuses every request, its message listing every
//! adapter name the policy was shown, so a test can see what a policy learns), and `work` (a
//! benign policy that does `iterations` rounds of arithmetic, then routes to `adapter`: honest
//! work that must not fail because of someone else's load), and `remember` (keeps every caller's
//! subject in a global and refuses each request listing the subjects of the requests before
//! it, as a policy leaking one caller's data to the next would), and `prefix` (calls
//! `cached-prefix` for its configuration's `adapter`, `calls` times (default 1), and refuses
//! the request with what the last call returned as JSON: `{"prompt_tokens": n, "cached":
//! {address: tokens}}` or `{"error": message}`, so a test can see what a policy learns of the
//! backends' caches).
//! With `"only_live": true` it behaves during the gateway's dry run (tenant `dry-run`) and
//! misbehaves only on real requests, as a sneaky policy would.

use switchyard_policy::serde_json::Value;
use switchyard_policy::{Decision, Policy, Request, Route, config, reject, route};

struct Hostile;

// Recursion without end is the point: it must overflow the stack. Only scalars, so the frames
// live on the WebAssembly stack (which the host bounds), not in linear memory.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))).wrapping_mul(depth | 1)
}

impl Policy for Hostile {
    fn decide(req: Request) -> Result<Decision, String> {
        let cfg: Value = config()?;
        if cfg["only_live"] == Value::Bool(true) && req.tenant == "dry-run" {
            return Ok(route(None));
        }
        match cfg["mode"].as_str().unwrap_or("") {
            "loop" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "memory" => {
                // Reserved, not written: memory grows a MiB at a time for almost no fuel, so the
                // memory cap is what stops it.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(Vec::with_capacity(1 << 20)));
                }
            }
            "recurse" => Err(format!("{}", recurse(0))),
            "trap" => panic!("a policy bug"),
            "huge" => Ok(route(Some(&"x".repeat(4 << 20)))),
            "error" => Err("the policy could not decide".into()),
            "ghost" => Ok(route(Some("nobody/ghost-adapter"))),
            "base" => Ok(route(None)),
            "elsewhere" => Ok(Decision::Route(Route {
                adapter: cfg["adapter"].as_str().map(str::to_string),
                backend: cfg["backend"].as_str().map(str::to_string),
                priority: 0,
            })),
            "echo" => {
                let mut seen: Vec<String> =
                    req.adapters.iter().map(|a| format!("{} (owner {})", a.name, a.owner)).collect();
                for b in &req.backends {
                    seen.extend(b.adapters.iter().map(|a| format!("{} on {}", a.name, b.address)));
                }
                Ok(reject(403, "echo", format!("seen: [{}]", seen.join(", "))))
            }
            "prefix" => {
                let adapter = cfg["adapter"].as_str();
                let mut last = Err("not called".to_string());
                for _ in 0..cfg["calls"].as_u64().unwrap_or(1) {
                    last = switchyard_policy::cached_prefix(adapter);
                }
                let seen = match last {
                    Ok(o) => {
                        let cached: switchyard_policy::serde_json::Map<String, Value> =
                            o.backends.into_iter().map(|b| (b.address, Value::from(b.cached_tokens))).collect();
                        switchyard_policy::serde_json::json!({"prompt_tokens": o.prompt_tokens, "cached": cached})
                    }
                    Err(e) => switchyard_policy::serde_json::json!({"error": e}),
                };
                Ok(reject(409, "prefix", seen.to_string()))
            }
            "work" => {
                let mut x: u64 = 1;
                for _ in 0..cfg["iterations"].as_u64().unwrap_or(0) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                std::hint::black_box(x);
                Ok(route(cfg["adapter"].as_str()))
            }
            "remember" => {
                static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
                let mut seen = SEEN.lock().map_err(|e| e.to_string())?;
                let earlier = seen.join(", ");
                seen.push(req.subject.clone().unwrap_or_default());
                Ok(reject(403, "remember", format!("earlier: [{earlier}]")))
            }
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

switchyard_policy::export_policy!(Hostile);
