"""``zoo push`` / ``zoo pull ORG/NAME`` / ``zoo sync``: the Hub as the zoo's shared store.

``huggingface_hub`` does the talking; zoo adds what a catalog needs on top:
a ``zoo.json`` manifest beside each adapter (its registry entry and the hash
of every file), hash checks before anything is registered, and a catalog
index (a ``registry.json`` in a dataset repo) that several machines merge
into by name and content hash.

Settings are read when a call is made, not at import: ``HF_ENDPOINT`` (another
Hub: self-hosted, a mirror, the test double), ``HF_TOKEN`` (or ``--token``),
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` / ``HF_HOME``. The token is never written
to the registry, a log line or an error message.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zoo.errors import DuplicateEntry, HubError, IntegrityError, NotSupported
from zoo.files import content_hash, hash_tree, sha256_bytes, sha256_file
from zoo.home import staging_dir, validate_name
from zoo.records import AdapterEntry, BaseEntry, Entry
from zoo.registry import Catalog, Registry
from zoo.store import ORIGINAL, BaseRef, register_adapter, require_intact

MANIFEST = "zoo.json"
INDEX_FILE = "registry.json"
CARD = "README.md"
SKIPPED = {".gitattributes", MANIFEST}
DEFAULT_ENDPOINT = "https://huggingface.co"
Log = Callable[[str], None]


@dataclass(frozen=True)
class HubContext:
    """Where the Hub is and how to talk to it, read from the environment at call time."""

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool

    @classmethod
    def from_environment(cls, token: str | None = None) -> HubContext:
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "huggingface")
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            token=token or os.environ.get("HF_TOKEN") or None,
            cache_dir=Path(os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")),
            offline=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"))

    def api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token or False)

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "<token>") if self.token else text


@contextmanager
def hub_errors(ctx: HubContext, repo: str, revision: str | None = None) -> Iterator[None]:
    """Turn whatever huggingface_hub raises into one HubError line that says what to do."""
    from huggingface_hub import errors

    try:
        yield
    except HubError:
        raise
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError) as exc:
        if not ctx.offline and "offline" not in str(exc).lower():
            raise _unreachable(ctx, exc) from None
        raise HubError(f"HF_HUB_OFFLINE is set and {repo} is not in the local cache",
                       hint="Unset HF_HUB_OFFLINE, or pull it once while online.") from None
    except errors.HFValidationError as exc:
        raise HubError(f"not a valid Hub repo id: {exc}",
                       hint="Use ORG/NAME with letters, digits, '-', '_' and '.'.") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} does not exist in {repo}",
                       hint="Check the branch name, or leave out @REVISION for main.") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401 and ctx.token:
            raise HubError(f"{ctx.endpoint} refused the token (401)",
                           hint="Check HF_TOKEN or --token.") from None
        if status == 403:
            raise HubError(f"the token may not write to {repo} (403)",
                           hint="Use a token with write access to that namespace.") from None
        if isinstance(exc, errors.RepositoryNotFoundError) or status in (401, 404):
            raise HubError(f"repo {repo} not found at {ctx.endpoint}",
                           hint="Check the name; a private repo needs HF_TOKEN; "
                                "'zoo push NAME --repo ORG/NAME' creates one.") from None
        raise HubError(f"the Hub answered {status}: {ctx.scrub(str(exc).splitlines()[0])}"
                       ) from None
    except OSError as exc:
        raise _unreachable(ctx, exc) from None
    except Exception as exc:
        if "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
            raise _unreachable(ctx, exc) from None
        raise


def _ensure_repo(api, repo: str, **options) -> None:
    """Create REPO unless it exists. When the token may not create repos but the repo exists,
    huggingface_hub answers with the repo's URL, which it cannot parse on an endpoint other
    than the one set when it was imported (HfUriError); the repo exists then, which is all
    this needs to know."""
    from huggingface_hub.errors import HfUriError

    try:
        api.create_repo(repo, exist_ok=True, **options)
    except HfUriError:
        pass


def _unreachable(ctx: HubContext, exc: Exception) -> HubError:
    return HubError(f"cannot reach {ctx.endpoint} ({type(exc).__name__})",
                    hint="Check HF_ENDPOINT and the network, or set HF_HUB_OFFLINE=1 "
                         "to use the local cache.")


# -- cards and manifests ---------------------------------------------------------------

def model_card(entry: AdapterEntry) -> str:
    """The Hub model card of an adapter: Hub metadata in YAML, then what zoo knows."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=entry.base,
                         library_name="peft" if entry.kind in ("lora", "qlora") else None,
                         tags=["zoo", entry.kind, *([] if entry.kind == "bottleneck" else ["lora"])])
    training = entry.training or {}
    rows = [("kind", entry.kind), ("base", f"{entry.base} ({entry.base_hash})"),
            ("trained on", f"the {entry.base_variant} base"),
            ("rank" if entry.kind != "bottleneck" else "bottleneck size", entry.rank),
            ("alpha", entry.alpha), ("target modules", ", ".join(entry.target_modules)),
            ("trainable parameters", f"{entry.trainable_params} "
                                     f"({entry.percent_of_base}% of the base)"),
            ("training data", training.get("data_sha256") or entry.source.get("data_sha256")),
            ("servable by vLLM", "yes" if entry.servable else f"no: {entry.servable_reason}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    return (f"---\n{data.to_yaml()}\n---\n\n# {entry.name}\n\nA {entry.kind} adapter catalogued "
            f"and published by [zoo](https://zoo.invalid). `zoo pull` checks every file against "
            f"`{MANIFEST}` before registering it.\n\n| | |\n|---|---|\n{table}\n")


def manifest(entry: AdapterEntry) -> dict[str, Any]:
    portable = replace(entry, path=None, hub=None).to_dict()
    return {"format": "zoo-hub", "format_version": 1, "entry": portable, "files": entry.files}


def _adopt_card(registry: Registry, entry: AdapterEntry) -> AdapterEntry:
    """Make the stored README.md the Hub card, so the registry and the Hub hold the
    same files (and the same content hash) on every machine."""
    card = model_card(entry).encode()
    stored = registry.home / entry.path
    if (stored / CARD).exists() and sha256_file(stored / CARD) == sha256_bytes(card):
        return entry
    tmp = stored / f".{CARD}.tmp"
    tmp.write_bytes(card)
    os.replace(tmp, stored / CARD)
    with registry.edit() as catalog:
        files = hash_tree(stored)
        entry = replace(catalog.adapter(entry.name), files=files, content_hash=content_hash(files))
        catalog.entries[entry.name] = entry
    return entry


# -- push ------------------------------------------------------------------------------

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
    entry = _adopt_card(registry, entry)
    root = registry.home / entry.path
    api = ctx.api()
    with hub_errors(ctx, repo or name, revision):
        repo = repo or (name if "/" in name else f"{api.whoami()['name']}/{name}")
        _ensure_repo(api, repo, private=private)
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


# -- pull ------------------------------------------------------------------------------

def download(ctx: HubContext, repo: str, revision: str | None,
             repo_type: str = "model") -> tuple[Path, str]:
    """A snapshot of ``repo`` in the cache: ``(directory, commit)``.

    Online, the repo is looked up first, so a bad token or a missing repo is
    an error instead of a silent fall back to an old cached copy.
    """
    from huggingface_hub import snapshot_download

    with hub_errors(ctx, repo, revision):
        if not ctx.offline:  # raises for a bad token or a missing repo or revision
            ctx.api().repo_info(repo, revision=revision, repo_type=repo_type)
        # by name, not by commit: the cache then knows the name for offline use
        path = snapshot_download(repo, revision=revision, repo_type=repo_type,
                                 endpoint=ctx.endpoint, token=ctx.token or False,
                                 cache_dir=ctx.cache_dir, local_files_only=ctx.offline)
    return Path(path), Path(path).name  # snapshots are stored under their commit


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
               or sha256_file(snapshot / f) != expected[f]["sha256"]]
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
    """The base an incoming adapter names, pulled when zoo knows how to make it."""
    from zoo.store import resolve_base

    if not known:
        return resolve_base(catalog, registry, None, snapshot)
    base_name, variant = known["base"], known.get("base_variant", ORIGINAL)
    if base_name not in catalog.entries:
        from zoo.pull import pull, shipped_catalog

        if base_name not in shipped_catalog().entries:
            raise HubError(f"the adapter's base {base_name!r} is not in this zoo",
                           hint=f"Add or pull {base_name} first.")
        log(f"pulling its base {base_name}")
        pull(base_name, registry=registry, log=log)
    if variant != ORIGINAL:
        from zoo.quantize import quantize

        quantize(base_name, variant, registry, log=log)
    return BaseRef(registry.load().base(base_name), variant)


