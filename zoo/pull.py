"""``zoo pull``: materialize a catalog entry in the home, by its short name or repo.

The catalog that ships with zoo (``registry.json`` at the top of the repo)
uses the registry's own schema; its entries have no ``path`` yet, and their
``source`` says how to make them here: build from a packaged GGUF, train
from a packaged dataset, or download from a Hub repo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import IntegrityError, UnknownEntry
from zoo.home import staging_dir, validate_name
from zoo.records import AdapterEntry, BaseEntry, Entry
from zoo.registry import Catalog, Registry, read_catalog
from zoo.store import register_base, verify_files

SHIPPED_CATALOG = Path(__file__).resolve().parent.parent / "registry.json"


def shipped_catalog() -> Catalog:
    """The catalog that ships with zoo (``ZOO_CATALOG`` overrides its path)."""
    return read_catalog(Path(os.environ.get("ZOO_CATALOG") or SHIPPED_CATALOG))


@dataclass(frozen=True)
class PullResult:
    entry: Entry
    changed: bool
    message: str


def pull(ref: str, home: Path | None = None, registry: Registry | None = None,
         log: Callable[[str], None] = lambda _: None, token: str | None = None) -> PullResult:
    """Make ``ref`` present and intact in the home; a no-op when it already is."""
    registry = registry or Registry(home)
    repo, _, revision = ref.partition("@")
    name = repo.lower()  # Hub repo ids may have capitals; registry names do not
    validate_name(name)
    present = registry.load().entries.get(name)
    if present is not None and present.path is not None:
        changed = verify_files(registry.home / present.path, present.files)
        if changed:
            raise IntegrityError(f"{name!r} is registered but its files changed: "
                                 f"{', '.join(changed)}", files=changed)
        return PullResult(present, False, f"{name} is already in the zoo (nothing to do)")

    known = shipped_catalog().entries.get(name)
    if known is not None and known.source.get("type") != "hub":
        return PullResult(_make(known, registry, log), True, f"pulled {name}")
    if "/" in name or (known is not None):
        from zoo.hub import pull_from_hub

        repo = known.source["repo"] if known is not None else repo
        entry = pull_from_hub(repo, revision or None, registry, token=token, log=log)
        return PullResult(entry, True, f"pulled {entry.name} from {repo}")
    names = ", ".join(sorted(shipped_catalog().entries))
    raise UnknownEntry(name, "catalog entry", hint=f"Short names zoo knows: {names}; "
                       "anything else is pulled from the Hub as ORG/NAME.")


def _make(known: Entry, registry: Registry, log: Callable[[str], None]) -> Entry:
    kind = known.source.get("type")
    if isinstance(known, BaseEntry) and kind == "gguf":
        from zoo.embedded import build_from_gguf

        log(f"building {known.name} from {known.source['file']} (about a minute)")
        with staging_dir(registry.home, known.name) as stage:
            source = build_from_gguf(known.source, stage)
            return register_base(registry, stage, known.name, source)
    if isinstance(known, AdapterEntry) and kind == "train":
        from zoo.train import train_from_recipe

        pull(known.base, registry=registry, log=log)
        return train_from_recipe(known, registry, log=log)
    raise UnknownEntry(known.name, f"buildable entry (source type {kind!r})")
