"""``zoo push``: an entry's files, Hub card and manifest to its Hub repo, in one commit.

An adapter is pushed as PEFT and the Hub expect it (its config names the base by Hub id,
its card's metadata links the base); a merged model or a base's quantized variant is
pushed as a checkpoint ``from_pretrained`` loads, its card linking the model it came
from (``base_model_relation`` merge or quantized).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.catalog import versions
from zoo.catalog.home import split_variant
from zoo.catalog.integrity import require_intact
from zoo.catalog.registry import Catalog, Registry
from zoo.core.records import AdapterEntry, BaseEntry, Entry, Variant
from zoo.errors import UnknownEntry
from zoo.hub.cards import CARD, MANIFEST, SKIPPED, adopt_hub_files, manifest, model_card
from zoo.hub.client import HubContext, Log, ensure_repo, hub_errors


@dataclass(frozen=True)
class PushResult:
    entry: Entry
    repo: str
    commit: str
    changed: bool


@dataclass(frozen=True)
class _Upload:
    """What one push sends: stored files from ``root``, and generated ones."""

    root: Path
    files: dict[str, dict]
    extra: dict[str, bytes]


def push(name: str, repo: str | None = None, private: bool = False,
         revision: str | None = None, token: str | None = None,
         registry: Registry | None = None, log: Log = lambda _: None) -> PushResult:
    """Upload an entry (an adapter, a base or merged model, or ``BASE@SCHEME``), its Hub
    card and its manifest; no commit when nothing changed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    registry = registry or Registry()
    ctx = HubContext.from_environment(token)
    catalog = registry.load()
    if versions.SEPARATOR in name:  # one version of an adapter: NAME:vN
        entry_name, scheme = versions.split_ref(name)[0], None
        entry = versions.resolve(catalog, name)
    else:
        entry_name, scheme = split_variant(name)
        entry = catalog.get(entry_name)
    upload, entry = _prepare(registry, catalog, entry, scheme)
    api = ctx.api()
    with hub_errors(ctx, repo or name, revision):
        repo = repo or (entry_name if "/" in entry_name else f"{api.whoami()['name']}/{entry_name}")
        ensure_repo(api, repo, private=private)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        before = api.repo_info(repo, revision=revision).sha
        remote = set(api.list_repo_files(repo, revision=revision))
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(upload.root / f))
                      for f in sorted(upload.files)]
        operations += [CommitOperationAdd(path_in_repo=f, path_or_fileobj=data)
                       for f, data in upload.extra.items()]
        sent = set(upload.files) | set(upload.extra)
        operations += [CommitOperationDelete(path_in_repo=f)
                       for f in sorted(remote - sent - SKIPPED)]
        info = api.create_commit(repo, operations, commit_message=f"zoo push {name}",
                                 revision=revision)
    changed = info.oid != before
    hub = {"repo": repo, "revision": revision or "main", "commit": info.oid,
           "endpoint": ctx.endpoint}
    if isinstance(entry, AdapterEntry):  # the version pushed records its commit
        number = entry.version
        with registry.edit() as fresh:
            updated = versions.update_version(fresh, entry_name, number,
                                              lambda record: replace(record, hub=hub))
        entry = updated.all_versions()[number]
    log(f"{'pushed' if changed else 'unchanged, no new commit:'} {name} -> {repo}@{info.oid[:10]}")
    return PushResult(entry, repo, info.oid, changed)


def _prepare(registry: Registry, catalog: Catalog, entry: Entry,
             scheme: str | None) -> tuple[_Upload, Entry]:
    if isinstance(entry, AdapterEntry):
        if scheme:
            raise UnknownEntry(f"{entry.name}@{scheme}", "base variant",
                               hint="Only bases have @ variants; push the adapter by name.")
        require_intact(registry, entry)
        entry = adopt_hub_files(registry, entry, catalog.base(entry.base))
        files = dict(entry.files)
        extra = {MANIFEST: _json(manifest(entry, files))}
        return _Upload(registry.home / entry.path, files, extra), entry
    assert isinstance(entry, BaseEntry)
    variant: Variant | None = None
    if scheme:
        variant = entry.variants.get(scheme)
        if variant is None:
            raise UnknownEntry(f"{entry.name}@{scheme}", "base variant",
                               hint=f"Make it with 'zoo quantize {entry.name} --scheme {scheme}'.")
        root, files = registry.home / variant.path, dict(variant.files)
    else:
        require_intact(registry, entry)
        root, files = registry.home / entry.path, dict(entry.files)
    # a model's card is sent beside its files, not adopted: the base's content hash is what
    # its adapters are bound to
    parent = catalog.base(entry.base) if entry.kind == "merged" and entry.base in \
        catalog.entries else entry
    card = model_card(entry, parent if parent is not entry or variant else None, variant)
    files.pop(CARD, None)
    extra = {CARD: card.encode(), MANIFEST: _json(manifest(entry, files, variant))}
    return _Upload(root, files, extra), entry


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
