"""zoo's int8 GEMM (``int8_gemm.cpp``, ``zoo.serve.cpu_int8``): the W8A8 product, exactly.

Checked against the integer arithmetic itself (``cpu_int8.reference``: int64 sums in
PyTorch) bit for bit, against vLLM's own oneDNN path where oneDNN is exact, and through
vLLM's own ``CPUInt8ScaledMMLinearKernel`` with the weight processing zoo wraps. That
oneDNN's saturates where zoo's GEMM serves: tests/test_int8_width.py.
"""

from __future__ import annotations

import pytest
import torch

from zoo.core.measure import cpu_flags
from zoo.serve import cpu_int8, native

gemm = native.int8_gemm()
needs_avx2 = pytest.mark.skipif(gemm is None or not gemm.avx2,
                                reason="zoo's int8 GEMM is written for x86 with AVX2")


def random_int8(*shape, low=-127, high=127, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, shape, dtype=torch.int8, generator=g)


def run(x_q, x_scales, weight, scales, bias=None, threads=1, path="auto") -> torch.Tensor:
    out = torch.full((x_q.shape[0], weight.shape[0]), float("nan"))
    assert gemm(x_q, x_scales, weight, scales, out, bias, threads, path)
    return out


@needs_avx2
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 63, 64, 65, 130])
@pytest.mark.parametrize("n,k", [(1, 16), (3, 32), (5, 48), (64, 576), (33, 1536)])
def test_the_gemm_is_the_w8a8_product_bit_for_bit(m, n, k):
    """Every tile shape and remainder of both loops (rows: tokens by fours, outputs by
    twos, blocks of 64 tokens; panels: tokens by twos, outputs by 32, inputs by chunks of
    256), full-range weights (-128 too) and activations, against int64 sums in PyTorch."""
    x_q = random_int8(m, k, seed=m)
    weight = random_int8(n, k, low=-128, seed=n + k)
    x_scales = torch.rand(m, 1) * 0.1
    scales = torch.rand(n) * 0.01
    bias = torch.randn(n)
    want = cpu_int8.reference(x_q, x_scales, weight, scales)
    want_bias = cpu_int8.reference(x_q, x_scales, weight, scales, bias)
    for path in ("rows", "panels"):
        assert torch.equal(run(x_q, x_scales, weight, scales, path=path), want), path
        assert torch.equal(run(x_q, x_scales, weight, scales, bias, path=path), want_bias), path


@needs_avx2
def test_the_panels_take_long_prefills_in_blocks():
    """More tokens than a block of the panel loop (256) and more outputs than a panel,
    on one and two threads, and the loop each number of tokens is given: the same bits."""
    x_q = random_int8(600, 576, seed=7)
    weight = random_int8(100, 576, low=-128, seed=8)
    x_scales, scales = torch.rand(600), torch.rand(100)
    want = cpu_int8.reference(x_q, x_scales, weight, scales)
    for threads in (1, 2):
        assert torch.equal(run(x_q, x_scales, weight, scales, threads=threads), want)
        assert torch.equal(run(x_q, x_scales, weight, scales, threads=threads,
                               path="panels"), want)
    out = torch.zeros(600, 100)
    with pytest.raises(ValueError, match="path must be one of auto, rows, panels"):
        gemm(x_q, x_scales, weight, scales, out, path="fast")
    assert torch.equal(out, torch.zeros(600, 100))


@needs_avx2
def test_the_largest_sums_do_not_saturate():
    """Every product at its largest (-128 x -127 = 16,256), over a long row: the sum is
    exact where a 16-bit pair sum would have saturated at every pair."""
    k = 4096
    x_q = torch.full((3, k), -127, dtype=torch.int8)
    weight = torch.full((2, k), -128, dtype=torch.int8)
    for path in ("rows", "panels"):
        out = run(x_q, torch.ones(3), weight, torch.ones(2), path=path)
        assert torch.equal(out, torch.full((3, 2), float(k * 128 * 127))), path


