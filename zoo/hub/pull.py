"""``zoo pull ORG/NAME``: an adapter from the Hub, checked against its manifest and base."""

from __future__ import annotations

import shutil
from pathlib import Path

from zoo.catalog.home import staging_dir, validate_name
from zoo.catalog.integrity import ORIGINAL, file_hash, hash_tree_cached
from zoo.catalog.registry import Catalog, Registry
from zoo.catalog.shipped import build_shipped_base, shipped_catalog
from zoo.catalog.store import BaseRef, register_adapter, resolve_base
from zoo.core.files import content_hash
from zoo.core.records import AdapterEntry
from zoo.errors import DuplicateEntry, HubError, IntegrityError
from zoo.hub.cards import MANIFEST, SKIPPED, Manifest, read_manifest
from zoo.hub.client import HubContext, Log, download


def pull_from_hub(repo: str, revision: str | None, registry: Registry,
                  token: str | None = None, log: Log = lambda _: None, name: str | None = None,
                  expect_hash: str | None = None) -> AdapterEntry:
    """Download an adapter, check it against its manifest and base, then register it.

    It is registered as ``name`` (default: the repo id, lowercased), never as
    what the repo's own ``zoo.json`` says: a repo does not choose where it
    lands. A name already registered with other content is refused.
    ``expect_hash`` (from a sync index) must equal the files' content hash.
    """
    name = name or repo.lower()
    validate_name(name)
    ctx = HubContext.from_environment(token)
    snapshot, commit = download(ctx, repo, revision)
    files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    payload = sorted(files - SKIPPED)
    manifest = read_manifest(snapshot / MANIFEST, repo) if MANIFEST in files else None
    if manifest is not None:
        bad = [f for f in payload if f not in manifest.files
               or file_hash(snapshot / f) != manifest.files[f]["sha256"]]
        bad += [f for f in manifest.files if f not in files]
        if bad:
            raise IntegrityError(f"{repo}: files do not match their {MANIFEST} hashes: "
                                 f"{', '.join(sorted(bad))}; nothing was registered",
                                 files=sorted(bad))
        incoming = content_hash(manifest.files)
    else:
        incoming = content_hash(hash_tree_cached(snapshot, payload))
    if expect_hash is not None and incoming != expect_hash:
        raise IntegrityError(f"{repo} holds other content than the index lists for {name!r}; "
                             "nothing was registered")
    catalog = registry.load()
    if name in catalog.entries:
        present = catalog.entries[name]
        if present.content_hash == incoming:
            log(f"{name} is already in the zoo (same content)")
            return present
        raise DuplicateEntry(name)
    base = _base_for(manifest, catalog, registry, snapshot, log)
    hub = {"repo": repo, "revision": revision or "main", "commit": commit,
           "endpoint": ctx.endpoint}
    with staging_dir(registry.home, name) as stage:
        for f in payload:
            (stage / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / f, stage / f)
        entry = register_adapter(registry, stage, name, base,
                                 source={"type": "hub", "repo": repo, "commit": commit},
                                 training=manifest.training if manifest else None, hub=hub)
    if manifest and manifest.base_hash and entry.base_hash != manifest.base_hash:
        log(f"note: {name} was published against another build of {entry.base} "
            f"(base hash differs); its shapes fit this one")
    return entry


def _base_for(manifest: Manifest | None, catalog: Catalog, registry: Registry,
              snapshot: Path, log: Log) -> BaseRef:
    """The base an incoming adapter names, built when the shipped catalog knows how."""
    if manifest is None:
        return resolve_base(catalog, registry, None, snapshot)
    base_name, variant = manifest.base, manifest.base_variant
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
