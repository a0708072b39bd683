"""Reading and writing safetensors one tensor at a time.

safetensors' own API writes a file from a dict of tensors held in memory and
reads through a memory map (whose touched pages count as resident memory).
A merge streams: each tensor is read with a plain ``readinto``, transformed,
and written straight after a header that was computed up front, so the peak
memory is about the largest tensor, not the model. The files are checked
afterwards with safetensors' own loader.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.core.files import read_safetensors_header
from zoo.core.tables import SAFETENSORS_TORCH, numel

TORCH_DTYPES = {code: getattr(torch, name) for code, name in SAFETENSORS_TORCH.items()}
ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
COPY_CHUNK = 1024**2  # bytes copied through (or checked) at a time: the peak grows by twice this


class TensorFile:
    """One safetensors file opened for reading single tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (self._header_len,) = struct.unpack("<Q", f.read(8))
        self.header = read_safetensors_header(self.path)

    def names(self) -> list[str]:
        return sorted(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self.header[name]["dtype"]]

    def raw(self, name: str, chunk: int = COPY_CHUNK) -> Iterator[memoryview]:
        """The tensor's stored bytes, in pieces of at most ``chunk`` bytes, read into one
        buffer: each piece is valid until the next one is asked for."""
        start, end = self.header[name]["data_offsets"]
        left = end - start
        if not left:
            return
        buffer = memoryview(bytearray(min(chunk, left)))
        with open(self.path, "rb") as f:
            f.seek(8 + self._header_len + start)
            while left:
                got = f.readinto(buffer[:min(chunk, left)])
                if not got:
                    raise OSError(f"{self.path}: {name} is truncated")
                left -= got
                yield buffer[:got]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read straight into its own memory (one copy, no memory map)."""
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 0)

    def row_blocks(self, name: str, max_bytes: int = COPY_CHUNK) -> Iterator[torch.Tensor]:
        """The tensor, a block of rows (first dimension) of at most ``max_bytes`` at a time
        (one row at least); a scalar is one block."""
        shape = self.shape(name)
        if not shape:
            yield self.get(name)
            return
        start, end = self.header[name]["data_offsets"]
        step = max(1, max_bytes // max(1, (end - start) // max(1, shape[0])))
        for first in range(0, shape[0], step):
            yield self.rows(name, first, min(first + step, shape[0]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor, read into their own memory."""
        info = self.header[name]
        shape = list(info["shape"])
        begin, end = info["data_offsets"]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else end - begin
        if shape:
            shape[0] = stop - start
        tensor = torch.empty(shape, dtype=self.dtype(name))
        size = tensor.numel() * tensor.element_size()
        if size:
            with open(self.path, "rb") as f:
                f.seek(8 + self._header_len + begin + start * row_bytes)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != size:
                    raise OSError(f"{self.path}: {name} is truncated")
        return tensor


class TensorSource:
    """All the tensors of a model directory, across its shards."""

    def __init__(self, model_dir: Path):
        self.files = [TensorFile(p) for p in sorted(Path(model_dir).glob("*.safetensors"))]
        self._where = {name: f for f in self.files for name in f.header}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def raw(self, name: str) -> Iterator[memoryview]:
        return self._where[name].raw(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].rows(name, start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].dtype(name)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor of the output: its name, dtype and shape, and how to make it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor | Iterable[bytes | memoryview]]
    computed: bool = True  # False: bytes copied verbatim (in pieces) from a checked source

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def shard(planned: list[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (one tensor minimum)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_shards(planned: list[PlannedTensor], out: Path, max_bytes: int,
                 metadata: dict[str, str] | None = None,
                 progress: Callable[[str], None] = lambda _: None) -> dict:
    """Write ``model-XXXXX-of-YYYYY.safetensors`` files and their index; return the index."""
    groups = shard(planned, max_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_file(group, out / name, metadata, progress)
        for t in group:
            weight_map[t.name] = name
            total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_file(tensors: Iterable[PlannedTensor], path: Path,
               metadata: dict[str, str] | None = None,
               progress: Callable[[str], None] = lambda _: None) -> None:
    """One safetensors file: the header from the plan, then each tensor as it is made."""
    tensors = list(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw_header)))
        f.write(raw_header)
        for t in tensors:
            pieces = t.make()
            if isinstance(pieces, torch.Tensor):
                if tuple(pieces.shape) != t.shape or pieces.dtype != t.dtype:
                    raise ValueError(f"{t.name}: made {pieces.dtype}{list(pieces.shape)}, "
                                     f"planned {t.dtype}{list(t.shape)}")
                pieces = [tensor_bytes(pieces)]
            written = 0
            for piece in pieces:
                f.write(piece)
                written += len(piece)
            if written != t.nbytes:
                raise ValueError(f"{t.name}: made {written} bytes, planned {t.nbytes}")
            del pieces
            progress(t.name)


def tensor_bytes(value: torch.Tensor) -> memoryview:
    """The tensor's bytes, without copying them (a contiguous tensor)."""
    flat = value.contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def check_written(out: Path, planned: list[PlannedTensor]) -> None:
    """Reopen what was written: safetensors' own reader must agree with the plan on
    every name, dtype and shape, and no computed tensor may hold NaN or Inf."""
    from safetensors import safe_open

    want = {t.name: t for t in planned}
    seen = set()
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                got = f.get_slice(name)
                t = want[name]
                if tuple(got.get_shape()) != t.shape or got.get_dtype() != ST_DTYPES[t.dtype]:
                    raise ValueError(f"{path.name}: {name} was written wrongly")
                seen.add(name)
        reader = TensorFile(path)  # plain reads: no memory map swelling the resident set
        for name in reader.names():
            if not want[name].computed or not reader.dtype(name).is_floating_point:
                continue
            if not all(torch.isfinite(rows).all() for rows in reader.row_blocks(name)):
                raise ValueError(f"{path.name}: tensor {name} has NaN or Inf")
    if seen != set(want):
        raise ValueError(f"tensors missing from the output: {sorted(set(want) - seen)[:3]}")
