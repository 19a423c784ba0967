#!/usr/bin/env python3
"""Builds the golden fixtures: tiny random Llama-family models, PEFT adapters for them, and the
outputs Hugging Face `transformers` + `peft` compute for them (the reference implementation).

The engine's golden tests load the same files and must reproduce these outputs. Only this script
needs PyTorch; the tests and CI read the committed results.

    python -m venv .venv && .venv/bin/pip install torch transformers peft safetensors tokenizers
    .venv/bin/python scripts/golden/make_fixtures.py fixtures

Output layout (all small):
    fixtures/models/tiny-llama/      config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    fixtures/models/tiny-qwen2/      the same, with q/k/v biases; bf16 weights in shards with an index
    fixtures/models/tiny-mistral/    the same, with an 8-token sliding window and linear RoPE scaling
    fixtures/adapters/<model>/<name>/ adapter_config.json, adapter_model.safetensors
    fixtures/golden/cases.json       every case: model, adapter, prompt ids, greedy ids
    fixtures/golden/logits.safetensors  per case, the logits of every greedy step ([steps, vocab])
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SEED = 20261128
STEPS = 8  # greedy tokens generated per case
MIN_MARGIN = 2e-3  # top-1 minus top-2 logit at every greedy step, so f32 noise cannot flip a token

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PROMPTS = [
    "The quick brown fox",
    "Switchyard routes every request to its adapter.",
    "a b c",
    "Once upon a time, in a rail yard far away, the engines waited for their cars to be sorted",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Which track for the 5:15?  "},
]


def corpus():
    words = (
        "the quick brown fox jumps over lazy dog switchyard routes every request to its adapter "
        "once upon a time in rail yard far away engines waited for their cars be sorted track "
        "which system user assistant you are terse model token batch rank scale"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
    return lines + PROMPTS


def build_tokenizer(out: Path, vocab_size: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_model(kind: str, vocab: int, eos_id: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        initializer_range=0.25,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    if kind == "llama":
        cfg = LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    elif kind == "mistral":
        # A window shorter than the longer prompts, and linear RoPE scaling.
        cfg = MistralConfig(
            **common,
            tie_word_embeddings=False,
            sliding_window=8,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        )
    else:
        cfg = Qwen2Config(**common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(SEED + {"llama": 0, "qwen2": 1, "mistral": 3}[kind])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # non-trivial norm weights catch a missing multiply
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


# name -> (model kind, LoraConfig kwargs)
ADAPTERS = {
    "tiny-llama": {
        "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "r16-all-rslora": dict(
            r=16,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        "r4-patterns": dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 12},
            alpha_pattern={"o_proj": 32},
        ),
        "r32-mlp-regex": dict(r=32, lora_alpha=64, target_modules=r".*layers\.[02]\.mlp\.(gate_proj|up_proj|down_proj)"),
        "r2-k-down": dict(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"]),
    },
    "tiny-mistral": {
        "r4-qkvo": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    },
    "tiny-qwen2": {
        "r8-all": dict(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    },
}


def randomize_lora(model, seed):
    """PEFT starts B at zero (a no-op adapter); give every LoRA matrix real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def bf16_drift(model_bf16, prompt_ids, greedy_ids, want):
    """How far the reference itself moves when run in bf16: the largest logit error of a step
    relative to the step's largest logit. Engines running in bf16 are judged against this."""
    ids = list(prompt_ids) + list(greedy_ids)
    logits = model_bf16(torch.tensor([ids])).logits[0].float()
    n = len(prompt_ids)
    got = logits[n - 1 : n - 1 + len(greedy_ids)]
    return float(((got - want).abs().max(dim=1).values / want.abs().max(dim=1).values).max())


@torch.no_grad()
def greedy(model, prompt_ids):
    ids = list(prompt_ids)
    steps, margins = [], []
    for _ in range(STEPS):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        margins.append(float(top.values[0] - top.values[1]))
        steps.append(logits.clone())
        ids.append(int(top.indices[0]))
    return ids[len(prompt_ids) :], torch.stack(steps), min(margins)


def main(out: Path):
    if out.exists():
        shutil.rmtree(out)
    torch.set_num_threads(2)
    cases, logits = [], {}
    chat_renderings = {}
    for model_name, kind in [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2"), ("tiny-mistral", "mistral")]:
        model_dir = out / "models" / model_name
        tok = build_tokenizer(model_dir, vocab_size=384)
        eos_id = tok.convert_tokens_to_ids("<|im_end|>")
        base = make_model(kind, len(tok), eos_id)
        if kind != "qwen2":
            base.save_pretrained(model_dir, safe_serialization=True)
        else:
            # bf16 on disk, in shards: exercises the index and the dtype conversion.
            base.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True, max_shard_size="100KB")
        base.generation_config.save_pretrained(model_dir)

        def from_disk():
            # The reference runs, in f32, exactly what is on disk (bf16-rounded weights included).
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

        base = from_disk()

        rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        chat_renderings[model_name] = {"messages": CHAT, "add_generation_prompt": True, "text": rendered}
        prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
        prompts.append(tok.encode(rendered, add_special_tokens=False))
        texts = PROMPTS + [rendered]

        variants = [(None, base)]
        for i, (name, kwargs) in enumerate(ADAPTERS[model_name].items()):
            peft_model = get_peft_model(from_disk(), LoraConfig(**kwargs))
            randomize_lora(peft_model, SEED + 100 + i)
            adapter_dir = out / "adapters" / model_name / name
            peft_model.save_pretrained(adapter_dir, safe_serialization=True)
            (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
            # The saved adapter_config names the base by path; a relative name reads better.
            cfg_path = adapter_dir / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = model_name
            if isinstance(cfg.get("target_modules"), list):
                cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set's order
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            variants.append((name, peft_model.eval()))

        for adapter, model in variants:
            model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
            changed = False
            for p_idx, (text, ids) in enumerate(zip(texts, prompts)):
                out_ids, step_logits, margin = greedy(model, ids)
                if margin < MIN_MARGIN:
                    raise SystemExit(f"{model_name}/{adapter}/prompt {p_idx}: greedy margin {margin:.2e} too small")
                key = f"{model_name}.{adapter or 'base'}.{p_idx}"
                logits[key] = step_logits.contiguous()
                cases.append(
                    {
                        "key": key,
                        "model": model_name,
                        "adapter": adapter,
                        "prompt": text,
                        "prompt_ids": ids,
                        "greedy_ids": out_ids,
                        "min_margin": margin,
                        "bf16_drift": bf16_drift(model_bf16, ids, out_ids, step_logits),
                    }
                )
                base_case = next(c for c in cases if c["key"] == f"{model_name}.base.{p_idx}")
                changed |= base_case["greedy_ids"] != out_ids
            if adapter and not changed:
                raise SystemExit(f"{model_name}/{adapter} does not change any greedy output")

    golden = out / "golden"
    golden.mkdir(parents=True)
    save_file(logits, str(golden / "logits.safetensors"))
    (golden / "cases.json").write_text(json.dumps({"steps": STEPS, "cases": cases, "chat": chat_renderings}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {golden}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures"))
