"""zoo serve with many customers at once: throughput against the number of active adapters.

Run: .venv/bin/python bench/serve.py [--catalog 1000] [--paths zoo,vllm] [--startup 3,1000,10000]
     [--sections curve,ttft,startup] [--ttft-samples 10] [--wide 256] [--repeat 3]

One engine per LoRA path, started with zoo serve's defaults (no tuning flags), on
the int8 base, with a catalog of --catalog registered rank-8 q/v LoRAs:

* the curve: output tokens/s of --requests concurrent requests x --tokens tokens
  spread over 1, 8, 32, 64 and 128 distinct adapters, each set used for the first
  time (cold: loaded on first use) and then again (warm), against the base alone in
  the same run, then --wide distinct adapters at --wide concurrent requests against
  the base at that concurrency; a point is the median of --repeat pairs of a base
  burst and an adapters' burst, by their ratio (cold: each pair on adapters never
  used before, as many pairs as the catalog has such adapters left for, up to
  --repeat; the warm pairs reuse the last of them); vLLM's own LoRA path on the same
  load (fewer points: it is slow);
* time to first token of an adapter never used before (cold) and of a loaded one
  (warm) while 63 other adapters keep the engine busy: p50 and p99, with vLLM's
  first-use path (ZOO_FAST_FIRST_USE=0: the API server awaits the load) and zoo's
  (zoo/serve/first_use.py), one engine each;
* start-up time (launch to /health) against catalog size;
* bulk registration time of the catalog (zoo add DIR --many);
* "previous": the same load on zoo as it was before this round (--previous, a
  commit: its own `zoo serve --multi-lora` defaults, run from a worktree of it).

Results go to bench/results/serve.json and a plot to docs/serve-curve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from common import BASE, ROOT, bench_home, log, previous_zoo_env, save, table, write_random_lora

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
CURVE = (1, 8, 32, 64, 128)
VLLM_CURVE = (8, 64)  # the slow paths get fewer points
PREVIOUS = "d4e9273"  # zoo before this round
QV = ("q_proj", "v_proj")
FIRST_USE = {"0": "vLLM's (awaits the load, then submits)",  # ZOO_FAST_FIRST_USE
             "1": "zoo's (submits at once, loaded on arrival)"}


async def burst(url: str, models: list[str], tokens: int, concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)
    gate = asyncio.Semaphore(concurrency)

    async def one(model: str) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
                extra_body={"min_tokens": tokens, "ignore_eos": True})
            return reply.usage.completion_tokens

    start = time.perf_counter()
    produced = await asyncio.gather(*(one(m) for m in models))
    seconds = time.perf_counter() - start
    await client.close()
    return {"tokens": sum(produced), "seconds": seconds, "tok_per_s": sum(produced) / seconds}


async def ttft_under_load(url: str, busy: list[str], probes: list[str]) -> list[float]:
    """First-token times of ``probes``, one after another, while ``busy`` adapters stream."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)
    stop = asyncio.Event()

    async def keep_busy(model: str, tokens: int) -> None:
        while not stop.is_set():
            await client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
                extra_body={"min_tokens": tokens, "ignore_eos": True})

    async def first_token(model: str) -> float:
        """Seconds to the first streamed text. The stream is read to its end (4 tokens), so
        the next probe starts with exactly the busy adapters running: closing it at the
        first token aborts the request, and until the engine has processed the abort its
        adapter still holds one of the --max-loras places (the 65th adapter then waits)."""
        start, seconds = time.perf_counter(), None
        stream = await client.chat.completions.create(
            model=model, messages=PROMPT, max_tokens=4, temperature=0, stream=True)
        async for chunk in stream:
            if seconds is None and chunk.choices and chunk.choices[0].delta.content:
                seconds = time.perf_counter() - start
        return seconds

    # 40-55 tokens each: requests of one length would all end, and all start again with
    # a prefill, in the same engine step (a 2-3 s step every 48 tokens, unlike real traffic)
    workers = [asyncio.create_task(keep_busy(m, 40 + i % 16)) for i, m in enumerate(busy)]
    await asyncio.sleep(3)  # the busy adapters are loaded and decoding
    times = [await first_token(m) for m in probes]
    stop.set()
    await asyncio.gather(*workers, return_exceptions=True)
    await client.close()
    return times


