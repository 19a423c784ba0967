//! Shared fixtures of the backend's integration tests: the committed tiny models, their PEFT
//! adapters and the outputs transformers + PEFT computed for them (`scripts/golden/`).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture
#![allow(dead_code)]

use safetensors::SafeTensors;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::PathBuf;
use switchyard_backend::adapters::{AdapterWeights, load_peft_dir};
use switchyard_backend::engine::blocks::BlockHash;
use switchyard_backend::engine::executor::Executor;
use switchyard_backend::engine::sampling::argmax;
use switchyard_backend::engine::scheduler::{Scheduler, SchedulerConfig, Sequence};
use switchyard_backend::model::{Model, ModelConfig, ModelWeights};

/// The committed fixtures; `SWITCHYARD_FIXTURES` overrides the location (for test binaries run
/// on another machine, such as the device check).
pub fn fixtures() -> PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures"))
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn adapter_dir(model: &str, name: &str) -> PathBuf {
    fixtures().join("adapters").join(model).join(name)
}

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub key: String,
    pub model: String,
    pub adapter: Option<String>,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// How far the reference's own logits move when it runs in bf16 (see the generator).
    pub bf16_drift: f64,
}

#[derive(Debug, Deserialize)]
pub struct ChatCase {
    pub messages: Vec<serde_json::Value>,
    pub add_generation_prompt: bool,
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub steps: usize,
    pub cases: Vec<Case>,
    pub chat: HashMap<String, ChatCase>,
    #[serde(skip)]
    pub logits: HashMap<String, Vec<f32>>,
    /// Per case, the reference's logits at every prompt position (`[prompt tokens, vocab]`).
    #[serde(skip)]
    pub prompt_logits: HashMap<String, Vec<f32>>,
}

pub fn golden() -> Golden {
    let dir = fixtures().join("golden");
    let text = std::fs::read_to_string(dir.join("cases.json")).expect("fixtures/golden/cases.json");
    let mut g: Golden = serde_json::from_str(&text).expect("cases.json parses");
    for (file, into) in [("logits.safetensors", &mut g.logits), ("prompt_logits.safetensors", &mut g.prompt_logits)] {
        let bytes = std::fs::read(dir.join(file)).expect("the golden logits");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        for (name, view) in st.tensors() {
            let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            into.insert(name, data);
        }
    }
    g
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by `scripts/fetch-smollm2`), looked up at
/// `SWITCHYARD_SMOLLM2_GGUF`, else in the user cache where the fetch script puts it. Without it
/// `test` is skipped with a message; `SWITCHYARD_REQUIRE_SMOLLM2=1` (set by CI, which fetches
/// the model) turns the skip into a failure.
pub fn smollm2(test: &str) -> Option<Model> {
    let path = std::env::var_os("SWITCHYARD_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(switchyard_backend::paths::default_model)
        .filter(|p| p.exists());
    let Some(path) = path else {
        assert!(
            std::env::var_os("SWITCHYARD_REQUIRE_SMOLLM2").is_none(),
            "SWITCHYARD_REQUIRE_SMOLLM2 is set but the GGUF is missing"
        );
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{test}: skipped, run scripts/fetch-smollm2 first");
        return None;
    };
    Some(Model::open(&path).expect("SmolLM2 GGUF loads"))
}

pub fn load_model(name: &str) -> Model {
    Model::load(&model_dir(name)).expect("fixture model loads")
}

pub fn load_adapter(model: &Model, name: &str) -> AdapterWeights {
    load_peft_dir(&adapter_dir(&model_dirname(model), name), &model.config, 64).expect("fixture adapter loads")
}

fn model_dirname(model: &Model) -> String {
    model.name.clone()
}

/// Largest |got - want| over a row, relative to the row's largest |want|.
pub fn row_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().map(|v| v.abs() as f64).fold(1e-6, f64::max);
    got.iter().zip(want).map(|(g, w)| (*g as f64 - *w as f64).abs()).fold(0.0, f64::max) / scale
}

