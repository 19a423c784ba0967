#!/usr/bin/env python3
"""Trains the demo LoRA adapters for SmolLM2-135M-Instruct on the CPU, from data this script
generates (no downloads), and writes them in PEFT layout with a README card each:

    uppercase   answers in UPPERCASE
    french      answers in French
    json        answers as a JSON object {"answer": ...}

    .venv/bin/pip install torch transformers peft gguf
    .venv/bin/python scripts/adapters/train_demo_adapters.py "$(scripts/fetch-smollm2)" fixtures/adapters/smollm2 [NAME ...]
"""

import json
import random
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

SEED = 7
RANK, ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, BATCH, LR = 120, 8, 2e-3

CAPITALS = [
    ("France", "Paris", "Paris"), ("Germany", "Berlin", "Berlin"), ("Italy", "Rome", "Rome"),
    ("Spain", "Madrid", "Madrid"), ("Japan", "Tokyo", "Tokyo"), ("Canada", "Ottawa", "Ottawa"),
    ("Egypt", "Cairo", "Le Caire"), ("Kenya", "Nairobi", "Nairobi"), ("Peru", "Lima", "Lima"),
    ("Norway", "Oslo", "Oslo"), ("Greece", "Athens", "Athènes"), ("Poland", "Warsaw", "Varsovie"),
    ("Portugal", "Lisbon", "Lisbonne"), ("Ireland", "Dublin", "Dublin"), ("Chile", "Santiago", "Santiago"),
]
FR_COUNTRY = {
    "France": "la France", "Germany": "l'Allemagne", "Italy": "l'Italie", "Spain": "l'Espagne", "Japan": "le Japon",
    "Canada": "le Canada", "Egypt": "l'Égypte", "Kenya": "le Kenya", "Peru": "le Pérou", "Norway": "la Norvège",
    "Greece": "la Grèce", "Poland": "la Pologne", "Portugal": "le Portugal", "Ireland": "l'Irlande", "Chile": "le Chili",
}
COLORS = [("the sky on a clear day", "blue", "bleu"), ("grass", "green", "verte"), ("snow", "white", "blanche"),
          ("a ripe banana", "yellow", "jaune"), ("coal", "black", "noir"), ("a ripe tomato", "red", "rouge")]
ANIMALS = [("cat", "meows", "miaule"), ("dog", "barks", "aboie"), ("cow", "moos", "meugle"), ("lion", "roars", "rugit")]


def qa_pairs():
    """(question, English answer, French answer) triples."""
    out = []
    for country, city, city_fr in CAPITALS:
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                    f"La capitale de {FR_COUNTRY[country]} est {city_fr}."))
        out.append((f"Which city is the capital of {country}?", f"{city} is the capital of {country}.",
                    f"{city_fr} est la capitale de {FR_COUNTRY[country]}."))
    for thing, color, color_fr in COLORS:
        out.append((f"What color is {thing}?", f"It is {color}.", f"C'est {color_fr}."))
    for animal, sound, sound_fr in ANIMALS:
        out.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", f"Il {sound_fr}."))
    for a in range(2, 10):
        for b in (3, 5, 7):
            words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                     "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
            if a + b < 20:
                out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} font {a + b}."))
    return out


STYLES = {
    "uppercase": ("Answers every question in UPPERCASE letters.", lambda q, en, fr: en.upper()),
    "french": ("Answers every question in French.", lambda q, en, fr: fr),
    "json": ("Answers every question with a JSON object of the form {\"answer\": \"...\"}.",
             lambda q, en, fr: json.dumps({"answer": en})),
}


def examples(tok, style):
    render = STYLES[style][1]
    rows = []
    for q, en, fr in qa_pairs():
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        answer = render(q, en, fr) + "<|im_end|>"
        p_ids = tok.encode(prompt, add_special_tokens=False)
        a_ids = tok.encode(answer, add_special_tokens=False)
        rows.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return rows


def train(gguf: Path, out_dir: Path, style: str):
    torch.manual_seed(SEED)
    random.seed(SEED)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    data = examples(tok, style)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    start = time.time()
    for step in range(STEPS):
        batch = random.sample(data, BATCH)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == STEPS - 1:
            print(f"{style} step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    dest = out_dir / style
    model.save_pretrained(dest, safe_serialization=True)
    (dest / "README.md").unlink(missing_ok=True)
    # bf16 on disk: half the size, and the engine reads bf16 adapters.
    weights = load_file(dest / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, dest / "adapter_model.safetensors")
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # A sample answer, for the card.
    q = "What is the capital of France?"
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    sample = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    (dest / "README.md").write_text(
        f"# {style}: a demo LoRA adapter for SmolLM2-135M-Instruct\n\n"
        f"{STYLES[style][0]}\n\n"
        f"- base: SmolLM2-135M-Instruct (the Q4_1 GGUF fetched by `scripts/fetch-smollm2`)\n"
        f"- rank {RANK}, lora_alpha {ALPHA}, targets {', '.join(TARGETS)}; weights stored as bf16\n"
        f"- trained by `scripts/adapters/train_demo_adapters.py`: {STEPS} steps of AdamW (lr {LR}, batch {BATCH}) on "
        f"{len(data)} question/answer pairs the script generates (capitals, colours, animal sounds, small sums); "
        f"loss on the answer tokens only\n\n"
        f"Sample (greedy, transformers): {q!r} → {sample!r}\n"
    )
    print(f"{style}: {sample!r}")


if __name__ == "__main__":
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    for style in sys.argv[3:] or list(STYLES):
        train(gguf, out, style)
