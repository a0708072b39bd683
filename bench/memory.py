"""The server's memory over a long life: cycling thousands of distinct adapters.

Run: .venv/bin/python bench/memory.py [--adapters 10000] [--batch 64] [--every 320]
                                      [--variants before,zoo,vllm-lora-info]

`zoo serve --multi-lora` with its defaults (int8 base; since 2026-12-01 256 adapters a
batch and 512 kept loaded on the CPU, 64 and 256 when the curve in the docs was measured)
on a home whose catalog holds --adapters rank-8 q/v LoRAs (bf16 files: vLLM holds them in
the model's dtype whichever the file's). Requests of 4 tokens go to --batch distinct
adapters at a time, each adapter used once, in order, so that every request after the
first adapters kept loaded makes vLLM evict one and load another. Every
--every adapters the resident anonymous memory (RssAnon) of each process of the server
is read:
`zoo serve` itself (the supervisor), vLLM's API server, its engine core and its worker.
Flat means: the last reading within 5% of the reading after the warm-up (twice the
adapters kept loaded), for every process and for their sum.

--variants runs one server after another on the same catalog, each through every adapter
and each from the same state (the copies of the adapters rescaled for the int8 base,
which the API server makes on an adapter's first use, removed before each): `zoo`
(zoo serve's defaults), `vllm-lora-info` (the same with ZOO_LORA_INFO=0: vLLM's own
vllm:lora_requests_info gauge, which keeps a series for every set of adapters it ever
reported) and `before` (zoo serve of commit --before, from a git worktree of it: the
adapters read through safetensors' mmap reader). The catalog is kept between runs
(ZOO_BENCH_HOME's sibling zoo-bench-memory; about 0.9 MB an adapter, as much again for
the rescaled copies).

Results go to bench/results/memory.json and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BASE, bench_home, previous_zoo_env, save, scratch_home, table, write_random_lora

CHUNK = 500  # adapters written and registered at a time (zoo add copies them into the home)


def catalog(home: Path, count: int, log) -> list[str]:
    """``count`` distinct rank-8 q/v LoRAs registered as mem/aNNNNN (those missing)."""
    import torch

    from zoo.catalog.bulk import add_many
    from zoo.catalog.registry import Registry

    registry = Registry(home)
    names = [f"mem/a{i:05d}" for i in range(count)]
    have = {a.name for a in registry.load().adapters()}
    base_dir = home / "bases" / BASE
    incoming = home.parent / "memory-incoming"
    started = time.perf_counter()
    for first in range(0, count, CHUNK):
        missing = [i for i in range(first, min(first + CHUNK, count)) if names[i] not in have]
        if not missing:
            continue
        shutil.rmtree(incoming, ignore_errors=True)
        for i in missing:
            write_random_lora(incoming / f"a{i:05d}", base_dir, seed=i,
                              targets=("q_proj", "v_proj"), scale=0.05, dtype=torch.bfloat16)
        add_many(incoming, BASE, prefix="mem/", registry=registry)
        log(f"catalog: {min(first + CHUNK, count)} of {count} registered "
            f"({time.perf_counter() - started:.0f} s)")
    shutil.rmtree(incoming, ignore_errors=True)
    return names


def anonymous_bytes(pid: int) -> int:
    """A process's resident anonymous memory (RssAnon): what a leak grows. Its file-backed
    pages (libraries, mapped weights) come and go as the page cache is pressed (20 GB of
    adapter files go through it here), so RSS as a whole drops at times without any
    change in the process."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssAnon for process {pid}")