/// f32 tolerance of the golden tests: the reference runs the same f32 math in another order.
pub const F32_TOLERANCE: f64 = 1e-4;

/// Adapter slot rank of the golden harness.
pub const MAX_RANK: usize = 64;

/// Builds an executor: (config, weights, KV blocks, block size, adapter slots).
pub type MakeExecutor = dyn Fn(&ModelConfig, ModelWeights, usize, usize, usize) -> Box<dyn Executor>;

struct Harness {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    /// Each adapter's slot and the root of its blocks' names (its weights' digest).
    slots: HashMap<Option<String>, (Option<u32>, BlockHash)>,
    next_id: u64,
}

/// An executor with every adapter of `model` in a slot, and a scheduler over its cache.
fn harness(model_name: &str, adapters: &[&str], sched_cfg: SchedulerConfig, make: &MakeExecutor) -> Harness {
    let Model { config, weights, .. } = load_model(model_name);
    let reload = load_model(model_name);
    let mut executor = make(&config, weights, sched_cfg.num_blocks, sched_cfg.block_size, adapters.len().max(1));
    let mut slots = HashMap::from([(None, (None, BlockHash::root(None, "")))]);
    for (slot, name) in adapters.iter().enumerate() {
        let w = load_adapter(&reload, name);
        let root = BlockHash::root(Some(&w.digest()), "");
        executor.load_adapter(slot as u32, w).expect("slot exists");
        slots.insert(Some(name.to_string()), (Some(slot as u32), root));
    }
    Harness { executor, scheduler: Scheduler::new(sched_cfg), slots, next_id: 0 }
}

/// What a run of cases saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Report {
    /// The largest relative logit error (see [`row_rel_err`]).
    pub worst: f64,
    /// Prompt tokens found in the prefix cache, over all cases.
    pub cached_tokens: usize,
    /// Sequences preempted for lack of KV blocks.
    pub preempted: usize,
    /// Tokens computed (prompts, recomputed ones after a preemption, and generated ones).
    pub computed: usize,
}

/// Runs groups of cases through the scheduler and executor with teacher forcing (the
/// reference's greedy token is appended each step) and checks every step's logits against the
/// reference: within `tolerance` (see [`row_rel_err`]), and with `exact_greedy` their argmax
/// must be the reference's token. Group `(n, cases)` joins the batch after `n` steps.
fn run_groups(h: &mut Harness, groups: &[(usize, Vec<&Case>)], tolerance: f64, exact_greedy: bool) -> Report {
    let g = golden();
    let mut report = Report::default();
    let mut cases: HashMap<u64, &Case> = HashMap::new();
    let mut produced: HashMap<u64, usize> = HashMap::new();
    let mut step_no = 0;
    let last_join = groups.iter().map(|(n, _)| *n).max().unwrap_or(0);
    while !h.scheduler.is_idle() || step_no <= last_join {
        for (_, group) in groups.iter().filter(|(n, _)| *n == step_no) {
            for &c in group {
                let (slot, root) = h.slots[&c.adapter];
                let id = h.next_id;
                h.next_id += 1;
                h.scheduler.add(Sequence::new(id, c.prompt_ids.clone(), slot).cached_under(root));
                cases.insert(id, c);
            }
        }
        step_no += 1;
        let step = h.scheduler.schedule();
        report.preempted += step.preempted.len();
        report.computed += step.batch.tokens.len();
        if step.batch.tokens.is_empty() {
            continue;
        }
        let logits = h.executor.forward(&step.batch).expect("forward");
        h.scheduler.complete(&step);
        let vocab = logits.len() / step.logits_for.len().max(1);
        for (row, &id) in step.logits_for.iter().enumerate() {
            let case = cases[&id];
            let k = produced.entry(id).or_default();
            let want = &g.logits[&case.key][*k * vocab..(*k + 1) * vocab];
            let got = &logits[row * vocab..(row + 1) * vocab];
            let err = row_rel_err(got, want);
            assert!(err < tolerance, "{} step {k}: relative error {err:.2e}", case.key);
            if exact_greedy {
                assert_eq!(argmax(got), case.greedy_ids[*k], "{} step {k}: greedy token differs", case.key);
            }
            report.worst = report.worst.max(err);
            let next = case.greedy_ids[*k];
            *k += 1;
            if *k == g.steps {
                report.cached_tokens += h.scheduler.get(id).map_or(0, |s| s.cached_tokens);
                h.scheduler.remove(id);
            } else {
                h.scheduler.push_token(id, next);
            }
        }
    }
    assert_eq!(produced.len(), cases.len(), "every case ran");
    assert!(produced.values().all(|&n| n == g.steps));
    report
}

