//! The `switchyard backend` binary, started as a user starts it, serving the tiny fixture model
//! to a real gRPC client.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod support;

use support::*;
use switchyard_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn streams_generations_with_and_without_an_adapter_and_reports_health() {
    serves_like_the_reference(&[], "cpu").await;
}

/// The CUDA executor on the CPU emulation of a CUDA device, in f32 so that greedy tokens must
/// match PEFT's exactly: the executor's adapter slot tables, hot swaps and unloads are checked
/// through the real binary without a GPU.
#[tokio::test]
async fn emulated_cuda_streams_generations_with_and_without_an_adapter_exactly_as_the_reference() {
    serves_like_the_reference(&["--device", "emulated-cuda", "--dtype", "f32"], "emulated-cuda").await;
}

#[tokio::test]
async fn cuda_streams_generations_with_and_without_an_adapter_exactly_as_the_reference() {
    if let Err(why) = switchyard_backend::service::probe_cuda(0) {
        assert!(std::env::var_os("SWITCHYARD_REQUIRE_CUDA").is_none(), "SWITCHYARD_REQUIRE_CUDA is set but {why}");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "backend_grpc: skipped the CUDA run, no usable CUDA device ({why})");
        return;
    }
    serves_like_the_reference(&["--device", "cuda", "--dtype", "f32"], "cuda:0").await;
}

/// Health, info, the reference's greedy tokens with and without adapters, idempotent loads, hot
/// swaps and unloads, on the backend started with `device` flags.
async fn serves_like_the_reference(device: &[&str], device_prefix: &str) {
    let mut flags = vec!["--max-loras", "2", "--max-lora-rank", "16"];
    flags.extend_from_slice(device);
    let backend = start_backend(&flags);
    let (mut client, mut health) = connect(&backend).await;

    for service in ["", "switchyard.backend.v1.Backend"] {
        let status =
            health.check(HealthCheckRequest { service: service.into() }).await.expect("health answers").into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "service {service:?}");
    }
    let info = client.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.model.as_str(), info.architecture.as_str()), ("tiny-llama", "LlamaForCausalLM"));
    assert_eq!((info.max_loras, info.max_lora_rank, info.loaded_loras, info.max_model_len), (2, 16, 0, 128));
    assert!(info.device.starts_with(device_prefix) && info.dtype == "f32", "{} {}", info.device, info.dtype);

    // Base model: the reference's greedy tokens, streamed one message per token.
    let base = case("tiny-llama.base.1");
    let (ids, text, messages, last) = collect(&mut client, greedy(&base.prompt_ids, "", 8)).await.expect("generates");
    assert_eq!(ids, base.greedy_ids);
    assert_eq!(messages, 8, "one message per generated token");
    assert_eq!(last.finish_reason(), pb::FinishReason::Length);
    assert_eq!(
        last.usage,
        Some(pb::Usage { prompt_tokens: base.prompt_ids.len() as u32, completion_tokens: 8, cached_tokens: 0 })
    );
    assert!(!text.is_empty());

    // The same prompt as text is tokenized by the server to the same ids.
    let mut by_text = greedy(&[], "", 8);
    by_text.input = Some(pb::generate_request::Input::Prompt(base.prompt.clone()));
    let (ids_from_text, text_from_text, _, _) = collect(&mut client, by_text).await.expect("generates");
    assert_eq!((ids_from_text, text_from_text), (base.greedy_ids.clone(), text));

    // Load an adapter; loading it again from the same source changes nothing.
    let loaded = client.load_adapter(load_req("support-v1", "r8-qv")).await.expect("loads").into_inner();
    let info_a = loaded.adapter.expect("adapter info");
    assert_eq!((info_a.rank, loaded.already_loaded), (8, false));
    assert_eq!(info_a.target_modules, vec!["q_proj", "v_proj"]);
    let again = client.load_adapter(load_req("support-v1", "r8-qv")).await.expect("idempotent").into_inner();
    assert!(again.already_loaded);
    // The same name from another source is a hot swap: new requests get the new weights.
    let swapped = client.load_adapter(load_req("support-v1", "r2-k-down")).await.expect("swaps").into_inner();
    assert!(swapped.hot_swap && !swapped.already_loaded, "{swapped:?}");
    let other = case("tiny-llama.r2-k-down.1");
    let (ids, _, _, _) = collect(&mut client, greedy(&other.prompt_ids, "support-v1", 8)).await.expect("generates");
    assert_eq!(ids, other.greedy_ids);
    let back = client.load_adapter(load_req("support-v1", "r8-qv")).await.expect("swaps back").into_inner();
    assert!(back.hot_swap);

    let with = case("tiny-llama.r8-qv.1");
    let (ids, _, _, _) = collect(&mut client, greedy(&with.prompt_ids, "support-v1", 8)).await.expect("generates");
    assert_eq!(ids, with.greedy_ids, "the adapter changes the output exactly as PEFT does");
    assert_ne!(ids, base.greedy_ids);

    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner();
    assert_eq!(listed.adapters.len(), 1);
    assert_eq!((listed.adapters[0].name.as_str(), listed.adapters[0].active_requests), ("support-v1", 0));

    client.unload_adapter(pb::UnloadAdapterRequest { name: "support-v1".into(), fence: 0 }).await.expect("unloads");
    let gone = collect(&mut client, greedy(&with.prompt_ids, "support-v1", 8)).await.expect_err("not resident");
    assert_eq!(gone.code(), Code::NotFound);
    assert!(gone.message().contains("support-v1"), "{}", gone.message());
}

