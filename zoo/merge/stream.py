"""Which tensors a merge writes and how each one is made, decided before writing.

Every output tensor is planned (name, dtype, shape) from the source's
headers; its bytes are produced only when the writer reaches it, from the
base tensor (dequantized first when the source is NF4) and the adapters'
A and B for that module. Untouched tensors are copied through as bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from zoo.core.tables import numel
from zoo.errors import ShapeMismatch
from zoo.merge.lora import LoraFile, fold_rows, rows_per_block
from zoo.merge.nf4 import dequantize_from, is_aux, quantized_weights, state_of
from zoo.merge.tensors import PlannedTensor, TensorSource, tensor_bytes

TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


def plan_tensors(source: TensorSource, loras: list[LoraFile], dtype: str, check=None
                 ) -> tuple[list[PlannedTensor], dict[str, float], bool]:
    """``(planned tensors, scale per adapter, whether lm_head was untied)``; ``check`` is
    called with each merged weight as it is made (``verify.ModuleCheck``)."""
    out_dtype = getattr(torch, dtype)
    targets: dict[str, list[tuple[LoraFile, dict]]] = {}
    saved: dict[str, tuple[LoraFile, str]] = {}
    for lora in loras:
        for module, roles in lora.modules().items():
            targets.setdefault(module, []).append((lora, roles))
        for tensor, key in lora.saved_modules().items():
            saved[tensor] = (lora, key)
    nf4 = {w: state_of(source, w) for w in quantized_weights(source.names())}
    names = [n for n in source.names() if not is_aux(n)]
    # On a tied base, an adapter on the head or on the embedding changes one side only:
    # the output gets a head of its own, made from the original embedding.
    embedding = next((t for t in TIED_EMBEDDINGS if t in names), None)
    untied = "lm_head.weight" not in names and (
        "lm_head" in targets or (embedding is not None and embedding.removesuffix(".weight") in targets))
    if untied:
        if embedding is None:
            raise ShapeMismatch("lm_head.weight", (), (), "base (no lm_head or tied embedding)")
        names.append("lm_head.weight")

    def stored(name: str) -> str:
        return embedding if name == "lm_head.weight" and untied else name

    def base_value(name: str) -> torch.Tensor:
        name = stored(name)
        return dequantize_from(source, name) if name in nf4 else source.get(name)

    def base_rows(name: str, start: int, stop: int) -> torch.Tensor:
        return source.rows(stored(name), start, stop)

    def shape_of(name: str) -> tuple[int, ...]:
        name = stored(name)
        return tuple(nf4[name].shape) if name in nf4 else source.shape(name)

    def dtype_of(name: str) -> torch.dtype:
        stored = nf4[name].dtype if name in nf4 else source.dtype(name) if name in source \
            else out_dtype
        return out_dtype if stored.is_floating_point else stored

    for module, contributions in targets.items():
        name = module + ".weight"
        if name in names:
            _check_shapes(name, shape_of(name), contributions)

    planned = []
    covered = set()
    for name in sorted(names):
        module = name.removesuffix(".weight")
        copied = False
        if name.endswith(".weight") and module in targets:
            covered.add(module)
            rows = None if stored(name) in nf4 else base_rows
            make = _folding(name, module, targets[module], base_value, rows, out_dtype,
                            shape_of(name), check)
        elif name in saved:
            lora, key = saved[name]
            make = _saved(lora, key, out_dtype, shape_of(name))
        elif name in source and name not in nf4 and source.dtype(name) == dtype_of(name):
            make, copied = _copied(source, name), True
        else:
            make = _converted(base_value, name, dtype_of(name))
        planned.append(PlannedTensor(name, dtype_of(name), shape_of(name), make,
                                     computed=not copied))
    missing = sorted(set(targets) - covered)
    if missing:
        raise ShapeMismatch(f"{missing[0]}.weight", (), (), "base (module not found)")
    scales = {lora.name: round(lora.scale(""), 6) for lora in loras}
    return planned, scales, untied


def _check_shapes(name: str, shape: tuple[int, ...], contributions) -> None:
    """A and B must fit the base weight: found from headers, before anything is written."""
    for lora, roles in contributions:
        if "A" not in roles or "B" not in roles:
            continue
        out_f, in_f = (shape[1], shape[0]) if lora.fan_in_fan_out else shape
        a, b = lora.tensors.shape(roles["A"]), lora.tensors.shape(roles["B"])
        if a[1] != in_f:
            raise ShapeMismatch(roles["A"], (a[0], in_f), a, f"base of {lora.name}")
        if b[0] != out_f:
            raise ShapeMismatch(roles["B"], (out_f, b[1]), b, f"base of {lora.name}")


def _folding(name, module, contributions, base_value, base_rows, out_dtype, shape, check):
    """Make the merged weight block of rows by block of rows: each block is the base's rows
    in float32 plus every adapter's update for them, DoRA-rescaled, rounded once to the
    output dtype and checked while it is at hand. Where the base's rows are stored rows
    (``base_rows``: not NF4, not Conv1D's transposed layout) they are read, and the blocks
    written, one at a time: no copy of the whole weight is held. Otherwise the base is read
    whole and the output assembled before it is written."""
    def make() -> Iterator[memoryview]:
        first, roles = contributions[0]
        factors = [lora.factors(module) for lora, _roles in contributions]
        magnitude = first.tensors.get(roles["magnitude"]).float() if "magnitude" in roles \
            else None
        transposed = first.fan_in_fan_out and "embA" not in roles
        if base_rows is not None and not transposed:
            blocks = _fold_blocks(lambda rows: base_rows(name, rows.start, rows.stop),
                                  shape[0], numel(shape[1:]), module, factors, magnitude,
                                  out_dtype, check)
            for _rows, block in blocks:
                yield tensor_bytes(block)
            return
        weight = base_value(name)
        if tuple(weight.shape) != shape:
            raise ShapeMismatch(name, shape, tuple(weight.shape), "merge")
        written = torch.empty(shape, dtype=out_dtype)
        w, out = (weight.T, written.T) if transposed else (weight, written)  # rows: outputs
        for rows, block in _fold_blocks(lambda rows: w[rows], w.shape[0], w.shape[1], module,
                                        factors, magnitude, out_dtype, check):
            out[rows] = block
        yield tensor_bytes(written)
    return make


def _fold_blocks(read, count: int, width: int, module: str, factors, magnitude, out_dtype,
                 check) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, merged rows in the output dtype)``, about 256 KB of float32 at a time."""
    session = check.module(module, read(slice(0, 1))) if check is not None else None
    step = rows_per_block(width)
    for start in range(0, count, step):
        rows = slice(start, min(start + step, count))
        base = read(rows)
        merged = fold_rows(base, [(left[rows], right) for left, right in factors],
                           None if magnitude is None else magnitude[rows])
        block = merged.to(out_dtype)  # rounded once
        if session is not None:
            session.check(rows, base, merged, block)
        yield rows, block


def _saved(lora: LoraFile, key: str, out_dtype, shape):
    def make() -> torch.Tensor:
        value = lora.tensors.get(key)
        if tuple(value.shape) != shape:
            raise ShapeMismatch(key, shape, tuple(value.shape), "base")
        return value.to(out_dtype)
    return make


def _copied(source: TensorSource, name: str):
    return lambda: source.raw(name)


def _converted(base_value, name: str, dtype: torch.dtype):
    return lambda: base_value(name).to(dtype)
