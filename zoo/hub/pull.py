"""``zoo pull ORG/NAME[@REV]``: whatever the repo is, checked before it is registered.

A PEFT adapter (with zoo's ``zoo.json`` or without), a zoo bottleneck adapter, or a
transformers model (a base, or a model zoo merged). The listing is read first and
pinned to its commit; only the files zoo uses are downloaded; each is checked against
the listing's hash, and against ``zoo.json`` when the repo has one; an adapter is
checked against its base's shapes like ``zoo add`` does. Nothing is registered until
everything has passed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from zoo.catalog import versions
from zoo.catalog.home import staging_dir, validate_name
from zoo.catalog.integrity import ORIGINAL, file_hash
from zoo.catalog.registry import Catalog, Registry
from zoo.catalog.shipped import build_shipped_base, shipped_catalog
from zoo.catalog.store import BaseRef, register_adapter, register_base, resolve_base
from zoo.core.files import content_hash
from zoo.core.records import AdapterEntry, Entry
from zoo.errors import BaseNotRegistered, DuplicateEntry, FormatError, HubError, IntegrityError
from zoo.hub.cards import MANIFEST, Manifest, read_manifest
from zoo.hub.client import HubContext, Log, hub_errors
from zoo.hub.repos import (
    PEFT_PICKLE,
    PEFT_WEIGHTS,
    Listing,
    Plan,
    check_against_listing,
    hub_name,
    in_folder,
    pickled_to_safetensors,
    plan_fetch,
    repo_label,
)


@dataclass(frozen=True)
class PullOptions:
    repo: str
    revision: str | None = None
    name: str | None = None  # default: the repo id, lowercased
    base: str | None = None  # an adapter's base, as --base on zoo add
    with_base: bool = False  # pull an adapter's base from the Hub when missing
    token: str | None = None
    expect_hash: str | None = None  # from a sync index: the files' content hash
    new_version: bool = False  # other content for a registered adapter: its next version
    subfolder: str | None = None  # the folder of the repo that holds it (None: its top)
    gguf: str | None = None  # a GGUF repo's file to build a base from (default: its only one)


def pull_from_hub(repo: str, revision: str | None, registry: Registry,
                  token: str | None = None, log: Log = lambda _: None, name: str | None = None,
                  expect_hash: str | None = None, base: str | None = None,
                  with_base: bool = False, new_version: bool = False,
                  subfolder: str | None = None, gguf: str | None = None,
                  catalog: Catalog | None = None) -> Entry:
    """Download a repo (or one folder of it), check it, and register what it is.

    It is registered as ``name`` (default: :func:`hub_name`), never as what the repo's
    own ``zoo.json`` says: a repo does not choose where it lands. A name already
    registered with other content is refused. ``catalog``: the registry as the caller just
    read it (one parse of a large registry fewer; what is registered is checked again
    under the lock).
    """
    options = PullOptions(repo, revision, name, base, with_base, token, expect_hash,
                          new_version, subfolder, gguf)
    return _pull(options, registry, log, catalog)


def is_pattern(ref: str) -> bool:
    """Whether ``ref`` is a shell-style pattern of repo ids (an address never is)."""
    return any(c in ref for c in "*?[") and "://" not in ref


def repos_matching(pattern: str, token: str | None = None) -> list[str]:
    """The model repos of one owner whose ids match ``pattern`` (``acme/customer-*``:
    shell-style, ignoring case), from the Hub's own listing, sorted."""
    owner, _, wanted = pattern.partition("/")
    if not owner or not wanted or is_pattern(owner) or "/" in wanted:
        raise FormatError(f"{pattern!r} is not ORG/PATTERN: a pattern names one owner's repos",
                          hint="For example 'acme/customer-*'.")
    ctx = HubContext.from_environment(token)
    if ctx.offline:
        raise HubError(f"HF_HUB_OFFLINE is set: the Hub's list of {owner}'s repos cannot be "
                       "read", hint="Name the repos one by one.")
    literal = re.split(r"[*?\[]", wanted)[0]  # the Hub narrows by it; the pattern decides
    with hub_errors(ctx, pattern):
        ids = [m.id for m in ctx.api().list_models(author=owner, search=literal or None)]
    found = sorted(i for i in ids if fnmatch.fnmatchcase(i.lower(), pattern.lower()))
    if not found:
        raise HubError(f"no model repo of {owner} at {ctx.endpoint} matches {pattern!r}",
                       hint="A private repo is listed only with HF_TOKEN.")
    return found