@needs_avx2
def test_rows_apart_threads_and_refusals():
    """Activation rows further apart than k (a slice), two threads: the same bits; inputs
    it does not take are refused with the output untouched."""
    x_wide = random_int8(40, 96, seed=1)
    x_q = x_wide[:, :64]
    weight, scales = random_int8(50, 64, seed=2), torch.rand(50)
    x_scales = torch.rand(40)
    want = cpu_int8.reference(x_q, x_scales, weight, scales)
    assert torch.equal(run(x_q, x_scales, weight, scales), want)
    assert torch.equal(run(x_q, x_scales, weight, scales, threads=2), want)
    out = torch.zeros(40, 50)
    odd = random_int8(50, 40, seed=3)  # k not a multiple of 16
    assert not gemm(x_wide[:, :40], x_scales, odd, scales, out)
    assert not gemm(x_q, x_scales, weight.float(), scales, out)  # not int8
    assert not gemm(x_q, x_scales, weight, scales, torch.zeros(40, 50, dtype=torch.bfloat16))
    assert not gemm(x_q, x_scales[:10], weight, scales, out)
    assert torch.equal(out, torch.zeros(40, 50))


def test_vllm_oneDNN_gemm_is_the_same_where_it_is_exact():
    """Where oneDNN's pair sums cannot saturate (weights within -63..63: 2 x 255 x 63 <
    32,767), its outputs and zoo's are the same bits: the float32 products are taken in
    its order."""
    from vllm import _custom_ops as ops

    if gemm is None or not gemm.avx2:
        pytest.skip("zoo's int8 GEMM is written for x86 with AVX2")
    g = torch.Generator().manual_seed(0)
    weight = random_int8(96, 576, low=-63, high=63, seed=5)
    scales = torch.rand(96, generator=g) * 0.01
    handler = ops.create_onednn_scaled_mm(weight.t(), scales[:, None].contiguous(),
                                          torch.float32, True, False, 32)
    for m in (1, 5, 64):
        x = torch.randn(m, 576, generator=g)
        x_q, x_scales, x_zero = ops.onednn_scaled_int8_quant(x, None, None, True)
        theirs = torch.empty(m, 96)
        ops.onednn_scaled_mm(handler, x_q, theirs, x_scales, x_zero, None, None)
        assert torch.equal(run(x_q, x_scales, weight, scales), theirs)


def test_row_scales_follow_vllms_layouts():
    class Layer(torch.nn.Module):
        logical_widths = [4, 2, 2]

    layer = Layer()
    per_row = torch.arange(8, dtype=torch.float32)
    assert torch.equal(cpu_int8.row_scales(layer, per_row[:, None], 8), per_row)
    per_part = torch.tensor([1.0, 2.0, 3.0])
    assert cpu_int8.row_scales(layer, per_part, 8).tolist() == [1, 1, 1, 1, 2, 2, 3, 3]
    assert cpu_int8.row_scales(torch.nn.Module(), torch.tensor([0.5]), 3).tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="5 weight scales for 8 output rows"):
        cpu_int8.row_scales(layer, torch.ones(5), 8)


def test_zoo_runs_the_int8_linears_where_oneDNN_saturates(monkeypatch):
    """Which CPUs zoo's GEMM is for: x86 with AVX2 and without VNNI (zoo.quantize.w8a8
    says, as the weights' width follows it), unless ``ZOO_CPU_INT8=0``."""
    from zoo.quantize.w8a8 import ZOOS_GEMM_VARIABLE

    avx2 = frozenset({"sse2", "avx2", "fma"})
    assert cpu_int8.wanted(avx2)
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not cpu_int8.wanted(avx2 | {vnni})
    assert not cpu_int8.wanted(frozenset({"sse2"}))  # no AVX2: oneDNN's
    assert not cpu_int8.wanted(frozenset({"fp", "asimd"}))  # Arm
    monkeypatch.setenv(ZOOS_GEMM_VARIABLE, "0")
    assert not cpu_int8.wanted(avx2)
    assert cpu_int8.register(avx2) is False  # nothing wrapped when it is off


