"""Numbered, immutable versions of an adapter name, its aliases, canary and history.

A reference to a version is ``NAME:vN`` (by number) or ``NAME:ALIAS`` (``current``,
``canary``, ``previous``, or an alias the operator set); ``NAME`` alone means the
current version. The colon cannot appear in a name, a base's ``@nf4`` variant or a Hub
``@revision``, so no reference means two things. Version 1 lives in
``adapters/NAME/``, version N in ``adapters/NAME@vN/``; a version's files never change.

Everything here edits the registry in one locked transaction; nothing here evaluates
(``zoo promote``'s gate lives with ``zoo eval``, in ``apps/rollout.py``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from zoo.catalog.home import adapter_dir, new_stage, validate_name
from zoo.catalog.registry import Catalog, Registry
from zoo.core.process import alive, identity, pid_of
from zoo.core.records import AdapterEntry, now
from zoo.errors import NotSupported, UnknownEntry

SEPARATOR = ":"
BUILTIN_ALIASES = ("current", "canary", "previous")
_NUMBER = re.compile(r"v?([1-9][0-9]{0,5})")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def split_ref(ref: str) -> tuple[str, str | None]:
    """``'acme/x:v2'`` -> ``('acme/x', 'v2')``; ``'acme/x'`` -> ``('acme/x', None)``."""
    name, sep, which = ref.partition(SEPARATOR)
    validate_name(name)
    if sep and not (_NUMBER.fullmatch(which) or _ALIAS.fullmatch(which)):
        raise UnknownEntry(ref, "version", hint="Write NAME:vN or NAME:ALIAS "
                           "(current, canary, previous, or one set with 'zoo alias').")
    return name, (which or None)


def label(name: str, version: int) -> str:
    """How a version is named in requests, usage rows and logs: ``NAME:vN``."""
    return f"{name}{SEPARATOR}v{version}"


def version_dir(home: Path, name: str, version: int) -> Path:
    base = adapter_dir(home, name)
    return base if version == 1 else base.with_name(f"{base.name}@v{version}")


def number_of(entry: AdapterEntry, which: str | None) -> int:
    """The version number a reference's part after the colon names (None: current)."""
    if which in (None, "current"):
        return entry.version
    found = _NUMBER.fullmatch(which)
    if found:
        number = int(found[1])
        if number not in entry.all_versions():
            raise UnknownEntry(label(entry.name, number), "version",
                               hint=f"'zoo versions {entry.name}' lists them.")
        return number
    if which == "canary":
        if entry.canary is None:
            raise UnknownEntry(f"{entry.name}:canary", "version",
                               hint=f"{entry.name} has no canary now.")
        return int(entry.canary["version"])
    if which in entry.aliases:
        return entry.aliases[which]
    raise UnknownEntry(f"{entry.name}{SEPARATOR}{which}", "version",
                       hint=f"'zoo versions {entry.name}' lists versions and aliases.")


def answering(entry: AdapterEntry, sticky: str | None = None) -> int:
    """The version that answers a request for the name alone: the canary for its share of
    end users, the current one for the rest. ``sticky`` (the end user or session) keeps
    one person on one version; without it each request is a fresh draw."""
    if not entry.canary:
        return entry.version
    import hashlib
    import secrets

    key = f"{entry.name}\0{sticky}" if sticky else secrets.token_hex(8)
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return int(entry.canary["version"]) if draw * 100 < float(entry.canary["percent"]) \
        else entry.version


def resolve(catalog: Catalog, ref: str) -> AdapterEntry:
    """The record of the version ``ref`` names (``NAME`` alone: the current one)."""
    name, which = split_ref(ref)
    entry = catalog.adapter(name)
    return entry.all_versions()[number_of(entry, which)]


def with_version(entry: AdapterEntry, record: AdapterEntry) -> AdapterEntry:
    """``entry`` with ``record`` added as one of its (non-current) versions."""
    return replace(entry, versions={**entry.versions, record.version: record})


def update_version(catalog: Catalog, name: str, number: int, change) -> AdapterEntry:
    """Apply ``change`` (record -> record) to one version of ``name``, current or not."""
    entry = catalog.adapter(name)
    if number == entry.version:
        entry = change(entry)
    else:
        entry = replace(entry, versions={**entry.versions, number: change(entry.versions[number])})
    catalog.entries[name] = entry
    return entry