def _pull(options: PullOptions, registry: Registry, log: Log,
          catalog: Catalog | None = None) -> Entry:
    name = options.name or hub_name(options.repo, options.subfolder)
    validate_name(name)
    ctx = HubContext.from_environment(options.token)
    listing, snapshot, plan = _fetch(ctx, options)
    manifest = read_manifest(snapshot / MANIFEST, options.repo) if plan.manifest else None
    payload = [f for f in plan.files if f != MANIFEST]
    if manifest is not None:
        _check_manifest(options.repo, snapshot, payload, manifest)
    hub = {"repo": options.repo, "revision": options.revision or "main",
           "commit": listing.commit, "endpoint": ctx.endpoint}
    where = {"subfolder": options.subfolder} if options.subfolder else {}
    hub.update(where)
    catalog = catalog if catalog is not None else registry.load()
    present = catalog.entries.get(name)
    if plan.kind == "gguf" and present is not None and present.hub and all(
            present.hub.get(k) == v for k, v in {**hub, "gguf": plan.files[0]}.items()
            if k != "revision"):
        log(f"{name} is already in the zoo (built from the same file of the same commit)")
        return present  # building it again would take minutes to make the same bytes
    with staging_dir(registry.home, name) as stage:
        if plan.kind == "gguf":
            converted = _dequantized(snapshot / plan.files[0], stage, log)
            hub["gguf"] = plan.files[0]
        else:
            converted = _stage(snapshot, payload, stage)
        incoming = content_hash({f: {"sha256": file_hash(stage / f), "size": (stage / f).stat(
        ).st_size} for f in sorted(os.listdir(stage))})
        if options.expect_hash is not None and incoming != options.expect_hash:
            raise IntegrityError(f"{options.repo} holds other content than the index lists "
                                 f"for {name!r}; nothing was registered")
        if present is not None:
            same = versions.same_content(present, incoming) if isinstance(
                present, AdapterEntry) else (present if present.content_hash == incoming else None)
            if same is not None:
                log(f"{name} is already in the zoo (same content)")
                return same
            if not (options.new_version and isinstance(present, AdapterEntry)):
                raise DuplicateEntry(name)
        source = {"type": "hub", "repo": options.repo, "commit": listing.commit, **where}
        if converted:
            source["converted"] = converted
        if plan.kind in ("model", "gguf"):
            return _register_model(registry, stage, name, source, hub, listing, manifest, log)
        ref = _base_for(options, manifest, catalog, registry, stage, log)
        entry = register_adapter(registry, stage, name, ref, source=source,
                                 training=manifest.training if manifest else None, hub=hub,
                                 new_version=options.new_version)
    if manifest and manifest.base_hash and entry.base_hash != manifest.base_hash:
        log(f"note: {name} was published against another build of {entry.base} "
            f"(base hash differs); its shapes fit this one")
    return entry


