//! OpenAI request bodies as the gateway parses them: `/v1/chat/completions` and
//! `/v1/completions`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = switchyard_gateway::openai::parse_chat(data);
    let _ = switchyard_gateway::openai::parse_completion(data);
});
