#!/usr/bin/env python3
"""PyTorch baselines for the batched LoRA benchmark: 64 tokens, each with its own rank-16
adapter, hidden 4096, bf16, computing y += scale * (x @ A^T) @ B^T per token.

  loop:       an eager loop over the adapters (one pair of matmuls per adapter)
  gather_bmm: gather every token's A and B, then two batched matmuls

Prints `name microseconds` lines (median of CUDA-event timings), the format kernel-check reads.
"""

import sys

import torch

TOKENS, ADAPTERS, RANK, HIDDEN = 64, 64, 16, 4096


def median_us(fn, reps=20, groups=7):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / reps)
    samples.sort()
    return samples[len(samples) // 2]


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16)
    y = torch.randn(TOKENS, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16)
    a = torch.randn(ADAPTERS, RANK, HIDDEN, device=dev, generator=g, dtype=torch.bfloat16) * 0.03
    b = torch.randn(ADAPTERS, HIDDEN, RANK, device=dev, generator=g, dtype=torch.bfloat16) * 0.5
    idx = torch.arange(TOKENS, device=dev) % ADAPTERS
    scale = 2.0

    def loop():
        for i in range(ADAPTERS):
            rows = idx == i
            y[rows] += scale * ((x[rows] @ a[i].T) @ b[i].T)

    def loop_contiguous():
        # Rows of adapter i are row i here; slicing avoids the boolean-mask overhead.
        for i in range(ADAPTERS):
            y[i : i + 1] += scale * ((x[i : i + 1] @ a[i].T) @ b[i].T)

    def gather_bmm():
        v = torch.bmm(x.unsqueeze(1), a[idx].transpose(1, 2))
        y.add_(scale * torch.bmm(v, b[idx].transpose(1, 2)).squeeze(1))

    # The fairer (faster) of the two loop variants is the baseline.
    loop_us = min(median_us(loop), median_us(loop_contiguous))
    print(f"torch_loop_us {loop_us:.2f}")
    print(f"torch_gather_bmm_us {median_us(gather_bmm):.2f}")
    print(f"torch_version {torch.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
