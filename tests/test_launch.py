"""zoo serve's plan, without starting vLLM: what start-up reads does not grow with the catalog."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import zoo
from zoo.catalog import integrity
from zoo.catalog.registry import Registry
from zoo.serve.launch import (
    DEFAULT_MAX_LORAS,
    LISTED_ADAPTERS,
    MAX_CPU_LORAS,
    ServeOptions,
    default_cpu_loras,
    default_max_loras,
    describe,
    lora_slot_bytes,
    plan_serve,
)
from zoo.serve.policy import TARGETS_VARIABLE


def test_planning_a_large_catalog_hashes_no_adapter_and_sizes_the_batch(models, tmp_path,
                                                                        zoo_home, monkeypatch):
    zoo("add", models.llama, "--name", "tiny")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(LISTED_ADAPTERS + 10):
        shutil.copytree(models.lora("plain"), folder / f"a{i:02d}")
    zoo("add", folder, "--many", "--prefix", "cust/", "--base", "tiny")
    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: (hashed.append(p), real(p))[1])
    integrity.forget_hashes()
    options = ServeOptions(base="tiny", quantization="none")
    plan = plan_serve(options, Registry(zoo_home))
    assert not [p for p in hashed if "/adapters/" in str(p)]  # a stat each, no hashing
    assert len(plan.adapters) == LISTED_ADAPTERS + 10
    assert plan.max_loras == DEFAULT_MAX_LORAS and plan.max_cpu_loras == MAX_CPU_LORAS
    argv = " ".join(plan.argv)
    assert f"--max-loras {DEFAULT_MAX_LORAS}" in argv and "--lora-modules" not in argv
    # the worker commits the slots of the projections these adapters train at start
    assert plan.env[TARGETS_VARIABLE] == "q_proj,v_proj"
    lines = describe(plan, options)
    assert sum(line.startswith("  adapter ") for line in lines) == LISTED_ADAPTERS
    assert any(line.startswith("  ... and 10 more") for line in lines)


def test_the_batch_shrinks_when_slots_would_not_fit(models, monkeypatch):
    per_slot = lora_slot_bytes(models.llama, 16, "float32")
    # the tiny Llama (hidden 32, 2 of 4 heads for k/v, intermediate 64, vocab 128), 2
    # layers: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32 in
    # vLLM's stack, plus the outputs (B: 32, 16, 16, 32, 64, 64, 32) in zoo's copy; the
    # embeddings' and the lm_head's 128+32 each, and the lm_head's 128 in zoo's copy;
    # x rank 16 x 4 B
    assert per_slot == (2 * ((64 + 48 + 48 + 64 + 96 + 96 + 96) + 256) +
                        2 * (128 + 32) + 128) * 16 * 4
    assert lora_slot_bytes(models.llama, 16, "bfloat16") == per_slot // 2
    qv = lora_slot_bytes(models.llama, 16, "float32", {"q_proj", "v_proj"})
    assert qv == 2 * ((64 + 32) + (48 + 16)) * 16 * 4

    def machine(memory):
        monkeypatch.setattr("os.sysconf", lambda name: {"SC_PAGE_SIZE": 1,
                                                        "SC_PHYS_PAGES": memory}[name])
    machine(20 * 5 * per_slot)
    assert default_max_loras(models.llama, 16, "float32") == 15  # 15% of it
    # q and v slots in 15% of it: 15 * per_slot / qv; every projection in 25%: 25
    assert default_max_loras(models.llama, 16, "float32", {"q_proj", "v_proj"}) == 25
    machine(10**12)
    assert default_max_loras(models.llama, 16, "float32") == DEFAULT_MAX_LORAS
    assert default_cpu_loras(8) == 32 and default_cpu_loras(DEFAULT_MAX_LORAS) == \
        MAX_CPU_LORAS and default_cpu_loras(MAX_CPU_LORAS * 2) == MAX_CPU_LORAS * 2


def test_replicas_split_the_cores_and_the_kv_memory(monkeypatch):
    import os

    import pytest

    from zoo.errors import ServeError
    from zoo.serve.launch import kv_cache_gib
    from zoo.serve.replicas import cpu_shares

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 5})
    assert cpu_shares(1) == ["0,1,2,3,5"]
    assert cpu_shares(2) == ["0,1", "2,3"]  # equal shares; a core left over stays free
    with pytest.raises(ServeError, match="6 replicas on 5 cores"):
        cpu_shares(6)
    monkeypatch.setattr("os.sysconf", lambda name: {"SC_PAGE_SIZE": 1,
                                                    "SC_PHYS_PAGES": 32 * 1024**3}[name])
    assert kv_cache_gib(2) == 4 and kv_cache_gib(8) == 1 and kv_cache_gib(100) == 1


def test_the_router_command_line(monkeypatch):
    import pytest

    from zoo.errors import ServeError
    from zoo.serve import replicas

    monkeypatch.setattr(replicas, "router_command", lambda: "vllm-router")
    first = replicas.router_argv(["http://a:1", "http://b:2"], "0.0.0.0", 8000, "round_robin")
    assert first[first.index("--worker-urls") + 1:first.index("--worker-urls") + 3] == \
        ["http://a:1", "http://b:2"]
    assert first[first.index("--policy") + 1] == "round_robin"
    second = replicas.router_argv(["http://a:1"], "0.0.0.0", 8001, "consistent_hash")
    port = lambda argv: argv[argv.index("--prometheus-port") + 1]  # noqa: E731
    assert port(first) != port(second)  # two routers on one host both start
    with pytest.raises(ServeError, match="unknown router policy"):
        replicas.router_argv(["http://a:1"], "h", 1, "fastest")
    with pytest.raises(ServeError, match="no worker URLs"):
        replicas.router_argv([], "h", 1, "round_robin")
    assert zoo("route", "--worker", "http://a:1", "--policy", "fastest", ok=False).exit_code == 2
    assert zoo("serve", "--multi-lora", "--replicas", "0", ok=False).exit_code == 2


def test_activation_dtype_follows_the_cpu():
    """AMX's int8 kernel takes bf16/fp16 activations only (float32 fails at the first
    request), and bf16 is native with AVX-512 BF16; elsewhere float32 measured fastest."""
    from zoo.serve.launch import activation_dtype

    assert activation_dtype("auto", frozenset({"avx2", "amx_tile", "amx_int8"})) == "bfloat16"
    assert activation_dtype("auto", frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert activation_dtype("auto", frozenset({"avx2", "avx512f"})) == "float32"
    assert activation_dtype("float16", frozenset({"amx_tile"})) == "float16"  # the user's own


def test_the_lora_stacks_are_bf16_under_float32_activations(models, zoo_home):
    """Under float32 activations zoo's kernel reads bf16 stacks (half the bytes and the
    memory); under bf16 or fp16 the stacks are the activations' own; the user's
    ``--lora-dtype`` wins, and a GPU's engine keeps vLLM's own choice."""
    from zoo.serve.launch import lora_dtype, vllm_argv

    assert lora_dtype("float32") == "bfloat16"
    assert lora_dtype("bfloat16") == "bfloat16"
    assert lora_dtype("float16") == "float16"
    assert lora_dtype("float32", ("--lora-dtype", "float32")) == "float32"
    assert lora_dtype("float32", ("--lora-dtype=float16",)) == "float16"
    zoo("add", models.llama, "--name", "tiny")
    base = Registry().load().base("tiny")

    def stacks(options, gpu=False):
        argv = vllm_argv(options, base, models.llama, 16, 4, 16, gpu=gpu)
        return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--lora-dtype"]

    assert stacks(ServeOptions(dtype="float32")) == ["bfloat16"]
    assert stacks(ServeOptions(dtype="bfloat16")) == ["bfloat16"]
    assert stacks(ServeOptions(dtype="float32", extra_args=("--lora-dtype", "float32"))) == \
        ["float32"]  # the user's alone
    assert stacks(ServeOptions(dtype="float32"), gpu=True) == []
    plan = plan_serve(ServeOptions(base="tiny", quantization="none", dtype="float32"))
    assert plan.lora_dtype == "bfloat16" and "LoRA stacks in bfloat16" in describe(
        plan, ServeOptions())[0]
    # bfloat16 asked for on a CPU whose vLLM kernels truncate it (no AVX512-BF16) says so
    bf16 = plan_serve(ServeOptions(base="tiny", quantization="none", dtype="bfloat16"))

    def warned(plan, flags):
        return any("truncates" in line for line in describe(plan, ServeOptions(), flags))

    assert warned(bf16, frozenset({"avx2", "avx512f"}))
    assert not warned(bf16, frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert not warned(bf16, frozenset({"amx_tile", "avx512_bf16"}))
    assert not warned(plan, frozenset({"avx2"}))  # float32


def test_lora_layers_go_on_what_the_catalog_trains_when_asked(models, zoo_home):
    """By default vLLM wraps every module it can; with --lora-targets catalog only those the
    served adapters train (q and v here), unless the catalog is empty (any adapter may
    come); the user's own list wins; the engine's processes learn the set (the policy
    refuses the rest)."""
    import pytest

    from zoo.errors import ServeError
    from zoo.serve.policy import WRAPPED_VARIABLE

    def targets_of(plan):
        argv = plan.argv
        if "--lora-target-modules" not in argv:
            return None
        values = argv[argv.index("--lora-target-modules") + 1:]
        return values[:next(i for i, v in enumerate(values) if v.startswith("--"))]

    zoo("add", models.llama, "--name", "tiny")
    empty = plan_serve(ServeOptions(base="tiny", quantization="none", lora_targets="catalog"))
    assert empty.wrapped is None and targets_of(empty) is None and not empty.env[WRAPPED_VARIABLE]
    zoo("add", models.lora("plain"), "--name", "acme/a", "--base", "tiny")
    zoo("add", models.lora("q-only", target_modules=["q_proj"]), "--name", "acme/q",
        "--base", "tiny")
    plan = plan_serve(ServeOptions(base="tiny", quantization="none", lora_targets="catalog"))
    assert plan.wrapped == ("q_proj", "v_proj") and targets_of(plan) == ["q_proj", "v_proj"]
    assert plan.env[WRAPPED_VARIABLE] == "q_proj,v_proj"
    assert any("LoRA layers on q_proj, v_proj only" in line
               for line in describe(plan, ServeOptions()))
    every = plan_serve(ServeOptions(base="tiny", quantization="none"))  # the default: all
    assert every.wrapped is None and targets_of(every) is None
    assert not every.env[WRAPPED_VARIABLE]
    theirs = plan_serve(ServeOptions(base="tiny", quantization="none", extra_args=(
        "--lora-target-modules", "qkv_proj", "o_proj", "--max-num-seqs", "8")))
    assert theirs.wrapped == ("qkv_proj", "o_proj") and theirs.argv.count("--lora-target-modules") == 1
    assert theirs.env[WRAPPED_VARIABLE] == "qkv_proj,o_proj"
    with pytest.raises(ServeError, match="--lora-targets"):
        plan_serve(ServeOptions(base="tiny", quantization="none", lora_targets="some"))


def test_the_rank_limit_counts_every_version(models, zoo_home):
    """--max-lora-rank covers a version registered but not current: promoted while the
    server runs, it must fit (``zoo promote`` refuses what a running server would not)."""
    zoo("add", models.llama, "--name", "tiny")
    zoo("add", models.lora("plain"), "--name", "acme/a", "--base", "tiny")
    assert plan_serve(ServeOptions(base="tiny", quantization="none")).max_lora_rank == 16
    zoo("add", models.lora("rank-32", r=32), "--name", "acme/a", "--new-version")
    assert plan_serve(ServeOptions(base="tiny", quantization="none")).max_lora_rank == 32


def test_the_kv_cache_is_sized_unless_the_user_sized_it(models, zoo_home):
    from tests.helpers import zoo
    from zoo.catalog.registry import Registry
    from zoo.serve.launch import ServeOptions, kv_cache_gib, vllm_argv

    zoo("add", models.llama, "--name", "tiny")
    base = Registry().load().base("tiny")

    def kv(argv):
        return [argv[i + 1] for i, a in enumerate(argv) if a == "--kv-cache-memory-bytes"]

    plain = vllm_argv(ServeOptions(), base, models.llama, 16, 4, 16)
    assert kv(plain) == [str(kv_cache_gib(1) * 1024**3)]
    assert kv(vllm_argv(ServeOptions(), base, models.llama, 16, 4, 16, engines=2)) == [
        str(kv_cache_gib(2) * 1024**3)]
    assert kv(vllm_argv(ServeOptions(), base, models.llama, 16, 4, 16, gpu=True)) == []
    own = ServeOptions(extra_args=("--kv-cache-memory-bytes=123",))
    assert kv(vllm_argv(own, base, models.llama, 16, 4, 16)) == []
    assert "--dtype" in plain and plain[plain.index("--dtype") + 1] in ("bfloat16", "float32")


def test_the_cpus_rotary_embedding_runs_vllms_kernel_unless_the_user_compiles(models,
                                                                              zoo_home):
    """vLLM runs a LoRA engine on the CPU eagerly with its custom ops off: zoo turns the
    rotary embedding's on (vLLM's C++ kernel); a compilation config of the user's, or a
    GPU, keeps vLLM's own."""
    from zoo.serve.launch import CPU_COMPILATION, vllm_argv

    zoo("add", models.llama, "--name", "tiny")
    base = Registry().load().base("tiny")

    def compilation(extra=(), gpu=False):
        argv = vllm_argv(ServeOptions(extra_args=extra), base, models.llama, 16, 4, 16, gpu=gpu)
        return [json.loads(argv[i + 1]) for i, a in enumerate(argv)
                if a == "--compilation-config"]

    assert compilation() == [CPU_COMPILATION] == [{"custom_ops": ["+rotary_embedding"]}]
    assert compilation(gpu=True) == []
    assert compilation(("-cc", '{"mode": 0}')) == []
    assert compilation(("--compilation-config.custom_ops", '["all"]')) == []
    assert compilation(("-cc.mode", "0")) == []
    # a field of another config is not the compilation config
    assert compilation(("--kv-transfer-config.kv_role", "kv_both")) == [CPU_COMPILATION]


