"""LoRA, QLoRA and bottleneck training on the embedded base, side by side.

Run: .venv/bin/python bench/train.py [--steps 10]

Same data (pirate.jsonl), same steps and batch size; each method in a fresh
process so its peak resident memory is its own. Reports tokens/s and peak
memory with ratios to LoRA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import BASE, bench_home, save, table


def child(method: str, steps: int) -> None:
    from pathlib import Path

    from zoo.catalog.registry import Registry
    from zoo.train import PACKAGE_DATA, TrainOptions, train

    home = Path(sys.argv[sys.argv.index("--home") + 1])
    result = train(TrainOptions(base=BASE, method=method, data=PACKAGE_DATA / "pirate.jsonl",
                                name=f"bench-{method}", steps=steps, lr=2e-3, eval_split=0.1),
                   Registry(home), progress=False, register=False)
    print(json.dumps(result.metrics))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", default=None)
    parser.add_argument("--home", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps)
    home = bench_home()
    from zoo.catalog.registry import Registry
    from zoo.quantize import quantize

    quantize(BASE, "nf4", Registry(home))  # made once, outside the timings
    rows = []
    for method in ("lora", "qlora", "bottleneck"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--steps",
                              str(args.steps), "--home", str(home)],
                             capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"method": method, "steps": m["steps"], "seconds": m["seconds"],
                     "tokens_per_s": m["tokens_per_second"], "peak_rss_mb": m["peak_rss_mb"],
                     "loss": f"{m['train_loss_first']} -> {m['train_loss']}",
                     "eval_loss": f"{m['eval_loss_before']} -> {m['eval_loss']}"})
    for row in rows:
        row["speed vs lora"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["memory vs lora"] = row["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    print(f"\n{BASE}, pirate.jsonl, {args.steps} steps of 4 examples, float32 compute "
          "(bf16 for QLoRA's 4-bit layers)")
    print(table(rows, ["method", "seconds", "tokens_per_s", "speed vs lora", "peak_rss_mb",
                       "memory vs lora", "loss", "eval_loss"]))
    save("train", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
