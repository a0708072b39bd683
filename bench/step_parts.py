"""Where a served step's time goes, on the base, on 64 adapters never used and on the same
64 again: the base's linear layers, zoo's LoRA work and the rest, step by step.

Run: .venv/bin/python bench/step_parts.py [--rounds 4] [--start 0] [--fill 0]
                                          [--previous COMMIT --engines 2]
                                          [--lora-targets all|catalog]

bench/rounds.py times whole bursts, and on this kind of machine a burst on the base takes
3.1 s one minute and 6 s the next: a percent of the adapters' cost hides in that. Here
one ``zoo serve`` (its defaults, the benchmarks' home and its catalog of 1,000 rank-8 q/v
LoRAs) runs with ``ZOO_STEP_TIMES`` (``zoo/serve/step_times.py``), so its worker writes
each step's seconds, the seconds in the base's linear layers and those in zoo's LoRA
wrapper. After a warm-up it runs --rounds rounds of three bursts of 64 requests x 32
tokens: the base, 64 adapters it has never loaded (cold, from the catalog's adapter
--start on), the same 64 again (warm). With --fill N, N more adapters are used once
(bursts of 64, a token each) before the rounds: with N at least the engine's slots (256
by default), every cold burst's adapters evict others, as in a server that has run a
while (the slots of a young one are free). A step belongs to the burst it started in. For
each kind of burst, medians over its bursts: the burst's seconds; how long after the
burst began its first step started (a cold burst's loads come before it); where it
loaded adapters (a tree with the load timers), how long after it began its last load
ended, and the seconds of the engine core's loads (reading every other adapter and
sending it, sending the others' paths), of its waits in them for the worker to answer an
earlier load, of its reads, and of the worker's loads, each summed over the burst (the
core's and the worker's run at once); and over its
decode steps (a token for every request) the step, its linear layers, its LoRA work and
the part of it outside the native kernel's call (the wrapper's Python), the rest, and
the LoRA work's share of the step, measured within each step, so that the
minute's speed falls on both alike; and the prefill steps' LoRA seconds a burst. With
--previous, --engines engines alternate between this tree and that commit (one that has
the step timers: 03149de or later), each on its own part of the catalog, and each path
gets its rows: a change to the LoRA path's Python, which a hot loop of steps
(bench/lora_step.py) does not see, shows in "of it Python". Results go to
bench/results/step_parts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import log, save, table
from serve import base_cold_warm, burst, engine_url, served_catalog

REQUESTS = 64
TOKENS = 32
STATES = ("base", "cold", "warm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds an engine")
    parser.add_argument("--start", type=int, default=0,
                        help="the catalog's first adapter to use (another run: another part)")
    parser.add_argument("--previous", help="a commit to compare with (one that has the step "
                        "timers), its engines alternating with this tree's")
    parser.add_argument("--engines", type=int, default=2,
                        help="with --previous: engines in all, alternating")
    parser.add_argument("--fill", type=int, default=0,
                        help="adapters each engine uses once before the rounds (at least "
                        "its slots: every cold adapter evicts one)")
    parser.add_argument("--lora-targets", default="all", choices=("all", "catalog"),
                        help="this tree's engines' zoo serve --lora-targets")
    args = parser.parse_args()

    from zoo.serve import step_times

    home, registry, names = served_catalog()
    paths = [("zoo", "previous")[i % 2] for i in range(args.engines)] if args.previous \
        else ["zoo"]
    needed = args.fill + 8 + args.rounds * REQUESTS
    if args.start + needed * len(paths) > len(names):
        raise SystemExit(f"--rounds {args.rounds} from --start {args.start} needs "
                         f"{needed} adapters an engine, {len(paths)} engines, of the "
                         f"catalog's {len(names)}")

    scratch = Path(tempfile.mkdtemp(prefix="zoo-step-times-"))
    bursts = []  # (path, state, start, seconds)
    steps = {path: [] for path in paths}
    loads = {path: [] for path in paths}
    for index, path in enumerate(paths):
        prefix = scratch / f"engine{index}"
        adapters = names[args.start + index * needed:args.start + (index + 1) * needed]
        os.environ[step_times.VARIABLE] = str(prefix)
        try:
            with engine_url(path, args.previous, home, registry, args.lora_targets) as url:
                for first in range(0, args.fill, REQUESTS):
                    chunk = adapters[first:min(first + REQUESTS, args.fill)]
                    asyncio.run(burst(url, chunk, 1, len(chunk)))
                if args.fill:
                    log(f"{path} engine {index}: {args.fill} adapters used once first")
                for number, state, started, took in base_cold_warm(
                        url, adapters[args.fill:], args.rounds, REQUESTS, TOKENS):
                    bursts.append((path, state, started, took))
                    log(f"{path} engine {index} round {number} {state}: {took:.2f} s")
        finally:
            os.environ.pop(step_times.VARIABLE, None)
        files = list(scratch.glob(f"engine{index}.*"))
        if not files:
            raise SystemExit(f"{path}'s worker wrote no step times: "
                             f"{args.previous if path == 'previous' else 'this tree'} has "
                             "no step timers")
        steps[path] += [s for f in files for s in step_times.read(f)]
        loads[path] += [load for f in scratch.glob(f"engine{index}-loads.*")
                        for load in step_times.read_loads(f)]

    within = lambda b, events: [e for e in events if b[2] <= e.start < b[2] + b[3]]  # noqa: E731
    rows = [summarize(path, state, [(b, within(b, steps[path]), within(b, loads[path]))
                                    for b in bursts if b[:2] == (path, state)])
            for path in dict.fromkeys(paths) for state in STATES]
    columns = ["lora path", "burst", "bursts", "burst s", "loads done after s",
               "core loads s", "of it waits s", "of it reads s", "worker loads s",
               "first step after s",
               "decode steps", "decode step ms", "linear ms", "LoRA ms", "of it Python ms",
               "rest ms", "LoRA share", "prefill LoRA ms a burst"]
    print(table(rows, columns))
    for row in rows:
        if row["burst"] != "base":
            print(f"{row['lora path']}, {row['burst']}: a decode step's LoRA work "
                  f"{row['LoRA ms']:.2f} ms ({row['of it Python ms']:.2f} ms of it Python), "
                  f"{100 * row['LoRA share']:.1f}% of the step")
    save("step_parts", {"command": " ".join(sys.argv), "previous": args.previous,
                        "rows": rows, "bursts": [{"lora path": b[0], "burst": b[1],
                                                  "seconds": b[3]} for b in bursts]})


def summarize(path: str, state: str, bursts: list) -> dict:
    """One kind of burst's medians: its bursts' seconds and first steps; where it loaded
    adapters, how long after it began its last load ended and the seconds of the engine
    core's loads, of its waits and its own reads in them and of the worker's loads; its
    decode steps' parts (a decode step gives every request one token)."""
    decode = [s for _b, steps, _loads in bursts for s in steps if s.tokens == s.requests]
    ms = lambda values: 1000 * statistics.median(values)  # noqa: E731
    loading = [(b, loads) for b, _steps, loads in bursts if loads]
    seconds = lambda kind: statistics.median(  # noqa: E731
        sum(load.seconds for load in loads if load.kind == kind) for _b, loads in loading)
    return {
        "lora path": path, "burst": state, "bursts": len(bursts),
        "burst s": statistics.median(b[3] for b, _steps, _loads in bursts),
        "loads done after s": statistics.median(max(load.end for load in loads) - b[2]
                                                for b, loads in loading) if loading else None,
        "core loads s": seconds("begin") if loading else None,
        "of it waits s": seconds("wait") if loading else None,
        "of it reads s": seconds("read") if loading else None,
        "worker loads s": seconds("add_lora") if loading else None,
        "first step after s": statistics.median(steps[0].start - b[2]
                                                for b, steps, _loads in bursts if steps),
        "decode steps": len(decode),
        "decode step ms": ms(s.seconds for s in decode),
        "linear ms": ms(s.linear for s in decode),
        "LoRA ms": ms(s.lora for s in decode),
        "of it Python ms": ms(s.lora - s.native for s in decode),
        "rest ms": ms(s.rest for s in decode),
        "LoRA share": statistics.median(s.lora / s.seconds for s in decode),
        "prefill LoRA ms a burst": ms(sum(s.lora for s in steps if s.tokens > s.requests)
                                      for _b, steps, _loads in bursts),
    }


if __name__ == "__main__":
    main()
