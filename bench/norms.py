"""RMSNorm and the rotary embedding on the CPU: vLLM's PyTorch path, its C++ kernel as it is, and zoo's.

Run: .venv/bin/python bench/norms.py [--rows 1,64,2048] [--repeat 200] [--threads 1]

For each activation dtype and number of rows of SmolLM2's width (576), the median time of
one fused add-and-norm (the 60 of every step but the first) by vLLM's ``native`` provider
(PyTorch operations), by ``torch.ops._C.fused_add_rms_norm`` called directly, and by zoo's
``zoo_cpu`` provider (zoo/serve/cpu_norms.py: the kernel, or, for a 16-bit dtype the
kernel truncates to on this CPU, the kernel in float32 rounded by torch), with zoo's over
native and over the kernel. Then the same for the rotary embedding of as many tokens
(SmolLM2's 9 query and 3 key heads of 64): vLLM's ``forward_native``, the kernel called
directly, and ``forward_cpu`` as zoo serve runs it (zoo/serve/cpu_rotary.py: vLLM's, or,
for a 16-bit dtype the kernel truncates to on this CPU, the kernel on float32 copies).
Results in bench/results/norms.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import log, save, table

WIDTH = 576  # SmolLM2-135M's hidden size
HEAD, QUERY_HEADS, KEY_HEADS = 64, 9, 3  # and its attention's


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
    rotary = rotary_rows([int(r) for r in args.rows.split(",")], args.repeat)
    columns = ["dtype", "rows", "widened here", "native us", "kernel us", "zoo us",
               "zoo vs native", "zoo vs kernel"]
    print(table(rows_out, columns))
    print(table(rotary, columns))
    save("norms", {"command": f"bench/norms.py --rows {args.rows} --repeat {args.repeat} "
                              f"--threads {args.threads}", "rows": rows_out,
                   "rotary": rotary})


def rotary_rows(token_counts: list[int], repeat: int) -> list[dict]:
    """The rotary embedding's rows of the table, for each dtype and number of tokens."""
    import torch
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from zoo.serve import cpu_rotary, patches, plugin
    from zoo.serve.launch import CPU_COMPILATION

    patches.install([plugin.CPU_ROTARY])
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        # one module for each path: each keeps its cos/sin cache in the dtype it rotates in
        with set_current_vllm_config(VllmConfig(
                compilation_config=CompilationConfig(**CPU_COMPILATION))):
            native, served = (RotaryEmbedding(HEAD, HEAD, 8192, 100000.0, True, dtype)
                              for _ in range(2))
        cache = native.cos_sin_cache.to(dtype)
        for tokens in token_counts:
            g = torch.Generator().manual_seed(tokens)
            inputs = [torch.randint(0, 8192, (tokens,), generator=g),
                      *(torch.randn(tokens, heads * HEAD, generator=g).to(dtype)
                        for heads in (QUERY_HEADS, KEY_HEADS))]
            row = {"dtype": str(dtype).removeprefix("torch."), "rows": tokens,
                   "widened here": dtype in cpu_rotary._WIDENED}
            for name, call in (
                    ("native us", native.forward_native),
                    ("kernel us", lambda p, q, k, c=cache: torch.ops._C.rotary_embedding(
                        p, q, k, HEAD, c, True)),
                    ("zoo us", served.forward_cpu)):
                row[name] = median_us(call, inputs, repeat)
            row["zoo vs native"] = row["zoo us"] / row["native us"]
            row["zoo vs kernel"] = row["zoo us"] / row["kernel us"]
            out.append(row)
            log(f"rotary {row['dtype']} x {tokens}: done")
    return out


if __name__ == "__main__":
    main()