def processes(root_pid: int) -> dict[str, int]:
    """Resident anonymous bytes of the server's processes by role."""
    import psutil

    roles = {}
    root = psutil.Process(root_pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            line = " ".join(proc.cmdline())
            name = proc.name()
            rss = anonymous_bytes(proc.pid)
        except (psutil.Error, OSError):
            continue
        if proc.pid == root_pid:
            role = "zoo serve"
        elif "EngineCore" in name or "EngineCore" in line:
            role = "engine core"
        elif "Worker" in name or "Worker" in line:
            role = "worker"
        elif "api_server" in line or "vllm" in line:
            role = "api server"
        else:
            continue  # vLLM's resource tracker and the like: a few MB
        roles[role] = roles.get(role, 0) + rss
    return roles


async def cycle(url: str, names: list[str], batch: int, every: int, read, log) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    readings, failed, started = [], 0, time.perf_counter()

    async def one(model: str) -> bool:
        try:
            await client.completions.create(model=model, prompt="Hello", max_tokens=4,
                                            temperature=0)
            return True
        except Exception as error:  # noqa: BLE001 - counted, and the first few said
            if failed < 3:
                log(f"failed: {model}: {error}")
            return False

    readings.append({"adapters": 0, "seconds": 0.0, **read()})
    for first in range(0, len(names), batch):
        done = await asyncio.gather(*(one(m) for m in names[first:first + batch]))
        failed += done.count(False)
        used = min(first + batch, len(names))
        if used % every == 0 or used == len(names):
            readings.append({"adapters": used, "seconds": time.perf_counter() - started,
                             "failed": failed, **read()})
            log(f"{used} adapters: " + ", ".join(
                f"{k} {v / 2**20:.0f} MB" for k, v in readings[-1].items()
                if k not in ("adapters", "seconds", "failed")))
    await client.close()
    return readings


def variant_env(variant: str, before: str) -> tuple[dict, Path | None]:
    """The variables a variant's server runs with, and the directory it starts in."""
    if variant == "zoo":
        return {}, None
    if variant == "vllm-lora-info":
        return {"ZOO_LORA_INFO": "0"}, None
    if variant == "before":
        return previous_zoo_env(before)
    raise SystemExit(f"unknown variant {variant}")


def serve_and_cycle(home: Path, names: list[str], env: dict, args, log,
                    cwd: Path | None = None) -> list[dict]:
    from zoo.serve.launch import free_port, stop, wait_healthy

    shutil.rmtree(home / "cache" / "smoothed", ignore_errors=True)
    port = free_port()
    server_log = home.parent / "memory-serve.log"
    argv = [sys.executable, "-m", "zoo", "serve", "--multi-lora", "--base", BASE,
            "--port", str(port)]
    with open(server_log, "wb") as out:
        serving = subprocess.Popen(argv, env={**os.environ, "ZOO_HOME": str(home), **env},
                                   cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", serving, server_log, 1800, "zoo serve")

        def read() -> dict:
            roles = processes(serving.pid)
            return {**roles, "all": sum(roles.values())}

        return asyncio.run(cycle(f"http://127.0.0.1:{port}/v1", names, args.batch, args.every,
                                 read, log))
    finally:
        stop(serving)


def plot(results: dict, out: Path) -> None:
    """Each process's resident memory against the adapters cycled through, per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = ("worker", "api server", "engine core", "zoo serve")
    fig, axes = plt.subplots(1, len(roles), figsize=(12, 3.4))
    for ax, role in zip(axes, roles, strict=True):
        for variant, readings in results.items():
            points = [(r["adapters"], r[role] / 2**20) for r in readings
                      if r["adapters"] > 0 and role in r]
            ax.plot(*zip(*points, strict=True), ".-", label=variant)
        low = min(r[role] for readings in results.values() for r in readings if role in r)
        ax.set_ylim(0.9 * low / 2**20, 1.1 * low / 2**20 * 1.1)
        ax.set_title(role)
        ax.set_xlabel("distinct adapters served")
    axes[0].set_ylabel("resident anonymous MB")
    axes[0].legend()
    fig.suptitle("zoo serve --multi-lora, int8 SmolLM2-135M: 64 new adapters at a time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


DOCS_CURVE_ADAPTERS = 10_000  # the life docs/memory-curve.png shows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=DOCS_CURVE_ADAPTERS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--every", type=int, default=320)
    parser.add_argument("--variants", default="zoo")
    parser.add_argument("--before", default="e26279d", help="the commit `before` runs")
    parser.add_argument("--plot", type=Path, help="only draw docs/memory-curve.png from a "
                                                  "results file of this bench")
    args = parser.parse_args()
    curve = Path(__file__).resolve().parent.parent / "docs" / "memory-curve.png"
    if args.plot:
        plot(json.loads(args.plot.read_text())["readings"], curve)
        return

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    home = bench_home().parent / "zoo-bench-memory"
    if not (home / "registry.json").exists():
        scratch_home(home)
    names = catalog(home, args.adapters, log)
    kept_loaded, rows, results = 256, [], {}
    for variant in args.variants.split(","):
        log(f"{variant}: cycling {len(names)} adapters")
        env, cwd = variant_env(variant, args.before)
        readings = results[variant] = serve_and_cycle(home, names, env, args, log, cwd)
        warm = next(r for r in readings if r["adapters"] >= 2 * kept_loaded)
        last = readings[-1]
        log(f"{variant}: {last['adapters']} adapters in {last['seconds']:.0f} s, "
            f"{last['failed']} failed; warm-up reading at {warm['adapters']} adapters")
        rows += [{"server": variant, "process": role, "after warm-up (MB)": warm[role] / 2**20,
                  "at the end (MB)": last[role] / 2**20, "end / warm": last[role] / warm[role]}
                 for role in last if role not in ("adapters", "seconds", "failed")]
    print(table(rows, ["server", "process", "after warm-up (MB)", "at the end (MB)",
                       "end / warm"]))
    save("memory", {"command": " ".join(sys.argv), "readings": results, "rows": rows})
    if args.adapters >= DOCS_CURVE_ADAPTERS:
        plot(results, curve)
    else:  # a shorter run would replace the long life the docs show
        log(f"docs/memory-curve.png kept (drawn from runs of {DOCS_CURVE_ADAPTERS:,} adapters; "
            f"--plot bench/results/memory.json draws this one)")


if __name__ == "__main__":
    main()
