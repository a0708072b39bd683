"""Replicas behind vLLM's router on this machine: 1 engine against 2 on the same cores, the
router's own cost per request, and adapter affinity (cold loads, tokens/s).

Run: .venv/bin/python bench/scale.py [--requests 64] [--tokens 32] [--adapters 16]

All on the int8 base with zoo serve's defaults and the serving benchmark's catalog
of rank-8 q/v adapters (bench/serve.py makes it):

* one replica (both cores) behind the router: the base's tokens/s direct to the
  engine and through the router, and the latency of 40 one-token requests each way
  (the router's overhead per request);
* two replicas (one core each) behind the router: the base's tokens/s, and
  --requests concurrent requests spread over --adapters adapters never used before
  (cold) and then again (warm), under round_robin and under consistent_hash with the
  adapter's name as the session key (``X-Session-ID``: affinity), each policy on its
  own set of adapters; adapter loads counted from each replica's /zoo/usage.

Results go to bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import BASE, bench_home, log, save, table

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


async def burst(url: str, models: list[str], tokens: int, affinity: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)

    async def one(model: str) -> int:
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
            extra_body={"min_tokens": tokens, "ignore_eos": True},
            extra_headers={"X-Session-ID": model} if affinity else None)
        return reply.usage.completion_tokens

    start = time.perf_counter()
    produced = await asyncio.gather(*(one(m) for m in models))
    seconds = time.perf_counter() - start
    await client.close()
    return {"tok_per_s": sum(produced) / seconds, "seconds": seconds}


def latency(url: str, count: int = 40) -> float:
    """Mean seconds of a one-token request on the base, one at a time."""
    body = json.dumps({"model": BASE, "max_tokens": 1, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    times = []
    for _ in range(count):
        request = urllib.request.Request(url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
        times.append(time.perf_counter() - start)
    return sum(times[5:]) / len(times[5:])  # the first few warm the connection paths


def served_adapters(replica_url: str) -> set[str]:
    with urllib.request.urlopen(replica_url + "/zoo/usage", timeout=60) as response:
        return {r["model"] for r in json.loads(response.read())["usage"] if r["model"] != BASE}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    args = parser.parse_args()

    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, free_port, stop, wait_healthy
    from zoo.serve.replicas import router_argv, running_fleet

    home = bench_home()
    registry = Registry(home)
    pool = sorted(a.name for a in registry.load().adapters(base=BASE)
                  if a.name.startswith("cat/"))
    if len(pool) < 3 * args.adapters:
        raise SystemExit("run bench/serve.py first: it registers the adapter catalog")
    sets = {"round_robin": pool[-args.adapters:],
            "consistent_hash": pool[-2 * args.adapters:-args.adapters]}

    def load(adapters: list[str]) -> list[str]:
        return [adapters[i % len(adapters)] for i in range(args.requests)]

    rows, overhead = [], {}
    base_load = [BASE] * args.requests
    with running_fleet(ServeOptions(base=BASE, port=free_port()), 1, "round_robin", registry,
                       log=log) as fleet:
        direct = fleet.replicas[0].url + "/v1"
        overhead = {"direct_s": latency(direct), "router_s": latency(fleet.url)}
        overhead["router_overhead_ms"] = 1000 * (overhead["router_s"] - overhead["direct_s"])
        for where, url in (("direct to the engine", direct), ("through the router", fleet.url)):
            result = asyncio.run(burst(url, base_load, args.tokens, False))
            rows.append({"setup": "1 replica, 2 cores", "path": where, "load": "base",
                         **result})
    with running_fleet(ServeOptions(base=BASE, port=free_port()), 2, "round_robin", registry,
                       log=log) as fleet:
        result = asyncio.run(burst(fleet.url, base_load, args.tokens, False))
        rows.append({"setup": "2 replicas, 1 core each", "path": "round_robin", "load": "base",
                     **result})
        workers = [r.url for r in fleet.replicas]
        for policy, adapters in sets.items():
            url, router = fleet.url, None
            if policy != "round_robin":  # a second router on the same engines
                port = free_port()
                router = subprocess.Popen(router_argv(workers, "127.0.0.1", port, policy),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_healthy(f"http://127.0.0.1:{port}", router, Path("/dev/null"), 60,
                             "vllm-router")
                url = f"http://127.0.0.1:{port}/v1"
            affinity = policy == "consistent_hash"
            label = f"{policy}{' + X-Session-ID: adapter' if affinity else ''}"
            before = [served_adapters(w) for w in workers]
            for state in ("cold", "warm"):
                result = asyncio.run(burst(url, load(adapters), args.tokens, affinity))
                loads = sum(len(served_adapters(w) - b) for w, b in zip(workers, before,
                                                                        strict=True))
                rows.append({"setup": "2 replicas, 1 core each", "path": label,
                             "load": f"{args.adapters} adapters, {state}", **result,
                             "adapter loads": loads if state == "cold" else None})
                log(table(rows[-1:], list(rows[-1])))
            if router is not None:
                stop(router, timeout=10)
    base_rate = rows[0]["tok_per_s"]
    for row in rows:
        row["vs 1 engine direct"] = row["tok_per_s"] / base_rate
    print(f"\n{args.requests} concurrent requests x {args.tokens} tokens; router overhead "
          f"{overhead['router_overhead_ms']:.1f} ms per request "
          f"({overhead['direct_s'] * 1000:.0f} ms direct, one-token requests)")
    print(table(rows, ["setup", "path", "load", "tok_per_s", "vs 1 engine direct",
                       "adapter loads"]))
    save("scale", {"command": " ".join(sys.argv), "rows": rows, "router": overhead,
                   "requests": args.requests, "tokens": args.tokens})


if __name__ == "__main__":
    main()
