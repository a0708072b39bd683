"""Typed records of the registry: bases, their quantized variants, adapters.

These are the only shapes that reach ``registry.json``; the JSON Schema in
``zoo/schema/registry.schema.json`` describes the same thing for other tools,
and the tests validate every registry zoo writes against it. What zoo reads back
(a registry edited by hand, a Hub's sync index) is checked against these records'
own field types when an entry becomes a record (``entry_from_dict``): at about
25 µs an entry, where validating against the schema costs 400.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
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
# where an entry came from (its source's "type"): zoo add, a packaged GGUF, zoo train, a Hub,
# zoo merge, and the adapter algebra
SOURCE_TYPES = ("local", "gguf", "train", "hub", "merge", "combine", "compress", "extract")


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


class FileFacts(typing.TypedDict):
    """A stored file's hash (``sha256:...``) and size in bytes."""

    sha256: str
    size: int


class Evaluation(typing.TypedDict):
    """The last ``zoo eval`` of an entry on one form of its base (see apps/evaluate.py)."""

    data: str
    data_sha256: str
    tokens: int
    loss: float
    perplexity: float
    engine: str
    at: str


class Canary(typing.TypedDict):
    """The version that answers ``percent`` of a name's requests beside the current one."""

    version: int
    percent: float


@dataclass(frozen=True)
class Variant:
    """A quantized form of a base, stored beside it as ``bases/NAME@SCHEME``."""

    scheme: Scheme
    path: str | None
    files: dict[str, FileFacts]
    content_hash: str
    quantization: dict[str, Any]
    created: str = field(default_factory=now)


@dataclass(frozen=True)
class BaseEntry:
    """A full model: an original base, or one zoo merged from adapters."""

    name: str
    kind: BaseKind
    path: str | None
    files: dict[str, FileFacts]
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
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    # where it lives on a Hub: {"repo", "revision", "commit", "endpoint"} when pulled from
    # one; the embedded base names its repo and says its weights were built here
    hub: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _shallow(self)
        data["variants"] = {k: _shallow(v) for k, v in self.variants.items()}
        return _without_empty(data)

    @property
    def hub_id(self) -> str | None:
        """The Hub id an adapter's config names this base by, which from_pretrained loads
        (None for a model pulled from one folder of a repo, or built from a GGUF file of
        one: the id alone loads neither)."""
        hub = self.hub or {}
        repo = hub.get("repo")
        return repo if isinstance(repo, str) and not (hub.get("subfolder") or hub.get("gguf")) \
            else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseEntry:
        data = dict(data)
        data["variants"] = {k: _record(Variant, v, f"variants.{_key(k)}.")
                            for k, v in _object(data.get("variants", {}), "variants").items()}
        return _record(cls, data)


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
    files: dict[str, FileFacts]
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
    evaluations: dict[str, Evaluation] = field(default_factory=dict)
    version: int = 1
    versions: dict[int, AdapterEntry] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    canary: Canary | None = None
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
            data["lora"] = _record(LoraDetails, data["lora"], "lora.")
        if data.get("bottleneck") is not None:
            data["bottleneck"] = _record(BottleneckDetails, data["bottleneck"], "bottleneck.")
        data["versions"] = {int(n): cls.from_dict({**_object(v, f"versions.{_key(n)}"),
                                                   "name": data["name"]})
                            for n, v in _object(data.get("versions") or {}, "versions").items()}
        return _record(cls, data)

    # -- versions -------------------------------------------------------------------------
    def all_versions(self) -> dict[int, AdapterEntry]:
        """Every version of the name, by number (the current one included), each a record
        of its own (no versions inside)."""
        current = self if not (self.versions or self.aliases or self.canary or self.history) \
            else dataclasses.replace(self, versions={}, aliases={}, canary=None, history=[])
        return {**self.versions, self.version: current}

    def latest(self) -> int:
        return max(self.all_versions())


