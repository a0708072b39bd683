"""``zoo pull ORG/NAME``: an adapter from the Hub, checked against its manifest and base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zoo.catalog.home import staging_dir, validate_name
from zoo.catalog.integrity import ORIGINAL, file_hash
from zoo.catalog.registry import Catalog, Registry
from zoo.catalog.shipped import build_shipped_base, shipped_catalog
from zoo.catalog.store import BaseRef, register_adapter, resolve_base
from zoo.core.files import content_hash
from zoo.core.records import AdapterEntry
from zoo.errors import DuplicateEntry, HubError, IntegrityError
from zoo.hub.cards import MANIFEST, SKIPPED
from zoo.hub.client import HubContext, Log, download


def pull_from_hub(repo: str, revision: str | None, registry: Registry,
                  token: str | None = None, log: Log = lambda _: None) -> AdapterEntry:
    """Download an adapter, check it against its manifest and base, then register it."""
    validate_name(repo.lower())
    ctx = HubContext.from_environment(token)
    snapshot, commit = download(ctx, repo, revision)
    files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    payload = sorted(files - SKIPPED)
    info = json.loads((snapshot / MANIFEST).read_text()) if MANIFEST in files else None
    if info is not None:
        expected = info["files"]
        bad = [f for f in payload if f not in expected
               or file_hash(snapshot / f) != expected[f]["sha256"]]
        bad += [f for f in expected if f not in files]
        if bad:
            raise IntegrityError(f"{repo}: files do not match their {MANIFEST} hashes: "
                                 f"{', '.join(sorted(bad))}; nothing was registered",
                                 files=sorted(bad))
    known = info["entry"] if info else {}
    name = known.get("name") or repo.lower()
    validate_name(name)
    catalog = registry.load()
    if name in catalog.entries:
        present = catalog.entries[name]
        if info and present.content_hash == content_hash(info["files"]):
            log(f"{name} is already in the zoo (same content)")
            return present
        raise DuplicateEntry(name)
    base = _base_for(known, catalog, registry, snapshot, log)
    hub = {"repo": repo, "revision": revision or "main", "commit": commit,
           "endpoint": ctx.endpoint}
    with staging_dir(registry.home, name) as stage:
        for f in payload:
            (stage / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / f, stage / f)
        entry = register_adapter(registry, stage, name, base,
                                 source={"type": "hub", "repo": repo, "commit": commit},
                                 training=known.get("training"), hub=hub)
    if info and entry.base_hash != known.get("base_hash"):
        log(f"note: {name} was published against another build of {entry.base} "
            f"(base hash differs); its shapes fit this one")
    return entry


def _base_for(known: dict, catalog: Catalog, registry: Registry, snapshot: Path,
              log: Log) -> BaseRef:
    """The base an incoming adapter names, built when the shipped catalog knows how."""
    if not known:
        return resolve_base(catalog, registry, None, snapshot)
    base_name, variant = known["base"], known.get("base_variant", ORIGINAL)
    if base_name not in catalog.entries:
        if base_name not in shipped_catalog().entries:
            raise HubError(f"the adapter's base {base_name!r} is not in this zoo",
                           hint=f"Add or pull {base_name} first.")
        log(f"pulling its base {base_name}")
        build_shipped_base(base_name, registry, log)
    if variant != ORIGINAL:
        from zoo.quantize import quantize

        quantize(base_name, variant, registry, log=log)
    return BaseRef(registry.load().base(base_name), variant)
