"""The native LoRA decode kernel (zoo/serve/lora_kernel.cpp) against the exact result, and
how zoo builds, caches and does without it."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.bounds import assert_within, lora_output_bound
from zoo.core.measure import cpu_flags
from zoo.serve import native

IN = 72  # not a multiple of the 32 bf16 numbers a vector holds: the tail is masked
WIDTHS = (100, 20)  # nor are these of 16 (100: a block of 64 columns, then a tail)
COLUMNS = 3 + WIDTHS[0] + 2 + WIDTHS[1] + 2  # y: the slices at 3, a gap of 2 after each
RANKS = [3, 8, 17, 0, 64]  # per slot: 8 + 8 + 1 rows, a slot without the slice, the most


@pytest.fixture(scope="module")
def kernel():
    built = native.kernel()
    assert built is not None, "the test machine has a C++ compiler: the kernel must build"
    return built


def test_the_kernel_uses_what_the_cpu_has(kernel):
    """Built for this machine: the AVX-512 BF16 path exactly where the CPU reports it."""
    assert kernel.avx512_bf16 == ("avx512_bf16" in cpu_flags())


def stacks(dtype, ranks=RANKS, generator=None):
    """A, B per slice ([slots, max rank, IN], [slots, max rank, width]), rows past each
    slot's rank zero, as vLLM's stacks are; and the per-slot ranks."""
    g = generator or torch.Generator().manual_seed(0)
    top = max(ranks)
    parts, start = [], 3  # the slices start at column 3 of y
    for width in WIDTHS:
        a = torch.randn(len(ranks), top, IN, generator=g) / IN ** 0.5
        b = torch.randn(len(ranks), top, width, generator=g) / top ** 0.5
        for slot, rank in enumerate(ranks):
            a[slot, rank:] = 0
            b[slot, rank:] = 0
        parts.append((a.to(dtype), b.to(dtype), start))
        start += width + 2  # a gap of two columns between them, left alone
    return parts, torch.tensor(ranks, dtype=torch.int64)


def exact(y, x, slots, parts, scale, ranks):
    """float64 reference and the rounding bound per element (tests/bounds.py)."""
    want = y.double().clone()
    bound = torch.zeros_like(want)
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for a, b, start in parts:
            r = int(ranks[slot])
            cols = slice(start, start + b.shape[2])
            want[row, cols] += scale * (x[row].double() @ a[slot, :r].double().T) @ \
                b[slot, :r].double()
            bound[row, cols] = lora_output_bound(y[row:row + 1, cols], x[row:row + 1],
                                                 a[slot, :r], b[slot, :r].T, scale, y.dtype)[0]
    return want, bound


def int8_rows(parts):
    """``parts`` as the int8 rows and scales zoo gives the kernel (fast_lora.quantize_rows),
    and the weights those stand for, exactly (float64): what the kernel must compute with."""
    from zoo.serve.fast_lora import dequantize_rows, quantize_rows

    quantized, standing = [], []
    for a, b, start in parts:
        (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
        quantized.append((qa, qb, start, sa, sb))
        standing.append((dequantize_rows(qa, sa), dequantize_rows(qb, sb), start))
    return quantized, standing


@pytest.mark.parametrize(("dtype", "weights"), [(torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.int8),
                                               (torch.float32, torch.int8)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_is_within_rounding_of_the_exact_result(kernel, dtype, weights, threads):
    """x and y in ``dtype``, A and B in ``weights`` (float32 activations on bf16 weights:
    vLLM's stacks under ``--lora-dtype bfloat16`` where activations are float32; int8:
    each row's numbers and scale, against the weights they stand for)."""
    g = torch.Generator().manual_seed(1)
    parts, ranks = stacks(torch.float32 if weights == torch.int8 else weights, generator=g)
    if weights == torch.int8:
        parts, standing = int8_rows(parts)
    else:
        standing = parts
    slots = torch.tensor([0, 1, -1, 2, 3, 4, 4, -1, 2, 0, 1, 1])
    x = torch.randn(len(slots), IN, generator=g).to(dtype)
    wide = torch.randn(len(slots), 3 + sum(WIDTHS) + 4 + 5, generator=g).to(dtype)
    y = wide[:, :3 + sum(WIDTHS) + 4]  # rows strided: a view of a wider output
    before, wide_before = y.clone(), wide.clone()
    arguments = kernel.arguments(parts, (ranks, ranks))
    assert kernel.gather(y, x, slots, arguments, 0.5, threads)
    want, bound = exact(before, x, slots, standing, 0.5, ranks)
    assert_within(y, want, bound, "the native kernel")
    untouched = (slots < 0) | (ranks[slots.clamp(min=0)] == 0)
    assert torch.equal(y[untouched], before[untouched])  # no adapter, or none on the slices
    second = 3 + WIDTHS[0] + 2
    for gap in (slice(0, 3), slice(3 + WIDTHS[0], second), slice(second + WIDTHS[1], None)):
        assert torch.equal(y[:, gap], before[:, gap])  # columns of no slice
    assert torch.equal(wide[:, -5:], wide_before[:, -5:])  # past y's columns
    changed = (y != before).any(dim=1)
    assert changed.tolist() == [not bool(u) for u in untouched]


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.int8], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_runs_of_one_adapter_give_what_their_rows_give(kernel, weights, threads):
    """A prefill's rows come in runs of one adapter: runs of 2-7 rows take the run's rows
    widened once, runs of 8 or more AMX tiles where the CPU has them (ranks up to 32: 3,
    8 and 17 here; 64 stays on AVX-512), in 16-row tiles with a short last one, inputs and
    widths not multiples of a tile. Runs of 1 to 33 rows, in one thread and two, and the
    same rows one at a time: each within rounding of the exact result (the tiles round h
    to bf16, which the bound allows)."""
    g = torch.Generator().manual_seed(3)
    parts, ranks = stacks(torch.float32 if weights == torch.int8 else weights, generator=g)
    parts, standing = int8_rows(parts) if weights == torch.int8 else (parts, parts)
    slots = torch.tensor([0] * 5 + [1] * 9 + [2] * 2 + [-1] + [3] * 3 + [4] * 6 + [2] +
                         [0] * 16 + [1] * 33 + [4] * 17)
    x = torch.randn(len(slots), IN, generator=g).bfloat16()
    y = torch.randn(len(slots), 3 + sum(WIDTHS) + 4, generator=g).bfloat16()
    arguments = kernel.arguments(parts, (ranks, ranks))
    together, alone = y.clone(), y.clone()
    assert kernel.gather(together, x, slots, arguments, 0.5, threads)
    for row in range(len(slots)):
        assert kernel.gather(alone[row:row + 1], x[row:row + 1], slots[row:row + 1],
                             arguments, 0.5)
    want, bound = exact(y, x, slots, standing, 0.5, ranks)
    assert_within(together, want, bound, "runs of one adapter")
    assert_within(alone, want, bound, "each row alone")