class FakeInt8Layer(torch.nn.Module):
    """What vLLM's W8A8 scheme hands its CPU kernel: an int8 weight [n, k] and per-channel
    scales [n, 1] (a fused layer of two parts)."""

    def __init__(self, weight, scales):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scales, requires_grad=False)
        self.input_scale = None
        self.input_zero_point = None
        self.azp_adj = None
        self.logical_widths = [weight.shape[0] // 2, weight.shape[0] - weight.shape[0] // 2]


def vllm_kernel(layer, wrap: bool):
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        Int8ScaledMMLinearLayerConfig,
    )

    config = Int8ScaledMMLinearLayerConfig(is_static_input_scheme=False, is_channelwise=True,
                                           input_symmetric=True)
    kernel = CPUInt8ScaledMMLinearKernel(
        config, ["weight", "weight_scale", "input_scale", "input_zero_point", "azp_adj"])
    process = CPUInt8ScaledMMLinearKernel.process_weights_after_loading
    (cpu_int8.taking(process) if wrap else process)(kernel, layer)
    return kernel


@needs_avx2
def test_vllms_kernel_with_zoos_weight_processing():
    """vLLM's CPUInt8ScaledMMLinearKernel, its weights processed by zoo's wrapper: the layer
    keeps its int8 weight and row scales (its ``weight`` released, as vLLM's oneDNN path
    leaves it), and ``apply_weights`` gives vLLM's own outputs where those are exact (within
    -63..63) and the exact product always, in float32; bfloat16 activations get the float32
    result rounded once."""
    weight = random_int8(64, 96, low=-63, high=63, seed=11)
    scales = torch.rand(64, 1) * 0.01
    ours_layer = FakeInt8Layer(weight.clone(), scales.clone())
    theirs_layer = FakeInt8Layer(weight.clone(), scales.clone())
    taken = cpu_int8.taken()
    ours, theirs = vllm_kernel(ours_layer, True), vllm_kernel(theirs_layer, False)
    assert cpu_int8.taken() == taken + 1
    assert ours_layer.weight is None
    assert torch.equal(getattr(ours_layer, cpu_int8.WEIGHT), weight)
    assert torch.equal(getattr(ours_layer, cpu_int8.SCALES), scales.view(-1))
    x = torch.randn(2, 3, 96)
    got = ours.apply_weights(ours_layer, x)
    want = theirs.apply_weights(theirs_layer, x)
    assert got.shape == (2, 3, 64)
    from vllm import _custom_ops as ops

    x_q, x_scales, _ = ops.onednn_scaled_int8_quant(x.reshape(6, 96), None, None, True)
    exact = cpu_int8.reference(x_q, x_scales, weight, scales.view(-1)).view(2, 3, 64)
    assert torch.equal(got, exact)
    assert torch.equal(got, want)
    bf16 = ours.apply_weights(ours_layer, x.bfloat16())
    x_q, x_scales, _ = ops.onednn_scaled_int8_quant(x.bfloat16().reshape(6, 96), None, None,
                                                     True)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, cpu_int8.reference(x_q, x_scales, weight, scales.view(-1))
                       .bfloat16().view(2, 3, 64))


def test_layers_zoo_does_not_take_stay_vllms():
    """Static or asymmetric activations, or k not a multiple of 16: vLLM's own path."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import (
        Int8ScaledMMLinearLayerConfig,
    )

    def kernel(**config):
        settings = {"is_static_input_scheme": False, "is_channelwise": True,
                    "input_symmetric": True} | config
        return CPUInt8ScaledMMLinearKernel(Int8ScaledMMLinearLayerConfig(**settings),
                                           ["weight", "weight_scale", "input_scale",
                                            "input_zero_point", "azp_adj"])

    weight = random_int8(8, 32)
    assert cpu_int8.takes(kernel(), weight) == (not torch.cpu._is_amx_tile_supported())
    assert not cpu_int8.takes(kernel(input_symmetric=False), weight)
    assert not cpu_int8.takes(kernel(is_static_input_scheme=True), weight)
    assert not cpu_int8.takes(kernel(), random_int8(8, 40))
    assert not cpu_int8.takes(kernel(), weight.float())


def test_the_patch_takes_vllms_int8_kernel_where_zoo_runs_it():
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel

    from zoo.serve import patches, plugin

    assert patches.install([plugin.CPU_INT8]).applied == ["cpu_int8"]
    assert patches.install([plugin.CPU_INT8]).applied == ["cpu_int8"]  # once
    process = CPUInt8ScaledMMLinearKernel.process_weights_after_loading
    assert cpu_int8.is_ours(process) == (cpu_int8.wanted(cpu_flags()) and gemm is not None)
    if cpu_int8.is_ours(process):
        assert not cpu_int8.is_ours(process.__wrapped__)  # wrapped once
