"""Loading registered bases and adapters into transformers (for train, generate, verify)."""

from __future__ import annotations

from pathlib import Path

from zoo.errors import UnknownEntry
from zoo.records import AdapterEntry, BaseEntry
from zoo.registry import Registry
from zoo.store import ORIGINAL, require_intact, verify_files

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def variant_path(registry: Registry, base: BaseEntry, variant: str) -> Path:
    """The intact directory of ``base`` or of one of its quantized variants."""
    if variant == ORIGINAL:
        return require_intact(registry, base)
    if variant not in base.variants:
        raise UnknownEntry(f"{base.name}@{variant}", "base variant",
                           hint=f"Run 'zoo quantize {base.name} --scheme {variant}'.")
    v = base.variants[variant]
    path = registry.home / v.path
    changed = verify_files(path, v.files)
    if changed:
        from zoo.errors import IntegrityError

        raise IntegrityError(f"{base.name}@{variant}: files changed: {', '.join(changed)}",
                             files=changed)
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(registry: Registry, base: BaseEntry, variant: str = ORIGINAL,
               dtype: str = "fp32"):
    """A base (or its NF4 variant) as a transformers model on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = variant_path(registry, base, variant)
    if variant == "nf4":
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    return model.eval()


def load_adapted(registry: Registry, adapter: AdapterEntry, dtype: str = "fp32"):
    """Base + adapter, unmerged, the way the adapter was trained: ``(model, tokenizer)``.

    LoRA and QLoRA load through PEFT (QLoRA on the NF4 variant it was trained
    on); bottleneck adapters through zoo's own hooks.
    """
    catalog = registry.load()
    base = catalog.base(adapter.base)
    adapter_path = require_intact(registry, adapter)
    model = load_model(registry, base, adapter.base_variant, dtype)
    tokenizer = load_tokenizer(variant_path(registry, base, ORIGINAL))
    if adapter.kind == "bottleneck":
        from zoo.bottleneck import BottleneckSet

        bottleneck = BottleneckSet.load(adapter_path).to(model.dtype)
        bottleneck.attach(model)
        model._zoo_bottleneck = bottleneck  # keep the hooks' modules alive with the model
        return model, tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path).eval(), tokenizer
