"""How the registry scales: `zoo list --json` and `zoo show` on 10,000 entries vs `zoo --help`,
what making (and checking) records costs in-process, and what a registry change costs a
server's event loop (zoo's middleware in front of a stand-in for vLLM's app).

Run: .venv/bin/python bench/registry.py [--entries 10000] [--repeat 5]
Each command runs as its own process (what a user types), median of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo.catalog.registry import Catalog, Registry, read_catalog  # noqa: E402
from zoo.core.files import write_bytes_atomic  # noqa: E402
from zoo.core.records import AdapterEntry, BaseEntry, LoraDetails  # noqa: E402

HASH = "sha256:" + "ab" * 32


def synthetic_catalog(n: int, home: Path | None = None) -> Catalog:
    """A base and ``n - 1`` LoRA entries; with ``home``, each adapter's files are there
    (hard links to one pair of files, so their hashes are real and cached alike)."""
    base = BaseEntry(name="base", kind="base", path="bases/base", files={}, content_hash=HASH,
                     architecture="LlamaForCausalLM", model_type="llama", hidden_size=576,
                     num_layers=30, vocab_size=49152, dtype="bfloat16", parameters=134515008,
                     source={"type": "local", "path": "/x"})
    entries = {"base": base}
    files = {"adapter_config.json": {"sha256": HASH, "size": 900},
             "adapter_model.safetensors": {"sha256": HASH, "size": 1_000_000}}
    if home is not None:
        files = _shared_files(home / "adapters" / "shared")
    for i in range(n - 1):
        name = f"org{i % 50}/adapter-{i}"
        if home is not None:
            for file in files:
                (home / "adapters" / name).mkdir(parents=True, exist_ok=True)
                os.link(home / "adapters" / "shared" / file, home / "adapters" / name / file)
        entries[name] = AdapterEntry(
            name=name, kind="lora", base="base", base_hash=HASH, base_variant="original",
            path=f"adapters/{name}", files=files, content_hash=HASH, rank=8, alpha=16.0,
            target_modules=["q_proj", "v_proj"], trainable_params=460800, percent_of_base=0.34,
            servable=True, servable_reason=None, source={"type": "local", "path": "/x"},
            lora=LoraDetails(max_rank=8))
    return Catalog(entries)


def _shared_files(folder: Path) -> dict[str, dict]:
    from zoo.catalog.integrity import file_hash

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(100_000))
    return {f.name: {"sha256": file_hash(f), "size": f.stat().st_size}
            for f in sorted(folder.iterdir())}


def in_process(path: Path, repeat: int) -> list[tuple[str, float]]:
    """What a server and its pages pay per registry change: every record made (each
    checked), and the bases alone (made from the stored kinds, without the adapters')."""
    rows = []
    for label, touch in (("every record (in-process)", lambda c: list(c.entries.values())),
                         ("the bases (in-process)", lambda c: c.bases())):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            touch(read_catalog(path))
            times.append(time.perf_counter() - start)
        rows.append((label, statistics.median(times)))
    return rows


class Engine:
    """A stand-in for vLLM's app: answers every request at once, and holds a few loaded
    adapters (so the middleware checks them against the registry after each change)."""

    def __init__(self):
        names = [f"org{i % 50}/adapter-{i}:v1" for i in range(64)]
        self.state = SimpleNamespace(openai_serving_models=SimpleNamespace(
            lora_requests=dict.fromkeys(names), unload_lora_adapter=self._unload))

    @staticmethod
    async def _unload(request):
        pass

    async def __call__(self, scope, receive, send):
        answer = {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        if scope["path"] == "/v1/models":
            answer = {"object": "list", "data": [{"id": "base", "object": "model",
                                                  "created": 1}]}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def _one_request(middleware, engine: Engine, path: str, before=None):
    """The event loop's longest stall while one request is answered, and its time (after
    ``before``, such as a change to the registry)."""
    body = b""
    if path != "/v1/models":
        body = json.dumps({"model": "base",
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
    scope = {"type": "http", "path": path, "method": "POST" if body else "GET",
             "app": engine, "headers": [(b"content-type", b"application/json")]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    worst, running = 0.0, True

    async def ticker():  # what a stream's next token would wait for
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticks = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    if before:
        before()
    start = time.perf_counter()
    await middleware(scope, receive, send)
    took = time.perf_counter() - start
    running = False
    await ticks
    assert sent[0]["status"] == 200, sent
    return worst, took


def server_side(home: Path, repeat: int) -> list[tuple[str, float]]:
    """A server's event loop: after a change to the registry (its file touched, a new
    stamp as after `zoo add`), and listing the models. Every stream waits while the loop
    is blocked."""
    from zoo.serve.middleware import ZooMiddleware
    from zoo.serve.policy import ServePolicy

    engine = Engine()
    middleware = ZooMiddleware(engine, ServePolicy(Registry(home), "base", 64))
    registry = home / "registry.json"

    def change():
        os.utime(registry, ns=(time.time_ns(), time.time_ns()))

    async def rounds(path, before):
        await _one_request(middleware, engine, path, before)  # warm
        return [await _one_request(middleware, engine, path, before) for _ in range(repeat)]

    import vllm.entrypoints.serve.lora.protocol  # noqa: F401 - imported in a server

    gc.collect()
    gc.freeze()  # as vLLM's API server does once it started (vllm.utils.gc_utils)
    rows = []
    try:
        for what, path, before in (("a request after a change", "/v1/chat/completions",
                                    change), ("GET /v1/models", "/v1/models", None)):
            stalls, times = zip(*asyncio.run(rounds(path, before)), strict=True)
            rows += [(f"server: {what}", statistics.median(times)),
                     ("  loop stalled (median)", statistics.median(stalls)),
                     ("  loop stalled (worst)", max(stalls))]
    finally:
        gc.unfreeze()
    return rows


def timed(cmd: list[str], env: dict, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    zoo = str(Path(sys.executable).with_name("zoo"))
    with tempfile.TemporaryDirectory() as home:
        catalog = synthetic_catalog(args.entries, Path(home))
        write_bytes_atomic(Path(home) / "registry.json", catalog.to_json())
        del catalog
        size = (Path(home) / "registry.json").stat().st_size
        env = {**os.environ, "ZOO_HOME": home}
        rows = [
            ("zoo --help", [zoo, "--help"]),
            ("zoo list --json", [zoo, "list", "--json"]),
            ("zoo list", [zoo, "list"]),
            ("zoo show NAME --json", [zoo, "show", "org7/adapter-4007", "--json"]),
        ]
        results = [(label, timed(cmd, env, args.repeat)) for label, cmd in rows]
        results += in_process(Path(home) / "registry.json", args.repeat)
        results += server_side(Path(home), args.repeat)
    floor = results[0][1]
    print(f"registry: {args.entries} entries, {size / 1e6:.1f} MB; median of {args.repeat} runs")
    print(f"{'command':<34}{'seconds':>9}{'x --help':>10}")
    for label, seconds in results:
        print(f"{label:<34}{seconds:>9.3f}{seconds / floor:>10.2f}")


if __name__ == "__main__":
    main()
