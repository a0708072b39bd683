"""The LoRA work of one step, alone: zoo's CPU path now, as of an earlier commit, and vLLM's.

Run: .venv/bin/python bench/lora_step.py [--before COMMIT] [--adapters 1,8,32,64,128]
     [--tokens 64] [--prompt 45] [--dtype bfloat16] [--lora-dtype bfloat16]
     [--weights bfloat16] [--repeat 20] [--slots 256] [--placed 1]

Times ``add_lora_linear`` over SmolLM2-135M's 30 layers (q/k/v, o, gate/up and
down, as vLLM's fused LoRA layers call it) for one decode step of max(--tokens, N)
tokens spread evenly over N adapters (once with the same adapters every step, once with the
next N slots' adapters each step, vLLM's ``update_metadata`` included, as continuous
batching brings, and once just after new adapters were written into its N slots, as in
a cold burst's first steps: what the wrapper derives from a slot redone), and for one
prefill of --prompt tokens for each of N adapters (each prompt's tokens together, as vLLM
batches them; the bench's chat prompts are about 45 tokens): rank-8 LoRAs on q and v,
in max(--slots, N) slots
stacked at rank 16, on one thread (vLLM's CPU worker runs one OpenMP thread per core it
owns: one on this 2-core machine). The contenders, in one process, each on equal stacks
made as its server makes them (this tree's in zero_pages' committed stacks, 2 MB pages
where whole ones fit; the others' in plain memory):
zoo's wrapper of this tree, the same file of --before (a git commit) on that commit's
own native kernel (its ``lora_kernel.cpp``, built beside this one's) and vLLM's own
``PunicaWrapperCPU``; with --weights, zoo's wrapper of this tree again on stacks of
another dtype than the activations' (float32 activations on bfloat16 stacks, as
``--lora-dtype bfloat16`` makes them); the base's own linears of the step in the same dtype for scale.
The median of --repeat steps (a quarter of them for prefills) after one warm-up, the
contenders (the base's linears among them) taking turns a step each, so that a slow
minute of the machine falls on all alike (each step then finds the others' data in the
caches, as a served step finds the base's); vLLM's own ops are timed on decode steps
only (a prefill takes them seconds). Results in bench/results/lora_step.json. Unlike the
served curve (bench/serve.py), whose bursts drift by up to 40% on this machine, these
repeat within a few percent.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save, table

LAYERS, HIDDEN, INTERMEDIATE, KV, RANK, MAX_RANK = 30, 576, 1536, 192, 8, 16
# (output slices, input width, which slices the adapters train): SmolLM2's fused layers
CALLS = (((HIDDEN, KV, KV), HIDDEN, (True, False, True)),  # q/k/v
         ((HIDDEN,), HIDDEN, (False,)),  # o
         ((INTERMEDIATE, INTERMEDIATE), HIDDEN, (False, False)),  # gate/up
         ((HIDDEN,), INTERMEDIATE, (False,)))  # down


def at_commit(commit: str, path: str) -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"],
                          capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def wrapper_of(commit: str):
    """zoo/serve/fast_lora.py as it was at ``commit`` (its ``GroupedPunicaWrapperCPU``),
    on that commit's native kernel (lora_kernel.cpp) where it had one."""
    from zoo.serve import native

    scratch = Path(tempfile.mkdtemp())
    module = _loaded(scratch / f"fast_lora_{commit}.py",
                     at_commit(commit, "zoo/serve/fast_lora.py"))
    if at_commit(commit, "zoo/serve/lora_kernel.cpp") is not None and hasattr(module, "native"):
        old = kernel_of(commit)

        class Native:  # the commit's kernel where its fast_lora asks for one
            MAX_RANK = native.MAX_RANK

            @staticmethod
            def kernel():
                return old

        module.native = Native
    return module


def kernel_of(commit: str):
    """``commit``'s native kernel: its lora_kernel.cpp built and loaded by its own
    native.py (whose ctypes layout is that kernel's)."""
    scratch = Path(tempfile.mkdtemp())
    source = scratch / "lora_kernel.cpp"
    source.write_text(at_commit(commit, "zoo/serve/lora_kernel.cpp"))
    own = _loaded(scratch / f"native_{commit}.py", at_commit(commit, "zoo/serve/native.py"))
    return own.Kernel(own.build(source_file=source))