def spread(adapters: list[str], count: int, concurrency: int) -> list[str]:
    """A burst's models: ``count`` adapters, each as often as ``concurrency`` asks."""
    return [adapters[i % count] for i in range(max(concurrency, count))]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def served_catalog():
    """The benchmarks' home, its registry and the names of its catalog of 1,000 rank-8 q/v
    LoRAs (:func:`catalog`), as the served benchmarks take them."""
    from zoo.catalog.registry import Registry

    home = bench_home()
    registry = Registry(home)
    names, _ = catalog(home, registry, 1000, log)
    return home, registry, names


def catalog(home: Path, registry, size: int, log) -> tuple[list[str], float]:
    """``size`` rank-8 q/v adapters named cat/aNNNN, registered in one bulk add; the bulk
    add is timed on a fresh home every run."""
    from zoo.catalog.bulk import add_many
    from zoo.catalog.registry import Registry

    names = [f"cat/a{i:04d}" for i in range(size)]
    folder = home / "bench-catalog"
    base_dir = home / "bases" / BASE
    for i in range(size):
        if not (folder / f"a{i:04d}").exists():
            write_random_lora(folder / f"a{i:04d}", base_dir, seed=i, targets=QV, scale=0.05)
    fresh = home.parent / f"{home.name}-bulk"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(home / "bases", fresh / "bases", copy_function=os.link)
    shutil.copy(home / "registry.json", fresh / "registry.json")
    with Registry(fresh).edit() as cat:
        for name in [a.name for a in cat.adapters()]:
            del cat.entries[name]
    start = time.perf_counter()
    result = add_many(folder, BASE, prefix="cat/", registry=Registry(fresh))
    seconds = time.perf_counter() - start
    log(f"bulk registration: {len(result.added)} adapters in {seconds:.1f} s")
    shutil.rmtree(fresh)
    if not set(names) <= {a.name for a in registry.load().adapters(base=BASE)}:
        add_many(folder, BASE, prefix="cat/", registry=registry)
    # the files the server reads, into the page cache: a cold point is an adapter vLLM
    # has not loaded, not a file on disk (from disk, the core's read of a rank-8 q/v
    # adapter takes about 1.5 ms more). On a machine that reclaims the page cache early
    # (this VM's kdamond pages out what was not touched for a minute or two), the later
    # engines' cold points read some from disk all the same
    registered = registry.load()
    for name in names:
        entry = registered.adapter(name)
        for file in entry.files:
            (registry.resolve(entry.path) / file).read_bytes()
    return names, seconds


def startup_seconds(registry, log) -> float:
    from zoo.serve.launch import ServeOptions, free_port, running_server

    start = time.perf_counter()
    with running_server(ServeOptions(base=BASE, port=free_port()), registry, log=log):
        return time.perf_counter() - start


def small_catalog_home(home: Path, size: int, log) -> Path:
    """A home whose catalog is ``size`` tiny adapters (rank 1, one module): what start-up
    must not grow with is the number of entries, not their bytes."""
    from zoo.catalog.bulk import add_many
    from zoo.catalog.registry import Registry

    target = home.parent / f"{home.name}-catalog-{size}"
    registry = Registry(target)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(home / "bases", target / "bases", copy_function=os.link)
    shutil.copy(home / "registry.json", target / "registry.json")
    with registry.edit() as cat:  # keep the base and its variants, drop the adapters
        for name in [a.name for a in cat.adapters()]:
            del cat.entries[name]
    folder = target / "incoming"
    base_dir = home / "bases" / BASE
    one = write_random_lora(folder / "t00000", base_dir, rank=1, targets=("q_proj",))
    for i in range(1, size):
        shutil.copytree(one, folder / f"t{i:05d}")
    start = time.perf_counter()
    add_many(folder, BASE, prefix="tiny/", registry=registry)
    seconds = time.perf_counter() - start
    log(f"catalog of {size}: registered in {seconds:.1f} s")
    shutil.rmtree(folder)
    return target, seconds


