"""Loading an NF4 (bitsandbytes 4-bit) checkpoint for computing on the CPU.

bitsandbytes 0.50 computes a 4-bit layer differently depending on the
processor and on whether gradients are on. With gradients (training), the
weight is dequantized to its stored dtype (bf16 for QLoRA) and multiplied.
Without them, it dequantizes straight to the input's dtype, skipping that
rounding; and on processors with AVX-512 BF16 it first repacks the weight in
place, rounds its scales to bf16, and fails outright for layers narrower than
one quantization block (``shape '[32, 0]' is invalid``). The same adapter
would then give other numbers on another machine than the one it was trained
and verified on.

zoo computes every NF4 model it loads one way, the training way: each layer
multiplies by ``bitsandbytes.functional.dequantize_4bit`` of its weight, in
the layer's compute dtype. That is bitsandbytes' own dequantization; only the
choice among its paths is zoo's.
"""

from __future__ import annotations

import types
from pathlib import Path


def _dequantize_then_matmul(self, x):
    import bitsandbytes.functional as F
    import torch

    dtype = self.compute_dtype or x.dtype
    weight = F.dequantize_4bit(self.weight.data, self.weight.quant_state).to(dtype)
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def use_portable_cpu_path(model):
    """Make every bitsandbytes 4-bit layer of ``model`` compute the training way."""
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and \
                hasattr(module.weight, "quant_state"):
            module.forward = types.MethodType(_dequantize_then_matmul, module)
    return model


def load_nf4(path: Path):
    """An NF4 checkpoint as a transformers model on the CPU, on the portable path."""
    from transformers import AutoModelForCausalLM

    return use_portable_cpu_path(AutoModelForCausalLM.from_pretrained(path, device_map="cpu"))
