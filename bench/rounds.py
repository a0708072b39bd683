"""Cold and warm 64-adapter bursts against the base, many rounds, this tree against an
earlier commit, engines alternating.

Run: .venv/bin/python bench/rounds.py --previous REV [--engines 4] [--rounds 6]

bench/serve.py's curve takes the median of five pairs a point, one engine a path: a
change of a few hundredths in the cold ratio hides in its spread (engines of one code
differ by as much). Here each of --engines engines (this tree's ``zoo serve`` and REV's,
in turn, each with its defaults on the benchmarks' home and its catalog of 1,000 rank-8
q/v LoRAs) warms up (a burst on the base, one on 8 adapters) and then runs --rounds
rounds of three bursts of 64 requests x 32 tokens: the base, 64 adapters it has never
loaded (cold), the same 64 again (warm). Each round's ratios are the base burst's
seconds over the adapters' burst's; the result is each path's median ratio over all its
rounds, with the interval that holds the true median with 95% confidence (the sign
test's: two of the rounds' ratios; it takes rounds as independent, which engines of one
code only approximate), and its median seconds of a cold burst beyond its round's base
burst. "Fastest" is the ratio of its fastest base burst to its fastest cold (warm)
burst: another machine's work only ever slows a burst down, so the fastest bursts are
the ones least disturbed. One engine uses the catalog's first half, the next its second,
and so on: no engine finds the files the one before it read still in the page cache
(this VM reclaims an idle page cache within a minute or two; then a file is read from
disk, the same for either path).

Results go to bench/results/rounds.json. ``--pool FILE...`` runs nothing and prints the
summary of earlier runs' results files (copies of rounds.json) taken together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import log, median_interval, save, table
from serve import base_cold_warm, engine_url, served_catalog

REQUESTS = 64
TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", help="the commit to compare with")
    parser.add_argument("--engines", type=int, default=4, help="engines in all, alternating")
    parser.add_argument("--rounds", type=int, default=6, help="rounds an engine")
    parser.add_argument("--pool", nargs="+", metavar="RESULTS",
                        help="run nothing: summarize these results files' rounds together")
    args = parser.parse_args()
    if args.pool:
        return pool(args.pool)
    if not args.previous:
        parser.error("--previous is required (unless --pool)")

    home, registry, names = served_catalog()
    per_engine = 8 + args.rounds * REQUESTS
    if 2 * per_engine > len(names):
        raise SystemExit(f"--rounds {args.rounds}: an engine needs {per_engine} adapters, "
                         f"two of them {2 * per_engine} (the catalog has {len(names)})")

    rounds = []
    for index in range(args.engines):
        path = ("zoo", "previous")[index % 2]
        # one engine reads the catalog's first half, the next its second: an engine never
        # finds the files the engine before it read still in the page cache
        start = index % 2 * (len(names) // 2)
        adapters = names[start:start + per_engine]
        with engine_url(path, args.previous, home, registry) as url:
            seconds = {}
            for number, state, _started, took in base_cold_warm(url, adapters, args.rounds,
                                                                 REQUESTS, TOKENS):
                seconds[state] = took
                if state != "warm":
                    continue
                rounds.append({"lora path": path, "engine": index, "round": number,
                               **{f"{s} s": v for s, v in seconds.items()},
                               "cold": seconds["base"] / seconds["cold"],
                               "warm": seconds["base"] / seconds["warm"]})
                log(f"{path} engine {index} round {number}: base {seconds['base']:.2f} s, "
                    f"cold {rounds[-1]['cold']:.3f}x, warm {rounds[-1]['warm']:.3f}x")

    summary = summarize(rounds, args.previous)
    save("rounds", {"command": " ".join(sys.argv), "previous": args.previous,
                    "summary": summary, "rounds": rounds})


def summarize(rounds: list[dict], previous: str) -> list[dict]:
    """Each path's medians over its rounds, printed, and the table's rows."""
    summary = []
    for path in ("zoo", "previous"):
        mine = [r for r in rounds if r["lora path"] == path]
        cold, warm = [r["cold"] for r in mine], [r["warm"] for r in mine]
        fastest = {state: min(r[f"{state} s"] for r in mine) for state in ("base", "cold", "warm")}
        summary.append({
            "lora path": path, "rounds": len(mine),
            "cold median": statistics.median(cold),
            "cold 95%": "{:.3f}-{:.3f}".format(*median_interval(cold)),
            "warm median": statistics.median(warm),
            "warm 95%": "{:.3f}-{:.3f}".format(*median_interval(warm)),
            "cold fastest": fastest["base"] / fastest["cold"],
            "warm fastest": fastest["base"] / fastest["warm"],
            "cold - base s": statistics.median(r["cold s"] - r["base s"] for r in mine),
            "base s": statistics.median(r["base s"] for r in mine)})
    print(table(summary, ["lora path", "rounds", "cold median", "cold 95%", "warm median",
                          "warm 95%", "cold fastest", "warm fastest", "cold - base s",
                          "base s"]))
    zoo, before = summary
    print(f"cold: {zoo['cold median'] - before['cold median']:+.3f} against {previous}, "
          f"warm: {zoo['warm median'] - before['warm median']:+.3f}")
    return summary


def pool(files: list[str]) -> None:
    """The summary of earlier runs' rounds taken together (their results files; each
    against the same commit)."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    previous = {run["previous"] for run in runs}
    if len(previous) != 1:
        raise SystemExit(f"--pool: the runs compare with different commits: {sorted(previous)}")
    summarize([r for run in runs for r in run["rounds"]], previous.pop())

if __name__ == "__main__":
    main()