@contextmanager
def previous_zoo(commit: str, home: Path, log):
    """``zoo serve --multi-lora`` of an earlier commit, on this home, with its defaults."""
    from zoo.serve.launch import free_port

    variables, tree = previous_zoo_env(commit)
    port = free_port()
    env = {**os.environ, **variables, "ZOO_HOME": str(home), "ZOO_FAST_LORA": "1"}
    log_file = open(home / "previous-vllm.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "serve", "--multi-lora", "--port",
                             str(port)], env=env, cwd=tree, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(900):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"previous zoo serve exited; see {log_file.name}") from None
                time.sleep(1)
        yield url + "/v1"
    finally:  # the whole process group: that zoo serve leaves its vLLM child behind on SIGTERM
        for sig in (15, 9):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                continue
        log_file.close()


@contextmanager
def engine_url(path: str, previous: str | None, home: Path, registry,
               lora_targets: str = "all"):
    """The ``/v1`` URL of ``zoo serve`` on the benchmarks' home, with its defaults: this
    tree's (``path`` "zoo", with ``--lora-targets``) or commit ``previous``'s ("previous")."""
    if path == "previous":
        with previous_zoo(previous, home, log) as url:
            yield url
        return
    from zoo.serve.launch import ServeOptions, free_port, running_server

    with running_server(ServeOptions(base=BASE, port=free_port(), lora_targets=lora_targets),
                        registry, log=log) as server:
        yield server.url


def base_cold_warm(url: str, adapters: list[str], rounds: int, requests: int = 64,
                   tokens: int = 32):
    """A warm-up (a burst on the base, one on ``adapters[:8]``), then ``rounds`` rounds of
    three bursts of ``requests`` x ``tokens``: the base, the next ``requests`` adapters
    after the warm-up's (never used: cold) and the same again (warm). Yields each round's
    bursts as (round, "base" | "cold" | "warm", start (``time.monotonic``), seconds)."""
    asyncio.run(burst(url, [BASE] * requests, tokens, requests))
    asyncio.run(burst(url, [adapters[i % 8] for i in range(requests)], tokens, requests))
    for number in range(rounds):
        chosen = adapters[8 + number * requests:8 + (number + 1) * requests]
        for state, models in (("base", [BASE] * requests), ("cold", chosen), ("warm", chosen)):
            started = time.monotonic()
            asyncio.run(burst(url, models, tokens, requests))
            yield number, state, started, time.monotonic() - started


def keep(section: dict) -> None:
    """Add a finished section to bench/results/serve.json (the others stay as they were)."""
    import json

    from common import RESULTS

    path = RESULTS / "serve.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "rows" in section and "rows" in old:  # a run of some paths replaces those paths' rows
        paths = {r["lora path"] for r in section["rows"]}
        section["rows"] = [r for r in old["rows"] if r.get("lora path") not in paths] + \
            section["rows"]
    save("serve", {**{k: v for k, v in old.items() if k not in ("measured", "machine")},
                   **section})


