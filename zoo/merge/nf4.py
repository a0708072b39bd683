"""NF4 (QLoRA's 4-bit format, double quantization included) back to 16 bits, in torch.

bitsandbytes' saved layout, per quantized weight ``W``::

    W.weight                                uint8 [n/2, 1]   two 4-bit codes per byte, high nibble first
    W.weight.quant_map                      float32 [16]     the NF4 code book
    W.weight.absmax                         uint8 [n/64]     block scales, 8-bit quantized (double quant)
    W.weight.nested_quant_map               float32 [256]    their code book
    W.weight.nested_absmax                  float32 [n/64/256] their block scales
    W.weight.quant_state.bitsandbytes__nf4  uint8 (JSON)     shape, dtype, blocksizes, nested_offset

value = quant_map[code] * (nested_quant_map[absmax] * nested_absmax + nested_offset),
computed in float32 and rounded once to the stored dtype: bitsandbytes'
``dequantize_4bit`` arithmetic, so the result is the same to the bit (tested).
Reading the tensors needs no bitsandbytes: a merge also runs where its native
library does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from zoo.core.tables import DTYPES, is_count, numel, torch_dtype
from zoo.errors import FormatError

STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", STATE_SUFFIX)


@dataclass(frozen=True)
class NF4State:
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    nested_blocksize: int | None
    nested_offset: float | None


def quantized_weights(names) -> list[str]:
    """The weights (``...weight``) stored as NF4 in a set of tensor names."""
    return sorted(n[: -len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX))


def is_aux(name: str) -> bool:
    return name.endswith(AUX_SUFFIXES)


FLOATS = tuple(torch_dtype(name) for name in sorted(set(DTYPES.values())))
MAX_BLOCKSIZE = 2**16  # bitsandbytes makes 32 to 4096


def read_state(raw: torch.Tensor, weight: str) -> NF4State:
    """A weight's quant state (JSON in a uint8 tensor), every field checked."""
    try:
        state = json.loads(bytes(raw.to(torch.uint8).tolist()))
        if state["quant_type"] != "nf4":
            raise FormatError(f"{weight} is {state['quant_type']}, not nf4")
        shape, blocksize = tuple(state["shape"]), state["blocksize"]
        nested_blocksize, nested_offset = state.get("nested_blocksize"), state.get("nested_offset")
        dtype = torch_dtype(state["dtype"].removeprefix("torch."))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{weight}: unreadable NF4 quant state ({exc})") from None
    if not shape or not all(is_count(d) for d in shape):
        raise FormatError(f"{weight}: NF4 shape {list(shape)[:8]} is not a list of positive integers")
    for name, size in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if (size is not None or name == "blocksize") and not (is_count(size) and size <= MAX_BLOCKSIZE):
            raise FormatError(f"{weight}: NF4 {name} {size!r} is not an integer in 1..{MAX_BLOCKSIZE}")
    if nested_blocksize is not None and not (
            isinstance(nested_offset, int | float) and not isinstance(nested_offset, bool)
            and math.isfinite(nested_offset)):
        raise FormatError(f"{weight}: NF4 nested_offset {nested_offset!r} is not a finite number")
    return NF4State(shape, dtype, blocksize, nested_blocksize,
                    None if nested_blocksize is None else float(nested_offset))


def state_of(source, weight: str) -> NF4State:
    """``weight``'s quant state, checked against the sizes and dtypes of its stored parts
    (nothing but their headers read), so that dequantizing cannot fail part way."""
    state = read_state(source.get(weight + STATE_SUFFIX), weight)
    n = numel(state.shape)
    blocks = -(-n // state.blocksize)
    parts = {weight: ((n + 1) // 2, (torch.uint8,)), weight + ".quant_map": (16, FLOATS),
             weight + ".absmax": (blocks, FLOATS)}
    if state.nested_blocksize is not None:
        parts.update({weight + ".absmax": (blocks, (torch.uint8,)),
                      weight + ".nested_quant_map": (256, FLOATS),
                      weight + ".nested_absmax": (-(-blocks // state.nested_blocksize), FLOATS)})
    for name, (size, dtypes) in parts.items():
        if name not in source:
            raise FormatError(f"{weight}: the NF4 part {name} is missing")
        if numel(source.shape(name)) != size or source.dtype(name) not in dtypes:
            raise FormatError(f"{name} is {source.dtype(name)} {list(source.shape(name))}, where "
                              f"the quant state (shape {list(state.shape)}) needs {size} values "
                              f"of {' or '.join(str(d) for d in dtypes)}")
    return state


def dequantize_nf4(packed: torch.Tensor, quant_map: torch.Tensor, absmax: torch.Tensor,
                   state: NF4State, nested_quant_map: torch.Tensor | None = None,
                   nested_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """One weight back to ``state.dtype`` (bf16 for QLoRA), exactly as bitsandbytes does."""
    n = numel(state.shape)
    if state.nested_blocksize is not None:
        absmax = _dequantize_blockwise(absmax, nested_quant_map, nested_absmax,
                                       state.nested_blocksize) + state.nested_offset
    absmax = absmax.float()
    flat = packed.reshape(-1).to(torch.int64)
    codes = torch.empty(flat.numel() * 2, dtype=torch.int64)
    codes[0::2] = flat >> 4
    codes[1::2] = flat & 0xF
    values = quant_map.float()[codes[:n]]
    full = n - n % state.blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, state.blocksize)
                  * absmax[: full // state.blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // state.blocksize]
    return out.reshape(state.shape).to(state.dtype)


def _dequantize_blockwise(codes: torch.Tensor, code_book: torch.Tensor, absmax: torch.Tensor,
                          blocksize: int) -> torch.Tensor:
    values = code_book.float()[codes.reshape(-1).to(torch.int64)]
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)
                  ).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out


def dequantize_from(source, weight: str) -> torch.Tensor:
    """Dequantize ``weight`` reading its parts from a TensorSource."""
    state = state_of(source, weight)
    nested = state.nested_blocksize is not None
    return dequantize_nf4(
        source.get(weight), source.get(weight + ".quant_map"), source.get(weight + ".absmax"),
        state, source.get(weight + ".nested_quant_map") if nested else None,
        source.get(weight + ".nested_absmax") if nested else None)
