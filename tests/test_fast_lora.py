"""zoo's grouped CPU LoRA path against vLLM's own PyTorch-native one, on the same inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from zoo.serve.fast_lora import GroupedPunicaWrapperCPU, group_rows  # noqa: E402

SLOTS, RANK, HIDDEN = 4, 8, 64
SLICES = (64, 32, 32)  # a fused q/k/v projection
IDS = [11, 22, 33, None]  # slot -> adapter id; the last slot stays empty (zeros)


def wrappers(index_mapping, prompt_mapping, prefill):
    made = []
    for cls in (PunicaWrapperCPU, GroupedPunicaWrapperCPU):
        w = cls(max_num_batched_tokens=128, max_batches=8, device="cpu")
        w.update_metadata(LoRAMapping(index_mapping, prompt_mapping, is_prefill=prefill),
                          IDS, SLOTS, 256)
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
    "prefill, mixed": ([11, 11, 11, 22, 22, 0, 0, 33], True),
    "prefill, long groups": ([11] * 20 + [0] * 5 + [22] * 17 + [33] * 18, True),
    "prefill, one long group beside short ones": ([11] * 40 + [0] * 3 + [22] + [33], True),
    "one adapter": ([22] * 8, False),
    "one adapter and none": ([22, 0, 22, 0, 0, 22, 22, 0], False),
    "no adapter": ([0] * 8, False),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_vllm(case, dtype):
    tokens, prefill = CASES[case]
    ours_ref = wrappers(tokens, tokens, prefill)
    a, b = stacked(dtype)
    x = torch.randn(len(tokens), HIDDEN).to(dtype)
    base = torch.randn(len(tokens), sum(SLICES)).to(dtype)
    outputs = []
    for w in ours_ref:
        y = base.clone()
        w.add_lora_linear(y, x, a, b, 0.5, SLICES)
        outputs.append(y)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs[1], outputs[0], rtol=tolerance, atol=tolerance)
    changed = (outputs[1] != base).any(dim=1)
    assert changed.tolist() == [t != 0 for t in tokens]  # rows without an adapter untouched


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
    a[1].normal_()
    b[1].normal_()  # now slot 1 (adapter 22) has some: the skip must notice
    expected, got = base.clone(), base.clone()
    ref.add_lora_logits(expected, x, a, b, 1.0)
    ours.add_lora_logits(got, x, a, b, 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert not torch.equal(got, base)


def test_group_rows():
    groups = group_rows(torch.tensor([2, -1, 2, 0]))
    assert [(s, r.tolist()) for s, r in groups] == [(0, [3]), (2, [0, 2])]
    assert group_rows(torch.tensor([1, 1, 1])) == [(1, None)]
    assert group_rows(torch.tensor([-1, -1])) == []


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
        subprocess.run([sys.executable, str(script), str(base), str(out), *adapters],
                       env={**os.environ, "ZOO_FAST_LORA": fast}, check=True,
                       capture_output=True)
        runs[fast] = json.loads(out.read_text())
    return runs


@pytest.mark.vllm
def test_64_adapters_mixed_with_the_base_give_vllms_tokens(smollm2_home, tmp_path):
    """End to end, 64 rank-8 q/v adapters and the base in the same steps, on the 16-bit base:
    zoo's path and vLLM's own give the same greedy tokens."""
    from tests.factory import write_random_lora

    base = smollm2_home / "bases" / "smollm2-135m-instruct"
    adapters = [str(write_random_lora(tmp_path / f"l{i}", base, seed=i, scale=0.05,
                                      targets=("q_proj", "v_proj"))) for i in range(64)]
    runs = _generate_both_ways(base, adapters, tmp_path)
    assert runs["1"].keys() == runs["0"].keys() and len(runs["1"]) == 2 * 65
    differ = [key for key in runs["1"] if runs["1"][key][0] != runs["0"][key][0]]
    assert not differ, differ[:3]
    worst = max(abs(a - b) for key in runs["1"]
                for a, b in zip(runs["1"][key][1], runs["0"][key][1], strict=True))
    assert worst < 1e-3


@pytest.mark.vllm
def test_same_tokens_as_vllms_own_path(smollm2_home, tmp_path):
    """End to end, on the 16-bit base: zoo's path and vLLM's give the same greedy tokens."""
    from tests.factory import write_random_lora

    base = smollm2_home / "bases" / "smollm2-135m-instruct"
    adapters = [str(write_random_lora(tmp_path / f"l{i}", base, seed=i, scale=0.05))
                for i in range(3)]
    runs = _generate_both_ways(base, adapters, tmp_path)
    assert runs["1"].keys() == runs["0"].keys() and len(runs["1"]) == 8
    for key, (text, logprobs) in runs["1"].items():
        their_text, their_logprobs = runs["0"][key]
        assert text == their_text, key
        assert max(abs(a - b) for a, b in zip(logprobs, their_logprobs, strict=True)) < 1e-3
    base_texts = {runs["1"][k][0] for k in runs["1"] if k.startswith("base")}
    assert all(runs["1"][k][0] not in base_texts for k in runs["1"] if not k.startswith("base"))


def test_64_adapters_of_mixed_ranks_and_targets_match_vllm():
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
            w.update_metadata(LoRAMapping(tokens, tokens, is_prefill=prefill), ids, slots, 256)
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
        torch.testing.assert_close(outputs[1][rows], outputs[0][rows], rtol=1e-5, atol=1e-4)
        assert (outputs[1] != base).any(dim=1).tolist() == rows.tolist()


def test_slot_caches_redo_only_the_slots_vllm_wrote():
    """Loading an adapter into one slot recomputes that slot's rank and layout only; the
    result equals a full recomputation, and a write zoo did not see recomputes all."""
    from zoo.serve import fast_lora

    class Layer:  # what reset_lora touches: the stacks of one layer
        n_slices = 1

        def __init__(self):
            self.lora_a_stacked = (torch.zeros(8, 1, 16, 12),)
            self.lora_b_stacked = (torch.zeros(8, 1, 20, 16),)

    fast_lora.track_slot_writes()
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    layer = Layer()
    a, b = layer.lora_a_stacked[0], layer.lora_b_stacked[0]
    assert fast_lora._slot_ranks(a).tolist() == [0] * 8
    fast_lora._rank_major(b, 16)
    BaseLinearLayerWithLoRA.reset_lora(layer, 3)  # vLLM: reset, then copy the new weights
    a[3, 0, :4] = torch.randn(4, 12)
    b[3, 0, :, :4] = torch.randn(20, 4)
    assert a._zoo_dirty == {3}
    assert fast_lora._slot_ranks(a).tolist() == [0, 0, 0, 4, 0, 0, 0, 0]
    torch.testing.assert_close(fast_lora._rank_major(b, 16), b[:, 0].transpose(1, 2))
    a[5, 0, :2] = 1.0  # a write without reset_lora: everything is recomputed
    assert fast_lora._slot_ranks(a).tolist() == [0, 0, 0, 4, 0, 2, 0, 0]
