"""zoo's Hub commands against plain huggingface_hub calls, on the local Hub double.

Run: .venv/bin/python bench/hub.py [--adapters 50]

Pull: `zoo pull` of N adapters (listing pinned to a commit, download of the files zoo
uses, hash checks against the listing and zoo.json, shape checks against the base,
registration) against `snapshot_download` of the same N repos, each into an empty
cache: once for repos zoo pushed, once for plain PEFT repos (adapter_config.json naming
the base by Hub id, adapter_model.safetensors, a README and a training_args.bin, no
zoo.json), as people publish them. Push: `zoo push` of one adapter (card, manifest,
no-op detection, registry update) against `upload_folder` of the same files, each to a
new repo, median of 5. The server runs in its own process so it does not share the
client's interpreter. Uploads take the Git LFS path (HF_HUB_DISABLE_XET).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # the Hub double speaks LFS; read at import

from common import (  # noqa: E402
    BASE,
    TIMED_PULLS,
    bench_home,
    local_hub,
    publish_peft_repo,
    save,
    table,
    write_random_lora,
)

TOKEN = "hf_bench_token_0001"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--before", default="19336d0",
                        help="the commit whose zoo pull is timed beside (the release before)")
    args = parser.parse_args()
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-hub."))
    hub = ExitStack()
    os.environ.update(hub.enter_context(local_hub(work / "hub", TOKEN)), HF_HOME=str(work / "hf"))
    try:
        from huggingface_hub import HfApi, snapshot_download

        from zoo.apps.pull import pull
        from zoo.hub.push import push

        source = bench_home()
        homes = {}
        for which in ("pusher", "puller"):  # each with the real base, hard-linked
            homes[which] = work / which
            shutil.copytree(source / "bases", homes[which] / "bases", copy_function=os.link)
            shutil.copy(source / "registry.json", homes[which] / "registry.json")
            with Registry(homes[which]).edit() as catalog:  # the base only
                for name in [n for n in catalog.entries if n != BASE]:
                    del catalog.entries[name]
        pusher = Registry(homes["pusher"])
        base_dir = homes["pusher"] / "bases" / BASE
        names = [f"bench/h{i:02d}" for i in range(args.adapters)]
        for i, name in enumerate(names):
            add(write_random_lora(work / "src" / name, base_dir, rank=8, seed=i,
                                  targets=("q_proj", "v_proj")), name, BASE, registry=pusher)
            push(name, registry=pusher)

        api = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=TOKEN)
        peft_names = [f"people/p{i:02d}" for i in range(args.adapters)]
        for i, name in enumerate(peft_names):
            publish_peft_repo(api, name, work / "peft" / name, base_dir, seed=1000 + i)

        def timed_pulls(repos: list[str], cache: str) -> tuple[float, float]:
            start = time.perf_counter()
            for name in repos:
                pull(name, registry=Registry(homes["puller"]))
            with_zoo = time.perf_counter() - start
            start = time.perf_counter()
            for name in repos:
                snapshot_download(name, cache_dir=work / cache,
                                  endpoint=os.environ["HF_ENDPOINT"], token=TOKEN)
            return with_zoo, time.perf_counter() - start

        with_zoo, plain = timed_pulls(names, "plain-cache")
        peft_zoo, peft_plain = timed_pulls(peft_names, "plain-peft-cache")
        before = previous_pulls(args.before, names, work, homes["puller"])

        folder = homes["pusher"] / "adapters" / names[0]
        push_zoo, push_plain = [], []
        for i in range(5):
            add(folder, f"bench/p{i}", BASE, registry=pusher)
            start = time.perf_counter()
            push(f"bench/p{i}", repo=f"bench/zoo-push-{i}", registry=pusher)
            push_zoo.append(time.perf_counter() - start)
            start = time.perf_counter()
            api.create_repo(f"bench/plain-push-{i}")
            api.upload_folder(folder_path=folder, repo_id=f"bench/plain-push-{i}")
            push_plain.append(time.perf_counter() - start)
    finally:
        hub.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"operation": f"pull {args.adapters} adapters zoo pushed", "zoo_s": with_zoo,
         "plain_s": plain, "plain": "snapshot_download", "zoo / plain": with_zoo / plain},
        {"operation": f"pull {args.adapters} adapters zoo pushed, {args.before}",
         "zoo_s": before, "plain_s": plain, "plain": "snapshot_download",
         "zoo / plain": before / plain},
        {"operation": f"pull {args.adapters} plain PEFT repos", "zoo_s": peft_zoo,
         "plain_s": peft_plain, "plain": "snapshot_download",
         "zoo / plain": peft_zoo / peft_plain},
        {"operation": "push 1 adapter (median of 5)", "zoo_s": statistics.median(push_zoo),
         "plain_s": statistics.median(push_plain), "plain": "create_repo + upload_folder",
         "zoo / plain": statistics.median(push_zoo) / statistics.median(push_plain)},
    ]
    print(f"\nlocal Hub double, {args.adapters} rank-8 LoRAs of {BASE} (~1.8 MB each)")
    print(table(rows, ["operation", "zoo_s", "plain_s", "zoo / plain", "plain"]))
    save("hub", {"command": " ".join(sys.argv), "rows": rows})


def previous_pulls(commit: str, names: list[str], work: Path, puller: Path) -> float:
    """The same pulls with the zoo of ``commit`` (a git worktree), timed in its process."""
    from common import worktree

    home = work / "puller-before"
    shutil.copytree(puller / "bases", home / "bases", copy_function=os.link)
    registry = json.loads((puller / "registry.json").read_text())
    registry["schema_version"] = 1  # what that release reads: the base entry alone
    registry["entries"] = {BASE: registry["entries"][BASE]}
    registry["entries"][BASE].pop("hub", None)
    (home / "registry.json").write_text(json.dumps(registry))
    done = subprocess.run([sys.executable, "-c", TIMED_PULLS, *names], cwd=work, capture_output=True,
                          text=True, env={**os.environ, "ZOO_HOME": str(home),
                                          "HF_HOME": str(work / "hf-before"),
                                          "PYTHONPATH": str(worktree(commit))}, check=True)
    return float(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
