"""Where a multi-LoRA decode step spends its time: py-spy on the vLLM worker.

Run: .venv/bin/python bench/profile_lora.py [--adapters 8] [--concurrency 64] [--seconds 20]
                                             [--max-loras N] [--fast 1|0] [--cold]
                                             [--raw FILE] [--process worker|core|api]
                                             [--lora-targets all|catalog]

Starts zoo serve (int8 base) with N rank-8 adapters (q and v unless --targets),
keeps --concurrency requests spread over them running (the base's with --adapters 0),
samples the engine's worker (or, with --process, the engine core or the API server) with
py-spy and prints how busy it was and the functions with the largest share of samples
(inclusive). ``--fast 0`` profiles vLLM's own LoRA path instead of zoo's.
``--cold``: each burst's requests go to the next --concurrency adapters, round the
catalog, so with more adapters than the server keeps loaded (1000 against 512) every
burst loads all of its adapters, as the cold points of bench/serve.py do.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from common import ALL_PROJECTIONS, BASE, bench_home, write_random_lora


def process_pid(root: int, which: str) -> int:
    """The server's API server (the process zoo started, ``root``), engine core (vLLM
    titles it ``...::EngineCore...``) or worker (the process that holds the model: the
    largest resident set)."""
    import psutil

    if which == "api":
        return root
    children = psutil.Process(root).children(recursive=True)
    if which == "core":
        return next(p.pid for p in children if "EngineCore" in " ".join(p.cmdline()))
    return max(children, key=lambda p: p.memory_info().rss).pid


def summarize(raw: Path, top: int) -> tuple[list[tuple[str, float]], int]:
    """The functions with the largest inclusive share of the samples, and how many samples
    there were (py-spy samples a thread only while it runs: at 100 a second, the
    process's busy share of the time)."""
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.split(" (")[-1].split(":")[0].rsplit("/", 2)[-1] if "(" in frame else ""
            key = f"{name} ({where})"
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
    return [(k, 100.0 * v / total) for k, v in inclusive.most_common(top)], total


BASE_WORK = ("apply_weights", "UnquantizedLinearMethod.apply", "onednn")


def by_layer(raw: Path) -> list[tuple[str, float]]:
    """The share of the samples in each LoRA-wrapped layer, by where the model calls it
    (the model's file and line: one per projection) and what the time went to: the base
    layer's GEMM ("base"), the LoRA path (zoo's or vLLM's punica wrapper: "lora"), or the
    wrapper's own Python around them ("wrapper")."""
    shares: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        frames = stack.split(";")
        wrapped = next((i for i, f in enumerate(frames) if "vllm/lora/layers/" in f), None)
        if wrapped is None or wrapped == 0:
            continue
        caller = frames[wrapped - 1]
        caller = next((f for f in reversed(frames[:wrapped]) if "model_executor/models/" in f),
                      caller)
        site = caller.split(" (")[0] + ":" + caller.rsplit(":", 1)[-1].rstrip(")")
        if any(work in f for f in frames for work in BASE_WORK):
            part = "base"
        elif any("fast_lora" in f or "punica" in f for f in frames):
            part = "lora"
        else:
            part = "wrapper"
        shares[f"{site} {part}"] += int(count)
    return [(k, 100.0 * v / total) for k, v in sorted(shares.items())]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-loras", type=int, default=None,
                        help="Adapters per batch (LoRA slots); default: zoo serve's.")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--raw", type=Path, default=None,
                        help="Keep py-spy's raw samples here (default: the bench home).")
    parser.add_argument("--fast", default="1")
    parser.add_argument("--cold", action="store_true",
                        help="Each burst on the next adapters (round the catalog).")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--process", choices=("worker", "core", "api"), default="worker",
                        help="The server's process to sample (default: the worker).")
    parser.add_argument("--lora-targets", default="all",
                        help="zoo serve's --lora-targets (all: its default).")
    parser.add_argument("--targets", default="q_proj,v_proj",
                        help="Projections the random adapters train (all seven: 'all').")
    args = parser.parse_args()
    os.environ["ZOO_FAST_LORA"] = args.fast
    targets = ALL_PROJECTIONS if args.targets == "all" else tuple(args.targets.split(","))
    from serve import burst

    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add, remove
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = bench_home()
    registry = Registry(home)
    for entry in registry.load().adapters(base=BASE):
        if entry.name.startswith("prof/"):
            remove(entry.name, registry=registry)
    names = [f"prof/a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        folder = home / "prof-loras" / name
        shutil.rmtree(folder, ignore_errors=True)
        add(write_random_lora(folder, home / "bases" / BASE, seed=i, targets=targets), name,
            BASE, registry=registry)
    options = ServeOptions(base=BASE, port=free_port(), max_loras=args.max_loras,
                           lora_targets=args.lora_targets)
    with running_server(options, registry) as server:
        concurrency = args.concurrency
        models = ([names[i % len(names)] for i in range(concurrency)] if names
                  else [BASE] * concurrency)
        asyncio.run(burst(server.url, models, 8, concurrency))
        stop = threading.Event()

        def load() -> None:
            start = 0
            while not stop.is_set():
                if args.cold:
                    start += concurrency
                    models[:] = [names[(start + i) % len(names)] for i in range(concurrency)]
                asyncio.run(burst(server.url, models, 32, concurrency))

        thread = threading.Thread(target=load)
        thread.start()
        raw = args.raw or home / "profile.txt"
        pid = process_pid(server.process.pid, args.process)
        subprocess.run(["py-spy", "record", "--pid", str(pid), "--rate", "100",
                        "--duration", str(args.seconds), "--format", "raw", "--output",
                        str(raw), "--nonblocking"], check=True, capture_output=True,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                  f"{os.environ['PATH']}"})
        stop.set()
        thread.join()
    print(f"\n{args.process} samples, {args.adapters} adapters at {concurrency} concurrent requests, "
          f"{'zoo' if args.fast != '0' else 'vLLM'} LoRA path"
          f"{', a cold burst each time' if args.cold else ''} (inclusive share)")
    shares, samples = summarize(raw, args.top)
    print(f"{samples} samples in {args.seconds} s at 100 a second: the process ran "
          f"{samples / args.seconds:.0f}% of the time")
    for name, share in shares:
        print(f"{share:6.1f}%  {name}")
    print("\nby LoRA-wrapped layer (the model's call site) and part")
    for name, share in by_layer(raw):
        print(f"{share:6.2f}%  {name}")


if __name__ == "__main__":
    main()
