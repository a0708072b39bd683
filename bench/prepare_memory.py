"""What making the served int8 variant leaves in the process that serves, before and after
zoo serve made it in a process of its own, in one run.

Run: .venv/bin/python bench/prepare_memory.py

Each contender runs in a fresh interpreter on a scratch home holding only the embedded
16-bit base: "in-process" calls zoo.quantize.quantize, as zoo serve did before; "zoo serve
now" calls prepare_base, as zoo serve does. Resident memory of that interpreter after the
variant is made (and its peak), in MB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BASE, bench_home, save, table

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import gc, json, sys
from pathlib import Path
from zoo.catalog.registry import Registry
from zoo.serve.launch import ServeOptions, prepare_base
from zoo.quantize import quantize

def rss():
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024

home, how = Path(sys.argv[1]), sys.argv[2]
before = rss()[0]
if how == "in-process":
    quantize(sys.argv[3], "w8a8", Registry(home))
else:
    prepare_base(ServeOptions(base=sys.argv[3], quantization="w8a8"), Registry(home))
gc.collect()
after, peak = rss()
print(json.dumps({"before": before, "after": after, "peak": peak}))
"""


def main() -> None:
    source = bench_home()
    rows = []
    for how in ("in-process", "zoo serve now"):
        with tempfile.TemporaryDirectory() as scratch:
            home = Path(scratch) / "home"
            shutil.copytree(source / "bases" / BASE, home / "bases" / BASE, copy_function=os.link)
            catalog = json.loads((source / "registry.json").read_text())
            entry = catalog["entries"][BASE]
            entry["variants"] = {}
            catalog["entries"] = {BASE: entry}
            (home / "registry.json").write_text(json.dumps(catalog))
            out = subprocess.run([sys.executable, "-c", CHILD, str(home), how, BASE],
                                 capture_output=True, text=True, check=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            rows.append({"how": how, **json.loads(out.stdout.strip().splitlines()[-1])})
    rows.append({"how": "ratio", **{k: rows[1][k] / rows[0][k] for k in ("before", "after", "peak")}})
    print(table(rows, ["how", "before", "after", "peak"]))
    save("prepare_memory", {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
