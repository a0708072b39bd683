"""zoo serve under load: one vLLM engine, the int8 base, many LoRAs, side by side.

Run: .venv/bin/python bench/serve.py [--requests 32] [--tokens 32] [--quantization w8a8]

(a) 32 concurrent requests on the base, (b) all on one adapter, (c) spread
over 8 adapters, (d) spread over 32 adapters with --max-loras 8; output
tokens/s and the ratio to (a). Then the time to first token of an adapter's
first request after it was added to the registry (hot add) against one that
is loaded, and the engine's resident memory with the base alone, with 32
adapters loaded, and what 32 merged copies would take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import urllib.request

from common import BASE, bench_home, save, table, write_random_lora

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def engine_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


async def burst(url: str, models: list[str], tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)

    async def one(model: str) -> tuple[int, str]:
        reply = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
            extra_body={"min_tokens": tokens, "ignore_eos": True})
        return reply.usage.completion_tokens, reply.choices[0].message.content

    start = time.perf_counter()
    replies = await asyncio.gather(*(one(m) for m in models))
    seconds = time.perf_counter() - start
    await client.close()
    tokens_out = sum(n for n, _text in replies)
    return {"tokens": tokens_out, "seconds": seconds, "tok_per_s": tokens_out / seconds,
            "texts": [text for _n, text in replies]}


async def first_token(url: str, model: str) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=900)
    start = time.perf_counter()
    stream = await client.chat.completions.create(model=model, messages=PROMPT, max_tokens=4,
                                                  temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    seconds = time.perf_counter() - start
    await stream.close()
    await client.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--quantization", default="w8a8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--paths", default="zoo,vllm",
                        help="LoRA paths to measure, one engine each: zoo's and/or vLLM's own")
    args = parser.parse_args()

    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add, remove
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = bench_home()
    registry = Registry(home)
    for entry in registry.load().adapters(base=BASE):
        remove(entry.name, registry=registry)
    base_dir = home / "bases" / BASE
    scratch = home / "bench-loras"
    shutil.rmtree(scratch, ignore_errors=True)
    names = [f"bench/a{i:02d}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        add(write_random_lora(scratch / name, base_dir, seed=i), name, BASE, registry=registry)
    late = write_random_lora(scratch / "late", base_dir, seed=999)

    n = args.requests
    rows, extra = [], {}
    for path in args.paths.split(","):
        os.environ["ZOO_FAST_LORA"] = "1" if path == "zoo" else "0"
        options = ServeOptions(base=BASE, quantization=args.quantization, port=free_port(),
                               max_loras=8, max_cpu_loras=args.adapters + 1, dtype=args.dtype)
        with running_server(options, registry, log=lambda s: print(s, file=sys.stderr)) as srv:
            url, pid = srv.url, srv.process.pid
            rss_base = engine_rss(pid)
            asyncio.run(burst(url, [BASE] * 4, 8))  # warm up the engine
            for name in names:  # load every adapter once: loading is not in the timings
                asyncio.run(burst(url, [name], 2))
            workloads = [
                ("a", "base only", [BASE] * n),
                ("b", "1 adapter", [names[0]] * n),
                ("c", "8 adapters", [names[i % 8] for i in range(n)]),
                ("d", f"{args.adapters} adapters, max-loras 8",
                 [names[i % args.adapters] for i in range(n)]),
            ]
            first = len(rows)
            for key, label, models in workloads:
                result = asyncio.run(burst(url, models, args.tokens))
                rows.append({"lora path": path, "case": f"({key}) {label}", **result})
            for row in rows[first:]:
                row["vs (a)"] = row["tok_per_s"] / rows[first]["tok_per_s"]
            if "ttft" not in extra:
                loaded = asyncio.run(first_token(url, names[1]))
                add(late, "bench/late", BASE, registry=registry)
                hot = asyncio.run(first_token(url, "bench/late"))
                extra["ttft"] = {"loaded": loaded, "hot_added": hot}
                extra["rss"] = (rss_base, engine_rss(pid))
                extra["weights"] = json.load(urllib.request.urlopen(
                    url.removesuffix("/v1") + "/zoo/engine"))["weights"] or {}
    texts = {}
    for row in rows:
        texts.setdefault(row["case"], []).append(row.pop("texts"))
    same = {case: sum(a == b for a, b in zip(*runs, strict=True)) for case, runs in texts.items()
            if len(runs) == 2}
    adapter_bytes = sum(sum(f["size"] for f in a.files.values())
                        for a in registry.load().adapters(base=BASE) if a.name in names)
    base_bytes = extra["weights"].get("heap_bytes", 0)
    memory = {
        "base_weights_mb": base_bytes / 1e6,
        "adapters": args.adapters,
        "adapter_weights_mb": adapter_bytes / 1e6,
        "one_engine_weights_mb": (base_bytes + adapter_bytes) / 1e6,
        "merged_copies_weights_mb": args.adapters * base_bytes / 1e6,
        "engine_rss_base_only_mb": extra["rss"][0] / 1e6,
        "engine_rss_with_adapters_mb": extra["rss"][1] / 1e6,
    }
    ttft = extra["ttft"]
    if same:
        print("greedy answers identical between zoo's and vLLM's LoRA path: " + ", ".join(
            f"{case.split(')')[0]}) {n}/{n_requests}" for case, n in same.items()
            for n_requests in [args.requests]))
    print(f"\n{n} concurrent requests x {args.tokens} output tokens, base {args.quantization}, "
          f"dtype {args.dtype}, max-loras 8, rank-8 LoRAs on all 7 projections")
    print(table(rows, ["lora path", "case", "tokens", "seconds", "tok_per_s", "vs (a)"]))
    print(f"\ntime to first token: loaded adapter {ttft['loaded']:.2f} s, hot-added adapter "
          f"{ttft['hot_added']:.2f} s (x{ttft['hot_added'] / ttft['loaded']:.1f})")
    print(f"weights: base {memory['base_weights_mb']:.0f} MB + {args.adapters} adapters "
          f"{memory['adapter_weights_mb']:.0f} MB = {memory['one_engine_weights_mb']:.0f} MB in "
          f"one engine; {args.adapters} merged copies {memory['merged_copies_weights_mb']:.0f} MB "
          f"(x{memory['merged_copies_weights_mb'] / memory['one_engine_weights_mb']:.1f})")
    print(f"engine processes' resident memory (KV cache included): base alone "
          f"{memory['engine_rss_base_only_mb']:.0f} MB, after loading {args.adapters} adapters "
          f"{memory['engine_rss_with_adapters_mb']:.0f} MB")
    save("serve", {"command": " ".join(sys.argv), "rows": rows, "ttft": ttft, "memory": memory,
                   "identical_answers": same})


if __name__ == "__main__":
    main()
