"""The one answer to "is this stored directory intact?", hashing each file once.

Every feature that reads stored files (merge, train, quantize, serve, pull,
push) asks here, never hashes on its own. A file's hash is cached under its
identity and stat (device, inode, size, mtime, ctime): asking again costs a
``stat``, a changed file is hashed again, and a directory renamed into place
keeps its files' entries (renaming a directory changes none of its files' stat),
so what a command just hashed while staging is not hashed twice.

The cache outlives the process (git's index does the same): a hash is also kept in
``~/.cache/zoo/hashes.sqlite`` (``$ZOO_HASH_CACHE`` names another file; ``off``
keeps none), so a server restarted over a catalog of thousands of adapters does not
hash each one again on its first request. Only files whose mtime and ctime were at
least two seconds old when hashed are kept there: a write within the same tick of a
coarse file clock as the hash would otherwise leave the stat unchanged. Nothing but
a write can change a file's ctime (it cannot be set from user space), so a stored
hash answers only for the bytes it was computed from; a disk that flips bits under
an unchanged stat is what ``zoo verify`` (``fresh=True``: re-read every byte) is for.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

from zoo.catalog.home import zoo_cache
from zoo.catalog.registry import Registry
from zoo.core.files import sha256_file
from zoo.core.records import BaseEntry, Entry
from zoo.errors import FormatError, IntegrityError, UnknownEntry

ORIGINAL = "original"

_Stamp = tuple[int, int, int, int, int]
_hashes: dict[_Stamp, str] = {}
_lock = threading.Lock()
SETTLED_NS = 2_000_000_000  # a file this much older than its hash is kept on disk


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_hash(path: Path, fresh: bool = False, st: os.stat_result | None = None) -> str:
    """``sha256:...`` of a file, from the cache while its stat is unchanged (``st``: the
    file's stat, when the caller just took it)."""
    stamp = _stamp(st or path.stat())
    known = None if fresh else _known(stamp)
    if known is not None:
        return known
    digest = sha256_file(path)
    if _stamp(path.stat()) == stamp:  # not changed while being read
        with _lock:
            _hashes[stamp] = digest
            if time.time_ns() - max(stamp[3], stamp[4]) >= SETTLED_NS:
                _keep(stamp, digest)
    return digest


def hash_cache_path() -> Path | None:
    """The persisted cache's file (None: ``ZOO_HASH_CACHE=off``)."""
    named = os.environ.get("ZOO_HASH_CACHE")
    if named == "off":
        return None
    return Path(named) if named else zoo_cache() / "hashes.sqlite"


@functools.cache
def _connection() -> sqlite3.Connection | None:
    """The persisted cache, opened once per process (callers hold ``_lock``); None where
    it cannot be had (a read-only home, a broken file): it only saves work."""
    path = hash_cache_path()
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=5, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # a cache: a crash may lose its last entries, never corrupt it, and no insert
        # waits for the disk (first uses insert on a server's event loop)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS hashes (dev INTEGER, ino INTEGER, "
                   "size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT, "
                   "PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns)) WITHOUT ROWID")
    except (OSError, sqlite3.Error):
        return None
    return db


def cached_hash(path: Path) -> str | None:
    """The file's hash where a cache knows it for the file's stat as it is, else None
    (reading the file would tell: :func:`file_hash`)."""
    try:
        return _known(_stamp(path.stat()))
    except OSError:
        return None


def _known(stamp: _Stamp) -> str | None:
    with _lock:
        known = _hashes.get(stamp) or _stored(stamp)
        if known is not None:
            _hashes[stamp] = known
        return known


def _stored(stamp: _Stamp) -> str | None:
    db = _connection()
    if db is None:
        return None
    try:
        row = db.execute("SELECT sha256 FROM hashes WHERE dev=? AND ino=? AND size=? AND "
                         "mtime_ns=? AND ctime_ns=?", stamp).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _keep(stamp: _Stamp, digest: str) -> None:
    db = _connection()
    if db is not None:
        try:
            db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                       (*stamp, digest))
        except sqlite3.Error:
            pass


def forget_hashes() -> None:
    """Empty both caches (tests: a machine that never hashed anything)."""
    with _lock:
        _hashes.clear()
        db = _connection()
        if db is not None:
            db.execute("DELETE FROM hashes")


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
            st = path.lstat()  # one stat a file: a server lists thousands of adapters
        except (FileNotFoundError, NotADirectoryError):
            changed.append(rel)
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != info["size"] or (
                content and file_hash(path, fresh, st) != info["sha256"]):
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
