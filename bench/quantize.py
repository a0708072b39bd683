"""The quantized bases side by side: quality, speed and memory of each variant.

Run: .venv/bin/python bench/quantize.py [--requests 64] [--tokens 32]

For the 16-bit base, W8A8 as zoo wrote it before (round to nearest) and the
calibrated W8A8 (SmoothQuant, worst layers in 16 bits), each served by its own
engine: perplexity on zoo's held-out text through vLLM's prompt_logprobs, output
tokens/s of --requests concurrent requests x --tokens tokens, the weights' memory
as the vLLM worker measured it, and the held-out loss of the demo pirate adapter
(bench/data/pirate-heldout.jsonl). NF4 (QLoRA's base) cannot be served here: its
perplexity and the adapter's loss come from transformers, beside the 16-bit
base's in transformers. One run, ratios to 16-bit printed; results in
bench/results/quantize.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

from common import BASE, ROOT, bench_home, log, save, table
from serve import burst

PIRATE = "demo/pirate"
PIRATE_DATA = ROOT / "bench" / "data" / "pirate-heldout.jsonl"


def variant_home(home: Path, label: str, calibrate: bool, log, **settings) -> Path:
    """A home sharing the base's files (hard links) whose w8a8 variant is ``label``'s,
    written with ``settings`` of the W8A8 writer (alpha, tolerance) where given."""
    import functools

    import zoo.quantize
    from zoo.catalog.registry import Registry
    from zoo.quantize import quantize
    from zoo.quantize.w8a8 import write_w8a8

    target = home.parent / f"{home.name}-{label}"
    if not (target / "registry.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for sub in ("bases", f"adapters/{PIRATE}"):
            if not (home / sub).exists():  # the pirate: only where it was pulled
                continue
            shutil.copytree(home / sub, target / sub, copy_function=os.link,
                            ignore=shutil.ignore_patterns("*@w8a8"))
        shutil.copy(home / "registry.json", target / "registry.json")
        registry = Registry(target)
        with registry.edit() as catalog:
            base = catalog.base(BASE)
            catalog.entries[BASE] = replace(base, variants={
                k: v for k, v in base.variants.items() if k != "w8a8"})
            for name in [a.name for a in catalog.adapters() if a.name != PIRATE]:
                del catalog.entries[name]
        # quantize() passes its own calibration and width
        calibration, bits = settings.pop("calibration", None), settings.pop("bits", None)
        zoo.quantize.write_w8a8 = functools.partial(write_w8a8, **settings)
        try:
            quantize(BASE, "w8a8", registry, calibrate=calibrate, log=log,
                     calibration=calibration, bits=bits)
        finally:
            zoo.quantize.write_w8a8 = write_w8a8
    return target


def served(home: Path, quantization: str, args, log) -> dict:
    from zoo.apps.evaluate import nll_served, sequences
    from zoo.catalog.loading import load_tokenizer
    from zoo.catalog.registry import Registry
    from zoo.models.data import HELDOUT_TEXT
    from zoo.serve.launch import ServeOptions, free_port, running_server

    registry = Registry(home)
    tokenizer = load_tokenizer(home / registry.load().base(BASE).path)
    text, chat = sequences(tokenizer, HELDOUT_TEXT), sequences(tokenizer, PIRATE_DATA)
    options = ServeOptions(base=BASE, quantization=quantization, port=free_port())
    with running_server(options, registry, log=log) as server:
        total, count = nll_served(server.url, BASE, text)
        a_total, a_count = nll_served(server.url, PIRATE, chat)
        asyncio.run(burst(server.url, [BASE] * 4, 8, 4))
        speed = asyncio.run(burst(server.url, [BASE] * args.requests, args.tokens,
                                  args.requests))
        engine = json.load(urllib.request.urlopen(server.url.removesuffix("/v1") + "/zoo/engine"))
    return {"perplexity": math.exp(total / count), "tokens": count,
            "adapter_loss": a_total / a_count, "tok_per_s": speed["tok_per_s"],
            "weights_mb": (engine["weights"] or {}).get("heap_bytes", 0) / 1e6,
            "kept_16bit": None}


def in_transformers(home: Path, variant: str) -> dict:
    from zoo.apps.evaluate import nll_transformers, sequences
    from zoo.catalog.loading import load_adapted, load_model, load_tokenizer
    from zoo.catalog.registry import Registry
    from zoo.models.data import HELDOUT_TEXT

    registry = Registry(home)
    catalog = registry.load()
    base = catalog.base(BASE)
    tokenizer = load_tokenizer(home / base.path)
    total, count = nll_transformers(load_model(registry, base, variant),
                                    sequences(tokenizer, HELDOUT_TEXT))
    model, _ = load_adapted(registry, catalog.adapter(PIRATE), variant=variant)
    a_total, a_count = nll_transformers(model, sequences(tokenizer, PIRATE_DATA))
    return {"perplexity": math.exp(total / count), "tokens": count,
            "adapter_loss": a_total / a_count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    from zoo.apps.pull import pull
    from zoo.catalog.registry import Registry
    from zoo.quantize import quantize

    home = bench_home()
    registry = Registry(home)
    pull(PIRATE, registry=registry, log=log)
    quantize(BASE, "nf4", registry, log=log)
    plain = variant_home(home, "w8a8-plain", calibrate=False, log=log)
    calibrated = variant_home(home, "w8a8-calibrated", calibrate=True, log=log)
    rows = [{"variant": "16-bit (float32 compute)", **served(plain, "none", args, log)},
            {"variant": "W8A8, round to nearest (before)", **served(plain, "w8a8", args, log)},
            {"variant": "W8A8, calibrated (default)", **served(calibrated, "w8a8", args, log)}]
    q = Registry(calibrated).load().base(BASE).variants["w8a8"].quantization
    rows[2]["kept_16bit"] = len(q.get("kept_16bit", []))
    for row in rows:
        row["vs 16-bit"] = row["perplexity"] / rows[0]["perplexity"]
        row["speed vs 16-bit"] = row["tok_per_s"] / rows[0]["tok_per_s"]
    reference = {"variant": "16-bit, transformers", **in_transformers(home, "original")}
    nf4 = {"variant": "NF4, transformers", **in_transformers(home, "nf4")}
    nf4["vs 16-bit"] = nf4["perplexity"] / reference["perplexity"]
    reference["vs 16-bit"] = 1.0
    print(f"\nheld-out perplexity ({rows[0]['tokens']} tokens of zoo/data/heldout.txt), served "
          f"tok/s ({args.requests} requests x {args.tokens} tokens), weights in the vLLM worker, "
          f"held-out loss of {PIRATE}")
    print(table(rows, ["variant", "perplexity", "vs 16-bit", "tok_per_s", "speed vs 16-bit",
                       "weights_mb", "adapter_loss", "kept_16bit"]))
    print(table([reference, nf4], ["variant", "perplexity", "vs 16-bit", "adapter_loss"]))
    print(f"\ncalibrated W8A8: worst int8 layer error {q['worst_int8_error_before_smoothing']} "
          f"before smoothing, {q['worst_int8_error']} after; kept in 16 bits: "
          f"{', '.join(q['kept_16bit']) or 'none'}")
    save("quantize", {"command": " ".join(sys.argv), "served": rows,
                      "transformers": [reference, nf4], "calibration": q})


if __name__ == "__main__":
    main()
