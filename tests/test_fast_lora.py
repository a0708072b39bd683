"""zoo's grouped CPU LoRA path against vLLM's own PyTorch-native one, on the same inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from tests.bounds import assert_within, beyond, lora_output_bound  # noqa: E402
from zoo.serve.fast_lora import GroupedPunicaWrapperCPU, group_rows  # noqa: E402

SLOTS, RANK, HIDDEN = 4, 8, 64
SLICES = (64, 32, 32)  # a fused q/k/v projection
IDS = [11, 22, 33, None]  # slot -> adapter id; the last slot stays empty (zeros)


def wrappers(index_mapping, prompt_mapping, prefill):
    made = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        w = cls(max_num_batched_tokens=128, max_batches=8, device="cpu")
        # as vLLM's model manager calls it: one more than the slots in the stacks
        w.update_metadata(LoRAMapping(index_mapping, prompt_mapping, is_prefill=prefill),
                          IDS, SLOTS + 1, 256)
        made.append(w)
    return made


def stacked(dtype, zero_slots=(3,)):
    g = torch.Generator().manual_seed(0)
    a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype) for _ in SLICES)
    b = tuple(torch.randn(SLOTS, 1, s, RANK, generator=g).to(dtype) for s in SLICES)
    for t in (*a, *b):
        for slot in zero_slots:
            t[slot].zero_()
    return a, b


CASES = {
    "decode, mixed adapters and none": ([11, 22, 0, 33, 11, 0, 22, 22], False),
    "two of the four slots": ([22, 0, 22, 33, 0, 0, 0, 0], False),  # weights gathered
    "prefill, mixed": ([11, 11, 11, 22, 22, 0, 0, 33], True),
    "prefill, long groups": ([11] * 20 + [0] * 5 + [22] * 17 + [33] * 18, True),
    "prefill, one long group beside short ones": ([11] * 40 + [0] * 3 + [22] + [33], True),
    "one adapter": ([22] * 8, False),
    "one adapter and none": ([22, 0, 22, 0, 0, 22, 22, 0], False),
    "no adapter": ([0] * 8, False),
}


def reference(base, x, a, b, scale, slots, dtype):
    """The exact LoRA output per row (float64) and the rounding bound of computing it in
    ``dtype``: row i uses slot ``slots[i]`` on every slice (None: no adapter, unchanged)."""
    exact, bound = base.double().clone(), torch.zeros_like(base, dtype=torch.float64)
    for row, slot in enumerate(slots):
        if slot is None:
            continue
        offset = 0
        for a_s, b_s in zip(a, b, strict=True):
            width = b_s.shape[2]
            cols = slice(offset, offset + width)
            args = (base[row:row + 1, cols], x[row:row + 1], a_s[slot, 0], b_s[slot, 0], scale)
            exact[row, cols] += scale * (x[row].double() @ a_s[slot, 0].double().T) @ \
                b_s[slot, 0].double().T
            bound[row, cols] = lora_output_bound(*args, dtype)[0]
            offset += width
    return exact, bound


@pytest.fixture(params=["native", "native-int8", "pytorch"])
def lora_path(request, monkeypatch):
    """zoo's path on the native kernel reading the stacks' own dtype, reading int8 rows
    (the default), and on the PyTorch plans it falls back to where the kernel cannot be
    built."""
    from zoo.serve import fast_lora, native

    monkeypatch.setattr(fast_lora, "INT8_ROWS", request.param == "native-int8")
    if request.param == "pytorch":
        monkeypatch.setattr(native, "kernel", lambda: None)
    else:
        assert native.kernel() is not None, "this machine has a C++ compiler"
    return request.param


def standing(a, b, lora_path):
    """The weights zoo's path computes with: on int8 rows, the weights each row's numbers
    and scale stand for (float64); else the stacks themselves."""
    if lora_path != "native-int8":
        return a, b
    from zoo.serve.fast_lora import dequantize_rows, quantize_rows

    def back(rows):
        return dequantize_rows(*quantize_rows(rows))
    return (tuple(back(t[:, 0])[:, None] for t in a),
            tuple(back(t[:, 0].transpose(1, 2)).transpose(1, 2)[:, None] for t in b))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("dtype", "weights"), [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_linear_matches_vllm(case, dtype, weights, lora_path):
    """zoo's and vLLM's outputs each within the rounding bound of the exact result (so
    within twice it of each other); the same rows with another slot's adapter are not.
    Activations in ``dtype``, the stacks in ``weights`` (float32 on bf16: vLLM's stacks
    under ``--lora-dtype bfloat16`` where the CPU computes in float32)."""
    tokens, prefill = CASES[case]
    ours_ref = wrappers(tokens, tokens, prefill)
    a, b = stacked(weights)
    x = torch.randn(len(tokens), HIDDEN).to(dtype)
    base = torch.randn(len(tokens), sum(SLICES)).to(dtype)
    outputs = []
    for w in ours_ref:
        y = base.clone()
        w.add_lora_linear(y, x, a, b, 0.5, SLICES)
        outputs.append(y)
    slots = [IDS.index(t) if t else None for t in tokens]
    exact, bound = reference(base, x, a, b, 0.5, slots, dtype)
    assert_within(outputs[0], exact, bound, "vLLM's own path")
    ours, ours_bound = reference(base, x, *standing(a, b, lora_path), 0.5, slots, dtype)
    assert_within(outputs[1], ours, ours_bound, "zoo's path")
    assert (ours_ref[1]._plan is None) == (lora_path != "pytorch" or case == "no adapter")
    changed = (outputs[1] != base).any(dim=1)
    assert changed.tolist() == [t != 0 for t in tokens]  # rows without an adapter untouched
    if any(s is not None for s in slots):  # the bound tells another adapter's output apart
        swapped = [None if s is None else (s + 1) % 3 for s in slots]
        wrong, _ = reference(base, x, a, b, 0.5, swapped, dtype)
        rows = torch.tensor([s is not None for s in slots])
        assert beyond(wrong[rows], exact[rows], bound[rows])


def test_rows_of_more_dimensions_are_viewed_flat(lora_path):
    """vLLM hands the CPU's layers 2-D rows, which zoo's path takes as they are; rows with
    a leading dimension are viewed flat first, to the same result."""
    tokens, prefill = CASES["decode, mixed adapters and none"]
    _ref, ours = wrappers(tokens, tokens, prefill)
    a, b = stacked(torch.float32)
    x = torch.randn(len(tokens), HIDDEN)
    base = torch.randn(len(tokens), sum(SLICES))
    flat, shaped = base.clone(), base.clone()[None]
    ours.add_lora_linear(flat, x, a, b, 0.5, SLICES)
    ours.add_lora_linear(shaped, x[None], a, b, 0.5, SLICES)
    assert not torch.equal(flat, base) and torch.equal(shaped[0], flat)


def test_a_slot_above_the_kernels_rank_leaves_other_steps_on_the_kernel(lora_path):
    """The native kernel's views of a layer are cut at the largest rank any slot uses;
    where that is more than it takes (a rank-72 adapter in a slot), a step of other
    adapters still runs on the kernel, through views cut at the step's own ranks."""
    tokens = [22, 33, 0, 22, 33, 33, 0, 22]  # slots 1 and 2 (rank 8); slot 0 holds rank 72
    _ref, ours = wrappers(tokens, tokens, False)
    g = torch.Generator().manual_seed(1)
    a = tuple(torch.zeros(SLOTS, 1, 80, HIDDEN) for _ in SLICES)
    b = tuple(torch.zeros(SLOTS, 1, size, 80) for size in SLICES)
    for a_s, b_s in zip(a, b, strict=True):
        for slot, rank in ((0, 72), (1, RANK), (2, RANK)):
            a_s[slot, 0, :rank] = torch.randn(rank, HIDDEN, generator=g)
            b_s[slot, 0, :, :rank] = torch.randn(b_s.shape[2], rank, generator=g)
    x, base = torch.randn(len(tokens), HIDDEN), torch.randn(len(tokens), sum(SLICES))
    y = base.clone()
    ours.add_lora_linear(y, x, a, b, 0.5, SLICES)
    exact, bound = reference(base, x, a, b, 0.5, [IDS.index(t) if t else None for t in tokens],
                             torch.float32)
    assert_within(y, exact, bound, "zoo's path")
    assert (ours._plan is None) == (lora_path != "pytorch")