def _fetch(ctx: HubContext, options: PullOptions) -> tuple[Listing, Path, Plan]:
    """The repo's listing pinned to a commit, and the files zoo uses downloaded from that
    commit and checked against it (offline: the cached snapshot, checked against
    ``zoo.json`` only). The path returned is the snapshot's folder that holds them, and
    the plan's files are relative to it."""
    from huggingface_hub import snapshot_download

    repo, revision, folder = options.repo, options.revision, options.subfolder
    if ctx.offline:
        cached = _cached_snapshot(ctx, repo, revision)
        names = {p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()}
        return Listing(repo, cached.name, {}), _inside(cached, folder), \
            _plan(repo, names, folder, options.gguf)
    with hub_errors(ctx, repo, revision):
        info = ctx.api().model_info(repo, revision=revision, files_metadata=True)
        listing = Listing.from_info(repo, info)
        plan = _plan(repo, set(listing.files), folder, options.gguf)
        in_repo = [f"{folder}/{f}" if folder else f for f in plan.files]
        # by commit (the listing's), so a push in between cannot mix two commits' files;
        # the cache also learns the revision's name, for offline use
        try:
            snapshot = Path(snapshot_download(
                repo, revision=listing.commit, endpoint=ctx.endpoint, token=ctx.token or False,
                cache_dir=ctx.cache_dir, allow_patterns=in_repo))
        except OSError as error:  # huggingface_hub's own size check of what arrived
            if "onsistency check failed" not in str(error):
                raise
            raise IntegrityError(f"{repo}: a file changed between listing and download "
                                 f"(commit {listing.commit[:12]}: {str(error)[:200]}); "
                                 "nothing was registered") from None
        if revision != listing.commit:
            _remember_revision(ctx, repo, revision or "main", listing.commit)
    try:
        check_against_listing(listing, snapshot, in_repo, file_hash)
    except IntegrityError as bad:  # never leave the bad bytes in the cache for a retry
        for name in bad.files:
            cached = snapshot / name
            if cached.exists():
                cached.resolve().unlink(missing_ok=True)
            cached.unlink(missing_ok=True)
        raise
    return listing, _inside(snapshot, folder), plan


def _plan(repo: str, names: set[str], folder: str | None, gguf: str | None) -> Plan:
    """What to fetch of ``repo`` (of its ``folder``), with names relative to the folder."""
    if folder is None:
        return plan_fetch(repo, names, gguf)
    inside = in_folder(names, folder)
    if not inside:
        raise FormatError(f"{repo} has no folder {folder!r}; nothing was registered",
                          hint="Give a folder as the repo's page on the Hub shows it.")
    return plan_fetch(repo_label(repo, folder), inside, gguf)


def _inside(snapshot: Path, folder: str | None) -> Path:
    return snapshot / folder if folder else snapshot


def _cached_snapshot(ctx: HubContext, repo: str, revision: str | None) -> Path:
    """The snapshot an earlier pull left in the cache for this revision (offline)."""
    folder = ctx.cache_dir / f"models--{repo.replace('/', '--')}"
    revision = revision or "main"
    refs = folder / "refs" / revision
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else (
        refs.read_text().strip() if refs.is_file() else None)
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise HubError(f"HF_HUB_OFFLINE is set and {repo} is not in the local cache",
                       hint="Unset HF_HUB_OFFLINE, or pull it once while online.")
    return snapshot


def _remember_revision(ctx: HubContext, repo: str, revision: str, commit: str) -> None:
    """Record in the cache that ``revision`` is ``commit`` (huggingface_hub's refs file),
    so an offline pull of REPO@REVISION finds the snapshot."""
    refs = ctx.cache_dir / f"models--{repo.replace('/', '--')}" / "refs" / revision
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(commit)


def _check_manifest(repo: str, snapshot: Path, payload: list[str], manifest: Manifest) -> None:
    bad = [f for f in payload if f not in manifest.files
           or file_hash(snapshot / f) != manifest.files[f]["sha256"]]
    bad += [f for f in manifest.files if f not in payload]
    if bad:
        raise IntegrityError(f"{repo}: files do not match their {MANIFEST} hashes: "
                             f"{', '.join(sorted(bad))}; nothing was registered",
                             files=sorted(bad))


def _stage(snapshot: Path, payload: list[str], stage: Path) -> str | None:
    """Put the payload in the stage (hard links to the cache's objects where the file
    system allows: no copy, and the hashes already computed stay cached); a pickled PEFT
    adapter is converted to safetensors on the way. What was converted, if anything."""
    converted = None
    for rel in payload:
        source = (snapshot / rel).resolve()  # the cache's snapshot holds links to objects
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == PEFT_PICKLE:
            count = pickled_to_safetensors(source, stage / PEFT_WEIGHTS)
            converted = (f"{PEFT_PICKLE} -> {PEFT_WEIGHTS} ({count} tensors, PyTorch's "
                         "weights-only loader)")
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return converted


