"""Adapters read from their files: what kind, which modules, and does it fit a base.

Nothing here trusts a flag: the kind comes from the files present, the rank
and targets from the tensors, and every tensor is checked against the shape
of the base weight it attaches to before anything is registered.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

from zoo.core.files import count_parameters, load_json, nonfinite_tensors, tensor_shapes
from zoo.core.records import BottleneckDetails, LoraDetails
from zoo.core.tables import LORA_SUFFIXES, is_count
from zoo.errors import FormatError, ShapeMismatch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
BOTTLENECK_CONFIG = "zoo_adapter.json"
PEFT_PREFIX = "base_model.model."
# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def detect_kind(path: Path) -> str:
    """``'peft'``, ``'bottleneck'`` or ``'model'``, from the files in ``path``."""
    if not path.is_dir():
        raise FormatError(f"{path} is not a directory", path=str(path))
    if (path / PEFT_CONFIG).exists():
        return "peft"
    if (path / BOTTLENECK_CONFIG).exists():
        return "bottleneck"
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return "model"
    raise FormatError(
        f"{path} holds neither a PEFT adapter ({PEFT_CONFIG}), a zoo bottleneck adapter "
        f"({BOTTLENECK_CONFIG}) nor a model (config.json + *.safetensors)", path=str(path))


def _weights(path: Path) -> dict[str, tuple[int, ...]]:
    weights = path / PEFT_WEIGHTS
    if not weights.exists():
        raise FormatError(f"{weights} is missing", path=str(weights),
                          hint="zoo reads safetensors adapters (PEFT's default since 0.4).")
    shapes = tensor_shapes([weights])
    bad = nonfinite_tensors(weights)
    if bad:
        raise FormatError(f"{weights} holds NaN or infinite values in {', '.join(bad[:3])}"
                          f"{' and more' if len(bad) > 3 else ''}", path=str(weights),
                          hint="The adapter's training diverged: retrain or pick a checkpoint "
                               "before it did.")
    return shapes


def _names(config: dict, key: str, path: Path) -> list[str]:
    """A config field that lists module names (PEFT also takes one name as a string)."""
    value = config.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FormatError(f"{path / PEFT_CONFIG}: {key} must be a list of module names",
                          path=str(path))
    return value


_PATTERN_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def check_pattern_keys(pattern: dict, field: str, where: Path) -> None:
    """``rank_pattern``/``alpha_pattern`` keys are module names or dotted suffixes, never
    code: a key with regex syntax is refused (PEFT compiles keys as regexes, and a
    crafted one backtracks for hours)."""
    for key in pattern:
        if len(key) > 256 or not _PATTERN_KEY.fullmatch(key):
            raise FormatError(f"{where / PEFT_CONFIG}: {field} key {key[:60]!r} is not a module "
                              "name or dotted suffix", path=str(where),
                              hint="Write keys as module names, e.g. 'q_proj' or "
                                   "'layers.0.self_attn.q_proj'.")


def match_pattern(pattern: dict, module: str):
    """PEFT's rule for rank_pattern/alpha_pattern on plain keys: a key matches the module
    path itself or a dotted suffix of it (``q_proj`` matches ``...self_attn.q_proj``)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return None


