"""Base models: what a model directory holds, read from its files alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.core.files import count_parameters, load_json, tensor_shapes
from zoo.core.tables import SAFETENSORS_TORCH
from zoo.errors import FormatError

CONFIG_FILE = "config.json"
_FLOAT_CODES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class BaseFacts:
    """The facts about a model that the registry keeps and the checks need."""

    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: str
    parameters: int
    tie_word_embeddings: bool


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir} has no *.safetensors weights", path=str(model_dir),
                          hint="zoo reads models saved by transformers' save_pretrained.")
    return files


def read_config(model_dir: Path) -> dict:
    return load_json(model_dir / CONFIG_FILE, "model config")


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def describe_model(model_dir: Path) -> BaseFacts:
    """Architecture, sizes, dtype and parameter count of a saved model."""
    config = read_config(model_dir)
    text = _text_config(config)
    shapes = tensor_shapes(weight_files(model_dir))
    try:
        architecture = (config.get("architectures") or ["unknown"])[0]
        hidden = int(text.get("hidden_size") or text["n_embd"])
        layers = int(text.get("num_hidden_layers") or text["n_layer"])
        vocab = int(text["vocab_size"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise FormatError(f"{model_dir / CONFIG_FILE} lacks a model size field ({exc})",
                          path=str(model_dir)) from None
    dtype = config.get("dtype") or config.get("torch_dtype")
    if not dtype:
        headers_dtypes = {SAFETENSORS_TORCH[d] for d in _dtypes(model_dir) if d in _FLOAT_CODES}
        dtype = headers_dtypes.pop() if len(headers_dtypes) == 1 else "mixed"
    return BaseFacts(
        architecture=architecture,
        model_type=str(config.get("model_type", "unknown")),
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=vocab,
        dtype=str(dtype),
        parameters=count_parameters(shapes),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    )


def _dtypes(model_dir: Path) -> set[str]:
    from zoo.core.files import read_safetensors_header

    found = set()
    for f in weight_files(model_dir):
        found |= {info["dtype"] for info in read_safetensors_header(f).values()}
    return found


def module_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes by module path (``model.layers.0.self_attn.q_proj``).

    Tied output embeddings, which a checkpoint stores only once, are filled in
    so an adapter on ``lm_head`` can be checked too.
    """
    shapes = tensor_shapes(weight_files(model_dir))
    modules = {name[: -len(".weight")]: shape for name, shape in shapes.items()
               if name.endswith(".weight")}
    if "lm_head" not in modules:
        for embed in ("model.embed_tokens", "transformer.wte"):
            if embed in modules:
                modules["lm_head"] = modules[embed]
    return modules
