//! Grammar-constrained decoding on a real model (SmolLM2-135M-Instruct with its demo adapters):
//! constrained text is what the grammar allows, and a grammar changes its own request only. A
//! batch mixing adapters, schemas and unconstrained rows gives every request the tokens it gets
//! run alone.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use std::sync::Arc;
use switchyard_backend::adapters::load_peft_dir;
use switchyard_backend::engine::cpu::CpuExecutor;
use switchyard_backend::engine::grammar::GrammarSpec;
use switchyard_backend::engine::scheduler::SchedulerConfig;
use switchyard_backend::engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest};
use switchyard_backend::model::{ChatMessage, Model};

const MAX_TOKENS: usize = 40;

struct Case {
    adapter: Option<&'static str>,
    prompt: &'static str,
    grammar: Option<GrammarSpec>,
}

fn cases() -> Vec<Case> {
    let person = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": false,
    });
    let place = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "continent": {"enum": ["Africa", "America", "Asia", "Europe", "Oceania"]},
        },
        "required": ["city", "continent"],
        "additionalProperties": false,
    });
    let schema = |v: &serde_json::Value| Some(GrammarSpec::JsonSchema(v.to_string()));
    vec![
        Case { adapter: None, prompt: "Ana is 31 years old. Describe her as JSON.", grammar: schema(&person) },
        Case { adapter: Some("json"), prompt: "Where is Lisbon?", grammar: schema(&place) },
        Case { adapter: Some("uppercase"), prompt: "Say hello to the team.", grammar: None },
        Case { adapter: Some("french"), prompt: "Describe a cat.", grammar: Some(GrammarSpec::JsonObject) },
        Case { adapter: None, prompt: "Name three colours.", grammar: None },
        Case { adapter: Some("json"), prompt: "Is water wet? Answer yes or no.", grammar: regex("(yes|no)") },
        Case { adapter: Some("uppercase"), prompt: "Tom is 8.", grammar: schema(&person) },
    ]
}

fn regex(rx: &str) -> Option<GrammarSpec> {
    Some(GrammarSpec::Regex(rx.into()))
}

async fn run(engine: &Engine, prompt: Vec<u32>, case: &Case) -> (Vec<u32>, String, FinishReason) {
    let req = GenerateRequest {
        prompt,
        adapter: case.adapter.map(str::to_string),
        grammar: case.grammar.clone(),
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let mut events = engine.generate(req).await.expect("accepted");
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Finished { id, text: t, reason, .. } => {
                ids.extend(id);
                text.push_str(&t);
                return (ids, text, reason);
            }
            Event::Failed { reason, .. } => panic!("{}: {reason}", case.prompt),
            Event::Prompt { .. } => panic!("prompt log-probabilities were not asked for"),
        }
    }
    panic!("{}: the stream ended without an answer", case.prompt)
}

#[test]
fn a_batch_mixing_adapters_schemas_and_free_rows_gives_each_request_its_tokens_alone() {
    let Some(model) = common::smollm2("structured") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let Model { config, weights, tokenizer, .. } = model;
        let cfg = EngineConfig {
            scheduler: SchedulerConfig::new(16, 128, 512, 16),
            max_model_len: 512,
            max_waiting: 16,
            max_waiting_per_tenant: 16,
            max_loras: 3,
            max_lora_rank: 64,
        };
        let executor = CpuExecutor::new(&config, weights, 128, 16, 3, 64);
        let tokenizer = Arc::new(tokenizer);
        let engine = Arc::new(Engine::start(&config, tokenizer.clone(), Box::new(executor), cfg));
        for name in ["json", "uppercase", "french"] {
            let weights = load_peft_dir(&common::adapter_dir("smollm2", name), &config, 64).expect("adapter loads");
            engine.install_adapter(name.into(), format!("file:///{name}"), weights).await.expect("installs");
        }
        let cases = Arc::new(cases());
        let prompts: Vec<Vec<u32>> = cases
            .iter()
            .map(|c| {
                let message = ChatMessage { role: "user".into(), content: c.prompt.into(), ..Default::default() };
                tokenizer.encode_chat(&[message], true).expect("encodes")
            })
            .collect();

        let mut alone = Vec::new();
        for (case, prompt) in cases.iter().zip(&prompts) {
            alone.push(run(&engine, prompt.clone(), case).await);
        }
        let together: Vec<_> = futures::future::join_all((0..cases.len()).map(|i| {
            let (engine, cases, prompt) = (engine.clone(), cases.clone(), prompts[i].clone());
            tokio::spawn(async move { run(&engine, prompt, &cases[i]).await })
        }))
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();

        for ((case, alone), together) in cases.iter().zip(&alone).zip(&together) {
            assert_eq!(alone, together, "{:?} ({:?})", case.prompt, case.adapter);
            let (_, text, reason) = alone;
            match &case.grammar {
                Some(GrammarSpec::JsonSchema(_) | GrammarSpec::JsonObject) if *reason != FinishReason::Length => {
                    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                    assert!(v.is_object(), "{text}");
                }
                Some(GrammarSpec::Regex(_)) => assert!(["yes", "no"].contains(&text.as_str()), "{text:?}"),
                _ => {}
            }
        }
        // The constrained requests mostly complete their JSON within the budget: a schema run
        // that never closes would hide a grammar that does not end.
        let complete = alone.iter().zip(cases.iter()).filter(|(a, c)| c.grammar.is_some() && a.2 == FinishReason::Stop);
        assert!(complete.count() >= 3, "{alone:?}");
    });
}
