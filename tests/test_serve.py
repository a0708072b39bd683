"""zoo serve --multi-lora: one real vLLM engine on the int8 base, queried over HTTP.

The engine takes about a minute to start here, so one is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from tests.conftest import linked_home
from tests.factory import save_lora
from tests.helpers import SCORED_TEXT, distance, served_scores, zoo
from zoo.catalog.registry import Registry
from zoo.catalog.store import add, remove
from zoo.serve.launch import ServeOptions, free_port, running_server
from zoo.serve.policy import ServePolicy, hash_key, load_tenants

pytestmark = pytest.mark.vllm

BASE = "smollm2-135m-instruct"
KEYS = {"acme": "sk-acme-0000001", "globex": "sk-globex-0000001", "ops": "sk-ops-00000001"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.unlink()  # never write through a hard link shared with other homes
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def lora_maker(smollm2_home, tmp_path_factory):
    base_dir = smollm2_home / "bases" / BASE
    root = tmp_path_factory.mktemp("real-loras")

    def make(tag: str, seed: int, **config) -> Path:
        out = root / tag
        if not out.exists():
            save_lora(base_dir, out, seed=seed, r=8, lora_alpha=16, **config)
        return out

    return make


@pytest.fixture(scope="module")
def served(smollm2_w8a8_home, tmp_path_factory, lora_maker):
    home = linked_home(smollm2_w8a8_home, tmp_path_factory.mktemp("serve") / "home")
    registry = Registry(home)
    from zoo.quantize import quantize

    quantize(BASE, "nf4", registry)
    add(lora_maker("a", 1), "acme/a", BASE, registry=registry)
    add(lora_maker("b", 2), "globex/b", BASE, registry=registry)
    add(lora_maker("q", 3), "acme/q", f"{BASE}@nf4", registry=registry)
    add(lora_maker("dora", 4, use_dora=True), "shared/dora", BASE, registry=registry)
    add(lora_maker("broken", 6), "acme/broken-at-start", BASE, registry=registry)
    add(lora_maker("later", 7), "acme/broken-later", BASE, registry=registry)
    # start-up checks sizes only (a stat per file, whatever the catalog's size); a change
    # of content is found on the adapter's first request (the broken-later test)
    truncated = home / "adapters/acme/broken-at-start/adapter_model.safetensors"
    data = truncated.read_bytes()[:-64]
    truncated.unlink()
    truncated.write_bytes(data)
    keys = home.parent / "keys.json"
    keys.write_text(json.dumps({"tenants": {
        "acme": {"keys": [KEYS["acme"]]},
        "globex": {"keys": [hash_key(KEYS["globex"])], "adapters": ["globex/*"]},  # hashed
        "ops": {"keys": [KEYS["ops"]], "adapters": ["*"]}}}))
    lines: list[str] = []
    # LoRA layers on what the catalog trains (q and v): vLLM's own and zoo's outputs below
    # are checked on that engine, and an adapter training more is refused
    options = ServeOptions(base=BASE, quantization="w8a8", port=free_port(), api_keys=keys,
                           lora_targets="catalog")
    with running_server(options, registry, log=lines.append,
                        log_file=home.parent / "vllm.log") as server:
        yield SimpleNamespace(url=server.url, lines=lines, home=home, log=server.log_file)


def client(server, tenant: str = "ops") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEYS[tenant], max_retries=0, timeout=300)


def answer(server, model: str, tenant: str = "ops", max_tokens: int = 12) -> str:
    reply = client(server, tenant).chat.completions.create(
        model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def get(server, path: str, key: str | None = KEYS["ops"]):
    request = urllib.request.Request(server.url.removesuffix("/v1") + path)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read().decode()


def operator_page(server, path: str) -> str:
    """A page of zoo's web UI as the operator sees it, signed in with the operator's key."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    root = server.url.removesuffix("/v1")
    opener.open(root + "/zoo/ui/login", data=f"key={KEYS['ops']}".encode(), timeout=60).read()
    with opener.open(root + path, timeout=60) as response:
        return response.read().decode()