def same_content(entry: AdapterEntry, content_hash: str) -> AdapterEntry | None:
    """The version of ``entry`` holding exactly this content, if one does."""
    for record in entry.all_versions().values():
        if record.content_hash == content_hash:
            return record
    return None


# -- rollout: which version answers --------------------------------------------------

def _make_current(entry: AdapterEntry, number: int, **name_fields: Any) -> AdapterEntry:
    """The name's record with version ``number`` as its current one."""
    every = entry.all_versions()
    fields = {"aliases": entry.aliases, "canary": entry.canary, "history": entry.history,
              **name_fields}
    return replace(every[number], versions={n: r for n, r in every.items() if n != number},
                   **fields)


def promote(registry: Registry, ref: str, canary: float | None = None,
            record: dict[str, Any] | None = None) -> AdapterEntry:
    """Make a version current (the old current becomes ``previous``), or with ``canary``
    send that share (percent) of the name's requests to it; ``record`` (the evaluation
    gate's numbers, ``forced``) goes into the history."""
    name, which = split_ref(ref)
    with registry.edit() as catalog:
        entry = catalog.adapter(name)
        number = number_of(entry, which)
        event = {"at": now(), "version": number, **(record or {})}
        if canary is not None:
            if not 0 < canary <= 100:
                raise NotSupported(f"a canary share is above 0 and at most 100, not {canary}")
            if number == entry.version:
                raise NotSupported(f"{label(name, number)} is already current",
                                   hint="A canary is another version than the current one.")
            entry = replace(entry, canary={"version": number, "percent": canary},
                            history=[*entry.history, {**event, "action": "canary",
                                                      "percent": canary}])
        elif number == entry.version:
            raise NotSupported(f"{label(name, number)} is already current")
        else:
            old = entry.version
            entry = _make_current(entry, number, aliases={**entry.aliases, "previous": old},
                                  canary=None, history=[*entry.history, {
                                      **event, "action": "promote", "from": old}])
        catalog.entries[name] = entry
    return entry


def end_canary(registry: Registry, name: str) -> AdapterEntry:
    with registry.edit() as catalog:
        entry = catalog.adapter(name)
        if entry.canary is None:
            raise NotSupported(f"{name} has no canary")
        entry = replace(entry, canary=None, history=[*entry.history, {
            "at": now(), "action": "canary-end", "version": entry.canary["version"]}])
        catalog.entries[name] = entry
    return entry


def rollback(registry: Registry, name: str) -> AdapterEntry:
    """Back to the previous current version in one step (a canary is ended too)."""
    with registry.edit() as catalog:
        entry = catalog.adapter(name)
        previous = entry.aliases.get("previous")
        if previous is None or previous not in entry.all_versions():
            raise NotSupported(f"{name} has no previous version to roll back to",
                               hint=f"'zoo versions {name}'; 'zoo promote {name} vN' picks one.")
        old = entry.version
        entry = _make_current(entry, previous, aliases={**entry.aliases, "previous": old},
                              canary=None, history=[*entry.history, {
                                  "at": now(), "action": "rollback", "version": previous,
                                  "from": old}])
        catalog.entries[name] = entry
    return entry


def set_alias(registry: Registry, ref: str, alias: str) -> AdapterEntry:
    if not _ALIAS.fullmatch(alias) or alias in ("current", "canary") or _NUMBER.fullmatch(alias):
        raise NotSupported(f"{alias!r} cannot be an alias",
                           hint="Use lowercase letters, digits, '-' and '_' (not current, "
                                "canary or vN).")
    name, which = split_ref(ref)
    with registry.edit() as catalog:
        entry = catalog.adapter(name)
        number = number_of(entry, which)
        entry = replace(entry, aliases={**entry.aliases, alias: number},
                        history=[*entry.history, {"at": now(), "action": "alias",
                                                  "alias": alias, "version": number}])
        catalog.entries[name] = entry
    return entry


