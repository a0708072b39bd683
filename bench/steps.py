"""The engine's own throughput with 64 adapters against the base, two zoo commits in turn.

Run: .venv/bin/python bench/steps.py [--previous COMMIT | --catalog-layers] [--rounds 8]
     [--adapters 64] [--tokens 32]

bench/serve.py times bursts through the HTTP server, one engine after the other; on this
2-core machine one engine's bursts drift by more than a change of a few percent between
minutes, and a change then reads as noise. This runs the same load on two engines at once,
in turn: one vLLM engine per variant, each in its own process with its worker in it
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), on `zoo serve`'s plan (the int8 base, its
smoothing, the slots, kept-loaded adapters, rank, dtypes and LoRA layers zoo chooses, zoo's
scheduler and the plugin's patches): this tree's zoo and --previous's (from its worktree),
or with --catalog-layers this tree twice: LoRA layers on every module vLLM can adapt (the
default) and only on what the catalog trains (``zoo serve --lora-targets catalog``).
Each round, in alternating order, each engine generates --adapters requests x --tokens
tokens (``min_tokens``, ``ignore_eos``, greedy; the served bench's chat prompt) three
ways: on the base, on --adapters adapters it has loaded (warm), and on as many it has
never used (cold: loaded in that burst; while the catalog of 1,000 has such adapters
left). Each engine's ratio to its own base burst of the same round, the median over
rounds; no HTTP server, no API process: the engine's steps and first uses only. Results
in bench/results/steps.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MARK = "steps:"  # the engine's answers, among whatever vLLM prints
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def engine_main(spec: dict) -> None:
    """One variant's engine (``spec``: common.engine_plan's): answers a JSON line
    ``{"start", "count", "tokens"}`` (start -1: the base) with one of seconds and tokens
    generated."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["ZOO_SERVE_MODEL_DIR"] = spec["llm"]["model"]  # the smoothed base's rescale
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    catalog = spec["catalog"]
    names = sorted(os.listdir(catalog))
    llm = LLM(**spec["llm"], kv_cache_memory_bytes=2 << 30,
              scheduler_cls="zoo.serve.fair.FairScheduler")
    prompt = llm.get_tokenizer().apply_chat_template(PROMPT, tokenize=False,
                                                     add_generation_prompt=True)
    import zoo

    print(MARK, "ready", zoo.__file__, flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        count, tokens = ask["count"], ask["tokens"]
        loras = None if ask["start"] < 0 else [
            LoRARequest(names[i], i + 1, os.path.join(catalog, names[i]))
            for i in range(ask["start"], ask["start"] + count)]
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                                temperature=0)
        started = time.perf_counter()
        outputs = llm.generate([prompt] * count, params, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - started
        made = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(MARK, json.dumps({"seconds": seconds, "tokens": made}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--previous", default="a9b3306")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--catalog-layers", action="store_true",
                        help="Instead of --previous: this tree with LoRA layers on every "
                             "module (the default) against on what the catalog trains.")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return engine_main(json.loads(args.engine))

    # here, not at the top: common puts this repository first on sys.path, and an engine
    # of --previous must import zoo from that commit's worktree
    from common import answer, engine_plan, engines_of, save, table

    plan, adapters, engine_args = engine_plan()
    n = args.adapters
    cold_rounds = min(args.rounds, len(os.listdir(adapters)) // n - 1)  # fresh ones left
    variants = None
    if args.catalog_layers:
        from zoo.serve.policy import TARGETS_VARIABLE

        spec = json.loads(engine_args[0])
        trained = plan.env[TARGETS_VARIABLE].split(",")
        some = {**spec, "llm": {**spec["llm"], "lora_target_modules": trained}}
        variants = {"zoo (LoRA layers on all)": engine_args,
                    f"zoo (LoRA layers on {','.join(trained)})": [json.dumps(some)]}
    with engines_of("steps.py", engine_args, args.previous, MARK, variants) as engines:
        def burst(label: str, start: int) -> float:
            process = engines[label]
            process.stdin.write(json.dumps({"start": start, "count": n,
                                            "tokens": args.tokens}) + "\n")
            process.stdin.flush()
            done = json.loads(answer(process, MARK))
            if done["tokens"] != n * args.tokens:
                raise SystemExit(f"{label}: {done['tokens']} tokens, not {n * args.tokens}")
            return done["tokens"] / done["seconds"]

        for label in engines:  # warm-up: the base's shapes, then the warm set's first use
            burst(label, -1)
            burst(label, 0)
        results = {label: {"base": [], "warm": [], "cold": []} for label in engines}
        for round_number in range(args.rounds):
            order = list(engines) if round_number % 2 == 0 else list(reversed(engines))
            cold_start = (round_number + 1) * n  # never used by either engine
            for label in order:
                base = burst(label, -1)
                results[label]["base"].append(base)
                results[label]["warm"].append(burst(label, 0) / base)
                if round_number < cold_rounds:
                    results[label]["cold"].append(burst(label, cold_start) / base)
            print(f"round {round_number + 1}: " + "; ".join(
                f"{label} warm {r['warm'][-1]:.3f}" +
                (f" cold {r['cold'][-1]:.3f}" if round_number < cold_rounds else "")
                for label, r in results.items()), file=sys.stderr)

    rows = [{"variant": label, "base tok/s": statistics.median(r["base"]),
             "warm tok/s": statistics.median(
                 [w * b for w, b in zip(r["warm"], r["base"], strict=True)]),
             "warm vs base": statistics.median(r["warm"]),
             "cold vs base": statistics.median(r["cold"]),
             "warm range": f"{min(r['warm']):.3f}-{max(r['warm']):.3f}",
             "cold range": f"{min(r['cold']):.3f}-{max(r['cold']):.3f}"}
            for label, r in results.items()]
    print(f"\n{n} requests x {args.tokens} tokens on {n} distinct adapters, each engine's "
          f"ratio to its own base burst of the round, median of {args.rounds} rounds "
          f"({cold_rounds} cold)")
    print(table(rows, list(rows[0])))
    save("steps", {"command": " ".join(sys.argv), "rows": rows, "rounds": results,
                   "max_loras": plan.max_loras, "max_cpu_loras": plan.max_cpu_loras})


if __name__ == "__main__":
    main()
