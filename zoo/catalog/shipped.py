"""The catalog that ships with zoo, and the bases it knows how to build here.

Its source is ``registry.json`` at the top of the repository (the registry's
own schema; entries without ``path``, whose ``source`` says how to make them);
the package carries it as ``zoo/catalog/shipped.json`` so an installed wheel
knows the short names too. A missing or unreadable catalog is an error, never
an empty catalog.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from zoo.catalog.home import staging_dir
from zoo.catalog.registry import Catalog, Registry, read_catalog
from zoo.catalog.store import register_base
from zoo.core.records import BaseEntry
from zoo.errors import RegistryError, UnknownEntry

CATALOG_VARIABLE = "ZOO_CATALOG"
PACKAGED_NAME = "shipped.json"


def shipped_catalog_path() -> Path:
    """Where the shipped catalog is read from (``ZOO_CATALOG`` overrides it)."""
    explicit = os.environ.get(CATALOG_VARIABLE)
    if explicit:
        return Path(explicit)
    return Path(str(resources.files("zoo.catalog").joinpath(PACKAGED_NAME)))


def shipped_catalog() -> Catalog:
    """The catalog that ships with zoo; RegistryError when the installation lacks it."""
    path = shipped_catalog_path()
    if not path.is_file():
        raise RegistryError(f"zoo's shipped catalog {path} is missing",
                            hint="Reinstall zoo (the wheel carries zoo/catalog/shipped.json), "
                                 f"or point {CATALOG_VARIABLE} at a catalog file.")
    return read_catalog(path)


def build_shipped_base(name: str, registry: Registry,
                       log: Callable[[str], None] = lambda _: None) -> BaseEntry:
    """Build and register a base the shipped catalog knows how to make from a package."""
    known = shipped_catalog().entries.get(name)
    if not isinstance(known, BaseEntry) or known.source.get("type") != "gguf":
        raise UnknownEntry(name, "base zoo can build",
                           hint=f"Add {name} with 'zoo add PATH --name {name}'.")
    from zoo.models.embedded import build_from_gguf

    log(f"building {name} from {known.source['file']} (about a minute)")
    with staging_dir(registry.home, name) as stage:
        source = build_from_gguf(known.source, stage)
        return register_base(registry, stage, name, source, hub=known.hub)