def test_logits_skip_is_exact_and_not_blind():
    tokens = [11, 22, 0, 33]
    ref, ours = wrappers(tokens, tokens, False)
    vocab = 256
    a = torch.zeros(SLOTS, 1, RANK, HIDDEN)
    b = torch.zeros(SLOTS, 1, vocab, RANK)
    x = torch.randn(4, HIDDEN)
    base = torch.randn(4, vocab)
    y = base.clone()
    ours.add_lora_logits(y, x, a, b, 1.0)
    assert torch.equal(y, base)  # no adapter has lm_head weights: nothing added
    b[2].normal_()  # adapter 33's B without its A: it would add exact zeros
    ours.add_lora_logits(y, x, a, b, 1.0)
    assert torch.equal(y, base)
    a[1].normal_()
    b[1].normal_()  # now slot 1 (adapter 22) has some: the skip must notice
    expected, got = base.clone(), base.clone()
    ref.add_lora_logits(expected, x, a, b, 1.0)
    ours.add_lora_logits(got, x, a, b, 1.0)
    slots = [IDS.index(t) if t else None for t in tokens]
    exact, bound = reference(base, x, (a,), (b,), 1.0, slots, torch.float32)
    assert_within(expected, exact, bound, "vLLM's own logits")
    assert_within(got, exact, bound, "zoo's logits")
    assert not torch.equal(got, base)


