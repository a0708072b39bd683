"""NF4 with double quantization: the base QLoRA trains on, written by bitsandbytes on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def write_nf4(source: Path, out: Path) -> dict[str, Any]:
    """NF4 with double quantization, as QLoRA trains on it (bitsandbytes on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=nf4_config(),
                                                 dtype=torch.bfloat16, device_map="cpu")
    model.save_pretrained(out)
    return {"quantized_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")}
