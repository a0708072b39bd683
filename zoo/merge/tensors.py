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
COPY_CHUNK = 8 * 1024**2  # bytes copied through at a time


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

    def raw(self, name: str, chunk: int = COPY_CHUNK) -> Iterator[bytes]:
        """The tensor's stored bytes, in pieces of at most ``chunk`` bytes."""
        start, end = self.header[name]["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(8 + self._header_len + start)
            left = end - start
            while left:
                piece = f.read(min(chunk, left))
                if not piece:
                    raise OSError(f"{self.path}: {name} is truncated")
                left -= len(piece)
                yield piece

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read straight into its own memory (one copy, no memory map)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=self.dtype(name))
        if end > start:
            with open(self.path, "rb") as f:
                f.seek(8 + self._header_len + start)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - start:
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

    def raw(self, name: str) -> Iterator[bytes]:
        return self._where[name].raw(name)

    def path_of(self, name: str) -> Path:
        return self._where[name].path

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
    make: Callable[[], torch.Tensor | Iterable[bytes]]
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
            value = t.make()
            pieces = [_tensor_bytes(value, t)] if isinstance(value, torch.Tensor) else value
            written = 0
            for piece in pieces:
                f.write(piece)
                written += len(piece)
            if written != t.nbytes:
                raise ValueError(f"{t.name}: made {written} bytes, planned {t.nbytes}")
            del value, pieces
            progress(t.name)


def _tensor_bytes(value: torch.Tensor, planned: PlannedTensor) -> memoryview:
    """The tensor's bytes, without copying them."""
    if tuple(value.shape) != planned.shape or value.dtype != planned.dtype:
        raise ValueError(f"{planned.name}: made {value.dtype}{list(value.shape)}, planned "
                         f"{planned.dtype}{list(planned.shape)}")
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
            if not want[name].computed:
                continue
            value = reader.get(name)
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"{path.name}: tensor {name} has NaN or Inf")
    if seen != set(want):
        raise ValueError(f"tensors missing from the output: {sorted(set(want) - seen)[:3]}")