def test_logits_skip_groups_no_rows_when_no_adapter_of_the_step_has_lm_head_weights():
    """The skip looks at the step's slots only: a slot outside the batch with lm_head
    weights neither adds anything nor makes the step group its rows (0.5 ms a step of 64
    adapters); one inside does both."""
    tokens = [22, 0, 33, 22]
    ref, ours = wrappers(tokens, tokens, False)
    vocab = 256
    a, b = torch.zeros(SLOTS, 1, RANK, HIDDEN), torch.zeros(SLOTS, 1, vocab, RANK)
    a[0].normal_()
    b[0].normal_()  # adapter 11, not in this step
    x, base = torch.randn(4, HIDDEN), torch.randn(4, vocab)
    y = base.clone()
    ours.add_lora_logits(y, x, a, b, 1.0)
    assert torch.equal(y, base) and "sampler" not in ours._groups
    a[2].normal_()
    b[2].normal_()  # adapter 33, in it
    expected = base.clone()
    ref.add_lora_logits(expected, x, a, b, 1.0)
    ours.add_lora_logits(y, x, a, b, 1.0)
    assert "sampler" in ours._groups and not torch.equal(y, base)
    slots = [IDS.index(t) if t else None for t in tokens]
    exact, bound = reference(base, x, (a,), (b,), 1.0, slots, torch.float32)
    assert_within(y, exact, bound, "zoo's logits")
    assert_within(expected, exact, bound, "vLLM's own logits")


def test_embedding_skip_is_exact_and_not_blind():
    """vLLM adds an embedding LoRA for every adapter; zoo skips it when no adapter of the
    step has embedding weights (an adapter outside the step may)."""
    tokens = [11, 22, 0, 22]
    ref, ours = wrappers(tokens, tokens, False)
    b = torch.zeros(SLOTS, 1, HIDDEN, RANK)
    b[2].normal_()  # adapter 33's: not in this step
    x = torch.randn(4, RANK)
    base = torch.randn(4, HIDDEN)
    expected, got = base.clone(), base.clone()
    ref.add_lora_embedding(expected, x, b, add_input=True)
    ours.add_lora_embedding(got, x, b, add_input=True)
    assert torch.equal(got, base) and torch.equal(expected, base)
    b[1].normal_()  # now adapter 22 has some: the skip must notice
    expected, got = base.clone(), base.clone()
    ref.add_lora_embedding(expected, x, b, add_input=True)
    ours.add_lora_embedding(got, x, b, add_input=True)
    assert torch.equal(got, expected) and not torch.equal(got, base)


def test_group_rows():
    groups = group_rows(torch.tensor([2, -1, 2, 0]))
    assert [(s, r.tolist()) for s, r in groups] == [(0, [3]), (2, [0, 2])]
    assert group_rows(torch.tensor([1, 1, 1])) == [(1, None)]
    assert group_rows(torch.tensor([-1, -1])) == []


def test_each_kind_of_step_gets_its_plan():
    """The cases above compare outputs; this checks that they reach every plan."""
    from zoo.serve.fast_lora import _Batched, _Gathered, _One, _plan, _Sorted

    def plan(indices: list[int]):
        return _plan(group_rows(torch.tensor(indices)), torch.tensor(indices))

    assert plan([-1, -1]) is None
    assert isinstance(plan([2, -1, 2]), _One)
    assert isinstance(plan([0, 1, 2, 3, -1]), _Gathered)  # decode
    assert isinstance(plan([0, 0, 0, 1, 1, -1, -1, 2]), _Gathered)  # "prefill, mixed"
    assert isinstance(plan([0] * 20 + [-1] * 5 + [1] * 17 + [2] * 18), _Batched)
    assert isinstance(plan([0] * 40 + [1, 2]), _Sorted)  # padding: 120 rows for 42