def describe(entry: AdapterEntry) -> dict[str, Any]:
    """A name's versions, newest first, with their aliases (what ``zoo versions`` shows)."""
    names: dict[int, list[str]] = {}
    names.setdefault(entry.version, []).append("current")
    if entry.canary:
        names.setdefault(int(entry.canary["version"]), []).append("canary")
    for alias, number in sorted(entry.aliases.items()):
        names.setdefault(number, []).append(alias)
    rows = []
    for number, record in sorted(entry.all_versions().items(), reverse=True):
        source = record.source.get("type", "?")
        if source == "hub":
            source = f"hub {record.source.get('repo')}@{str(record.source.get('commit'))[:10]}"
            if record.source.get("subfolder"):
                source += f" (folder {record.source['subfolder']})"
        rows.append({"version": number, "label": label(entry.name, number),
                     "aliases": names.get(number, []), "content_hash": record.content_hash,
                     "created": record.created, "source": source, "path": record.path,
                     "evaluations": record.evaluations})
    return {"name": entry.name, "current": entry.version, "canary": entry.canary,
            "aliases": entry.aliases, "versions": rows, "history": entry.history}


# -- what running servers answer with ------------------------------------------------

RUN_DIR = "run"


_LEASED: dict[Path, set[str]] = {}  # per lease file, what this process has listed in it


def record_in_use(home: Path, labels: set[str]) -> None:
    """A running server's lease: the versions it has loaded, in ``home/run/serve-ID.lease``,
    one line per change (``+label`` or ``-label``) appended to it: a server's first use of
    an adapter costs one short write, whatever it loaded before (``zoo gc`` keeps what any
    live server lists). Not synced: the lease means something only while its server lives."""
    folder = home / RUN_DIR
    path = folder / f"serve-{identity()}.lease"
    listed = _LEASED.get(path)
    if listed is None or not path.exists():  # this process's first record, or a new home
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        listed = _LEASED[path] = set()
    lines = [f"+{v}\n" for v in sorted(labels - listed)]
    lines += [f"-{v}\n" for v in sorted(listed - labels)]
    if lines:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(descriptor, "".join(lines).encode())
        finally:
            os.close(descriptor)
        listed.clear()
        listed.update(labels)


def _server(path: Path) -> int | None:
    """The process a ``serve-ID.SUFFIX`` file names (:func:`zoo.core.process.identity`)."""
    try:
        return int(path.stem.removeprefix("serve-"))
    except ValueError:
        return None


def _live_files(home: Path, suffixes: tuple[str, ...]):
    """``(path, text)`` of each ``serve-ID.SUFFIX`` file in the home's run folder whose
    server still lives; a dead server's files of those suffixes are removed (a file whose
    pid is now another process's is a dead server's)."""
    for path in (home / RUN_DIR).glob("serve-*.*"):
        server = _server(path)
        if path.suffix not in suffixes or server is None:
            continue
        if not alive(server):
            path.unlink(missing_ok=True)
            continue
        try:
            text = path.read_text()
        except OSError:
            continue
        yield path, text


def in_use(home: Path) -> set[str]:
    """The versions any live server on this home has loaded (leases of dead ones removed;
    an earlier zoo's servers wrote theirs whole, as ``serve-PID.json``: read as well)."""
    import json

    found: set[str] = set()
    for lease, text in _live_files(home, (".lease", ".json")):
        if lease.suffix == ".json":
            try:
                found.update(v for v in json.loads(text).get("versions", [])
                             if isinstance(v, str))
            except (ValueError, AttributeError):
                pass
            continue
        listed: set[str] = set()
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and line[:1] in ("+", "-"):  # a line being appended: not yet
                (listed.add if line[0] == "+" else listed.discard)(line[1:-1])
        found |= listed
    return found


def record_engine(home: Path, base: str, max_lora_rank: int,
                  wrapped: frozenset[str] | None) -> None:
    """What this running server's engine can load (its base, rank limit and the modules
    it has LoRA layers for; None: all), in ``home/run/serve-ID.engine`` (ID: its pid and
    start time): ``zoo promote`` reads it before it sends a version's requests to that
    server."""
    from zoo.core.files import write_json_atomic

    folder = home / RUN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"serve-{identity()}.engine", {
        "base": base, "max_lora_rank": max_lora_rank,
        "wrapped": sorted(wrapped) if wrapped is not None else None})