CHILD = """
import multiprocessing, sys, time
from zoo.serve.plugin import die_with_parent

def engine():
    die_with_parent()  # what zoo's plugin does in every process vLLM starts
    open(sys.argv[1], "w").close()
    time.sleep(600)

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    child = multiprocessing.Process(target=engine)
    child.start()
    print(child.pid, flush=True)
    time.sleep(600)
"""


def test_processes_zoo_starts_die_with_their_parent(tmp_path):
    """An engine core whose API server was killed (SIGKILL: no handler runs) dies too,
    and so does an API server whose zoo process was."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_until
    from zoo.serve.launch import die_with_us

    script = tmp_path / "server.py"
    script.write_text(CHILD)
    ready = tmp_path / "ready"
    server = subprocess.Popen([sys.executable, str(script), str(ready)], stdout=subprocess.PIPE,
                              text=True, preexec_fn=die_with_us)
    engine = int(server.stdout.readline())
    assert wait_until(ready.exists, 30)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    assert wait_until(lambda: not os.path.exists(f"/proc/{engine}") or
                      open(f"/proc/{engine}/stat").read().split(") ")[1][0] == "Z", 10)
    # one level up: a parent (zoo serve) killed takes the server started with die_with_us
    outer = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from zoo.serve.launch import die_with_us\n"
        f"p = subprocess.Popen([sys.executable, {str(script)!r}, {str(tmp_path / 'r2')!r}],"
        " preexec_fn=die_with_us,"
        " stdout=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    inner = int(outer.stdout.readline())
    os.kill(outer.pid, signal.SIGKILL)
    outer.wait()
    assert wait_until(lambda: not os.path.exists(f"/proc/{inner}") or
                      open(f"/proc/{inner}/stat").read().split(") ")[1][0] == "Z", 10)


def test_the_served_variant_is_made_in_a_process_of_its_own(models, zoo_home, monkeypatch):
    """Calibrating the int8 base loads the 16-bit model and its activations (2.8 GB for
    SmolLM2): zoo serve makes the variant in a child process, so it keeps none of it; the
    child's errors come back as zoo's errors."""
    from zoo import quantize as quantizing
    from zoo.errors import ZooError
    from zoo.serve.launch import prepare_base

    def not_here(*args, **kwargs):
        raise AssertionError("quantized in zoo serve's own process")

    monkeypatch.setattr(quantizing, "quantize", not_here)
    zoo("add", models.llama_servable, "--name", "tiny")
    registry = Registry(zoo_home)
    lines: list[str] = []
    base = prepare_base(ServeOptions(base="tiny", quantization="w8a8"), registry, lines.append)
    assert "w8a8" in base.variants and lines == ["quantizing tiny to w8a8 (in a process of its own)"]
    assert not integrity.changed_files(zoo_home / base.variants["w8a8"].path,
                                       base.variants["w8a8"].files)
    assert prepare_base(ServeOptions(base="tiny", quantization="w8a8"), registry, lines.append)
    assert len(lines) == 1  # an intact variant is reused, no child
    shutil.rmtree(zoo_home / base.variants["w8a8"].path)
    weights = zoo_home / registry.load().base("tiny").path / "model.safetensors"
    weights.unlink()
    weights.write_bytes(b"not the registered weights")
    with pytest.raises(ZooError, match="changed|tiny"):
        prepare_base(ServeOptions(base="tiny", quantization="w8a8"), registry)


def test_a_base_vllms_cpu_attention_cannot_run_is_refused_before_calibrating(
        models, zoo_home, monkeypatch):
    """vLLM starts on a base whose attention heads its CPU kernels do not compute, then
    its engine dies at the first request. zoo serve refuses it first, with the reason,
    before minutes of calibration; zoo eval scores it with transformers instead."""
    from zoo import quantize as quantizing
    from zoo.apps.evaluate import evaluate
    from zoo.errors import NotSupported
    from zoo.serve.launch import prepare_base

    def not_here(*args, **kwargs):
        raise AssertionError("calibrated a base that cannot be served")

    monkeypatch.setattr(quantizing, "quantize", not_here)
    zoo("add", models.llama, "--name", "tiny")  # 4 heads of 8 in 32
    with pytest.raises(NotSupported, match="heads are 8 wide.*32, 64, 80"):
        prepare_base(ServeOptions(base="tiny", quantization="w8a8"), Registry(zoo_home))
    assert "w8a8" not in Registry(zoo_home).load().base("tiny").variants
    assert evaluate("tiny", record=False).engine == "transformers"


def test_a_request_holds_at_most_what_the_base_takes_at_once(models, zoo_home, tmp_path):
    """vLLM refuses --max-model-len past the base's context after a minute of start-up: zoo
    sizes it to the base (zoo eval's windows: test_eval.py, the bottleneck's reference)."""
    from zoo.errors import NotSupported
    from zoo.serve.launch import DEFAULT_MODEL_LEN

    zoo("add", models.llama, "--name", "tiny")  # max_position_embeddings 128
    registry = Registry(zoo_home)

    def model_len(**options) -> str:
        plan = plan_serve(ServeOptions(quantization="none", **options), registry)
        given = plan.argv[plan.argv.index("--max-model-len") + 1]
        assert f"  requests of up to {given} tokens" in "\n".join(describe(plan, ServeOptions()))
        return given

    assert model_len() == "128"
    assert model_len(max_model_len=64) == "64"
    said = describe(plan_serve(ServeOptions(quantization="none"), registry), ServeOptions())
    assert "up to 128 tokens, prompt and answer together (--max-model-len; the base takes " \
           "128)" in said[1]
    with pytest.raises(NotSupported, match="--max-model-len 4096 is more than 'tiny' takes"):
        model_len(max_model_len=4096)
    config = json.loads((models.llama / "config.json").read_text())
    del config["max_position_embeddings"]  # no length given: vLLM's default, and zoo's
    unsaid = tmp_path / "unsaid"
    shutil.copytree(models.llama, unsaid)
    (unsaid / "config.json").write_text(json.dumps(config))
    zoo("add", unsaid, "--name", "unsaid")
    assert model_len(base="unsaid") == str(DEFAULT_MODEL_LEN)
    plan = plan_serve(ServeOptions(base="unsaid", quantization="none"), registry)
    assert describe(plan, ServeOptions())[1].endswith("the base's config sets no limit)")


@pytest.mark.parametrize("changes, why", [
    ({"port": 0}, "--port 0"), ({"port": 70000}, "--port 70000"),
    ({"max_loras": 0}, "--max-loras 0"), ({"max_cpu_loras": -1}, "--max-cpu-loras -1"),
    ({"max_loras": 64, "max_cpu_loras": 8}, "fewer than --max-loras 64"),
    ({"api_keys": "keys.json"}, "is malformed"),
    ({"meter": b"not a database " * 100}, "is not a usage meter zoo can read"),
])
def test_settings_no_server_can_start_with_are_refused_before_the_variant_is_made(
        models, zoo_home, tmp_path, monkeypatch, changes, why):
    """Before, each of these started minutes of int8 calibration, then failed (vLLM's own
    error, or a malformed keys file refused after the variant was made)."""
    from zoo.errors import NotSupported, ZooError
    from zoo.serve import launch

    zoo("add", models.llama, "--name", "tiny")
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("calibrated"))
    if "api_keys" in changes:
        (tmp_path / "keys.json").write_text('{"tenants": 5}')
        changes = {"api_keys": tmp_path / "keys.json"}
    if "meter" in changes:  # every request is counted in it: a damaged one fails them all
        (zoo_home / "usage.db").write_bytes(changes.pop("meter"))
    options = ServeOptions(base="tiny", quantization="w8a8", **changes)
    with pytest.raises((NotSupported, ZooError), match=why):
        launch.prepare_base(options, Registry(zoo_home))


def test_only_max_cpu_loras_given_caps_the_batch(models, zoo_home):
    zoo("add", models.llama, "--name", "tiny")
    plan = plan_serve(ServeOptions(base="tiny", quantization="none", max_cpu_loras=8),
                      Registry(zoo_home))
    assert plan.max_loras == 8 and plan.max_cpu_loras == 8  # vLLM refused 256 in a batch


@pytest.mark.parametrize("worker", ["garbage", "10.0.0.2:8000", "http://", "http://h:99999",
                                    "ftp://h:8000", "http://h:port"])
def test_zoo_route_refuses_a_worker_that_is_no_url_before_starting_the_router(
        worker, monkeypatch):
    """vllm-router's own refusal was a traceback from its process."""
    from zoo.serve import replicas

    monkeypatch.setattr(replicas.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    result = zoo("route", "--worker", "http://10.0.0.1:8000", "--worker", worker, ok=False)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert f"--worker {worker!r} is not the URL of a server" in result.stderr


def test_zoo_serve_refuses_an_address_it_cannot_listen_on_before_anything_starts(monkeypatch):
    """vLLM said so itself, after the int8 calibration and the engine's start (minutes)."""
    import socket

    from zoo.serve import launch

    monkeypatch.setattr(launch, "prepare_base", lambda *a, **k: pytest.fail("prepared"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in (
                (["--port", str(port)], f"port {port} on 127.0.0.1 is in use"),
                (["--host", "nowhere.invalid"], "--host 'nowhere.invalid': it does not resolve"),
                (["--host", "192.0.2.1"], "cannot serve on 192.0.2.1:8000")):
            result = zoo("serve", "--multi-lora", *args, ok=False)
            assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
            assert message in result.stderr, result.stderr


@pytest.mark.parametrize("log, reason", [
    (["(APIServer pid=4) Traceback (most recent call last):",
      '    raise ValueError("boom")',
      "(EngineCore pid=5) ERROR 12-05 18:46:51 [core.py:1100] ValueError: Model architectures "
      "['FooForCausalLM'] are not supported for now.",
      "(APIServer pid=4) RuntimeError: Engine core initialization failed. See root cause "
      "above. Failed core proc(s): {}"],
     "ValueError: Model architectures ['FooForCausalLM'] are not supported for now."),
    (["  pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
      "    Value error, User-specified max_model_len (2048) is greater than the derived "
      "max_model_len (max_position_embeddings=128.0). [type=value_error]",
      "      For further information visit https://errors.pydantic.dev/2.14/v/value_error"],
     "ValidationError: User-specified max_model_len (2048) is greater than the derived "
     "max_model_len (max_position_embeddings=128.0). [type=value_error]"),
    (["usage: api_server.py [-h] [--headless] [--api-server-count API_SERVER_COUNT]",
      "api_server.py: error: argument --max-model-len: invalid human_readable_int_or_auto "
      "value: 'None'"],
     "argument --max-model-len: invalid human_readable_int_or_auto value: 'None'"),
])
def test_a_server_that_exits_during_start_up_says_why_in_one_line(tmp_path, log, reason):
    """zoo eval, a promotion's gate and the benchmarks start vLLM in the background: its
    exit was the log's last 15 lines (a traceback's middle); now it is the root cause."""
    import subprocess
    import sys

    from zoo.errors import ServeError
    from zoo.serve.launch import free_port, wait_healthy

    path = tmp_path / "vllm.log"
    path.write_text("\n".join(["INFO starting", *log, "INFO shutting down"]) + "\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    proc.wait()
    with pytest.raises(ServeError) as exited:
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, path, timeout=30)
    assert exited.value.message == f"vLLM exited during start-up: {reason}"
    assert str(path) in exited.value.hint