Entry = BaseEntry | AdapterEntry


# -- reading stored entries: every one is checked before it becomes a record --------------

def entry_from_dict(data: dict[str, Any]) -> Entry:
    """A stored entry as a record, or ValueError naming the field when it is not one zoo
    could have written: a kind zoo does not know, a field missing, unknown or of another type
    than its record declares (a hand-edited ``"rank": "8"``), a stored path that leaves the
    home (``zoo rm`` deletes what a path names), an alias to a version that is not there."""
    cls = _record_class(data)
    try:
        record = cls.from_dict(data)
    except (KeyError, TypeError, AttributeError) as exc:  # a field of the wrong shape
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    problem = _mistyped(record) or _unsound(record)
    if problem is not None:
        raise ValueError(problem)
    return record


def _record_class(data: dict[str, Any]) -> type[BaseEntry] | type[AdapterEntry]:
    kind = data.get("kind")
    if kind not in BASE_KINDS + ADAPTER_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(BASE_KINDS + ADAPTER_KINDS)}")
    return BaseEntry if kind in BASE_KINDS else AdapterEntry


def _object(value: Any, where: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, else ValueError."""
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {_short(value)}, not an object")
    return value


def _record(cls: type, data: Any, where: str = "") -> Any:
    """``cls(**data)``, or ValueError naming the first field missing or unknown."""
    _object(data, where.rstrip(".") or "the entry")
    known = _field_map(cls).keys()
    if not _required_of(cls) <= data.keys() <= known:
        for f in _fields_of(cls):
            if f.required and f.name not in data:
                raise ValueError(f"{where}{f.name} is missing")
        raise ValueError(f"{where}{_key(min(data.keys() - known))} is not a field zoo knows")
    return cls(**data)


def check_stored(data: dict[str, Any], names: tuple[str, ...]) -> None:
    """ValueError unless the stored entry ``data`` holds each field in ``names`` (or may
    leave it out), of the type its record declares: what reads a few fields of many entries
    (``zoo list``, the catalog page) checks those without making records. A field that
    holds records (a base's variants) is checked by making the entry's record."""
    fields = _field_map(_record_class(data))
    for name in names:
        f = fields[name]
        if f.nested and name in data:  # records inside (a base's variants): make the record
            entry_from_dict(data)
        elif name not in data:
            if f.required:
                raise ValueError(f"{name} is missing")
        elif not f.conforms(data[name]):
            raise ValueError(f"{name} is {_short(data[name])}, not {f.declared}")


def is_home_path(path: str | None) -> bool:
    """A stored path is None or relative to the home, and stays inside it."""
    return path is None or (path.strip("/") != "" and not path.startswith("/")
                            and ".." not in path.split("/"))


def _unsound(record: Entry) -> str | None:
    """What the field types do not say: a stored path that leaves the home, a source of a
    kind zoo does not make, a version filed under another number, an alias or a canary
    pointing at a version that is not there."""
    inner = record.variants if isinstance(record, BaseEntry) else record.versions
    for path in [record.path, *(v.path for v in inner.values())]:
        if not is_home_path(path):
            return f"path {path!r} is not inside the home"
    sources = [record.source, *(v.source for v in inner.values() if isinstance(v, AdapterEntry))]
    for source in sources:
        if source.get("type") not in SOURCE_TYPES:
            return f"source type {source.get('type')!r} is not one of {', '.join(SOURCE_TYPES)}"
    if isinstance(record, BaseEntry):
        return None
    for number, version in record.versions.items():
        if number != version.version or number == record.version:
            return f"versions.{number} is version {version.version} (current: {record.version})"
    pointed = {f"aliases.{_key(a)}": n for a, n in record.aliases.items()}
    if record.canary is not None:
        pointed["canary.version"] = record.canary["version"]
    for where, number in pointed.items():
        if number != record.version and number not in record.versions:
            return f"{where} is {number}, a version that is not registered"
    return None


def _mistyped(record: Any, where: str = "") -> str | None:
    """The first field of ``record`` (or of a record inside it) whose value is not of its
    declared type, as a sentence; None when every one is."""
    for f in _fields_of(type(record)):
        value = getattr(record, f.name)
        if not f.conforms(value):
            return f"{where}{f.name} is {_short(value)}, not {f.declared}"
        if f.nested and value is not None:
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for key, item in inner:
                problem = _mistyped(item, f"{where}{f.name}." + ("" if key is None else f"{_key(key)}."))
                if problem is not None:
                    return problem
    return None


class _Field(typing.NamedTuple):
    """A record's field as the checks of stored entries see it."""

    name: str
    declared: str  # its type as written
    conforms: Callable[[Any], bool]  # whether a value is of that type
    nested: bool  # whether records are nested in it (lora, versions...)
    required: bool  # whether a stored entry must hold it (it has no default)


@functools.cache
def _fields_of(cls: type) -> list[_Field]:
    hints = typing.get_type_hints(cls)
    return [_Field(f.name, str(f.type), _check_of(hints[f.name]), _holds_records(hints[f.name]),
                   f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)]


@functools.cache
def _field_map(cls: type) -> dict[str, _Field]:
    return {f.name: f for f in _fields_of(cls)}


@functools.cache
def _required_of(cls: type) -> frozenset[str]:
    """The fields a stored record must hold (those without a default)."""
    return frozenset(f.name for f in _fields_of(cls) if f.required)


def _holds_records(kind: Any) -> bool:
    return dataclasses.is_dataclass(kind) or any(map(_holds_records, typing.get_args(kind)))


@functools.cache
def _check_of(kind: Any) -> Callable[[Any], bool]:
    """A check that a value is of a record field's type, made once per type. A nested
    record need only be one: ``_mistyped`` checks its fields. A JSON integer is a float; a
    bool is no number. TypedDicts are dicts of exactly their keys."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return lambda value: True
    if origin is Literal:
        allowed = frozenset(args)
        return lambda value: isinstance(value, str) and value in allowed
    if origin in (types.UnionType, typing.Union):  # most are "X | None": one arm, and None
        arms = [_check_of(arm) for arm in args if arm is not type(None)]
        if len(arms) == 1 and type(None) in args:
            return lambda value, arm=arms[0]: value is None or arm(value)
        return lambda value: (value is None and type(None) in args) or any(
            arm(value) for arm in arms)
    if origin is list:
        item = _check_of(args[0])
        return lambda value: isinstance(value, list) and all(map(item, value))
    if origin is dict:
        key, item = _check_of(args[0]), _check_of(args[1])
        if args[1] is Any:
            return lambda value: isinstance(value, dict) and all(map(key, value))
        return lambda value: isinstance(value, dict) and all(
            key(k) and item(v) for k, v in value.items())
    if typing.is_typeddict(kind):
        fields = {k: _check_of(t) for k, t in typing.get_type_hints(kind).items()}
        names, checks = fields.keys(), list(fields.values())
        return lambda value: (isinstance(value, dict) and value.keys() == names
                              and all(map(_apply, checks, map(value.__getitem__, names))))
    if kind is type(None):
        return lambda value: value is None
    if kind in (int, float):
        numbers = int if kind is int else (int, float)
        return lambda value: isinstance(value, numbers) and not isinstance(value, bool)
    return lambda value: isinstance(value, kind)  # str, bool, a record


def _apply(check: Callable[[Any], bool], value: Any) -> bool:
    return check(value)


def _key(key: Any) -> str:
    """A stored key as an error names it: as it is when plain, quoted when not (a key may
    hold a newline, and zoo's errors are one line)."""
    return str(key) if re.fullmatch(r"[\w.@-]+", str(key)) else repr(key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def replace(entry: Entry, **changes: Any) -> Entry:
    return dataclasses.replace(entry, **changes)
