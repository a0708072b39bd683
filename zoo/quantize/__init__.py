"""Quantized variants of a base: NF4 (QLoRA's base) and W8A8 int8 (vLLM on CPU).

Each variant is written to a staging directory, registered under the base
(``zoo show BASE`` lists it) and stored as ``bases/NAME@SCHEME``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from zoo.catalog.home import staging_dir
from zoo.catalog.integrity import has_intact_variant, require_intact
from zoo.catalog.registry import Registry
from zoo.catalog.store import register_variant
from zoo.core.records import Variant
from zoo.core.tables import TOKENIZER_FILES
from zoo.errors import NotSupported
from zoo.quantize.nf4 import write_nf4
from zoo.quantize.w8a8 import write_w8a8

SCHEMES = ("nf4", "w8a8")
NF4_SETTINGS = {"method": "bitsandbytes", "quant_type": "nf4", "double_quant": True,
                "blocksize": 64, "compute_dtype": "bfloat16"}
W8A8_SETTINGS = {"method": "compressed-tensors", "format": "int-quantized",
                 "weights": "int8, per output channel, symmetric",
                 "activations": "int8, dynamic per token, symmetric", "ignore": ["lm_head"]}


def quantize(base: str, scheme: str, registry: Registry | None = None,
             force: bool = False, log: Callable[[str], None] = lambda _: None,
             calibration: Path | None = None, calibrate: bool = True,
             bits: int | None = None, bits_asked: bool | None = None) -> Variant:
    """Write and register the ``scheme`` variant of ``base``; reuse an intact one
    (``bits``: w8a8's weight width, by default what this CPU computes exactly; recorded as
    asked for when given, unless ``bits_asked`` is False: zoo serve's own choice)."""
    registry = registry or Registry()
    if scheme not in SCHEMES:
        raise NotSupported(f"unknown scheme {scheme!r}", hint=f"Use one of {', '.join(SCHEMES)}.")
    entry = registry.load().base(base)
    if not force and has_intact_variant(registry, entry, scheme):
        return entry.variants[scheme]
    source = require_intact(registry, entry)
    log(f"quantizing {base} to {scheme}")
    with staging_dir(registry.home, f"{base}@{scheme}") as stage:
        if scheme == "nf4":
            details, settings = write_nf4(source, stage), NF4_SETTINGS
        else:
            details = write_w8a8(source, stage, calibrate=calibrate, calibration=calibration,
                                 bits=bits, bits_asked=bits_asked)
            settings = W8A8_SETTINGS
        _copy_tokenizer(source, stage)
        return register_variant(registry, stage, base, scheme, {**settings, **details})


def _copy_tokenizer(source: Path, stage: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists() and not (stage / name).exists():
            shutil.copyfile(source / name, stage / name)