def _generate_both_ways(base, adapters, tmp_path) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("vllm_generate.py")
    runs = {}
    for fast in ("1", "0"):
        out = tmp_path / f"out-{fast}.json"
        done = subprocess.run([sys.executable, str(script), str(base), str(out), *adapters],
                              env={**os.environ, "ZOO_FAST_LORA": fast}, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[fast] = json.loads(out.read_text())
        runs[fast]["log"] = done.stdout + done.stderr
    return runs


def distance(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.vllm
def test_zoos_path_runs_and_scores_like_vllms_own(smollm2_home, tmp_path):
    """End to end on the 16-bit base (float32 activations on bf16 LoRA stacks), one engine
    each way: 64 rank-8 q/v adapters, 3 on all seven projections and the base in the same
    steps. Which path ran is read from the engine's own log line ("Using <punica
    wrapper>"); zoo's decode steps ran the native kernel (no warning that it was missing
    or declined a call). Each model's log-probabilities of one text under zoo's path are
    nearer vLLM's own for the same model than half the distance between any two models (so
    a swapped adapter fails), every adapter changes them, and the greedy answers are the
    same up to where vLLM's own answer stood at a near-tie: its two likeliest tokens within
    four times the log-probabilities' largest difference (zoo's int8 rows move each weight
    by up to half its row's step; a path computing another adapter parts at a sure token)."""
    from tests.factory import write_random_lora

    base = smollm2_home / "bases" / "smollm2-135m-instruct"
    adapters = [str(write_random_lora(tmp_path / f"qv{i}", base, seed=i, scale=0.05,
                                      targets=("q_proj", "v_proj"))) for i in range(64)]
    adapters += [str(write_random_lora(tmp_path / f"all{i}", base, seed=100 + i, scale=0.05))
                 for i in range(3)]
    runs = _generate_both_ways(base, adapters, tmp_path)
    assert "Using GroupedPunicaWrapperCPU" in runs["1"]["log"]
    assert "Using PunicaWrapperCPU" in runs["0"]["log"]
    assert "GroupedPunicaWrapperCPU" not in runs["0"]["log"]
    assert "native LoRA kernel" not in runs["1"]["log"]  # built, loaded and taking every call
    ours, theirs = runs["1"], runs["0"]
    models = [k for k in theirs if k != "log"]
    assert len(models) == 68 and set(models) <= set(ours)
    noise = max(distance(ours[m]["scores"], theirs[m]["scores"]) for m in models)
    separation = min(distance(theirs[m]["scores"], theirs[o]["scores"])
                     for i, m in enumerate(models) for o in models[i + 1:])
    print(f"log-probability noise {noise:.2e}, separation {separation:.2e}")
    assert noise < separation / 2, (noise, separation)
    for m in models:
        assert min(models, key=lambda o: distance(ours[m]["scores"], theirs[o]["scores"])) == m
    for m in models:
        mine, reference = ours[m]["tokens"], theirs[m]["tokens"]
        parted = next((i for i, (a, b) in enumerate(zip(mine, reference, strict=False))
                       if a != b), None)
        assert parted is None or theirs[m]["margins"][parted] <= 4 * noise, \
            (m, ours[m]["text"], theirs[m]["text"], theirs[m]["margins"][parted], noise)
        if parted is None:
            assert mine == reference, (m, ours[m]["text"], theirs[m]["text"])


def test_64_adapters_of_mixed_ranks_and_targets_match_vllm(lora_path):
    """A decode step of 64 adapters (and tokens without one) as a server sees it: adapters
    of rank 4 and 8 in slots stacked at 16, some training only the first and last slice
    (q and v of a fused q/k/v), against vLLM's own ops."""
    slots, max_rank, hidden = 64, 16, 64
    ids = list(range(1, slots + 1))
    g = torch.Generator().manual_seed(1)
    a = tuple(torch.zeros(slots, 1, max_rank, hidden) for _ in SLICES)
    b = tuple(torch.zeros(slots, 1, s, max_rank) for s in SLICES)
    for slot in range(slots):
        rank = 4 if slot % 2 else 8
        for i in range(len(SLICES)):
            if i == 1 and slot % 3:  # most adapters skip the middle slice (k)
                continue
            a[i][slot, 0, :rank] = torch.randn(rank, hidden, generator=g)
            b[i][slot, 0, :, :rank] = torch.randn(SLICES[i], rank, generator=g)
    for tokens, prefill in (([*ids, 0, 0, 5, 9], False), (sorted(ids * 3) + [0] * 4, True),
                            ([7] * 40 + [8] * 40, True)):
        made = []
        for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
            w = cls(max_num_batched_tokens=256, max_batches=slots + 8, device="cpu")
            w.update_metadata(LoRAMapping(tokens, tokens, is_prefill=prefill), ids, slots + 1,
                              256)
            made.append(w)
        x = torch.randn(len(tokens), hidden, generator=g)
        base = torch.randn(len(tokens), sum(SLICES), generator=g)
        outputs = []
        for w in made:
            y = base.clone()
            w.add_lora_linear(y, x, a, b, 0.5, SLICES)
            outputs.append(y)
        # vLLM 0.32's torch ops index slot -1 (no adapter) as the last slot, so with every
        # slot taken they add slot 63's adapter to tokens that have none; compare the rows
        # with an adapter, and check that zoo leaves the others alone
        rows = torch.tensor([t != 0 for t in tokens])
        exact, bound = reference(base, x, a, b, 0.5, [t - 1 if t else None for t in tokens],
                                 torch.float32)
        assert_within(outputs[0][rows], exact[rows], bound[rows], "vLLM's own path")
        ours, ours_bound = reference(base, x, *standing(a, b, lora_path), 0.5,
                                     [t - 1 if t else None for t in tokens], torch.float32)
        assert_within(outputs[1], ours, ours_bound, "zoo's path")
        assert (outputs[1] != base).any(dim=1).tolist() == rows.tolist()
        assert (made[1]._plan is None) == (lora_path != "pytorch")


class OneLayer:
    """What reset_lora touches: the stacks of one layer (8 slots, rank 16)."""

    n_slices = 1

    def __init__(self):
        self.lora_a_stacked = (torch.zeros(8, 1, 16, 12),)
        self.lora_b_stacked = (torch.zeros(8, 1, 20, 16),)


def one_layer():
    """A layer whose slot writes zoo tracks, and its A and B stacks."""
    from zoo.serve import fast_lora

    fast_lora.track_slot_writes()
    layer = OneLayer()
    return layer, layer.lora_a_stacked[0], layer.lora_b_stacked[0]


def test_slot_caches_redo_only_the_slots_vllm_wrote():
    """Loading an adapter into one slot recomputes that slot's rank and layout only; the
    result equals a full recomputation, and a write zoo did not see recomputes all."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from zoo.serve import fast_lora

    layer, a, b = one_layer()
    assert fast_lora._slot_ranks(a).tolist() == [0] * 8
    a[2, 0, :4] = torch.randn(4, 12)  # a write before the caches exist
    b[2, 0, :, :4] = torch.randn(20, 4)
    assert fast_lora._slot_ranks(a).tolist() == [0, 0, 4, 0, 0, 0, 0, 0]
    assert fast_lora._b_by_rank(b, 4).shape == (8, 4, 20)
    assert fast_lora._slots_with_weights(b) == {2}
    BaseLinearLayerWithLoRA.reset_lora(layer, 3)  # vLLM: reset, then copy the new weights
    a[3, 0, :3] = torch.randn(3, 12)
    b[3, 0, :, :3] = torch.randn(20, 3)
    assert a._zoo_dirty == {"_zoo_slot_ranks": {3}}
    assert b._zoo_dirty == {"_zoo_b_by_rank": {3}, "_zoo_live_slots": {3}}
    assert fast_lora._slot_ranks(a).tolist() == [0, 0, 4, 3, 0, 0, 0, 0]
    torch.testing.assert_close(fast_lora._b_by_rank(b, 4), b[:, 0, :, :4].transpose(1, 2))
    # every value derived from a stack has its own marks: using one leaves the other's
    assert b._zoo_dirty == {"_zoo_b_by_rank": set(), "_zoo_live_slots": {3}}
    assert fast_lora._slots_with_weights(b) == {2, 3}
    a[5, 0, :6] = 1.0  # a write without reset_lora, past the cut: everything is recomputed
    b[5, 0, :, :6] = 1.0
    assert fast_lora._slot_ranks(a).tolist() == [0, 0, 4, 3, 0, 6, 0, 0]
    torch.testing.assert_close(fast_lora._b_by_rank(b, 6), b[:, 0, :, :6].transpose(1, 2))
    assert fast_lora._slots_with_weights(b) == {2, 3, 5}

def test_int8_rows_follow_the_slots_vllm_writes():
    """The int8 copies of A and B (numbers and scales) are redone in place for the slots
    vLLM wrote, and equal quantizing the whole stack again; a new rank makes them anew."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from zoo.serve import fast_lora

    layer, a, b = one_layer()
    a[2, 0, :4] = torch.randn(4, 12)
    b[2, 0, :, :4] = torch.randn(20, 4)

    def agree(rank):
        for got, want in ((fast_lora._a_int8(a, rank), fast_lora.quantize_rows(a[:, 0, :rank])),
                          (fast_lora._b_int8(b, rank),
                           fast_lora.quantize_rows(b[:, 0, :, :rank].transpose(1, 2)))):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    agree(4)
    kept = fast_lora._a_int8(a, 4)[0], fast_lora._b_int8(b, 4)[0]
    BaseLinearLayerWithLoRA.reset_lora(layer, 3)
    a[3, 0, :3] = torch.randn(3, 12)
    b[3, 0, :, :3] = torch.randn(20, 3)
    assert a._zoo_dirty["_zoo_a_int8"] == {3} and b._zoo_dirty["_zoo_b_int8"] == {3}
    agree(4)
    assert fast_lora._a_int8(a, 4)[0] is kept[0] and fast_lora._b_int8(b, 4)[0] is kept[1]
    assert fast_lora._a_int8(a, 4)[0][3].any()  # slot 3's rows, not the old zeros
    agree(6)


_SLOT_OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["load", "set_lora"]), st.integers(0, 5),
              st.tuples(st.booleans(), st.booleans(), st.booleans()), st.integers(1, 8)),
    st.tuples(st.just("reset"), st.integers(0, 5)),
    st.tuples(st.just("unseen write"), st.integers(0, 5), st.integers(0, 2))), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=_SLOT_OPS)
