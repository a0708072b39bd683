"""The int8 base's linears on the CPU: vLLM's oneDNN GEMM against zoo's, and float32's.

Run: .venv/bin/python bench/int8_gemm.py [--rows 1,4,16,64,256] [--repeat 100] [--threads 1]

For each number of tokens (rows) and each of SmolLM2's four linear shapes (qkv 576 to 960,
o 576 to 576, gate_up 576 to 3,072, down 1,536 to 576), the median time of one W8A8
product of int8 activations (quantized by vLLM's own ``onednn_scaled_int8_quant``, not
timed) and full-range int8 weights: by vLLM's ``onednn_scaled_mm`` (the handler its CPU
kernel makes), by zoo's ``int8_gemm.cpp`` (zoo/serve/cpu_int8.py) on each of its two
loops ("rows": the weight read where it lies, all zoo had before the forty-third
session; "panels": the weight widened 32 outputs at a time) and on the one it picks by
the number of rows ("zoo"), and a float32 ``F.linear`` of the same shape (the 16-bit
base's linear under float32 activations). The contenders take three turns each, so the
machine's drift is shared. Per rows, a layer's four summed, zoo's over
oneDNN's and over float32's; and each int8 GEMM's largest error against the exact
product, over the exact product's largest magnitude (oneDNN's pair sums saturate on x86
without VNNI). Results in bench/results/int8_gemm.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import log, save, table

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def median_us(calls: dict, repeat: int, turns: int = 3) -> dict:
    """Each call's median time in microseconds: the calls take ``turns`` turns, each a
    few calls to warm up and then repeat/turns timed ones in a row (each contender finds
    its own data in the cache, as in a hot loop; the machine's drift is shared)."""
    times = {name: [] for name in calls}
    for _ in range(turns):
        for name, call in calls.items():
            for _ in range(3):
                call()
            for _ in range(max(1, repeat // turns)):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def measure(gemm, m: int, k: int, n: int, g, repeat: int, threads: int) -> tuple[dict, dict]:
    """(times, errors) of one shape at ``m`` rows: oneDNN's, zoo's and float32's."""
    import torch
    from vllm import _custom_ops as ops

    from zoo.serve import cpu_int8

    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.01
    handler = ops.create_onednn_scaled_mm(weight.t(), scales[:, None].contiguous(),
                                          torch.float32, True, False, 32)
    x = torch.randn(m, k, generator=g)
    x_q, x_scales, x_zero = ops.onednn_scaled_int8_quant(x, None, None, True)
    theirs, wide = torch.empty(m, n), weight.float()
    ours = {path: torch.empty(m, n) for path in ("rows", "panels", "auto")}

    def zoo(path):
        return lambda: gemm(x_q, x_scales, weight, scales, ours[path], None, threads, path)

    times = median_us({
        "oneDNN us": lambda: ops.onednn_scaled_mm(handler, x_q, theirs, x_scales, x_zero,
                                                  None, None),
        "zoo rows us": zoo("rows"), "zoo panels us": zoo("panels"), "zoo us": zoo("auto"),
        "float32 us": lambda: torch.nn.functional.linear(x, wide)}, repeat)
    exact = cpu_int8.reference(x_q, x_scales, weight, scales)

    def error(out) -> float:
        return float((out - exact).abs().max() / exact.abs().max())

    return times, {"oneDNN error": error(theirs),
                   "zoo error": max(error(out) for out in ours.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from zoo.serve import native

    torch.set_num_threads(args.threads)
    gemm = native.int8_gemm()
    if gemm is None or not gemm.avx2:
        raise SystemExit("zoo's int8 GEMM is not built for this CPU (x86 with AVX2)")
    g = torch.Generator().manual_seed(0)
    rows_out, layers = [], []
    for m in (int(r) for r in args.rows.split(",")):
        layer = {"rows": m, "oneDNN us": 0.0, "zoo rows us": 0.0, "zoo panels us": 0.0,
                 "zoo us": 0.0, "float32 us": 0.0}
        for name, (k, n) in SHAPES.items():
            times, errors = measure(gemm, m, k, n, g, args.repeat, args.threads)
            rows_out.append({"rows": m, "shape": name, **times,
                             "zoo vs oneDNN": times["oneDNN us"] / times["zoo us"], **errors})
            for key, value in times.items():
                layer[key] += value
            log(f"{m} rows, {name}: {times}")
        layer["zoo vs oneDNN"] = layer["oneDNN us"] / layer["zoo us"]
        layer["zoo vs float32"] = layer["float32 us"] / layer["zoo us"]
        layer["panels vs rows"] = layer["zoo rows us"] / layer["zoo panels us"]
        layers.append(layer)
    print("\nper shape (us, median; 'vs' is how many times faster zoo's is)")
    print(table(rows_out, ["rows", "shape", "oneDNN us", "zoo rows us", "zoo panels us",
                           "zoo us", "float32 us", "zoo vs oneDNN", "oneDNN error",
                           "zoo error"]))
    print("\na layer's four linears")
    print(table(layers, ["rows", "oneDNN us", "zoo rows us", "zoo panels us", "zoo us",
                         "float32 us", "panels vs rows", "zoo vs oneDNN", "zoo vs float32"]))
    save("int8_gemm", {"threads": args.threads, "repeat": args.repeat, "shapes": rows_out,
                       "layers": layers})


if __name__ == "__main__":
    main()
