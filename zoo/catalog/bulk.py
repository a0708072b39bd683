"""``zoo add DIR --many``: a folder of adapter folders, registered in one transaction.

Customers arrive by the hundred. Each adapter is copied into a staging folder
and inspected there (what is registered is exactly what was checked), then all
accepted ones are published and recorded under one lock with one registry
write; one that fails its checks is refused with one line and the others go on.
If the transaction itself fails, none is registered and no file is left.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zoo.catalog.home import adapter_dir, new_stage, publish_dir, restore_dir, validate_name
from zoo.catalog.integrity import hash_tree_cached
from zoo.catalog.registry import Registry
from zoo.catalog.store import (
    BaseRef,
    adapter_entry,
    claim_name,
    copy_files,
    inspect_adapter,
    refuse_links,
    resolve_base,
)
from zoo.core.files import list_files
from zoo.core.records import AdapterEntry
from zoo.errors import FormatError, ZooError
from zoo.models.bases import module_weight_shapes


@dataclass
class BulkResult:
    added: list[AdapterEntry] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (folder, one-line reason)


@dataclass(frozen=True)
class _Staged:
    name: str
    stage: Path
    facts: dict
    files: dict
    source: dict


def add_many(root: Path, base: str, prefix: str = "", registry: Registry | None = None,
             log: Callable[[str], None] = lambda _: None) -> BulkResult:
    """Register every adapter folder directly under ``root`` as ``PREFIX + folder name``."""
    registry = registry or Registry()
    root = Path(root).absolute()
    if not root.is_dir():
        raise FormatError(f"{root} is not a directory", path=str(root))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    if not folders:  # `zoo add ADAPTER --many`, most likely: said, not "added 0"
        raise FormatError(f"{root} holds no adapter folders", path=str(root), hint=(
            "--many registers each folder inside PATH; for one adapter, drop --many and "
            "give --name."))
    catalog = registry.load()
    ref: BaseRef = resolve_base(catalog, registry, base, root)
    base_shapes = module_weight_shapes(registry.resolve(ref.entry.path))
    result = BulkResult()
    staged: list[_Staged] = []
    parent = registry.home / "tmp"
    try:
        for folder in folders:
            name = f"{prefix}{folder.name}".lower()
            stage = None
            try:
                validate_name(name)
                claim_name(catalog, name)
                if any(s.name == name for s in staged):
                    raise FormatError(f"{name!r} appears twice")
                refuse_links(folder)
                stage = new_stage(parent, name)
                copy_files(folder, stage)
                facts = inspect_adapter(stage, ref, registry, base_shapes)
                files = hash_tree_cached(stage, list_files(stage))
            except ZooError as exc:
                if stage is not None:
                    shutil.rmtree(stage, ignore_errors=True)
                result.refused.append((folder.name, exc.message))
                log(f"refused {folder.name}: {exc.message}")
                continue
            staged.append(_Staged(name, stage, facts, files, {"type": "local", "path": str(folder)}))
        _commit(registry, ref, staged, result)
    finally:
        for s in staged:
            shutil.rmtree(s.stage, ignore_errors=True)
    return result


def _commit(registry: Registry, ref: BaseRef, staged: list[_Staged], result: BulkResult) -> None:
    """Publish and record every staged adapter in one transaction, or none of them."""
    if not staged:
        return
    published: list[tuple[Path, Path | None]] = []
    try:
        with registry.edit() as catalog:
            entries = []
            for s in staged:  # checked again under the lock: another writer may have won
                try:
                    entry = adapter_entry(catalog, registry, s.name, ref, s.facts, s.files,
                                          s.source)
                except ZooError as exc:
                    result.refused.append((s.name, exc.message))
                    continue
                final = adapter_dir(registry.home, s.name)
                published.append((final, publish_dir(s.stage, final)))
                catalog.entries[entry.name] = entry
                entries.append(entry)
    except BaseException:
        for final, aside in reversed(published):
            restore_dir(final, aside)
        raise
    for _final, aside in published:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    result.added.extend(entries)
