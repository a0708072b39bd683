"""Running the real ``zoo`` entry point from tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from zoo.cli import cli


def zoo(*args: str, ok: bool = True) -> Result:
    """Run ``zoo ARGS`` in-process; with ok=True assert it succeeded."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="zoo")
    if ok:
        assert result.exit_code == 0, f"zoo {' '.join(map(str, args))}:\n{result.output}"
    return result


def zoo_json(*args: str):
    return json.loads(zoo(*args, "--json").stdout)


def zoo_process(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed ``zoo`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("zoo")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def processes_with_env(name: str, prefix: str) -> set[int]:
    """Pids of the live processes whose environment has ``name`` starting with ``prefix``
    (every process zoo serve starts inherits its ZOO_HOME and ZOO_SERVE_STATE)."""
    wanted = f"{name}={prefix}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v.startswith(wanted) for v in environ.split(b"\0")):
            found.add(int(entry.name))
    return found


def process_tree(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        tree.add(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return {p for p in tree if Path(f"/proc/{p}").exists()}


def wait_until(condition, timeout: float = 30, interval: float = 0.5) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def houlsby_forward(base_dir: Path, adapter_dir: Path):
    """A transformers model of ``base_dir`` with the bottleneck adapter of ``adapter_dir``
    applied by hooks written here from the paper's formula, h + up(relu(down(h))) on each
    attention and MLP output, reading the tensors by their documented names: a reference
    for zoo's own BottleneckSet."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter_dir / "zoo_adapter.json").read_text())
    assert config["non_linearity"] == "relu"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    blocks = {"attention": "self_attn", "feed_forward": "mlp"}
    for i in config["layers"]:
        for position in config["positions"]:
            key = f"layers.{i}.{position}"
            w = {name: tensors[f"{key}.{name}"].float() for name in
                 ("down.weight", "down.bias", "up.weight", "up.bias")}

            def hook(_module, _inputs, output, w=w):
                h = output[0] if isinstance(output, tuple) else output
                z = torch.relu(h @ w["down.weight"].T + w["down.bias"])
                h = h + z @ w["up.weight"].T + w["up.bias"]
                return (h, *output[1:]) if isinstance(output, tuple) else h

            getattr(model.model.layers[i], blocks[position]).register_forward_hook(hook)
    return model


SCORED_TEXT = ("Question: What is the capital of France?\nAnswer: The capital of France is Paris, "
               "a city on the Seine known for the Eiffel Tower and the Louvre.")


def served_scores(url: str, model: str, prompt, key: str = "x") -> list[float]:
    """The log-probability a served ``model`` gives each token of ``prompt`` (a text, or
    token ids) after the first: teacher-forced, so a result never depends on a near-tie
    earlier in a generation."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
    reply = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                      extra_body={"prompt_logprobs": 0})
    positions = reply.choices[0].model_extra["prompt_logprobs"][1:]  # the first has none
    assert all(len(step) == 1 for step in positions)  # 0 asked: the scored token alone
    return [next(iter(step.values()))["logprob"] for step in positions]


def transformers_scores(model, ids: list[int]) -> list[float]:
    """The same from a transformers model, in float32."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def distance(a: list[float], b: list[float]) -> float:
    """The largest per-token difference of two score lists."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def memory_left_behind(work) -> int:
    """Bytes Python still holds (tracemalloc, after a garbage collection) once ``work()``
    has run: what it kept for good. The smaller of two runs: a one-off growth shows in
    one of them (a table Python doubles when it fills, as the interned strings' did by
    7.5 MB in the middle of a run after other tests), what the work keeps each time in
    both."""
    import gc
    import tracemalloc

    def once() -> int:
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            work()
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    return min(once(), once())


def resident_pages(address: int, length: int) -> int:
    """How many pages of the mapping at ``address`` (``length`` bytes from there, the
    start rounded down to a page) are in memory: ``mincore``, Linux."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    start = address & ~(mmap.PAGESIZE - 1)
    length += address - start
    vector = ctypes.create_string_buffer(-(-length // mmap.PAGESIZE))
    assert libc.mincore(start, length, vector) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vector.raw)
