"""Shared pieces of the benchmarks: a cached home with the real base, adapters, tables."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.factory import ALL_PROJECTIONS, write_random_lora  # noqa: E402,F401

RESULTS = ROOT / "bench" / "results"
BASE = "smollm2-135m-instruct"


def bench_home() -> Path:
    """A zoo home kept between benchmark runs (``ZOO_BENCH_HOME``), with the real base."""
    from zoo.apps.pull import pull
    from zoo.catalog.registry import Registry

    home = Path(os.environ.get("ZOO_BENCH_HOME", "/tmp/zoo-bench-home"))
    pull(BASE, registry=Registry(home), log=lambda line: print(line, file=sys.stderr))
    return home


def scratch_home(home: Path, adapters: bool = False) -> Path:
    """A home at ``home`` with the benchmarks' base (hard links, no copy of the weights),
    and without its adapters unless ``adapters``."""
    import shutil

    from zoo.catalog.registry import Registry

    source = bench_home()
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(source / "bases", home / "bases", copy_function=os.link)
    shutil.copy(source / "registry.json", home / "registry.json")
    if not adapters:
        with Registry(home).edit() as catalog:
            for name in [a.name for a in catalog.adapters()]:
                del catalog.entries[name]
    return home


def worktree(commit: str) -> Path:
    """A checkout of an earlier commit of this repository, kept under /tmp between runs:
    the "before" of a benchmark, run side by side with the current code."""
    import subprocess

    tree = Path(f"/tmp/zoo-previous-{commit}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", str(tree), commit],
                       check=True, capture_output=True)
    return tree


def previous_zoo_env(commit: str) -> tuple[dict[str, str], Path]:
    """What makes a child process import zoo from ``commit``'s worktree: the variables to
    add and the directory to start it in. Both: ``python -m`` and ``-c`` put the working
    directory on sys.path before PYTHONPATH, so a child started in this repository's root
    imports this tree's zoo whatever PYTHONPATH says (and vLLM's processes inherit its
    sys.path). Checked here by asking such a child where zoo is."""
    import subprocess

    tree = worktree(commit)
    variables = {"PYTHONPATH": str(tree)}
    found = subprocess.run([sys.executable, "-c", "import zoo; print(zoo.__file__)"],
                           env={**os.environ, **variables}, cwd=tree, capture_output=True,
                           text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"zoo at {commit} would import {found}, not its worktree {tree}")
    return variables, tree


@contextmanager
def timed():
    box = {}
    start = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - start


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def save(name: str, data: dict) -> Path:
    """Keep the latest results (and where they were measured) for the docs."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
