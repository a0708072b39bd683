"""The LoRA layers' routes (``zoo/serve/layer_routes.py``) on and off in one engine, round
by round: the same minute of the machine for every way.

Run: .venv/bin/python bench/routes.py [--rounds 8] [--adapters 64]

Bursts of whole engines on this kind of machine drift by tens of percent from one minute
to the next, and two engines started minutes apart can land in different minutes. Here
one offline vLLM engine (in this process, its worker too, on the benchmarks' int8 base
with zoo's plugin, as ``zoo serve`` sets it up: LoRA stacks, rank and slots for the
catalog's rank-8 q/v adapters) serves every round a burst of --adapters requests x 32
tokens on the base and one on --adapters adapters (warm: loaded in the warm-up), once
each way, the ways taking turns:

* ``vllm``: no routes (every layer runs vLLM's LoRA forward, as with
  ``ZOO_LAYER_ROUTES=0``);
* ``idle``: layers no adapter of the step trains run as their base layers, the others
  vLLM's forward;
* ``routes``: that, and the others straight from their base's forward to the kernel
  (the default).

It prints each way's median burst seconds and the median of its rounds' base/warm ratios,
and each way's bursts against ``vllm``'s of the same rounds. Results in
bench/results/routes.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import BASE, log, median_interval, save, table

TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=64)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process

    from serve import served_catalog
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from zoo.serve import layer_routes
    from zoo.serve.launch import CPU_COMPILATION, activation_dtype, lora_dtype

    home, _, _ = served_catalog()
    folder = home / "bench-catalog"
    paths = [folder / f"a{i:04d}" for i in range(args.adapters)]
    dtype = activation_dtype("auto")
    llm = LLM(model=str(home / "bases" / f"{BASE}@w8a8"), enable_lora=True, max_lora_rank=8,
              max_loras=args.adapters, max_cpu_loras=2 * args.adapters, dtype=dtype,
              lora_dtype=lora_dtype(dtype), compilation_config=CPU_COMPILATION,
              gpu_memory_utilization=0.5, max_model_len=512, kv_cache_memory_bytes=4 << 30)
    sampling = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    prompts = ["Write a short note about the sea."] * args.adapters
    route, straight = layer_routes.route, layer_routes._straight_to_the_kernel

    def no_routes(manager) -> None:
        for module in manager.modules.values():
            module.__dict__.pop("forward", None)

    ways = {"vllm": (no_routes, straight), "idle": (route, lambda layer, kernel: None),
            "routes": (route, straight)}
    seconds = {way: {"base": [], "warm": []} for way in ways}
    llm.generate(prompts, sampling, lora_request=loras, use_tqdm=False)  # loads: warm after
    try:
        for number in range(args.rounds):
            for way, (routing, kernel_route) in ways.items():
                layer_routes.route, layer_routes._straight_to_the_kernel = routing, kernel_route
                for kind, requests in (("base", None), ("warm", loras)):
                    started = time.perf_counter()
                    llm.generate(prompts, sampling, lora_request=requests, use_tqdm=False)
                    seconds[way][kind].append(time.perf_counter() - started)
            log(f"round {number}: " + ", ".join(
                f"{way} {s['base'][-1]:.2f}/{s['warm'][-1]:.2f} s" for way, s in seconds.items()))
    finally:
        layer_routes.route, layer_routes._straight_to_the_kernel = route, straight

    rows = []
    for way, s in seconds.items():
        ratios = [b / w for b, w in zip(s["base"], s["warm"], strict=True)]
        low, high = median_interval(ratios)
        rows.append({
            "way": way, "rounds": args.rounds,
            "base s": round(statistics.median(s["base"]), 3),
            "warm s": round(statistics.median(s["warm"]), 3),
            "warm/base ratio": round(statistics.median(ratios), 3),
            "ratio 95%": f"{low:.3f}-{high:.3f}",
            "base vs vllm": round(statistics.median(
                [v / b for b, v in zip(s["base"], seconds["vllm"]["base"], strict=True)]), 3),
            "warm vs vllm": round(statistics.median(
                [v / w for w, v in zip(s["warm"], seconds["vllm"]["warm"], strict=True)]), 3)})
    print(table(rows, list(rows[0])))
    print("(ratio: base s / warm s of a round; vs vllm: vllm's s / this way's s, the same "
          "round: above 1 is faster)")
    save("routes", {"adapters": args.adapters, "tokens": TOKENS,
                    "dtype": dtype, "rows": rows, "seconds": seconds})


if __name__ == "__main__":
    main()
