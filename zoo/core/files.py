"""File-level facts without loading a framework: hashes and safetensors headers."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from zoo.core.process import identity
from zoo.core.tables import SAFETENSORS_BYTES, numel
from zoo.errors import FormatError

HASH_PREFIX = "sha256:"
_CHUNK = 1 << 20
# safetensors' own limit on a header is 100 MB; anything bigger is not a header.
_MAX_HEADER = 100_000_000



def sha256_file(path: Path) -> str:
    """``'sha256:<hex>'`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return HASH_PREFIX + digest.hexdigest()


def read_ahead(paths: Iterable[Path]) -> None:
    """Ask the kernel to read ``paths`` into the page cache in the background
    (``POSIX_FADV_WILLNEED``), without waiting for it. A file that cannot be opened is
    skipped: whoever reads it next says why."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


def list_files(root: Path) -> list[str]:
    """Every regular file under ``root`` as a sorted relative POSIX path; symbolic links
    are not followed and not listed."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def find_links(root: Path) -> list[str]:
    """Symbolic links under ``root`` (files and folders), as relative paths."""
    found = []
    for dirpath, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            if (Path(dirpath) / name).is_symlink():
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def hash_tree(root: Path) -> dict[str, dict[str, object]]:
    """``{relative path: {"sha256": ..., "size": ...}}`` for every file under root."""
    return {
        rel: {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in list_files(root)
    }


def content_hash(files: dict[str, dict[str, object]]) -> str:
    """One hash for a set of files: their names and hashes, in name order."""
    lines = "".join(f"{name}\0{files[name]['sha256']}\n" for name in sorted(files))
    return sha256_bytes(lines.encode())


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file: ``{name: {"dtype", "shape", ...}}``.

    Reads only the header, checks that every tensor lies inside the file, and
    raises FormatError for anything that is not a well-formed safetensors file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError("shorter than a header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError("header length is past the end of the file")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist", path=str(path)) from None
    except RecursionError:
        raise FormatError(f"{path} is not a valid safetensors file (its header nests too deep)",
                          path=str(path), hint="Re-create or re-download the file.") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise FormatError(f"{path} is not a valid safetensors file ({exc})", path=str(path),
                          hint="Re-create or re-download the file.") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path} is not a valid safetensors file", path=str(path))
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            expected = numel(info["shape"]) * SAFETENSORS_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name} has a malformed header entry",
                              path=str(path)) from None
        if not 0 <= start <= end <= data_len or end - start != expected:
            raise FormatError(f"{path}: tensor {name} lies outside the file (truncated?)",
                              path=str(path), hint="Re-create or re-download the file.")
    return header


# Floating dtypes as (unsigned view, exponent mask): a value is NaN or inf exactly when all
# its exponent bits are set, so a check needs no float type numpy lacks (bf16, fp8).
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000),
             "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def nonfinite_tensors(path: Path) -> list[str]:
    """Names of the tensors in a safetensors file that hold a NaN or an infinity."""
    import numpy as np

    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        base = 8 + header_len
        bad = []
        for name, info in sorted(header.items()):
            if info["dtype"] not in _EXPONENT:
                continue
            view, mask = _EXPONENT[info["dtype"]]
            start, end = info["data_offsets"]
            f.seek(base + start)
            values = np.frombuffer(f.read(end - start), dtype=view)
            if np.any((values & mask) == mask):
                bad.append(name)
    return bad


def tensor_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape across one or more safetensors files."""
    shapes: dict[str, tuple[int, ...]] = {}
    for p in paths:
        for name, info in read_safetensors_header(p).items():
            shapes[name] = tuple(info["shape"])
    return shapes


def count_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(numel(shape) for shape in shapes.values())


def load_json(path: Path, what: str) -> dict:
    """Read a JSON object, turning every way it can fail into one FormatError."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{what} not found: {path}", path=str(path)) from None
    except (ValueError, RecursionError) as exc:  # ValueError: a number of over 4,300 digits too
        raise FormatError(f"{what} {path} is not valid JSON ({type(exc).__name__})",
                          path=str(path), hint="Fix or re-create the file.") from None
    if not isinstance(data, dict):
        raise FormatError(f"{what} {path} must hold a JSON object", path=str(path))
    return data


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, rename it over."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write bytes to a temporary file beside ``path``, fsync it, rename it over."""
    tmp = path.with_name(f".{path.name}.pid{identity()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