def _dequantized(gguf: Path, stage: Path, log: Log) -> str:
    """Build a 16-bit checkpoint in ``stage`` from a GGUF file: what was converted."""
    from zoo.models.embedded import dequantize_gguf

    log(f"building a bfloat16 checkpoint from {gguf.name} (transformers' GGUF loader)")
    dequantize_gguf(gguf, stage)  # by its name in the snapshot: the blob it links to has none
    return f"{gguf.name} -> bfloat16 safetensors (dequantized by transformers' GGUF loader)"


def _register_model(registry: Registry, stage: Path, name: str, source: dict, hub: dict,
                    listing: Listing, manifest: Manifest | None, log: Log) -> Entry:
    """A model repo: a base with its Hub identity (or a merged model whose parent is here)."""
    from zoo.models.bases import read_config

    if "quantization_config" in read_config(stage):
        raise FormatError(f"{listing.repo} is a quantized model; nothing was registered",
                          hint="Pull the 16-bit model, then 'zoo quantize NAME --scheme ...'.")
    kind, parent = "base", None
    if manifest is not None and manifest.kind == "merged":
        if manifest.base in registry.load().entries:
            kind, parent = "merged", manifest.base
        else:
            log(f"note: {name} was merged from {manifest.base}, which is not in this zoo; "
                "it is registered as a base")
    identity = {**hub, **({"license": listing.license} if listing.license else {})}
    return register_base(registry, stage, name, source, kind=kind, parent=parent, hub=identity)


def _base_for(options: PullOptions, manifest: Manifest | None, catalog: Catalog,
              registry: Registry, stage: Path, log: Log) -> BaseRef:
    """The base an incoming adapter belongs to: --base, its zoo.json, or what its config
    names (a registered name or a base's Hub id); built when the shipped catalog knows how,
    pulled from the Hub with --with-base."""
    if options.base is not None:
        return resolve_base(catalog, registry, options.base, stage)
    if manifest is not None and manifest.base in catalog.entries:
        return _variant_of(registry, manifest.base, manifest.base_variant, log)
    if manifest is not None and manifest.base in shipped_catalog().entries:
        log(f"pulling its base {manifest.base}")
        build_shipped_base(manifest.base, registry, log)
        return _variant_of(registry, manifest.base, manifest.base_variant, log)
    what = repo_label(options.repo, options.subfolder)
    try:  # what its config names: a registered name, or a registered base's Hub id
        ref = resolve_base(catalog, registry, None, stage, what)
    except BaseNotRegistered as missing:
        known = [b for b in shipped_catalog().bases() if missing.hub_id and b.hub_id and
                 b.hub_id.lower() == missing.hub_id.lower()]
        if known:  # a base zoo ships (built here, or built before it recorded its Hub id)
            if known[0].name not in catalog.entries:
                log(f"pulling its base {known[0].name} ({missing.hub_id})")
                build_shipped_base(known[0].name, registry, log)
            return resolve_base(registry.load(), registry, known[0].name, stage)
        if not (options.with_base and missing.hub_id):
            raise
        log(f"pulling its base {missing.hub_id}")
        _pull(PullOptions(missing.hub_id, token=options.token), registry, log)
        ref = resolve_base(registry.load(), registry, None, stage, what)
    if manifest is not None and manifest.base_variant != ORIGINAL:
        return _variant_of(registry, ref.entry.name, manifest.base_variant, log)
    return ref


def _variant_of(registry: Registry, base: str, variant: str, log: Log) -> BaseRef:
    if variant != ORIGINAL:  # a QLoRA adapter: its NF4 base, made here when missing
        from zoo.quantize import quantize

        quantize(base, variant, registry, log=log)
    return BaseRef(registry.load().base(base), variant)
