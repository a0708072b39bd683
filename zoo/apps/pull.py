"""``zoo pull``: materialize a catalog entry in the home, by its short name or repo.

A short name is looked up in the shipped catalog (``zoo.catalog.shipped``),
whose ``source`` says how to make it here: build from a packaged GGUF, train
from a packaged dataset, or download from a Hub repo; ``ORG/NAME`` comes from
the Hub. This composes features (hub, train), so it lives above them.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo.catalog.home import validate_name
from zoo.catalog.integrity import changed_files
from zoo.catalog.registry import Registry
from zoo.catalog.shipped import build_shipped_base, shipped_catalog
from zoo.core.records import AdapterEntry, BaseEntry, Entry
from zoo.errors import FormatError, IntegrityError, UnknownEntry
from zoo.hub.repos import hub_name, repo_label, subfolder_of


@dataclass(frozen=True)
class PullResult:
    entry: Entry
    changed: bool
    message: str


def pull(ref: str, home: Path | None = None, registry: Registry | None = None,
         log: Callable[[str], None] = lambda _: None, token: str | None = None,
         name: str | None = None, base: str | None = None, with_base: bool = False,
         new_version: bool = False, subfolder: str | None = None,
         gguf: str | None = None) -> PullResult:
    """Make ``ref`` present and intact in the home; a no-op when it already is.

    ``name`` registers a Hub repo under another local name (default: the repo id);
    ``base`` names an adapter's base (as ``zoo add --base``), ``with_base`` pulls an
    adapter's base from the Hub too when this zoo does not have it; ``new_version`` takes
    a repo's other content for a name already registered as that name's next version;
    ``subfolder`` pulls the adapter or model in that folder of a Hub repo; ``gguf`` picks
    the file a GGUF repo's base is built from.
    """
    registry = registry or Registry(home)
    ref, at, page = from_url(ref)
    subfolder = _one_folder(subfolder_of(subfolder), at)
    if gguf is None and page and page.lower().endswith(".gguf"):
        gguf = page  # a GGUF file's page: that file
    repo, _, revision = ref.partition("@")
    if (subfolder or gguf) and "/" not in repo:
        raise FormatError(f"--{'subfolder' if subfolder else 'gguf'} is for a Hub repo "
                          f"(ORG/NAME); {repo!r} is not one")
    name = name or hub_name(repo, subfolder)
    validate_name(name)
    catalog = registry.load()
    present = catalog.entries.get(name)
    known = shipped_catalog().entries.get(repo.lower())
    from_hub = known is None or known.source.get("type") == "hub"
    # a Hub repo is always asked: the same content is a no-op below, a newer commit a new
    # version (--new-version) or a refusal
    if present is not None and present.path is not None and not (from_hub and "/" in repo):
        changed = changed_files(registry.home / present.path, present.files)
        if changed:
            raise IntegrityError(f"{name!r} is registered but its files changed: "
                                 f"{', '.join(changed)}", files=changed)
        return PullResult(present, False, f"{name} is already in the zoo (nothing to do)")

    if not from_hub:
        return PullResult(_make(known, registry, log), True, f"pulled {name}")
    if "/" in repo or known is not None:  # the Hub decides: same content, or a conflict
        from zoo.hub.pull import pull_from_hub

        repo = known.source["repo"] if known is not None else repo
        entry = pull_from_hub(repo, revision or None, registry, token=token, log=log, name=name,
                              base=base, with_base=with_base, new_version=new_version,
                              subfolder=subfolder, gguf=gguf, catalog=catalog)
        what = "base" if entry.kind in ("base", "merged") else entry.kind
        label = entry.name if getattr(entry, "version", 1) == 1 else \
            f"{entry.name}:v{entry.version}"
        had = {present.content_hash} if present is not None else set()
        if isinstance(present, AdapterEntry):
            had = {v.content_hash for v in present.all_versions().values()}
        if entry.content_hash in had:
            return PullResult(entry, False, f"{label} is already in the zoo (same content as "
                                            f"{repo}; nothing to do)")
        return PullResult(entry, True, f"pulled {label} ({what}) from "
                                       f"{repo_label(repo, subfolder)}")
    names = ", ".join(sorted(shipped_catalog().entries))
    raise UnknownEntry(name, "catalog entry", hint=f"Short names zoo knows: {names}; "
                       "anything else is pulled from the Hub as ORG/NAME.")


def from_url(ref: str) -> tuple[str, str | None, str | None]:
    """A repo's address on a Hub, as a browser shows it (``https://huggingface.co/ORG/NAME``,
    ``.../tree/REVISION[/FOLDER]``, a file's page under it), as ``ORG/NAME[@REVISION]``, the
    folder it shows (a file's page: the file's folder; None: the repo's top) and the file's
    name on a file's page; anything else as it is. The repo comes from the configured Hub
    (``HF_ENDPOINT``), whatever site the address names."""
    found = re.fullmatch(r"https?://[^/]+/(?!datasets/|spaces/)([^/@]+/[^/@]+?)"
                         r"(?:/(tree|blob|resolve)/([^/]+)(/.*)?)?/?", ref.strip())
    if found is None:
        if re.match(r"https?://[^/]+/(datasets|spaces)/", ref):
            raise FormatError(f"{ref} is a {ref.split('/')[3].rstrip('s')} repo, not a model's",
                              hint="zoo pulls model repos: an adapter, a base or a merge.")
        return ref, None, None
    repo, page, revision, path = found.groups()
    path, file = urllib.parse.unquote(path or "").strip("/"), None
    if page != "tree":  # a file's page: the folder it is in
        path, _, file = path.rpartition("/")
    return (f"{repo}@{urllib.parse.unquote(revision)}" if revision else repo), path or None, \
        file or None


def _one_folder(given: str | None, in_address: str | None) -> str | None:
    if given and in_address and given != in_address:
        raise FormatError(f"--subfolder {given} and the address's folder {in_address} differ",
                          hint="Give one of them.")
    return given or subfolder_of(in_address)


def _make(known: Entry, registry: Registry, log: Callable[[str], None]) -> Entry:
    kind = known.source.get("type")
    if isinstance(known, BaseEntry) and kind == "gguf":
        return build_shipped_base(known.name, registry, log)
    if isinstance(known, AdapterEntry) and kind == "train":
        from zoo.train import train_from_recipe

        pull(known.base, registry=registry, log=log)
        return train_from_recipe(known, registry, log=log)
    raise UnknownEntry(known.name, f"buildable entry (source type {kind!r})")
