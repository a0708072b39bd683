"""zoo's vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts. It

* selects zoo's grouped multi-LoRA path on the CPU (``fast_lora.py``;
  ``ZOO_FAST_LORA=0`` keeps vLLM's own);
* fixes vLLM 0.32's LoRA device lookup on layers whose kernel released
  ``weight`` after prepacking (the CPU int8 W8A8 kernel sets it to None, and
  every LoRA layer on it died with ``'NoneType' object has no attribute
  'device'``);
* registers the registry-backed LoRA resolver when ``zoo serve`` started the
  process (``ZOO_SERVE_BASE`` is set), so adapters added to the registry while
  the server runs are served on their first request, one engine step sooner
  than vLLM would (``first_use.py``; ``ZOO_FAST_FIRST_USE=0`` keeps vLLM's way);
* reports, from the worker, what the loaded weights cost: the resident memory
  that loading them added and the bytes of each tensor dtype
  (``$ZOO_SERVE_STATE/weights.json``, served as ``/zoo/engine``).

It changes installed files in no way: all are runtime registrations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SERVE_BASE_VARIABLE = "ZOO_SERVE_BASE"
FAST_LORA_VARIABLE = "ZOO_FAST_LORA"
STATE_VARIABLE = "ZOO_SERVE_STATE"
FIRST_USE_VARIABLE = "ZOO_FAST_FIRST_USE"
WEIGHTS_REPORT = "weights.json"


def register() -> None:
    _patch_lora_device()
    if os.environ.get(FAST_LORA_VARIABLE, "1") != "0":
        _use_fast_lora()
    if os.environ.get(SERVE_BASE_VARIABLE):
        from vllm.lora.resolver import LoRAResolverRegistry

        from zoo.serve.resolver import RegistryResolver

        LoRAResolverRegistry.register_resolver("zoo", RegistryResolver.from_environment())
        if os.environ.get(FIRST_USE_VARIABLE, "1") != "0":
            _serve_first_use_sooner()
    if os.environ.get(STATE_VARIABLE):
        _patch_weight_report(Path(os.environ[STATE_VARIABLE]))


def _use_fast_lora() -> None:
    """On the CPU platform, run LoRA through zoo's grouped wrapper (fast_lora.py)."""
    from vllm.platforms import cpu

    from zoo.serve.fast_lora import QUALNAME, track_slot_writes

    cpu.CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
    track_slot_writes()


def _serve_first_use_sooner() -> None:
    """A cold adapter's first request skips a step (``first_use.py``): the engine core
    loads the adapter on arrival, and the API server (the process vLLM did not start
    itself) submits the request without waiting for the load."""
    import multiprocessing

    from zoo.serve import first_use

    first_use.install_core_side()
    if multiprocessing.parent_process() is None:
        first_use.install_api_side()


def _patch_weight_report(state: Path) -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "_zoo_report", False):
        return

    def load_model(self, *args, **kwargs):
        from zoo.core.measure import heap_in_use

        before = heap_in_use()
        model = original(self, *args, **kwargs)
        report = weight_report(model, heap_in_use() - before)
        state.mkdir(parents=True, exist_ok=True)
        (state / WEIGHTS_REPORT).write_text(json.dumps(report, indent=2))
        return model

    load_model._zoo_report = True
    BaseModelLoader.load_model = load_model


def weight_report(model, heap_delta: int) -> dict:
    """Bytes per tensor dtype and the heap memory loading added. Weights that a
    kernel prepacked outside torch tensors (the CPU int8 kernel does) show in
    the heap figure only."""
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
            "quantized_layers": schemes}


def lora_device(base_layer):
    """Where to put a layer's LoRA weights: vLLM's answer, or the device of any
    tensor the layer still holds when its ``weight`` was released."""
    import torch

    weight = getattr(base_layer, "weight", None)
    if hasattr(base_layer, "weight") and weight is None:
        for tensor in (*base_layer.parameters(recurse=False), *base_layer.buffers(recurse=False)):
            return tensor.device
        return torch.device("cpu")
    return _original_lora_device(base_layer)


_original_lora_device = None


def _patch_lora_device() -> None:
    global _original_lora_device
    from vllm.lora.layers import base_linear, fused_moe, utils

    if _original_lora_device is not None:  # plugins may be loaded more than once
        return
    _original_lora_device = utils._get_lora_device
    for module in (utils, base_linear, fused_moe):
        module._get_lora_device = lora_device
