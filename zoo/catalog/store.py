"""Putting things into a zoo home and taking them out: add, register, remove, verify.

Every path into the registry ends in :func:`commit_entry`: files are staged
under ``home/tmp``, hashed there, and only then moved to their final place in
the same locked registry transaction that records them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.catalog import versions
from zoo.catalog.home import (
    adapter_dir,
    base_dir,
    nested_names,
    new_stage,
    publish_dir,
    restore_dir,
    split_variant,
    staging_dir,
    validate_name,
)
from zoo.catalog.integrity import ORIGINAL, changed_files, hash_tree_cached
from zoo.catalog.registry import Catalog, Registry
from zoo.core.files import content_hash, find_links, list_files, load_json
from zoo.core.records import AdapterEntry, BaseEntry, Entry, Variant, replace
from zoo.errors import (
    BaseMismatch,
    BaseNotRegistered,
    DuplicateEntry,
    FormatError,
    NameCollision,
    UnknownEntry,
)
from zoo.models.adapters import (
    BOTTLENECK_CONFIG,
    PEFT_CONFIG,
    detect_kind,
    inspect_bottleneck,
    inspect_lora,
    vllm_servability,
)
from zoo.models.bases import describe_model, module_weight_shapes, read_config


def _relative(registry: Registry, path: Path) -> str:
    return path.relative_to(registry.home).as_posix()


def commit_entry(registry: Registry, stage: Path, final: Path,
                 build: Callable[[Catalog], Entry | None],
                 update: Callable[[Catalog, Entry], None] | None = None) -> Entry | None:
    """Move ``stage`` to ``final`` and record the entry ``build`` makes, atomically.

    ``build`` runs under the registry lock with the current catalog, so its
    checks (name free, base unchanged) see every concurrent writer's work; it
    raises to abort. A directory already at ``final`` (an entry being
    replaced) is kept aside until the registry is written: if anything fails,
    the new files are removed and the old ones put back, so a directory in the
    home always has its registry entry and a replacement loses nothing.
    """
    published, aside = False, None
    try:
        with registry.edit() as catalog:
            entry = build(catalog)
            aside = publish_dir(stage, final)
            published = True
            if update is not None:
                update(catalog, entry)
            else:
                catalog.entries[entry.name] = entry
    except BaseException:
        if published:
            restore_dir(final, aside)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return entry


def claim_name(catalog: Catalog, name: str) -> None:
    """Refuse ``name`` when it is taken, or when it and a registered name would nest."""
    if name in catalog.entries:
        raise DuplicateEntry(name)
    others = nested_names(name, catalog.entries)
    if others:
        raise NameCollision(name, others)


def refuse_links(path: Path) -> None:
    """FormatError when a folder handed to zoo holds symbolic links (never followed)."""
    links = find_links(path)
    if links:
        raise FormatError(f"{path} holds symbolic links ({', '.join(links[:3])}); zoo copies "
                          "regular files only", path=str(path),
                          hint="Replace each link by the file it points to, if it belongs there.")


def copy_files(src: Path, dst: Path) -> None:
    for rel in list_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)


# -- bases -----------------------------------------------------------------------------

def register_base(registry: Registry, stage: Path, name: str, source: dict[str, Any],
                  kind: str = "base", parent: str | None = None,
                  replace_merged: bool = False, hub: dict[str, Any] | None = None) -> BaseEntry:
    """Record a complete model directory in ``stage`` as the base ``name``.

    With ``replace_merged``, an existing merged model of that name (and no
    adapters of its own) is replaced in the same transaction; its quantized
    variants, made from the old weights, are dropped.
    """
    facts = describe_model(stage)
    files = hash_tree_cached(stage, list_files(stage))
    final = base_dir(registry.home, name)
    old_variants: list[str] = []

    def build(catalog: Catalog) -> BaseEntry:
        if name not in catalog.entries:
            claim_name(catalog, name)
        else:
            old = catalog.entries[name]
            if not (replace_merged and isinstance(old, BaseEntry) and old.kind == "merged"):
                raise DuplicateEntry(name)
            users = [a.name for a in catalog.adapters(base=name)]
            if users:
                raise BaseMismatch(f"cannot replace {name!r}: adapters belong to it: "
                                   f"{', '.join(users)}", hint="Remove those adapters first.")
            old_variants.extend(v.path for v in old.variants.values() if v.path)
        return BaseEntry(
            name=name, kind=kind, path=_relative(registry, final), files=files,
            content_hash=content_hash(files), architecture=facts.architecture,
            model_type=facts.model_type, hidden_size=facts.hidden_size,
            num_layers=facts.num_layers, vocab_size=facts.vocab_size, dtype=facts.dtype,
            parameters=facts.parameters, source=source, base=parent, hub=hub)

    entry = commit_entry(registry, stage, final, build)
    for rel in old_variants:
        shutil.rmtree(registry.home / rel, ignore_errors=True)
    return entry


def register_variant(registry: Registry, stage: Path, base: str, scheme: str,
                     quantization: dict[str, Any]) -> Variant:
    """Record ``stage`` as the quantized form ``scheme`` of base ``base``."""
    files = hash_tree_cached(stage, list_files(stage))
    final = base_dir(registry.home, base, scheme)
    variant = Variant(scheme=scheme, path=_relative(registry, final), files=files,
                      content_hash=content_hash(files), quantization=quantization)

    def build(catalog: Catalog) -> BaseEntry:
        return catalog.base(base)

    def update(catalog: Catalog, entry: Entry) -> None:
        assert isinstance(entry, BaseEntry)
        catalog.entries[base] = replace(entry, variants={**entry.variants, scheme: variant})

    commit_entry(registry, stage, final, build, update)
    return variant


# -- adapters --------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseRef:
    entry: BaseEntry
    variant: str  # "original" or a scheme such as "nf4"

    @property
    def label(self) -> str:
        return self.entry.name if self.variant == ORIGINAL else f"{self.entry.name}@{self.variant}"


def resolve_base(catalog: Catalog, registry: Registry, ref: str | None,
                 adapter_path: Path, what: str | None = None) -> BaseRef:
    """The base an adapter belongs to: ``--base`` or what its own config names (``what``:
    the adapter as errors name it, default its folder's name)."""
    if ref is None:
        ref = _named_base(catalog, registry, adapter_path, what or adapter_path.name)
    name, variant = split_variant(ref)
    entry = catalog.base(name)
    variant = variant or ORIGINAL
    if variant != ORIGINAL and variant not in entry.variants:
        raise UnknownEntry(f"{name}@{variant}", "base variant")
    return BaseRef(entry, variant)


def _named_base(catalog: Catalog, registry: Registry, adapter_path: Path, what: str) -> str:
    """The base an adapter's own config names: a registered name (or its stored path), or
    the Hub id a base records (named as the id, or by a local or cache path ending in it,
    as PEFT writes after training on a downloaded model)."""
    config_file = adapter_path / PEFT_CONFIG
    if not config_file.exists():
        config_file = adapter_path / BOTTLENECK_CONFIG
    config = load_json(config_file, "adapter config")
    named = config.get("base_model_name_or_path") or config.get("base_model")
    hub_id = None
    if named:
        named = str(named)
        for base in catalog.bases():
            if named == base.name or named.startswith(base.name + "@"):
                return named
            for variant, v in [(None, base), *base.variants.items()]:
                stored = registry.resolve(v.path)
                if stored is not None and Path(named).absolute() == stored:
                    return base.name if variant is None else f"{base.name}@{variant}"
        hub_id = hub_id_named(named)
        path = named.rstrip("/").lower()
        for base in catalog.bases():
            if not base.hub_id:
                continue
            known = base.hub_id.lower()
            if (hub_id or "").lower() == known or path.endswith("/" + known):
                return base.name
    raise BaseNotRegistered(
        f"cannot tell which base {what} belongs to (its config names "
        f"{named!r}, which is not a registered base"
        f"{'' if not hub_id else ' nor the Hub id of one'})", named=named, hub_id=hub_id,
        hint=(f"Get the base with 'zoo pull {hub_id}' (or pull the adapter with "
              f"--with-base), or pass --base NAME; 'zoo list --kind base'." if hub_id else
              "Pass --base NAME (or NAME@nf4 for a QLoRA adapter); 'zoo list --kind base'."))


def hub_id_named(named: str) -> str | None:
    """The Hub id ``ORG/NAME`` a config's ``base_model_name_or_path`` names outright: the
    id itself, or a Hugging Face cache path (``.../models--ORG--NAME/snapshots/SHA``). (A
    local path ending in a registered base's id matches that base too, above.)"""
    import re

    cached = re.search(r"models--([^/]+?)--([^/]+)(?:/snapshots/[^/]+)?/?$", named)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", named):
        return named
    return None


def inspect_adapter(path: Path, base: BaseRef, registry: Registry,
                    base_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Everything the registry records about an adapter, checked against its base
    (``base_shapes``: the base's weight shapes, when the caller read them already)."""
    kind = detect_kind(path)
    if kind == "peft":
        if base_shapes is None:
            base_shapes = module_weight_shapes(registry.resolve(base.entry.path))
        found = inspect_lora(path, base_shapes, base.entry.name)
        why = vllm_servability("lora", found.details, base.entry.architecture,
                               found.init_lora_weights)
        return dict(kind="qlora" if base.variant == "nf4" else "lora", rank=found.rank,
                    alpha=found.alpha, target_modules=found.target_modules,
                    trainable_params=found.trainable_params, lora=found.details,
                    servable=why is None, servable_reason=why)
    if kind == "bottleneck":
        found = inspect_bottleneck(path, base.entry.hidden_size, base.entry.num_layers,
                                   base.entry.name)
        return dict(kind="bottleneck", rank=found.details.bottleneck_size, alpha=None,
                    target_modules=found.details.positions,
                    trainable_params=found.trainable_params, bottleneck=found.details,
                    servable=False, servable_reason=vllm_servability("bottleneck", None, ""))
    raise FormatError(f"{path} is a model, not an adapter", path=str(path),
                      hint="Register models without --base: 'zoo add PATH --name NAME'.")


def adapter_entry(catalog: Catalog, registry: Registry, name: str, base: BaseRef,
                  facts: dict[str, Any], files: dict[str, dict[str, Any]], source: dict[str, Any],
                  training: dict[str, Any] | None = None, hub: dict[str, Any] | None = None,
                  version: int = 1) -> AdapterEntry:
    """The registry entry of an inspected, hashed adapter; run under the registry lock,
    it refuses a taken name (for a first version) and a base that changed since the
    adapter was inspected."""
    if version == 1:
        claim_name(catalog, name)
    current = catalog.base(base.entry.name)
    if current.content_hash != base.entry.content_hash:
        raise BaseMismatch(f"base {base.entry.name!r} changed while {name!r} was being added")
    return AdapterEntry(
        name=name, base=current.name, base_hash=current.content_hash, base_variant=base.variant,
        path=_relative(registry, versions.version_dir(registry.home, name, version)),
        files=files, content_hash=content_hash(files),
        percent_of_base=round(100.0 * facts["trainable_params"] / current.parameters, 4),
        source=source, training=training, hub=hub, version=version, **facts)


def register_adapter(registry: Registry, stage: Path, name: str, base: BaseRef,
                     source: dict[str, Any], training: dict[str, Any] | None = None,
                     hub: dict[str, Any] | None = None,
                     new_version: bool = False) -> AdapterEntry:
    """Inspect the adapter in ``stage`` against ``base`` and record it as ``name``.

    With ``new_version``, a name already registered gets it as its next version (serving
    nobody until promoted); the same content as one of its versions is that version, and
    nothing changes. Without it, a taken name is refused.
    """
    facts = inspect_adapter(stage, base, registry)
    files = hash_tree_cached(stage, list_files(stage))
    present = registry.load().entries.get(name) if new_version else None
    if not isinstance(present, AdapterEntry):  # a first version: the name is claimed below
        def build(catalog: Catalog) -> AdapterEntry:
            return adapter_entry(catalog, registry, name, base, facts, files, source,
                                 training, hub)

        return commit_entry(registry, stage, adapter_dir(registry.home, name), build)
    same = versions.same_content(present, content_hash(files))
    if same is not None:
        return same
    if present.base != base.entry.name:
        raise BaseMismatch(f"{name!r} belongs to {present.base!r}; a new version cannot be "
                           f"an adapter of {base.entry.name!r}",
                           hint="Register it under another name.")
    number = present.latest() + 1

    def build_version(catalog: Catalog) -> AdapterEntry:
        if catalog.adapter(name).latest() + 1 != number:
            raise DuplicateEntry(versions.label(name, number))  # a concurrent add took it
        return adapter_entry(catalog, registry, name, base, facts, files, source, training,
                             hub, version=number)

    def record(catalog: Catalog, entry: Entry) -> None:
        catalog.entries[name] = versions.with_version(catalog.adapter(name), entry)

    return commit_entry(registry, stage, versions.version_dir(registry.home, name, number),
                        build_version, record)


def add(path: Path, name: str, base: str | None = None, home: Path | None = None,
        registry: Registry | None = None, new_version: bool = False) -> Entry:
    """Inspect the directory at ``path``, copy it into the home and register it (with
    ``new_version``, as the next version of an adapter name already registered)."""
    registry = registry or Registry(home)
    validate_name(name)
    path = Path(path).absolute()
    kind = detect_kind(path)
    refuse_links(path)
    catalog = registry.load()
    if not (new_version and isinstance(catalog.entries.get(name), AdapterEntry)):
        claim_name(catalog, name)
    source = {"type": "local", "path": str(path)}
    with staging_dir(registry.home, name) as stage:
        if kind == "model":
            if base is not None:
                raise FormatError(f"{path} is a model, not an adapter: --base does not apply",
                                  path=str(path))
            if "quantization_config" in read_config(path):
                raise FormatError(f"{path} is a quantized model", path=str(path), hint=(
                    "Add the original 16-bit model, then 'zoo quantize NAME --scheme ...'."))
            describe_model(path)  # refuse a broken model before copying gigabytes
            copy_files(path, stage)
            return register_base(registry, stage, name, source)
        present = catalog.entries.get(name)
        if base is None and isinstance(present, AdapterEntry) and new_version:
            base = present.base if present.base_variant == ORIGINAL else \
                f"{present.base}@{present.base_variant}"
        ref = resolve_base(catalog, registry, base, path)
        inspect_adapter(path, ref, registry)  # refuse before copying anything
        copy_files(path, stage)
        return register_adapter(registry, stage, name, ref, source, new_version=new_version)


def remove(name: str, home: Path | None = None, registry: Registry | None = None) -> Entry:
    """Unregister ``name`` and delete its files (every version of an adapter, a base's
    variants); ``NAME:vN`` removes that version only (never the current one).

    The directories are renamed out of place under the registry lock, in the
    same transaction that drops the entry, and deleted after it: an add of the
    same name, in any order, never finds its new files deleted.
    """
    registry = registry or Registry(home)
    if versions.SEPARATOR in name:
        entry_name, _ = versions.split_ref(name)
        record = versions.resolve(registry.load(), name)
        versions.remove_versions(registry, entry_name, [record.version])
        return record
    trash = new_stage(registry.home / "tmp", f"rm-{name}")
    try:
        with registry.edit() as catalog:
            entry = catalog.get(name)
            if isinstance(entry, BaseEntry):
                users = [a.name for a in catalog.adapters(base=name)]
                if users:
                    raise BaseMismatch(f"base {name!r} still has adapters: {', '.join(users)}",
                                       hint="Remove those adapters first.")
            del catalog.entries[name]
            paths = [entry.path] + ([v.path for v in entry.variants.values()]
                                    if isinstance(entry, BaseEntry) else
                                    [v.path for v in entry.versions.values()])
            for i, rel in enumerate(p for p in paths if p):
                if (registry.home / rel).exists():
                    os.replace(registry.home / rel, trash / str(i))
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return entry


@dataclass(frozen=True)
class VerifyResult:
    name: str
    changed: list[str]  # files whose hash differs, missing ones included

    @property
    def ok(self) -> bool:
        return not self.changed


def verify(name: str | None = None, home: Path | None = None,
           registry: Registry | None = None) -> list[VerifyResult]:
    """Re-hash the files of one entry (or all) and report what changed."""
    registry = registry or Registry(home)
    catalog = registry.load()
    entries = [catalog.get(name)] if name else [catalog.entries[n] for n in sorted(catalog.entries)]
    results = []
    for entry in entries:
        if entry.path is None:
            continue
        stored: list[tuple[str, Any]] = [("", entry)]  # (prefix of its files, record)
        if isinstance(entry, AdapterEntry):
            stored += [(f"{versions.SEPARATOR}v{n}/", r) for n, r in sorted(entry.versions.items())]
        else:
            stored += [(f"@{scheme}/", v) for scheme, v in sorted(entry.variants.items())]
        changed = [prefix + f for prefix, record in stored if record.path is not None
                   for f in changed_files(registry.home / record.path, record.files, fresh=True)]
        results.append(VerifyResult(entry.name, changed))
    return results
