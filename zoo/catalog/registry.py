"""The registry: one schema-versioned ``registry.json`` per zoo home.

Reads take no lock (a writer renames a complete file over the old one, so a
reader always sees one whole version). Writes go through :meth:`Registry.edit`,
which holds a file lock across read-modify-write and replaces the file with a
fsynced temporary one, so concurrent ``zoo`` processes never lose an entry
and a writer killed mid-write leaves the previous registry intact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from zoo.catalog.home import sweep_stale, validate_name, zoo_home
from zoo.core.files import write_bytes_atomic
from zoo.core.records import (
    ADAPTER_KINDS,
    BASE_KINDS,
    SCHEMA_VERSION,
    AdapterEntry,
    BaseEntry,
    Entry,
    check_stored,
    entry_from_dict,
)
from zoo.errors import MalformedEntry, RegistryError, UnknownEntry

REGISTRY_FILE = "registry.json"
# Registries of these schema versions open; an older one is upgraded in memory, and a
# home's file is rewritten in the current version (the old file kept beside it).
# 1 -> 2 changes no existing field: every new one (versions, aliases, canary, history,
# a base's hub identity) has a default that means what version 1 meant.
READABLE_VERSIONS = (1, SCHEMA_VERSION)


class Entries(MutableMapping[str, Entry]):
    """Entries by name, turned into records only when touched.

    A registry of 10,000 entries parses in a fraction of a second, but making
    records of all of them (and back) costs seconds; ``zoo show`` and
    ``zoo add`` touch one or two.
    """

    def __init__(self, raw: dict[str, dict] | None = None):
        self._raw: dict[str, dict | None] = dict(raw or {})
        self._records: dict[str, Entry] = {}

    def __getitem__(self, name: str) -> Entry:
        if name not in self._records:
            raw = self._raw[name]  # KeyError for unknown names, as a dict does
            assert raw is not None
            try:
                record = entry_from_dict(raw)
                _check_filed(name, record.name)
            except ValueError as exc:
                raise MalformedEntry(name, str(exc)) from None
            self._records[name] = record
        return self._records[name]

    def __setitem__(self, name: str, entry: Entry) -> None:
        self._records[name] = entry
        self._raw[name] = None

    def __delitem__(self, name: str) -> None:
        del self._raw[name]
        self._records.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def stored(self, name: str, key: str):
        """One field of an entry as stored, without making its record (None if absent)."""
        raw = self._raw[name]
        return getattr(self._records[name], key, None) if raw is None else raw.get(key)

    def to_dict(self, name: str) -> dict:
        raw = self._raw[name]
        return raw if raw is not None and name not in self._records else self[name].to_dict()


@dataclass
class Catalog:
    """The registry's content: entries by name (bases and adapters share names)."""

    entries: Entries = field(default_factory=Entries)
    # name -> why, for each entry ``adapters(skip_malformed=True)`` left out
    malformed: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not isinstance(self.entries, Entries):
            entries, self.entries = self.entries, Entries()
            self.entries.update(entries)

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
        # the stored kind picks the records to make: a base's page need not make 10,000
        return [self.entries[n] for n in self.entries
                if self.entries.stored(n, "kind") in BASE_KINDS]

    def adapters(self, base: str | None = None, *,
                 skip_malformed: bool = False) -> list[AdapterEntry]:
        """Adapter records (of one base). A malformed entry raises MalformedEntry, unless
        ``skip_malformed``: then it is left out and noted in ``malformed`` (what a running
        server does: one entry edited by hand must not stop it serving every other)."""
        found = []
        for n in self.entries:
            if self.entries.stored(n, "kind") in BASE_KINDS or \
                    (base is not None and self.entries.stored(n, "base") != base):
                continue
            try:
                found.append(self.entries[n])
            except MalformedEntry as exc:
                if not skip_malformed:
                    raise
                self.malformed[n] = exc.why
        return found

    def to_json(self) -> bytes:
        """The registry file's text: one entry a line, in name order. It reads and diffs
        entry by entry, and json's C encoder writes it (indenting takes the pure-Python
        encoder: 0.37 s against 0.11 s for 10,000 entries)."""
        lines = [f"    {json.dumps(name)}: {json.dumps(self.entries.to_dict(name))}"
                 for name in sorted(self.entries)]
        body = "{\n" + ",\n".join(lines) + "\n  }" if lines else "{}"
        return f'{{\n  "schema_version": {SCHEMA_VERSION},\n  "entries": {body}\n}}\n'.encode()

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Catalog:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise RegistryError(f"{origin} is not a zoo registry (no schema_version)")
        version = data["schema_version"]
        if version not in READABLE_VERSIONS:
            raise RegistryError(
                f"{origin} has schema_version {version}; this zoo reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                hint="Upgrade zoo, or point ZOO_HOME elsewhere.")
        raw = data.get("entries")
        if not isinstance(raw, dict) or not all(isinstance(e, dict) for e in raw.values()):
            raise RegistryError(f"{origin} has a malformed 'entries' table")
        if version == 1:
            raw = {name: _from_version_1(entry) for name, entry in raw.items()}
        return cls(Entries(raw))


def _check_filed(key: str, name: object) -> None:
    """An entry is filed under its own name, a valid one."""
    validate_name(key)
    if name != key:
        raise ValueError(f"its name field is {name!r}")


def _from_version_1(entry: dict) -> dict:
    """A version-1 entry in version 2: an adapter's one artifact is its version 1."""
    if entry.get("kind") in ADAPTER_KINDS and "version" not in entry:
        return {**entry, "version": 1}
    return entry


def read_catalog(path: Path) -> Catalog:
    """Load a registry file; a missing file is an empty catalog."""
    return _read(path)[0]


def _read(path: Path) -> tuple[Catalog, int | None]:
    """The catalog in a registry file and the schema version it was written in."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Catalog(), None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: a number of over 4,300 digits too
        raise RegistryError(f"{path} is not valid JSON ({exc})") from None
    return Catalog.from_dict(data, str(path)), data.get("schema_version")


class Registry:
    """A zoo home's registry file."""

    def __init__(self, home: Path | None = None):
        self.home = (home or zoo_home()).absolute()
        self.path = self.home / REGISTRY_FILE
        self._lock = FileLock(str(self.path) + ".lock")

    def load(self) -> Catalog:
        catalog, version = _read(self.path)
        if version is not None and version != SCHEMA_VERSION:
            return self._upgrade(version) or catalog
        return catalog

    def _upgrade(self, old: int) -> Catalog | None:
        """Rewrite a registry written by an older zoo in the current schema, under the lock
        and atomically, keeping the old file beside it as ``registry.json.vOLD``. A home
        that cannot be written (read-only) is read as upgraded in memory only."""
        backup = self.path.with_name(f"{REGISTRY_FILE}.v{old}")
        try:
            with self._lock:
                catalog, version = _read(self.path)
                if version == SCHEMA_VERSION:  # another process upgraded it meanwhile
                    return catalog
                if not backup.exists():
                    write_bytes_atomic(backup, self.path.read_bytes())
                write_bytes_atomic(self.path, catalog.to_json())
                return catalog
        except OSError:
            return None

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
            write_bytes_atomic(self.path, catalog.to_json())

    def resolve(self, path: str | None) -> Path | None:
        """An entry's stored path (relative to the home) as an absolute path."""
        return None if path is None else self.home / path


def filter_entries(catalog: Catalog, base: str | None = None, kind: str | None = None, *,
                   fields: dict[str, tuple[str, ...]] | None = None,
                   malformed: dict[str, str] | None = None) -> list[dict]:
    """Entries as plain dicts in name order, optionally of one base and/or kind.

    Works on the stored dicts without making records: listing 10,000 entries stays as fast
    as parsing the file. Each is checked to be filed under its own name and to hold the
    ``fields`` its reader reads (by ``"base"`` or ``"adapter"``) with the types its record
    declares. A malformed entry raises MalformedEntry or, with ``malformed`` given, is left
    out and noted there (name -> why): what a page does, showing the rest.
    """
    kinds = {"adapter": ADAPTER_KINDS, "base": BASE_KINDS}.get(kind or "", (kind,))
    found = []
    for name in sorted(catalog.entries):
        entry = catalog.entries.to_dict(name)
        if kind and entry.get("kind") not in kinds:
            continue
        if base and entry.get("base") != base and name != base:
            continue
        try:
            _check_filed(name, entry.get("name"))
            if fields:
                check_stored(entry, fields["base" if entry.get("kind") in BASE_KINDS
                                           else "adapter"])
        except ValueError as exc:
            if malformed is None:
                raise MalformedEntry(name, str(exc)) from None
            malformed[name] = str(exc)
            continue
        found.append(entry)
    return found
