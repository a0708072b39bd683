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

# 2: adapters have numbered versions, aliases, a canary and a history; bases may record
# their Hub identity. A version-1 registry is upgraded when opened (catalog/registry.py).
SCHEMA_VERSION = 2

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


OPTIONAL = ("evaluations", "hub", "versions", "aliases", "canary", "history")


def _without_empty(data: dict[str, Any]) -> dict[str, Any]:
    """Optional fields are written only when they hold something: a registry stays as small
    and as readable as the entries in it need."""
    for key in OPTIONAL:
        if key in data and not data[key]:
            del data[key]
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
    # where it lives on a Hub: {"repo", "revision", "commit", "endpoint"} when pulled from
    # one; the embedded base names its repo and says its weights were built here
    hub: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _shallow(self)
        data["variants"] = {k: _shallow(v) for k, v in self.variants.items()}
        return _without_empty(data)

    @property
    def hub_id(self) -> str | None:
        repo = (self.hub or {}).get("repo")
        return repo if isinstance(repo, str) else None

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


VERSION_FIELDS = ("versions", "aliases", "canary", "history")  # the name's, not a version's


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter, bound to the exact base (name and content hash) it belongs to.

    The record of a name is its current version's (``version``); the name's other
    versions are in ``versions`` (number -> record), with its ``aliases`` (alias ->
    number), the ``canary`` share ({"version", "percent"}) and the ``history`` of
    promotions and rollbacks. A version's files never change once registered.
    """

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
    version: int = 1
    versions: dict[int, AdapterEntry] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    canary: dict[str, int] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = _shallow(self)
        for nested in ("lora", "bottleneck"):
            if data[nested] is not None:
                data[nested] = _shallow(data[nested])
        data["versions"] = {str(n): v.version_dict() for n, v in sorted(self.versions.items())}
        return _without_empty(data)

    def version_dict(self) -> dict[str, Any]:
        """This version's record alone (what a name's ``versions`` holds)."""
        data = self.to_dict()
        for key in ("name", *VERSION_FIELDS):
            data.pop(key, None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterEntry:
        data = dict(data)
        if data.get("lora") is not None:
            data["lora"] = LoraDetails(**data["lora"])
        if data.get("bottleneck") is not None:
            data["bottleneck"] = BottleneckDetails(**data["bottleneck"])
        data["versions"] = {int(n): cls.from_dict({**v, "name": data["name"]})
                            for n, v in (data.get("versions") or {}).items()}
        return cls(**data)

    # -- versions -------------------------------------------------------------------------
    def all_versions(self) -> dict[int, AdapterEntry]:
        """Every version of the name, by number (the current one included), each a record
        of its own (no versions inside)."""
        current = dataclasses.replace(self, versions={}, aliases={}, canary=None, history=[])
        return {**self.versions, self.version: current}

    def latest(self) -> int:
        return max(self.all_versions())


Entry = BaseEntry | AdapterEntry


def entry_from_dict(data: dict[str, Any]) -> Entry:
    if data.get("kind") in BASE_KINDS:
        return BaseEntry.from_dict(data)
    return AdapterEntry.from_dict(data)


def replace(entry: Entry, **changes: Any) -> Entry:
    return dataclasses.replace(entry, **changes)
