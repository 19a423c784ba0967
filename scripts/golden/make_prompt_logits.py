#!/usr/bin/env python3
"""Adds the prompt logits of every golden case to the fixtures: what `transformers` + `peft`
compute at each prompt position of the committed tiny models and adapters (the reference the
engine's prompt log-probabilities are checked against). Reads fixtures/golden/cases.json and the
models and adapters on disk; writes fixtures/golden/prompt_logits.safetensors, per case key the
logits of every prompt position ([prompt tokens, vocab]).

    .venv/bin/python scripts/golden/make_prompt_logits.py fixtures
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main(fixtures: Path):
    torch.set_num_threads(2)
    cases = json.loads((fixtures / "golden" / "cases.json").read_text())["cases"]
    models = {}
    logits = {}
    for case in cases:
        key = (case["model"], case["adapter"])
        if key not in models:
            # In f32, exactly what is on disk (bf16-rounded weights included), as the other fixtures.
            model = AutoModelForCausalLM.from_pretrained(fixtures / "models" / case["model"], dtype=torch.float32)
            if case["adapter"]:
                model = PeftModel.from_pretrained(model, fixtures / "adapters" / case["model"] / case["adapter"])
            models[key] = model.eval()
        with torch.no_grad():
            out = models[key](torch.tensor([case["prompt_ids"]])).logits[0].float()
        logits[case["key"]] = out.contiguous()
    save_file(logits, str(fixtures / "golden" / "prompt_logits.safetensors"))
    print(f"wrote the prompt logits of {len(logits)} cases")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures"))
