"""zoo's vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts. It

* makes the process die with its parent (an engine core whose API server was killed,
  a worker whose engine core was, would otherwise run on, holding a whole engine's
  memory);
* applies zoo's guarded patches (``patches.py``; each checks the vLLM version, the
  platform and the signatures it relies on, and stays off with one log line when they
  differ): the grouped CPU LoRA path (``fast_lora.py``; ``ZOO_FAST_LORA=0`` keeps vLLM's
  own), LoRA slots in memory committed only where adapters write, the worker's lookup
  of an adapter it has loaded without copying its cache, the
  LoRA device lookup on layers whose kernel released ``weight`` (the CPU
  int8 W8A8 kernel sets it to None), a cold adapter served one step sooner
  (``first_use.py``; ``ZOO_FAST_FIRST_USE=0`` keeps vLLM's way) and read by the engine
  core while the worker places the one before (``core_reading.py``;
  ``ZOO_CORE_READING=0`` leaves it to the worker), and the report of
  what the loaded weights cost (``$ZOO_SERVE_STATE/weights.json``, ``/zoo/engine``,
  with the provider the worker's norms dispatch to and each custom op's forward), and
  the CPU's RMSNorms through vLLM's C++ kernels (``cpu_norms.py``; ``ZOO_CPU_NORMS=0``
  keeps vLLM's PyTorch ones), and the rotary embedding's CPU kernel rounded where it
  truncates (``cpu_rotary.py``), and the int8 base's linears on zoo's GEMM where the CPU
  has no VNNI (``cpu_int8.py``; ``ZOO_CPU_INT8=0`` keeps vLLM's oneDNN ones);
* registers the registry-backed LoRA resolver (an extension point, not a patch) when
  ``zoo serve`` started the process (``ZOO_SERVE_BASE`` is set);
* for benchmarks, with ``ZOO_STEP_TIMES`` set, has the worker write each step's time and
  its parts (``step_times.py``).

It changes installed files in no way, and it never raises: vLLM calls it without a
try/except, so an exception here would kill every vLLM process.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from zoo.quantize.w8a8 import ZOOS_GEMM_VARIABLE as CPU_INT8_VARIABLE
from zoo.serve import step_times
from zoo.serve.patches import Patch, Report, body_is, fingerprint, has, install, mentions, parameters
from zoo.serve.policy import MODEL_VARIABLE

SERVE_BASE_VARIABLE = "ZOO_SERVE_BASE"
FAST_LORA_VARIABLE = "ZOO_FAST_LORA"
LAYER_ROUTES_VARIABLE = "ZOO_LAYER_ROUTES"
STATE_VARIABLE = "ZOO_SERVE_STATE"
FIRST_USE_VARIABLE = "ZOO_FAST_FIRST_USE"
CORE_READING_VARIABLE = "ZOO_CORE_READING"
LORA_INFO_VARIABLE = "ZOO_LORA_INFO"
CPU_NORMS_VARIABLE = "ZOO_CPU_NORMS"
WEIGHTS_REPORT = "weights.json"
logger = logging.getLogger("zoo.serve")
REPORT = Report()  # what this process's register() did (the contract test reads it)


def register() -> None:
    try:
        _log_to_stderr()
        die_with_parent()
        install(zoo_patches(), REPORT)
        if os.environ.get(step_times.VARIABLE):
            step_times.install(os.environ[step_times.VARIABLE])
        if os.environ.get(SERVE_BASE_VARIABLE):
            from vllm.lora.resolver import LoRAResolverRegistry

            from zoo.serve.resolver import RegistryResolver

            LoRAResolverRegistry.register_resolver("zoo", RegistryResolver.from_environment(
                engine_rescales=SMOOTHED_LORA.name in REPORT.applied))
    except Exception as error:  # noqa: BLE001 - never kill vLLM from a plugin
        logger.error("zoo: plugin registration failed, vLLM runs without zoo's additions "
                     "in this process: %s: %s", type(error).__name__, error)


def zoo_patches() -> list[Patch]:
    """The patches this process should have, by the environment zoo serve set."""
    patches = [LORA_DEVICE, LOADED_LOOKUP, ZERO_PAGE_SLOTS, ADAPTER_READING]
    if os.environ.get(FAST_LORA_VARIABLE, "1") != "0":
        patches += [FAST_LORA, BULK_PLACEMENT]
        if os.environ.get(LAYER_ROUTES_VARIABLE, "1") != "0":
            patches.append(LAYER_ROUTES)
    if os.environ.get(CPU_NORMS_VARIABLE, "1") != "0":
        patches.append(CPU_NORMS)
    patches.append(CPU_ROTARY)
    if os.environ.get(CPU_INT8_VARIABLE, "1") != "0":
        patches.append(CPU_INT8)
    if os.environ.get(SERVE_BASE_VARIABLE) and os.environ.get(FIRST_USE_VARIABLE, "1") != "0":
        patches.append(FIRST_USE)
        if os.environ.get(CORE_READING_VARIABLE, "1") != "0":
            patches.append(CORE_READING)
    if os.environ.get(STATE_VARIABLE):
        patches.append(WEIGHT_REPORT)
    if os.environ.get(LORA_INFO_VARIABLE, "1") != "0":
        patches.append(LORA_INFO)
    if os.environ.get(MODEL_VARIABLE):
        patches.append(SMOOTHED_LORA)
    return patches


def _log_to_stderr() -> None:
    """zoo's lines beside vLLM's in the server's log (vLLM configures its own loggers only)."""
    root = logging.getLogger("zoo")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"(zoo pid={os.getpid()}) %(levelname)s "
                                               "%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def die_with_parent() -> None:
    """In a process vLLM started (engine core, worker), ask Linux for SIGKILL when the
    parent dies, however it dies (SIGKILL included, where no handler runs)."""
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return  # the API server: zoo serve arranges its own (launch.py)
    set_parent_death_signal()


