"""What zoo publishes beside an adapter's files: the Hub model card and ``zoo.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zoo.catalog.home import validate_name
from zoo.catalog.integrity import ORIGINAL, file_hash
from zoo.catalog.registry import Registry
from zoo.core.files import content_hash, hash_tree, sha256_bytes
from zoo.core.records import AdapterEntry
from zoo.errors import HubError, ZooError

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


@dataclass(frozen=True)
class Manifest:
    """What zoo takes from a repo's ``zoo.json``: file hashes and the base to check
    against. Everything in it is untrusted; the name it claims is never used."""

    files: dict[str, dict[str, Any]]
    base: str | None  # an adapter's base, a merged model's parent (None: a plain base)
    base_variant: str
    base_hash: str | None
    training: dict[str, Any] | None
    kind: str = "lora"


_SCALARS = (str, int, float, bool, type(None))
_MAX_MANIFEST = 4 * 1024 * 1024


def read_manifest(path: Path, repo: str) -> Manifest:
    """Parse and bound a ``zoo.json``; HubError with what is wrong when it is malformed."""
    try:
        if path.stat().st_size > _MAX_MANIFEST:
            raise ValueError("larger than 4 MiB")
        data = json.loads(path.read_text())
        entry, files = data["entry"], data["files"]
        if not isinstance(entry, dict) or not isinstance(files, dict):
            raise ValueError("'entry' and 'files' must be objects")
        for rel, info in files.items():
            if not (isinstance(rel, str) and isinstance(info, dict)
                    and isinstance(info.get("sha256"), str) and isinstance(info.get("size"), int)):
                raise ValueError(f"file record {str(rel)[:60]!r} is malformed")
        kind = entry.get("kind")
        if kind not in ("lora", "qlora", "bottleneck", "base", "merged"):
            raise ValueError(f"kind {str(kind)[:20]!r} is not one zoo knows")
        base = entry.get("base")
        if base is not None or kind not in ("base", "merged"):
            validate_name(base)
        variant = entry.get("base_variant", ORIGINAL)
        if variant not in (ORIGINAL, "nf4"):
            raise ValueError(f"base_variant {str(variant)[:20]!r} is not original or nf4")
        base_hash = entry.get("base_hash")
        training = entry.get("training")
        if not (isinstance(training, dict) and all(
                isinstance(k, str) and isinstance(v, _SCALARS) for k, v in training.items())):
            training = None  # recorded facts only; a malformed record is dropped, not kept
    except (OSError, ValueError, KeyError, TypeError, RecursionError, ZooError) as exc:
        raise HubError(f"{repo}: its {MANIFEST} is malformed ({exc}); nothing was registered",
                       hint="Ask its publisher to push it again with 'zoo push'.") from None
    return Manifest(files=files, base=base, base_variant=variant,
                    base_hash=base_hash if isinstance(base_hash, str) else None,
                    training=training, kind=kind)


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
