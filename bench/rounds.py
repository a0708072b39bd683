"""Cold and warm 64-adapter bursts against the base, many rounds, this tree against an
earlier commit, engines alternating.

Run: .venv/bin/python bench/rounds.py --previous REV [--engines 4] [--rounds 6]

bench/serve.py's curve takes the median of five pairs a point, one engine a path: a
change of a few hundredths in the cold ratio hides in its spread (engines of one code
differ by as much). Here each of --engines engines (this tree's ``zoo serve`` and
REV's, in turn, each with its defaults on the benchmarks' home and its catalog of 1,000
rank-8 q/v LoRAs) warms up (a burst on the base, one on 8 adapters) and then runs
--rounds rounds of three bursts of 64 requests x 32 tokens: the base, 64 adapters it
has never loaded (cold), the same 64 again (warm). Each round's ratios are the base
burst's seconds over the adapters' burst's; the result is each path's median ratio
over all its rounds, and its median seconds of a cold burst beyond its round's base
burst. One engine uses the catalog's first half, the next its second, and so on: no
engine finds the files the one before it read still in the page cache (this VM
reclaims an idle page cache within a minute or two; then a file is read from disk, the
same for either path).

Results go to bench/results/rounds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import contextmanager

from common import BASE, bench_home, save, table
from serve import burst, catalog, previous_zoo

REQUESTS = 64
TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", required=True, help="the commit to compare with")
    parser.add_argument("--engines", type=int, default=4, help="engines in all, alternating")
    parser.add_argument("--rounds", type=int, default=6, help="rounds an engine")
    args = parser.parse_args()

    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, free_port, running_server

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    home = bench_home()
    registry = Registry(home)
    names, _ = catalog(home, registry, 1000, log)
    per_engine = 8 + args.rounds * REQUESTS
    if 2 * per_engine > len(names):
        raise SystemExit(f"--rounds {args.rounds}: an engine needs {per_engine} adapters, "
                         f"two of them {2 * per_engine} (the catalog has {len(names)})")

    @contextmanager
    def engine(path: str):
        if path == "previous":
            with previous_zoo(args.previous, home, log) as url:
                yield url
            return
        with running_server(ServeOptions(base=BASE, port=free_port()), registry,
                            log=log) as server:
            yield server.url

    rounds = []
    for index in range(args.engines):
        path = ("zoo", "previous")[index % 2]
        # one engine reads the catalog's first half, the next its second: an engine never
        # finds the files the engine before it read still in the page cache
        start = index % 2 * (len(names) // 2)
        adapters = names[start:start + per_engine]
        with engine(path) as url:
            asyncio.run(burst(url, [BASE] * REQUESTS, TOKENS, REQUESTS))
            asyncio.run(burst(url, [adapters[i % 8] for i in range(REQUESTS)], TOKENS,
                              REQUESTS))
            for number in range(args.rounds):
                chosen = adapters[8 + number * REQUESTS:8 + (number + 1) * REQUESTS]
                seconds = {}
                for state, models in (("base", [BASE] * REQUESTS), ("cold", chosen),
                                      ("warm", chosen)):
                    started = time.perf_counter()
                    asyncio.run(burst(url, models, TOKENS, REQUESTS))
                    seconds[state] = time.perf_counter() - started
                rounds.append({"lora path": path, "engine": index, "round": number,
                               **{f"{s} s": v for s, v in seconds.items()},
                               "cold": seconds["base"] / seconds["cold"],
                               "warm": seconds["base"] / seconds["warm"]})
                log(f"{path} engine {index} round {number}: base {seconds['base']:.2f} s, "
                    f"cold {rounds[-1]['cold']:.3f}x, warm {rounds[-1]['warm']:.3f}x")

    summary = []
    for path in ("zoo", "previous"):
        mine = [r for r in rounds if r["lora path"] == path]
        summary.append({
            "lora path": path, "rounds": len(mine),
            "cold median": statistics.median(r["cold"] for r in mine),
            "warm median": statistics.median(r["warm"] for r in mine),
            "cold - base s": statistics.median(r["cold s"] - r["base s"] for r in mine),
            "base s": statistics.median(r["base s"] for r in mine)})
    print(table(summary, ["lora path", "rounds", "cold median", "warm median",
                          "cold - base s", "base s"]))
    zoo, previous = summary
    print(f"cold: {zoo['cold median'] - previous['cold median']:+.3f} against "
          f"{args.previous}, warm: {zoo['warm median'] - previous['warm median']:+.3f}")
    save("rounds", {"command": " ".join(sys.argv), "previous": args.previous,
                    "summary": summary, "rounds": rounds})


if __name__ == "__main__":
    main()
