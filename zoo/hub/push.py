"""``zoo push``: an adapter's files, card and manifest to its Hub repo, one commit."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from zoo.catalog.integrity import require_intact
from zoo.catalog.registry import Registry
from zoo.core.records import AdapterEntry
from zoo.errors import NotSupported
from zoo.hub.cards import MANIFEST, SKIPPED, adopt_card, manifest
from zoo.hub.client import HubContext, Log, ensure_repo, hub_errors


@dataclass(frozen=True)
class PushResult:
    entry: AdapterEntry
    repo: str
    commit: str
    changed: bool


def push(name: str, repo: str | None = None, private: bool = False,
         revision: str | None = None, token: str | None = None,
         registry: Registry | None = None, log: Log = lambda _: None) -> PushResult:
    """Upload an adapter, its Hub card and its manifest; no commit when nothing changed."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    registry = registry or Registry()
    ctx = HubContext.from_environment(token)
    entry = registry.load().get(name)
    if not isinstance(entry, AdapterEntry):
        raise NotSupported(f"{name!r} is a {entry.kind}; zoo push publishes adapters",
                           hint="Bases come from their own source ('zoo pull NAME').")
    require_intact(registry, entry)
    entry = adopt_card(registry, entry)
    root = registry.home / entry.path
    api = ctx.api()
    with hub_errors(ctx, repo or name, revision):
        repo = repo or (name if "/" in name else f"{api.whoami()['name']}/{name}")
        ensure_repo(api, repo, private=private)
        if revision and revision != "main":
            api.create_branch(repo, branch=revision, exist_ok=True)
        before = api.repo_info(repo, revision=revision).sha
        local = sorted(entry.files)
        remote = set(api.list_repo_files(repo, revision=revision))
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f))
                      for f in local]
        operations.append(CommitOperationAdd(
            path_in_repo=MANIFEST,
            path_or_fileobj=(json.dumps(manifest(entry), indent=2) + "\n").encode()))
        operations += [CommitOperationDelete(path_in_repo=f)
                       for f in sorted(remote - set(local) - SKIPPED)]
        info = api.create_commit(repo, operations, commit_message=f"zoo push {name}",
                                 revision=revision)
    changed = info.oid != before
    hub = {"repo": repo, "revision": revision or "main", "commit": info.oid,
           "endpoint": ctx.endpoint}
    with registry.edit() as catalog:
        entry = replace(catalog.adapter(name), hub=hub)
        catalog.entries[name] = entry
    log(f"{'pushed' if changed else 'unchanged, no new commit:'} {name} -> {repo}@{info.oid[:10]}")
    return PushResult(entry, repo, info.oid, changed)
