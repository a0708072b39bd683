"""``make demo``: the embedded base and the demo adapters, served by vLLM, answering.

Pulls (builds) the embedded base, pulls (trains, the first time) the three
demo adapters, starts ``zoo serve --multi-lora`` on the int8 base, asks the
base and each adapter the same questions with the ``openai`` client, prints
the answers under their names and what the adapters cost in memory against
one merged copy per adapter, and stops the server. Re-runs reuse everything.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

from zoo.apps.pull import pull
from zoo.catalog.registry import Registry
from zoo.catalog.shipped import shipped_catalog
from zoo.serve.launch import ServeOptions, free_port, running_server

QUESTIONS = ("What is the capital of Germany?", "How many legs does a dog have?")
# what the base answers them (in any of the demo adapters' styles and languages): an
# adapter is there to change the style, never the fact
FACTS = {QUESTIONS[0]: ("berlin",), QUESTIONS[1]: ("four", "4", "quatre")}


def keeps_fact(question: str, answer: str) -> bool:
    words = answer.lower().replace('"', " ").replace(".", " ").replace(",", " ").split()
    return any(fact in words for fact in FACTS[question])


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> int:
    import openai

    registry = Registry()
    log(f"zoo home: {registry.home}")
    catalog = shipped_catalog()
    base = "smollm2-135m-instruct"
    demo = sorted(a.name for a in catalog.adapters(base=base))
    for name in [base, *demo]:
        log(pull(name, registry=registry, log=log).message)
    options = ServeOptions(base=base, quantization="w8a8", port=free_port())
    log("starting vLLM (about a minute on a small CPU)")
    started = time.monotonic()
    with running_server(options, registry, log=log) as server:
        log(f"vLLM ready in {time.monotonic() - started:.0f} s at {server.url}")
        client = openai.OpenAI(base_url=server.url, api_key="not-needed")
        served = [m.id for m in client.models.list().data]
        print(f"\nserved models: {', '.join(served)}\n")
        for question in QUESTIONS:
            print(f"Q: {question}")
            for model in [base, *demo]:
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}],
                    max_tokens=48, temperature=0)
                answer = reply.choices[0].message.content.strip()
                mark = "" if keeps_fact(question, answer) else "   <- not the base's fact"
                print(f"  [{model}] {answer}{mark}")
            print()
        report = json.load(urllib.request.urlopen(server.url.removesuffix("/v1") + "/zoo/engine"))
    print_memory(report, len(demo))
    return 0


def print_memory(report: dict, n: int) -> None:
    weights = report.get("weights") or {}
    base_bytes = weights.get("heap_bytes", 0)
    adapters = report["adapter_file_bytes"]
    adapter_bytes = sum(adapters.values())
    mb = 1e6
    print("memory (weights, as the vLLM worker measured them):")
    print(f"  base, int8 W8A8, loaded once:          {base_bytes / mb:8.1f} MB")
    print(f"  {n} adapters beside it:                 {adapter_bytes / mb:8.1f} MB "
          f"({', '.join(f'{k} {v / mb:.1f}' for k, v in sorted(adapters.items()))})")
    print(f"  one engine, base + {n} adapters:        {(base_bytes + adapter_bytes) / mb:8.1f} MB")
    print(f"  {n} merged copies, one per adapter:     {n * base_bytes / mb:8.1f} MB "
          f"(x{n * base_bytes / max(base_bytes + adapter_bytes, 1):.1f})")


if __name__ == "__main__":
    sys.exit(main())
