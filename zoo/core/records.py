"""Typed records of the registry: bases, their quantized variants, adapters.

These are the only shapes that reach ``registry.json``; the JSON Schema in
``zoo/schema/registry.schema.json`` describes the same thing for other tools,
and the tests validate every registry zoo writes against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

SCHEMA_VERSION = 1

BaseKind = Literal["base", "merged"]
AdapterKind = Literal["lora", "qlora", "bottleneck"]
Kind = Literal["base", "merged", "lora", "qlora", "bottleneck"]
Scheme = Literal["nf4", "w8a8"]
BASE_KINDS: tuple[str, ...] = ("base", "merged")
ADAPTER_KINDS: tuple[str, ...] = ("lora", "qlora", "bottleneck")
LORA_KINDS: tuple[str, ...] = ("lora", "qlora")


def _shallow(record: Any) -> dict[str, Any]:
    """A record's fields as a dict (dataclasses.asdict deep-copies: 5x slower)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _without_empty_evaluations(data: dict[str, Any]) -> dict[str, Any]:
    """``evaluations`` came after schema version 1's first readers: written only when there
    is one, a registry without evaluations stays readable by them."""
    if not data.get("evaluations"):
        data.pop("evaluations", None)
    return data


def now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Variant:
    """A quantized form of a base, stored beside it as ``bases/NAME@SCHEME``."""

    scheme: Scheme
    path: str | None
    files: dict[str, dict[str, Any]]
    content_hash: str
    quantization: dict[str, Any]
    created: str = field(default_factory=now)


@dataclass(frozen=True)
class BaseEntry:
    """A full model: an original base, or one zoo merged from adapters."""

    name: str
    kind: BaseKind
    path: str | None
    files: dict[str, dict[str, Any]]
    content_hash: str
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: str
    parameters: int
    source: dict[str, Any]
    base: str | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    created: str = field(default_factory=now)
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = _shallow(self)
        data["variants"] = {k: _shallow(v) for k, v in self.variants.items()}
        return _without_empty_evaluations(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseEntry:
        data = dict(data)
        data["variants"] = {k: Variant(**v) for k, v in data.get("variants", {}).items()}
        return cls(**data)


@dataclass(frozen=True)
class LoraDetails:
    """What PEFT's adapter_config.json says, as far as serving and merging care."""

    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    max_rank: int = 0


@dataclass(frozen=True)
class BottleneckDetails:
    """A Houlsby bottleneck adapter in zoo's format (see zoo/bottleneck.py)."""

    bottleneck_size: int
    non_linearity: str
    positions: list[str]
    modules: int


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter, bound to the exact base (name and content hash) it belongs to."""

    name: str
    kind: AdapterKind
    base: str
    base_hash: str
    base_variant: str
    path: str | None
    files: dict[str, dict[str, Any]]
    content_hash: str
    rank: int
    alpha: float | None
    target_modules: list[str]
    trainable_params: int
    percent_of_base: float
    servable: bool
    servable_reason: str | None
    source: dict[str, Any]
    lora: LoraDetails | None = None
    bottleneck: BottleneckDetails | None = None
    training: dict[str, Any] | None = None
    hub: dict[str, Any] | None = None
    created: str = field(default_factory=now)
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = _shallow(self)
        for nested in ("lora", "bottleneck"):
            if data[nested] is not None:
                data[nested] = _shallow(data[nested])
        return _without_empty_evaluations(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterEntry:
        data = dict(data)
        if data.get("lora") is not None:
            data["lora"] = LoraDetails(**data["lora"])
        if data.get("bottleneck") is not None:
            data["bottleneck"] = BottleneckDetails(**data["bottleneck"])
        return cls(**data)


Entry = BaseEntry | AdapterEntry


def entry_from_dict(data: dict[str, Any]) -> Entry:
    if data.get("kind") in BASE_KINDS:
        return BaseEntry.from_dict(data)
    return AdapterEntry.from_dict(data)


def replace(entry: Entry, **changes: Any) -> Entry:
    return dataclasses.replace(entry, **changes)
