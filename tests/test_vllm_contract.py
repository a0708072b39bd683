"""The vLLM contract: every vLLM symbol, signature and behaviour zoo relies on, in one place.

An upgrade of vLLM fails here first, and each failure names the zoo feature that depends
on what changed. The guarded patches (zoo/serve/patches.py) turn themselves off when their
own checks fail; this module makes sure that never happens silently in CI.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from importlib.metadata import entry_points

import pytest
import torch

from tests.bounds import units_off
from zoo.serve import patches, plugin


def feature(name: str) -> str:
    return f"zoo's {name} depends on it"


def test_the_plugin_is_registered_for_vllm():
    found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "zoo"]
    assert found and found[0].value == "zoo.serve.plugin:register", feature("vLLM plugin")


@pytest.mark.parametrize("patch", [plugin.LORA_DEVICE, plugin.FAST_LORA, plugin.FIRST_USE,
                                   plugin.WEIGHT_REPORT, plugin.LORA_INFO,
                                   plugin.SMOOTHED_LORA, plugin.LOADED_LOOKUP,
                                   plugin.ZERO_PAGE_SLOTS, plugin.ADAPTER_READING,
                                   plugin.BULK_PLACEMENT, plugin.CORE_READING,
                                   plugin.CPU_NORMS, plugin.CPU_ROTARY, plugin.CPU_INT8,
                                   plugin.LAYER_ROUTES],
                         ids=lambda p: p.name)
def test_every_patch_applies_to_the_pinned_vllm(patch):
    """Each patch's own checks (version, platform, signatures) pass on this vLLM."""
    assert patches._refusal(patch) is None, feature(f"{patch.name} patch ({patch.why})")


def test_a_patch_whose_checks_fail_stays_off_with_one_line(caplog):
    applied = []
    refused = patches.Patch("p", "why", "never", apply=lambda: applied.append(1),
                            checks=(patches.has("vllm.v1.engine.core", "EngineCore", "nope"),))
    bad_version = patches.Patch("v", "why", "never", apply=lambda: applied.append(2),
                                versions=("0.0.1",))
    raising = patches.Patch("r", "why", "never", apply=lambda: 1 / 0)
    gpu = patches.Patch("g", "why", "never", apply=lambda: applied.append(3), cpu_only=True)
    with caplog.at_level(logging.WARNING, logger="zoo.serve"):
        report = patches.install([refused, bad_version, raising])
    assert applied == [] and report.applied == []
    assert "EngineCore.nope is gone" in report.outcome["p"]
    assert "not a version it was tested on" in report.outcome["v"]
    assert "ZeroDivisionError" in report.outcome["r"]
    assert len([r for r in caplog.records if "is off" in r.getMessage()]) == 3
    signature = patches.parameters("vllm.v1.engine.core", "EngineCore", "add_request",
                                   names=("req", "wave"))
    assert "takes (request, request_wave)" in signature()
    source = patches.mentions("vllm.v1.engine.core", "EngineCore", "add_request",
                              snippets=("self.", "zoo-never-wrote-this"))
    assert source() == "vllm.v1.engine.core.EngineCore.add_request no longer has " \
                       "zoo-never-wrote-this"
    twice = patches.mentions("vllm.v1.engine.core", "EngineCore", "add_request",
                             snippets=("self.",), once=True)
    assert twice() == "vllm.v1.engine.core.EngineCore.add_request has self. more than once"
    assert patches.mentions("vllm.v1.engine.core", "EngineCore", "add_request",
                            snippets=("self.scheduler.add_request(request)",), once=True)() is None
    reset = ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA", "reset_lora")
    same = "# vLLM's, laid out otherwise\nself.lora_a_stacked[index] = 0\n" \
           "self.lora_b_stacked[ index ] = (0)"
    assert patches.body_is(*reset, body=same)() is None
    for other in ("self.lora_a_stacked[index] = 0",  # less
                  same + "\nself.lora_bias_stacked[index] = 0",  # more
                  "self.lora_b_stacked[index] = 0\nself.lora_a_stacked[index] = 0"):  # order
        assert "does more or other than" in patches.body_is(*reset, body=other)()
    # a fingerprint is of the same statements (body_is's): another digest is a change
    import vllm.lora.layers.logits_processor as module
    digest = patches.digest_of(module.LogitsProcessorWithLoRA.reset_lora)
    assert patches.fingerprint(*reset, digest=digest)() is None
    assert "changed since zoo's patch was written" in patches.fingerprint(*reset, digest="0")()
    original = patches.on_cpu
    try:
        patches.on_cpu = lambda: False  # as on a GPU build: CPU-only patches never apply
        assert "CPU platform only" in patches.install([gpu]).outcome["g"]
    finally:
        patches.on_cpu = original
    assert applied == []


