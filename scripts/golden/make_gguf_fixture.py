#!/usr/bin/env python3
"""Builds fixtures/gguf/: a small GGUF file holding one tensor of every quantization type the
engine reads, metadata of every value type, and the values the `gguf` package (llama.cpp's
reference Python implementation) dequantizes them to.

    .venv/bin/pip install gguf numpy safetensors
    .venv/bin/python scripts/golden/make_gguf_fixture.py fixtures/gguf
"""

import json
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

ROWS, COLS = 3, 512  # COLS is a multiple of every block size (32 and 256)


def k_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks with sane f16 scale fields (random bits could be NaN or huge)."""
    size = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    def f16(values):
        return np.frombuffer(np.asarray(values, dtype=np.float16).tobytes(), dtype=np.uint8).reshape(-1, 2)
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[:, 0:2] = f16(rng.uniform(0.001, 0.05, n_blocks))  # d
        raw[:, 2:4] = f16(rng.uniform(0.001, 0.05, n_blocks))  # dmin
    else:
        raw[:, 208:210] = f16(rng.uniform(0.001, 0.05, n_blocks))  # d
    return raw


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261128)
    writer = gguf.GGUFWriter(str(out / "quant-types.gguf"), arch="llama")
    writer.add_uint8("test.u8", 200)
    writer.add_int32("test.i32", -7)
    writer.add_uint64("test.u64", 1 << 40)
    writer.add_float32("test.f32", 0.25)
    writer.add_float64("test.f64", -1.5)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "héllo")
    writer.add_array("test.strings", ["a", "bc", ""])
    writer.add_array("test.ints", [1, 2, 3])
    expected = {}
    dense = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    writer.add_tensor("t.f32", dense)
    expected["t.f32"] = dense
    writer.add_tensor("t.f16", dense.astype(np.float16))
    expected["t.f16"] = dense.astype(np.float16).astype(np.float32)
    for qtype in [Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]:
        raw = gguf.quants.quantize(dense, qtype)
        writer.add_tensor(f"t.{qtype.name.lower()}", raw, raw_dtype=qtype)
        expected[f"t.{qtype.name.lower()}"] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    for qtype in [Q.Q4_K, Q.Q6_K, Q.Q5_K]:
        raw = k_blocks(rng, qtype, ROWS * COLS // 256).reshape(ROWS, -1)
        writer.add_tensor(f"t.{qtype.name.lower()}", raw, raw_dtype=qtype)
        expected[f"t.{qtype.name.lower()}"] = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: np.ascontiguousarray(v.reshape(ROWS, COLS)) for k, v in expected.items()}, str(out / "quant-types.expected.safetensors"))
    print(f"wrote {len(expected)} tensors to {out}")
    sentencepiece_fixture(out)


SPM_TEXTS = ["the cat and the hat", "  leading spaces", "théâtre ☃ new", "<s>the</s> cat", "hat\nand\tcat"]


def sentencepiece_fixture(out: Path):
    """A SentencePiece-style ("llama") vocabulary with scores and byte fallback, and how
    `transformers` tokenizes texts with it."""
    from transformers import AutoTokenizer

    pieces = ["\u2581", "\u2581t", "\u2581th", "\u2581the", "\u2581c", "\u2581ca", "\u2581cat", "\u2581a", "\u2581an",
              "\u2581and", "\u2581h", "\u2581ha", "\u2581hat", "\u2581n", "\u2581ne", "\u2581new", "\u2581l",
              "t", "h", "e", "c", "a", "n", "d", "w", "l", "i", "g", "s", "r", "\u00e9", "at", "th", "he", "an", "in", "ing"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    path = out / "sentencepiece.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    cases = []
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    (out / "sentencepiece.expected.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures/gguf"))
