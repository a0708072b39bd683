"""Machine code for the CPU's multi-LoRA step (``lora_kernel.cpp``) and for the int8
base's linears where oneDNN's are slow (``int8_gemm.cpp``, used by ``cpu_int8.py``),
built here, once.

zoo's LoRA kernel (every ``fast_lora.py`` step with adapters) is a small C++ file with no
dependency but a C++ compiler: built on first use with ``-O3 -march=native`` (AVX-512
BF16 where the CPU has it, plain vectorized loops elsewhere), cached on disk under a
name that hashes the source, the compiler, its flags and the CPU's features, and called
through ``ctypes``. Where no compiler works, ``kernel()`` is None and fast_lora runs the
same arithmetic in PyTorch, slower, after one warning.

Why not ``torch.compile``, which zoo used for decode steps before: its kernel took about
1.5 times as long for a decode step of 64 adapters and four times as long for one adapter (where the
arithmetic, not memory, bounds it), every call went through dynamo's wrapper and guards
(about 2.5% of the vLLM worker's time at 30 calls a step), and it compiled for 4-5
seconds in the worker on a server's first busy step, where this builds in about one,
once per machine, before the worker starts.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

from zoo.catalog.home import zoo_cache
from zoo.core.measure import cpu_flags

logger = logging.getLogger("zoo.serve")
SOURCE = Path(__file__).with_name("lora_kernel.cpp")
ABI = 3
INT8_SOURCE = Path(__file__).with_name("int8_gemm.cpp")
INT8_ABI = 2
INT8_PATHS = {"auto": 0, "rows": 1, "panels": 2}  # int8_gemm.cpp's two loops
MAX_RANK = 64
# Tried in order: the CPU's own instructions and OpenMP threads, then without OpenMP,
# then code for any CPU of the architecture.
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native", "-fopenmp-simd"),
             ("-O3", "-fopenmp-simd"))
# (activations, weights) -> the kernel's dtype code
DTYPES = {("bfloat16", "bfloat16"): 0, ("float32", "float32"): 1, ("float32", "bfloat16"): 2,
          ("bfloat16", "int8"): 3, ("float32", "int8"): 4}


def cache_dir() -> Path:
    """Where built kernels are kept: ``$ZOO_KERNEL_CACHE``, else ``~/.cache/zoo/kernels``."""
    if os.environ.get("ZOO_KERNEL_CACHE"):
        return Path(os.environ["ZOO_KERNEL_CACHE"])
    return zoo_cache() / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Part(ctypes.Structure):
    """One slice of a fused layer, as ``lora_kernel.cpp``'s ``Part``."""

    _fields_ = [("slots", ctypes.c_int64),
                ("a", ctypes.c_void_p), ("a_slot", ctypes.c_int64), ("a_row", ctypes.c_int64),
                ("b", ctypes.c_void_p), ("b_slot", ctypes.c_int64), ("b_row", ctypes.c_int64),
                ("width", ctypes.c_int64), ("rank", ctypes.c_int64),
                ("ranks", ctypes.c_void_p), ("start", ctypes.c_int64),
                ("a_scales", ctypes.c_void_p), ("b_scales", ctypes.c_void_p),
                ("scale_slot", ctypes.c_int64)]


class Arguments(NamedTuple):
    """What the kernel is called with for one fused layer's parts, made once per parts."""

    block: ctypes.Array  # of Part
    weights: str  # A's and B's dtype, as DTYPES names it
    width_in: int  # x's width
    parts: int
    end: int  # y's columns up to the last part's end