def test_int8_rows_are_within_half_a_step_of_the_weights():
    """quantize_rows: every number within half its row's step (the row's largest magnitude
    / 127) of the weight, the largest exactly at +-127; an all-zero row stays zero."""
    from zoo.serve.fast_lora import dequantize_rows, quantize_rows

    rows = torch.randn(6, 4, 300, generator=torch.Generator().manual_seed(2)).bfloat16()
    rows[1, 2] = 0
    numbers, scales = quantize_rows(rows)
    assert numbers.dtype == torch.int8 and scales.shape == (6, 4)
    step = rows.double().abs().amax(dim=-1) / 127
    error = (dequantize_rows(numbers, scales) - rows.double()).abs()
    assert bool((error <= step[..., None] * (0.5 + 1e-6)).all())
    assert bool((numbers.abs().amax(dim=-1)[step > 0] == 127).all())
    assert not numbers[1, 2].any() and scales[1, 2] == 0


def test_the_kernel_reads_each_adapter_at_its_own_rank(kernel):
    """Rows past a slot's rank are not read: filled with numbers here, they change nothing
    (vLLM leaves them zero; the point is that they are never fetched)."""
    parts, ranks = stacks(torch.bfloat16)
    noisy = []
    for a, b, start in parts:
        a, b = a.clone(), b.clone()
        for slot, rank in enumerate(ranks.tolist()):
            a[slot, rank:] = 7.0
            b[slot, rank:] = 7.0
        noisy.append((a, b, start))
    slots = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, IN).bfloat16()
    clean, dirty = torch.zeros(4, COLUMNS).bfloat16(), torch.zeros(4, COLUMNS).bfloat16()
    assert kernel.gather(clean, x, slots, kernel.arguments(parts, (ranks, ranks)), 1.0)
    assert kernel.gather(dirty, x, slots, kernel.arguments(noisy, (ranks, ranks)), 1.0)
    assert torch.equal(clean, dirty)
    full = torch.zeros(4, COLUMNS).bfloat16()  # without ranks every row is read: not blind
    assert kernel.gather(full, x, slots, kernel.arguments(noisy, (None, None)), 1.0)
    assert not torch.equal(full, clean)