@dataclass(frozen=True)
class LoraInspection:
    rank: int
    alpha: float
    target_modules: list[str]
    trainable_params: int
    details: LoraDetails
    base_model_name_or_path: str | None
    init_lora_weights: object


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def inspect_lora(path: Path, base_modules: dict[str, tuple[int, ...]], base_name: str
                 ) -> LoraInspection:
    """Read a PEFT LoRA directory and check every tensor against the base's weights."""
    config = load_json(path / PEFT_CONFIG, "adapter config")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise FormatError(f"{path} is a PEFT {peft_type} adapter; zoo catalogs LoRA adapters",
                          path=str(path))
    try:
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: r = Infinity
        raise FormatError(f"{path / PEFT_CONFIG} has no valid 'r'", path=str(path)) from None
    try:
        rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    except (AttributeError, TypeError, ValueError, OverflowError):
        raise FormatError(f"{path / PEFT_CONFIG}: rank_pattern and alpha_pattern must map "
                          "module names to numbers", path=str(path)) from None
    check_pattern_keys(rank_pattern, "rank_pattern", path)
    check_pattern_keys(alpha_pattern, "alpha_pattern", path)
    if rank < 1 or any(r < 1 for r in rank_pattern.values()):
        raise FormatError(f"{path / PEFT_CONFIG}: a LoRA rank must be 1 or more", path=str(path))
    if not all(math.isfinite(a) for a in (alpha, *alpha_pattern.values())):
        raise FormatError(f"{path / PEFT_CONFIG}: lora_alpha must be a finite number",
                          path=str(path))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    shapes = _weights(path)

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    extra: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if not key.startswith(PEFT_PREFIX):
            raise FormatError(f"tensor {key} is not a PEFT adapter tensor", path=str(path))
        inner = key[len(PEFT_PREFIX):]
        for role, suffix in LORA_SUFFIXES.items():
            if inner.endswith(suffix):
                modules.setdefault(inner[: -len(suffix)], {})[role] = shape
                break
        else:
            extra[inner] = shape
    if not modules:
        raise FormatError(f"{path / PEFT_WEIGHTS} holds no LoRA tensors", path=str(path))

    for module in sorted(modules):
        _check_lora_module(module, modules[module], base_modules, base_name, fan_in_fan_out,
                           match_pattern(rank_pattern, module) or rank)
    for inner, shape in sorted(extra.items()):  # modules_to_save and embedding copies
        target = re.sub(r"\.(base_layer|modules_to_save\.default)(?=\.)", "", inner)
        target = target.removesuffix(".weight")
        if target not in base_modules:
            raise FormatError(f"tensor {PEFT_PREFIX}{inner} matches no module of base "
                              f"{base_name!r}", path=str(path), hint=ShapeMismatch.hint)
        if inner.endswith(".weight") and shape != base_modules[target]:
            raise ShapeMismatch(PEFT_PREFIX + inner, base_modules[target], shape, base_name)

    ranks = [rank, *rank_pattern.values()]
    details = LoraDetails(
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias=str(config.get("bias", "none")),
        lora_bias=bool(config.get("lora_bias", False)),
        modules_to_save=_names(config, "modules_to_save", path),
        max_rank=max(ranks),
    )
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return LoraInspection(rank, alpha, targets, count_parameters(shapes), details,
                          config.get("base_model_name_or_path"),
                          config.get("init_lora_weights", True))


def _check_lora_module(module, tensors, base_modules, base_name, fan_in_fan_out, rank):
    if module not in base_modules:
        raise FormatError(f"LoRA module {module} matches no weight of base {base_name!r}",
                          hint=ShapeMismatch.hint)
    base_shape = base_modules[module]
    if "embA" in tensors or "embB" in tensors:  # embedding: weight is [num, dim]
        num, dim = base_shape
        want = {"embA": ((rank, num), 1), "embB": ((dim, rank), 0)}
    else:
        out_f, in_f = (base_shape[1], base_shape[0]) if fan_in_fan_out else base_shape[:2]
        want = {"A": ((rank, in_f), 1), "B": ((out_f, rank), 0), "bias": ((out_f,), 0),
                "magnitude": ((out_f,), 0)}
    for role in ("A", "B", "embA", "embB"):
        if role in want and role not in tensors:
            raise FormatError(f"LoRA module {module} has no {LORA_SUFFIXES[role][1:]}")
    for role, got in tensors.items():
        _check_shape(f"{PEFT_PREFIX}{module}.{LORA_SUFFIXES[role][1:]}", got, *want[role],
                     "rank", base_name)


def _check_shape(name: str, got: tuple, shape: tuple, base_axis: int | None, size: str,
                 base_name: str, path: Path | None = None) -> None:
    """A tensor's shape against the one the base and the adapter's config give it:
    ``base_axis`` is the axis of the base's width (None: none). Off only elsewhere, the
    adapter's config and weights disagree (its ``size``): a FormatError; else the adapter
    is for another base: ShapeMismatch."""
    if got == shape:
        return
    if len(got) == len(shape) and (base_axis is None or got[base_axis] == shape[base_axis]):
        raise FormatError(f"tensor {name} has shape {list(got)}, but the config's {size} "
                          f"needs {list(shape)}", path=None if path is None else str(path))
    raise ShapeMismatch(name, shape, got, base_name)


