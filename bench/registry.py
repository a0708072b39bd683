"""How the registry scales: `zoo list --json` and `zoo show` on 10,000 entries vs `zoo --help`,
and what making (and checking) records costs in-process.

Run: .venv/bin/python bench/registry.py [--entries 10000] [--repeat 5]
Each command runs as its own process (what a user types), median of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zoo.catalog.registry import Catalog, read_catalog  # noqa: E402
from zoo.core.files import write_json_atomic  # noqa: E402
from zoo.core.records import AdapterEntry, BaseEntry, LoraDetails  # noqa: E402

HASH = "sha256:" + "ab" * 32


def synthetic_catalog(n: int) -> Catalog:
    base = BaseEntry(name="base", kind="base", path="bases/base", files={}, content_hash=HASH,
                     architecture="LlamaForCausalLM", model_type="llama", hidden_size=576,
                     num_layers=30, vocab_size=49152, dtype="bfloat16", parameters=134515008,
                     source={"type": "local", "path": "/x"})
    entries = {"base": base}
    files = {"adapter_config.json": {"sha256": HASH, "size": 900},
             "adapter_model.safetensors": {"sha256": HASH, "size": 1_000_000}}
    for i in range(n - 1):
        name = f"org{i % 50}/adapter-{i}"
        entries[name] = AdapterEntry(
            name=name, kind="lora", base="base", base_hash=HASH, base_variant="original",
            path=f"adapters/{name}", files=files, content_hash=HASH, rank=8, alpha=16.0,
            target_modules=["q_proj", "v_proj"], trainable_params=460800, percent_of_base=0.34,
            servable=True, servable_reason=None, source={"type": "local", "path": "/x"},
            lora=LoraDetails(max_rank=8))
    return Catalog(entries)


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
        write_json_atomic(Path(home) / "registry.json", synthetic_catalog(args.entries).to_dict())
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
    floor = results[0][1]
    print(f"registry: {args.entries} entries, {size / 1e6:.1f} MB; median of {args.repeat} runs")
    print(f"{'command':<28}{'seconds':>9}{'x --help':>10}")
    for label, seconds in results:
        print(f"{label:<28}{seconds:>9.3f}{seconds / floor:>10.2f}")


if __name__ == "__main__":
    main()
