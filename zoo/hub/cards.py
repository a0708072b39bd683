"""What zoo publishes beside an adapter's files: the Hub model card and ``zoo.json``."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from zoo.catalog.integrity import file_hash
from zoo.catalog.registry import Registry
from zoo.core.files import content_hash, hash_tree, sha256_bytes
from zoo.core.records import AdapterEntry

MANIFEST = "zoo.json"
CARD = "README.md"
SKIPPED = {".gitattributes", MANIFEST}


def model_card(entry: AdapterEntry) -> str:
    """The Hub model card of an adapter: Hub metadata in YAML, then what zoo knows."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=entry.base,
                         library_name="peft" if entry.kind in ("lora", "qlora") else None,
                         tags=["zoo", entry.kind, *([] if entry.kind == "bottleneck" else ["lora"])])
    training = entry.training or {}
    rows = [("kind", entry.kind), ("base", f"{entry.base} ({entry.base_hash})"),
            ("trained on", f"the {entry.base_variant} base"),
            ("rank" if entry.kind != "bottleneck" else "bottleneck size", entry.rank),
            ("alpha", entry.alpha), ("target modules", ", ".join(entry.target_modules)),
            ("trainable parameters", f"{entry.trainable_params} "
                                     f"({entry.percent_of_base}% of the base)"),
            ("training data", training.get("data_sha256") or entry.source.get("data_sha256")),
            ("servable by vLLM", "yes" if entry.servable else f"no: {entry.servable_reason}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    return (f"---\n{data.to_yaml()}\n---\n\n# {entry.name}\n\nA {entry.kind} adapter catalogued "
            f"and published by [zoo](https://zoo.invalid). `zoo pull` checks every file against "
            f"`{MANIFEST}` before registering it.\n\n| | |\n|---|---|\n{table}\n")


def manifest(entry: AdapterEntry) -> dict[str, Any]:
    portable = replace(entry, path=None, hub=None).to_dict()
    return {"format": "zoo-hub", "format_version": 1, "entry": portable, "files": entry.files}


def adopt_card(registry: Registry, entry: AdapterEntry) -> AdapterEntry:
    """Make the stored README.md the Hub card, so the registry and the Hub hold the
    same files (and the same content hash) on every machine."""
    card = model_card(entry).encode()
    stored = registry.home / entry.path
    if (stored / CARD).exists() and file_hash(stored / CARD) == sha256_bytes(card):
        return entry
    tmp = stored / f".{CARD}.tmp"
    tmp.write_bytes(card)
    os.replace(tmp, stored / CARD)
    with registry.edit() as catalog:
        files = hash_tree(stored)
        entry = replace(catalog.adapter(entry.name), files=files, content_hash=content_hash(files))
        catalog.entries[entry.name] = entry
    return entry