#[tokio::test]
async fn bad_requests_get_precise_codes_and_the_server_keeps_serving() {
    let backend = start_backend(&["--max-loras", "2", "--max-lora-rank", "16"]);
    let (mut client, _) = connect(&backend).await;
    let base = case("tiny-llama.base.0");

    let expect_code = |r: Result<_, tonic::Status>, code: Code, needle: &str| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(needle), "message {:?} should mention {needle:?}", e.message());
    };
    expect_code(
        collect(&mut client, greedy(&base.prompt_ids, "nobody", 4)).await.map(|_| ()),
        Code::NotFound,
        "nobody",
    );
    expect_code(collect(&mut client, greedy(&[5; 200], "", 4)).await.map(|_| ()), Code::InvalidArgument, "200 tokens");
    expect_code(
        collect(&mut client, greedy(&base.prompt_ids, "", 500)).await.map(|_| ()),
        Code::InvalidArgument,
        "maximum context length is 128",
    );
    expect_code(collect(&mut client, greedy(&[1, 99_999], "", 4)).await.map(|_| ()), Code::InvalidArgument, "99999");
    let mut hot = greedy(&base.prompt_ids, "", 4);
    hot.sampling = Some(pb::SamplingParams { temperature: -1.0, ..Default::default() });
    expect_code(collect(&mut client, hot).await.map(|_| ()), Code::InvalidArgument, "temperature");
    let mut empty = greedy(&[], "", 4);
    empty.input = None;
    expect_code(collect(&mut client, empty).await.map(|_| ()), Code::InvalidArgument, "prompt");

    expect_code(
        client.load_adapter(load_req("big", "r32-mlp-regex")).await.map(|_| ()),
        Code::InvalidArgument,
        "--max-lora-rank 16",
    );
    let gone = format!("file://{}", fixtures().join("definitely/not/here").display());
    expect_code(client.load_adapter(load_uri("x", &gone)).await.map(|_| ()), Code::NotFound, "/definitely/not/here");
    expect_code(
        client.load_adapter(load_uri("x", "gs://bucket/adapter")).await.map(|_| ()),
        Code::InvalidArgument,
        "unknown scheme \"gs\"",
    );
    expect_code(
        client.load_adapter(load_uri("x", "file:///etc")).await.map(|_| ()),
        Code::PermissionDenied,
        "outside the allowed roots",
    );
    expect_code(client.load_adapter(load_req("", "r8-qv")).await.map(|_| ()), Code::InvalidArgument, "name");
    expect_code(
        client.unload_adapter(pb::UnloadAdapterRequest { name: "ghost".into(), fence: 0 }).await.map(|_| ()),
        Code::NotFound,
        "ghost",
    );

    // Nothing half-loaded is left behind: the failed loads are listed as failed, with why.
    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner();
    let states: Vec<(&str, i32, bool)> =
        listed.adapters.iter().map(|a| (a.name.as_str(), a.state, a.error.is_empty())).collect();
    let failed = pb::AdapterState::Failed as i32;
    assert_eq!(states, vec![("big", failed, false), ("x", failed, false)], "{listed:?}");
    let (ids, _, _, _) = collect(&mut client, greedy(&base.prompt_ids, "", 8)).await.expect("still serves");
    assert_eq!(ids, base.greedy_ids);
}

