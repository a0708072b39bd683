"""What int8 LoRA rows change in an adapter's output, beside what 16-bit activations change.

Run: .venv/bin/python bench/int8_rows.py [--random 6] [--demo json,pirate,french]
     [--windows 2]

zoo's native kernel reads each adapter's rows of A and B as int8 numbers with one float32
scale a row (``zoo.serve.fast_lora.quantize_rows``). This scores the held-out suite (every
domain ``zoo quantize`` reports, --windows windows of 256 tokens each) on the real base
in transformers with PEFT, under each adapter three ways: its own weights in float32
(the reference), the weights its int8 rows stand for (float32), and its own weights
with bfloat16 activations (what a server on a machine with bf16 arithmetic computes, zoo's
default there). Per adapter: the largest and the mean absolute difference of a token's
log-probability from the reference, and the mean loss each way. Adapters: --random
rank-8 LoRAs (q/v, scale 0.05, as the serving benchmarks' catalog; every other one on
all seven projections) and the --demo adapters, trained from their shipped recipes
(``zoo pull demo/NAME``). Results in bench/results/int8_rows.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import ALL_PROJECTIONS, bench_home, save, table, write_random_lora

WINDOW = 256


def token_logprobs(model, windows) -> list[float]:
    """Each scored token's log-probability, teacher-forced, window by window."""
    import torch

    out = []
    with torch.no_grad():
        for ids in windows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            picked = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])
            out += picked.flatten().tolist()
    return out


def as_int8_rows(model) -> None:
    """Every LoRA A and B of ``model`` replaced by the weights its int8 rows stand for:
    A's rows (over the input) and B's rank-major rows (over the output), as the kernel
    reads them."""
    import torch

    from zoo.serve.fast_lora import dequantize_rows, quantize_rows

    def back(rows):
        return dequantize_rows(*quantize_rows(rows))

    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a = module.lora_A["default"].weight  # [rank, in]
                b = module.lora_B["default"].weight  # [out, rank]
                a.copy_(back(a))
                b.copy_(back(b.T).T)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random", type=int, default=6)
    parser.add_argument("--demo", default="json,pirate,french")
    parser.add_argument("--windows", type=int, default=2)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoo.apps.evaluate import held_out_domains
    from zoo.models.data import texts_of

    torch.manual_seed(0)
    home = bench_home()
    base_dir = home / "bases" / "smollm2-135m-instruct"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    windows = []
    for path in held_out_domains().values():
        ids = tokenizer("\n\n".join(texts_of(path)))["input_ids"]
        windows += [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(args.windows)
                    if len(ids) >= (i + 1) * WINDOW]
    scratch = Path(tempfile.mkdtemp(prefix="zoo-int8-rows-"))
    adapters = {f"random-{i}": write_random_lora(
        scratch / f"r{i}", base_dir, seed=500 + i, scale=0.05,
        targets=ALL_PROJECTIONS if i % 2 else ("q_proj", "v_proj")) for i in range(args.random)}
    if args.demo:
        from common import scratch_home

        from zoo.apps.pull import pull
        from zoo.catalog.registry import Registry
        from zoo.catalog.versions import version_dir

        registry = Registry(scratch_home(scratch / "home"))
        for name in args.demo.split(","):
            pull(f"demo/{name}", registry=registry)
            entry = registry.load().adapter(f"demo/{name}")
            adapters[f"demo/{name}"] = version_dir(registry.home, entry.name, entry.version)
    rows = []
    for name, path in adapters.items():
        scores = {}
        for way, dtype, int8 in (("float32", torch.float32, False),
                                 ("int8 rows", torch.float32, True),
                                 ("bf16 activations", torch.bfloat16, False)):
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
            model = PeftModel.from_pretrained(base, str(path)).eval()
            if int8:
                as_int8_rows(model)
            scores[way] = token_logprobs(model, windows)
        reference = scores["float32"]
        row = {"adapter": name}
        for way in ("int8 rows", "bf16 activations"):
            diffs = [abs(x - y) for x, y in zip(scores[way], reference, strict=True)]
            row[f"{way}: max |d logp|"] = max(diffs)
            row[f"{way}: mean |d logp|"] = statistics.fmean(diffs)
            row[f"{way}: loss"] = -statistics.fmean(scores[way])
        row["float32: loss"] = -statistics.fmean(reference)
        rows.append(row)
        print(name, {k: round(v, 5) for k, v in row.items() if k != "adapter"}, flush=True)
    columns = ["adapter", "float32: loss", "int8 rows: loss", "bf16 activations: loss",
               "int8 rows: mean |d logp|", "bf16 activations: mean |d logp|",
               "int8 rows: max |d logp|", "bf16 activations: max |d logp|"]
    print()
    print(f"{len(windows)} windows of {WINDOW} tokens over the held-out domains")
    print(table(rows, columns))
    save("int8_rows", {"windows": len(windows), "window": WINDOW, "rows": rows})


if __name__ == "__main__":
    main()
