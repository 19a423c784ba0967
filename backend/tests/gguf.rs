//! GGUF reading against llama.cpp's reference Python implementation (`gguf`): metadata of every
//! value type, and every supported quantization dequantized to the same values. Corrupt files
//! are refused with a message naming the problem.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails loudly on a broken fixture

mod common;

use safetensors::SafeTensors;
use switchyard_backend::model::TensorData;
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
        // Dequantized, and as the CPU kernels keep it (the block formats repacked): the same
        // values either way.
        for got in [g.tensor(&name), g.weight(&name)] {
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.shape, view.shape(), "{name}");
            let values = got.to_f32();
            assert_eq!(values.len(), want.len(), "{name}");
            for (i, (a, b)) in values.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name}[{i}]: {a} vs {b}");
            }
        }
        let kept = g.weight(&name).expect("read above");
        let quantized = matches!(kept.data, TensorData::Quant(_));
        assert_eq!(
            quantized,
            ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"].iter().any(|q| name.ends_with(q)),
            "{name}: kept quantized?"
        );
        seen += 1;
    }
    assert_eq!(seen, 11, "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K");
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

/// A minimal GGUF writer for hand-made bad files: string/u32/string-array metadata and F32
/// tensors (or any type id, with the given raw bytes).
struct Writer {
    kv: Vec<u8>,
    kv_count: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
    tensors: u64,
}

impl Writer {
    fn new() -> Writer {
        Writer { kv: Vec::new(), kv_count: 0, infos: Vec::new(), data: Vec::new(), tensors: 0 }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn key(&mut self, k: &str, ty: u32) {
        Self::string(&mut self.kv, k);
        self.kv.extend(ty.to_le_bytes());
        self.kv_count += 1;
    }

    fn str(mut self, k: &str, v: &str) -> Writer {
        self.key(k, 8);
        Self::string(&mut self.kv, v);
        self
    }

    fn u32(mut self, k: &str, v: u32) -> Writer {
        self.key(k, 4);
        self.kv.extend(v.to_le_bytes());
        self
    }

    fn strs(mut self, k: &str, v: &[&str]) -> Writer {
        self.key(k, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((v.len() as u64).to_le_bytes());
        for s in v {
            Self::string(&mut self.kv, s);
        }
        self
    }

    /// A tensor; `dims` in GGML order (innermost first).
    fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, bytes: Vec<u8>) -> Writer {
        Self::string(&mut self.infos, name);
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(type_id.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data.extend(bytes);
        while !self.data.len().is_multiple_of(32) {
            self.data.push(0);
        }
        self.tensors += 1;
        self
    }

    fn f32(self, name: &str, dims: &[u64]) -> Writer {
        let n: u64 = dims.iter().product();
        self.tensor(name, dims, 0, (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect())
    }

    fn write(self, path: &std::path::Path) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensors.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(self.kv);
        out.extend(self.infos);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(self.data);
        std::fs::write(path, out).expect("write");
    }
}

/// A one-layer Llama (hidden 8, 2 heads, 1 KV head, vocab 4) whose tensors `tensors` adds.
fn tiny_llama(tensors: impl FnOnce(Writer) -> Writer) -> Writer {
    let w = Writer::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 8)
        .u32("llama.feed_forward_length", 16)
        .u32("llama.attention.head_count", 2)
        .u32("llama.attention.head_count_kv", 1)
        .u32("llama.context_length", 64)
        .str("tokenizer.ggml.model", "gpt2")
        .strs("tokenizer.ggml.tokens", &["a", "b", "c", "d"])
        .strs("tokenizer.ggml.merges", &[]);
    tensors(w)
}

fn all_tensors(w: Writer, embd_dims: &[u64]) -> Writer {
    let mut w = w.f32("token_embd.weight", embd_dims).f32("output_norm.weight", &[8]);
    for (name, dims) in [
        ("attn_norm", vec![8]),
        ("ffn_norm", vec![8]),
        ("attn_q", vec![8, 8]),
        ("attn_k", vec![8, 4]),
        ("attn_v", vec![8, 4]),
        ("attn_output", vec![8, 8]),
        ("ffn_gate", vec![8, 16]),
        ("ffn_up", vec![8, 16]),
        ("ffn_down", vec![16, 8]),
    ] {
        w = w.f32(&format!("blk.0.{name}.weight"), &dims);
    }
    w
}

#[test]
fn a_hand_made_gguf_model_loads_and_bad_ones_are_refused_by_name() {
    use switchyard_backend::model::Model;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n);

