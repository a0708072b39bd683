"""Where a zoo lives on disk, and which names it accepts.

Layout of a home (``ZOO_HOME``, default ``$XDG_DATA_HOME/zoo`` or
``~/.local/share/zoo``)::

    registry.json        the catalog (see zoo/schema/registry.schema.json)
    registry.json.lock   the writers' lock
    bases/NAME/          a base model, and bases/NAME@VARIANT/ for its quantized forms
    adapters/NAME/       an adapter's files (``x`` and ``x/y`` never both exist)
    tmp/                 work in progress; renamed into place when complete
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zoo.core.process import alive, identity
from zoo.errors import InvalidName

_COMPONENT = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_NAME_LENGTH = 96
VARIANT_SEPARATOR = "@"


def zoo_home() -> Path:
    """The zoo's home directory: ``ZOO_HOME`` or the XDG data directory."""
    explicit = os.environ.get("ZOO_HOME")
    if explicit:
        return Path(explicit).expanduser().absolute()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "zoo"


def zoo_cache() -> Path:
    """Where zoo keeps what it can make again (built kernels, file hashes), apart from any
    home: ``$XDG_CACHE_HOME/zoo`` or ``~/.cache/zoo``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "zoo"


def validate_name(name: str) -> str:
    """Return ``name`` when it is a valid entry name, else raise InvalidName."""
    if not name:
        raise InvalidName(name, "it is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(name, f"it is longer than {MAX_NAME_LENGTH} characters")
    if name.startswith("/"):
        raise InvalidName(name, "it is an absolute path")
    parts = name.split("/")
    if len(parts) > 2:
        raise InvalidName(name, "only one '/' (org/name) is allowed")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidName(name, f"{part!r} is not allowed as a name part")
        if not _COMPONENT.fullmatch(part):
            raise InvalidName(name, "use lowercase letters, digits, '.', '_' and '-', "
                              "starting with a letter or digit")
    return name


def split_variant(ref: str) -> tuple[str, str | None]:
    """``'base@nf4'`` -> ``('base', 'nf4')``; ``'base'`` -> ``('base', None)``."""
    name, sep, variant = ref.partition(VARIANT_SEPARATOR)
    validate_name(name)
    if sep and not _COMPONENT.fullmatch(variant):
        raise InvalidName(ref, f"{variant!r} is not a variant name")
    return name, (variant or None)


def base_dir(home: Path, name: str, variant: str | None = None) -> Path:
    leaf = name if variant is None else f"{name}{VARIANT_SEPARATOR}{variant}"
    return home / "bases" / leaf


def adapter_dir(home: Path, name: str) -> Path:
    return home / "adapters" / name


def nested_names(name: str, names) -> list[str]:
    """Registered names whose directory would be inside ``name``'s, or contain it: ``x``
    and ``x/y`` cannot both exist (their files would share a folder)."""
    org = name.partition("/")[0]
    return sorted(n for n in names if n != name and (
        n.startswith(name + "/") or ("/" in name and n == org)))


@contextmanager
def staging_dir(home: Path, label: str) -> Iterator[Path]:
    """A fresh, empty directory under ``home/tmp`` to fill, removed on exit.

    It is on the same file system as the home, so :func:`publish_dir` can move
    it into place with one rename once it is complete; whatever is still here
    on exit (an error, an interrupt) is deleted, so no half-written model or
    adapter ever sits at a real path.
    """
    stage = new_stage(home / "tmp", label)
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def new_stage(parent: Path, label: str) -> Path:
    """An empty directory in ``parent`` named for its creator's pid (see sweep_stale)."""
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{label.replace('/', '_')}{pid_tag()}", dir=parent))
    stage.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; published dirs get the usual mode
    return stage


def sweep_stale(home: Path) -> None:
    """Remove staging directories and temporary files left by dead processes.

    Every staging name carries its creator's pid and start time; one whose process is
    gone (or whose pid is now another process's) was interrupted (killed, power loss) and
    can never be published.
    """
    leftovers = list((home / "tmp").glob("*")) if (home / "tmp").is_dir() else []
    leftovers += list(home.glob(".*.tmp"))
    for path in leftovers:
        owner = _pid_in(path.name)  # its creator's identity (an earlier zoo's: its pid)
        if owner is None or alive(owner):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def pid_tag() -> str:
    """A marker for temporary names, so a sweep can tell whose they are (the process's
    pid and start time, :func:`zoo.core.process.identity`)."""
    return f".pid{identity()}."


def _pid_in(name: str) -> int | None:
    found = re.search(r"\.pid(\d+)\.", name)
    return int(found.group(1)) if found else None


def publish_dir(stage: Path, final: Path) -> Path | None:
    """Move a complete staging directory to ``final``.

    Whatever was at ``final`` is moved aside, not deleted: the returned
    directory holds it (None when there was nothing), so the caller can put it
    back if what follows fails (:func:`restore_dir`) or delete it once the
    change is committed.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    aside = None
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix="old" + pid_tag(), dir=stage.parent))
        os.replace(final, aside / "old")
    os.replace(stage, final)
    return aside


def restore_dir(final: Path, aside: Path | None) -> None:
    """Undo :func:`publish_dir`: remove what was published, put the old directory back."""
    shutil.rmtree(final, ignore_errors=True)
    if aside is not None:
        os.replace(aside / "old", final)
        shutil.rmtree(aside, ignore_errors=True)
