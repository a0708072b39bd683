"""``zoo merge`` and ``zoo dequantize``: standalone weights, streamed and verified.

Everything that can be wrong is checked before the output is opened: kinds,
bases, hashes, shapes, the target. The output is written tensor by tensor into
a staging directory beside its destination, verified (safetensors' own reader,
then logits against PEFT's unmerged forward pass), and only then renamed into
place or registered as a new base of kind ``merged``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from zoo.catalog.home import new_stage, publish_dir, validate_name
from zoo.catalog.integrity import ORIGINAL, require_intact, variant_path
from zoo.catalog.registry import Registry
from zoo.catalog.store import register_base
from zoo.core.measure import return_large_frees
from zoo.core.records import AdapterEntry, BaseEntry
from zoo.core.tables import DTYPES, TOKENIZER_FILES
from zoo.errors import BaseMismatch, DuplicateEntry, NotSupported, OutputExists

QloraBase = Literal["dequantized", "original"]
Verify = Literal["modules", "full", "none"]
DEFAULT_SHARD_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class MergeOptions:
    adapters: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    out: Path | None = None
    name: str | None = None
    dtype: str | None = None  # bf16 | fp16 | fp32; default: the base's own
    qlora_base: QloraBase = "dequantized"
    force: bool = False
    verify: Verify = "modules"  # streamed, per module; "full": also end-to-end logits
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


@dataclass
class MergeResult:
    path: Path
    entry: BaseEntry | None
    scales: dict[str, float]
    verification: dict | None = None
    tensors: dict[str, int] = field(default_factory=dict)


def merge(options: MergeOptions, registry: Registry | None = None,
          log: Callable[[str], None] = lambda _: None) -> MergeResult:
    """Fold one or more adapters into their base and write a standalone model."""
    registry = registry or Registry()
    plan = _plan(options, registry)
    return _execute(plan, options, registry, log)


def dequantize(base_ref: str, out: Path | None = None, name: str | None = None,
               dtype: str | None = None, force: bool = False, registry: Registry | None = None,
               log: Callable[[str], None] = lambda _: None) -> MergeResult:
    """Write the 16-bit form of a base's NF4 variant (``BASE@nf4``) on its own."""
    from zoo.catalog.home import split_variant

    registry = registry or Registry()
    base_name, variant = split_variant(base_ref)
    if variant != "nf4":
        raise NotSupported(f"{base_ref!r} is not an NF4 variant", hint="Use BASE@nf4.")
    base = registry.load().base(base_name)
    options = MergeOptions(adapters=(), out=out, dtype=dtype, force=force,
                           name=name or (None if out else f"{base_name}-nf4-dequantized"))
    plan = _Plan(base=base, source_variant="nf4", adapters=[], target=_target(options, registry),
                 dtype=_dtype(options.dtype, base), name=options.name)
    return _execute(plan, options, registry, log)


@dataclass
class _Plan:
    base: BaseEntry
    source_variant: str
    adapters: list[tuple[AdapterEntry, Path, float]]
    target: Path | None
    dtype: str
    name: str | None
    untied_lm_head: bool = False