#[tokio::test]
async fn idle_adapters_are_evicted_least_recently_used_first() {
    let backend = start_backend(&["--max-loras", "2"]);
    let (mut client, _) = connect(&backend).await;
    client.load_adapter(load_req("a", "r8-qv")).await.expect("a");
    client.load_adapter(load_req("b", "r2-k-down")).await.expect("b");
    // Use "a" so "b" becomes the least recently used.
    let c = case("tiny-llama.r8-qv.0");
    let (ids, _, _, _) = collect(&mut client, greedy(&c.prompt_ids, "a", 8)).await.expect("generates");
    assert_eq!(ids, c.greedy_ids);
    let loaded = client.load_adapter(load_req("c", "r4-patterns")).await.expect("c evicts b").into_inner();
    assert!(loaded.adapter.is_some());
    let states = |list: pb::ListAdaptersResponse| {
        let mut s: Vec<(String, i32)> = list.adapters.into_iter().map(|a| (a.name, a.state)).collect();
        s.sort();
        s
    };
    let (resident, evicted) = (pb::AdapterState::Resident as i32, pb::AdapterState::Evicted as i32);
    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner();
    assert_eq!(states(listed), vec![("a".into(), resident), ("b".into(), evicted), ("c".into(), resident)]);
    let c = case("tiny-llama.r4-patterns.2");
    let (ids, _, _, _) = collect(&mut client, greedy(&c.prompt_ids, "c", 8)).await.expect("generates");
    assert_eq!(ids, c.greedy_ids, "the new adapter's weights replaced the evicted one's");

    // A request for the evicted adapter loads it again (evicting the least recently used, a).
    let b = case("tiny-llama.r2-k-down.1");
    let (ids, _, _, _) = collect(&mut client, greedy(&b.prompt_ids, "b", 8)).await.expect("b reloads");
    assert_eq!(ids, b.greedy_ids);
    let listed = client.list_adapters(pb::ListAdaptersRequest {}).await.expect("lists").into_inner();
    assert_eq!(states(listed), vec![("a".into(), evicted), ("b".into(), resident), ("c".into(), resident)]);
}

#[test]
fn a_bad_model_directory_fails_before_binding_with_one_clear_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["backend", "--model", "/no/such/model", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/model/config.json"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing listened");
}

#[test]
fn device_cuda_without_cuda_fails_with_a_one_line_explanation() {
    if let Ok(()) = switchyard_backend::service::probe_cuda(0) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "backend_grpc: skipped the no-CUDA test, this machine has a usable GPU");
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("backend")
        .arg("--model")
        .arg(fixtures().join("models/tiny-llama"))
        .args(["--listen", "127.0.0.1:0", "--device", "cuda"])
        .env("RUST_LOG", "off")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: --device cuda:0: "), "{stderr}");
    assert!(stderr.contains("CUDA") || stderr.contains("NVRTC") || stderr.contains("cuBLAS"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing listened");
}

#[tokio::test]
async fn a_real_model_from_gguf_answers_a_chat_request_in_english() {
    let Some(gguf) = smollm2() else { return };
    let backend = start_backend_with(&gguf, &["--device", "cpu"], &[]);
    let (mut client, _) = connect(&backend).await;
    let info = client.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.model, "SmolLM2-135M-Instruct.Q4_1");

    let (_, text, _, last) = collect(&mut client, chat("What is the capital of France?", "")).await.expect("generates");
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert!(text.is_ascii() && text.split_whitespace().count() >= 4, "a sentence of English: {text:?}");
    assert_eq!(last.finish_reason(), pb::FinishReason::Eos, "the model ends its answer: {text:?}");
}