def running_engines(home: Path) -> list[dict[str, Any]]:
    """The engine records of the live servers on this home (with their ``pid``)."""
    import json

    engines = []
    for path, text in _live_files(home, (".engine",)):
        try:
            engines.append({**json.loads(text), "pid": pid_of(_server(path))})
        except (ValueError, TypeError):  # not zoo's (it renames a record in whole): not asked
            continue
    return engines


def beyond_engine(record: AdapterEntry, max_lora_rank: int,
                  wrapped: frozenset[str] | None) -> str | None:
    """Why an engine started with these limits cannot serve this adapter version (the
    sentence after its name), or None when it can."""
    rank = record.lora.max_rank if record.lora else record.rank
    if rank > max_lora_rank:
        return (f"has rank {rank}, above this server's --max-lora-rank {max_lora_rank}; "
                f"restart zoo serve")
    unwrapped = sorted(set(record.target_modules) - wrapped) if wrapped else []
    if unwrapped:
        return (f"trains {', '.join(unwrapped)}, which this server's engine has no LoRA "
                f"layers for (it was started for {', '.join(sorted(wrapped))}); restart "
                f"zoo serve with --lora-targets all")
    return None


def refused_by_running_servers(home: Path, record: AdapterEntry) -> list[str]:
    """Why each live server on this home that serves the version's base would refuse it
    (it was started before the version was registered, with lower limits)."""
    reasons = []
    for engine in running_engines(home):
        rank, wrapped = engine.get("max_lora_rank"), engine.get("wrapped")
        if engine.get("base") != record.base or not isinstance(rank, int):
            continue
        why = beyond_engine(record, rank, frozenset(wrapped) if wrapped else None)
        if why:
            reasons.append(f"the zoo serve of pid {engine['pid']}: it {why}")
    return reasons


# -- retention -------------------------------------------------------------------------

def protected(entry: AdapterEntry, in_use: set[str]) -> dict[int, str]:
    """The versions that must stay, and why: current, canary, aliased, or answering."""
    keep = {entry.version: "current"}
    if entry.canary:
        keep.setdefault(int(entry.canary["version"]), "canary")
    for alias, number in entry.aliases.items():
        keep.setdefault(number, f"alias {alias}")
    for number in entry.all_versions():
        if label(entry.name, number) in in_use:
            keep.setdefault(number, "a running server answers with it")
    return keep


def remove_versions(registry: Registry, name: str, numbers: list[int] | None,
                    keep: int | None = None, in_use: set[str] = frozenset()) -> list[int]:
    """Remove some versions of ``name`` (``numbers``), or all but the newest ``keep``;
    never a protected one. Their folders are moved out inside the registry transaction
    and deleted after it (as ``zoo rm`` does). The numbers removed."""
    trash = new_stage(registry.home / "tmp", f"gc-{name}")
    removed: list[int] = []
    try:
        with registry.edit() as catalog:
            entry = catalog.adapter(name)
            guard = protected(entry, in_use)
            every = entry.all_versions()
            if numbers is not None:
                for number in numbers:
                    if number not in every:
                        raise UnknownEntry(label(name, number), "version")
                    if number in guard:
                        raise NotSupported(f"{label(name, number)} cannot be removed: it is "
                                           f"{guard[number]}", hint=_unprotect_hint(name, guard[number]))
                doomed = numbers
            else:
                newest = sorted(every, reverse=True)[:max(keep or 0, 0)]
                doomed = [n for n in every if n not in guard and n not in newest]
            for i, number in enumerate(sorted(doomed)):
                path = every[number].path
                if path and (registry.home / path).exists():
                    os.replace(registry.home / path, trash / str(i))
                removed.append(number)
            versions = {n: r for n, r in entry.versions.items() if n not in removed}
            aliases = {a: n for a, n in entry.aliases.items() if n not in removed}
            catalog.entries[name] = replace(entry, versions=versions, aliases=aliases)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return removed


def _unprotect_hint(name: str, why: str) -> str:
    if why == "current":
        return f"Promote another version first ('zoo promote {name} vN'), or 'zoo rm {name}'."
    if why == "canary":
        return f"End the canary first ('zoo promote {name} --end-canary')."
    return "Wait until no running server uses it." if "server" in why else \
        "Point the alias elsewhere first ('zoo alias')."
