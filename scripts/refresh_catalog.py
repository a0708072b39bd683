"""Refresh the shipped catalog (registry.json) from a home where its entries were pulled.

    ZOO_HOME=/tmp/h .venv/bin/zoo pull demo/pirate   # ... each entry
    .venv/bin/python scripts/refresh_catalog.py /tmp/h

Facts measured there (parameter counts, hashes, training losses) replace the
shipped ones; the recipe (`source`) is kept and local paths and files dropped.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the source of the shipped catalog; zoo/catalog/shipped.json links to it
SOURCE = ROOT / "registry.json"

from zoo.catalog.registry import Registry  # noqa: E402
from zoo.catalog.shipped import shipped_catalog  # noqa: E402
from zoo.core.files import write_json_atomic  # noqa: E402
from zoo.core.records import AdapterEntry, BaseEntry  # noqa: E402


def main(home: str) -> None:
    shipped = shipped_catalog()
    pulled = Registry(Path(home)).load()
    for name in list(shipped.entries):
        if name not in pulled.entries:
            print(f"{name}: not pulled in {home}, kept as is")
            continue
        entry = pulled.entries[name]
        keep = shipped.entries[name].source
        if isinstance(entry, BaseEntry):
            entry = replace(entry, path=None, files={}, variants={}, source={**keep, **entry.source})
        elif isinstance(entry, AdapterEntry):
            training = {k: v for k, v in (entry.training or {}).items() if k != "data"}
            entry = replace(entry, path=None, files={}, source=keep, training=training)
        shipped.entries[name] = entry
        print(f"{name}: refreshed")
    write_json_atomic(SOURCE, shipped.to_dict())


if __name__ == "__main__":
    main(sys.argv[1])
