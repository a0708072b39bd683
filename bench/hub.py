"""zoo's Hub commands against plain huggingface_hub calls, on the local Hub double.

Run: .venv/bin/python bench/hub.py [--adapters 50]

Pull: `zoo pull` of N adapters (download, hash checks against zoo.json,
shape checks against the base, registration) against `snapshot_download` of
the same N repos, each into an empty cache. Push: `zoo push` of one adapter
(card, manifest, no-op detection, registry update) against `upload_folder`
of the same files, each to a new repo, median of 5. The server runs in its
own process so it does not share the client's interpreter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BASE, bench_home, save, table, write_random_lora

TOKEN = "hf_bench_token_0001"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=50)
    args = parser.parse_args()
    from zoo.catalog.registry import Registry
    from zoo.catalog.store import add
    from zoo.serve.launch import free_port

    work = Path(tempfile.mkdtemp(prefix="zoo-bench-hub."))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "zoo.testing.hub", "--root",
                              str(work / "hub"), "--port", str(port), "--token", TOKEN],
                             stdout=subprocess.PIPE, text=True)
    server.stdout.readline()
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN=TOKEN,
                      HF_HOME=str(work / "hf"), HF_HUB_DISABLE_PROGRESS_BARS="1")
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

        with_zoo = time.perf_counter()
        for name in names:
            pull(name, registry=Registry(homes["puller"]))
        with_zoo = time.perf_counter() - with_zoo
        plain = time.perf_counter()
        for name in names:
            snapshot_download(name, cache_dir=work / "plain-cache", endpoint=os.environ["HF_ENDPOINT"],
                              token=TOKEN)
        plain = time.perf_counter() - plain

        api = HfApi(endpoint=os.environ["HF_ENDPOINT"], token=TOKEN)
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
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"operation": f"pull {args.adapters} adapters", "zoo_s": with_zoo, "plain_s": plain,
         "plain": "snapshot_download", "zoo / plain": with_zoo / plain},
        {"operation": "push 1 adapter (median of 5)", "zoo_s": statistics.median(push_zoo),
         "plain_s": statistics.median(push_plain), "plain": "create_repo + upload_folder",
         "zoo / plain": statistics.median(push_zoo) / statistics.median(push_plain)},
    ]
    print(f"\nlocal Hub double, {args.adapters} rank-8 LoRAs of {BASE} (~1.8 MB each)")
    print(table(rows, ["operation", "zoo_s", "plain_s", "zoo / plain", "plain"]))
    save("hub", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
