"""The int8 base's quality off its calibration's domain: every held-out text, every setting.

Run: .venv/bin/python bench/domains.py [--settings before,broad,default,rtn,alpha-0.8,
     damping-0.1,damping-0.001,gptq-2-sequences,8-bit,7-bit,...]   (SETTINGS below)

Perplexity of each held-out text zoo ships (zoo/data/domains: prose, dialogue, code,
formal writing, technical documentation, Spanish; and zoo/data/heldout.txt), served by
vLLM (prompt_logprobs), on the 16-bit base and on W8A8 variants written with other
settings of the writer, each in its own home and engine. Prints each variant's ratio to
the 16-bit perplexity per text, its worst, the layers it keeps in 16 bits and its output
tokens/s (64 concurrent requests x 32 tokens) over the 16-bit base's; results in
bench/results/domains.json.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import sys
from pathlib import Path

from common import BASE, bench_home, log, save, table
from quantize import variant_home
from serve import burst

SPEED = "tok/s, 64 x 32"  # output tokens/s of 64 concurrent requests, median of 3

SETTINGS = {  # name: (calibrate, the W8A8 writer's keyword arguments)
    "rtn": (False, {}),
    # the default before the held-out domains: English prose and chats, a 10% threshold
    "before": (True, {"calibration": "narrow", "tolerance": 0.10}),
    "broad": (True, {"tolerance": 0.10}),  # other languages, code and letters too
    "default": (True, {}),  # and the worst eighth of the layers in 16 bits
    "alpha-0.8": (True, {"alpha": 0.8}),
    # GPTQ: its damping (default 0.01 of H's mean diagonal) and how much text its
    # Hessians see (default: all 11 sequences of 512 tokens)
    "damping-0.1": (True, {"damping": 0.1}),
    "damping-0.001": (True, {"damping": 0.001}),
    "gptq-2-sequences": (True, {"gptq_sequences": 2}),
    # the weights' width, whatever this CPU's kernel computes exactly (default: 7 bits on
    # x86 without VNNI, where vLLM's int8 kernel saturates 8-bit weights' products)
    "8-bit": (True, {"bits": 8}),
    "7-bit": (True, {"bits": 7}),  # and SmoothQuant's alpha for 7 bits
    "7-bit-alpha-0.5": (True, {"bits": 7, "alpha": 0.5}),
    "7-bit-keep-quarter": (True, {"bits": 7, "keep_at_most": 0.25}),
    "7-bit-alpha-0.35": (True, {"bits": 7, "alpha": 0.35}),
    "7-bit-alpha-0.65": (True, {"bits": 7, "alpha": 0.65}),
    "7-bit-alpha-0.8": (True, {"bits": 7, "alpha": 0.8}),
    "7-bit-alpha-0.65-keep-quarter": (True, {"bits": 7, "alpha": 0.65, "keep_at_most": 0.25}),
    # 8-bit weights on oneDNN's VNNI kernel (an AVX-512 CPU without AMX)
    "8-bit-keep-quarter": (True, {"bits": 8, "keep_at_most": 0.25}),
    "8-bit-alpha-0.65": (True, {"bits": 8, "alpha": 0.65}),
    "8-bit-alpha-0.65-keep-quarter": (True, {"bits": 8, "alpha": 0.65, "keep_at_most": 0.25}),
    # 8-bit weights on zoo's exact GEMM (x86 without VNNI, float32 activations)
    "8-bit-alpha-0.8": (True, {"bits": 8, "alpha": 0.8}),
    "8-bit-alpha-0.65-keep-0.19": (True, {"bits": 8, "alpha": 0.65, "keep_at_most": 0.1875}),
    "8-bit-alpha-0.8-keep-0.19": (True, {"bits": 8, "alpha": 0.8, "keep_at_most": 0.1875}),
    "8-bit-alpha-0.75": (True, {"bits": 8, "alpha": 0.75}),
}


def narrow_calibration(home) -> Path:
    """The calibration zoo shipped before the other languages, code and letters: English
    prose and the chat examples (a plain text file of the same paragraphs)."""
    from zoo.models.data import CALIBRATION_CHATS, CALIBRATION_TEXT, texts_of

    texts = texts_of(CALIBRATION_TEXT)
    for jsonl in sorted(CALIBRATION_CHATS.glob("*.jsonl")):
        texts += texts_of(jsonl)
    path = home.parent / "calibration-narrow.txt"
    path.write_text("\n\n".join(texts))
    return path


def perplexities(home, quantization: str, log) -> dict[str, tuple[float, int]]:
    from zoo.apps.evaluate import held_out_domains, nll_served, sequences
    from zoo.catalog.loading import load_tokenizer
    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, free_port, running_server

    registry = Registry(home)
    tokenizer = load_tokenizer(home / registry.load().base(BASE).path)
    texts = {d: sequences(tokenizer, p) for d, p in held_out_domains().items()}
    options = ServeOptions(base=BASE, quantization=quantization, port=free_port())
    with running_server(options, registry, log=log) as server:
        scored = {d: nll_served(server.url, BASE, s) for d, s in texts.items()}
        asyncio.run(burst(server.url, [BASE] * 8, 8, 8))  # warm-up
        speed = statistics.median(asyncio.run(burst(server.url, [BASE] * 64, 32, 64))["tok_per_s"]
                                  for _ in range(3))
    out = {d: (math.exp(total / count), count) for d, (total, count) in scored.items()}
    return out | {SPEED: (speed, 0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", default="before,broad,default")
    args = parser.parse_args()
    from zoo.catalog.registry import Registry

    home = bench_home()
    names = args.settings.split(",")
    homes = {}
    for name in names:
        calibrate, settings = SETTINGS[name]
        if settings.get("calibration") == "narrow":  # what zoo calibrated on before
            settings = {**settings, "calibration": narrow_calibration(home)}
        # written afresh: a variant home is reused by label, and the shipped data may change
        shutil.rmtree(home.parent / f"{home.name}-w8a8-{name}", ignore_errors=True)
        homes[name] = variant_home(home, f"w8a8-{name}", calibrate, log, **settings)
    full = perplexities(homes[names[0]], "none", log)
    cheap = {name: perplexities(h, "w8a8", log) for name, h in homes.items()}
    rows = []
    speed = full.pop(SPEED)[0]
    speeds = {"text": SPEED, "tokens": "", "16-bit": speed}
    speeds.update({name: cheap[name].pop(SPEED)[0] / speed for name in names})
    for domain, (ppl, tokens) in full.items():
        row = {"text": domain, "tokens": tokens, "16-bit": ppl}
        row.update({name: cheap[name][domain][0] / ppl for name in names})
        rows.append(row)
    worst = {"text": "worst", "tokens": "", "16-bit": ""}
    worst.update({name: max(r[name] for r in rows) for name in names})
    kept = {"text": "16-bit layers", "tokens": "", "16-bit": ""}
    for name, h in homes.items():
        q = Registry(h).load().base(BASE).variants["w8a8"].quantization
        kept[name] = len(q.get("kept_16bit", []))
    print("\nperplexity of each held-out text on W8A8 over the 16-bit base's, served by vLLM")
    print(table(rows + [worst, kept, speeds], ["text", "tokens", "16-bit", *names]))
    save("domains", {"command": " ".join(sys.argv), "rows": rows, "worst": worst,
                     "speed_vs_16bit": speeds,
                     "kept_16bit": kept, "settings": {n: str(SETTINGS[n]) for n in names}})


if __name__ == "__main__":
    main()
