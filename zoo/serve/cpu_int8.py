"""The int8 base's linears on an x86 CPU without VNNI: zoo's GEMM instead of oneDNN's.

vLLM runs each W8A8 linear of the int8 base (dynamic per-token, symmetric activations)
on the CPU as ``CPUInt8ScaledMMLinearKernel._apply_weights_onednn``: its own quantization
of the activations to int8 (``ops.onednn_scaled_int8_quant``), then oneDNN's int8 matmul.
On a CPU without VNNI (an AVX2 EPYC here), oneDNN's matmul is its ``gemm:jit``, and two
things go wrong there:

* **time**: it reorders the whole weight on every call, so one token takes fifteen times
  as long as a float32 linear of the same shape (576 x 3,072: 2.7 ms against 0.18 ms),
  and one stream on the int8 base decoded at 0.42x the 16-bit base's speed;
* **arithmetic**: it multiplies with ``vpmaddubsw``, whose int16 pair sums saturate, so
  some outputs are not the W8A8 product (full-range int8 rows: off by up to a fifth of
  the largest output), and zoo wrote 7-bit weights there to stay exact.

:func:`register` wraps ``process_weights_after_loading`` so that every layer it takes
keeps its int8 weight [n, k] and one float32 scale an output row, and runs
:func:`apply`: vLLM's own activation quantization, then ``int8_gemm.cpp``, whose sums are
exact (widened to int16 and multiplied in pairs, ``vpmaddwd``) and whose float32
products are taken in oneDNN's and vLLM's order. The result is :func:`reference`'s, bit
for bit, for 8-bit weights too (``zoo.quantize.w8a8.weight_bits``). A layer it does not
take (static or asymmetric activations, k not a multiple of 16, AMX's own kernel) stays
vLLM's; so does every layer on a CPU with VNNI, where oneDNN adds in 32 bits and one
stream on the int8 base ran 1.34x the 16-bit base's speed (the AVX-512 EPYC,
docs/BENCHMARKS.md). Measured: ``bench/int8_gemm.py``, ``bench/dtype.py``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

# which CPUs (the weights' width follows it, so it is the quantizer's to say)
from zoo.quantize.w8a8 import zoos_gemm_serves as wanted

if TYPE_CHECKING:
    import torch

WEIGHT = "zoo_int8_weight"  # the layer's int8 weight [n, k], where zoo took it
SCALES = "zoo_int8_scales"  # its float32 scale an output row [n]
_TAKEN: list[int] = [0]  # layers this process took (the worker's report reads it)


def built():
    """zoo's GEMM for this machine (``native.Int8Gemm``), or None where it cannot run here:
    not built (no C++ compiler), or built without AVX2."""
    from zoo.serve import native

    gemm = native.int8_gemm()
    return gemm if gemm is not None and gemm.avx2 else None


def available() -> bool:
    """Whether zoo's GEMM can run on this machine."""
    return built() is not None


def reference(x_q: torch.Tensor, x_scales: torch.Tensor, weight: torch.Tensor,
              weight_scales: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What a W8A8 linear computes, in PyTorch: the exact integer sums of x_q [m, k] and
    weight [n, k], times each column's weight scale, then each row's activation scale
    (float32 products in that order), plus ``bias``."""
    import torch

    sums = (x_q.to(torch.int64) @ weight.to(torch.int64).T).to(torch.float32)
    out = (sums * weight_scales.view(1, -1)) * x_scales.view(-1, 1).to(torch.float32)
    return out if bias is None else out + bias.to(torch.float32)


def apply(gemm, layer: torch.nn.Module, x: torch.Tensor,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The linear of a layer zoo took, for activations ``x`` [..., k] of any float dtype."""
    import torch
    from vllm import _custom_ops as ops

    rows = x.reshape(-1, x.shape[-1])
    x_q, x_scales, _ = ops.onednn_scaled_int8_quant(rows, None, None, True)
    weight, scales = getattr(layer, WEIGHT), getattr(layer, SCALES)
    out = torch.empty((rows.shape[0], weight.shape[0]), dtype=torch.float32)
    wide_bias = None if bias is None else bias.to(torch.float32)
    if not gemm(x_q, x_scales, weight, scales, out, wide_bias, torch.get_num_threads()):
        out = reference(x_q, x_scales, weight, scales, wide_bias)  # not reached: checked at load
    if out.dtype != x.dtype:
        out = out.to(x.dtype)  # rounded to the nearest
    return out.reshape(*x.shape[:-1], weight.shape[0])


def takes(kernel, weight: torch.Tensor) -> bool:
    """Whether zoo runs this layer: dynamic symmetric activations, an int8 weight [n, k]
    with k a multiple of 16, and no AMX kernel of vLLM's for it."""
    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    config = kernel.config
    return (config.input_symmetric and not config.is_static_input_scheme
            and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.shape[1] % 16 == 0 and weight.device.type == "cpu"
            and not check_cpu_sgl_kernel(*weight.shape, weight.dtype))


def row_scales(layer: torch.nn.Module, scales: torch.Tensor, rows: int) -> torch.Tensor:
    """One float32 scale an output row: per-channel scales as they are, a fused layer's
    per-part scales repeated over each part's rows, one scale repeated over all."""
    import torch

    scales = scales.detach().to(torch.float32).reshape(-1)
    widths = list(getattr(layer, "logical_widths", None) or [rows])
    if scales.numel() == len(widths) and scales.numel() != rows:
        scales = torch.cat([s.expand(w) for s, w in zip(scales, widths, strict=True)])
    if scales.numel() == 1:
        scales = scales.expand(rows)
    if scales.numel() != rows:
        raise ValueError(f"{scales.numel()} weight scales for {rows} output rows")
    return scales.contiguous()


def taking(process_weights_after_loading):
    """``CPUInt8ScaledMMLinearKernel.process_weights_after_loading`` that keeps a layer's
    int8 weight and row scales for :func:`apply` where :func:`takes` says so, and leaves
    every other layer to vLLM's."""
    @functools.wraps(process_weights_after_loading)
    def process(self, layer):
        w_name, s_name = self.layer_param_names[:2]
        weight = getattr(layer, w_name)
        gemm = built()
        if gemm is None or not takes(self, weight):
            return process_weights_after_loading(self, layer)
        scales = row_scales(layer, getattr(layer, s_name), weight.shape[0])
        layer.register_buffer(WEIGHT, weight.detach().contiguous(), persistent=False)
        layer.register_buffer(SCALES, scales, persistent=False)
        setattr(layer, w_name, None)  # as vLLM's oneDNN path leaves it
        self.linear_method = functools.partial(apply, gemm)
        _TAKEN[0] += 1

    process._zoo_int8 = True
    return process


def is_ours(function) -> bool:
    return getattr(function, "_zoo_int8", False)


def taken() -> int:
    """How many of the int8 base's linears this process runs on zoo's GEMM."""
    return _TAKEN[0]


def register(flags: frozenset[str]) -> bool:
    """On a CPU that :func:`wanted` names, build the GEMM (once a machine) and wrap vLLM's
    CPU int8 kernel's weight processing (once a process). Whether it did."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel

    if not wanted(flags) or not available():
        return False
    kernel = CPUInt8ScaledMMLinearKernel
    if not is_ours(kernel.process_weights_after_loading):
        kernel.process_weights_after_loading = taking(kernel.process_weights_after_loading)
    return True