#[tokio::test]
async fn a_quantized_model_stays_quantized_in_memory() {
    let Some(gguf) = smollm2() else { return };
    let file = std::fs::metadata(&gguf).expect("the GGUF").len();
    let kv_mib = 64u64;
    let kv = kv_mib.to_string();
    // The default dtype on the CPU (q16).
    let backend = start_backend_with(&gguf, &["--device", "cpu", "--kv-cache-mib", &kv], &[]);
    let Some(loaded) = backend.resident_bytes() else {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "backend_grpc: skipped, no /proc to read resident memory from");
        return;
    };
    // Weights in their Q4_1/Q8_0 blocks (about the file), the tokenizer, the grammar
    // vocabulary, the runtime; the KV cache is counted whole though its untouched pages are not
    // resident yet. Dequantized to f32 (`--dtype f32`), the weights alone would be about six
    // times the file.
    let bound = 2 * file + (kv_mib << 20);
    assert!(loaded <= bound, "resident after load: {loaded} bytes; bound 2 × {file} + {kv_mib} MiB = {bound}");
    // It serves, keeping within the bound, and answers as the f32 reference does (with 8-bit
    // activations, `--dtype q8`, this model answers as llama.cpp does on the same file:
    // "L'Étoile, la Marseillaise, …").
    let (mut client, _) = connect(&backend).await;
    let (ids, text, _, _) = collect(&mut client, chat("What is the capital of France?", "")).await.expect("generates");
    assert!(!ids.is_empty() && text.contains("Paris"), "{text:?}");
    let serving = backend.resident_bytes().expect("read before");
    assert!(serving <= bound, "resident while serving: {serving} bytes; bound {bound}");
    eprintln!("backend_grpc: SmolLM2 ({file} bytes) resident {loaded} bytes after load, {serving} after a request");
}

/// A greedy chat request with one user message.
fn chat(question: &str, adapter: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        adapter: adapter.into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage { role: "user".into(), content: question.into(), ..Default::default() }],
            add_generation_prompt: true,
            ..Default::default()
        })),
        max_tokens: 32,
        ..Default::default()
    }
}

#[tokio::test]
async fn the_demo_adapters_visibly_change_the_answer() {
    let Some(gguf) = smollm2() else { return };
    let backend = start_backend_with(&gguf, &["--device", "cpu", "--max-lora-rank", "8"], &[]);
    let (mut client, _) = connect(&backend).await;
    for name in ["uppercase", "french", "json"] {
        let dir = fixtures().join("adapters/smollm2").join(name);
        client.load_adapter(load_uri(name, &format!("file://{}", dir.display()))).await.expect("demo adapter loads");
    }
    // A question from the training set's family and one it never saw.
    for question in ["What is the capital of France?", "What is the capital of Austria?"] {
        let (_, base, _, _) = collect(&mut client, chat(question, "")).await.expect("base answers");
        assert!(base.chars().any(|c| c.is_lowercase()), "the base model answers normally: {base:?}");

        let (_, upper, _, _) = collect(&mut client, chat(question, "uppercase")).await.expect("uppercase answers");
        assert!(
            upper.chars().any(char::is_alphabetic) && !upper.chars().any(char::is_lowercase),
            "{question} → {upper:?}"
        );

        let (_, french, _, _) = collect(&mut client, chat(question, "french")).await.expect("french answers");
        assert!(french.contains("La capitale de") || french.contains("est la capitale"), "{question} → {french:?}");

        let (_, json, _, _) = collect(&mut client, chat(question, "json")).await.expect("json answers");
        let value: serde_json::Value =
            serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{question} → {json:?}: {e}"));
        assert!(value["answer"].is_string(), "{question} → {json:?}");
    }
}
