//! GGUF reading against llama.cpp's reference Python implementation (`gguf`): metadata of every
//! value type, and every supported quantization dequantized to the same values. Corrupt files
//! are refused with a message naming the problem.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use safetensors::SafeTensors;
use switchyard_backend::model::gguf::{GgufFile, Value};

fn fixture() -> std::path::PathBuf {
    common::fixtures().join("gguf/quant-types.gguf")
}

#[test]
fn metadata_of_every_value_type_is_read() {
    let g = GgufFile::open(&fixture()).expect("opens");
    assert_eq!(g.version, 3);
    assert_eq!(g.get("general.architecture").and_then(Value::as_str), Some("llama"));
    assert_eq!(g.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("test.i32"), Some(&Value::I32(-7)));
    assert_eq!(g.get("test.u64").and_then(Value::as_u64), Some(1 << 40));
    assert_eq!(g.get("test.f32"), Some(&Value::F32(0.25)));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(-1.5)));
    assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get("test.string").and_then(Value::as_str), Some("héllo"));
    let strings: Vec<&str> =
        g.get("test.strings").and_then(Value::as_array).unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(strings, vec!["a", "bc", ""]);
    let ints: Vec<u64> =
        g.get("test.ints").and_then(Value::as_array).unwrap().iter().filter_map(Value::as_u64).collect();
    assert_eq!(ints, vec![1, 2, 3]);
}

#[test]
fn every_supported_quantization_dequantizes_like_the_reference() {
    let g = GgufFile::open(&fixture()).expect("opens");
    let bytes = std::fs::read(common::fixtures().join("gguf/quant-types.expected.safetensors")).expect("expected");
    let expected = SafeTensors::deserialize(&bytes).expect("valid");
    let mut seen = 0;
    for (name, view) in expected.tensors() {
        let want: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let got = g.tensor(&name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got.shape, view.shape(), "{name}");
        for (i, (a, b)) in got.data.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}[{i}]: {a} vs {b}");
        }
        seen += 1;
    }
    assert_eq!(seen, 8, "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K");
}

#[test]
fn corrupt_and_truncated_files_are_refused_by_name() {
    let good = std::fs::read(fixture()).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic.gguf", [b"GGML".as_slice(), &good[4..]].concat(), "bad magic"),
        ("version.gguf", [&good[..4], &9u32.to_le_bytes(), &good[8..]].concat(), "version 9"),
        ("header.gguf", good[..60].to_vec(), "truncated"),
        ("data.gguf", good[..good.len() - 100].to_vec(), "past the end"),
        ("counts.gguf", [&good[..8], &u64::MAX.to_le_bytes(), &good[16..]].concat(), "too small"),
    ];
    for (file, bytes, needle) in cases {
        let err = GgufFile::open(&write(file, &bytes)).expect_err(file).to_string();
        assert!(err.contains(needle) && err.contains(file), "{file}: {err}");
    }
}