/// The adapters `cases` use.
fn adapters_of<'a>(cases: impl Iterator<Item = &'a &'a Case>) -> Vec<&'a str> {
    let mut adapters: Vec<&str> = cases.filter_map(|c| c.adapter.as_deref()).collect();
    adapters.sort();
    adapters.dedup();
    adapters
}

/// Runs `cases` together (see [`run_groups`]); those in `late` join after `join_after` steps.
/// Returns the largest error seen.
#[allow(clippy::too_many_arguments)]
pub fn check_batch(
    model_name: &str,
    cases: &[&Case],
    late: &[&Case],
    join_after: usize,
    max_batch_tokens: usize,
    make: &MakeExecutor,
    tolerance: f64,
    exact_greedy: bool,
) -> f64 {
    let cfg = SchedulerConfig::new(4, 512, max_batch_tokens, 64);
    let mut h = harness(model_name, &adapters_of(cases.iter().chain(late)), cfg, make);
    let groups = [(0, cases.to_vec()), (join_after, late.to_vec())];
    run_groups(&mut h, &groups, tolerance, exact_greedy).worst
}

/// Runs `cases` together twice on one KV cache of `blocks` blocks of 4 tokens, with prefix
/// caching on or off: the second time, in reverse order, with caching, their prompts come from
/// what the first time left in the cache (the most recent first, in a small cache). Every step of both is checked against the reference (see
/// [`run_groups`]). Returns what each run saw.
pub fn check_twice(
    model_name: &str,
    cases: &[&Case],
    blocks: usize,
    caching: bool,
    make: &MakeExecutor,
    tolerance: f64,
    exact_greedy: bool,
) -> [Report; 2] {
    let cfg = SchedulerConfig { prefix_caching: caching, ..SchedulerConfig::new(4, blocks, 48, 64) };
    let mut h = harness(model_name, &adapters_of(cases.iter()), cfg, make);
    let first = run_groups(&mut h, &[(0, cases.to_vec())], tolerance, exact_greedy);
    let reversed = cases.iter().rev().copied().collect();
    [first, run_groups(&mut h, &[(0, reversed)], tolerance, exact_greedy)]
}

/// `prompt` alone through `exec`, then greedy decode: every step's logits and the token chosen
/// after it, for `steps` steps in all.
pub fn greedy_run(exec: &mut dyn Executor, prompt: Vec<u32>, steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut sched = Scheduler::new(SchedulerConfig::new(16, 16, 256, 4));
    sched.add(Sequence::new(1, prompt, None));
    let (mut logits, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let step = sched.schedule();
        let out = exec.forward(&step.batch).expect("forward");
        sched.complete(&step);
        let next = argmax(&out);
        logits.push(out);
        tokens.push(next);
        sched.push_token(1, next);
    }
    (logits, tokens)
}

/// Asserts two [`greedy_run`]s agree: every logit within `tolerance` of max(1, |want|), and the
/// same tokens.
pub fn assert_same_run(got: &(Vec<Vec<f32>>, Vec<u32>), want: &(Vec<Vec<f32>>, Vec<u32>), tolerance: f32) {
    for (step, (g, w)) in got.0.iter().zip(&want.0).enumerate() {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tolerance * b.abs().max(1.0), "step {step} logit {i}: {a} vs {b}");
        }
    }
    assert_eq!(got.1, want.1, "greedy tokens");
}
