"""``zoo sync``: this zoo's catalog merged with a shared index in a Hub dataset repo."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from zoo.catalog.integrity import ORIGINAL
from zoo.catalog.registry import Catalog, Entries, Registry, read_catalog
from zoo.catalog.shipped import build_shipped_base, shipped_catalog
from zoo.catalog.versions import label, promote, refused_by_running_servers, resolve
from zoo.core.records import BASE_KINDS, AdapterEntry, BaseEntry, Entry
from zoo.errors import (
    FormatError,
    HubError,
    IndexChanged,
    IntegrityError,
    MalformedEntry,
    RegistryError,
)
from zoo.hub.client import HubContext, Log, ensure_repo, hub_errors
from zoo.hub.pull import pull_from_hub
from zoo.hub.push import push
from zoo.hub.repos import hub_name, subfolder_of

INDEX_FILE = "registry.json"


@dataclass
class SyncResult:
    index: str
    pushed: list[str] = field(default_factory=list)
    pulled: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)  # name, local, remote
    unavailable: list[tuple[str, str]] = field(default_factory=list)
    commit: str | None = None


def sync(index: str, registry: Registry | None = None, token: str | None = None,
         log: Log = lambda _: None, attempts: int = 3) -> SyncResult:
    """Merge this zoo's catalog with the one in the dataset repo ``index``, both ways.

    Entries are compared by name and content hash: what only one side has is
    copied to the other (adapters travel through their own repos, pushed
    first when they have none), the same name with different content is a
    conflict that is reported and left alone. The index is written with its
    parent commit, so two machines syncing at once cannot overwrite each
    other; the loser retries.
    """
    from huggingface_hub import CommitOperationAdd

    registry = registry or Registry()
    ctx = HubContext.from_environment(token)
    api = ctx.api()
    org = index.split("/")[0]
    for _ in range(attempts):
        result = SyncResult(index)
        with hub_errors(ctx, index):
            ensure_repo(api, index, repo_type="dataset", private=True)
            head = api.repo_info(index, repo_type="dataset").sha
        remote = _read_index(ctx, index, head)
        for adapter in registry.load().adapters():  # share what has no repo yet
            if adapter.name in remote.entries:
                continue  # a conflict or already known: decided below
            repo = adapter.name if "/" in adapter.name else f"{org}/{adapter.name}"
            for number, record in sorted(adapter.all_versions().items()):
                if record.hub is None or record.hub.get("endpoint") != ctx.endpoint:
                    # each version a commit of the name's repo
                    push(label(adapter.name, number), repo=repo, private=True, token=token,
                         registry=registry, log=log)
                    result.pushed.append(label(adapter.name, number) if adapter.versions
                                         else adapter.name)
        local = registry.load()
        # the index's entries as they are stored: one this zoo cannot read is kept, untouched
        merged = Catalog(Entries({n: remote.entries.to_dict(n) for n in remote.entries}))
        for name in sorted(local.entries):
            mine = local.entries[name]
            if name not in remote.entries:
                merged.entries[name] = _portable(mine)
                result.published.append(name)
            elif (theirs := remote.entries.stored(name, "content_hash")) != mine.content_hash:
                result.conflicts.append((name, mine.content_hash, str(theirs)))
        new = [n for n in remote.entries if n not in local.entries]
        for name in sorted(new, key=lambda n: remote.entries.stored(n, "kind") not in BASE_KINDS):
            try:
                theirs = remote.entries[name]
            except MalformedEntry as exc:  # the index is anyone's: its entry, not this zoo's
                result.unavailable.append((name, f"its entry in the index is malformed: "
                                                 f"{exc.why}"))
                continue
            _fetch(theirs, org, registry, token, result, log)
        if result.published:
            payload = merged.to_json()
            try:
                with hub_errors(ctx, index):
                    info = api.create_commit(
                        index, [CommitOperationAdd(path_in_repo=INDEX_FILE,
                                                   path_or_fileobj=payload)],
                        commit_message=f"zoo sync: {len(result.published)} entries",
                        repo_type="dataset", parent_commit=head)
            except IndexChanged:  # someone synced since we read the index: merge again
                log("the index changed while syncing; trying again")
                continue
            result.commit = info.oid
        return result
    raise HubError(f"{index} kept changing while syncing", hint="Run 'zoo sync' again.")


def _portable(entry: Entry) -> Entry:
    """What the index may say of a local entry: no paths of this machine."""
    source = {k: v for k, v in entry.source.items() if k != "path"}
    if isinstance(entry, AdapterEntry):
        versions = {n: _portable(v) for n, v in entry.versions.items()}
        return replace(entry, path=None, source=source, versions=versions)
    return replace(entry, path=None, source=source)


def _read_index(ctx: HubContext, index: str, commit: str) -> Catalog:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    with hub_errors(ctx, index):
        try:
            path = hf_hub_download(index, INDEX_FILE, repo_type="dataset", revision=commit,
                                   endpoint=ctx.endpoint, token=ctx.token or False,
                                   cache_dir=ctx.cache_dir)
        except RemoteEntryNotFoundError:  # a new index: no catalog in it yet
            return Catalog()
    try:
        return read_catalog(Path(path))
    except RegistryError as exc:
        raise HubError(f"the index {index} holds no registry zoo can read: "
                       f"{exc.message.replace(path, INDEX_FILE)}",
                       hint=f"Replace {INDEX_FILE} in the dataset repo {index}, or sync with "
                            f"another --repo.") from None


def _fetch(theirs: Entry, org: str, registry: Registry, token: str | None,
           result: SyncResult, log: Log) -> None:
    known = shipped_catalog().entries.get(theirs.name)
    if isinstance(theirs, BaseEntry) and isinstance(known, BaseEntry) and \
            known.source.get("type") == "gguf":
        build_shipped_base(theirs.name, registry, log)
        result.pulled.append(theirs.name)
        return
    repo = (theirs.hub or {}).get("repo")
    if not isinstance(repo, str):
        result.unavailable.append((theirs.name, "a base zoo cannot build here" if isinstance(
            theirs, BaseEntry) else "no Hub repo recorded"))
        return
    try:
        if hub_name(repo, _folder_in(theirs.hub)) not in (theirs.name, f"{org}/{theirs.name}"):
            # the index may not map a name onto another namespace's repo
            result.unavailable.append((theirs.name, f"its repo {repo} does not match its "
                                                    f"name"))
            return
        if isinstance(theirs, BaseEntry):  # a base pulled from the Hub: the same commit
            gguf = theirs.hub.get("gguf")
            pull_from_hub(repo, _commit_of(theirs.hub), registry, token, log,
                          name=theirs.name, expect_hash=theirs.content_hash,
                          subfolder=_folder_in(theirs.hub),
                          gguf=gguf if isinstance(gguf, str) else None)
            result.pulled.append(theirs.name)
            return
        # every version the index lists with a commit, oldest first, each checked against
        # its content hash; then the current version and the aliases, by content
        here: dict[str, int] = {}
        for _number, record in sorted(theirs.all_versions().items()):
            commit = (record.hub or {}).get("commit")
            if (record.hub or {}).get("repo", repo) != repo or not isinstance(commit, str):
                continue
            entry = pull_from_hub(repo, commit, registry, token, log, name=theirs.name,
                                  expect_hash=record.content_hash, new_version=True,
                                  subfolder=_folder_in(record.hub),
                                  base=_base_here(record, registry))
            here[record.content_hash] = entry.version
        _follow(registry, theirs, here, log)
        result.pulled.append(theirs.name)
    except (HubError, IntegrityError, FormatError) as exc:
        result.unavailable.append((theirs.name, exc.message))


def _commit_of(hub: dict) -> str:
    commit = hub.get("commit")
    if not isinstance(commit, str):
        raise FormatError("no commit of its repo recorded")
    return commit


def _folder_in(hub: dict | None) -> str | None:
    """The repo folder a Hub record names, checked (an index is not trusted to stay inside
    the repo)."""
    folder = (hub or {}).get("subfolder")
    if folder is not None and not isinstance(folder, str):
        raise FormatError(f"its subfolder is {folder!r}, not a folder of a repo")
    return subfolder_of(folder)


def _base_here(record: AdapterEntry, registry: Registry) -> str | None:
    """The base the index names for an adapter version, where this zoo has it (its shapes
    are checked as on 'zoo add --base'); otherwise None: the repo's zoo.json or the
    adapter's own config decides, as on 'zoo pull'."""
    base = registry.load().entries.get(record.base)
    if not isinstance(base, BaseEntry):
        return None
    if record.base_variant == ORIGINAL:
        return record.base
    # a QLoRA's variant is made from its zoo.json when this zoo lacks it
    return f"{record.base}@{record.base_variant}" if record.base_variant in base.variants \
        else None


def _follow(registry: Registry, theirs: AdapterEntry, here: dict[str, int],
            log: Log) -> None:
    """Make the local copy's current version and aliases those of the index's entry
    (versions matched by content: the numbers may differ between machines)."""
    every = theirs.all_versions()
    with registry.edit() as catalog:
        entry = catalog.adapter(theirs.name)
        aliases = {alias: here[every[n].content_hash] for alias, n in theirs.aliases.items()
                   if n in every and every[n].content_hash in here}
        catalog.entries[theirs.name] = replace(entry, aliases={**entry.aliases, **aliases})
    current = here.get(theirs.content_hash)
    catalog = registry.load()
    if current is not None and current != catalog.adapter(theirs.name).version:
        # the index decides what is current; a server here that cannot serve it is told
        ref = label(theirs.name, current)
        for refusal in refused_by_running_servers(registry.home, resolve(catalog, ref)):
            log(f"warning: {ref} is current now, and refused by {refusal}")
        promote(registry, ref, record={"action_by": "zoo sync"})