class Kernel:
    """The loaded library. ``gather(...)`` returns False for a call it does not take (a
    dtype, layout or rank it was not written for); the caller then computes it itself."""

    def __init__(self, path: Path):
        import torch

        self.path, self._int64 = path, torch.int64
        library = ctypes.CDLL(str(path))
        if library.zoo_lora_abi() != ABI:
            raise OSError(f"{path} was built for another version of lora_kernel.cpp")
        self.avx512_bf16 = bool(library.zoo_lora_avx512_bf16())
        self._gather = library.zoo_gather_lora
        self._gather.restype = ctypes.c_int
        self._gather.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        # per-row work on a slot's weights as vLLM writes them (an older library has none)
        view = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 6
        self._quantize = getattr(library, "zoo_quantize_rows", None)
        self._ranks = getattr(library, "zoo_row_ranks", None)
        for function in (self._quantize, self._ranks):
            if function is not None:
                function.restype = ctypes.c_int
                function.argtypes = view + [ctypes.c_void_p, ctypes.c_int64] + \
                    [ctypes.c_void_p] * (2 if function is self._quantize else 1)

    def arguments(self, parts, ranks) -> Arguments | None:
        """The ctypes block for ``parts`` ((A [slots, rank, in], B [slots, rank, width],
        first column), ...) with each part's per-slot ranks (int64 tensors, or None), or
        None where the kernel does not take them. int8 parts carry their rows' scales
        after the first column: (A, B, first column, A's scales, B's scales), each
        float32 [slots, rank]. The block points into the tensors: it is valid while they
        are."""
        a0 = parts[0][0]
        weights = _name(a0.dtype)
        if weights not in {w for _x, w in DTYPES}:
            return None
        block = (Part * len(parts))()
        for i, (part, slot_ranks) in enumerate(zip(parts, ranks, strict=True)):
            a, b, start = part[:3]
            if a.dtype != a0.dtype or b.dtype != a0.dtype or a.shape[2] != a0.shape[2] or \
                    a.device.type != "cpu" or b.device.type != "cpu" or \
                    a.stride(2) != 1 or b.stride(2) != 1 or a.shape[1] > MAX_RANK or \
                    a.shape[:2] != b.shape[:2] or start < 0:
                return None
            if slot_ranks is not None and (slot_ranks.dtype != self._int64 or
                                           not slot_ranks.is_contiguous() or
                                           slot_ranks.numel() < a.shape[0]):
                return None
            scales = _scales(part, weights == "int8")
            if scales is None:
                return None
            block[i] = Part(a.shape[0], a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(),
                            b.stride(0), b.stride(1), b.shape[2], a.shape[1],
                            None if slot_ranks is None else slot_ranks.data_ptr(), start,
                            *scales)
        end = max(part[1].shape[2] + part[2] for part in parts)
        return Arguments(block, weights, a0.shape[2], len(parts), end)

    def gather(self, y, x, slots, arguments: Arguments, scale: float, threads: int = 1) -> bool:
        """y[t, columns] += scale * (x[t] @ A[slots[t]].T) @ B[slots[t]] for every part of
        ``arguments``; False, with y untouched, for inputs it does not take."""
        code = DTYPES.get((_name(x.dtype), arguments.weights))
        if code is None or y.dtype != x.dtype or \
                x.shape[1] != arguments.width_in or x.stride(1) != 1 or y.stride(1) != 1 or \
                slots.dtype != self._int64 or not slots.is_contiguous() or \
                slots.shape[0] != x.shape[0] or y.shape[0] != x.shape[0] or \
                y.shape[1] < arguments.end:
            return False
        return self._gather(code, x.shape[0], slots.data_ptr(), x.data_ptr(),
                            x.stride(0), y.data_ptr(), y.stride(0), arguments.width_in,
                            arguments.block, arguments.parts, scale, threads) == 0

    def quantize_rows(self, rows, slots=None, into=None):
        """``fast_lora.quantize_rows`` of a 3-D view [d0, d1, n] of bfloat16 or float32
        numbers (any strides: B's rows are columns of vLLM's stack), the same bits, several
        times sooner: (numbers [d0, d1, n] int8, scales [d0, d1] float32). ``slots`` (int64)
        and ``into`` (such a pair, contiguous): only those indices of d0, written into it.
        None where it does not take them (another dtype or shape, a NaN or an infinity;
        ``into`` may then be partly written)."""
        import torch

        view = _view(rows)
        if view is None or self._quantize is None:
            return None
        numbers, scales = into or (torch.empty(rows.shape, dtype=torch.int8),
                                   torch.empty(rows.shape[:2], dtype=torch.float32))
        if not _holds(numbers, rows.shape, torch.int8) or \
                not _holds(scales, rows.shape[:2], torch.float32):
            return None
        if self._quantize(*view, *self._slots(slots), numbers.data_ptr(),
                          scales.data_ptr()) != 0:
            return None
        return into if into is not None else (numbers, scales)

    def row_ranks(self, rows, slots=None, into=None):
        """``fast_lora._ranks_of`` of the view [slots, rows, n] (A's rows of a slot, any
        strides): per slot, one past its last row with a number that is not zero (int64
        [slots]); ``slots`` and ``into`` as for :meth:`quantize_rows`. None where it does
        not take them."""
        import torch

        view = _view(rows)
        if view is None or self._ranks is None:
            return None
        ranks = into if into is not None else torch.empty(rows.shape[0], dtype=torch.int64)
        if not _holds(ranks, rows.shape[:1], torch.int64):
            return None
        return ranks if self._ranks(*view, *self._slots(slots), ranks.data_ptr()) == 0 else None

    def _slots(self, slots) -> tuple[int | None, int]:
        if slots is None:
            return None, 0
        if slots.dtype != self._int64 or not slots.is_contiguous():
            raise ValueError("slots must be a contiguous int64 tensor")
        return slots.data_ptr(), slots.numel()