def test_reset_lora_skips_only_slots_it_knows_are_zero(ops):
    """zoo's reset_lora leaves the stacks exactly as vLLM's (every slice of the slot
    zeroed) after any sequence of adapters entering slots (vLLM's own set_lora, which zoo
    hears of, or a reset and then copies it does not: into the slices they train, at
    their rank), resets, and writes zoo does not see; it writes exactly where the slot
    holds anything but zeros (never into a stack made of zero pages before an adapter
    wrote it); the per-slot values stay those of the stacks."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    from zoo.serve import fast_lora
    from zoo.serve.zero_pages import zero_pages

    fast_lora.track_slot_writes()

    class Layer:
        n_slices, tp_size = 3, 1
        reset_lora = BaseLinearLayerWithLoRA.reset_lora  # zoo's, as on vLLM's layers

        def __init__(self, zeros=torch.zeros):
            self.lora_a_stacked = tuple(zeros((6, 1, 8, 5)) for _ in range(3))
            self.lora_b_stacked = tuple(zeros((6, 1, 4, 8)) for _ in range(3))

    # zoo's stacks as the zero_page_slots patch makes vLLM's
    zoo, expected = Layer(lambda shape: zero_pages(shape, torch.float32)), Layer()
    g = torch.Generator().manual_seed(0)
    for op in ops:
        slot = op[1]
        versions = [t._version for t in (*zoo.lora_a_stacked, *zoo.lora_b_stacked)]
        holds_zeros = [not t[slot].any() for t in (*zoo.lora_a_stacked, *zoo.lora_b_stacked)]
        if op[0] == "unseen write":  # not after a reset_lora (vLLM's set_lora never does)
            value = torch.randn(8, 5, generator=g)
            for layer in (zoo, expected):
                layer.lora_a_stacked[op[2]][slot, 0] = value
        elif op[0] == "set_lora":
            _kind, _slot, trained, rank = op
            a = [torch.randn(rank, 5, generator=g) if on else None for on in trained]
            b = [torch.randn(4, rank, generator=g) if on else None for on in trained]
            MergedColumnParallelLinearWithLoRA.set_lora(zoo, slot, a, b)
            for i, on in enumerate(trained):
                for stacked, weights in ((expected.lora_a_stacked[i], a[i]),
                                         (expected.lora_b_stacked[i], b[i])):
                    stacked[slot] = 0
                    if on:
                        stacked[slot, 0, :weights.shape[0], :weights.shape[1]] = weights
            after = [t._version for t in (*zoo.lora_a_stacked, *zoo.lora_b_stacked)]
            # a slice it does not train, whose slot held zeros, is not written
            for i, on in enumerate(trained * 2):
                if not on and holds_zeros[i]:
                    assert after[i] == versions[i]
        else:
            BaseLinearLayerWithLoRA.reset_lora(zoo, slot)
            for t in (*expected.lora_a_stacked, *expected.lora_b_stacked):
                t[slot] = 0  # vLLM's own reset_lora
            after = [t._version for t in (*zoo.lora_a_stacked, *zoo.lora_b_stacked)]
            # written exactly where the slot held anything but zeros
            assert [a == v for a, v in zip(after, versions, strict=True)] == holds_zeros
        if op[0] == "load":
            _kind, _slot, trained, rank = op
            for i, on in enumerate(trained):
                if on:
                    a, b = torch.randn(rank, 5, generator=g), torch.randn(4, rank, generator=g)
                    for layer in (zoo, expected):
                        layer.lora_a_stacked[i][slot, 0, :rank] = a
                        layer.lora_b_stacked[i][slot, 0, :, :rank] = b
        for mine, theirs in zip((*zoo.lora_a_stacked, *zoo.lora_b_stacked),
                                (*expected.lora_a_stacked, *expected.lora_b_stacked), strict=True):
            assert torch.equal(mine, theirs)
        for a, b in zip(zoo.lora_a_stacked, zoo.lora_b_stacked, strict=True):
            assert torch.equal(fast_lora._slot_ranks(a), fast_lora._ranks_of(a))
            assert torch.equal(fast_lora._b_by_rank(b, 8), b[:, 0].transpose(1, 2))


_MODULES = ("qkv", "o", "own")  # a fused layer (3 slices), a plain one, one of its own way
_ADAPTERS = st.lists(st.fixed_dictionaries({
    "qkv": st.one_of(st.none(), st.tuples(st.booleans(), st.booleans(), st.booleans(),
                                          st.integers(1, 8))),
    "o": st.one_of(st.none(), st.integers(1, 8)),
    "own": st.one_of(st.none(), st.integers(1, 8))}), min_size=1, max_size=6)
_PLACEMENT_OPS = st.lists(st.one_of(
    st.tuples(st.just("activate"), st.integers(0, 5)),
    st.tuples(st.just("deactivate"), st.integers(0, 5)),
    st.tuples(st.just("unseen write"), st.sampled_from(_MODULES), st.integers(0, 3))),
    max_size=30)


def test_a_slots_view_is_the_index_of_it():
    """_slot_view(stacked, i, r, c) is stacked[i, 0, :r, :c]: the same numbers, shape,
    strides and place, in a stack that is itself a view; out of range, the index's own."""
    from zoo.serve.fast_lora import _slot_view

    whole = torch.arange(2 * 5 * 1 * 6 * 7, dtype=torch.float32).view(2, 5, 1, 6, 7)
    stacked = whole[1]  # a view: its storage offset is not 0
    for index, rows, columns in ((0, 6, 7), (3, 2, 7), (4, 6, 3), (2, 1, 1), (4, 0, 7)):
        got, want = _slot_view(stacked, index, rows, columns), stacked[index, 0, :rows, :columns]
        assert got.shape == want.shape and got.stride() == want.stride()
        assert got.data_ptr() == want.data_ptr() and torch.equal(got, want)
    with pytest.raises(IndexError):
        _slot_view(stacked, 5, 2, 2)
    for rows, columns in ((7, 2), (2, 8)):  # cut at the stack's own, as the index cuts
        assert _slot_view(stacked, 1, rows, columns).shape == (min(rows, 6), min(columns, 7))


