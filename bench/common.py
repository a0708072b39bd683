"""Shared pieces of the benchmarks: a cached home with the real base, adapters, tables."""

from __future__ import annotations

import contextlib
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


def log(line: str) -> None:
    """A benchmark's progress, on stderr (its results go to stdout)."""
    print(line, file=sys.stderr)


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

    # by the commit's hash: a name such as HEAD or a branch moves, and a tree kept under
    # it would be an older commit's
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    tree = Path(f"/tmp/zoo-previous-{sha[:12]}")
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(tree),
                        sha], check=True, capture_output=True)
    return tree


# a process's `zoo pull` of each repo named on its command line, timed: its last line
TIMED_PULLS = ("import sys, time\nfrom zoo.apps.pull import pull\nfrom zoo.catalog.registry "
               "import Registry\nstart = time.perf_counter()\nfor name in sys.argv[1:]:\n"
               "    pull(name, registry=Registry())\nprint(time.perf_counter() - start)\n")


@contextmanager
def local_hub(root: Path, token: str):
    """zoo's Hub double (``zoo.testing.hub``) in a process of its own, so it does not share
    the client's interpreter; yields the variables that point huggingface_hub at it."""
    import subprocess

    from zoo.serve.launch import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "zoo.testing.hub", "--root", str(root),
                               "--port", str(port), "--token", token],
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # it is listening
        yield {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": token,
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    finally:
        server.terminate()
        server.wait()


def publish_peft_repo(api, name: str, folder: Path, base_dir: Path, seed: int) -> None:
    """A rank-8 q/v LoRA of the base in ``base_dir`` as PEFT users publish one: its config
    naming the base by Hub id, a README and a ``training_args.bin`` zoo does not fetch."""
    write_random_lora(folder, base_dir, rank=8, seed=seed, targets=("q_proj", "v_proj"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# an adapter\n")
    (folder / "training_args.bin").write_bytes(os.urandom(5000))
    api.create_repo(name)
    api.upload_folder(folder_path=folder, repo_id=name)


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


def engine_plan(log=lambda line: print(line, file=sys.stderr)):
    """`zoo serve`'s plan on the benchmarks' home with its catalog of 1,000 registered
    rank-8 q/v LoRAs, the raw adapters' directory, and the arguments the in-process
    engines of first_use.py and steps.py are started with (``--engine SPEC``: JSON of the
    catalog's directory and the LLM's arguments, ``llm``). The engines, this tree's and
    --previous's, inherit the projections the catalog's adapters train, as zoo serve sets
    them: their stacks committed at start (``zero_pages.populate``), so that placing an
    adapter in a fresh slot is not page-faulted where serving is not."""
    from serve import catalog

    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, plan_serve, prepare_base
    from zoo.serve.policy import TARGETS_VARIABLE

    home = bench_home()
    registry = Registry(home)
    catalog(home, registry, 1000, log)
    options = ServeOptions(base=BASE)
    prepare_base(options, registry)
    plan = plan_serve(options, registry)
    adapters = home / "bench-catalog"
    os.environ[TARGETS_VARIABLE] = plan.env[TARGETS_VARIABLE]
    # vLLM's LLM arguments for the LoRA settings `zoo serve` would start the engine with
    llm = dict(model=str(plan.model_path), enable_lora=True, max_loras=plan.max_loras,
               max_cpu_loras=plan.max_cpu_loras, max_lora_rank=plan.max_lora_rank,
               dtype=plan.dtype, lora_dtype=plan.lora_dtype, max_model_len=2048,
               lora_target_modules=list(plan.wrapped) if plan.wrapped else None)
    return plan, adapters, [json.dumps({"catalog": str(adapters), "llm": llm})]


def answer(process, mark: str) -> str:
    """An engine process's next answer: its next line starting with ``mark`` (vLLM's own
    lines on its stdout skipped)."""
    for line in process.stdout:
        if line.startswith(mark):
            return line.removeprefix(mark).strip()
    raise SystemExit("an engine exited")


@contextmanager
def engines_of(script: str, engine_args: list[str], previous: str | None, mark: str,
               variants: dict | None = None):
    """``bench/SCRIPT --engine ARGS`` twice, this tree's zoo and --previous's (from its
    worktree), talking JSON lines over stdin and stdout: {label: process} once each said
    ``ready`` with zoo imported from its own tree; both stopped (stdin closed) after.
    ``variants`` ({label: engine arguments}) instead: this tree's zoo, once for each."""
    import subprocess

    if variants is None:
        variables, tree = previous_zoo_env(previous)
        variants = {"zoo": ({}, ROOT, engine_args),
                    f"previous ({previous})": (variables, tree, engine_args)}
    else:
        variants = {label: ({}, ROOT, own) for label, own in variants.items()}
    engines = {}
    try:
        for label, (extra, cwd, own_args) in variants.items():
            engines[label] = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / script), "--engine", *own_args],
                cwd=cwd, env={**os.environ, **extra}, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for (label, process), (_, cwd, _) in zip(engines.items(), variants.values(),
                                                 strict=True):
            ready, _, where = answer(process, mark).partition(" ")
            if ready != "ready" or not where.startswith(str(cwd)):
                raise SystemExit(f"the {label} engine did not start with zoo from {cwd}")
        yield engines
    finally:
        for process in engines.values():
            process.stdin.close()
            process.wait(timeout=120)


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


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The narrowest pair of order statistics that holds the median of the distribution
    ``values`` were drawn from with at least ``confidence`` (the sign test's interval:
    no assumption about the distribution's shape, only that the values are independent).
    Fewer than six values cannot reach 0.95: then the smallest and largest."""
    from math import comb

    ordered = sorted(values)
    n = len(ordered)
    k, below = 1, 1 / 2 ** n  # P(Binomial(n, 1/2) <= k - 1): the median below x_(k)
    while 2 * (k + 1) <= n + 1:
        below_next = below + comb(n, k) / 2 ** n
        if 1 - 2 * below_next < confidence:
            break
        k, below = k + 1, below_next
    return ordered[k - 1], ordered[n - k]


def machine() -> str:
    """The architecture, the CPU's model name and the CPUs this process may use."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " " + line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}{model}, {os.cpu_count()} CPUs"


def save(name: str, data: dict) -> Path:
    """Keep the latest results (and where they were measured) for the docs."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
