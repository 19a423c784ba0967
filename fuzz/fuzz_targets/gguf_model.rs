//! A GGUF file as `switchyard backend --model x.gguf` reads it: header, metadata, tensor
//! index, the model config, the tokenizer, and the weights (dequantized).

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().expect("temp file");
    file.write_all(data).expect("write");
    // Any answer is fine; a panic, a hang or an allocation past the fuzzer's limit is a bug.
    let _ = switchyard_backend::model::Model::open(file.path());
});