def listed(page: str, list_id: str) -> str:
    """The text of the page's list with that id ("" where it has none)."""
    start = page.find(f'<ul id="{list_id}">')
    return "" if start < 0 else page[start:page.index("</ul>", start)]


def test_keys_add_stores_only_a_hash(tmp_path):
    path = tmp_path / "keys.json"
    first = zoo("keys", "add", "acme", "--file", path).stdout.strip()
    second = zoo("keys", "add", "ops", "--file", path, "--adapters", "*").stdout.strip()
    text = path.read_text()
    assert first.startswith("sk-zoo-") and first != second
    assert first not in text and second not in text and hash_key(first) in text
    policy = ServePolicy(Registry(tmp_path / "home"), BASE, 8, load_tenants(path))
    acme, ops = policy.tenant_for(first), policy.tenant_for(second)
    assert acme.name == "acme" and ops.name == "ops"
    assert policy.tenant_for(first[:-1]) is None and policy.tenant_for(hash_key(first)) is None
    assert policy.authorize(acme, "globex/b").status == 403 and policy.authorize(ops, "globex/b").ok
    # processes adding keys at once lose none of them
    procs = [subprocess.Popen([sys.executable, "-m", "zoo", "keys", "add", f"t{i}", "--file", str(path)],
                              stdout=subprocess.PIPE, text=True) for i in range(6)]
    made = {f"t{i}": p.communicate()[0].strip() for i, p in enumerate(procs)}
    policy = ServePolicy(Registry(tmp_path / "home"), BASE, 8, load_tenants(path))
    assert all(policy.tenant_for(key).name == name for name, key in made.items())
    assert policy.tenant_for(first).name == "acme"
    malformed = '{"tenants": {"acme": {"keys": ["sha256:abc"]}}}'
    path.write_text(malformed)
    result = zoo("keys", "add", "acme", "--file", path, ok=False)
    assert result.exit_code == 1 and "64 hex digits" in result.stderr
    assert path.read_text() == malformed  # refused before writing


def test_start_up_lists_what_is_served_and_what_is_left_out(served):
    text = "\n".join(served.lines)
    assert "left out shared/dora: vLLM does not support DoRA" in text
    assert "left out acme/broken-at-start: files changed since registration" in text
    assert "adapter acme/q (qlora, rank 8, trained on nf4, served on w8a8)" in text
    models = {m.id for m in client(served).models.list().data}
    assert models == {BASE, "acme/a", "globex/b", "acme/q", "acme/broken-later"}
    # every zoo patch applied in every process of the engine (a refused one logs a line)
    log = served.log.read_text()
    assert "zoo: patch" not in log and "plugin registration failed" not in log


def scored(server, model: str) -> list[float]:
    return served_scores(server.url, model, SCORED_TEXT, KEYS["ops"])


def test_base_and_two_adapters_concurrently(served):
    """Mixed batches give each request its own adapter: each model's log-probabilities of
    one text, scored in concurrent batches, against the same model scored alone. A batch's
    shape changes the kernels' summation order, so the two differ by rounding (the noise);
    another model differs by far more (the separation). Each concurrent result must be
    nearer its own model than half the separation: with two adapters swapped, it fails."""
    models = (BASE, "acme/a", "globex/b")
    alone = {m: scored(served, m) for m in models}
    with ThreadPoolExecutor(6) as pool:
        jobs = [(m, pool.submit(scored, served, m)) for m in 2 * models]
        together = [(m, job.result()) for m, job in jobs]
    separation = min(distance(alone[m], alone[o]) for m in models for o in models if m < o)
    noise = max(distance(got, alone[m]) for m, got in together)
    print(f"log-probability noise {noise:.4f}, separation {separation:.4f}")
    assert noise < separation / 2, (noise, separation)
    for m, got in together:  # the comparison tells a swapped adapter apart
        nearest = min(models, key=lambda o: distance(got, alone[o]))
        assert nearest == m, (m, nearest)