def _plan(options: MergeOptions, registry: Registry) -> _Plan:
    if not options.adapters:
        raise NotSupported("no adapter given", hint="Pass --adapter NAME (repeatable).")
    entries, weights, base = adapters_of_one_base(registry.load(), options.adapters,
                                                  options.weights)
    for entry in entries:
        if entry.kind == "bottleneck":
            raise NotSupported(
                f"{entry.name!r} is a bottleneck adapter: its nonlinearity cannot be folded "
                "into the base weights",
                hint=f"Run it unmerged with 'zoo generate --adapter {entry.name}', or keep it "
                     "as a separate adapter.")
        details = entry.lora
        if details and (details.lora_bias or details.bias != "none"):
            raise NotSupported(f"{entry.name!r} trains biases; zoo merges weight updates only")
    dora = [e.name for e in entries if e.lora and e.lora.use_dora]
    if dora and len(entries) > 1:
        raise NotSupported(f"DoRA adapter {dora[0]!r} can only be merged on its own")
    kinds = {e.kind for e in entries}
    if "qlora" in kinds and options.qlora_base == "dequantized" and "lora" in kinds:
        raise NotSupported("LoRA and QLoRA adapters fold into different base weights",
                           hint="Merge them separately, or pass --qlora-base original.")
    source = "nf4" if "qlora" in kinds and options.qlora_base == "dequantized" else ORIGINAL
    variant_path(registry, base, source)  # intact, before anything is written
    resolved = [(e, require_intact(registry, e), w) for e, w in zip(entries, weights, strict=True)]
    name = options.name
    if options.out is None and name is None:
        if len(entries) > 1:
            raise NotSupported("several adapters need --name (or --out) for the result")
        name = f"{entries[0].name}-merged"
    return _Plan(base, source, resolved, _target(options, registry, name), _dtype(options.dtype, base),
                 name)


def adapters_of_one_base(catalog, names, weights=None
                         ) -> tuple[list[AdapterEntry], tuple[float, ...], BaseEntry]:
    """The entries of ``names``, one weight each (1 by default), and the one base they all
    belong to, in the version they were registered against."""
    weights = weights or tuple(1.0 for _ in names)
    if len(weights) != len(names):
        raise NotSupported(f"{len(weights)} weights for {len(names)} adapters",
                           hint="Give one --weights value per --adapter, comma-separated.")
    if not all(math.isfinite(w) for w in weights):
        raise NotSupported(f"weights {', '.join(map(str, weights))}: each must be a finite number")
    if not any(weights):  # a merge of nothing: the base itself, under another name
        raise NotSupported("every weight is 0: the result would be the base unchanged",
                           hint="Give at least one adapter a weight other than 0.")
    from zoo.catalog.versions import SEPARATOR, resolve

    entries = [resolve(catalog, name) if SEPARATOR in name else catalog.adapter(name)
               for name in names]
    bases = {e.base for e in entries}
    if len(bases) != 1:
        raise BaseMismatch(f"the adapters belong to different bases: {', '.join(sorted(bases))}")
    base = catalog.base(bases.pop())
    for entry in entries:
        if entry.base_hash != base.content_hash:
            raise BaseMismatch(f"{entry.name!r} was registered against another version of "
                               f"{base.name!r} (base hash differs)")
    return entries, tuple(weights), base


def _dtype(requested: str | None, base: BaseEntry) -> str:
    dtype = DTYPES.get(requested or base.dtype)
    if dtype is None:
        raise NotSupported(f"unknown dtype {requested!r}", hint="Use bf16, fp16 or fp32.")
    return dtype


def _target(options: MergeOptions, registry: Registry, name: str | None = None) -> Path | None:
    """The output directory when --out is given; refuse an existing one without --force."""
    name = name or options.name
    if name is not None:
        validate_name(name)
        if name in registry.load().entries and not options.force and options.out is None:
            raise DuplicateEntry(name)
    if options.out is None:
        return None
    out = Path(options.out).absolute()
    if out.exists() and not options.force:
        raise OutputExists(str(out))
    return out


