"""The one answer to "is this stored directory intact?", hashing each file once.

Every feature that reads stored files (merge, train, quantize, serve, pull,
push) asks here, never hashes on its own. A file's hash is cached for the
life of the process under its identity and stat (device, inode, size,
mtime): asking again costs a ``stat``, a changed file is hashed again, and a
directory renamed into place keeps its cache entries (a rename keeps the
inode), so what a command just hashed while staging is not hashed twice.
``zoo verify`` asks with ``fresh=True`` to re-read every byte.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from zoo.catalog.registry import Registry
from zoo.core.files import sha256_file
from zoo.core.records import BaseEntry, Entry
from zoo.errors import FormatError, IntegrityError, UnknownEntry

ORIGINAL = "original"

_Stamp = tuple[int, int, int, int]
_hashes: dict[_Stamp, str] = {}
_lock = threading.Lock()


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_hash(path: Path, fresh: bool = False) -> str:
    """``sha256:...`` of a file, from the cache while its stat is unchanged."""
    stamp = _stamp(path.stat())
    if not fresh:
        with _lock:
            known = _hashes.get(stamp)
        if known is not None:
            return known
    digest = sha256_file(path)
    if _stamp(path.stat()) == stamp:  # not changed while being read
        with _lock:
            _hashes[stamp] = digest
    return digest


def hash_tree_cached(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "size"}}`` for files under ``root``, through the cache."""
    return {rel: {"sha256": file_hash(root / rel), "size": (root / rel).stat().st_size}
            for rel in names}


def changed_files(root: Path, files: dict[str, dict[str, Any]], fresh: bool = False,
                  content: bool = True) -> list[str]:
    """Files under ``root`` whose content differs from the record, or that are gone.

    Symbolic links count as changed: a stored directory holds regular files only.
    ``content=False`` checks presence and size only: a stat per file, for checks that
    must not grow with the bytes (zoo serve's start-up over a whole catalog).
    """
    changed = []
    for rel, info in sorted(files.items()):
        path = root / rel
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            changed.append(rel)
            continue
        if not path.is_file() or path.is_symlink() or st.st_size != info["size"] or (
                content and file_hash(path, fresh) != info["sha256"]):
            changed.append(rel)
    return changed


def require_intact(registry: Registry, entry: Entry) -> Path:
    """The entry's stored directory, after checking every file against its hash."""
    if entry.path is None:
        raise FormatError(f"{entry.name!r} has no files in this home",
                          hint=f"Run 'zoo pull {entry.name}' first.")
    root = registry.home / entry.path
    changed = changed_files(root, entry.files)
    if changed:
        raise IntegrityError(f"{entry.name!r}: files changed since registration: "
                             f"{', '.join(changed)}", files=changed)
    return root


def has_intact_variant(registry: Registry, base: BaseEntry, variant: str) -> bool:
    """Whether ``base`` has its ``variant`` registered with every file as registered."""
    v = base.variants.get(variant)
    return v is not None and not changed_files(registry.home / v.path, v.files)


def variant_path(registry: Registry, base: BaseEntry, variant: str) -> Path:
    """The intact directory of ``base`` or of one of its quantized variants."""
    if variant == ORIGINAL:
        return require_intact(registry, base)
    if variant not in base.variants:
        raise UnknownEntry(f"{base.name}@{variant}", "base variant",
                           hint=f"Run 'zoo quantize {base.name} --scheme {variant}'.")
    v = base.variants[variant]
    path = registry.home / v.path
    changed = changed_files(path, v.files)
    if changed:
        raise IntegrityError(f"{base.name}@{variant}: files changed: {', '.join(changed)}",
                             files=changed)
    return path