def test_the_engine_rescales_adapters_for_the_smoothed_base_without_copies(served):
    """The int8 base is smoothed; adapters are rescaled as the engine loads them (their
    numbers: tests/test_eval.py), so serving one writes nothing beside the registry."""
    from zoo.models.smoothing import SCALES_FILE

    assert (served.home / "bases" / f"{BASE}@w8a8" / SCALES_FILE).exists()
    assert answer(served, "globex/b") != answer(served, BASE)
    assert not (served.home / "cache" / "smoothed").exists()


def test_qlora_adapter_is_served_on_the_int8_base(served):
    assert answer(served, "acme/q") != answer(served, BASE)


def test_unknown_adapter_is_404_never_the_base(served):
    with pytest.raises(openai.NotFoundError) as err:
        answer(served, "acme/nope")
    assert "does not exist" in str(err.value)
    with pytest.raises(openai.NotFoundError) as err:
        answer(served, "shared/dora")
    assert "DoRA" in str(err.value)


def test_tenants_are_isolated(served):
    assert answer(served, "acme/a", tenant="acme")
    assert answer(served, BASE, tenant="globex")
    with pytest.raises(openai.PermissionDeniedError) as err:
        answer(served, "acme/a", tenant="globex")
    assert "globex" in str(err.value)
    with pytest.raises(openai.PermissionDeniedError):
        answer(served, "globex/b", tenant="acme")
    bad = openai.OpenAI(base_url=served.url, api_key="sk-wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=BASE, messages=QUESTION, max_tokens=2)
    with pytest.raises(urllib.error.HTTPError) as err:
        get(served, "/v1/models", key=None)
    assert err.value.code == 401
    seen = {m.id for m in client(served, "globex").models.list().data}
    assert seen == {BASE, "globex/b"}


def test_runtime_adapter_endpoints_are_closed(served):
    request = urllib.request.Request(
        served.url + "/load_lora_adapter", method="POST",
        data=json.dumps({"lora_name": "x", "lora_path": "/etc"}).encode(),
        headers={"Authorization": f"Bearer {KEYS['ops']}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 403


def test_hot_add_and_remove(served, lora_maker):
    env = {**os.environ, "ZOO_HOME": str(served.home)}
    zoo = [sys.executable, "-m", "zoo"]
    subprocess.run([*zoo, "add", str(lora_maker("hot", 8)), "--name", "acme/hot", "--base", BASE],
                   env=env, check=True, capture_output=True)
    assert "acme/hot" in {m.id for m in client(served).models.list().data}
    hot = answer(served, "acme/hot", tenant="acme")
    assert hot != answer(served, BASE)
    subprocess.run([*zoo, "rm", "acme/hot"], env=env, check=True, capture_output=True)
    with pytest.raises(openai.NotFoundError):
        answer(served, "acme/hot", tenant="acme")
    assert "acme/hot" not in {m.id for m in client(served).models.list().data}


def test_an_adapter_training_more_than_the_engine_adapts_is_refused(served, lora_maker):
    """With --lora-targets catalog the engine has LoRA layers for q and v only (k's too:
    vLLM fuses them), what the catalog trained at start (the start-up says so). An
    adapter added later that also trains o_proj is refused with the reason and the way
    out: vLLM would drop its o_proj weights without a word. As a version of a served name,
    ``zoo promote`` refuses it first."""
    assert "LoRA layers on q_proj, v_proj only" in "\n".join(served.lines)
    env = {**os.environ, "ZOO_HOME": str(served.home)}
    wide = lora_maker("wide", 13, target_modules=["q_proj", "v_proj", "o_proj"])
    subprocess.run([sys.executable, "-m", "zoo", "add", str(wide), "--name", "acme/wide",
                    "--base", BASE], env=env, check=True, capture_output=True)
    with pytest.raises(openai.BadRequestError) as err:
        answer(served, "acme/wide", tenant="acme")
    assert "trains o_proj" in str(err.value) and "--lora-targets all" in str(err.value)
    before = answer(served, "acme/a", tenant="acme")
    # as a new version of a served name, promote refuses it before any request can fail:
    # the server left what its engine takes in the home
    subprocess.run([sys.executable, "-m", "zoo", "add", str(wide), "--name", "acme/a",
                    "--new-version"], env=env, check=True, capture_output=True)
    refused = subprocess.run([sys.executable, "-m", "zoo", "promote", "acme/a", "v2",
                              "--canary", "50"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "the zoo serve of pid" in refused.stderr
    assert "trains o_proj" in refused.stderr and "nothing changed" in refused.stderr
    assert answer(served, "acme/a", tenant="acme") == before
    for name in ("acme/wide", "acme/a:v2"):
        subprocess.run([sys.executable, "-m", "zoo", "rm", name], env=env, check=True,
                       capture_output=True)


def test_adapter_broken_while_serving_is_refused_and_others_keep_serving(served):
    base_answer = answer(served, BASE)
    assert answer(served, "acme/broken-later")
    corrupt(served.home / "adapters/acme/broken-later/adapter_model.safetensors")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        answer(served, "acme/broken-later")
    assert "files changed" in str(err.value) and "adapter_model.safetensors" in str(err.value)
    assert answer(served, BASE) == base_answer
    assert answer(served, "acme/a")


def test_an_adapter_the_engine_cannot_load_fails_its_request_only(served, lora_maker):
    """A cold adapter's request goes to the engine with its load (zoo/serve/first_use.py):
    one the registry wrongly calls servable fails that request, not the engine, and the
    engine tries its load again on the next request."""
    import dataclasses

    base_answer = answer(served, BASE)
    registry = Registry(served.home)
    add(lora_maker("dora-forced", 9, use_dora=True), "ops/dora-forced", BASE, registry=registry)
    with registry.edit() as catalog:  # as if zoo misjudged it: vLLM refuses DoRA
        entry = catalog.entries["ops/dora-forced"]
        catalog.entries[entry.name] = dataclasses.replace(entry, servable=True,
                                                          servable_reason=None)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            answer(served, "ops/dora-forced")
    assert answer(served, BASE) == base_answer
    assert answer(served, "acme/a") == answer(served, "acme/a")
    log = served.log.read_text()
    assert "adapter 'ops/dora-forced:v1' could not be loaded" in log and "DoRA" in log
    usage = operator_page(served, "/zoo/ui/usage")  # the engine's lists: failed, not loaded
    assert "ops/dora-forced:v1" in listed(usage, "failed") and "DoRA" in listed(usage, "failed")
    assert "ops/dora-forced" not in listed(usage, "loaded") and "acme/a:v1" in listed(usage,
                                                                                       "loaded")
    # the name re-registered with weights the engine can load: its next request is answered
    remove("ops/dora-forced", registry=registry)
    add(lora_maker("a", 1), "ops/dora-forced", BASE, registry=registry)
    assert answer(served, "ops/dora-forced") == answer(served, "acme/a")
    usage = operator_page(served, "/zoo/ui/usage")
    assert 'id="failed"' not in usage and "ops/dora-forced:v1" in listed(usage, "loaded")


def test_usage_is_counted_per_adapter_and_tenant(served):
    before = _usage(served, "globex/b:v1", "globex")  # rows are per version
    reply = client(served, "globex").chat.completions.create(
        model="globex/b", messages=QUESTION, max_tokens=5, temperature=0)
    stream = client(served, "globex").chat.completions.create(
        model="globex/b", messages=QUESTION, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True})
    streamed_usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    after = _usage(served, "globex/b:v1", "globex")
    assert after["requests"] - before["requests"] == 2
    assert after["completion_tokens"] - before["completion_tokens"] == (
        reply.usage.completion_tokens + streamed_usage.completion_tokens)
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2 * reply.usage.prompt_tokens
    # a tenant sees its own rows only; Prometheus has them all beside vLLM's own
    assert {r["tenant"] for r in json.loads(get(served, "/zoo/usage", KEYS["globex"]))["usage"]} \
        == {"globex"}
    metrics = get(served, "/metrics", key=KEYS["ops"])  # an operator's key (issue 10)
    assert 'zoo_adapter_requests_total{model="globex/b:v1",tenant="globex"}' in metrics
    assert "vllm:" in metrics
    for key, status in ((None, 401), (KEYS["globex"], 403)):
        with pytest.raises(urllib.error.HTTPError) as err:
            get(served, "/metrics", key=key)
        assert err.value.code == status


def test_sagemaker_route_cannot_reach_another_tenants_adapter(served):
    """Issue 10, item 1: vLLM copies this header into the body's model after the body
    was checked; zoo closes every route it does not vet."""
    request = urllib.request.Request(
        served.url.removesuffix("/v1") + "/invocations", method="POST",
        data=json.dumps({"messages": QUESTION, "max_tokens": 4}).encode(),
        headers={"Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json",
                 "X-Amzn-SageMaker-Adapter-Identifier": "globex/b"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 403


def test_a_re_added_name_serves_its_new_weights(served, lora_maker):
    """Issue 10, item 6: the engine's copy is replaced by content hash, not kept by name."""
    env = {**os.environ, "ZOO_HOME": str(served.home)}
    zoo = [sys.executable, "-m", "zoo"]

    def run(*args):
        subprocess.run([*zoo, *args], env=env, check=True, capture_output=True)

    run("add", str(lora_maker("first", 11)), "--name", "acme/re", "--base", BASE)
    run("add", str(lora_maker("second", 12)), "--name", "acme/re-ref", "--base", BASE)
    first = answer(served, "acme/re", tenant="acme")
    second = answer(served, "acme/re-ref", tenant="acme")
    assert first != second
    run("rm", "acme/re")
    run("add", str(lora_maker("second", 12)), "--name", "acme/re", "--base", BASE)
    assert answer(served, "acme/re", tenant="acme") == second


def _usage(server, model: str, tenant: str) -> dict:
    rows = json.loads(get(server, "/zoo/usage", KEYS[tenant]))["usage"]
    found = [r for r in rows if r["model"] == model and r["tenant"] == tenant]
    return found[0] if found else {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def test_served_base_really_is_int8(served, engine_reports, smollm2_home, tmp_path_factory):
    """Measured in the vLLM worker: the memory its weights took while loading."""
    int8 = json.loads(get(served, "/zoo/engine"))["weights"]
    variant = Registry(served.home).load().base(BASE).variants["w8a8"]
    kept = variant.quantization.get("kept_16bit", [])  # the worst layers stay in 16 bits
    # at most an eighth of them (a quarter with 7-bit weights, where the CPU needs those)
    assert len(kept) <= 30 * 4 * {8: 1 / 8, 7: 1 / 4}[variant.quantization["weight_bits"]]
    # qkv, o, gate_up and down of 30 layers, less those kept
    assert int8["quantized_layers"] == {"CompressedTensorsW8A8Int8": 30 * 4 - len(kept)}
    # on x86 without VNNI the worker runs every one of them on zoo's exact GEMM (cpu_int8)
    from zoo.core.measure import cpu_flags
    from zoo.serve import cpu_int8

    assert int8["int8_linears_by_zoo"] == (30 * 4 - len(kept) if cpu_int8.wanted(cpu_flags())
                                           else 0)
    if "bf16" not in engine_reports:  # test_merge's 16-bit engine measured it already
        home = linked_home(smollm2_home, tmp_path_factory.mktemp("bf16-only") / "home")
        # a small KV cache: other modules' engines (the session's tenant engine) may be up
        options = ServeOptions(base=BASE, quantization="none", port=free_port(),
                               extra_args=("--kv-cache-memory-bytes", str(2**30)))
        with running_server(options, Registry(home)) as server:
            engine_reports["bf16"] = json.loads(urllib.request.urlopen(
                server.url.removesuffix("/v1") + "/zoo/engine").read())
    full = engine_reports["bf16"]["weights"]
    assert full["quantized_layers"] == {}
    linear_params = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    # the 16-bit engine holds its weights in the activation dtype vLLM chose for this CPU
    # (float32 or bfloat16: activation_dtype); int8 takes 1 byte of that
    dtype, _ = max(full["tensor_bytes_by_dtype"].items(), key=lambda item: item[1])
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    saved = full["heap_bytes"] - int8["heap_bytes"]
    # int8 saves (element - 1) bytes per linear weight (measured: 1.00x of that in bf16);
    # a base left in 16 bits would save nothing, so half of it tells the two apart
    # whatever else the two engines allocate alike
    assert saved > 0.5 * (element - 1) * linear_params, (dtype, full["heap_bytes"],
                                                          int8["heap_bytes"])


def test_the_workers_norms_and_rotary_embedding_run_on_vllms_cpp_kernels(served):
    """vLLM's dispatch in the served worker, asked for a row of the model's norms, picks
    zoo's provider of vLLM's C++ kernels (the cpu_norms patch), not the PyTorch one; its
    rotary embedding runs vLLM's CPU forward (zoo serve enables that custom op)."""
    report = json.loads(get(served, "/zoo/engine"))["weights"]
    assert report["norms"] == {"rms_norm": "zoo_cpu", "fused_add_rms_norm": "zoo_cpu"}
    assert report["forwards"]["RotaryEmbedding"] == "forward_cpu"
    assert report["forwards"]["SiluAndMul"] == "forward_native"  # the rest: vLLM's choice
    # the dtypes whose results vLLM's kernels truncate on this CPU (bfloat16 where it has
    # no AVX512-BF16), which the worker rounds itself: as this process's kernels say
    import torch
    from vllm.platforms import current_platform

    from zoo.serve import cpu_norms, cpu_rotary

    current_platform.import_kernels()
    expected = {kernel: [str(d).removeprefix("torch.") for d in (torch.bfloat16, torch.float16)
                         if probe.truncates(d)]
                for kernel, probe in (("norms", cpu_norms), ("rotary", cpu_rotary))}
    assert report["rounded_by_zoo"] == expected


def test_the_int8_base_keeps_its_quality_on_every_held_out_domain(served, tenant_engine):
    """Served by this machine's int8 kernel (whatever its instructions): the default
    variant's perplexity on each held-out domain zoo ships (none of it calibration data)
    within 1.03x of the 16-bit base's, served by the 16-bit tenant engine. An int8 kernel
    that saturates 8-bit weights' products (x86 without VNNI) measured 1.067x here."""
    import math

    from tests.conftest import TENANT_KEYS
    from zoo.apps.evaluate import held_out_domains, nll_served, sequences
    from zoo.catalog.loading import load_tokenizer

    registry = Registry(served.home)
    tokenizer = load_tokenizer(served.home / registry.load().base(BASE).path)
    ratios = {}
    for domain, path in held_out_domains().items():
        seqs = sequences(tokenizer, path)
        int8, count = nll_served(served.url, BASE, seqs, key=KEYS["ops"])
        full, same = nll_served(tenant_engine.url, BASE, seqs, key=TENANT_KEYS["ops"])
        assert count == same > 500
        ratios[domain] = math.exp((int8 - full) / count)
    print({d: round(r, 4) for d, r in ratios.items()})
    assert max(ratios.values()) <= 1.03, ratios
