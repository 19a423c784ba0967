//! A policy that misbehaves as its configuration's `mode` says, so the gateway's tests can
//! show that each kind of misbehaviour is contained:
//! `loop` (never returns), `memory` (grows memory until stopped), `recurse` (overflows the
//! stack), `trap` (panics, which aborts: a trap), `huge` (returns a 4 MiB adapter name),
//! `error` (returns an error value), `ghost` (routes to an adapter that does not exist).
//! With `"only_live": true` it behaves during the gateway's dry run (tenant `dry-run`) and
//! misbehaves only on real requests, as a sneaky policy would.

use switchyard_policy::serde_json::Value;
use switchyard_policy::{Decision, Policy, Request, config, route};

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
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
            }
            "recurse" => Err(format!("{}", recurse(0))),
            "trap" => panic!("a policy bug"),
            "huge" => Ok(route(Some(&"x".repeat(4 << 20)))),
            "error" => Err("the policy could not decide".into()),
            "ghost" => Ok(route(Some("nobody/ghost-adapter"))),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

switchyard_policy::export_policy!(Hostile);
