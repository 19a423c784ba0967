#!/usr/bin/env python3
"""Decode tokens/s of llama.cpp (through llama-cpp-python) on a GGUF file, single stream, for
comparison with `switchyard bench` on the same file and machine.

    pip install llama-cpp-python      # builds llama.cpp from source
    python scripts/bench/llama_cpp_decode.py model.gguf [threads] [prompt_len] [steps]
"""

import sys
import time

from llama_cpp import Llama


def main(path, threads=2, prompt_len=32, steps=64, rounds=3):
    llm = Llama(model_path=path, n_threads=threads, n_ctx=prompt_len + steps + 8, verbose=False)
    prompt = [(t * 97) % 49000 + 100 for t in range(prompt_len)]
    rates = []
    for _ in range(rounds):
        llm.reset()
        llm.eval(prompt)  # prefill, not timed
        start = time.perf_counter()
        for _ in range(steps):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        rates.append(steps / (time.perf_counter() - start))
    rates.sort()
    print(f"llama.cpp {path.rsplit('/', 1)[-1]}: {rates[len(rates) // 2]:.1f} tokens/s single stream ({threads} threads, median of {rounds})")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], *(int(a) for a in args[1:]))
