"""What zoo publishes beside an entry's files: the Hub model card and ``zoo.json``."""

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
from zoo.core.records import AdapterEntry, BaseEntry, Variant
from zoo.errors import HubError, ZooError

MANIFEST = "zoo.json"
CARD = "README.md"
SKIPPED = {".gitattributes", MANIFEST}


RELATIONS = {"lora": "adapter", "qlora": "adapter", "bottleneck": "adapter",
             "merged": "merge", "variant": "quantized"}


def model_card(entry: AdapterEntry | BaseEntry, base: BaseEntry | None,
               variant: Variant | None = None) -> str:
    """The Hub model card: the Hub's own metadata fields in YAML (``base_model`` as a Hub
    id, so the Hub's model tree links it; ``base_model_relation``, ``library_name``,
    ``pipeline_tag``, license, tags), then what zoo knows. ``base``: the model it was made
    from (an adapter's base, a merged model's parent, a variant's own base)."""
    from huggingface_hub import ModelCardData

    kind = "variant" if variant is not None else entry.kind
    hub_base = base.hub_id if base is not None else None
    license_ = (base.hub or {}).get("license") if base is not None else None
    if isinstance(entry, BaseEntry) and variant is None and entry.kind == "base":
        hub_base, license_ = None, (entry.hub or {}).get("license")  # a base is no one's child
    adapter = isinstance(entry, AdapterEntry)
    tags = ["zoo", *([entry.kind] if adapter else []),
            *(["lora"] if adapter and entry.kind != "bottleneck" else []),
            *(["merge"] if kind == "merged" else []),
            *(["quantized", variant.scheme] if variant is not None else [])]
    data = ModelCardData(
        base_model=hub_base, base_model_relation=RELATIONS.get(kind) if hub_base else None,
        library_name="peft" if adapter and entry.kind != "bottleneck" else (
            None if adapter else "transformers"),
        pipeline_tag="text-generation", license=license_, tags=tags)
    rows = _adapter_rows(entry) if adapter else _model_rows(entry, variant)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v not in (None, ""))
    what = {"variant": f"The {variant.scheme if variant else ''} quantized form of {entry.name}",
            "merged": f"{entry.name}: adapters folded into {entry.base}",
            "base": f"The base model {entry.name}"}.get(kind, f"A {entry.kind} adapter")
    return (f"---\n{data.to_yaml()}\n---\n\n# {entry.name}\n\n{what}, catalogued and "
            f"published by zoo. `zoo pull` checks every file against `{MANIFEST}` before "
            f"registering it.\n\n| | |\n|---|---|\n{table}\n")


def _adapter_rows(entry: AdapterEntry) -> list[tuple[str, Any]]:
    training = entry.training or {}
    return [("kind", entry.kind), ("base", f"{entry.base} ({entry.base_hash})"),
            ("version", entry.version), ("trained on", f"the {entry.base_variant} base"),
            ("rank" if entry.kind != "bottleneck" else "bottleneck size", entry.rank),
            ("alpha", entry.alpha), ("target modules", ", ".join(entry.target_modules)),
            ("trainable parameters", f"{entry.trainable_params} "
                                     f"({entry.percent_of_base}% of the base)"),
            ("training data", training.get("data_sha256") or entry.source.get("data_sha256")),
            ("servable by vLLM", "yes" if entry.servable else f"no: {entry.servable_reason}")]


def _model_rows(entry: BaseEntry, variant: Variant | None) -> list[tuple[str, Any]]:
    rows = [("architecture", entry.architecture), ("parameters", entry.parameters),
            ("layers", entry.num_layers), ("hidden size", entry.hidden_size),
            ("weights", entry.dtype if variant is None else variant.scheme),
            ("content hash", entry.content_hash if variant is None else variant.content_hash)]
    if entry.kind == "merged":
        adapters = entry.source.get("adapters") or []
        rows.append(("merged from", ", ".join(f"{a.get('name')} x{a.get('weight')}"
                                              for a in adapters if isinstance(a, dict))))
    if variant is not None:
        rows.append(("quantization", json.dumps(variant.quantization)[:300]))
    return rows


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


def manifest(entry: AdapterEntry | BaseEntry, files: dict[str, dict[str, Any]],
             variant: Variant | None = None) -> dict[str, Any]:
    """``zoo.json``: the entry as this zoo knows it (no local paths) and every file's hash."""
    if isinstance(entry, AdapterEntry):
        portable = replace(entry, path=None, hub=None, versions={}, aliases={}, canary=None,
                           history=[]).to_dict()
    else:
        portable = replace(entry, path=None, variants={}, evaluations={}).to_dict()
        if variant is not None:
            portable["variant"] = variant.scheme
    return {"format": "zoo-hub", "format_version": 1, "entry": portable, "files": files}


def adopt_hub_files(registry: Registry, entry: AdapterEntry,
                    base: BaseEntry) -> AdapterEntry:
    """Make the stored adapter what PEFT, transformers and the Hub expect, so the registry
    and the Hub hold the same files (and content hash) on every machine: README.md is the
    Hub card, and the config names the base by its Hub id when the base has one (PEFT's
    AutoPeftModel loads the base by that name)."""
    stored = registry.home / entry.path
    changed = _write_if_other(stored / CARD, model_card(entry, base).encode())
    if base.hub_id:
        config_name = CONFIG_FILES.get(entry.kind)
        config = json.loads((stored / config_name).read_text())
        key = "base_model" if entry.kind == "bottleneck" else "base_model_name_or_path"
        if config.get(key) != base.hub_id:
            config[key] = base.hub_id
            changed |= _write_if_other(stored / config_name,
                                       (json.dumps(config, indent=2) + "\n").encode())
    if not changed:
        return entry
    with registry.edit() as catalog:
        files = hash_tree(stored)
        current = catalog.adapter(entry.name)
        entry = replace(entry, files=files, content_hash=content_hash(files))
        if current.version == entry.version:
            catalog.entries[entry.name] = replace(current, files=files,
                                                  content_hash=entry.content_hash)
        else:
            catalog.entries[entry.name] = replace(current, versions={
                **current.versions, entry.version: entry})
    return entry


CONFIG_FILES = {"lora": "adapter_config.json", "qlora": "adapter_config.json",
                "bottleneck": "zoo_adapter.json"}


def _write_if_other(path: Path, data: bytes) -> bool:
    if path.exists() and file_hash(path) == sha256_bytes(data):
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True