class Int8Gemm:
    """The loaded ``int8_gemm.cpp``: :meth:`__call__` computes one W8A8 linear."""

    def __init__(self, path: Path):
        library = ctypes.CDLL(str(path))
        if library.zoo_int8_abi() != INT8_ABI:
            raise OSError(f"{path} was built for another version of int8_gemm.cpp")
        self.path = path
        self.avx2 = bool(library.zoo_int8_avx2())
        self._gemm = library.zoo_int8_gemm
        self._gemm.restype = ctypes.c_int
        self._gemm.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64] + \
            [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]

    def __call__(self, x, x_scales, weight, weight_scales, out, bias=None,
                 threads: int = 1, path: str = "auto") -> bool:
        """out = (x @ weight.T as exact int32 sums, times ``weight_scales`` per column)
        times ``x_scales`` per row, plus ``bias``: x int8 [m, k] (rows contiguous),
        x_scales float32 [m] (or [m, 1]), weight int8 [n, k] and weight_scales float32 [n],
        contiguous, out float32 [m, n] (rows contiguous), bias float32 [n] or None. ``path``
        names the loop, the same numbers either way: "rows" (the weight read where it
        lies: a few tokens), "panels" (widened 32 outputs at a time: many tokens) or
        "auto" (by the number of tokens). False, with out untouched, for inputs it does
        not take (k not a multiple of 16, a library without AVX2)."""
        import torch

        if path not in INT8_PATHS:
            raise ValueError(f"path must be one of {', '.join(INT8_PATHS)}, not {path!r}")
        m, k = x.shape
        n = weight.shape[0]
        if x.dtype != torch.int8 or x.stride(1) != 1 or \
                not _holds(x_scales.view(-1), (m,), torch.float32) or \
                not _holds(weight, (n, k), torch.int8) or \
                not _holds(weight_scales, (n,), torch.float32) or \
                out.dtype != torch.float32 or out.shape != (m, n) or out.stride(1) != 1 or \
                (bias is not None and not _holds(bias, (n,), torch.float32)):
            return False
        return self._gemm(m, n, k, x.data_ptr(), x.stride(0), x_scales.data_ptr(),
                          weight.data_ptr(), weight_scales.data_ptr(),
                          None if bias is None else bias.data_ptr(), out.data_ptr(),
                          out.stride(0), threads, INT8_PATHS[path]) == 0


