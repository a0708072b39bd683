"""RMSNorm on the CPU through vLLM's own C++ kernels, as vLLM IR providers.

vLLM 0.32 runs every RMSNorm through its IR ops (``vllm.ir.ops.rms_norm`` and
``fused_add_rms_norm``), dispatched by a per-platform priority list. Its C++ kernels
(``torch.ops._C.rms_norm``, ``fused_add_rms_norm``) are built into the CPU wheel too, but
the ``vllm_c`` provider that calls them is registered for GPUs only, and the CPU platform
keeps the default priority, ``native``: seven PyTorch operations in float32 per norm. On
SmolLM2 (61 norms a step) that was 16% of the worker's time serving 64 requests: one
fused norm of 64 bf16 rows took 76 us against the kernel's 8.6, of a 2,048-token prefill
chunk 6.7 ms against 0.21 (Intel Xeon, one thread).

:func:`register` adds a ``zoo_cpu`` provider for both ops that calls those kernels, for
the arguments they take (rows contiguous on the CPU, a multiple of 32 wide, a weight of
the rows' dtype, no variance size override; anything else goes to ``native``), and
:func:`priority` is the CPU platform's default priority with ``zoo_cpu`` first for both.
The kernel computes the norm in float32 and rounds once; ``native`` rounds the
normalized rows to the weight's dtype before it multiplies by the weight, so in bfloat16
the two differ by a rounding (tests/test_cpu_norms.py bounds it against a float64
reference). Where the CPU has no AVX512-BF16 (AVX2, or AVX-512 without it), vLLM's x86
kernels do not round a float32 result to bfloat16: they truncate it (the high 16 bits),
each number up to a unit in the last place toward zero. :func:`register` asks the kernel
which 16-bit dtypes it truncates (:func:`truncates`), and for those the provider runs
the kernel in float32 and lets torch round the result: rounded once, as where the
kernels round.

This module has no ``from __future__ import annotations``: vLLM infers each provider's
torch schema from its annotations and requires them to equal the native one's.
"""

import torch
from torch import Tensor

PROVIDER = "zoo_cpu"
OPS = ("rms_norm", "fused_add_rms_norm")
# the kernels take rows whose width is a multiple of their vector's (8 numbers in the x86
# builds here; a width of 100 is refused with an error): 32 leaves a margin, and every
# model's hidden size is a multiple of it
WIDTH_MULTIPLE = 32
# the 16-bit dtypes vLLM's kernels truncate to on this CPU (register() fills it): their
# rows are normalized in float32 and rounded by torch
_WIDENED: set = set()


def _takes(x: Tensor, weight: Tensor | None, variance_size: int | None) -> bool:
    return (variance_size is None and weight is not None and x.device.type == "cpu"
            and weight.dtype == x.dtype and weight.device.type == "cpu"
            and weight.is_contiguous() and x.is_contiguous()
            and weight.shape == x.shape[-1:] and x.shape[-1] % WIDTH_MULTIPLE == 0)


def _takes_rms(x: Tensor, weight: Tensor | None, epsilon: float,
               variance_size: int | None = None) -> bool:
    return _takes(x, weight, variance_size)


def _takes_fused(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                 variance_size: int | None = None) -> bool:
    return (_takes(x, weight, variance_size) and x_residual.dtype == x.dtype
            and x_residual.shape == x.shape and x_residual.is_contiguous()
            and x_residual.device.type == "cpu")


def rms_norm(x: Tensor, weight: Tensor | None, epsilon: float,
             variance_size: int | None = None) -> Tensor:
    if x.dtype in _WIDENED:
        return rms_norm(x.float(), weight.float(), epsilon).to(x.dtype)
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def fused_add_rms_norm(x: Tensor, x_residual: Tensor, weight: Tensor | None, epsilon: float,
                       variance_size: int | None = None) -> tuple[Tensor, Tensor]:
    """In place, as vLLM's own provider: ``x_residual += x``; ``x = norm(x_residual)``."""
    if x.dtype in _WIDENED:
        x_residual.add_(x)  # rounded once, as native's sum (the kernel truncates it)
        x.copy_(rms_norm(x_residual.float(), weight.float(), epsilon))
        return x, x_residual
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual


def truncates(dtype: torch.dtype) -> bool:
    """Whether vLLM's kernel truncates its float32 results to ``dtype`` instead of
    rounding them to the nearest: it normalizes a row of ones with the epsilon that puts
    the exact result a quarter of a unit in the last place below 1, which rounds to 1 and
    truncates to the number below it."""
    below = torch.finfo(dtype).eps / 2  # the unit in the last place below 1
    epsilon = 1 / (1 - below / 4) ** 2 - 1
    ones = torch.ones(1, WIDTH_MULTIPLE, dtype=dtype)
    out = torch.empty_like(ones)
    torch.ops._C.rms_norm(out, ones, ones[0], epsilon)
    return not bool((out == 1).all())


def register() -> None:
    """Add the ``zoo_cpu`` provider to both ops (once a process)."""
    from vllm import ir
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # torch.ops._C on the CPU
    for name in OPS:
        if not hasattr(torch.ops._C, name):
            raise RuntimeError(f"vLLM's CPU build has no torch.ops._C.{name}")
    _WIDENED.update(d for d in (torch.bfloat16, torch.float16) if truncates(d))
    if PROVIDER not in ir.ops.rms_norm.impls:
        ir.ops.rms_norm.register_impl(PROVIDER, supports_args=_takes_rms)(rms_norm)
    if PROVIDER not in ir.ops.fused_add_rms_norm.impls:
        ir.ops.fused_add_rms_norm.register_impl(PROVIDER, supports_args=_takes_fused,
                                                inplace=True)(fused_add_rms_norm)


def priority(platform_default):
    """``get_default_ir_op_priority`` for the CPU platform: ``platform_default`` (vLLM's,
    a classmethod's function) with ``zoo_cpu`` first for the norms."""
    def get_default_ir_op_priority(cls, vllm_config):
        config = platform_default(cls, vllm_config)
        for name in OPS:
            order = [p for p in getattr(config, name) if p != PROVIDER]
            setattr(config, name, [PROVIDER, *order])
        return config

    get_default_ir_op_priority._zoo_norms = True
    return get_default_ir_op_priority


def is_ours(get_default_ir_op_priority) -> bool:
    """Whether a platform's ``get_default_ir_op_priority`` (a function) is :func:`priority`'s."""
    return getattr(get_default_ir_op_priority, "_zoo_norms", False)