    tiny_llama(|w| all_tensors(w, &[8, 4])).write(&path("ok.gguf"));
    let m = Model::open(&path("ok.gguf")).expect("a consistent file loads");
    assert_eq!((m.config.hidden_size, m.config.num_kv_heads, m.config.vocab_size), (8, 1, 4));
    assert!(m.config.tie_word_embeddings, "no output.weight: embeddings are tied");

    // Metadata says hidden 8, the embedding table is 6 wide.
    tiny_llama(|w| all_tensors(w, &[6, 4])).write(&path("shape.gguf"));
    let err = Model::open(&path("shape.gguf")).expect_err("refused").to_string();
    assert!(err.contains("token_embd.weight") && err.contains("[4, 8]"), "{err}");

    // A quantization the engine does not read.
    tiny_llama(|w| w.tensor("token_embd.weight", &[256, 4], 10, vec![0; 4 * 84])).write(&path("q2.gguf"));
    let err = Model::open(&path("q2.gguf")).expect_err("refused").to_string();
    assert!(err.contains("Q2_K") && err.contains("token_embd.weight"), "{err}");

    // Dimensions whose byte count wraps around to nothing (found by fuzzing: it used to pass
    // the extent check and then ask for an impossible allocation).
    tiny_llama(|w| w.tensor("token_embd.weight", &[1 << 31, 1 << 31], 0, Vec::new())).write(&path("wrap.gguf"));
    let err = Model::open(&path("wrap.gguf")).expect_err("refused").to_string();
    assert!(err.contains("token_embd.weight: dimensions overflow"), "{err}");

    // An architecture the engine does not run, and a missing hyperparameter.
    Writer::new().str("general.architecture", "falcon").write(&path("arch.gguf"));
    let err = Model::open(&path("arch.gguf")).expect_err("refused").to_string();
    assert!(err.contains("falcon"), "{err}");
    Writer::new().str("general.architecture", "llama").u32("llama.block_count", 1).write(&path("meta.gguf"));
    let err = Model::open(&path("meta.gguf")).expect_err("refused").to_string();
    assert!(err.contains("llama.attention.head_count") || err.contains("llama.embedding_length"), "{err}");
}

#[test]
fn a_sentencepiece_vocabulary_tokenizes_like_transformers() {
    use switchyard_backend::model::Tokenizer;
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        ids: Vec<u32>,
        decoded: String,
    }
    let g = GgufFile::open(&common::fixtures().join("gguf/sentencepiece.gguf")).expect("opens");
    let tok = Tokenizer::from_gguf(&g, &[2]).expect("builds");
    let text = std::fs::read_to_string(common::fixtures().join("gguf/sentencepiece.expected.json")).expect("expected");
    let cases: Vec<Case> = serde_json::from_str(&text).expect("parses");
    for c in &cases {
        assert_eq!(tok.encode(&c.text).expect("encodes"), c.ids, "{:?}", c.text);
        assert_eq!(tok.decode(&c.ids).expect("decodes"), c.decoded, "{:?}", c.text);
    }
}

/// Random GGUF blocks of a block format (`Q5_0` = 6, `Q5_1` = 7, `Q4_K` = 12, `Q5_K` = 13,
/// `Q6_K` = 14) for `n` weights, with small scales (random bits could be NaN or huge) and random
/// quants and sub-block scales.
fn random_blocks(type_id: u32, n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    use rand::Rng;
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    let mut out = Vec::new();
    let per_block = if matches!(type_id, 6 | 7) { 32 } else { 256 };
    for _ in 0..n / per_block {
        // Weights of a few hundredths, as a trained model's: attention stays soft.
        match type_id {
            6 | 7 => {
                out.extend(f16(rng.random_range(0.0005..0.001)));
                if type_id == 7 {
                    out.extend(f16(rng.random_range(-0.015..-0.005)));
                }
                out.extend((0..20).map(|_| rng.random::<u8>()));
            }
            12 | 13 => {
                out.extend(f16(rng.random_range(0.00001..0.00003)));
                out.extend(f16(rng.random_range(0.00001..0.00003)));
                out.extend((0..if type_id == 12 { 140 } else { 172 }).map(|_| rng.random::<u8>()));
            }
            _ => {
                out.extend((0..208).map(|_| rng.random::<u8>()));
                out.extend(f16(rng.random_range(0.000005..0.00001)));
            }
        }
    }
    out
}

#[test]
fn a_model_in_the_k_formats_runs_quantized_as_its_f32_values_do() {
    // The mix a Q4_K_M file has: most matrices Q4_K, the v and down projections and the output
    // Q6_K (so q, k and v do not fuse into one matrix).
    let q4_k_m = [12, 12, 14, 12, 12, 12, 14];
    runs_quantized_as_its_f32_values_do([12, 14], [q4_k_m, q4_k_m]);
}