def test_the_kernel_declines_what_it_was_not_written_for(kernel):
    parts, ranks = stacks(torch.float16)
    assert kernel.arguments(parts, (ranks, ranks)) is None  # float16
    parts, ranks = stacks(torch.bfloat16, ranks=[65, 2])
    assert kernel.arguments(parts, (ranks, ranks)) is None  # rank over 64
    parts, ranks = stacks(torch.bfloat16)
    arguments = kernel.arguments(parts, (ranks, ranks))
    y = torch.zeros(2, COLUMNS).bfloat16()
    slots = torch.tensor([0, 1])
    assert not kernel.gather(y, torch.randn(2, IN), slots, arguments, 1.0)  # float32 x, bf16 y
    quantized, _ = int8_rows(stacks(torch.float32)[0])
    assert kernel.arguments([q[:3] for q in quantized], (ranks, ranks)) is None  # no scales
    wide = kernel.arguments(stacks(torch.float32)[0], (ranks, ranks))
    assert not kernel.gather(y, torch.randn(2, IN).bfloat16(), slots, wide, 1.0)  # bf16 on f32
    assert not kernel.gather(y, torch.randn(2, IN).bfloat16(), slots.int(), arguments, 1.0)
    assert not kernel.gather(y, torch.randn(2, IN + 1).bfloat16(), slots, arguments, 1.0)
    x = torch.randn(2, IN).bfloat16()
    assert not kernel.gather(y, x, torch.tensor([0, len(RANKS)]), arguments, 1.0)  # no slot
    assert not kernel.gather(y[:, :COLUMNS - 4], x, slots, arguments, 1.0)  # y ends before a part
    assert torch.equal(y, torch.zeros(2, COLUMNS).bfloat16())
    assert kernel.gather(y, x, slots, arguments, 1.0)  # and what it takes, it does


def test_a_machine_without_the_kernel_gets_the_same_result_in_pytorch(kernel, monkeypatch):
    from zoo.serve import fast_lora

    parts, ranks = stacks(torch.bfloat16)
    parts = fast_lora.Parts(parts)
    parts.ranks = (ranks, ranks)
    slots = torch.tensor([4, 0, -1, 2, 1])
    x = torch.randn(5, IN).bfloat16()
    y = torch.randn(5, COLUMNS).bfloat16()
    with_kernel, without = y.clone(), y.clone()
    fast_lora._Gathered(slots).add(with_kernel, x, parts, 0.5)
    monkeypatch.setattr(native, "kernel", lambda: None)
    fast_lora._Gathered(slots).add(without, x, parts, 0.5)
    want, bound = exact(y, x, slots, parts, 0.5, ranks)
    assert_within(with_kernel, want, bound, "the native kernel")
    assert_within(without, want, bound, "PyTorch")
    assert not torch.equal(without, y)


def test_the_kernel_is_built_once_and_kept(tmp_path, monkeypatch):
    import subprocess

    path = native.build(tmp_path)
    assert path.parent == tmp_path and path.suffix == ".so"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no scratch left
    real_run = subprocess.run

    def no_compiling(argv, **kwargs):
        assert "-shared" not in argv, "built again"
        return real_run(argv, **kwargs)

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.build(tmp_path) == path
    assert native.Kernel(path).gather  # it loads


def test_another_version_of_the_source_is_built_beside(tmp_path):
    """Benchmarks build an earlier commit's kernel (bench/lora_step.py): a source that
    differs gets a library of its own, and this version's is left as it was."""
    ours = native.build(tmp_path / "cache")
    other = tmp_path / "lora_kernel.cpp"
    other.write_text(native.SOURCE.read_text() + "\n// another version\n")
    theirs = native.build(tmp_path / "cache", source_file=other)
    assert theirs != ours and theirs.parent == ours.parent
    assert native.build(tmp_path / "cache") == ours
    assert native.Kernel(theirs).gather


