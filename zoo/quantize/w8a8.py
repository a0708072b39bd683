"""An int8 W8A8 compressed-tensors checkpoint of a base, for vLLM's CPU int8 kernel.

Weights: int8, one symmetric scale per output channel (absmax / 127).
Activations: int8, quantized per token at run time by vLLM (nothing to calibrate).
Written with the compressed-tensors library alone; ``lm_head`` stays 16-bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_w8a8(source: Path, out: Path) -> dict[str, Any]:
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    quantized = 0
    with torch.no_grad():
        for module in model.modules():
            scale = getattr(module, "weight_scale", None)
            if scale is None:
                continue
            absmax = module.weight.detach().float().abs().amax(dim=1, keepdim=True)
            scale.copy_((absmax / 127.0).clamp(min=1e-8).to(scale.dtype))
            zero = getattr(module, "weight_zero_point", None)
            if zero is not None:
                zero.zero_()
            quantized += 1
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    return {"quantized_modules": quantized}
