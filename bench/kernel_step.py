"""The native kernel's own call for one decode step of 64 adapters: this tree's
``lora_kernel.cpp`` against an earlier commit's, with the rows in each level of memory.

Run: .venv/bin/python bench/kernel_step.py [--before HEAD] [--adapters 64] [--repeat 25]
                                           [--flush-mb 400]

A served warm decode step of 64 adapters spends nearly all of its LoRA work in the
kernel's call (bench/step_parts.py), and bench/lora_step.py times that call with the
wrapper's Python around it for all 120 fused layers, which serving now skips for idle
ones (``layer_routes``). Here only the kernel is called: the q/v layer of SmolLM2-135M's
30 layers, rank-8 adapters in stacks of rank 16 as int8 rows and scales made by
``fast_lora.quantize_rows``, in 2 MB pages as zoo serve keeps them, 64 tokens (one per
request) of --adapters adapters drawn from 256 slots, bf16 activations, one thread (the
vLLM worker's). Three cases of where the rows are when the step begins:

- in L2: each layer's call made twice, the second timed (a layer's rows of 64 adapters,
  about 1 MB, fit a core's L2): the arithmetic and L2's latency;
- in L3: the whole step run just before (29 MB of rows; the VM reports 300 MB of L3);
- in memory: a buffer of --flush-mb written between steps, as the base's weights pass.

The contenders take turns a step each, each going first in every other round, so a slow
minute falls on both and neither always follows the other; the medians of
--repeat steps, their ratio, and whether both gave the same bits. Results in
bench/results/kernel_step.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import save, table
from lora_step import HIDDEN, KV, LAYERS, MAX_RANK, RANK, kernel_of

SLOTS, TOKENS = 256, 64


def layers():
    """Per layer, the q/v layer's trained parts as zoo gives them to the kernel: (A's int8
    rows, B's, first column, A's scales, B's), each slot's rank, the output's width."""
    import torch

    from zoo.serve.fast_lora import quantize_rows
    from zoo.serve.zero_pages import in_huge_pages

    g = torch.Generator().manual_seed(0)
    made = []
    for _ in range(LAYERS):
        parts, start = [], 0
        for width, trained in ((HIDDEN, True), (KV, False), (KV, True)):
            if trained:
                a = torch.zeros(SLOTS, MAX_RANK, HIDDEN)
                b = torch.zeros(SLOTS, MAX_RANK, width)
                a[:, :RANK] = torch.randn(SLOTS, RANK, HIDDEN, generator=g) * 0.05
                b[:, :RANK] = torch.randn(SLOTS, RANK, width, generator=g)
                (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
                parts.append((in_huge_pages(qa), in_huge_pages(qb), start, sa, sb))
            start += width
        made.append(parts)
    return made, torch.full((SLOTS,), RANK, dtype=torch.int64), HIDDEN + 2 * KV


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="HEAD")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--flush-mb", type=int, default=400)
    args = parser.parse_args()

    import torch

    from zoo.serve import native

    torch.set_num_threads(1)
    kernels = {"now": native.kernel(), args.before: kernel_of(args.before)}
    parts, ranks, width = layers()
    calls = {name: [k.arguments(p, [ranks] * len(p)) for p in parts]
             for name, k in kernels.items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=g).bfloat16()
    start = torch.randn(TOKENS, width, generator=g).bfloat16()
    chosen = torch.randperm(SLOTS, generator=g)[:args.adapters]
    slots = chosen[torch.arange(TOKENS) % args.adapters].contiguous()
    flush = torch.zeros(args.flush_mb << 20, dtype=torch.uint8)

    def step(name, y, twice=False) -> float:
        seconds = 0.0
        for arguments in calls[name]:
            if twice:
                kernels[name].gather(y.clone(), x, slots, arguments, 1.0, 1)
            began = time.perf_counter()
            assert kernels[name].gather(y, x, slots, arguments, 1.0, 1)
            seconds += time.perf_counter() - began
        return seconds

    cases = ("in L2", "in L3", "in memory")
    times = {(case, name): [] for case in cases for name in kernels}
    outputs = {}
    for repeat in range(args.repeat):
        for case in cases:
            names = list(kernels)
            for name in names[repeat % 2:] + names[:repeat % 2]:  # each first in turn
                if case == "in L3":
                    step(name, start.clone())
                elif case == "in memory":
                    flush.add_(1)
                y = start.clone()
                times[case, name].append(step(name, y, twice=case == "in L2"))
                outputs[name] = y
    same = all(torch.equal(outputs["now"], y) for y in outputs.values())
    rows = []
    for case in cases:
        now, before = (statistics.median(times[case, n]) * 1e3 for n in kernels)
        rows.append({"rows": case, "adapters": args.adapters, "now ms": now,
                     f"{args.before} ms": before, "now / before": now / before})
    print(f"the kernel's call for a decode step of {TOKENS} tokens, q/v of {LAYERS} layers, "
          f"int8 rows, bf16 activations, one thread; the same bits: {same}")
    print(table(rows, list(rows[0])))
    save("kernel_step", {"command": " ".join(sys.argv), "same bits": same, "rows": rows})


if __name__ == "__main__":
    main()