def set_parent_death_signal(signal_number: int | None = None) -> None:
    """``prctl(PR_SET_PDEATHSIG)``: this process gets the signal when its parent exits
    (Linux only; elsewhere nothing is done)."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal_number or signal.SIGKILL), 0, 0, 0)


# -- the patches -----------------------------------------------------------------------

def _use_fast_lora() -> None:
    """On the CPU platform, run LoRA through zoo's grouped wrapper (fast_lora.py)."""
    from vllm.platforms import cpu

    from zoo.serve import native
    from zoo.serve.fast_lora import QUALNAME, track_slot_writes

    cpu.CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
    track_slot_writes()
    native.prebuild()  # in vLLM's first process: its worker then only loads it


_PUNICA = "vllm.lora.punica_wrapper.punica_cpu"
_ONE_STACK_RESET = "self.lora_a_stacked[index] = 0\nself.lora_b_stacked[index] = 0"
# (module, LoRA layer class, the body of its reset_lora that zoo's does instead)
_RESET_LORA = (
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA",
     "for s_index in range(self.n_slices):\n"
     "    self.lora_a_stacked[s_index][index] = 0\n"
     "    self.lora_b_stacked[s_index][index] = 0"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA", _ONE_STACK_RESET),
    ("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA",
     _ONE_STACK_RESET),
)
FAST_LORA = Patch(
    name="fast_lora", cpu_only=True, apply=_use_fast_lora,
    why="vLLM's CPU punica ops run every token through every slot at --max-lora-rank on "
        "all projections, with per-token gathers: 40-50% of throughput",
    retire_when="vLLM's CPU LoRA ops group tokens by adapter and skip untrained slices",
    checks=(
        has("vllm.platforms.cpu", "CpuPlatform", "get_punica_wrapper"),
        has("vllm.lora.punica_wrapper.punica_selector", "get_punica_wrapper"),
        parameters(_PUNICA, "PunicaWrapperCPU", "add_lora_linear",
                   names=("y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                          "output_slices", "buffer", "kwargs"), exact=True),
        parameters(_PUNICA, "PunicaWrapperCPU", "add_lora_logits",
                   names=("y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "buffer",
                          "kwargs"), exact=True),
        parameters(_PUNICA, "PunicaWrapperCPU", "update_metadata",
                   names=("mapping", "lora_index_to_id", "max_loras", "vocab_size")),
        has(_PUNICA, "PunicaWrapperCPU", "token_lora_indices"),
        has(_PUNICA, "PunicaWrapperCPU", "sampler_indices"),
        # zoo's reset_lora does what these do (zero the slot of each stack), skipping
        # slots it knows are zero: it must stay off if they ever do more
        *(check for module, layer, body in _RESET_LORA for check in (
            parameters(module, layer, "reset_lora", names=("index",), exact=True),
            body_is(module, layer, "reset_lora", body=body))),
    ))


def _norms_in_cpp() -> None:
    from vllm.platforms import cpu

    from zoo.serve import cpu_norms

    cpu_norms.register()
    platform = cpu.CpuPlatform
    current = platform.get_default_ir_op_priority.__func__
    if not cpu_norms.is_ours(current):
        platform.get_default_ir_op_priority = classmethod(cpu_norms.priority(current))


def _cpu_keeps_the_default_priority() -> str | None:
    from vllm.platforms import cpu

    from zoo.serve.cpu_norms import is_ours

    own = vars(cpu.CpuPlatform).get("get_default_ir_op_priority")
    if own is not None and not is_ours(own.__func__):
        return "vLLM's CPU platform sets its own IR op priority"
    return None


CPU_NORMS = Patch(
    name="cpu_norms", cpu_only=True, apply=_norms_in_cpp,
    why="vLLM's CPU platform runs every RMSNorm as seven PyTorch operations (its C++ "
        "kernels are registered as IR providers for GPUs only): 16% of the worker serving "
        "64 requests",
    retire_when="vLLM registers its C++ norms as IR providers on the CPU platform (or "
                "gives the CPU a default IR op priority)",
    checks=(
        has("vllm.ir.ops", "rms_norm", "register_impl"),
        has("vllm.ir.ops", "fused_add_rms_norm", "register_impl"),
        has("vllm.config.kernel", "IrOpPriorityConfig", "with_default"),
        has("vllm.platforms.interface", "Platform", "get_default_ir_op_priority"),
        _cpu_keeps_the_default_priority,
    ))


def _round_the_rotary_embedding() -> None:
    from zoo.serve import cpu_rotary

    cpu_rotary.register()


CPU_ROTARY = Patch(
    name="cpu_rotary", cpu_only=True, apply=_round_the_rotary_embedding,
    why="vLLM's rotary kernel for the CPU truncates its results to bfloat16 where the CPU "
        "has no AVX512-BF16 (every number up to a unit in the last place toward zero); "
        "zoo serve runs that kernel (+rotary_embedding)",
    retire_when="vLLM's x86 conversion of float32 to bfloat16 rounds on every CPU",
    checks=(
        has("vllm.platforms.interface", "Platform", "import_kernels"),
        parameters("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding",
                   "forward_cpu", names=("positions", "query", "key"), exact=True),
        mentions("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding",
                 "forward_cpu", snippets=("ops.rotary_embedding(", "return query, key")),
    ))


def _int8_on_zoos_gemm() -> None:
    from zoo.core.measure import cpu_flags
    from zoo.serve import cpu_int8

    cpu_int8.register(cpu_flags())


_CPU_INT8_MODULE = "vllm.model_executor.kernels.linear.scaled_mm.cpu"
CPU_INT8 = Patch(
    name="cpu_int8", cpu_only=True, apply=_int8_on_zoos_gemm,
    why="on a CPU without VNNI, oneDNN's int8 matmul (gemm:jit) reorders the whole weight "
        "on every call (one stream on the int8 base: 0.39x the 16-bit base's speed) and "
        "its int16 pair sums saturate",
    retire_when="oneDNN (or vLLM's CPU int8 kernel) is exact and fast at a few rows on "
                "AVX2 without VNNI",
    checks=(
        has("vllm._custom_ops", "onednn_scaled_int8_quant"),
        has("vllm.model_executor.layers.utils", "check_cpu_sgl_kernel"),
        parameters(_CPU_INT8_MODULE, "CPUInt8ScaledMMLinearKernel",
                   "process_weights_after_loading", names=("layer",), exact=True),
        mentions(_CPU_INT8_MODULE, "CPUInt8ScaledMMLinearKernel", "apply_weights",
                 snippets=("self.linear_method(",)),
        mentions(_CPU_INT8_MODULE, "CPUInt8ScaledMMLinearKernel", "_apply_weights_onednn",
                 snippets=("ops.onednn_scaled_int8_quant(", "x, i_s, i_zp, self.config.input_symmetric",
                           "ops.onednn_scaled_mm(")),
        mentions(_CPU_INT8_MODULE, "CPUInt8ScaledMMLinearKernel", "process_weights_for_onednn",
                 snippets=("setattr(layer, w_q_name, None)",)),
    ))


def _place_in_bulk() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from zoo.serve import fast_lora

    if not getattr(BaseLinearLayerWithLoRA.reset_lora, "_zoo_tracks", False):
        raise RuntimeError("it keeps fast_lora's records of written slots; fast_lora is off")
    fast_lora.place_in_bulk()


_MODEL_MANAGER = "vllm.lora.model_manager"
_COLUMN = "vllm.lora.layers.column_parallel_linear"
BULK_PLACEMENT = Patch(
    name="bulk_placement", cpu_only=True, apply=_place_in_bulk,
    why="an adapter entering a slot visits each of the model's LoRA layers in Python "
        "(122 for SmolLM2: a reset and a copy per slice each), on the core that runs "
        "every step: 2.1-2.5 ms of a cold adapter's 5-6 ms first use",
    retire_when="vLLM places an adapter's weights in one call (or its layers share one "
                "stack per slot)",
    checks=(
        # what zoo's activate_adapter does in their place, exactly as they are in 0.32
        fingerprint(_MODEL_MANAGER, "LoRAModelManager", "activate_adapter",
                    digest="20b3189eea53428a"),
        fingerprint(_MODEL_MANAGER, "LoRAModelManager", "_get_lora_layer_weights",
                    digest="7913922431ab1699"),
        fingerprint("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA", "set_lora",
                    digest="0ce11bad28d0f287"),
        fingerprint(_COLUMN, "MergedColumnParallelLinearWithLoRA", "set_lora",
                    digest="84cf2524cefea44f"),
        has("vllm.lora.lora_model", "LoRAModel", "get_lora"),
        has("vllm.lora.layers", "ClassificationHeadWithLoRA"),
    ))


def _route_layers() -> None:
    from vllm.platforms import cpu

    from zoo.serve import layer_routes
    from zoo.serve.fast_lora import QUALNAME

    if cpu.CpuPlatform.get_punica_wrapper() != QUALNAME:
        raise RuntimeError("it reads each step's adapters from fast_lora's wrapper, and "
                           "calls its kernel; fast_lora is off")
    layer_routes.install()


_LINEAR = "vllm.model_executor.layers.linear"
_BASE_LINEAR = "vllm.lora.layers.base_linear"
# (module, class, method, digest) as in 0.32: a step's mapping is set after its adapters
# are in their slots, every step; each LoRA forward is its base's forward with the
# adapters' product added in place (apply -> _apply_sync -> the base's linear method,
# then add_lora_linear)
_ROUTED_AS_WRITTEN = (
    (_MODEL_MANAGER, "LoRAModelManager", "set_adapter_mapping", "bd7e8c7e73e895e5"),
    (_COLUMN, "ColumnParallelLinearWithLoRA", "forward", "2b64db57a166eb13"),
    (_LINEAR, "ColumnParallelLinear", "forward", "5cb9dcb880ab1da4"),
    ("vllm.lora.layers.row_parallel_linear", "RowParallelLinearWithLoRA", "forward",
     "f632087598317268"),
    (_LINEAR, "RowParallelLinear", "forward", "b1fe9c03a0a51939"),
    ("vllm.lora.layers.replicated_linear", "ReplicatedLinearWithLoRA", "forward",
     "c5426e210099d809"),
    (_LINEAR, "ReplicatedLinear", "forward", "f6172f64e13fdcd5"),
    (_BASE_LINEAR, "BaseLinearLayerWithLoRA", "apply", "c33b6a6643b43713"),
    (_COLUMN, "MergedColumnParallelLinearWithLoRA", "apply", "8f8757021a2d357f"),
    (_BASE_LINEAR, "BaseLinearLayerWithLoRA", "_apply_sync", "ac85ea523d920518"),
    (_BASE_LINEAR, "BaseLinearLayerWithLoRA", "_apply_lora_to_output", "7a93e928c9672d31"),
)
LAYER_ROUTES = Patch(
    name="layer_routes", cpu_only=True, apply=_route_layers,
    why="every LoRA layer runs seven calls of vLLM's to reach the punica wrapper (and "
        "zoo's four more to reach its kernel) in every step, trained by an adapter of the "
        "step or not: with q/v adapters 90 of SmolLM2's 120 add nothing, none in a step "
        "of the base alone; the wrapper's Python was 2.1 ms of a 74 ms warm decode step",
    retire_when="vLLM skips a LoRA layer no adapter of the step trains, and reaches the "
                "punica wrapper in fewer calls",
    checks=(
        *(fingerprint(module, cls, name, digest=digest)
          for module, cls, name, digest in _ROUTED_AS_WRITTEN),
        # no traced graph keeps a route: a LoRA engine on the CPU runs eagerly
        mentions("vllm.platforms.cpu", "CpuPlatform", "check_and_update_config",
                 snippets=("if vllm_config.lora_config is not None:\n"
                           "            compilation_config.mode = CompilationMode.NONE",)),
    ))


def lora_device(base_layer):
    """Where to put a layer's LoRA weights: vLLM's answer, or the device of any tensor
    the layer still holds when its ``weight`` was released (else the platform's)."""
    import torch

    weight = getattr(base_layer, "weight", None)
    if hasattr(base_layer, "weight") and weight is None:
        for tensor in (*base_layer.parameters(recurse=False), *base_layer.buffers(recurse=False)):
            return tensor.device
        from vllm.platforms import current_platform

        return torch.device(current_platform.device_type)
    return _original_lora_device(base_layer)


_original_lora_device = None
_LORA_LAYERS = ("vllm.lora.layers.utils", "vllm.lora.layers.base_linear",
                "vllm.lora.layers.fused_moe")


def _patch_lora_device() -> None:
    global _original_lora_device
    import importlib

    if _original_lora_device is not None:  # plugins may be loaded more than once
        return
    from vllm.lora.layers import utils

    _original_lora_device = utils._get_lora_device
    for name in _LORA_LAYERS:
        module = importlib.import_module(name)
        if getattr(module, "_get_lora_device", None) is _original_lora_device:
            module._get_lora_device = lora_device


LORA_DEVICE = Patch(
    name="lora_device", apply=_patch_lora_device,
    why="vLLM 0.32 reads base_layer.weight.device; the CPU int8 kernel sets weight to None "
        "after prepacking, and every LoRA layer on it died at start",
    retire_when="vllm/lora/layers/utils.py::_get_lora_device handles a released weight",
    checks=(parameters("vllm.lora.layers.utils", "_get_lora_device", names=("base_layer",),
                       exact=True),
            has("vllm.lora.layers.base_linear", "_get_lora_device")))


def _serve_first_use_sooner() -> None:
    """The engine core loads a cold adapter on its request's arrival, and the API server
    (the process vLLM did not start itself) submits the request without waiting."""
    import multiprocessing

    from zoo.serve import first_use

    first_use.install_core_side()
    if multiprocessing.parent_process() is None:
        first_use.install_api_side()


_CORE = "vllm.v1.engine.core"
_WORKER_MANAGER = "vllm.lora.worker_manager"
_MODELS = "vllm.entrypoints.openai.models.serving"
# both sides in one patch: every process runs the same checks, so they apply together or
# not at all
FIRST_USE = Patch(
    name="first_use", apply=_serve_first_use_sooner,
    why="the API server awaits add_lora on the engine core, which answers between steps "
        "only: a cold adapter's first token waited one more engine step",
    retire_when="vLLM's engine core loads a request's adapter on arrival (no add_lora "
                "round trip before submitting)",
    checks=(
        parameters(_CORE, "EngineCore", "add_request", names=("request", "request_wave")),
        parameters(_CORE, "EngineCore", "add_lora", names=("lora_request",), exact=True),
        parameters(_CORE, "EngineCore", "remove_lora", names=("lora_id",), exact=True),
        parameters(_CORE, "EngineCore", "abort_requests", names=("request_ids",), exact=True),
        # the held requests are handed over as the loop leaves the input queue for a step
        parameters(_CORE, "EngineCoreProc", "has_work", names=(), exact=True),
        parameters(_CORE, "EngineCoreProc", "_process_input_queue", names=(), exact=True),
        mentions(_CORE, "EngineCoreProc", "_process_input_queue",
                 snippets=("while not self.has_work()",)),
        parameters("vllm.v1.executor.abstract", "Executor", "collective_rpc",
                   names=("method", "timeout", "args", "kwargs", "non_block")),
        has("vllm.lora.request", "LoRARequest", "load_inplace"),
        parameters(_CORE, "EngineCoreProc", "_send_error_outputs_to_client",
                   names=("req_ids", "client_index"), exact=True),
        parameters(_MODELS, "OpenAIServingModels", "resolve_lora", names=("lora_name",),
                   exact=True),
        mentions(_MODELS, "OpenAIServingModels", "__init__", snippets=tuple(
            f"self.{a}" for a in ("lora_requests", "lora_resolver_lock", "lora_resolvers",
                                  "lora_id_counter", "engine_client", "model_config"))),
        has("vllm.lora.request", "LoRARequest", "lora_int_id"),
    ))


def _read_in_the_core() -> None:
    from zoo.serve import core_reading

    core_reading.install_worker_side()


CORE_READING = Patch(
    name="core_reading", apply=_read_in_the_core,
    why="the worker reads a cold adapter (2-3.5 ms of its 5-6 ms first use) on the CPU "
        "that runs every step, one adapter after another before a cold burst's first step",
    retire_when="vLLM loads adapters off the step's CPU (or reads them in the engine core)",
    checks=(
        # the engine core runs this body on a stand-in for the worker's manager
        fingerprint(_WORKER_MANAGER, "WorkerLoRAManager", "_load_adapter",
                    digest="bbe3ecd38c23bc02"),
        mentions(_WORKER_MANAGER, "LRUCacheWorkerLoRAManager", "add_adapter",
                 snippets=("self._load_adapter(lora_request)",)),
        # the core folds each layer's scaling into B (optimize) before it sends a model:
        # the worker's packing must do no more with a layer whose scaling is 1 than skip
        fingerprint("vllm.lora.lora_weights", "LoRALayerWeights", "optimize",
                    digest="e82cbbf83d9cd388"),
        mentions(_MODEL_MANAGER, "LoRAModelManager", "_create_merged_loras_inplace",
                 snippets=("lora.optimize()",)),
    ))


def _look_up_loaded_adapters_in_place() -> None:
    """vLLM's worker asks ``lora_int_id not in self.list_adapters()`` for every adapter of
    every step: a copy of the dict of every adapter kept loaded (up to --max-cpu-loras),
    twice. For an adapter already loaded (the question's common answer) zoo asks the
    cache itself and does what vLLM does then: look it up (touching nothing) and
    activate it. Anything else goes to vLLM's own ``add_adapter``; for an adapter not
    loaded, its ``list_adapters()`` answers an empty set for that call (the answer's one
    use: the id is not in it), where the copy took 0.2-0.5 ms of each first use at 256-512
    adapters kept."""
    from vllm.lora import worker_manager

    cls = worker_manager.LRUCacheWorkerLoRAManager
    original = cls.add_adapter
    if getattr(original, "_zoo_in_place", False):
        return

    def add_adapter(self, lora_request):
        manager = self._adapter_manager
        lora_id = lora_request.lora_int_id
        if lora_id not in manager._registered_adapters:
            self.list_adapters = frozenset  # for this call: nothing the id could be among
            try:
                return original(self, lora_request)
            finally:
                del self.list_adapters
        if lora_request.load_inplace:
            return original(self, lora_request)
        with worker_manager.gpu_sync_allowed():
            loaded = manager.get_adapter(lora_id) is not None
            manager.activate_adapter(lora_id)
        return loaded

    add_adapter._zoo_in_place = True
    add_adapter.__wrapped__ = original  # what the checks read if the plugin loads again
    cls.add_adapter = add_adapter


LOADED_LOOKUP = Patch(
    name="loaded_lookup", apply=_look_up_loaded_adapters_in_place,
    why="the worker copies the dict of every loaded adapter (up to --max-cpu-loras) twice "
        "for each adapter of each step to ask whether it is loaded: 2.5% of the worker "
        "with 256 adapters in flight",
    retire_when="LRUCacheWorkerLoRAManager.add_adapter tests membership without "
                "list_adapters()",
    checks=(
        parameters(_WORKER_MANAGER, "LRUCacheWorkerLoRAManager", "add_adapter",
                   names=("lora_request",), exact=True),
        mentions(_WORKER_MANAGER, "LRUCacheWorkerLoRAManager", "add_adapter", snippets=(
            "lora_request.lora_int_id not in self.list_adapters()",
            "or lora_request.load_inplace",
            "self._adapter_manager.get_adapter(lora_request.lora_int_id)",
            "self._adapter_manager.activate_adapter(lora_request.lora_int_id)")),
        has(_WORKER_MANAGER, "gpu_sync_allowed"),
        mentions(_WORKER_MANAGER, "WorkerLoRAManager", "list_adapters",
                 snippets=("set(self._adapter_manager.list_adapters())",)),
        mentions("vllm.lora.model_manager", "LRUCacheLoRAModelManager", "list_adapters",
                 snippets=("self._registered_adapters",)),
        mentions("vllm.lora.model_manager", "LRUCacheLoRAModelManager", "get_adapter",
                 snippets=("self._registered_adapters.get(adapter_id)",)),
        # a new adapter's call answers list_adapters() with an empty set: its only use
        mentions(_WORKER_MANAGER, "LRUCacheWorkerLoRAManager", "add_adapter",
                 snippets=("self.list_adapters()",), once=True),
    ))


def _allocate_slots_lazily() -> None:
    from zoo.serve.policy import TARGETS_VARIABLE
    from zoo.serve.zero_pages import allocate_slots_lazily

    trained = os.environ.get(TARGETS_VARIABLE, "")
    allocate_slots_lazily({t for t in trained.split(",") if t})


ZERO_PAGE_SLOTS = Patch(
    name="zero_page_slots", cpu_only=True, apply=_allocate_slots_lazily,
    why="vLLM writes zeros through every LoRA slot at --max-lora-rank on every projection "
        "at start (12.9 MB a slot for SmolLM2 at rank 16 in bf16): memory for weights no "
        "adapter has, which held the default at 128 slots (the served adapters' "
        "projections are committed at start: a first write's page faults cost a cold "
        "adapter's placement 4.4 ms of 6)",
    retire_when="vLLM allocates LoRA stacks as they are used, or at the adapters' ranks "
                "and targets",
    checks=(parameters("vllm.lora.model_manager", "LoRAModelManager", "_create_lora_modules",
                       names=(), exact=True),
            mentions("vllm.lora.model_manager", "LoRAModelManager", "__init__",
                     snippets=("self._create_lora_modules()", "self.modules",
                               "self.packed_modules_mapping"))))


def _patch_weight_report() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    state = Path(os.environ[STATE_VARIABLE])
    original = BaseModelLoader.load_model
    if getattr(original, "_zoo_report", False):
        return

    def load_model(self, *args, **kwargs):
        from zoo.core.measure import heap_in_use

        before = heap_in_use()
        model = original(self, *args, **kwargs)
        try:
            report = weight_report(model, heap_in_use() - before)
            state.mkdir(parents=True, exist_ok=True)
            (state / WEIGHTS_REPORT).write_text(json.dumps(report, indent=2))
        except Exception as error:  # noqa: BLE001 - a report must not stop the engine
            logger.warning("zoo: could not write the weights report: %s", error)
        return model

    load_model._zoo_report = True
    BaseModelLoader.load_model = load_model


WEIGHT_REPORT = Patch(
    name="weight_report", apply=_patch_weight_report,
    why="what the loaded weights cost (heap and bytes per dtype), read in the worker",
    retire_when="vLLM reports its weights' memory by dtype (it logs one total only)",
    checks=(has("vllm.model_executor.model_loader.base_loader", "BaseModelLoader",
                "load_model"),))


def _keep_one_lora_info_series() -> None:
    """vllm:lora_requests_info holds the adapters running and waiting in its labels, and
    vLLM sets it with the labels of every report: each new set of adapters adds a series
    that is never removed. Cleared before each report that sets it, it keeps the current
    one only (the one its readers take: the latest timestamp)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    original = PrometheusStatLogger.record
    if getattr(original, "_zoo_one_series", False):
        return

    def record(self, scheduler_stats, *args, **kwargs):
        gauge = getattr(self, "gauge_lora_info", None)
        if gauge is not None and scheduler_stats is not None:
            gauge.clear()
        return original(self, scheduler_stats, *args, **kwargs)

    record._zoo_one_series = True
    PrometheusStatLogger.record = record


_LOGGERS = "vllm.v1.metrics.loggers"
LORA_INFO = Patch(
    name="lora_info", apply=_keep_one_lora_info_series,
    why="vllm:lora_requests_info keeps a series for every set of running and waiting adapters "
        "it ever reported: /metrics grows with every new mix (109 after 6,720 adapters)",
    retire_when="vLLM removes the previous series when it sets vllm:lora_requests_info",
    checks=(parameters(_LOGGERS, "PrometheusStatLogger", "record",
                       names=("scheduler_stats", "iteration_stats")),
            mentions(_LOGGERS, "PrometheusStatLogger", "record",
                     snippets=("if scheduler_stats is not None", "self.gauge_lora_info.labels("))))


def _adapt_loras_as_the_engine_loads_them() -> None:
    """On a smoothed base (``zoo_smoothing.scales`` beside the served checkpoint), every
    LoRA vLLM loads is rescaled to match as its tensors are read (``adapt_tensors``, the
    same function and order of operations as the adapted copy it replaces: the same
    numbers). The API server then hands vLLM the stored files (resolver.py): no copy is
    written, and none of that work is done on its event loop."""
    from vllm.lora.lora_model import LoRAModel

    from zoo.models.smoothing import adapt_tensors, load_scales
    from zoo.serve import adapter_reading

    original = LoRAModel.from_lora_tensors.__func__
    if getattr(original, "_zoo_adapts", False):
        return
    scales = load_scales(Path(os.environ[MODEL_VARIABLE]))
    if scales is None:
        return  # not smoothed: adapters load as they are
    adapter_reading.rescale_with(scales)  # tensors adapter_reading lent, rescaled as they settle

    plans = {}  # each tensor name's rescaling, worked out once (the names repeat)

    def from_lora_tensors(cls, lora_model_id, tensors, *args, **kwargs):
        tensors = adapter_reading.settle(tensors, adapter_reading.dtype_of(args, kwargs))
        if not isinstance(tensors, adapter_reading.Settled):
            tensors = adapt_tensors(tensors, scales, plans)
        return original(cls, lora_model_id, tensors, *args, **kwargs)

    from_lora_tensors._zoo_adapts = True
    from_lora_tensors.__wrapped__ = original
    LoRAModel.from_lora_tensors = classmethod(from_lora_tensors)


_LORA_MODEL = "vllm.lora.lora_model"
# adapter_reading.dtype_of finds a from_lora_tensors call's dtype by keyword or by place
_DTYPE_BY_PLACE = parameters(_LORA_MODEL, "LoRAModel", "from_lora_tensors",
                             names=("lora_model_id", "tensors", "peft_helper", "device", "dtype"))
SMOOTHED_LORA = Patch(
    name="smoothed_lora", apply=_adapt_loras_as_the_engine_loads_them,
    why="adapters trained on the original base must be rescaled for a SmoothQuant-ed one; "
        "written as copies by the API server, that took 12 ms of its event loop and a "
        "file per adapter ever used",
    retire_when="vLLM can transform an adapter's tensors on load (a LoRA loading hook)",
    checks=(parameters(_LORA_MODEL, "LoRAModel", "from_lora_tensors",
                       names=("lora_model_id", "tensors")),
            mentions(_LORA_MODEL, "LoRAModel", "from_local_checkpoint",
                     snippets=("cls.from_lora_tensors(", "tensors=tensors")),
            _DTYPE_BY_PLACE,
            mentions("vllm.lora.worker_manager", "WorkerLoRAManager", "_load_adapter",
                     snippets=("self._lora_model_cls.from_local_checkpoint(",))))


def _read_adapters_in_fewer_steps() -> None:
    from zoo.serve import adapter_reading

    adapter_reading.install()


ADAPTER_READING = Patch(
    name="adapter_reading", apply=_read_adapters_in_fewer_steps,
    why="the worker reads a new adapter's safetensors one tensor at a time, copies and "
        "converts each tensor on its own, parses each tensor's name three times and "
        "formats a tensor as text, on the core that runs every step",
    retire_when="vLLM reads an adapter's file in one go, parses each module's name once "
                "and reads a packed adapter's device from its tensor's .device",
    checks=(mentions(_LORA_MODEL, "LoRAModel", "from_local_checkpoint", snippets=(
                'safetensors.safe_open(lora_tensor_path, framework="pt")', "f.keys()",
                "f.get_tensor(module)", "parse_fine_tuned_lora_name(",
                # the lent tensors go to from_lora_tensors, which settles them
                "tensors[module] = f.get_tensor(module)", "cls.from_lora_tensors(",
                "tensors=tensors", "dtype=dtype")),
            _DTYPE_BY_PLACE,
            parameters("vllm.lora.utils", "parse_fine_tuned_lora_name",
                       names=("name", "weights_mapper"), exact=True),
            has(_LORA_MODEL, "safetensors", "safe_open"),
            has(_LORA_MODEL, "parse_fine_tuned_lora_name"),
            lambda: _str_only_names_a_device("vllm.lora.model_manager")))


def _str_only_names_a_device(module: str) -> str | None:
    """``module`` calls ``str`` once, to compare a device's name with "cpu" (what
    ``adapter_reading.text`` answers the same for a tensor, without formatting it)."""
    import importlib
    import inspect
    import re

    calls = re.findall(r"(?<![\w.])str\((.*)", inspect.getsource(importlib.import_module(module)))
    if [c.partition(")")[2].strip() for c in calls] != ['== "cpu" and PIN_MEMORY']:
        return f"{module} calls str() otherwise than once, to compare a device with \"cpu\""
    return None


def weight_report(model, heap_delta: int) -> dict:
    """Bytes per tensor dtype and the heap memory loading added. Weights that a
    kernel prepacked outside torch tensors (vLLM's oneDNN int8 kernel does; zoo's
    ``cpu_int8`` keeps them as buffers) show in the heap figure only; and how many
    int8 linears zoo's GEMM runs."""
    from zoo.serve import cpu_int8

    by_dtype: dict[str, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        key = str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
    schemes: dict[str, int] = {}
    for module in model.modules():
        scheme = getattr(module, "scheme", None)  # compressed-tensors layers
        if scheme is not None:
            schemes[type(scheme).__name__] = schemes.get(type(scheme).__name__, 0) + 1
    return {"heap_bytes": heap_delta, "tensor_bytes_by_dtype": by_dtype,
            "quantized_layers": schemes, "norms": norm_providers(model),
            "forwards": custom_op_forwards(model), "rounded_by_zoo": rounded_by_zoo(),
            "int8_linears_by_zoo": cpu_int8.taken()}


def rounded_by_zoo() -> dict[str, list[str]]:
    """The 16-bit dtypes whose results vLLM's CPU kernels truncate on this CPU, which zoo
    computes in float32 and rounds itself, by kernel (``cpu_norms``, ``cpu_rotary``;
    empty where they round, or where the patch is off)."""
    from zoo.serve import cpu_norms, cpu_rotary

    def names(dtypes) -> list[str]:
        return sorted(str(d).removeprefix("torch.") for d in dtypes)

    return {"norms": names(cpu_norms._WIDENED), "rotary": names(cpu_rotary._WIDENED)}


def custom_op_forwards(model) -> dict[str, str]:
    """Which of its forwards each of the model's vLLM custom ops runs, by class
    (``forward_native``: PyTorch operations; ``forward_cpu``: the platform's own, where
    the op has one and is enabled, ``zoo serve``'s ``CPU_COMPILATION``)."""
    from vllm.model_executor.custom_op import CustomOp

    return {type(m).__name__: getattr(m._forward_method, "__name__", "?")
            for m in model.modules() if isinstance(m, CustomOp)}


def norm_providers(model) -> dict[str, str]:
    """Which provider vLLM's dispatch picks, in this process, for the model's norms (a
    row of its first RMSNorm's width and dtype): ``zoo_cpu`` where the cpu_norms patch
    took, ``native`` where it did not; empty for a model without an RMSNorm."""
    import torch
    from vllm import ir
    from vllm.model_executor.layers.layernorm import RMSNorm

    norm = next((m for m in model.modules() if isinstance(m, RMSNorm)), None)
    if norm is None:
        return {}
    weight, epsilon = norm.weight.data, norm.variance_epsilon
    row = torch.zeros(1, weight.shape[0], dtype=weight.dtype)
    return {"rms_norm": ir.ops.rms_norm.dispatch(row, weight, epsilon).provider,
            "fused_add_rms_norm":
                ir.ops.fused_add_rms_norm.dispatch(row, row.clone(), weight, epsilon).provider}
