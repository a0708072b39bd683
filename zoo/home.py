"""Where a zoo lives on disk, and which names it accepts.

Layout of a home (``ZOO_HOME``, default ``$XDG_DATA_HOME/zoo`` or
``~/.local/share/zoo``)::

    registry.json        the catalog (see zoo/schema/registry.schema.json)
    registry.json.lock   the writers' lock
    bases/NAME/          a base model, and bases/NAME@VARIANT/ for its quantized forms
    adapters/NAME/       an adapter's files
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
        if not _COMPONENT.match(part):
            raise InvalidName(name, "use lowercase letters, digits, '.', '_' and '-', "
                              "starting with a letter or digit")
    return name


def split_variant(ref: str) -> tuple[str, str | None]:
    """``'base@nf4'`` -> ``('base', 'nf4')``; ``'base'`` -> ``('base', None)``."""
    name, sep, variant = ref.partition(VARIANT_SEPARATOR)
    validate_name(name)
    if sep and not _COMPONENT.match(variant):
        raise InvalidName(ref, f"{variant!r} is not a variant name")
    return name, (variant or None)


def base_dir(home: Path, name: str, variant: str | None = None) -> Path:
    leaf = name if variant is None else f"{name}{VARIANT_SEPARATOR}{variant}"
    return home / "bases" / leaf


def adapter_dir(home: Path, name: str) -> Path:
    return home / "adapters" / name


@contextmanager
def staging_dir(home: Path, label: str) -> Iterator[Path]:
    """A fresh, empty directory under ``home/tmp`` to fill, removed on exit.

    It is on the same file system as the home, so :func:`publish_dir` can move
    it into place with one rename once it is complete; whatever is still here
    on exit (an error, an interrupt) is deleted, so no half-written model or
    adapter ever sits at a real path.
    """
    tmp_root = home / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=label.replace("/", "_") + ".", dir=tmp_root))
    try:
        yield stage
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def publish_dir(stage: Path, final: Path) -> None:
    """Move a complete staging directory to ``final``, replacing what was there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix="old.", dir=stage.parent))
        os.replace(final, trash / "old")
        os.replace(stage, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, final)
