"""The activation dtype on this machine: one stream and 64, float32 against bfloat16.

Run: .venv/bin/python bench/dtype.py [--rounds 3]

Each engine serves the real base: the 16-bit base with float32 and with bfloat16
activations, and the int8 W8A8 base with bfloat16 (the dtype zoo's default `--dtype
auto` picks where the CPU has AMX or AVX-512 BF16; vLLM's AMX int8 kernel refuses
float32 there, so without AMX the int8 base runs in float32 too). Measured per engine:
one request alone (64 tokens) and 64 concurrent requests (32 tokens each), output
tokens/s, the median of --rounds each, after a warm-up.
The engines run one after another in the order given and then again in reverse, and
each row is the median over both passes (engines started later can measure faster on
this machine). Where zoo runs the int8 base's linears on its own GEMM (``cpu_int8.py``: an
x86 CPU without VNNI), the int8 engines run a second time with ``ZOO_CPU_INT8=0``:
vLLM's oneDNN GEMM, the before of that change, in the same run, in a home of their own
(hard links of the bench home), where zoo serve remakes the int8 variant with the 7-bit
weights oneDNN needs there, as it served before. ``--only TEXT`` keeps
the engines whose label holds TEXT (the 16-bit float32 engine, the reference, always
runs). Results in bench/results/dtype.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

from common import BASE, bench_home, log, save, scratch_home, table
from serve import burst

REFERENCE = "16-bit, float32"
ONEDNN = ", vLLM's oneDNN GEMM"


def engines(only: str = "") -> dict[str, tuple[str, str, bool]]:
    """label: (quantization, dtype, zoo's int8 GEMM on). The int8 base in float32 too
    where the CPU has no AMX (its int8 kernel is then oneDNN's; the AMX one refuses
    float32), and with and without zoo's GEMM where zoo takes the int8 linears."""
    from zoo.core.measure import cpu_flags
    from zoo.serve import cpu_int8
    from zoo.serve.launch import activation_dtype

    chosen = activation_dtype("auto")
    found = {REFERENCE: ("none", "float32", True), "16-bit, bfloat16": ("none", "bfloat16", True)}
    for dtype in ("bfloat16", *(() if "amx_tile" in cpu_flags() else ("float32",))):
        label = f"int8, {dtype}" + (" (default here)" if dtype == chosen else "")
        found[label] = ("w8a8", dtype, True)
        if cpu_int8.wanted(cpu_flags()):
            found[f"int8, {dtype}{ONEDNN}"] = ("w8a8", dtype, False)
    return {label: spec for label, spec in found.items() if label == REFERENCE or only in label}


def measure(home, quantization: str, dtype: str, zoo_int8: bool, rounds: int, log) -> dict:
    from zoo.catalog.registry import Registry
    from zoo.quantize.w8a8 import ZOOS_GEMM_VARIABLE as VARIABLE
    from zoo.serve.launch import ServeOptions, free_port, running_server

    os.environ[VARIABLE] = "1" if zoo_int8 else "0"  # the server inherits it
    options = ServeOptions(base=BASE, quantization=quantization, dtype=dtype, port=free_port())
    with running_server(options, Registry(home), log=log) as server:
        asyncio.run(burst(server.url, [BASE] * 8, 8, 8))  # warm-up
        one = [asyncio.run(burst(server.url, [BASE], 64, 1))["tok_per_s"] for _ in range(rounds)]
        many = [asyncio.run(burst(server.url, [BASE] * 64, 32, 64))["tok_per_s"]
                for _ in range(rounds)]
    return {"one": one, "many": many}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="engines whose label holds this text")
    args = parser.parse_args()

    home = bench_home()
    chosen = engines(args.only)
    homes = {label: home if zoo_int8 else None for label, (_q, _d, zoo_int8) in chosen.items()}
    if None in homes.values():
        onednn = scratch_home(Path(f"{home}-onednn"), adapters=True)
        homes = {label: h or onednn for label, h in homes.items()}
    samples: dict[str, dict[str, list[float]]] = {label: {"one": [], "many": []}
                                                  for label in chosen}
    for label in [*chosen, *reversed(chosen)]:
        got = measure(homes[label], *chosen[label], args.rounds, log)
        for key in ("one", "many"):
            samples[label][key] += got[key]
    reference = statistics.median(samples[REFERENCE]["one"]), \
        statistics.median(samples[REFERENCE]["many"])
    rows = []
    for label, got in samples.items():
        one, many = statistics.median(got["one"]), statistics.median(got["many"])
        rows.append({"engine": label, "1 stream tok/s": one, "vs fp32 (1)": one / reference[0],
                     "64 streams tok/s": many, "vs fp32 (64)": many / reference[1]})
    print("\noutput tokens/s, one request alone (64 tokens) and 64 at once (32 tokens each)")
    print(table(rows, ["engine", "1 stream tok/s", "vs fp32 (1)", "64 streams tok/s",
                       "vs fp32 (64)"]))
    save("dtype", {"command": " ".join(sys.argv), "rows": rows, "samples": samples})


if __name__ == "__main__":
    main()