def plot(curve_rows: list[dict], concurrency: int, previous: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for path, state, style in (("zoo", "warm", "o-"), ("zoo", "cold", "o--"),
                               ("vllm", "warm", "s-"), ("previous", "warm", "^-"),
                               ("previous", "cold", "^--")):
        points = [(r["adapters"], r["vs base"]) for r in curve_rows
                  if r["lora path"] == path and r["state"] == state
                  and r.get("concurrency", concurrency) == concurrency]
        if points:
            label = {"zoo": "zoo", "vllm": "vLLM's own LoRA path",
                     "previous": f"zoo at {previous}"}[path]
            ax.plot(*zip(*points, strict=True), style, label=f"{label}, {state}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters among the concurrent requests")
    ax.set_ylabel("output tokens/s vs the base alone")
    ax.set_ylim(0, 1.2)
    ax.legend()
    ax.set_title("One engine, int8 SmolLM2-135M, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--catalog", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--paths", default="zoo,vllm,previous")
    parser.add_argument("--previous", default=PREVIOUS)
    parser.add_argument("--startup", default="3,1000,10000")
    parser.add_argument("--ttft-samples", type=int, default=10)
    parser.add_argument("--curve", default=",".join(map(str, CURVE)))
    parser.add_argument("--repeat", type=int, default=3,
                        help="base and adapter burst pairs per warm point (the median pair "
                             "counts), and base bursts for the cold points' reference")
    parser.add_argument("--wide", type=int, default=256,
                        help="then as many distinct adapters as concurrent requests, against "
                             "the base at that concurrency (0: not measured)")
    parser.add_argument("--sections", default="curve,ttft,startup",
                        help="curve (throughput), ttft and/or startup; each is kept in "
                             "bench/results/serve.json as it finishes")
    args = parser.parse_args()

    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, free_port, running_server

    home = bench_home()
    registry = Registry(home)
    names, bulk_seconds = catalog(home, registry, args.catalog, log)
    n = args.requests
    rows, ttft = [], {}
    used = 0

    def fresh(count: int) -> list[str]:  # adapters this engine has not loaded yet
        nonlocal used
        chosen = names[used:used + count]
        used += count
        return chosen

    @contextmanager
    def engine(path: str):
        started = time.perf_counter()
        if path == "previous":
            with previous_zoo(args.previous, home, log) as url:
                log(f"previous: engine up in {time.perf_counter() - started:.0f} s")
                yield url
            return
        os.environ["ZOO_FAST_LORA"] = "1" if path == "zoo" else "0"
        with running_server(ServeOptions(base=BASE, port=free_port()), registry, log=log) as srv:
            log(f"{path}: engine up in {time.perf_counter() - started:.0f} s, "
                f"{srv.plan.max_loras} adapters per batch")
            yield srv.url

    sections = args.sections.split(",")
    for path in args.paths.split(",") if "curve" in sections else []:
        used = 0  # each engine its own first uses (the files read into the page cache
        # first: see catalog())
        with engine(path) as url:
            # warm up: a first burst of a shape is slower (kernels made for its sizes; zoo's
            # LoRA kernel up to a2d4cff was compiled on an engine's first step of many
            # adapters), so the base and then adapters never used again
            asyncio.run(burst(url, [BASE] * n, args.tokens, n))
            warming = fresh(8)
            asyncio.run(burst(url, [warming[i % 8] for i in range(n)], args.tokens, n))
            if args.wide and path != "vllm":
                asyncio.run(burst(url, [BASE] * args.wide, args.tokens, args.wide))

            def timed(models: list[str], concurrency: int, times: int) -> dict:
                """The median burst of ``times`` (by tokens/s)."""
                runs = [asyncio.run(burst(url, models, args.tokens, concurrency))
                        for _ in range(times)]
                return sorted(runs, key=lambda r: r["tok_per_s"])[len(runs) // 2]

            def paired(models, concurrency: int, times: int = args.repeat) -> dict:
                """--repeat pairs of a base burst and an adapters' burst: the median pair by
                their ratio (this machine's speed drifts by up to 40% between bursts, the
                same for both of a pair). ``models`` is the list, or makes a new one for
                each pair (cold: adapters never used before, each time)."""
                pairs = []
                for _ in range(times):
                    chosen = models() if callable(models) else models
                    reference = asyncio.run(burst(url, [BASE] * len(chosen), args.tokens,
                                                  concurrency))
                    result = asyncio.run(burst(url, chosen, args.tokens, concurrency))
                    pairs.append({**result, "vs base": result["tok_per_s"] /
                                  reference["tok_per_s"]})
                return sorted(pairs, key=lambda r: r["vs base"])[len(pairs) // 2]

            base = timed([BASE] * n, n, args.repeat)
            rows.append({"lora path": path, "concurrency": n, "adapters": 0, "state": "-",
                         **base, "vs base": 1.0})
            curve = [int(c) for c in args.curve.split(",")]
            points = [(count, n) for count in
                      (curve if path != "vllm" else [c for c in curve if c in VLLM_CURVE])]
            if args.wide and path != "vllm":
                wide = timed([BASE] * args.wide, args.wide, args.repeat)
                rows.append({"lora path": path, "concurrency": args.wide, "adapters": 0,
                             "state": "-", **wide, "vs base": 1.0})
                points.append((args.wide, args.wide))
            for count, concurrency in points:
                last: list[str] = []  # the adapters of the last cold burst

                def first_use(count=count, concurrency=concurrency, last=last) -> list[str]:
                    last[:] = fresh(count)
                    return spread(last, count, concurrency)

                for state in ("cold", "warm"):
                    if path == "vllm" and state == "cold":
                        asyncio.run(burst(url, first_use(), 2, concurrency))  # load; untimed
                        continue
                    # cold: each pair on adapters never used, as many pairs as the catalog
                    # has adapters left for (up to --repeat); warm: on the last of them
                    if state == "cold":
                        times = min(args.repeat, (len(names) - used) // count)
                        if times < 1:
                            raise SystemExit(f"--catalog {args.catalog} is too small for "
                                             f"{count} adapters never used")
                        result = paired(first_use, concurrency, times)
                    else:
                        result = paired(spread(last, count, concurrency), concurrency)
                    rows.append({"lora path": path, "concurrency": concurrency, "adapters": count,
                                 "state": state, **result})
                    log(f"{path} {count} at {concurrency} {state}: {result['tok_per_s']:.1f} "
                        f"tok/s ({rows[-1]['vs base']:.2f}x)")

    if "curve" in sections:
        keep({"command": " ".join(sys.argv), "rows": rows,
              "bulk_registration_seconds": bulk_seconds})
        if len(args.curve.split(",")) >= 3:  # a run of a point or two keeps the docs' curve
            plot(rows, n, args.previous, ROOT / "docs" / "serve-curve.png")
        else:
            log("docs/serve-curve.png kept: this run's --curve has fewer than 3 points")
    for first_use, label in FIRST_USE.items() if "ttft" in sections else ():
        os.environ["ZOO_FAST_FIRST_USE"] = first_use
        with engine("zoo") as url:
            busy = fresh(63)
            asyncio.run(burst(url, busy, 2, n))
            cold = asyncio.run(ttft_under_load(url, busy, fresh(args.ttft_samples)))
            warm = asyncio.run(ttft_under_load(url, busy[1:], busy[:1] * args.ttft_samples))
        ttft[label] = {state: {"p50": percentile(v, 50), "p99": percentile(v, 99),
                               "samples": len(v)} for state, v in (("cold", cold), ("warm", warm))}
        log(f"{label}: cold p50 {ttft[label]['cold']['p50']:.2f} s")
    os.environ.pop("ZOO_FAST_FIRST_USE", None)
    if ttft:
        keep({"ttft_command": " ".join(sys.argv), "ttft": ttft})
    startup = []
    for size in (int(s) for s in args.startup.split(",") if s and "startup" in sections):
        target, registered = small_catalog_home(home, size, log)
        startup.append({"catalog": size, "registration_s": registered,
                        "seconds": startup_seconds(Registry(target), log)})
    for row in startup:
        row["vs smallest"] = row["seconds"] / startup[0]["seconds"]

    print(f"\n{n} concurrent requests x {args.tokens} tokens, int8 base, zoo serve defaults, "
          f"catalog of {args.catalog} rank-8 q/v LoRAs")
    if rows:
        print(table(rows, ["lora path", "concurrency", "adapters", "state", "tokens", "seconds",
                           "tok_per_s", "vs base"]))
    if ttft:
        print("\ntime to first token (s) with 63 adapters busy, one engine per row")
        print(table([{"first use": label, **{f"{state} {p}": ttft[label][state][p]
                                             for state in ("cold", "warm") for p in ("p50", "p99")}}
                     for label in ttft], ["first use", "cold p50", "cold p99", "warm p50",
                                          "warm p99"]))
        first, last = list(ttft.values())[0], list(ttft.values())[-1]
        print(f"cold p50: {last['cold']['p50'] / first['cold']['p50']:.2f}x vLLM's first use")
    if startup:
        print("\nstart-up (launch to /health) against catalog size")
        print(table(startup, ["catalog", "registration_s", "seconds", "vs smallest"]))
    print(f"\nbulk registration of {args.catalog} rank-8 adapters (zoo add --many, one "
          f"transaction): {bulk_seconds:.1f} s")
    if startup:
        keep({"startup_command": " ".join(sys.argv), "startup": startup})


if __name__ == "__main__":
    main()