def test_register_never_raises(monkeypatch, caplog):
    def boom():
        raise ImportError("vllm moved everything")

    monkeypatch.setattr(plugin, "zoo_patches", boom)
    with caplog.at_level(logging.ERROR, logger="zoo.serve"):
        plugin.register()
    assert "plugin registration failed" in caplog.text


def test_a_slot_is_reset_before_vllm_writes_it():
    """fast_lora's per-slot caches redo the slots marked by reset_lora; vLLM's set_lora
    must call it first (else zoo would recompute every slot: slower, never wrong)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    for layer_class in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        source = inspect.getsource(layer_class.set_lora)
        assert "self.reset_lora(index)" in source, feature("fast LoRA slot caches")


def test_minus_one_means_no_adapter_in_the_token_mapping():
    """fast_lora leaves rows of slot -1 untouched: vLLM must mean 'no adapter' by it."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(max_num_batched_tokens=16, max_batches=4, device="cpu")
    wrapper.update_metadata(LoRAMapping([0, 5, 0, 7], [0, 5, 0, 7], is_prefill=False),
                            [5, 7, None], 3, 64)
    assert wrapper.token_lora_indices.tolist() == [-1, 0, -1, 1], feature("grouped LoRA path")
    assert wrapper.sampler_indices.tolist() == [-1, 0, -1, 1], feature("grouped LoRA path")


def test_vllm_reads_the_platforms_punica_wrapper():
    """The fast LoRA patch works by the platform naming the wrapper class."""
    from vllm.lora.punica_wrapper import punica_selector
    from vllm.platforms import cpu

    source = inspect.getsource(punica_selector.get_punica_wrapper)
    assert "current_platform.get_punica_wrapper()" in source, feature("grouped LoRA path")
    assert "Using %s" in source, feature("tests that read which LoRA path ran")
    assert isinstance(cpu.CpuPlatform.get_punica_wrapper(), str)


def test_the_extension_points_zoo_builds_on():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert callable(LoRAResolverRegistry.register_resolver), feature("registry resolver")
    assert inspect.iscoroutinefunction(LoRAResolver.resolve_lora), feature("registry resolver")
    parser = make_arg_parser(FlexibleArgumentParser())
    options = {o for action in parser._actions for o in action.option_strings}
    for option in ("--middleware", "--enable-lora", "--max-loras", "--max-cpu-loras",
                   "--max-lora-rank", "--served-model-name", "--kv-cache-memory-bytes",
                   "--gpu-memory-utilization", "--disable-uvicorn-access-log", "--dtype"):
        assert option in options, feature(f"zoo serve's command line ({option})")
    assert "kv_cache_memory_bytes" in inspect.signature(AsyncEngineArgs).parameters
    importlib.import_module("vllm.entrypoints.openai.api_server")  # what zoo serve runs
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    assert "lora_name" in UnloadLoRAAdapterRequest.model_fields, feature("hot remove")


def test_the_request_fields_zoo_reads_and_writes():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request in (ChatCompletionRequest, CompletionRequest):
        assert "model" in request.model_fields, feature("middleware's model check")
    assert "prompt_logprobs" in CompletionRequest.model_fields, feature("zoo eval (served)")


