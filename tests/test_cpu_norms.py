"""zoo's ``zoo_cpu`` provider of vLLM's norms (zoo/serve/cpu_norms.py) against a float64
reference, and vLLM's dispatch to it only where its kernels take the arguments."""

from __future__ import annotations

import pytest
import torch

from zoo.serve import cpu_norms, patches, plugin

# relative to the exact norm: in 16 bits 0.6 of a unit in the last place (one rounding of
# a float32 result, 0.49-0.54 measured; the native provider, which rounds twice, is off by
# 0.74-1.31), in float32 four (float32 arithmetic; both providers 1.2-2.2)
ROUNDING = {torch.bfloat16: 0.6 * 2.0**-7, torch.float16: 0.6 * 2.0**-10,
            torch.float32: 4 * 2.0**-23}


@pytest.fixture(scope="module")
def ir():
    from vllm import ir

    cpu_norms.register()
    return ir


def reference(x: torch.Tensor, weight: torch.Tensor, epsilon: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon) * weight.double()


def beyond_one_rounding(out: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest error over its bound (above 0: more than one rounding off; numbers
    under 1e-3 are held to the bound of 1e-3)."""
    bound = ROUNDING[out.dtype] * exact.abs().clamp(min=1e-3)
    return float(((out.double() - exact).abs() - bound).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (64, 576), (2048, 576), (2, 5, 64)], ids=str)
def test_the_providers_round_once(ir, dtype, shape):
    """Both ops of zoo's provider are the exact norm rounded once; the fused one's residual
    is the native one's (x + residual, rounded once), and it writes both in place."""
    g = torch.Generator().manual_seed(sum(shape))
    x, residual = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(shape[-1], generator=g).to(dtype)
    assert beyond_one_rounding(cpu_norms.rms_norm(x, weight, 1e-5),
                               reference(x, weight, 1e-5)) <= 0
    native = ir.ops.fused_add_rms_norm.impls["native"].impl_fn
    normed, summed = native(x, residual, weight, 1e-5)
    x_in, residual_in = x.clone(), residual.clone()
    out, out_residual = cpu_norms.fused_add_rms_norm(x_in, residual_in, weight, 1e-5)
    assert out is x_in and out_residual is residual_in
    assert torch.equal(out_residual, summed)
    assert beyond_one_rounding(out, reference(summed, weight, 1e-5)) <= 0
    if dtype != torch.float32:  # the bound tells a second rounding
        assert beyond_one_rounding(normed, reference(summed, weight, 1e-5)) > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_it_knows_which_dtypes_the_kernel_truncates(ir, dtype):
    """``truncates`` says what vLLM's own kernel does on this CPU: where it says so, no raw
    result is further from zero than the exact norm (but for float32's own error) and
    some are more than a rounding off (AVX2, or AVX-512 without BF16, in bfloat16), and
    the provider widens that dtype; where it says not, every raw result is within one
    rounding."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 576, generator=g).to(dtype)
    weight = torch.randn(576, generator=g).to(dtype)
    raw = torch.empty_like(x)
    torch.ops._C.rms_norm(raw, x, weight, 1e-5)
    exact = reference(x, weight, 1e-5)
    if cpu_norms.truncates(dtype):
        # (the kernel's float32 arithmetic may land a hair past the exact norm)
        assert bool((raw.double().abs() <= exact.abs() * (1 + 2.0**-16)).all())
        assert beyond_one_rounding(raw, exact) > 0
        assert dtype in cpu_norms._WIDENED
    else:
        assert beyond_one_rounding(raw, exact) <= 0
        assert dtype not in cpu_norms._WIDENED


def test_vllm_dispatches_to_it_only_where_its_kernels_take_the_call(ir):
    """zoo_cpu first, native after: rows its kernels do not take (a width not a multiple
    of 32, not contiguous, no weight, a weight of another dtype, a variance size
    override) go to native, which gives the same result as before."""
    rows, weight = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    with ir.ops.rms_norm.set_priority([cpu_norms.PROVIDER, "native"]):
        def provider(x, w=weight, variance_size=None):
            return ir.ops.rms_norm.dispatch(x, w, 1e-5, variance_size).provider

        assert provider(rows) == cpu_norms.PROVIDER
        assert provider(torch.randn(4, 100, dtype=torch.bfloat16), torch.randn(100)) == "native"
        assert provider(torch.randn(64, 4, dtype=torch.bfloat16).t()) == "native"
        assert provider(rows, None) == "native"
        assert provider(rows, weight.float()) == "native"
        assert provider(rows, variance_size=32) == "native"
        odd = torch.randn(3, 100, dtype=torch.bfloat16)
        assert torch.equal(ir.ops.rms_norm(odd, odd[0].contiguous(), 1e-5),
                           ir.ops.rms_norm.impls["native"].impl_fn(odd, odd[0], 1e-5))
    with ir.ops.fused_add_rms_norm.set_priority([cpu_norms.PROVIDER, "native"]):
        residual = torch.randn(4, 64, dtype=torch.bfloat16)
        assert ir.ops.fused_add_rms_norm.dispatch(rows, residual, weight, 1e-5).provider == \
            cpu_norms.PROVIDER
        assert ir.ops.fused_add_rms_norm.dispatch(rows, residual.float(), weight,
                                                  1e-5).provider == "native"
        before = rows.clone(), residual.clone()
        ir.ops.fused_add_rms_norm(rows, residual, weight, 1e-5)  # the functional overload
        assert torch.equal(rows, before[0]) and torch.equal(residual, before[1])


def test_the_patch_puts_it_first_on_the_cpu_platform(ir):
    from vllm.platforms import cpu

    own = vars(cpu.CpuPlatform).get("get_default_ir_op_priority")  # None: the Platform's
    try:
        assert patches.install([plugin.CPU_NORMS]).applied == ["cpu_norms"]
        assert patches.install([plugin.CPU_NORMS]).applied == ["cpu_norms"]  # once
        config = cpu.CpuPlatform.get_default_ir_op_priority(None)
        assert config.rms_norm == config.fused_add_rms_norm == [cpu_norms.PROVIDER, "native"]
        assert config.gelu_and_mul_sparse == ["native"]
    finally:
        if own is None:
            del cpu.CpuPlatform.get_default_ir_op_priority
        else:
            cpu.CpuPlatform.get_default_ir_op_priority = own
