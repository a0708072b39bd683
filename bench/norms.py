"""RMSNorm on the CPU: vLLM's native provider, its C++ kernel as it is, and zoo's provider.

Run: .venv/bin/python bench/norms.py [--rows 1,64,2048] [--repeat 200] [--threads 1]

For each activation dtype and number of rows of SmolLM2's width (576), the median time of
one fused add-and-norm (the 60 of every step but the first) by vLLM's ``native`` provider
(PyTorch operations), by ``torch.ops._C.fused_add_rms_norm`` called directly, and by zoo's
``zoo_cpu`` provider (zoo/serve/cpu_norms.py: the kernel, or, for a 16-bit dtype the
kernel truncates to on this CPU, the kernel in float32 rounded by torch), with zoo's over
native and over the kernel. Results in bench/results/norms.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import log, save, table

WIDTH = 576  # SmolLM2-135M's hidden size


def median_us(call, inputs, repeat: int) -> float:
    """The median time of ``call`` over ``repeat`` calls, each on its own fresh copies of
    ``inputs`` (the fused op writes them in place)."""
    times = []
    for _ in range(repeat):
        args = [t.clone() for t in inputs]
        start = time.perf_counter()
        call(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,2048")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from vllm import ir

    from zoo.serve import cpu_norms

    torch.set_num_threads(args.threads)
    cpu_norms.register()
    native = ir.ops.fused_add_rms_norm.impls["native"].impl_fn
    raw = torch.ops._C.fused_add_rms_norm

    rows_out = []
    for dtype in (torch.bfloat16, torch.float32):
        widened = dtype is not torch.float32 and cpu_norms.truncates(dtype)
        for rows in map(int, args.rows.split(",")):
            g = torch.Generator().manual_seed(rows)
            inputs = [torch.randn(rows, WIDTH, generator=g).to(dtype) for _ in range(2)]
            weight = torch.randn(WIDTH, generator=g).to(dtype)
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": rows,
                   "widened here": widened}
            for name, call in (("native us", native), ("kernel us", raw),
                               ("zoo us", cpu_norms.fused_add_rms_norm)):
                row[name] = median_us(lambda x, r, c=call, w=weight: c(x, r, w, 1e-5), inputs,
                                      args.repeat)
            row["zoo vs native"] = row["zoo us"] / row["native us"]
            row["zoo vs kernel"] = row["zoo us"] / row["kernel us"]
            rows_out.append(row)
            log(f"{row['dtype']} x {rows}: done")
    columns = ["dtype", "rows", "widened here", "native us", "kernel us", "zoo us",
               "zoo vs native", "zoo vs kernel"]
    print(table(rows_out, columns))
    save("norms", {"command": f"bench/norms.py --rows {args.rows} --repeat {args.repeat} "
                              f"--threads {args.threads}", "rows": rows_out})


if __name__ == "__main__":
    main()