def test_without_a_compiler_zoo_warns_once_and_goes_on(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "c++"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("ZOO_KERNEL_CACHE", str(tmp_path / "cache"))
    native.kernel.cache_clear()
    native._built.cache_clear()  # as in a new process
    try:
        with caplog.at_level(logging.WARNING, logger="zoo.serve"):
            assert native.kernel() is None
            assert native.kernel() is None
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 1 and "broken compiler" in messages[0], messages
        assert not list((tmp_path / "cache").glob("*.so"))
    finally:
        native.kernel.cache_clear()
        native._built.cache_clear()


def awkward_rows(dtype) -> torch.Tensor:
    """[5 slots, 4 rows, 300] weights with what quantizing rows can trip on: a zero row, a
    row of -0.0, subnormal and huge magnitudes, and numbers that fall exactly half-way
    between two steps (each row's largest is 127 * 2^-k, so multiples of 2^-(k+1) do)."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(5, 4, 300, generator=g)
    rows[0, 1] = 0
    rows[0, 2] = -0.0
    rows[1, 0] = torch.randn(300, generator=g) * 1e-39  # subnormal in float32
    rows[1, 1] = torch.randn(300, generator=g) * 1e30
    ties = torch.randint(-254, 255, (300,), generator=g) / 2.0  # k + 0.5 steps
    ties[0] = 127
    rows[2, 3] = ties * 2.0 ** -3
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_quantizes_rows_as_the_reference_does(kernel, dtype):
    """native quantize_rows gives fast_lora.quantize_rows' bits (numbers and scales) for
    contiguous rows and for B's rows, columns of vLLM's [slots, 1, out, rank] stack; with
    ``slots``, those slots only, in place; a NaN or an infinity is left to the reference."""
    from zoo.serve.fast_lora import quantize_rows

    rows = awkward_rows(dtype)
    stack = rows.transpose(1, 2).contiguous().unsqueeze(1)  # B as vLLM stacks it
    for view in (rows, stack[:, 0].transpose(1, 2), rows[:, 1:3]):
        got, want = kernel.quantize_rows(view), quantize_rows(view)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bool((want[0] == 0).all()) is False  # (the rows are not all zero)
    kept = tuple(t.clone() for t in quantize_rows(rows))
    before = tuple(t.clone() for t in kept)
    changed = rows.clone()
    changed[1] = changed[3] * 3
    changed[3] = -changed[0]
    slots = torch.tensor([1, 3])
    assert kernel.quantize_rows(changed, slots, kept) is kept
    fresh = quantize_rows(changed)
    for k, b, f in zip(kept, before, fresh, strict=True):
        assert torch.equal(k[slots], f[slots]) and torch.equal(k[[0, 2, 4]], b[[0, 2, 4]])
    for odd in (float("nan"), float("inf")):
        spoiled = rows.clone()
        spoiled[4, 2, 7] = odd
        assert kernel.quantize_rows(spoiled) is None
    assert kernel.quantize_rows(rows.half()) is None  # a dtype it does not take
    with pytest.raises(ValueError):
        kernel.quantize_rows(rows, torch.tensor([1, 3], dtype=torch.int32), kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_finds_each_slots_rank_as_the_reference_does(kernel, dtype):
    """native row_ranks gives fast_lora._ranks_of's ranks: one past the last row with a
    number that is not zero (-0.0 is zero; a row holding a NaN does not count, as amax's
    NaN is not above zero), for every slot or, in place, for some."""
    from zoo.serve.fast_lora import _ranks_of

    a = torch.zeros(6, 1, 16, 40, dtype=dtype)
    a[1, 0, :3] = 1
    a[2, 0, 5, 39] = -1e-30
    a[3, 0, 7] = -0.0
    a[4, 0, :2] = 1
    a[4, 0, 9, 3] = float("nan")
    a[5, 0, 15, 0] = float("inf")
    want = _ranks_of(a)
    assert want.tolist() == [0, 3, 6, 0, 2, 16]
    assert torch.equal(kernel.row_ranks(a[:, 0]), want)
    kept = want.clone()
    a[0, 0, 11] = 2
    a[1] = 0
    assert kernel.row_ranks(a[:, 0], torch.tensor([0, 1]), kept) is kept
    assert kept.tolist() == [12, 0, 6, 0, 2, 16] == _ranks_of(a).tolist()