#[test]
fn a_model_in_the_5_bit_formats_runs_quantized_as_its_f32_values_do() {
    // A Q5_K_M layer (Q5_K, with Q6_K for v and down), and a layer of the formats llama.cpp's
    // K-quant files fall back to for rows that are not whole super-blocks (Q5_0 for Q4_K's
    // matrices, Q5_1 for Q5_K's).
    runs_quantized_as_its_f32_values_do([13, 6], [[13, 13, 14, 13, 13, 13, 14], [6, 6, 7, 6, 6, 6, 7]]);
}

/// Two layers of a Llama with rows of 256 and 512 (a K super-block's multiple) and heads of 64,
/// its embeddings and output in the formats `outer`, each layer's q, k, v, o, gate, up and down
/// projections in `layers`' (GGUF type ids), run quantized (`q16`) and dequantized to f32 at
/// load, side by side.
fn runs_quantized_as_its_f32_values_do(outer: [u32; 2], layers: [[u32; 7]; 2]) {
    use rand::SeedableRng;
    use switchyard_backend::engine::cpu::CpuExecutor;
    use switchyard_backend::engine::executor::Executor;
    use switchyard_backend::model::Model;
    use switchyard_kernels::quant::Precision;

    let (h, ffn, vocab) = (256u64, 512u64, 8u64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let mut w = Writer::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 2)
        .u32("llama.embedding_length", h as u32)
        .u32("llama.feed_forward_length", ffn as u32)
        .u32("llama.attention.head_count", 4)
        .u32("llama.attention.head_count_kv", 2)
        .u32("llama.context_length", 64)
        .str("tokenizer.ggml.model", "gpt2")
        .strs("tokenizer.ggml.tokens", &["a", "b", "c", "d", "e", "f", "g", "h"])
        .strs("tokenizer.ggml.merges", &[]);
    let mut k = |w: Writer, name: &str, dims: [u64; 2], type_id: u32| {
        let bytes = random_blocks(type_id, (dims[0] * dims[1]) as usize, &mut rng);
        w.tensor(name, &dims, type_id, bytes)
    };
    w = k(w, "token_embd.weight", [h, vocab], outer[0]);
    w = k(w, "output.weight", [h, vocab], outer[1]);
    let ones = |n: u64| (0..n).flat_map(|_| 1f32.to_le_bytes()).collect::<Vec<u8>>();
    w = w.tensor("output_norm.weight", &[h], 0, ones(h));
    for (l, types) in layers.iter().enumerate() {
        w = w.tensor(&format!("blk.{l}.attn_norm.weight"), &[h], 0, ones(h));
        w = w.tensor(&format!("blk.{l}.ffn_norm.weight"), &[h], 0, ones(h));
        let names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
        let dims = [[h, h], [h, h / 2], [h, h / 2], [h, h], [h, ffn], [h, ffn], [ffn, h]];
        for ((name, dims), &type_id) in names.iter().zip(dims).zip(types) {
            w = k(w, &format!("blk.{l}.{name}.weight"), dims, type_id);
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("k.gguf");
    w.write(&path);

    let open = || Model::open(&path).expect("the model loads");
    let m = open();
    assert!(
        m.weights.layers.iter().all(|l| l.proj.iter().all(|p| matches!(p.data, TensorData::Quant(_)))),
        "every projection stays in its blocks"
    );
    let config = m.config.clone();
    // The same model dequantized to f32 at load, in the same executor (so the same f16 KV cache).
    let executor =
        |w| -> Box<dyn Executor> { Box::new(CpuExecutor::new_quantized(&config, w, 16, 16, 1, 8, Precision::Int16)) };
    let (f32_exec, q16_exec) = (executor(m.weights.into_f32()), executor(open().weights));
    assert_eq!((f32_exec.dtype(), q16_exec.dtype()), ("f32", "q16"));

    // A prompt, then greedy steps. 16-bit activations round each value to within 1/64516 of
    // its block's largest: the logits move by about that fraction (the SmolLM2 golden's bound,
    // 1e-3 of max(1, |logit|), is met with room over thirty layers).
    let (mut f32_exec, mut q16_exec) = (f32_exec, q16_exec);
    let want = common::greedy_run(f32_exec.as_mut(), vec![1, 2, 3, 4, 5, 6, 7], 8);
    let got = common::greedy_run(q16_exec.as_mut(), vec![1, 2, 3, 4, 5, 6, 7], 8);
    common::assert_same_run(&got, &want, 1e-3);
    assert!(want.0.iter().flatten().any(|v| v.abs() > 0.1), "logits of some size: {:?}", want.0[0]);
}