def test_the_head_widths_vllms_cpu_attention_computes():
    """zoo serve refuses a base with other widths before it starts vLLM (whose engine dies
    at the first request), and zoo eval scores such a base with transformers."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from zoo.serve.launch import CPU_HEAD_SIZES

    assert list(CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes(), \
        feature("check of a base's attention heads (launch.CPU_HEAD_SIZES)")


def test_the_cpu_int8_kernel_needs_what_zoo_gives_it():
    """activation_dtype: the AMX int8 kernel takes bf16/fp16 activations; the lora_device
    patch: the oneDNN one releases ``weight`` after prepacking."""
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    source = inspect.getsource(cpu)
    assert "setattr(layer, w_q_name, None)" in source, feature("lora_device patch")
    assert "_is_amx_tile_supported" in inspect.getsource(
        importlib.import_module("vllm.model_executor.layers.utils").check_cpu_sgl_kernel), \
        feature("activation dtype choice")


def test_the_grouped_path_gives_way_to_vllms_own(monkeypatch):
    """Calls the grouped path was not written for go to vLLM's ops: an unknown keyword,
    a torch compile in progress, a mapping outside -1 .. slots - 1."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from zoo.serve.fast_lora import GroupedPunicaWrapperCPU

    calls = []
    own = PunicaWrapperCPU.add_lora_linear
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear",
                        lambda self, *a, **k: calls.append(sorted(k)) or own(self, *a, **k))

    def run(wrapper, **extra):
        a = (torch.randn(2, 1, 4, 8),)
        b = (torch.randn(2, 1, 8, 4),)
        wrapper.add_lora_linear(torch.zeros(3, 8), torch.randn(3, 8), a, b, 1.0, (8,), **extra)

    w = GroupedPunicaWrapperCPU(max_num_batched_tokens=8, max_batches=4, device="cpu")
    w.update_metadata(LoRAMapping([1, 2, 1], [1, 2, 1], is_prefill=False), [1, 2], 2, 64)
    run(w)
    assert calls == []  # zoo's own path
    run(w, future_option=True)
    assert calls == [["buffer", "future_option"]]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    run(w)
    assert len(calls) == 2
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    w._token_lora_indices[:3] = torch.tensor([0, -2, 1])  # a meaning zoo does not know
    w._grouped = False
    w.update_metadata(LoRAMapping([1, 2, 1], [1, 2, 1], is_prefill=False), [1, 2], 2, 64)
    assert w._grouped
    monkeypatch.setattr(type(w), "token_lora_indices", property(lambda self: torch.tensor([0, -2, 1])))
    w.update_metadata(LoRAMapping([1, 2, 1], [1, 2, 1], is_prefill=False), [1, 2], 2, 64)
    assert not w._grouped
    run(w)
    assert len(calls) == 3


def test_the_scheduler_internals_the_fair_queue_relies_on():
    """zoo/serve/fair.py replaces the scheduler's waiting queue, charges scheduled tokens and
    makes room by vLLM's own preemption; the tenant arrives in the request's cache salt."""
    from vllm.v1.core.sched.request_queue import RequestQueue
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    from zoo.serve.fair import FairQueue

    source = inspect.getsource(Scheduler.__init__)
    assert "self.waiting = create_request_queue" in source, feature("fair scheduler")
    assert list(inspect.signature(Scheduler._update_after_schedule).parameters) == [
        "self", "scheduler_output"], feature("fair scheduler's token accounting")
    assert "num_scheduled_tokens" in inspect.getsource(Scheduler._update_after_schedule)
    assert list(inspect.signature(Scheduler._preempt_request).parameters)[:3] == [
        "self", "request", "timestamp"], feature("fair scheduler's preemption")
    assert "prepend_request" in inspect.getsource(Scheduler._preempt_request)
    assert list(inspect.signature(Scheduler._request_blocks_can_be_freed).parameters) == [
        "self", "request"], feature("fair scheduler's preemption")
    for attribute in ("self.running", "self.max_num_active_reqs", "self.lora_config",
                      "self.num_waiting_for_streaming_input"):
        assert attribute in source, feature(f"fair scheduler ({attribute})")
    for name in ("num_tokens", "num_output_tokens"):
        assert isinstance(getattr(Request, name), property), feature(f"fair scheduler ({name})")
    init = inspect.getsource(Request.__init__)
    for attribute in ("self.cache_salt", "self.num_prompt_tokens", "self.num_computed_tokens"):
        assert attribute in init, feature(f"fair scheduler ({attribute})")
    abstract = {n for n, f in vars(RequestQueue).items() if getattr(f, "__isabstractmethod__", 0)}
    assert abstract <= set(vars(FairQueue)), feature("fair scheduler's queue")
    FairQueue(lambda t: 1.0)  # instantiable: every abstract method implemented


