"""zoo's vLLM general plugin (entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts. It

* fixes vLLM 0.32's LoRA device lookup on layers whose kernel released
  ``weight`` after prepacking (the CPU int8 W8A8 kernel sets it to None, and
  every LoRA layer on it died with ``'NoneType' object has no attribute
  'device'``);
* registers the registry-backed LoRA resolver when ``zoo serve`` started the
  process (``ZOO_SERVE_BASE`` is set), so adapters added to the registry while
  the server runs are served on their first request.

It changes installed files in no way: both are runtime registrations.
"""

from __future__ import annotations

import os

SERVE_BASE_VARIABLE = "ZOO_SERVE_BASE"


def register() -> None:
    _patch_lora_device()
    if os.environ.get(SERVE_BASE_VARIABLE):
        from vllm.lora.resolver import LoRAResolverRegistry

        from zoo.serve.resolver import RegistryResolver

        LoRAResolverRegistry.register_resolver("zoo", RegistryResolver.from_environment())


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
