"""Loading registered bases and adapters into transformers (for train, generate, verify)."""

from __future__ import annotations

from pathlib import Path

from zoo.catalog.integrity import ORIGINAL, require_intact, variant_path
from zoo.catalog.registry import Registry
from zoo.core.records import AdapterEntry, BaseEntry
from zoo.core.tables import torch_dtype
from zoo.models.nf4 import load_nf4


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
        model = load_nf4(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    return model.eval()


def load_adapted(registry: Registry, adapter: AdapterEntry, dtype: str = "fp32",
                 variant: str | None = None):
    """Base + adapter, unmerged, the way the adapter was trained: ``(model, tokenizer)``.

    LoRA and QLoRA load through PEFT (QLoRA on the NF4 variant it was trained
    on, unless ``variant`` names another); bottleneck adapters through zoo's own hooks.
    """
    catalog = registry.load()
    base = catalog.base(adapter.base)
    adapter_path = require_intact(registry, adapter)
    model = load_model(registry, base, variant or adapter.base_variant, dtype)
    tokenizer = load_tokenizer(variant_path(registry, base, ORIGINAL))
    if adapter.kind == "bottleneck":
        from zoo.models.bottleneck import BottleneckSet

        bottleneck = BottleneckSet.load(adapter_path).to(model.dtype)
        bottleneck.attach(model)
        model._zoo_bottleneck = bottleneck  # keep the hooks' modules alive with the model
        return model, tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path).eval(), tokenizer
