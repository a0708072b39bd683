"""Adapter versions served live: how soon a promotion answers, and what a canary costs.

Run: .venv/bin/python bench/versions.py [--rounds 10] [--requests 64] [--tokens 32]

One engine with zoo serve's defaults (the int8 base), one adapter name with two versions
(rank-8 q/v LoRAs):

* promote -> first answer: `promote()` (the library call `zoo promote --force` makes)
  flips the current version; requests are then sent one after another until one is
  answered by the new version (the response's x-zoo-model header): the time from the
  promotion returning to that answer, over --rounds promotions back and forth;
* throughput with and without a canary: --requests concurrent requests x --tokens tokens
  for the name, each from its own end user, with no canary and with 10% of users on a
  canary, alternated --loads times in the same run: output tokens/s (median) and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
import urllib.request

from common import BASE, bench_home, save, scratch_home, table, write_random_lora


def ask(url: str, model: str, user: str) -> str:
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1, "user": user}).encode()
    request = urllib.request.Request(url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        response.read()
        return response.headers["x-zoo-model"]


async def load(url: str, requests: int, tokens: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)

    async def one(i: int) -> int:
        reply = await client.completions.create(
            model="bench/x", prompt="Write a short story about a lighthouse keeper.",
            max_tokens=tokens, temperature=0, user=f"user-{i}",
            extra_body={"min_tokens": tokens, "ignore_eos": True})
        return reply.usage.completion_tokens

    start = time.perf_counter()
    done = await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - start
    await client.close()
    return sum(done) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--loads", type=int, default=4,
                        help="loads of each setting, alternated")
    args = parser.parse_args()
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add
    from zoo.catalog.versions import end_canary, promote
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = scratch_home(bench_home().parent / "zoo-bench-versions")
    registry = Registry(home)
    for version in (1, 2):
        lora = write_random_lora(home / "src" / f"v{version}", home / "bases" / BASE, seed=version,
                                 targets=("q_proj", "v_proj"))
        add(lora, "bench/x", BASE, registry=registry, new_version=version > 1)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    with running_server(ServeOptions(base=BASE, port=free_port()), registry, log=log) as server:
        ask(server.url, "bench/x:v1", "warm")
        ask(server.url, "bench/x:v2", "warm")
        latencies, asked = [], []
        for i in range(args.rounds):
            target = "bench/x:v2" if i % 2 == 0 else "bench/x:v1"
            promote(registry, target)
            returned = time.perf_counter()
            n = 0
            while True:
                n += 1
                if ask(server.url, "bench/x", f"probe-{i}-{n}") == target:
                    break
            latencies.append(time.perf_counter() - returned)
            asked.append(n)
        rates = {"no canary": [], "10% canary": []}
        for _ in range(args.loads):
            for setting in rates:
                if setting == "10% canary":
                    current = registry.load().adapter("bench/x").version
                    promote(registry, f"bench/x:v{3 - current}", canary=10)
                rates[setting].append(asyncio.run(load(server.url, args.requests, args.tokens)))
                if setting == "10% canary":
                    end_canary(registry, "bench/x")
    shutil.rmtree(home, ignore_errors=True)
    rows = [{"measure": "promote -> first answer by the new version, p50 (s)",
             "value": statistics.median(latencies)},
            {"measure": "promote -> first answer by the new version, max (s)",
             "value": max(latencies)},
            {"measure": "requests until the new version answered, max", "value": max(asked)}]
    plain, canary = (statistics.median(rates[k]) for k in ("no canary", "10% canary"))
    rows += [{"measure": f"{args.requests} x {args.tokens} tokens, no canary (tok/s)",
              "value": plain},
             {"measure": f"{args.requests} x {args.tokens} tokens, 10% canary (tok/s)",
              "value": canary},
             {"measure": "canary / no canary", "value": canary / plain}]
    print(table(rows, ["measure", "value"]))
    save("versions", {"command": " ".join(sys.argv), "rows": rows, "latencies": latencies,
                      "rates": rates})


if __name__ == "__main__":
    main()
