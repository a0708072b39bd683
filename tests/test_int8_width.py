"""How wide the int8 base's weights are: what the int8 linears compute exactly here.

On x86 without VNNI (AVX2 only), vLLM's oneDNN GEMM adds pairs of unsigned-by-signed 8-bit
products in 16 bits and saturates. zoo runs its own exact GEMM there (zoo.serve.cpu_int8)
and writes 8-bit weights; where that GEMM cannot run (no AVX2, ``ZOO_CPU_INT8=0``) it
writes 7-bit weights, and it remakes a variant of the other width that it finds unless
that width was asked for. Checked against the kernels themselves, whichever machine runs
the suite.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import zoo
from zoo.catalog.registry import Registry
from zoo.core.measure import cpu_flags
from zoo.quantize.w8a8 import LEVELS, VNNI_FLAGS, ZOOS_GEMM_VARIABLE, weight_bits
from zoo.serve import cpu_int8, native
from zoo.serve.launch import ServeOptions, prepare_base


def test_the_width_follows_the_cpus_int8_instructions(monkeypatch):
    avx2 = frozenset({"sse2", "avx2", "fma"})
    assert weight_bits(avx2) == 8  # AVX2 without VNNI: zoo's GEMM, exact
    assert weight_bits(frozenset({"sse2"})) == 7  # x86 without AVX2: oneDNN's, saturating
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert weight_bits(avx2 | {vnni}) == 8, vnni
    assert weight_bits(frozenset({"fp", "asimd", "asimddp"})) == 8  # Arm: no such pairs
    assert weight_bits(frozenset()) == 8  # nothing known: the format's full range
    monkeypatch.setenv(ZOOS_GEMM_VARIABLE, "0")  # oneDNN's GEMM kept
    assert weight_bits(avx2) == 7 and weight_bits(avx2 | {"avx_vnni"}) == 8


def test_without_zoos_gemm_the_server_writes_7_bits(monkeypatch):
    """Where zoo's GEMM should serve (x86 with AVX2, no VNNI) but cannot be built (no
    compiler), oneDNN's saturating GEMM serves: zoo serve writes 7-bit weights."""
    import zoo.core.measure
    from zoo.serve import launch

    monkeypatch.setattr(zoo.core.measure, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    monkeypatch.setattr(cpu_int8, "available", lambda: True)
    assert launch.weight_bits_served() == 8
    monkeypatch.setattr(cpu_int8, "available", lambda: False)
    assert launch.weight_bits_served() == 7
    monkeypatch.setattr(zoo.core.measure, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert launch.weight_bits_served() == 8  # VNNI: oneDNN's is exact


def kernel_error(levels: int, zoos: bool = False) -> float:
    """vLLM's CPU int8 GEMM (oneDNN, float32 out, dynamic per-token activations), or with
    ``zoos`` zoo's, on weights in [-levels, levels] and activations at the int8 extremes
    with the weights' signs (every pair of products as large as it gets), against the
    exact integer products: the largest relative error of an output."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    k, n, m = 256, 64, 4
    weight = torch.randint(-levels, levels + 1, (n, k), dtype=torch.int8, generator=g)
    weight[:, 0] = levels  # every row reaches the range's end, as a per-row absmax scale does
    x = weight[:m].float().sign() * 3.0 + 0.01  # x's extremes on each weight's sign
    scale = torch.full((n, 1), 0.01)
    x_q, x_scale, x_zero = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty(m, n)
    if zoos:
        assert native.int8_gemm()(x_q, x_scale, weight, scale.view(-1), out)
    else:
        handler = ops.create_onednn_scaled_mm(weight.t(), scale, torch.float32, True, False,
                                              32)
        ops.onednn_scaled_mm(handler, x_q, out, x_scale, x_zero, None, None)
    exact = (x_q.double() @ weight.double().t()) * x_scale.double() * 0.01
    return float(((out.double() - exact).abs() / exact.abs().clamp(min=1e-9)).max())


def test_the_int8_linears_are_exact_at_the_width_zoo_picks_here():
    """The GEMM that serves the int8 base here (zoo's on x86 without VNNI, oneDNN's
    elsewhere) computes the width zoo picks exactly; oneDNN's saturates 8-bit weights
    exactly where the CPU is x86 without VNNI (why zoo has a GEMM of its own there, and
    writes 7-bit weights where that GEMM cannot run)."""
    flags = cpu_flags()
    zoos = cpu_int8.wanted(flags)
    assert kernel_error(LEVELS[weight_bits()], zoos) < 1e-5
    saturates = "sse2" in flags and not flags & VNNI_FLAGS
    assert (kernel_error(LEVELS[8]) > 0.01) == saturates
    assert kernel_error(LEVELS[7]) < 1e-5
    if zoos:
        assert weight_bits() == 8 and kernel_error(LEVELS[8], zoos=True) < 1e-5


def test_vllms_activation_quantization_is_per_token_round_to_nearest():
    """oneDNN's path quantizes bf16 activations as the exact math says: a float32 scale of
    each token's largest magnitude / 127 and round-to-nearest (ties may go either way). With
    the GEMM exact (above), what it serves differs from exact W8A8 only by bf16 output
    rounding: a quality gap against another CPU's kernel is not lost here."""
    from vllm import _custom_ops as ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=g) * torch.rand(576, generator=g) * 3
    x[:, 5] *= 20  # an outlier channel, as LLM activations have
    x = x.bfloat16()
    x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(x_scale, scale, rtol=1e-6, atol=0)
    exact = x.float() / scale
    differ = x_q.float() != exact.round()
    off_tie = ((exact[differ] - exact[differ].floor()) - 0.5).abs()
    assert off_tie.numel() == 0 or off_tie.max() < 1e-4, off_tie.max()
    assert differ.float().mean() < 1e-3


def stored_integers(home, registry) -> torch.Tensor:
    """The largest |integer| of each int8 weight the variant stores, one per tensor."""
    path = home / registry.load().base("tiny").variants["w8a8"].path
    tensors = {}
    for shard in path.glob("*.safetensors"):
        tensors |= load_file(shard)
    return torch.stack([t.abs().max().float() for t in tensors.values() if t.dtype == torch.int8])


def test_a_variant_of_the_other_width_is_remade(models, zoo_home, monkeypatch):
    """zoo serve finds an 8-bit variant (made for a CPU with VNNI) on a CPU that needs 7 bits:
    it says so and remakes it (in its child process), once; back on a CPU that computes 8
    bits exactly, the 7-bit variant is remade in 8 (quality back); a width someone asked
    for is kept, 8 bits with a warning where they saturate."""
    from zoo.quantize import quantize, w8a8

    zoo("add", models.llama_servable, "--name", "tiny")
    registry = Registry(zoo_home)
    monkeypatch.setattr(w8a8, "weight_bits", lambda flags=None: 8)  # made where VNNI is
    made = quantize("tiny", "w8a8", registry)
    assert made.quantization["weight_bits"] == 8 and not made.quantization["weight_bits_asked"]
    assert stored_integers(zoo_home, registry).max() == 127
    monkeypatch.setattr(w8a8, "weight_bits", lambda flags=None: 7)  # served where it is not
    lines: list[str] = []
    options = ServeOptions(base="tiny", quantization="w8a8")
    base = prepare_base(options, registry, lines.append)
    assert len(lines) == 1 and lines[0].startswith("remaking tiny@w8a8") and "VNNI" in lines[0]
    assert base.variants["w8a8"].quantization["weight_bits"] == 7
    largest = stored_integers(zoo_home, registry)
    assert largest.max() == 63, largest  # and every tensor within -63..63
    prepare_base(options, registry, lines.append)
    assert len(lines) == 1  # remade once
    monkeypatch.setattr(w8a8, "weight_bits", lambda flags=None: 8)  # zoo's GEMM, or VNNI
    base = prepare_base(options, registry, lines.append)
    assert len(lines) == 2 and lines[1].startswith("remaking tiny@w8a8: its 7-bit weights")
    assert base.variants["w8a8"].quantization["weight_bits"] == 8
    assert stored_integers(zoo_home, registry).max() == 127
    assert prepare_base(options, registry, lines.append).variants["w8a8"] == base.variants["w8a8"]
    assert len(lines) == 2
    asked = quantize("tiny", "w8a8", registry, force=True, bits=8)
    monkeypatch.setattr(w8a8, "weight_bits", lambda flags=None: 7)
    assert prepare_base(options, registry, lines.append).variants["w8a8"] == asked
    assert len(lines) == 3 and lines[2].startswith("warning: tiny@w8a8 has 8-bit weights, as asked")
    asked = quantize("tiny", "w8a8", registry, force=True, bits=7)
    monkeypatch.setattr(w8a8, "weight_bits", lambda flags=None: 8)
    assert prepare_base(options, registry, lines.append).variants["w8a8"] == asked
    assert len(lines) == 3  # 7 bits asked for: kept, silently


@pytest.mark.parametrize("bits", ["7", "8"])
def test_zoo_quantize_writes_the_width_asked_for(models, zoo_home, bits):
    zoo("add", models.llama, "--name", "tiny")
    out = zoo("quantize", "tiny", "--scheme", "w8a8", "--weight-bits", bits, "--no-eval").stdout
    assert ("weights in 7 bits" in out) == (bits == "7")
    registry = Registry(zoo_home)
    assert registry.load().base("tiny").variants["w8a8"].quantization["weight_bits"] == int(bits)
    assert stored_integers(zoo_home, registry).max() == LEVELS[int(bits)]


def test_the_calibration_follows_the_cpus_int8_kernel():
    """SmoothQuant's alpha and the share kept in 16 bits, by the kernel that serves the
    weights: vLLM's AMX kernel, oneDNN's (with VNNI, or on other CPUs), zoo's (x86
    without VNNI), 7-bit weights."""
    from zoo.quantize.w8a8 import recipe

    assert recipe(8, frozenset({"avx512_vnni", "amx_tile", "amx_int8"})) == (0.5, 0.125)
    assert recipe(8, frozenset({"avx512_vnni", "avx512_bf16"})) == (0.65, 0.125)
    assert recipe(8, frozenset()) == (0.65, 0.125)
    assert recipe(8, frozenset({"sse2", "avx2"})) == (0.75, 0.125)  # zoo's GEMM
    assert recipe(7, frozenset({"avx2"})) == (0.65, 0.25)


def test_a_variant_calibrated_for_another_kernel_is_remade(models, zoo_home, monkeypatch):
    """zoo serve finds a variant written with another CPU's defaults (an AMX Xeon's alpha,
    say, served on oneDNN's kernel): it says so and remakes it with this CPU's, once; a
    variant whose settings were asked for is kept as it is."""
    from zoo.quantize import quantize, w8a8

    zoo("add", models.llama_servable, "--name", "tiny")
    registry = Registry(zoo_home)
    bits = weight_bits()
    here = w8a8.recipe(bits)
    elsewhere = (0.5, 0.125) if here != (0.5, 0.125) else (0.65, 0.125)
    with monkeypatch.context() as patched:
        patched.setattr(w8a8, "recipe", lambda bits, flags=None: elsewhere)
        made = quantize("tiny", "w8a8", registry)
    assert (made.quantization["alpha"], made.quantization["keep_at_most"]) == elsewhere
    lines: list[str] = []
    options = ServeOptions(base="tiny", quantization="w8a8")
    base = prepare_base(options, registry, lines.append)
    assert len(lines) == 1 and lines[0].startswith("remaking tiny@w8a8"), lines
    assert "another CPU's int8 kernel" in lines[0] and f"alpha {here[0]}" in lines[0]
    remade = base.variants["w8a8"].quantization
    assert (remade["alpha"], remade["keep_at_most"]) == here and not remade["settings_asked"]
    prepare_base(options, registry, lines.append)
    assert len(lines) == 1  # remade once
    with monkeypatch.context() as patched:
        patched.setattr(w8a8, "recipe", lambda bits, flags=None: elsewhere)
        asked = quantize("tiny", "w8a8", registry, force=True, bits=bits)
    assert asked.quantization["settings_asked"]
    assert prepare_base(options, registry, lines.append).variants["w8a8"] == asked
    assert len(lines) == 1
