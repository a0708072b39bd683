"""The registry: one schema-versioned ``registry.json`` per zoo home.

Reads take no lock (a writer renames a complete file over the old one, so a
reader always sees one whole version). Writes go through :meth:`Registry.edit`,
which holds a file lock across read-modify-write and replaces the file with a
fsynced temporary one, so concurrent ``zoo`` processes never lose an entry
and a writer killed mid-write leaves the previous registry intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from zoo.errors import RegistryError, UnknownEntry
from zoo.files import write_json_atomic
from zoo.home import sweep_stale, zoo_home
from zoo.records import (
    ADAPTER_KINDS,
    BASE_KINDS,
    SCHEMA_VERSION,
    AdapterEntry,
    BaseEntry,
    Entry,
    entry_from_dict,
)

REGISTRY_FILE = "registry.json"


@dataclass
class Catalog:
    """The registry's content: entries by name (bases and adapters share names)."""

    entries: dict[str, Entry] = field(default_factory=dict)

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownEntry(name) from None

    def base(self, name: str) -> BaseEntry:
        entry = self.entries.get(name)
        if not isinstance(entry, BaseEntry):
            raise UnknownEntry(name, "base")
        return entry

    def adapter(self, name: str) -> AdapterEntry:
        entry = self.entries.get(name)
        if not isinstance(entry, AdapterEntry):
            raise UnknownEntry(name, "adapter")
        return entry

    def bases(self) -> list[BaseEntry]:
        return [e for e in self.entries.values() if isinstance(e, BaseEntry)]

    def adapters(self, base: str | None = None) -> list[AdapterEntry]:
        return [e for e in self.entries.values()
                if isinstance(e, AdapterEntry) and (base is None or e.base == base)]

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "entries": {name: self.entries[name].to_dict() for name in sorted(self.entries)},
        }

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Catalog:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise RegistryError(f"{origin} is not a zoo registry (no schema_version)")
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise RegistryError(
                f"{origin} has schema_version {version}; this zoo reads {SCHEMA_VERSION}",
                hint="Upgrade zoo, or point ZOO_HOME elsewhere.")
        try:
            entries = {name: entry_from_dict(raw) for name, raw in data["entries"].items()}
        except (KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{origin} has a malformed entry ({exc})") from None
        return cls(entries)


def read_catalog(path: Path) -> Catalog:
    """Load a registry file; a missing file is an empty catalog."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Catalog()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is not valid JSON ({exc})") from None
    return Catalog.from_dict(data, str(path))


class Registry:
    """A zoo home's registry file."""

    def __init__(self, home: Path | None = None):
        self.home = (home or zoo_home()).absolute()
        self.path = self.home / REGISTRY_FILE
        self._lock = FileLock(str(self.path) + ".lock")

    def load(self) -> Catalog:
        return read_catalog(self.path)

    @contextmanager
    def edit(self) -> Iterator[Catalog]:
        """Lock, load, let the caller change the catalog, then write it atomically.

        Nothing is written when the body raises.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock:
            sweep_stale(self.home)
            catalog = self.load()
            yield catalog
            write_json_atomic(self.path, catalog.to_dict())

    def resolve(self, path: str | None) -> Path | None:
        """An entry's stored path (relative to the home) as an absolute path."""
        return None if path is None else self.home / path


def filter_entries(catalog: Catalog, base: str | None = None,
                   kind: str | None = None) -> list[Entry]:
    """Entries in name order, optionally only those of one base and/or kind."""
    kinds = {"adapter": ADAPTER_KINDS, "base": BASE_KINDS}.get(kind or "", (kind,))
    found = []
    for name in sorted(catalog.entries):
        entry = catalog.entries[name]
        if kind and entry.kind not in kinds:
            continue
        if base and getattr(entry, "base", None) != base and entry.name != base:
            continue
        found.append(entry)
    return found
