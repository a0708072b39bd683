"""Where a warm burst's extra time goes, process by process: CPU seconds of each of the
server's processes (and its busiest threads) during base bursts and warm adapters' bursts.

Run: .venv/bin/python bench/cpu_split.py [--rounds 6] [--adapters 64]

One ``zoo serve`` with its defaults on the benchmarks' home and its catalog of 1,000
rank-8 q/v LoRAs; after a warm-up, --rounds rounds of a burst on the base and a burst on
--adapters adapters it has already loaded (64 requests x 32 tokens each, as
bench/serve.py's points). For each burst, the CPU seconds (user + system, from
``/proc/PID/task/TID/stat``) of every process under the server and of each thread that
used more than a tenth of a second: what the API server, the engine core and the worker
each spend on the adapters' burst beyond the base's, next to the burst's wall seconds.
Medians over rounds. Results go to bench/results/cpu_split.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

from common import BASE, log, save, table
from serve import burst, served_catalog

REQUESTS = 64
TOKENS = 32
TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        found.append(parent)
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = Path(f"/proc/{parent}/task/{task.name}/children")
            todo += [int(c) for c in children.read_text().split()] if children.exists() else []
    return found


def process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def thread_times(pids: list[int]) -> dict[tuple[int, str, str], float]:
    """CPU seconds of each thread: {(pid, process name, thread name): seconds}."""
    times = {}
    for pid in pids:
        name = process_name(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            thread = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            times[(pid, name, f"{thread}/{task.name}")] = (int(fields[11]) + int(fields[12])) / TICK
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=64)
    args = parser.parse_args()

    from zoo.serve.launch import ServeOptions, free_port, running_server

    _home, registry, names = served_catalog()
    adapters = [names[i % args.adapters] for i in range(REQUESTS)]
    rows: dict[str, list[dict]] = {"base": [], "warm": []}
    with running_server(ServeOptions(base=BASE, port=free_port()), registry, log=log) as server:
        url = server.url
        asyncio.run(burst(url, [BASE] * REQUESTS, TOKENS, REQUESTS))
        asyncio.run(burst(url, adapters, TOKENS, REQUESTS))  # loads them: warm from here
        asyncio.run(burst(url, adapters, TOKENS, REQUESTS))
        pids = descendants(server.process.pid)
        names_of = {p: f"{process_name(p)} ({p})" for p in pids}
        log("processes: " + ", ".join(names_of.values()))
        for number in range(args.rounds):
            for state, models in (("base", [BASE] * REQUESTS), ("warm", adapters)):
                before = thread_times(pids)
                result = asyncio.run(burst(url, models, TOKENS, REQUESTS))
                after = thread_times(pids)
                used = {k: after[k] - before.get(k, 0.0) for k in after}
                rows[state].append({"seconds": result["seconds"], "threads": used})
            log(f"round {number}: base {rows['base'][-1]['seconds']:.2f} s, warm "
                f"{rows['warm'][-1]['seconds']:.2f} s")

    def median_of(state: str, pick) -> float:
        return statistics.median(pick(r) for r in rows[state])

    def process_total(pid: int):
        return lambda r: sum(v for k, v in r["threads"].items() if k[0] == pid)

    lines = [{"what": "wall seconds of the burst",
              "base": median_of("base", lambda r: r["seconds"]),
              "warm": median_of("warm", lambda r: r["seconds"])}]
    for pid in pids:
        lines.append({"what": f"{names_of[pid]} CPU s",
                      "base": median_of("base", process_total(pid)),
                      "warm": median_of("warm", process_total(pid))})
    threads = sorted({k for r in rows["warm"] + rows["base"] for k in r["threads"]})
    for key in threads:
        base, warm = (median_of(state, lambda r, k=key: r["threads"].get(k, 0.0))
                      for state in ("base", "warm"))
        if max(base, warm) > 0.1:
            lines.append({"what": f"  thread {key[2]} of {key[1]}", "base": base, "warm": warm})
    for line in lines:
        line["warm - base"] = line["warm"] - line["base"]
        line["warm / base"] = line["warm"] / line["base"] if line["base"] else float("nan")
    print(table(lines, ["what", "base", "warm", "warm - base", "warm / base"]))
    save("cpu_split", {"command": " ".join(sys.argv), "summary": lines,
                       "rounds": [{"state": s, "seconds": r["seconds"],
                                   "threads": {"/".join(map(str, k)): v
                                               for k, v in r["threads"].items()}}
                                  for s in rows for r in rows[s]]})


if __name__ == "__main__":
    main()
