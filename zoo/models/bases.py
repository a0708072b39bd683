"""Base models: what a model directory holds, read from its files alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from zoo.core.files import count_parameters, load_json, tensor_shapes
from zoo.core.tables import SAFETENSORS_TORCH, is_count
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


# where a config may give the most tokens a model takes at once (vLLM takes the smallest)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                "model_max_length", "max_target_positions", "max_sequence_length",
                "max_seq_length", "seq_len")
# what transformers writes for a tokenizer without a length (its VERY_LARGE_INTEGER, 1e30)
NO_LENGTH = 10**20


def context_length(model_dir: Path) -> int | None:
    """The most tokens the model in ``model_dir`` takes at once: the smallest length its
    config gives, or its tokenizer's ``model_max_length`` when smaller. That is what vLLM
    derives before any RoPE scaling, so vLLM never allows less. None: neither says."""
    text = _text_config(read_config(model_dir))
    lengths = [text.get(key) for key in CONTEXT_KEYS] if isinstance(text, dict) else []
    tokenizer = model_dir / "tokenizer_config.json"
    if tokenizer.exists():
        lengths.append(load_json(tokenizer, "tokenizer config").get("model_max_length"))
    counts = [n for n in lengths if is_count(n) and n < NO_LENGTH]
    return min(counts) if counts else None


def head_size(model_dir: Path) -> int | None:
    """The width of one attention head of the model in ``model_dir`` (None: its config
    does not say)."""
    text = _text_config(read_config(model_dir))
    if not isinstance(text, dict):
        return None
    if is_count(text.get("head_dim")):
        return text["head_dim"]
    hidden = next((text[k] for k in ("hidden_size", "n_embd") if is_count(text.get(k))), None)
    heads = next((text[k] for k in ("num_attention_heads", "n_head") if is_count(text.get(k))),
                 None)
    return hidden // heads if hidden and heads and hidden % heads == 0 else None


def describe_model(model_dir: Path) -> BaseFacts:
    """Architecture, sizes, dtype and parameter count of a saved model."""
    config = read_config(model_dir)
    text = _text_config(config)
    shapes = tensor_shapes(weight_files(model_dir))
    where = model_dir / CONFIG_FILE
    if not isinstance(text, dict):
        raise FormatError(f"{where}: text_config is not an object", path=str(model_dir))
    architectures = config.get("architectures") or ["unknown"]
    if not isinstance(architectures, list) or not isinstance(architectures[0], str):
        raise FormatError(f"{where}: architectures is not a list of names", path=str(model_dir))
    sizes = []
    for names in (("hidden_size", "n_embd"), ("num_hidden_layers", "n_layer"), ("vocab_size",)):
        value = next((text[n] for n in names if text.get(n) is not None), None)
        if not is_count(value):
            raise FormatError(f"{where}: {' or '.join(names)} is {repr(value)[:40]}, not a "
                              "positive integer", path=str(model_dir))
        sizes.append(value)
    dtype = config.get("dtype") or config.get("torch_dtype")
    if not dtype:
        headers_dtypes = {SAFETENSORS_TORCH[d] for d in _dtypes(model_dir) if d in _FLOAT_CODES}
        dtype = headers_dtypes.pop() if len(headers_dtypes) == 1 else "mixed"
    model_type = config.get("model_type", "unknown")
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if not (isinstance(dtype, str) and isinstance(model_type, str) and isinstance(tied, bool)):
        raise FormatError(f"{where}: dtype and model_type must be names, tie_word_embeddings "
                          "true or false", path=str(model_dir))
    return BaseFacts(
        architecture=architectures[0],
        model_type=model_type,
        hidden_size=sizes[0],
        num_layers=sizes[1],
        vocab_size=sizes[2],
        dtype=dtype,
        parameters=count_parameters(shapes),
        tie_word_embeddings=tied,
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
