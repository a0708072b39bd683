"""Quantized variants of a base: NF4 (QLoRA's base) and W8A8 int8 (vLLM on CPU).

Each variant is written to a staging directory, registered under the base
(``zoo show BASE`` lists it) and stored as ``bases/NAME@SCHEME``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.errors import NotSupported
from zoo.home import staging_dir
from zoo.records import Variant
from zoo.registry import Registry
from zoo.store import register_variant, require_intact, verify_files

SCHEMES = ("nf4", "w8a8")
NF4_SETTINGS = {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                "blocksize": 64, "compute_dtype": "bfloat16"}
W8A8_SETTINGS = {"method": "compressed-tensors", "format": "int-quantized",
                 "weights": "int8, per output channel, symmetric",
                 "activations": "int8, dynamic per token, symmetric", "ignore": ["lm_head"]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json", "tokenizer.model")


def quantize(base: str, scheme: str, registry: Registry | None = None,
             force: bool = False, log: Callable[[str], None] = lambda _: None) -> Variant:
    """Write and register the ``scheme`` variant of ``base``; reuse an intact one."""
    registry = registry or Registry()
    if scheme not in SCHEMES:
        raise NotSupported(f"unknown scheme {scheme!r}", hint=f"Use one of {', '.join(SCHEMES)}.")
    entry = registry.load().base(base)
    existing = entry.variants.get(scheme)
    if existing is not None and not force:
        if not verify_files(registry.home / existing.path, existing.files):
            return existing
    source = require_intact(registry, entry)
    write, settings = {"nf4": (write_nf4, NF4_SETTINGS), "w8a8": (write_w8a8, W8A8_SETTINGS)}[scheme]
    log(f"quantizing {base} to {scheme}")
    with staging_dir(registry.home, f"{base}@{scheme}") as stage:
        details = write(source, stage)
        _copy_tokenizer(source, stage)
        return register_variant(registry, stage, base, scheme, {**settings, **details})


def _copy_tokenizer(source: Path, stage: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists() and not (stage / name).exists():
            shutil.copyfile(source / name, stage / name)


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


def write_w8a8(source: Path, out: Path) -> dict[str, Any]:
    from zoo.serve.w8a8 import write_w8a8_checkpoint

    return write_w8a8_checkpoint(source, out)
