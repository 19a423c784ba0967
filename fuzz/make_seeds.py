#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus (fuzz/corpus/TARGET/*): small valid inputs the fuzzer
mutates from. Standard library only: run `python3 fuzz/make_seeds.py` from the repository root.

- gguf_model, gguf_tokenizer: two tiny Llama models as GGUF files (one layer, hidden 8), one with
  a byte-level BPE ("gpt2") tokenizer and a chat template, one with a SentencePiece ("llama") one;
- peft_adapter: the test fixtures' tiny-llama adapters, as the target reads them (the config's
  length in two bytes, the config, the safetensors weights);
- openai_request: chat and completion bodies as the OpenAI SDKs send them.
"""

import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"

# GGUF metadata value types.
U32, F32, BOOL, STRING, ARRAY, U64 = 4, 6, 7, 8, 9, 10


def string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def value(ty: int, v) -> bytes:
    if ty == U32:
        return struct.pack("<I", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return struct.pack("<?", v)
    if ty == STRING:
        return string(v)
    if ty == U64:
        return struct.pack("<Q", v)
    raise ValueError(ty)


def array(item_type: int, items) -> bytes:
    return struct.pack("<IQ", item_type, len(items)) + b"".join(value(item_type, i) for i in items)


def gguf(metadata, tensors) -> bytes:
    """metadata: [(key, type, value)] (type ARRAY: value is (item_type, items));
    tensors: [(name, row-major shape, f32 values)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += string(key) + struct.pack("<I", ty)
        out += array(*v) if ty == ARRAY else value(ty, v)
    data, offset = b"", 0
    for name, shape, values in tensors:
        # GGUF lists dimensions innermost first; type 0 is F32.
        out += string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", 0, offset)
        blob = b"".join(struct.pack("<f", x) for x in values)
        blob += b"\0" * (-len(blob) % 32)
        data += blob
        offset += len(blob)
    out += b"\0" * (-len(out) % 32)
    return out + data


def byte_alphabet():
    """GPT-2's printable spelling of every byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_llama(tokenizer) -> bytes:
    vocab = len(tokenizer["tokenizer.ggml.tokens"][1][1])
    hidden, heads, kv_heads, head_dim, ff = 8, 2, 1, 4, 16

    def ramp(n, scale=0.01):
        return [((i * 7) % 13 - 6) * scale for i in range(n)]

    shapes = [
        ("token_embd.weight", [vocab, hidden]),
        ("blk.0.attn_norm.weight", [hidden]),
        ("blk.0.ffn_norm.weight", [hidden]),
        ("blk.0.attn_q.weight", [heads * head_dim, hidden]),
        ("blk.0.attn_k.weight", [kv_heads * head_dim, hidden]),
        ("blk.0.attn_v.weight", [kv_heads * head_dim, hidden]),
        ("blk.0.attn_output.weight", [hidden, heads * head_dim]),
        ("blk.0.ffn_gate.weight", [ff, hidden]),
        ("blk.0.ffn_up.weight", [ff, hidden]),
        ("blk.0.ffn_down.weight", [hidden, ff]),
        ("output_norm.weight", [hidden]),
    ]
    tensors = []
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        tensors.append((name, shape, [1.0] * n if name.endswith("norm.weight") else ramp(n)))
    metadata = [
        ("general.architecture", STRING, "llama"),
        ("llama.context_length", U32, 256),
        ("llama.embedding_length", U32, hidden),
        ("llama.block_count", U32, 1),
        ("llama.feed_forward_length", U32, ff),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, kv_heads),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0),
        ("general.alignment", U32, 32),
    ] + [(k, ty, v) for k, (ty, v) in tokenizer.items()]
    return gguf(metadata, tensors)


def gpt2_tokenizer():
    alphabet = byte_alphabet()
    tokens = alphabet + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return {
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
        "tokenizer.ggml.token_type": (ARRAY, (U32, types)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, ["Ġ t", "h e", "Ġt he"])),
        "tokenizer.ggml.bos_token_id": (U32, len(tokens) - 2),
        "tokenizer.ggml.eos_token_id": (U32, len(tokens) - 1),
        "tokenizer.chat_template": (STRING, template),
    }


def sentencepiece_tokenizer():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "e", "▁h", "he", "▁he"]
    types = [2, 3, 3] + [6] * 256 + [1] * 6
    scores = [0.0] * (3 + 256) + [-1.0, -2.0, -2.0, -3.0, -3.0, -4.0]
    return {
        "tokenizer.ggml.model": (STRING, "llama"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, tokens)),
        "tokenizer.ggml.token_type": (ARRAY, (U32, types)),
        "tokenizer.ggml.scores": (ARRAY, (F32, scores)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }


def write(target: str, name: str, data: bytes):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main():
    for name, tok in [("llama-gpt2.gguf", gpt2_tokenizer()), ("llama-sentencepiece.gguf", sentencepiece_tokenizer())]:
        model = tiny_llama(tok)
        write("gguf_model", name, model)
        write("gguf_tokenizer", name, model)
    adapters = ROOT / "fixtures" / "adapters" / "tiny-llama"
    for name in ["r2-k-down", "r8-qv", "r4-patterns"]:
        config = (adapters / name / "adapter_config.json").read_bytes()
        weights = (adapters / name / "adapter_model.safetensors").read_bytes()
        write("peft_adapter", name, struct.pack("<H", len(config)) + config + weights)
    bodies = {
        "chat": {"model": "acme/support", "messages": [{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Hello!"}],
                 "temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 16, "stop": ["\n"], "seed": 7,
                 "stream": True, "stream_options": {"include_usage": True}, "n": 1},
        "chat-parts": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                       "max_tokens": 4, "stop": "x", "user": "u1"},
        "completion": {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                       "stop": ["."], "echo": False},
    }
    for name, body in bodies.items():
        write("openai_request", name + ".json", json.dumps(body).encode())


if __name__ == "__main__":
    main()
