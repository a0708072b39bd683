"""zoo merge (verified, the default; and unverified) against PEFT's merge_and_unload +
save_pretrained and a plain copy.

Run: .venv/bin/python bench/merge.py [--skip-large] [--skip-7b] [--section merge|algebra]

Same base and adapter for every contender, each in a fresh process (so the peak
resident memory is its own), the base files read once beforehand so all read
from the page cache; "before" is the verified merge of an earlier commit
(PREVIOUS), run from a git worktree of it in the same run. The plain copy of the base files is the I/O floor.
Bases: the embedded SmolLM2-135M, and synthetic bf16 Llamas of about 1.5 B and
6.7 B parameters (7B-shaped) written by this script (random weights; nothing is
downloaded). PEFT is not run on the 7B-shaped model: it holds the whole model.

The algebra section, on SmolLM2 with random rank-8 q/v adapters (the serving
benchmark's catalog) and a random rank-16 adapter on all seven projections:
``merge --to-adapter`` of 2, 8 and 32 adapters (exact rank and truncated),
``compress`` and ``extract`` at several ranks: time, energy kept, and the largest
logit change against PEFT running the inputs unmerged (the full merge's logits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BASE, RESULTS, bench_home, save, table, worktree, write_random_lora

LARGE = "synthetic-llama-1.5b"
HUGE = "synthetic-llama-7b"
CONFIGS = {
    LARGE: dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=26,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    HUGE: dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
PREVIOUS = "1c18764"  # zoo before the merge streamed base rows and copied in 1 MB pieces
MODES = {"copy": "plain copy (I/O floor)", "zoo": "zoo merge, verified (default)",
         "zoo-before": f"zoo merge, verified, before ({PREVIOUS})",
         "zoo-none": "zoo merge --verify none", "peft": "PEFT merge_and_unload + save_pretrained"}


def child(mode: str, base_dir: Path, adapter: str, adapter_dir: Path, out: Path,
          home: Path) -> None:
    start = time.perf_counter()
    if mode == "zoo":
        from zoo.catalog.registry import Registry
        from zoo.merge import MergeOptions, merge

        merge(MergeOptions(adapters=(adapter,), out=out), Registry(home))
    elif mode == "zoo-none":
        from zoo.catalog.registry import Registry
        from zoo.merge import MergeOptions, merge

        merge(MergeOptions(adapters=(adapter,), out=out, verify="none"), Registry(home))
    elif mode == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
    else:
        out.mkdir()
        for f in base_dir.glob("*.safetensors"):
            shutil.copyfile(f, out / f.name)
    seconds = time.perf_counter() - start
    from zoo.core.measure import peak_rss_bytes

    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_bytes() / 1e6}))


def write_large_base(out: Path, name: str) -> None:
    """A bf16 Llama checkpoint written tensor by tensor (random weights)."""
    import torch
    from transformers import LlamaConfig

    from zoo.merge.tensors import PlannedTensor, write_shards

    c = LlamaConfig(**CONFIGS[name], tie_word_embeddings=False)
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d),
              "model.norm.weight": (d,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.{n}.weight": (d, d) for n in ("q_proj", "k_proj",
                                                                     "v_proj", "o_proj")})
        shapes.update({f"{p}.mlp.gate_proj.weight": (f, d), f"{p}.mlp.up_proj.weight": (f, d),
                       f"{p}.mlp.down_proj.weight": (d, f), f"{p}.input_layernorm.weight": (d,),
                       f"{p}.post_attention_layernorm.weight": (d,)})
    generator = torch.Generator().manual_seed(0)

    def maker(shape):
        return lambda: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    planned = [PlannedTensor(n, torch.bfloat16, s, maker(s)) for n, s in sorted(shapes.items())]
    out.mkdir(parents=True)
    write_shards(planned, out, max_bytes=2 * 1024**3)
    c.architectures = ["LlamaForCausalLM"]
    c.dtype = "bfloat16"
    c.save_pretrained(out)


def measure(name: str, base_dir: Path, adapter: str, adapter_dir: Path, home: Path,
            scratch: Path, modes) -> list[dict]:
    for f in base_dir.glob("*.safetensors"):  # warm the page cache for every contender
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    rows = []
    for mode in modes:
        label = MODES[mode]
        out = scratch / f"{name}-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        script, child_mode = __file__, mode
        if mode == "zoo-before":  # the earlier commit's own script and package
            script, child_mode = worktree(PREVIOUS) / "bench" / "merge.py", "zoo"
        proc = subprocess.run([sys.executable, str(script), "--child", child_mode, str(base_dir),
                               adapter, str(adapter_dir), str(out), str(home)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"base": name, "method": label, "work_s": result["seconds"],
                     "process_s": time.perf_counter() - started,
                     "peak_rss_mb": result["peak_rss_mb"]})
        shutil.rmtree(out, ignore_errors=True)
    copy_row = rows[0]
    peft_row = next((r for r in rows if r["method"] == MODES["peft"]), None)
    for row in rows:
        if peft_row:
            row["time vs peft"] = row["work_s"] / peft_row["work_s"]
            row["memory vs peft"] = row["peak_rss_mb"] / peft_row["peak_rss_mb"]
        row["time vs copy"] = row["work_s"] / copy_row["work_s"]
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, base_dir, adapter, adapter_dir, out, home = sys.argv[2:8]
        return child(mode, Path(base_dir), adapter, Path(adapter_dir), Path(out), Path(home))
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--section", choices=["merge", "algebra", "all"], default="all")
    args = parser.parse_args()
    results = RESULTS / "merge.json"
    saved = json.loads(results.read_text()) if results.exists() else {}
    saved = {k: v for k, v in saved.items() if k in ("rows", "algebra", "commands")}
    saved.setdefault("commands", {})
    if args.section in ("merge", "all"):
        saved["rows"] = merge_section(args)
        saved["commands"]["merge"] = " ".join(sys.argv)
        save("merge", saved)
    if args.section in ("algebra", "all"):
        saved["algebra"] = algebra_section()
        saved["commands"]["algebra"] = " ".join(sys.argv)
        save("merge", saved)


def merge_section(args) -> list[dict]:
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add

    home = bench_home()
    registry = Registry(home)
    scratch = home / "bench-merge"
    scratch.mkdir(exist_ok=True)
    rows = []
    everything = ("copy", "zoo", "zoo-before", "zoo-none", "peft")
    cases = [(BASE, 8, everything)] + ([] if args.skip_large else [(LARGE, 16, everything)]) \
        + ([] if args.skip_7b else [(HUGE, 16, ("copy", "zoo", "zoo-before"))])
    for base, rank, modes in cases:
        catalog = registry.load()
        if base not in catalog.entries:
            print(f"writing {base} on disk", file=sys.stderr)
            shutil.rmtree(scratch / base, ignore_errors=True)
            write_large_base(scratch / base, base)
            add(scratch / base, base, registry=registry)
            shutil.rmtree(scratch / base)
        base_dir = home / registry.load().base(base).path
        adapter = f"bench/merge-{base}"
        if adapter not in registry.load().entries:
            lora = write_random_lora(scratch / "lora" / base, base_dir, rank=rank,
                                     targets=("q_proj", "v_proj"))
            add(lora, adapter, base, registry=registry)
        adapter_dir = home / registry.load().adapter(adapter).path
        rows += measure(base, base_dir, adapter, adapter_dir, home, scratch, modes)
    print("\nmerging one LoRA (q_proj, v_proj) into a bf16 base; wall time of the work and "
          "peak resident memory of each process")
    print(table(rows, ["base", "method", "work_s", "time vs peft", "time vs copy",
                       "peak_rss_mb", "memory vs peft"]))
    return rows


def algebra_section() -> list[dict]:
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add, remove
    from zoo.merge import MergeOptions, merge
    from zoo.merge.algebra import CombineOptions, combine, compress, extract

    home = bench_home()
    registry = Registry(home)
    catalog = registry.load()
    pool = sorted(n for n in catalog.entries if n.startswith("cat/"))[:32]
    if len(pool) < 32:  # the serving benchmark's catalog; make what is missing
        base_dir = home / catalog.base(BASE).path
        for i in range(len(pool), 32):
            path = write_random_lora(home / "bench-merge" / "pool" / str(i), base_dir, rank=8,
                                     seed=1000 + i, targets=("q_proj", "v_proj"))
            add(path, f"cat/p{i:04d}", BASE, registry=registry)
        pool = sorted(n for n in registry.load().entries if n.startswith("cat/"))[:32]
    wide = "bench/algebra-all7"
    if wide not in registry.load().entries:
        base_dir = home / catalog.base(BASE).path
        add(write_random_lora(home / "bench-merge" / "all7", base_dir, rank=16, seed=5),
            wide, BASE, registry=registry)

    def fresh(name: str) -> str:
        if name in registry.load().entries:
            remove(name, registry=registry)
        return name

    rows = []

    def record(operation: str, inputs: str, started: float, result) -> None:
        rows.append({"operation": operation, "inputs": inputs, "rank": result.rank,
                     "seconds": time.perf_counter() - started,
                     "energy kept": result.energy_kept,
                     "logit error": result.logits["max_abs_diff"],
                     "largest logit": result.logits["max_abs_logit"]})
        print(table(rows[-1:], list(rows[-1])), file=sys.stderr)

    for count in (2, 8, 32):
        for rank in (None, 16):
            if rank is not None and rank >= 8 * count:
                continue
            started = time.perf_counter()
            result = combine(CombineOptions(adapters=tuple(pool[:count]), rank=rank,
                                            name=fresh(f"bench/combined-{count}-r{rank or 8 * count}")),
                             registry)
            record("merge --to-adapter (linear)", f"{count} x rank-8 q,v", started, result)
    for method in ("ties", "dare_linear"):
        started = time.perf_counter()
        result = combine(CombineOptions(adapters=tuple(pool[:8]), method=method, rank=16,
                                        name=fresh(f"bench/combined-{method}")), registry)
        record(f"merge --to-adapter ({method}, density 0.5)", "8 x rank-8 q,v", started, result)
    for rank in (2, 4, 8, 16):
        started = time.perf_counter()
        result = compress(wide, rank, fresh(f"bench/compressed-{rank}"), registry)
        record("compress", "rank-16, 7 projections", started, result)
    for dtype in ("fp32", "bf16"):
        merged = fresh(f"bench/merged-all7-{dtype}")
        merge(MergeOptions(adapters=(wide,), name=merged, dtype=dtype, verify="none"), registry)
        for rank in (8, 16, 32):
            started = time.perf_counter()
            result = extract(merged, BASE, rank, fresh(f"bench/extracted-{dtype}-{rank}"),
                             registry)
            record(f"extract from a {dtype} merge", "rank-16, 7 projections", started, result)
    for name in [n for n in registry.load().entries if n.startswith("bench/")
                 and n.split("/", 1)[1].startswith(("combined", "compressed", "extracted",
                                                     "merged"))]:
        remove(name, registry=registry)  # big ranks would change what bench/serve.py measures
    print("\nadapter algebra on SmolLM2-135M: time, energy of the update kept, largest logit "
          "change against the inputs run unmerged by PEFT")
    print(table(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    main()