def test_every_generating_route_takes_the_cache_salt():
    """The middleware sets cache_salt on every generating route: it keys the prefix cache
    per tenant and weights, and carries the tenant to the fair scheduler."""
    routes = {"chat": ("vllm.entrypoints.openai.chat_completion.protocol",
                       "ChatCompletionRequest"),
              "completions": ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
              "responses": ("vllm.entrypoints.openai.responses.protocol", "ResponsesRequest"),
              "messages": ("vllm.entrypoints.anthropic.protocol", "AnthropicMessagesRequest"),
              "embeddings": ("vllm.entrypoints.pooling.embed.protocol",
                             "EmbeddingCompletionRequest")}
    for route, (module, name) in routes.items():
        request = getattr(importlib.import_module(module), name)
        assert "cache_salt" in request.model_fields, feature(f"cache isolation ({route})")
    from vllm.engine.arg_utils import EngineArgs

    assert "scheduler_cls" in inspect.signature(EngineArgs).parameters, feature("fair scheduler")


def test_a_loaded_adapter_is_found_without_copying_the_cache():
    """With zoo's loaded_lookup patch, the worker's add_adapter does what vLLM's does
    (the same calls on its adapter manager, the same answer) for adapters loaded or not,
    without list_adapters() but for a reload in place of one loaded."""
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.utils.cache import LRUCache

    class Manager(LRUCacheLoRAModelManager):  # the calls add_adapter makes on it, logged
        capacity = 3

        def __init__(self, log):
            self._registered_adapters, self.log = LRUCache(10), log

        def __len__(self):
            return len(self._registered_adapters)

        def list_adapters(self):
            self.log.append("list")
            return dict(self._registered_adapters)

        def get_adapter(self, lora_id):
            self.log.append(("get", lora_id))
            return self._registered_adapters.get(lora_id)

        def activate_adapter(self, lora_id):
            self.log.append(("activate", lora_id))

        def remove_adapter(self, lora_id):
            self.log.append(("remove", lora_id))
            self._registered_adapters.pop(lora_id, None)

        def remove_oldest_adapter(self):
            self.log.append("remove oldest")
            self._registered_adapters.remove_oldest()

        def add_adapter(self, lora):
            self.log.append(("add", lora.id))
            self._registered_adapters[lora.id] = lora
            return True

    class Worker:
        def __init__(self):
            self.log = []
            self._adapter_manager = Manager(self.log)

        def list_adapters(self):
            return set(self._adapter_manager.list_adapters())

        def _load_adapter(self, request):
            self.log.append(("load", request.lora_int_id))
            return type("Lora", (), {"id": request.lora_int_id})()

    requests = [LoRARequest(f"a{i}", i, "/nowhere") for i in (1, 2, 1, 2, 3, 4, 1, 4, 3)]
    requests.append(LoRARequest("a1", 1, "/nowhere", load_inplace=True))
    vllms, zoos = Worker(), Worker()
    before = LRUCacheWorkerLoRAManager.add_adapter  # zoo's, if an earlier test installed it
    original = LRUCacheWorkerLoRAManager.add_adapter = inspect.unwrap(before)
    answers = [original(vllms, r) for r in requests]
    report = patches.install([plugin.LOADED_LOOKUP])
    try:
        assert report.applied == ["loaded_lookup"]
        assert [LRUCacheWorkerLoRAManager.add_adapter(zoos, r) for r in requests] == answers
    finally:
        LRUCacheWorkerLoRAManager.add_adapter = before
    assert [c for c in vllms.log if c != "list"] == [c for c in zoos.log if c != "list"]
    # vLLM lists the cache for each request; zoo only to reload one in place
    loads = [c[1] for c in zoos.log if c[0] == "load"]
    assert loads == [1, 2, 3, 4, 1, 1]  # 1 evicted by 4, back, then reloaded in place
    assert vllms.log.count("list") == 10 and zoos.log.count("list") == 1
    assert "list_adapters" not in vars(zoos)  # its own method again after each call ...
    zoos._load_adapter = lambda request: 1 / 0
    report = patches.install([plugin.LOADED_LOOKUP])
    try:
        with pytest.raises(ZeroDivisionError):
            LRUCacheWorkerLoRAManager.add_adapter(zoos, LoRARequest("a9", 9, "/nowhere"))
    finally:
        LRUCacheWorkerLoRAManager.add_adapter = before
    assert "list_adapters" not in vars(zoos)  # ... and after a load that failed


