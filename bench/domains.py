"""The int8 base's quality off its calibration's domain: every held-out text, every setting.

Run: .venv/bin/python bench/domains.py [--settings default,rtn,alpha-0.8,tolerance-0.05]

Perplexity of each held-out text zoo ships (zoo/data/domains: prose, dialogue, code,
formal writing, technical documentation, Spanish; and zoo/data/heldout.txt), served by
vLLM (prompt_logprobs), on the 16-bit base and on W8A8 variants written with other
settings of the writer, each in its own home and engine. Prints each variant's ratio to
the 16-bit perplexity per text, and its worst; results in bench/results/domains.json.
"""

from __future__ import annotations

import argparse
import math
import sys

from common import BASE, bench_home, save, table
from quantize import variant_home

SETTINGS = {  # name: (calibrate, the W8A8 writer's keyword arguments)
    "rtn": (False, {}),
    "default": (True, {}),
    "alpha-0.8": (True, {"alpha": 0.8}),
    "alpha-0.3": (True, {"alpha": 0.3}),
    "tolerance-0.05": (True, {"tolerance": 0.05}),
}


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
    return {d: (math.exp(total / count), count) for d, (total, count) in scored.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", default="rtn,default,alpha-0.8,alpha-0.3,tolerance-0.05")
    args = parser.parse_args()
    from zoo.catalog.registry import Registry

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    home = bench_home()
    names = args.settings.split(",")
    homes = {name: variant_home(home, f"w8a8-{name}", SETTINGS[name][0], log,
                                **SETTINGS[name][1]) for name in names}
    full = perplexities(homes[names[0]], "none", log)
    cheap = {name: perplexities(h, "w8a8", log) for name, h in homes.items()}
    rows = []
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
    print(table(rows + [worst, kept], ["text", "tokens", "16-bit", *names]))
    save("domains", {"command": " ".join(sys.argv), "rows": rows, "worst": worst,
                     "kept_16bit": kept, "settings": {n: SETTINGS[n] for n in names}})


if __name__ == "__main__":
    main()