def _holds(tensor, shape, dtype) -> bool:
    """Whether ``tensor`` is a contiguous CPU tensor of that shape and dtype."""
    return tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous() and \
        tensor.device.type == "cpu"


def _view(rows) -> tuple | None:
    """The (dtype code, address, sizes, strides) lora_kernel.cpp's row functions take for
    a 3-D CPU tensor of bfloat16 (0) or float32 (1) numbers; None for another."""
    code = {"bfloat16": 0, "float32": 1}.get(_name(rows.dtype))
    if code is None or rows.dim() != 3 or rows.device.type != "cpu" or rows.requires_grad:
        return None
    return (code, rows.data_ptr(), *rows.shape, *rows.stride())


def _scales(part, int8: bool) -> tuple | None:
    """(A's scales, B's scales, their slot stride) for an int8 part, (None, None, 0) for
    another; None where they do not fit the weights: float32 [slots, rank] or more, rows
    contiguous, one slot stride for both."""
    if not int8:
        return (None, None, 0) if len(part) == 3 else None
    if len(part) != 5:
        return None
    a, _b, _start, a_scales, b_scales = part
    for scales in (a_scales, b_scales):
        if _name(scales.dtype) != "float32" or scales.dim() != 2 or scales.stride(1) != 1 or \
                scales.shape[0] < a.shape[0] or scales.shape[1] < a.shape[1] or \
                scales.device.type != "cpu":
            return None
    if a_scales.stride(0) != b_scales.stride(0):
        return None
    return a_scales.data_ptr(), b_scales.data_ptr(), a_scales.stride(0)


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def kernel() -> Kernel | None:
    """The kernel for this machine, built on first use (about a second) and cached on disk;
    None, after one warning, where it cannot be built or loaded."""
    try:
        return Kernel(_built())
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("zoo: the native LoRA kernel is not available (%s); running the "
                       "steps' LoRA in PyTorch, which is slower", exc)
        return None


@functools.cache
def int8_gemm() -> Int8Gemm | None:
    """``int8_gemm.cpp`` for this machine, built on first use and cached on disk, as
    :func:`kernel`; None, after one warning, where it cannot be built or loaded."""
    try:
        return Int8Gemm(_built(INT8_SOURCE))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("zoo: the native int8 GEMM is not available (%s); the int8 base's "
                       "linears stay vLLM's", exc)
        return None


def prebuild() -> None:
    """Build the kernel now if it is not in the cache: zoo's plugin calls this in vLLM's
    first process, so that the worker loads it instead of building it during a step.
    Quietly: the worker's ``kernel()`` says so if it cannot be had."""
    try:
        _built()
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("zoo: building the native LoRA kernel failed: %s", exc)


@functools.cache
def _built(source_file: Path = SOURCE) -> Path:
    """``build()`` once a process (the plugin's prebuild, then the worker's first step)."""
    return build(source_file=source_file)


def build(directory: Path | None = None, source_file: Path = SOURCE) -> Path:
    """The built library's path: from the cache, or compiled into it now (a temporary
    name renamed into place, so that processes building at once never load half a file).
    ``source_file``: another version of the kernel (benchmarks build earlier commits')."""
    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    directory = directory or cache_dir()
    source = source_file.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cxx.encode(), version.encode(),
                                         " ".join(flags).encode(),
                                         " ".join(sorted(cpu_flags())).encode()]))
        path = directory / f"{source_file.stem}-{key.hexdigest()[:16]}.so"
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            built = Path(scratch) / path.name
            done = subprocess.run([cxx, *flags, "-shared", "-fPIC", "-o", str(built),
                                   str(source_file)], capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(built, path)
                return path
            errors.append(f"{' '.join(flags)}: {done.stderr.strip()[-300:]}")
    raise OSError(f"{cxx} could not build {source_file.name}: " + "; ".join(errors))
