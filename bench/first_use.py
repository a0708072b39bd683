"""An adapter's first use in vLLM's worker: loading it and placing it in a slot, per adapter.

Run: .venv/bin/python bench/first_use.py [--previous COMMIT] [--rounds 6] [--per-round 50]

A cold burst of 64 adapters waits for each one's load and placement, one after another on
the core that runs every step (vLLM's CPU worker owns one core here): that time, per
adapter, is measured here alone, without the HTTP server, the scheduler or the steps. One
vLLM engine per variant, in its own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the
worker in that process), on `zoo serve`'s defaults (the int8 base, its smoothing, the slots
and kept-loaded adapters zoo's plan chooses, the zoo plugin's patches): this tree's zoo and
--previous's (a git commit, from its worktree). Each round hands both engines adapters none
has seen, one after another through the worker's own ``add_adapter`` (as the engine core's
``add_lora`` does): first while slots are free (fresh, never-written slots), then with
every slot taken (each adapter evicts one), alternately, so both see this machine's drift
(up to 40% between minutes). Each adapter's time is split into vLLM's steps: reading it
(``_load_adapter``), packing it (``_create_merged_loras_inplace``), placing it
(``activate_adapter``, of which the slot resets). Medians over rounds; results in
bench/results/first_use.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

PHASES = ("total", "read", "pack", "place", "reset")
MARK = "first_use:"  # the engine's answers, among whatever vLLM prints


def engine_main(spec: dict) -> None:
    """One variant's engine (``spec``: common.engine_plan's): answers ``start count`` lines
    on stdin with one JSON line of per-adapter milliseconds for adapters ``start ..
    start+count`` of the catalog."""
    import collections
    import functools
    import time

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["ZOO_SERVE_MODEL_DIR"] = spec["llm"]["model"]  # the smoothed base's rescale
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    catalog = spec["catalog"]
    names = sorted(os.listdir(catalog))
    llm = LLM(**spec["llm"], kv_cache_memory_bytes=1 << 30, enforce_eager=True)

    def add(worker, start: int, count: int) -> dict:
        from vllm.lora import model_manager, worker_manager
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

        spent = collections.Counter()
        if not hasattr(worker, "_bench_spent"):
            def timed(owner, name, phase):
                original = getattr(owner, name)

                @functools.wraps(original)
                def wrapper(*args, **kwargs):
                    started = time.perf_counter()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        worker._bench_spent[phase] += time.perf_counter() - started
                setattr(owner, name, wrapper)
            timed(worker_manager.WorkerLoRAManager, "_load_adapter", "read")
            timed(model_manager.LoRAModelManager, "_create_merged_loras_inplace", "pack")
            timed(model_manager.LoRAModelManager, "activate_adapter", "place")
            timed(BaseLinearLayerWithLoRA, "reset_lora", "reset")  # the linear layers'
        worker._bench_spent = spent
        manager = worker.model_runner.lora_manager
        total = []
        for i in range(start, start + count):
            request = LoRARequest(names[i], i + 1, os.path.join(catalog, names[i]))
            started = time.perf_counter()
            manager.add_adapter(request)
            total.append(time.perf_counter() - started)
        return {"total": statistics.median(total) * 1e3,
                **{phase: spent[phase] / count * 1e3 for phase in PHASES[1:]}}

    import zoo

    print(MARK, "ready", zoo.__file__, flush=True)
    for line in sys.stdin:
        start, count = map(int, line.split())
        print(MARK, json.dumps(llm.collective_rpc(add, args=(start, count))[0]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--previous", default="64d16e9")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return engine_main(json.loads(args.engine))

    # here, not at the top: common puts this repository first on sys.path, and an engine
    # of --previous must import zoo from that commit's worktree
    from common import answer, engine_plan, engines_of, save, table

    plan, adapters, engine_args = engine_plan()
    count = len(os.listdir(adapters))
    fresh_rounds = plan.max_loras // args.per_round  # rounds while free slots remain
    needed = plan.max_loras + (args.rounds + 1) * args.per_round
    if needed > count:
        raise SystemExit(f"{needed} adapters needed, the catalog has {count}")
    with engines_of("first_use.py", engine_args, args.previous, MARK) as engines:
        def ask(process, start: int) -> dict:
            process.stdin.write(f"{start} {args.per_round}\n")
            process.stdin.flush()
            return json.loads(answer(process, MARK))

        results = {label: {"fresh": [], "evicting": []} for label in engines}
        start = 0
        for round_number in range(fresh_rounds + args.rounds):
            state = "fresh" if round_number < fresh_rounds else "evicting"
            order = list(engines) if round_number % 2 == 0 else list(reversed(engines))
            for label in order:
                results[label][state].append(ask(engines[label], start))
            start += args.per_round
            if round_number == fresh_rounds - 1:  # the slots' last free places, untimed
                for process in engines.values():
                    process.stdin.write(f"{start} {plan.max_loras - start}\n")
                    process.stdin.flush()
                    answer(process, MARK)
                start = plan.max_loras

    rows = []
    for state in ("fresh", "evicting"):
        for label in engines:
            runs = results[label][state]
            rows.append({"variant": label, "slots": state, **{
                f"{phase} ms": statistics.median(r[phase] for r in runs) for phase in PHASES}})
    for state in ("fresh", "evicting"):
        mine, theirs = (r for r in rows if r["slots"] == state)
        mine["vs previous"] = mine["total ms"] / theirs["total ms"]
    print(table(rows, ["variant", "slots", *(f"{p} ms" for p in PHASES), "vs previous"]))
    save("first_use", {"command": " ".join(sys.argv), "rows": rows,
                       "per_round": args.per_round, "rounds": args.rounds,
                       "max_loras": plan.max_loras, "max_cpu_loras": plan.max_cpu_loras})


if __name__ == "__main__":
    main()
