"""The rotary embedding on vLLM's CPU kernel (zoo/serve/cpu_rotary.py) against a float64
reference: rounded once in every dtype, on a CPU whose kernel rounds and on one whose
kernel truncates."""

from __future__ import annotations

import pytest
import torch

from tests.bounds import units_off
from zoo.serve import cpu_rotary, patches, plugin

HEAD = 64  # SmolLM2-135M's head size (9 query heads, 3 key heads)


@pytest.fixture(scope="module")
def rope():
    """A vLLM rotary embedding of SmolLM2's shape for each dtype, made as ``zoo serve``
    makes the model's (its custom op on: ``forward_cpu``), after the cpu_rotary patch."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    from zoo.serve.launch import CPU_COMPILATION

    assert patches.install([plugin.CPU_ROTARY]).applied == ["cpu_rotary"]
    config = VllmConfig(compilation_config=CompilationConfig(**CPU_COMPILATION))
    with set_current_vllm_config(config):
        return {dtype: RotaryEmbedding(HEAD, HEAD, 8192, 100000.0, True, dtype)
                for dtype in (torch.bfloat16, torch.float16, torch.float32)}


def reference(positions, rows: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Each head of ``rows`` rotated (neox style) by ``cache``'s numbers, in float64."""
    heads = rows.double().unflatten(-1, (-1, HEAD))
    x, y = heads.chunk(2, dim=-1)
    cos, sin = (c[:, None, :] for c in cache.double()[positions].chunk(2, dim=-1))
    return torch.cat([x * cos - y * sin, y * cos + x * sin], dim=-1).flatten(-2)


def rows(dtype: torch.dtype, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 8192, (tokens,), generator=g)
    query, key = (torch.randn(tokens, heads * HEAD, generator=g).to(dtype)
                  for heads in (9, 3))
    return positions, query, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_the_cpu_forward_rounds_once(rope, dtype, tokens):
    """``forward_cpu`` writes the exact rotation of the rows by the module's own cos/sin
    numbers, rounded once (within half a unit and float32's error), into ``query`` and
    ``key`` in place; and its errors do not lean toward zero."""
    module = rope[dtype]
    cache = module.cos_sin_cache.to(dtype)  # the numbers vLLM rotates by in this dtype
    positions, query, key = rows(dtype, tokens, seed=tokens)
    exact_query, exact_key = (reference(positions, r, cache) for r in (query, key))
    assert module._forward_method.__name__ == "forward_cpu"
    out_query, out_key = module(positions, query, key)
    assert out_query is query and out_key is key
    for out, exact in ((query, exact_query), (key, exact_key)):
        if dtype == torch.float32:
            assert float((out.double() - exact).abs().max()) <= 1e-5
            continue
        off = units_off(out, exact, floor=2.0**-10)
        assert float(off.abs().max()) <= 0.51
        # truncation puts every result at or below the exact one: a mean of -0.5 units
        assert abs(float(off.mean())) < 0.15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_it_knows_which_dtypes_the_kernel_truncates(rope, dtype):
    """``truncates`` says what vLLM's own kernel does on this CPU: where it says so, no
    raw result is further from zero than the exact rotation (but for float32's own error)
    and some are more than half a unit off (AVX2, or AVX-512 without BF16, in bfloat16),
    and zoo widens that dtype; where it says not, every raw result is within half a unit
    (and float32's error)."""
    positions, query, key = rows(dtype, 64, seed=7)
    cache = rope[dtype].cos_sin_cache.to(dtype)
    exact = reference(positions, query, cache)
    torch.ops._C.rotary_embedding(positions, query, key, HEAD, cache, True)
    off = units_off(query, exact, floor=2.0**-10)
    if cpu_rotary.truncates(dtype):
        assert float(off.max()) <= 0.01 and float(off.min()) < -0.51
        assert dtype in cpu_rotary._WIDENED
        assert cpu_rotary.is_ours(type(rope[dtype]).forward_cpu)
    else:
        assert float(off.abs().max()) <= 0.51
        assert dtype not in cpu_rotary._WIDENED


def test_the_patch_widens_once_and_only_the_dtypes_it_must():
    """Installed twice, ``forward_cpu`` is wrapped once; a dtype the kernel rounds to goes
    straight to vLLM's own (the same tensors back, the same numbers as the kernel's)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    patches.install([plugin.CPU_ROTARY])
    forward = RotaryEmbedding.forward_cpu
    assert patches.install([plugin.CPU_ROTARY]).applied == ["cpu_rotary"]
    assert RotaryEmbedding.forward_cpu is forward
    assert not cpu_rotary.truncates(torch.float32)
    assert torch.float32 not in cpu_rotary._WIDENED
