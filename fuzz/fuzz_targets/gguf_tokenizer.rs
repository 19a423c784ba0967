//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`, and its chat template), built and
//! then used on text and on a conversation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use switchyard_backend::model::gguf::GgufFile;
use switchyard_backend::model::{ChatMessage, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().expect("temp file");
    file.write_all(data).expect("write");
    let Ok(gguf) = GgufFile::open(file.path()) else { return };
    let Ok(tokenizer) = Tokenizer::from_gguf(&gguf, &[0]) else { return };
    if let Ok(ids) = tokenizer.encode("Hello, world! <|im_start|> 12345 \u{e9}\u{1F600}") {
        let _ = tokenizer.decode(&ids);
    }
    let _ = tokenizer.decode(&[0, 1, 2, u32::MAX]);
    let chat = [
        ChatMessage { role: "system".into(), content: "Be brief.".into(), ..Default::default() },
        ChatMessage { role: "user".into(), content: "Hi <|im_end|> {{ x }}".into(), ..Default::default() },
    ];
    let _ = tokenizer.encode_chat(&chat, true);
});