def _execute(plan: _Plan, options: MergeOptions, registry: Registry,
             log: Callable[[str], None]) -> MergeResult:
    from zoo.merge.lora import LoraFile
    from zoo.merge.stream import plan_tensors
    from zoo.merge.tensors import TensorSource, check_written, write_shards
    from zoo.merge.verify import ModuleCheck, real_activations

    return_large_frees()  # per-tensor buffers go back to the system as the stream moves on
    source_dir = variant_path(registry, plan.base, plan.source_variant)
    original_dir = variant_path(registry, plan.base, ORIGINAL)
    stage = new_stage(plan.target.parent if plan.target else registry.home / "tmp", ".zoo-merge")
    try:
        source = TensorSource(source_dir)
        loras = [LoraFile.open(e.name, path, w) for e, path, w in plan.adapters]
        check = None
        if options.verify != "none" and loras:
            log("verifying each merged weight against PEFT's LoRA layer as it is written")
            check = ModuleCheck(loras, plan.dtype, real_activations(source, original_dir))
        planned, scales, plan.untied_lm_head = plan_tensors(source, loras, plan.dtype, check)
        log(f"writing {len(planned)} tensors ({plan.dtype}) from {plan.base.name}"
            f"{'@nf4 (dequantized)' if plan.source_variant == 'nf4' else ''}"
            f" + {len(plan.adapters)} adapter(s)")
        index = write_shards(planned, stage, options.max_shard_bytes)
        check_written(stage, planned)
        _write_config(original_dir, stage, plan)
        for name in TOKENIZER_FILES:
            if (original_dir / name).exists():
                shutil.copyfile(original_dir / name, stage / name)
        verification = check.report() if check else None
        if options.verify == "full":
            from zoo.merge.verify import verify_full

            log("verifying end to end: merged model against base + adapters (PEFT, unmerged)")
            verification = {"modules": verification,
                            **verify_full(stage, source_dir, original_dir, plan)}
        _write_card(stage, plan, scales, verification, index)
        result = MergeResult(stage, None, scales, verification,
                             {"total_size": index["metadata"]["total_size"]})
        if plan.target is not None:
            aside = publish_dir(stage, plan.target)  # the old output, kept until now
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            result.path = plan.target
        if plan.name is not None and options.out is None:
            source = {"type": "merge", "from": plan.base.name,
                      "base_variant": plan.source_variant,
                      "adapters": [{"name": e.name, "content_hash": e.content_hash,
                                    "weight": w} for e, _p, w in plan.adapters],
                      "scales": scales, "verification": verification}
            result.entry = register_base(registry, stage, plan.name, source, kind="merged",
                                         parent=plan.base.name, replace_merged=options.force)
            result.path = registry.home / result.entry.path
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _write_config(original_dir: Path, out: Path, plan: _Plan) -> None:
    config = json.loads((original_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = plan.dtype
    config.pop("torch_dtype", None)
    if plan.untied_lm_head:  # an adapter on the head or the embedding split them
        config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_card(out: Path, plan: _Plan, scales: dict, verification: dict | None,
                index: dict) -> None:
    lines = ["---", f"base_model: {plan.base.name}", "library_name: transformers",
             "tags: [zoo, merged]", "---", "", f"# {plan.name or out.name}", "",
             f"Standalone weights ({plan.dtype}) made by `zoo merge` from base "
             f"`{plan.base.name}` ({plan.base.content_hash})"
             + (" dequantized from its NF4 variant" if plan.source_variant == "nf4" else "")
             + ". No PEFT needed to load it.", "",
             "| adapter | kind | content hash | weight | scale (alpha/r) |", "|---|---|---|---|---|"]
    for entry, _path, weight in plan.adapters:
        lines.append(f"| {entry.name} | {entry.kind} | {entry.content_hash} | {weight} | "
                     f"{scales.get(entry.name, '')} |")
    lines += ["", f"Total tensor bytes: {index['metadata']['total_size']}."]
    if verification:
        lines += ["", verification_line(verification) + "."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def verification_line(v: dict) -> str:
    """One sentence on what a merge's verification found."""
    if v.get("mode") == "full":
        return (f"verified end to end against base + adapters (PEFT): max logit difference "
                f"{v['max_abs_diff']:.3g} over {v['tokens']} tokens (tolerance "
                f"{v['tolerance']:.3g})")
    return (f"verified {v['modules']} merged weights against PEFT's LoRA layer: worst "
            f"{v['worst_vs_float32_bound']:.2g}x the float32 bound, "
            f"{v['worst_vs_rounding_bound']:.2g}x the output dtype's rounding bound")