# -- sync ------------------------------------------------------------------------------

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
    from huggingface_hub import CommitOperationAdd, errors

    registry = registry or Registry()
    ctx = HubContext.from_environment(token)
    api = ctx.api()
    org = index.split("/")[0]
    for attempt in range(attempts):
        result = SyncResult(index)
        with hub_errors(ctx, index):
            _ensure_repo(api, index, repo_type="dataset", private=True)
            head = api.repo_info(index, repo_type="dataset").sha
        remote = _read_index(ctx, index, head)
        for adapter in registry.load().adapters():  # share what has no repo yet
            if adapter.hub is None or adapter.hub.get("endpoint") != ctx.endpoint:
                if adapter.name in remote.entries:
                    continue  # a conflict or already known: decided below
                repo = adapter.name if "/" in adapter.name else f"{org}/{adapter.name}"
                push(adapter.name, repo=repo, private=True, token=token, registry=registry,
                     log=log)
                result.pushed.append(adapter.name)
        local = registry.load()
        merged = Catalog()
        merged.entries.update({n: remote.entries[n] for n in remote.entries})
        for name in sorted(set(local.entries) | set(remote.entries)):
            mine, theirs = local.entries.get(name), remote.entries.get(name)
            if mine is not None and theirs is None:
                merged.entries[name] = _portable(mine)
                result.published.append(name)
            elif mine is not None and theirs is not None and mine.content_hash != theirs.content_hash:
                result.conflicts.append((name, mine.content_hash, theirs.content_hash))
        for theirs in sorted(remote.entries.values(), key=lambda e: isinstance(e, AdapterEntry)):
            if theirs.name not in local.entries:
                _fetch(theirs, registry, token, result, log)
        if result.published:
            payload = json.dumps(merged.to_dict(), indent=2).encode() + b"\n"
            try:
                with hub_errors(ctx, index):
                    info = api.create_commit(
                        index, [CommitOperationAdd(path_in_repo=INDEX_FILE,
                                                   path_or_fileobj=payload)],
                        commit_message=f"zoo sync: {len(result.published)} entries",
                        repo_type="dataset", parent_commit=head)
                result.commit = info.oid
            except HubError:
                raise
            except errors.HfHubHTTPError as exc:  # 412: someone synced meanwhile
                if exc.response is not None and exc.response.status_code == 412 and \
                        attempt + 1 < attempts:
                    log("the index changed while syncing; trying again")
                    continue
                raise
        return result
    raise HubError(f"{index} kept changing while syncing", hint="Run 'zoo sync' again.")


