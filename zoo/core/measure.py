"""Process memory, measured (benchmarks, training records, the serve report) and kept low
(streaming commands); the CPU's features, read (kernels, the activation dtype, weight width)."""

from __future__ import annotations

import ctypes
import resource


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Read from ``/proc/self/status`` (VmHWM) where it exists: ``ru_maxrss``
    survives ``exec``, so a child started by a large parent would report the
    parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes the process holds in live heap allocations (glibc's mallinfo2).

    Unlike the resident set, this drops when memory is freed (glibc keeps
    freed pages mapped) and leaves out mapped files such as a checkpoint, so
    its change across loading a model is what the loaded weights occupy.
    """
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_frees() -> None:
    """Have glibc give blocks of 1 MB and more their own mappings, returned to the system
    when freed. Its default threshold adapts upwards as large blocks are freed, after which
    a streaming command's per-tensor buffers come from the heap and stay resident; a no-op
    where the C library is not glibc."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (AttributeError, OSError):
        pass


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()
