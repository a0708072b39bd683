"""The rotary embedding on vLLM's CPU kernel, rounded where the kernel truncates.

``zoo serve`` runs the rotary embedding on vLLM's C++ kernel for the CPU
(``launch.CPU_COMPILATION``: ``RotaryEmbedding.forward_cpu``, ``torch.ops._C.rotary_embedding``).
The kernel rotates in float32 and converts each result back to the rows' dtype. Where
the CPU has no AVX512-BF16 (AVX2, or AVX-512 without it), vLLM's x86 conversion to
bfloat16 keeps the high 16 bits of a float32: it truncates, every result up to a unit in
the last place toward zero (the norms' kernels do the same: ``cpu_norms.py``), where
PyTorch's own path rounds.

:func:`register` asks the kernel which 16-bit dtypes it truncates (:func:`truncates`)
and, for those, has ``forward_cpu`` run the kernel on float32 copies of the rows and
copy them back, rounded by torch: rounded once, as where the kernel rounds. For every
other dtype ``forward_cpu`` is vLLM's own.
"""

from __future__ import annotations

import functools

import torch

# the 16-bit dtypes vLLM's rotary kernel truncates to on this CPU (register() fills it)
_WIDENED: set = set()
# half the probe's rotary width: a whole number of the kernel's vectors (8 or 16 numbers
# in the x86 builds), which take the vectorized (converting) path
_PROBE_HALF = 32


def truncates(dtype: torch.dtype) -> bool:
    """Whether vLLM's rotary kernel truncates its float32 results to ``dtype`` instead of
    rounding them to the nearest. It rotates a query of ones at a position whose cosine is
    1 and whose sine is minus three quarters of a unit in the last place above 1, so that
    ``x·cos - y·sin`` is 1 and three quarters of that unit: exact in float32, it rounds to
    the number above 1 and truncates to 1."""
    above = torch.finfo(dtype).eps  # the unit in the last place above 1
    half = _PROBE_HALF
    query = torch.ones(1, 2 * half, dtype=dtype)
    key = query.clone()
    cache = torch.cat([torch.ones(half), torch.full((half,), -0.75 * above)]).to(dtype)
    torch.ops._C.rotary_embedding(torch.zeros(1, dtype=torch.long), query, key, 2 * half,
                                  cache[None], True)
    return not bool((query[0, :half] == 1 + above).all())


def widened(forward_cpu):
    """``RotaryEmbedding.forward_cpu`` that, for a dtype in ``_WIDENED``, runs vLLM's on
    float32 copies of ``query`` and ``key`` and writes them back in place (rounded by
    torch); vLLM's own for any other dtype."""
    @functools.wraps(forward_cpu)
    def forward(self, positions, query, key=None):
        if query.dtype not in _WIDENED:
            return forward_cpu(self, positions, query, key)
        # the module's cos/sin cache becomes float32 (of its 16-bit values) on the first
        # call, as vLLM's own _match_cos_sin_cache_dtype does for a query of another dtype
        wide_query, wide_key = forward_cpu(self, positions, query.float(),
                                           None if key is None else key.float())
        query.copy_(wide_query)
        if key is not None:
            key.copy_(wide_key)
        return query, key

    forward._zoo_rotary = True
    return forward


def is_ours(forward_cpu) -> bool:
    """Whether ``forward_cpu`` (a function) is :func:`widened`'s."""
    return getattr(forward_cpu, "_zoo_rotary", False)


def register() -> None:
    """Ask the kernel which dtypes it truncates and, where it truncates any, widen vLLM's
    ``RotaryEmbedding.forward_cpu`` for them (once a process)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # torch.ops._C on the CPU
    if not hasattr(torch.ops._C, "rotary_embedding"):
        raise RuntimeError("vLLM's CPU build has no torch.ops._C.rotary_embedding")
    _WIDENED.update(d for d in (torch.bfloat16, torch.float16) if truncates(d))
    if _WIDENED and not is_ours(RotaryEmbedding.forward_cpu):
        RotaryEmbedding.forward_cpu = widened(RotaryEmbedding.forward_cpu)