def vllm_servability(kind: str, details: LoraDetails | None, architecture: str,
                     init_lora_weights: object = True) -> str | None:
    """Why vLLM 0.32 would refuse this adapter, or None when it can serve it.

    Mirrors the checks of vLLM's PEFTHelper and its model registry, so the
    registry can say so before anyone tries to serve it.
    """
    if kind == "bottleneck":
        return ("bottleneck adapters add a nonlinear module between layers; vLLM serves "
                "only LoRA (use 'zoo generate')")
    assert details is not None
    reasons = []
    if details.use_dora:
        reasons.append("vLLM does not support DoRA (merge it with 'zoo merge' instead)")
    if details.modules_to_save:
        reasons.append(f"vLLM does not support modules_to_save {details.modules_to_save}")
    if details.lora_bias or details.bias != "none":
        reasons.append("vLLM does not support adapters with bias")
    if details.max_rank > VLLM_LORA_RANKS[-1]:
        reasons.append(f"rank {details.max_rank} is above vLLM's largest "
                       f"max_lora_rank {VLLM_LORA_RANKS[-1]}")
    if isinstance(init_lora_weights, str) and init_lora_weights.lower() not in (
            "gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        reasons.append(f"init_lora_weights={init_lora_weights!r} changes the base weights")
    if not vllm_supports_lora(architecture):
        reasons.append(f"vLLM has no LoRA support for {architecture}")
    return "; ".join(reasons) or None


@functools.cache
def vllm_supports_lora(architecture: str) -> bool:
    """Whether the installed vLLM's model class for ``architecture`` implements SupportsLoRA.

    Read from vLLM's own source files rather than imported: importing vLLM's
    model registry costs seconds, and ``zoo add`` should not.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    models = Path(spec.submodule_search_locations[0]) / "model_executor" / "models"
    try:
        table = (models / "registry.py").read_text()
        found = re.search(rf'"{re.escape(architecture)}":\s*\(\s*"(\w+)",\s*"(\w+)"', table)
        if not found:
            return False
        module, cls = found.groups()
        source = (models / f"{module}.py").read_text()
    except OSError:
        return False
    bases = re.search(rf"^class {cls}\((.*?)\):", source, re.S | re.M)
    return bool(bases and "SupportsLoRA" in bases.group(1))


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that fits ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"rank {rank} is above {VLLM_LORA_RANKS[-1]}")


# -- bottleneck adapters ---------------------------------------------------------------

BOTTLENECK_FORMAT = "zoo-bottleneck"
BOTTLENECK_POSITIONS = ("attention", "feed_forward")
BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "silu", "tanh")  # models/bottleneck.py's modules


@dataclass(frozen=True)
class BottleneckInspection:
    details: BottleneckDetails
    trainable_params: int


def bottleneck_key(layer: int, position: str, part: str, param: str) -> str:
    """Tensor names of zoo's bottleneck format, e.g. ``layers.3.attention.down.weight``."""
    return f"layers.{layer}.{position}.{part}.{param}"


def inspect_bottleneck(path: Path, hidden_size: int, num_layers: int, base_name: str
                       ) -> BottleneckInspection:
    config = load_json(path / BOTTLENECK_CONFIG, "bottleneck adapter config")
    if config.get("format") != BOTTLENECK_FORMAT:
        raise FormatError(f"{path / BOTTLENECK_CONFIG} is not a {BOTTLENECK_FORMAT} config",
                          path=str(path))
    try:
        m, positions = config["bottleneck_size"], config["positions"]
        layers, non_linearity = config["layers"], config["non_linearity"]
    except KeyError as exc:
        raise FormatError(f"{path / BOTTLENECK_CONFIG} lacks {exc}", path=str(path)) from None
    if config.get("format_version", 1) != 1:
        raise FormatError(f"{path / BOTTLENECK_CONFIG} is format_version "
                          f"{str(config['format_version'])[:20]}; this zoo reads 1", path=str(path),
                          hint="Upgrade zoo to read it.")
    if not (is_count(m) and isinstance(positions, list) and isinstance(layers, list)
            and all(type(i) is int for i in layers)  # not bool
            and non_linearity in BOTTLENECK_ACTIVATIONS):
        raise FormatError(f"{path / BOTTLENECK_CONFIG}: bottleneck_size must be a positive "
                          "integer, positions and layers lists (of names, of layer numbers), "
                          f"non_linearity one of {', '.join(BOTTLENECK_ACTIVATIONS)}",
                          path=str(path))
    bad = [p for p in positions if p not in BOTTLENECK_POSITIONS]
    if bad or any(not 0 <= i < num_layers for i in layers) or \
            len(set(positions)) < len(positions) or len(set(layers)) < len(layers):
        raise FormatError(f"{path / BOTTLENECK_CONFIG}: positions {positions} / layers "
                          f"{layers} do not fit base {base_name!r}", path=str(path),
                          hint=ShapeMismatch.hint)
    shapes = _weights(path)
    d = hidden_size
    want = {}  # name: its shape, and which of its axes is the base's hidden size
    for i in layers:
        for pos in positions:
            want[bottleneck_key(i, pos, "down", "weight")] = (m, d), 1
            want[bottleneck_key(i, pos, "down", "bias")] = (m,), None
            want[bottleneck_key(i, pos, "up", "weight")] = (d, m), 0
            want[bottleneck_key(i, pos, "up", "bias")] = (d,), 0
    for key in sorted(want):
        if key not in shapes:
            raise FormatError(f"bottleneck tensor {key} is missing", path=str(path))
        _check_shape(key, shapes[key], *want[key], "bottleneck_size", base_name, path)
    unknown = sorted(set(shapes) - set(want))
    if unknown:
        raise FormatError(f"unexpected tensor {unknown[0]} in bottleneck adapter",
                          path=str(path))
    details = BottleneckDetails(bottleneck_size=m, non_linearity=non_linearity,
                                positions=positions, modules=len(layers) * len(positions))
    return BottleneckInspection(details, count_parameters(shapes))