def attention_off_in_units(dtype: torch.dtype) -> torch.Tensor:
    """vLLM's CPU attention of one decoding token over 200 cached ones (SmolLM2's heads),
    each output's error against a float64 attention in units in the last place of
    ``dtype``, signed toward zero negative."""
    import math

    from vllm import _custom_ops as ops

    heads, kv_heads, width, block, seen = 9, 3, 64, 32, 200
    g = torch.Generator().manual_seed(3)
    key, value = (torch.randn(seen, kv_heads, width, generator=g).to(dtype) for _ in range(2))
    query = torch.randn(1, heads, width, generator=g).to(dtype)
    blocks = -(-seen // block)
    key_cache, value_cache = torch.zeros(blocks, kv_heads, 2 * block, width,
                                         dtype=dtype).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache,
                                   torch.arange(seen), "vec")
    starts, lengths = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([seen], dtype=torch.int32)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=width, seq_lens=lengths,
        dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False)
    out = torch.zeros_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=starts, seq_lens=lengths, scale=1 / math.sqrt(width), causal=True,
        alibi_slopes=None, sliding_window=-1,
        block_table=torch.arange(blocks, dtype=torch.int32)[None], softcap=0.0,
        scheduler_metadata=schedule, s_aux=None)
    keys, values = (t.double().repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
    weights = (torch.einsum("hd,shd->hs", query[0].double(), keys) / math.sqrt(width)).softmax(-1)
    return units_off(out[0], torch.einsum("hs,shd->hd", weights, values))


def test_vllms_x86_kernels_truncate_bfloat16_exactly_where_the_cpu_lacks_bf16_arithmetic():
    """What zoo serve's warning for bfloat16 (launch.describe) and its rounding patches
    (cpu_norms, cpu_rotary) rest on: on this CPU, vLLM's norms, rotary embedding and
    attention truncate their float32 results to bfloat16 if and only if the CPU has no
    bf16 arithmetic (launch.BF16_ARITHMETIC); float16 is rounded everywhere."""
    from vllm.platforms import current_platform

    from zoo.core.measure import cpu_flags
    from zoo.serve import cpu_norms, cpu_rotary
    from zoo.serve.launch import BF16_ARITHMETIC

    current_platform.import_kernels()
    truncating = not BF16_ARITHMETIC & cpu_flags()
    def truncated(off: torch.Tensor) -> bool:
        """No result above the exact one, and a mean half a unit below (rounded results
        lean neither way)."""
        return float(off.max()) <= 0.01 and float(off.mean()) < -0.4

    assert truncated(attention_off_in_units(torch.bfloat16)) == truncating
    assert not truncated(attention_off_in_units(torch.float16))
    assert cpu_norms.truncates(torch.bfloat16) == cpu_rotary.truncates(torch.bfloat16) == \
        truncating, feature("bfloat16 warning and rounding patches")
    assert not cpu_norms.truncates(torch.float16) and not cpu_rotary.truncates(torch.float16)
