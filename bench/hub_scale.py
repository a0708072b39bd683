"""`zoo pull` into a large zoo: what each pull pays for the registry it joins.

Run: .venv/bin/python bench/hub_scale.py [--adapters 20] [--entries 10000] [--before COMMIT]

N plain PEFT repos (rank-8 LoRAs of SmolLM2, as people publish them) on the local Hub
double, pulled one by one into a zoo with the base alone and into one that also holds
``--entries`` other adapters (bench/registry.py's synthetic entries). Each pull reads and
rewrites the whole registry, so it grows with the registry; the Hub's part does not. Each
round times the code of ``--before`` (a git worktree) and the current code, each in a
process of its own with a fresh Hub cache; the rounds alternate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # the Hub double speaks LFS; read at import

from common import (  # noqa: E402
    BASE,
    ROOT,
    TIMED_PULLS,
    bench_home,
    local_hub,
    previous_zoo_env,
    publish_peft_repo,
    save,
    table,
)

TOKEN = "hf_bench_token_0001"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--before", default="075d699", help="the commit timed beside")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from registry import synthetic_catalog

    from zoo.catalog.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-hub-scale."))
    hub = ExitStack()
    env = {**os.environ, **hub.enter_context(local_hub(work / "hub", TOKEN))}
    times: dict[tuple[str, int], list[float]] = {}
    try:
        # each zoo imported from its own tree (a process started in it puts it first)
        trees = {args.before: previous_zoo_env(args.before), "current": ({}, ROOT)}
        from huggingface_hub import HfApi

        source = bench_home()
        api = HfApi(endpoint=env["HF_ENDPOINT"], token=TOKEN)
        names = [f"people/p{i:02d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            publish_peft_repo(api, name, work / "peft" / name, source / "bases" / BASE,
                              seed=1000 + i)
        others = synthetic_catalog(args.entries) if args.entries else None
        run = 0
        for _ in range(args.rounds):
            for label, (variables, tree) in trees.items():
                for entries in (0, args.entries):
                    run += 1
                    home = work / f"home-{run}"
                    shutil.copytree(source / "bases", home / "bases", copy_function=os.link)
                    shutil.copy(source / "registry.json", home / "registry.json")
                    with Registry(home).edit() as catalog:  # the base, and the others
                        for name in [n for n in catalog.entries if n != BASE]:
                            del catalog.entries[name]
                        if entries:
                            for name in others.entries:
                                if name != "base":
                                    catalog.entries[name] = others.entries[name]
                    done = subprocess.run(
                        [sys.executable, "-c", TIMED_PULLS, *names], cwd=tree, check=True,
                        capture_output=True, text=True,
                        env={**env, **variables, "ZOO_HOME": str(home),
                             "HF_HOME": str(work / f"hf-{run}")})
                    seconds = float(done.stdout.strip().splitlines()[-1])
                    times.setdefault((label, entries), []).append(seconds / len(names))
                    print(f"{label} into {entries} other entries: {seconds / len(names):.3f} s "
                          "a pull", file=sys.stderr, flush=True)
                    shutil.rmtree(home)
    finally:
        hub.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for entries in (0, args.entries):
        before = statistics.median(times[(args.before, entries)])
        now = statistics.median(times[("current", entries)])
        rows.append({"other entries": entries, f"s a pull, {args.before}": before,
                     "s a pull, current": now, "current / before": now / before,
                     "each round, before": times[(args.before, entries)],
                     "each round, current": times[("current", entries)]})
    print(f"\n{args.adapters} plain PEFT repos pulled one by one, median of {args.rounds} rounds")
    print(table(rows, ["other entries", f"s a pull, {args.before}", "s a pull, current",
                       "current / before"]))
    save("hub_scale", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