def _loaded(path: Path, text: str):
    """``text`` written to ``path`` and imported from there as a module of its own."""
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stacks(slots: int, dtype, served: bool = False):
    """Every layer's stacks, the trained slices holding random rank-8 adapters in every
    slot. ``served``: made as this tree's server makes them (zero pages, the trained
    slices' committed at start: ``zero_pages``); else plain ``torch.zeros``."""
    import contextlib

    import torch

    from zoo.serve import zero_pages

    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        calls = []
        for slices, width, trained in CALLS:
            with zero_pages.ZeroPageAllocation() if served else contextlib.nullcontext():
                a = tuple(torch.zeros(slots, 1, MAX_RANK, width, dtype=dtype) for _ in slices)
                b = tuple(torch.zeros(slots, 1, size, MAX_RANK, dtype=dtype) for size in slices)
            for i, on in enumerate(trained):
                if on:
                    zero_pages.populate(a[i])
                    zero_pages.populate(b[i])
                    a[i][:, :, :RANK] = torch.randn(slots, 1, RANK, width, generator=g) * 0.05
                    b[i][:, :, :, :RANK] = torch.randn(slots, 1, slices[i], RANK, generator=g)
            calls.append((slices, width, a, b))
        layers.append(calls)
    return layers


def stepper(wrapper_class, layers, adapters: int, tokens: int, slots: int, dtype,
            prefill: bool = False, changing: bool = False, placed: bool = False,
            module=None):
    """A step of ``wrapper_class`` on ``layers`` (its stacks), and what to do, untimed,
    before each (or None). ``changing``: each step brings other adapters than the step
    before (the next ``adapters`` slots of the stacks, in turn), as continuous batching
    does when a request ends or joins; the step then includes vLLM's ``update_metadata``
    for the new mapping. ``placed``: before each step (untimed), new adapters are written
    into the step's slots of the trained slices, each slot marked as zoo's ``reset_lora``
    marks it (with ``module``'s ``_mark_for_redoing``), as in a cold burst's first steps:
    the step then includes redoing what the wrapper derives from those slots (ranks, int8
    rows)."""
    import torch
    from vllm.lora.layers.utils import LoRAMapping

    wrapper = wrapper_class(max_num_batched_tokens=max(tokens, 256), max_batches=slots + 8,
                            device="cpu")
    ids = list(range(1, slots + 1))
    mappings = []
    for window in range(max(2, slots // adapters) if changing else 1):
        first = 1 + window * adapters
        if prefill:  # each request's prompt tokens together
            mapping = [first + i * adapters // tokens for i in range(tokens)]
        else:  # a token per request
            mapping = [first + i % adapters for i in range(tokens)]
        mapping = [(m - 1) % slots + 1 for m in mapping]  # past the last slot: the first
        mappings.append(LoRAMapping(mapping, mapping, is_prefill=prefill))
    # as vLLM's model manager calls it: one more than the slots in the stacks
    wrapper.update_metadata(mappings[0], ids, slots + 1, 49152)
    x = {w: torch.randn(tokens, w, dtype=dtype) for w in (HIDDEN, INTERMEDIATE)}
    y = {sum(s): torch.zeros(tokens, sum(s), dtype=dtype) for s, _w, _t in CALLS}
    steps = [0]

    def step() -> None:
        if changing:
            steps[0] += 1
            wrapper.update_metadata(mappings[steps[0] % len(mappings)], ids, slots + 1, 49152)
        for calls in layers:
            for slices, width, a, b in calls:
                wrapper.add_lora_linear(y[sum(slices)], x[width], a, b, 1.0, slices)

    g = torch.Generator().manual_seed(1)

    def place() -> None:  # new adapters in the step's slots, as vLLM writes them
        for calls in layers:
            for (slices, width, a, b), (_s, _w, trained) in zip(calls, CALLS, strict=True):
                for i in (i for i, on in enumerate(trained) if on):
                    for slot in range(adapters):
                        module._mark_for_redoing(a[i], slot)
                        module._mark_for_redoing(b[i], slot)
                    a[i][:adapters, :, :RANK] = torch.randn(adapters, 1, RANK, width,
                                                            generator=g) * 0.05
                    b[i][:adapters, :, :, :RANK] = torch.randn(adapters, 1, slices[i], RANK,
                                                               generator=g)

    return step, place if placed else None


def base_stepper(tokens: int, dtype):
    """The base's own linears of a step of ``tokens`` rows (nothing to do before it)."""
    import torch

    weights = [[torch.randn(sum(s), w, dtype=dtype) for s, w, _t in CALLS] for _ in range(LAYERS)]
    x = {w: torch.randn(tokens, w, dtype=dtype) for w in (HIDDEN, INTERMEDIATE)}
    calls = [(weight, x[w]) for layer in weights for weight, (_s, w, _t) in zip(layer, CALLS,
                                                                                strict=True)]

    def step() -> None:
        for weight, inputs in calls:
            torch.nn.functional.linear(inputs, weight)

    return step, None


def side_by_side(steppers: dict, repeats: dict) -> dict:
    """Each contender's median ms a step over its ``repeats`` steps, after one untimed
    step each. The contenders take turns, one step each (the order turned every round),
    so that a slow minute of this machine falls on all of them alike."""
    times = {name: [] for name in steppers}
    for step, _before in steppers.values():
        step()
    for round_ in range(max(repeats.values())):
        names = list(steppers)
        names = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in (n for n in names if len(times[n]) < repeats[n]):
            step, before = steppers[name]
            if before:
                before()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(each) for name, each in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="87f89d0")
    parser.add_argument("--adapters", default="1,8,32,64,128")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="activations' (and stacks') dtype")
    parser.add_argument("--lora-dtype", default="",
                        help="every contender's stacks in this dtype (default: --dtype's; "
                             "zoo serve's under float32 activations: bfloat16)")
    parser.add_argument("--weights", default="",
                        help="also time zoo now on stacks of these dtypes (comma-separated)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--slots", type=int, default=256,
                        help="slots in the stacks, at least the adapters (zoo serve's "
                             "default: 256)")
    parser.add_argument("--vllm", type=int, default=1, help="time vLLM's own ops too (slow)")
    parser.add_argument("--placed", type=int, default=1,
                        help="also time a decode step just after its adapters were written "
                             "into their slots, as in a cold burst (0: not)")
    parser.add_argument("--prompt", type=int, default=45,
                        help="also time a prefill of this many tokens an adapter (0: none; "
                             "vLLM's own ops are not timed there)")
    args = parser.parse_args()

    import torch
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from zoo.serve import fast_lora
    from zoo.serve.fast_lora import GroupedPunicaWrapperCPU

    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    stacked = getattr(torch, args.lora_dtype or args.dtype)
    before = wrapper_of(args.before)
    contenders = {"zoo now": GroupedPunicaWrapperCPU,
                  f"zoo {args.before}": before.GroupedPunicaWrapperCPU}
    modules = {"zoo now": fast_lora, f"zoo {args.before}": before}
    weights = {"zoo now": stacked}  # each contender's stacks; the others' in ``stacked``
    for name in filter(None, args.weights.split(",")):
        contenders[f"zoo now, {name} stacks"] = GroupedPunicaWrapperCPU
        weights[f"zoo now, {name} stacks"] = getattr(torch, name)
    if args.vllm:
        contenders["vLLM's own"] = PunicaWrapperCPU
    rows = []
    kinds = [("decode", False, False, False),
             ("decode, other adapters each step", False, True, False)]
    if args.placed:
        kinds.append(("decode, its adapters just placed", False, False, True))
    kinds += [("prefill", True, False, False)] if args.prompt else []
    for kind, prefill, changing, placed in kinds:
        for adapters in (int(a) for a in args.adapters.split(",")):
            slots = max(args.slots, adapters)
            tokens = adapters * args.prompt if prefill else max(args.tokens, adapters)
            repeat = max(3, args.repeat // 4) if prefill else args.repeat
            steppers = {"base linears": base_stepper(tokens, dtype)}
            repeats = {"base linears": repeat}
            for name, cls in contenders.items():  # stacks of their own: caches live on them
                if name == "vLLM's own" and (prefill or placed):
                    continue
                made = stacks(slots, weights.get(name, stacked), served=name.startswith("zoo now"))
                steppers[name] = stepper(cls, made, adapters, tokens, slots, dtype, prefill,
                                         changing, placed, modules.get(name, fast_lora))
                repeats[name] = repeat if name != "vLLM's own" else 3
            timed = side_by_side(steppers, repeats)
            row = {"step": kind, "adapters": adapters, "tokens": tokens, "slots": slots}
            row.update({f"{name} ms": timed.get(name) for name in ("base linears", *contenders)})
            del steppers
            row["before / now"] = row[f"zoo {args.before} ms"] / row["zoo now ms"]
            for name in contenders:
                if name.startswith("zoo now,"):
                    row[f"now / {name.removeprefix('zoo now, ')}"] = \
                        row["zoo now ms"] / row[f"{name} ms"]
            rows.append(row)
            print(f"{kind}, {adapters} adapters: " + ", ".join(
                f"{k} {v:.1f}" for k, v in row.items() if k.endswith("ms") and v is not None),
                file=sys.stderr)
    columns = list(rows[0])
    print(f"\none step's LoRA work (decode: a token per request; prefill: {args.prompt} an "
          f"adapter), {args.dtype}, one thread")
    print(table(rows, columns))
    save("lora_step", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
