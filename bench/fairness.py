"""Sharing one engine between tenants: fair scheduling, cache isolation, durable metering.

Run: .venv/bin/python bench/fairness.py [--noisy 300] [--probes 10] [--window 60] [--loads 5]

The 16-bit base (`--quantization none`; nothing here depends on the base), two tenants A
and B (weights 1 and 3 in the keys file), one engine per scheduling policy with 64
sequences a batch (`--max-num-seqs 64`, so that 300 clients queue), each measured in the
same run:

1. noisy neighbour: A's --noisy clients (a process of their own) send 16-token requests
   back to back; B sends one request at a time: B's time to first token, in seconds and in
   engine steps (one step: the median gap between tokens of A's streams at that load),
   fair against vLLM's first come, first served; and B's tokens per second once started,
   against A's;
2. weights: both tenants keep requests queued for --window seconds; the completion tokens
   each received in that time, and their ratio (the weights say 3);
3. throughput on one tenant's load (64 requests x 32 tokens): fair / FCFS;
4. the cross-tenant prefix probe: A sends a long prompt; B then sends the same prompt: B's
   time to first token against a fresh prompt of the same length (fair engine, zoo's
   cache salts) and the same probe with one tenant sending both (the cache works);
5. metering under SIGKILL: `zoo serve` under load is killed with SIGKILL, started again,
   and the requests in the home's meter are compared with the responses clients received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import BASE, bench_home, save, scratch_home, table

KEYS = {"a": "sk-bench-tenant-a", "b": "sk-bench-tenant-b"}
LONG = " ".join(f"Clause {i}: the keeper logs weather, ships and the lamp's oil, in ink."
                for i in range(90))  # about 1,000 words, 1,500 tokens (the context is 2,048)
SEQS = 64  # sequences in a batch: with more clients than this, requests queue


def client(url: str, tenant: str):
    import openai

    return openai.AsyncOpenAI(base_url=url, api_key=KEYS[tenant], max_retries=0, timeout=1800)


async def stream(api, prompt: str, tokens: int) -> tuple[float, list[float]]:
    """(time to first token, the token times) of one streamed completion."""
    start = time.perf_counter()
    times = []
    response = await api.completions.create(
        model=BASE, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"min_tokens": tokens, "ignore_eos": True})
    async for chunk in response:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    return (times[0] - start if times else float("nan")), times


def flood(url: str, noisy: int, stop, gaps) -> None:
    """A's clients, in a process of their own (so that B's clock is not read in an event
    loop busy with 300 clients): back to back, 8 of them streamed (their token gaps are the
    engine's step at this load), the rest not (the API server's streaming work is not what
    is measured). The streamed ones' gaps go to ``gaps`` when ``stop`` is set."""
    async def run():
        a = client(url, "a")
        seen: list[float] = []

        async def one(streamed: bool):
            while not stop.is_set():
                if streamed:
                    _, times = await stream(a, "Tell me about the sea.", 16)
                    seen.extend(t2 - t1 for t1, t2 in zip(times, times[1:], strict=False))
                else:
                    await a.completions.create(model=BASE, prompt="Tell me about the sea.",
                                               max_tokens=16, temperature=0,
                                               extra_body={"min_tokens": 16, "ignore_eos": True})

        tasks = [asyncio.create_task(one(i < 8)) for i in range(noisy)]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        gaps.put(seen[-2000:])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def noisy_neighbour(url: str, noisy: int, probes: int) -> dict:
    """A keeps ``noisy`` clients' requests queued; B asks one request at a time, streamed."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    stop, gaps = spawn.Event(), spawn.Queue()
    process = spawn.Process(target=flood, args=(url, noisy, stop, gaps))
    process.start()
    time.sleep(20)  # A's queue builds up

    async def ask_b():
        b = client(url, "b")
        measured = [await stream(b, "Tell me about lighthouses.", 16) for _ in range(probes)]
        await b.close()
        return measured

    measured = asyncio.run(ask_b())
    stop.set()
    a_gaps = gaps.get(timeout=120)
    process.join(60)
    ttfts = [ttft for ttft, _ in measured]
    b_gaps = [t2 - t1 for _, times in measured for t1, t2 in zip(times, times[1:], strict=False)]
    step = statistics.median(a_gaps)
    # tokens/s once started, two ways for each: the typical gap (median) and the mean gap; a
    # request admitted between A's waves (B's are) straddles one step of 64 prefills
    return {"b_ttft_s": statistics.median(ttfts), "b_ttft_steps": statistics.median(ttfts) / step,
            "step_s": step,
            "b_tokens_per_s (median gap)": 1 / statistics.median(b_gaps),
            "a_tokens_per_s (median gap)": 1 / step,
            "b_tokens_per_s (mean gap)": 1 / statistics.mean(b_gaps),
            "a_tokens_per_s (mean gap)": 1 / statistics.mean(a_gaps)}


async def weights(url: str, window: float) -> dict:
    served = {"a": 0, "b": 0}
    stop = time.perf_counter() + window
    apis = {t: client(url, t) for t in ("a", "b")}

    async def keep_queued(tenant: str):
        while time.perf_counter() < stop:
            reply = await apis[tenant].completions.create(
                model=BASE, prompt="Tell me about ships.", max_tokens=16, temperature=0,
                extra_body={"min_tokens": 16, "ignore_eos": True})
            if time.perf_counter() < stop:
                served[tenant] += reply.usage.completion_tokens

    await asyncio.gather(*(keep_queued(t) for t in ("a", "b") for _ in range(200)))
    for api in apis.values():
        await api.close()
    return {"a_tokens": served["a"], "b_tokens": served["b"],
            "b / a": served["b"] / max(served["a"], 1)}


async def throughput(url: str) -> float:
    api = client(url, "a")
    start = time.perf_counter()
    replies = await asyncio.gather(*(api.completions.create(
        model=BASE, prompt="Write a short story about a lighthouse keeper.", max_tokens=32,
        temperature=0, extra_body={"min_tokens": 32, "ignore_eos": True}) for _ in range(64)))
    seconds = time.perf_counter() - start
    await api.close()
    return sum(r.usage.completion_tokens for r in replies) / seconds


async def prefix_probe(url: str) -> dict:
    a, b = client(url, "a"), client(url, "b")
    results = {}
    # each probe's prompt differs from its first token: no probe finds another's prefix
    for label, first, second, prompt in (
            ("fresh prompt, B", None, b, "Probe one. " + LONG),
            ("A's prompt, then B", a, b, "Probe two. " + LONG),
            ("A's prompt, then A again", a, a, "Probe three. " + LONG)):
        if first is not None:
            await stream(first, prompt, 1)
        ttft, _ = await stream(second, prompt, 1)
        results[label] = ttft
    await a.close()
    await b.close()
    return results


def metering_after_sigkill(home: Path, keys: Path, seconds: float = 20) -> dict:
    """zoo serve killed with SIGKILL under load, started again: the meter against what the
    clients received whole."""
    from zoo.serve.launch import free_port, wait_healthy
    from zoo.serve.meter import Meter

    port = free_port()
    log = home.parent / "kill-serve.log"
    argv = [str(Path(sys.executable).with_name("zoo")), "serve", "--multi-lora", "--base", BASE,
            "--quantization", "none", "--port", str(port), "--api-keys", str(keys)]
    env = {**os.environ, "ZOO_HOME": str(home)}
    before = sum(r["requests"] for r in Meter(home, server=0).report())
    with open(log, "ab") as out:
        serving = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_healthy(f"http://127.0.0.1:{port}", serving, log, 900, "zoo serve")
    received = 0
    url = f"http://127.0.0.1:{port}/v1"

    async def load():
        nonlocal received
        api = client(url, "a")

        async def one():
            nonlocal received
            while True:
                try:
                    await api.completions.create(model=BASE, prompt="Hi there.", max_tokens=8,
                                                 temperature=0)
                    received += 1
                except Exception:  # noqa: BLE001 - the server is gone
                    return

        tasks = [asyncio.create_task(one()) for _ in range(32)]
        await asyncio.sleep(seconds)
        serving.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)

    asyncio.run(load())
    serving.wait()
    time.sleep(5)  # its vLLM processes die with it (PR_SET_PDEATHSIG)
    with open(log, "ab") as out:  # started again: what the meter says now
        again = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", again, log, 900, "zoo serve")
        metered = sum(r["requests"] for r in Meter(home, server=0).report()) - before
    finally:
        again.terminate()
        again.wait()
    return {"responses received": received, "requests metered": metered,
            "metered - received": metered - received}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--noisy", type=int, default=300)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--window", type=float, default=60)
    parser.add_argument("--loads", type=int, default=5, help="throughput loads per engine")
    parser.add_argument("--sections", default="noisy,weights,throughput,prefix,metering")
    parser.add_argument("--order", default="fair,fcfs",
                        help="engines, in the order they are started: fair,fcfs,fair,fcfs "
                             "alternates them (the first engine of a run can be slower)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = scratch_home(bench_home().parent / "zoo-bench-fairness", adapters=True)
    keys = home.parent / "fairness-keys.json"
    keys.write_text(json.dumps({"tenants": {
        "a": {"keys": [KEYS["a"]], "weight": 1}, "b": {"keys": [KEYS["b"]], "weight": 3}}}))
    registry = Registry(home)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    results: dict = {}
    for scheduling in args.order.split(","):
        options = ServeOptions(base=BASE, quantization="none", port=free_port(), api_keys=keys,
                               scheduling=scheduling, extra_args=("--max-num-seqs", str(SEQS)))
        with running_server(options, registry, log=log) as server:
            got = results.setdefault(scheduling, {})
            if "noisy" in sections:
                got["noisy"] = noisy_neighbour(server.url, args.noisy, args.probes)
                log(f"{scheduling} noisy: {got['noisy']}")
            if "weights" in sections:
                got["weights"] = asyncio.run(weights(server.url, args.window))
                log(f"{scheduling} weights: {got['weights']}")
            if "throughput" in sections:
                asyncio.run(throughput(server.url))  # warm-up
                loads = [asyncio.run(throughput(server.url)) for _ in range(args.loads)]
                got.setdefault("throughputs", []).extend(loads)
                got.setdefault("engine medians", []).append(statistics.median(loads))
                got["throughput"] = statistics.median(got["throughputs"])
                log(f"{scheduling} throughput: {loads}")
            if "prefix" in sections and scheduling == "fair":
                got["prefix"] = asyncio.run(prefix_probe(server.url))
    if "metering" in sections:
        results["metering"] = metering_after_sigkill(home, keys)
    shutil.rmtree(home, ignore_errors=True)
    rows = []
    if "noisy" in sections:
        for key in results["fair"]["noisy"]:
            rows.append({"measure": f"noisy neighbour: {key}",
                         "fair": results["fair"]["noisy"][key],
                         "fcfs": results["fcfs"]["noisy"][key]})
    if "weights" in sections:
        for key in ("a_tokens", "b_tokens", "b / a"):
            rows.append({"measure": f"weights 1:3 over {args.window:.0f} s: {key}",
                         "fair": results["fair"]["weights"][key],
                         "fcfs": results["fcfs"]["weights"][key]})
    if "throughput" in sections:
        rows.append({"measure": "one tenant, 64 x 32 tokens (tok/s)",
                     "fair": results["fair"]["throughput"], "fcfs": results["fcfs"]["throughput"],
                     "fair / fcfs": results["fair"]["throughput"] / results["fcfs"]["throughput"]})
    if "prefix" in sections:
        for key, value in results["fair"]["prefix"].items():
            rows.append({"measure": f"TTFT on a 1,000-word prompt: {key} (s)", "fair": value})
    if "metering" in sections:
        for key, value in results["metering"].items():
            rows.append({"measure": f"SIGKILL under load: {key}", "fair": value})
    print(table(rows, ["measure", "fair", "fcfs", "fair / fcfs"]))
    save("fairness", {"command": " ".join(sys.argv), "rows": rows, "results": results})


if __name__ == "__main__":
    main()