def _portable(entry: Entry) -> Entry:
    return replace(entry, path=None)


def _read_index(ctx: HubContext, index: str, commit: str) -> Catalog:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from zoo.registry import read_catalog

    with hub_errors(ctx, index):
        try:
            path = hf_hub_download(index, INDEX_FILE, repo_type="dataset", revision=commit,
                                   endpoint=ctx.endpoint, token=ctx.token or False,
                                   cache_dir=ctx.cache_dir)
        except RemoteEntryNotFoundError:  # a new index: no catalog in it yet
            return Catalog()
    return read_catalog(Path(path))


def _fetch(theirs: Entry, registry: Registry, token: str | None, result: SyncResult,
           log: Log) -> None:
    if isinstance(theirs, BaseEntry):
        from zoo.pull import pull, shipped_catalog

        if theirs.name in shipped_catalog().entries:
            pull(theirs.name, registry=registry, log=log)
            result.pulled.append(theirs.name)
        else:
            result.unavailable.append((theirs.name, "a base zoo cannot build here"))
        return
    if not theirs.hub:
        result.unavailable.append((theirs.name, "no Hub repo recorded"))
        return
    try:
        pull_from_hub(theirs.hub["repo"], theirs.hub.get("commit"), registry, token, log)
        result.pulled.append(theirs.name)
    except (HubError, IntegrityError) as exc:
        result.unavailable.append((theirs.name, exc.message))

