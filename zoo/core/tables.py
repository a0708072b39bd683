"""Tables that several layers share, kept once: dtype names, PEFT's LoRA tensor
suffixes, the files that travel with a model's tokenizer, a shape's size."""

from __future__ import annotations

import math
from collections.abc import Iterable

# dtype as users and configs spell it -> torch's name
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
          "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}

# safetensors' dtype codes -> bytes per element (the header check needs no torch)
SAFETENSORS_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# safetensors' codes -> torch's names, for the dtypes zoo reads and writes as tensors
SAFETENSORS_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

# PEFT's LoRA tensors: role -> the suffix of its key after the module path
LORA_SUFFIXES = {
    "A": ".lora_A.weight", "B": ".lora_B.weight", "bias": ".lora_B.bias",
    "magnitude": ".lora_magnitude_vector", "embA": ".lora_embedding_A",
    "embB": ".lora_embedding_B",
}

# Files beside a model's weights that a copy of the model must carry along.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


# The choices a command offers, here so the CLI can list them without importing its feature.
TRAIN_METHODS = ("lora", "qlora", "bottleneck")
COMBINE_METHODS = ("linear", "svd", "ties", "dare_linear")  # merge --to-adapter
VERIFY_MODES = ("modules", "full", "none")  # merge --verify


def numel(shape: Iterable[int]) -> int:
    """Elements in a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def is_count(value) -> bool:
    """A number read from JSON that counts something: an integer of at least 1 (Python's
    bool is an int; JSON's true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def torch_dtype(name: str):
    """A torch dtype from a user's or config's name (``bf16``, ``float32``...)."""
    import torch

    return getattr(torch, DTYPES[name])

# vllm-router's load-balancing policies that apply to zoo's replicas (its own list has
# kv_aware too, which needs KV events vLLM's CPU build does not publish); the default is
# measured (docs/BENCHMARKS.md, bench/scale.py).
ROUTER_POLICIES = ("consistent_hash", "round_robin", "power_of_two", "cache_aware", "random",
                   "sticky_least_loaded")
DEFAULT_ROUTER_POLICY = "consistent_hash"