def test_a_placement_zeroes_a_slot_only_where_its_last_adapter_wrote_beyond_the_copy(
        monkeypatch):
    """An adapter entering a slot of a rank-8 stack after one of the same rank is copied
    in with no zeroing (the copy writes all its predecessor wrote); after one of a higher
    rank, or after a write zoo did not make, the slot is zeroed first. Each time the
    slot holds the new adapter and zeros, as vLLM's reset and copy would leave it."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    from zoo.serve import fast_lora

    fast_lora.track_slot_writes()

    class Plain:
        n_slices, tp_size = 1, 1
        reset_lora = BaseLinearLayerWithLoRA.reset_lora
        set_lora = BaseLinearLayerWithLoRA.set_lora

    layer = Plain()
    layer.lora_a_stacked = (torch.zeros(3, 1, 8, 5),)
    layer.lora_b_stacked = (torch.zeros(3, 1, 4, 8),)
    zeroed = []
    real_zero = torch._foreach_zero_
    monkeypatch.setattr(torch, "_foreach_zero_",
                        lambda views: (zeroed.append(len(views)), real_zero(views)))
    g = torch.Generator().manual_seed(0)

    def place(rank: int) -> int:
        a, b = torch.randn(rank, 5, generator=g), torch.randn(4, rank, generator=g)
        weights = type("Weights", (), {"lora_a": a, "lora_b": b})()
        zeroed.clear()
        placement = fast_lora._Placement(1)
        assert placement.copies(layer, weights, fast_lora._placed_set_loras())
        placement.run()
        want_a, want_b = torch.zeros(8, 5), torch.zeros(4, 8)
        want_a[:rank], want_b[:, :rank] = a, b
        assert torch.equal(layer.lora_a_stacked[0][1, 0], want_a)
        assert torch.equal(layer.lora_b_stacked[0][1, 0], want_b)
        assert not layer.lora_a_stacked[0][[0, 2]].any()  # the other slots untouched
        return sum(zeroed)

    assert place(6) == 0  # a slot nothing wrote
    assert place(6) == 0  # the same rank again: the copy writes all the last one did
    assert place(4) == 2  # a lower rank: rows 4-5 of A, columns 4-5 of B zeroed first
    assert place(5) == 0
    layer.lora_b_stacked[0][1, 0, 0, 7] = 1.0  # a write zoo did not see
    assert place(5) == 1  # B's slot (anything may be in it) zeroed; A's is still known


@settings(max_examples=100, deadline=None)
@given(adapters=_ADAPTERS, ops=_PLACEMENT_OPS)
def test_bulk_placement_writes_what_vllms_activate_adapter_writes(adapters, ops):
    """zoo's activate_adapter (the slot's zeroing and copies of every layer gathered into
    two calls) leaves every stack as vLLM's own does, layer by layer, after any sequence
    of adapters entering and leaving slots (fused, plain and untrained layers, and a layer
    class with its own set_lora) and writes zoo does not see; the values derived from the
    stacks stay those of the stacks."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA
    from vllm.lora.model_manager import LoRAModelManager

    from zoo.serve import fast_lora
    from zoo.serve.zero_pages import zero_pages

    fast_lora.track_slot_writes()
    fast_lora.place_in_bulk()
    zoos_activate = LoRAModelManager.activate_adapter
    vllms_activate = fast_lora._unwrapped(zoos_activate)
    slots = 4

    def layer_classes(zoo: bool):
        def own(f):
            return f if zoo else fast_lora._unwrapped(f)

        class Fused:
            n_slices, tp_size = 3, 1
            reset_lora = own(BaseLinearLayerWithLoRA.reset_lora)
            set_lora = own(MergedColumnParallelLinearWithLoRA.set_lora)

        class Plain:
            n_slices, tp_size = 1, 1
            reset_lora = own(BaseLinearLayerWithLoRA.reset_lora)
            set_lora = own(BaseLinearLayerWithLoRA.set_lora)

        class Own(Plain):
            def set_lora(self, index, lora_a, lora_b):  # B doubled: not vLLM's way
                self.reset_lora(index)
                self.lora_a_stacked[0][index, 0, :lora_a.shape[0]] = lora_a
                self.lora_b_stacked[0][index, 0, :, :lora_b.shape[1]] = 2 * lora_b
        return {"qkv": Fused, "o": Plain, "own": Own}

    def manager(zoo: bool):
        zeros = (lambda shape: zero_pages(shape, torch.float32)) if zoo else torch.zeros
        modules = {}
        for name, cls in layer_classes(zoo).items():
            layer = cls()
            width = (4, 2, 2) if name == "qkv" else (4,)
            layer.lora_a_stacked = tuple(zeros((slots, 1, 8, 5)) for _ in width)
            layer.lora_b_stacked = tuple(zeros((slots, 1, w, 8)) for w in width)
            modules[name] = layer
        m = type("Manager", (), {"is_pooling_model": False,
                                 "_get_lora_layer_weights":
                                     LoRAModelManager._get_lora_layer_weights})()
        m.modules, m._registered_adapters, m._active_adapters = modules, {}, {}
        m.lora_index_to_id = [None] * slots
        return m

    class Weights:
        def __init__(self, a, b):
            self.lora_a, self.lora_b = a, b

    class Adapter:
        def __init__(self, lora_id, loras):
            self.id, self.loras = lora_id, loras

        def get_lora(self, name):
            return self.loras.get(name)

    g = torch.Generator().manual_seed(0)
    zoo, expected = manager(True), manager(False)
    for k, spec in enumerate(adapters):
        loras = {}
        if spec["qkv"] is not None:
            *trained, rank = spec["qkv"]
            loras["qkv"] = Weights(
                [torch.randn(rank, 5, generator=g) if on else None for on in trained],
                [torch.randn(w, rank, generator=g) if on else None
                 for on, w in zip(trained, (4, 2, 2), strict=True)])
        for name in ("o", "own"):
            if spec[name] is not None:
                loras[name] = Weights(torch.randn(spec[name], 5, generator=g),
                                      torch.randn(4, spec[name], generator=g))
        for m in (zoo, expected):
            m._registered_adapters[100 + k] = Adapter(100 + k, loras)
    for op in ops:
        if op[0] == "activate" and op[1] < len(adapters):
            lora_id = 100 + op[1]
            if lora_id not in zoo._active_adapters and None not in zoo.lora_index_to_id:
                continue  # no free slot: vLLM's LRU manager deactivates one first
            assert zoos_activate(zoo, lora_id) == vllms_activate(expected, lora_id)
        elif op[0] == "deactivate":
            lora_id = 100 + op[1]
            for m in (zoo, expected):
                if lora_id in m._active_adapters:
                    m.lora_index_to_id[m.lora_index_to_id.index(lora_id)] = None
                    del m._active_adapters[lora_id]
        elif op[0] == "unseen write":
            value = torch.randn(8, 5, generator=g)
            for m in (zoo, expected):
                m.modules[op[1]].lora_a_stacked[0][op[2], 0] = value
        assert zoo.lora_index_to_id == expected.lora_index_to_id
        for name in _MODULES:
            mine, theirs = zoo.modules[name], expected.modules[name]
            for x, y in zip((*mine.lora_a_stacked, *mine.lora_b_stacked),
                            (*theirs.lora_a_stacked, *theirs.lora_b_stacked), strict=True):
                assert torch.equal(x, y), name
            for a, b in zip(mine.lora_a_stacked, mine.lora_b_stacked, strict=True):
                assert torch.equal(fast_lora._slot_ranks(a), fast_lora._ranks_of(a))
                assert torch.equal(fast_lora._b_by_rank(b, 8), b[:, 0].transpose(1, 2))
