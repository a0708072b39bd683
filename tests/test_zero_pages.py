"""LoRA stacks in pages committed as they are written (zoo/serve/zero_pages.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.helpers import resident_pages
from zoo.serve import fast_lora
from zoo.serve.zero_pages import MIN_BYTES, ZeroPageAllocation

MB = 1 << 20


_MEASURE = """
import re, sys, torch
from zoo.serve.zero_pages import ZeroPageAllocation
def resident():
    status = open("/proc/self/status").read()
    return int(re.search(r"RssAnon:\\s+(\\d+) kB", status).group(1)) * 1024
before = resident()
if sys.argv[1] == "zoo":
    with ZeroPageAllocation() as allocation:
        stack = torch.zeros(64, 1, 16, 32768, dtype=torch.bfloat16)  # 64 MB
    assert allocation.made == [stack]
else:
    stack = torch.zeros(64, 1, 16, 32768, dtype=torch.bfloat16)
assert float(stack.abs().sum()) == 0.0
made = resident() - before
stack[3, 0, :8] = 1.0  # one slot's eight rows: 512 kB
assert float(stack.sum()) == 8 * 32768
print(made, resident() - before)
"""


def _resident_growth(allocation: str) -> tuple[int, int]:
    """A fresh process's resident anonymous memory after it makes a 64 MB stack and
    reads it, and after it writes one slot (pytest's own process reuses freed memory)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEASURE, allocation], check=True,
                         capture_output=True, text=True).stdout
    made, written = map(int, out.split())
    return made, written


def test_zero_page_stacks_take_memory_only_where_written():
    made, written = _resident_growth("zoo")
    assert made < 4 * MB and written < 4 * MB, (made, written)
    made, written = _resident_growth("torch")  # the allocator's zeros: written through
    assert made > 60 * MB, made


def test_only_plain_large_cpu_zeros_come_from_zero_pages():
    with ZeroPageAllocation() as allocation:
        small = torch.zeros(4, 4)
        out = torch.empty(MB)
        torch.zeros(MB, out=out)
        meta = torch.zeros(MB, device="meta")
        wide = torch.zeros((MB // 2,), dtype=torch.float16)
        grad = torch.zeros(MB, requires_grad=True)
    assert allocation.made == [wide] and wide.dtype == torch.float16
    assert small.sum() == 0 and out.sum() == 0 and meta.is_meta and grad.requires_grad
    assert MIN_BYTES == MB


def test_the_patch_runs_vllms_module_creation_in_the_mode(monkeypatch):
    """allocate_slots_lazily wraps LoRAModelManager._create_lora_modules (here a stand-in
    that allocates as vLLM's layers do): its large stacks come from zero pages, its
    result is returned, and applying the patch twice wraps once."""
    from vllm.lora.model_manager import LoRAModelManager

    from zoo.serve import zero_pages

    made = []

    def spy(shape, dtype):
        made.append(zero_pages.zero_pages.__wrapped__(shape, dtype))
        return made[-1]

    spy.__wrapped__ = zero_pages.zero_pages
    monkeypatch.setattr(zero_pages, "zero_pages", spy)

    def create(self):
        self.stack = torch.zeros(8, 1, 16, 4096, dtype=torch.bfloat16)  # 1 MB
        self.small = torch.zeros(8, 16)
        return "made"

    monkeypatch.setattr(LoRAModelManager, "_create_lora_modules", create)
    zero_pages.allocate_slots_lazily()
    zero_pages.allocate_slots_lazily()
    wrapped = LoRAModelManager._create_lora_modules
    assert wrapped.__wrapped__ is create  # wrapped once
    manager = SimpleNamespace()
    assert wrapped(manager) == "made"
    assert len(made) == 1 and manager.stack is made[0] and manager.small is not made[0]
    assert float(manager.stack.abs().sum()) == 0.0 and manager.stack.shape == (8, 1, 16, 4096)
    assert torch.zeros(8, 1, 16, 4096).data_ptr() and len(made) == 1  # outside: untouched


def _resident(tensor: torch.Tensor) -> int:
    """How many of the tensor's pages are in memory."""
    return resident_pages(tensor.data_ptr(), tensor.nbytes)


def test_the_served_adapters_projections_are_committed_at_start(monkeypatch):
    """allocate_slots_lazily(trained) commits, after vLLM made them, the stacks of the
    projections named (a packed layer's slices by their own names, the lm_head's single
    stacks too): every page of those in memory, still zeros and known untouched; every
    other stack still no memory at all."""
    from vllm.lora.model_manager import LoRAModelManager

    from zoo.serve import zero_pages

    def stacks(n):
        return tuple(torch.zeros(8, 1, 16, 8192, dtype=torch.bfloat16) for _ in range(n))

    def create(self):  # as vLLM's layers allocate: a tuple per packed layer, slice by slice
        self.modules = {
            "model.layers.0.self_attn.qkv_proj": SimpleNamespace(
                lora_a_stacked=stacks(3), lora_b_stacked=stacks(3)),
            "model.layers.0.self_attn.o_proj": SimpleNamespace(
                lora_a_stacked=stacks(1), lora_b_stacked=stacks(1)),
            "lm_head": SimpleNamespace(lora_a_stacked=stacks(1)[0],
                                       lora_b_stacked=stacks(1)[0]),
            "model.norm": SimpleNamespace()}  # no stacks
        self.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    monkeypatch.setattr(LoRAModelManager, "_create_lora_modules", create)
    zero_pages.allocate_slots_lazily({"q_proj", "v_proj", "lm_head", "down_proj"})
    manager = SimpleNamespace()
    LoRAModelManager._create_lora_modules(manager)
    qkv, o, head = (manager.modules[n] for n in ("model.layers.0.self_attn.qkv_proj",
                                                 "model.layers.0.self_attn.o_proj", "lm_head"))
    committed = [*qkv.lora_a_stacked[0::2], *qkv.lora_b_stacked[0::2],
                 head.lora_a_stacked, head.lora_b_stacked]
    left = [qkv.lora_a_stacked[1], qkv.lora_b_stacked[1], *o.lora_a_stacked, *o.lora_b_stacked]
    for stack in committed:
        assert _resident(stack) == stack.nbytes // 4096, "a trained projection's stack"
    for stack in left:
        assert _resident(stack) == 0, "a projection no served adapter trains"
    for stack in committed + left:
        assert zero_pages.untouched(stack) and float(stack.abs().sum()) == 0.0
    k_stack = qkv.lora_a_stacked[1]
    assert zero_pages.populate_trained(manager, {"k_proj"}) == 2 * k_stack.nbytes == 4 * MB
    assert _resident(k_stack) == k_stack.nbytes // 4096
    assert not zero_pages.populate(torch.zeros(MB))  # not zero pages: nothing to commit


def _in_huge_pages(tensor: torch.Tensor) -> int:
    """How many bytes of the tensor's memory are 2 MB pages (``AnonHugePages`` of the
    mappings it lies in, /proc/self/smaps; a mapping holds no other tensor here)."""
    import re

    start, end, huge, inside = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes, 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                low, high = (int(v, 16) for v in span.groups())
                inside = low < end and high > start
            elif inside and line.startswith("AnonHugePages:"):
                huge += int(line.split()[1]) * 1024
    return huge


def test_committed_stacks_and_the_values_derived_from_them_lie_in_2mb_pages():
    """populate() gives a stack of 2 MB or more 2 MB pages wherever whole ones fit in it,
    commits nothing past its end and leaves it zeros, untouched; in_huge_pages() copies a
    large tensor into 2 MB pages (the derived B that the native kernel reads, too) and
    leaves a small one where it is. With transparent huge pages only where asked (this
    machine's setting), none of it holds without the madvise."""
    from pathlib import Path

    import pytest

    from zoo.serve import zero_pages

    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not setting.exists() or "[never]" in setting.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    whole = zero_pages.zero_pages((64, 1, 16, 4096), torch.bfloat16)  # 8 MB
    odd = zero_pages.zero_pages((5 * MB + 8192,), torch.uint8)  # two 2 MB pages, then 4 kB
    small = zero_pages.zero_pages((MB,), torch.uint8)
    for stack in (whole, odd, small):
        assert zero_pages.populate(stack)
        assert _resident(stack) == -(-stack.nbytes // 4096)
        pages, offset = stack._zoo_pages
        past = offset + stack.nbytes
        assert resident_pages(stack.data_ptr() + stack.nbytes, len(pages) - past) == 0
        assert zero_pages.untouched(stack) and not bool(stack.any())
    assert _in_huge_pages(whole) == 8 * MB
    assert _in_huge_pages(odd) == 4 * MB
    assert _in_huge_pages(small) == 0
    source = torch.randn(3 * MB // 2)  # 6 MB of float32
    copy = zero_pages.in_huge_pages(source)
    assert copy is not source and torch.equal(copy, source) and _in_huge_pages(copy) == 6 * MB
    little = torch.randn(1000)
    assert zero_pages.in_huge_pages(little) is little
    stack_b = torch.randn(64, 1, 4096, 16).to(torch.bfloat16)  # [slots, 1, out, rank]
    rank_major = fast_lora._b_by_rank(stack_b, 16)
    assert torch.equal(rank_major, stack_b[:, 0].transpose(1, 2))
    assert _in_huge_pages(rank_major) == 8 * MB


def test_vllms_vocabulary_stacks_are_zero_pages_known_to_be_zero(monkeypatch):
    """vLLM's own create_lora_weights (the lm_head's and the embeddings' stacks, slots x
    vocabulary x rank) allocates through the mode, and zoo's reset_lora neither reads nor
    writes such a stack until something else writes to it."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    config = SimpleNamespace(max_lora_rank=16, lora_dtype=torch.bfloat16)
    weight = torch.zeros(1)
    embedding = SimpleNamespace(base_layer=SimpleNamespace(
        org_vocab_size=49152, embedding_dim=576, weight=weight))
    logits = SimpleNamespace(hidden_size=576, device=weight.device,
                             sharded_to_full_mapping=None,
                             base_layer=SimpleNamespace(vocab_size=49152))
    with ZeroPageAllocation() as allocation:
        VocabParallelEmbeddingWithLoRA.create_lora_weights(embedding, 32, config)
        LogitsProcessorWithLoRA.create_lora_weights(logits, 32, config)
    # (the A of the lm_head and the B of the embeddings, 32 x 576 x 16, are under 1 MB)
    assert [t.shape for t in allocation.made] == [(32, 49152, 16), (32, 1, 49152, 16)]
    assert embedding.lora_a_stacked is allocation.made[0]
    assert logits.lora_b_stacked is allocation.made[1]
    fast_lora.track_slot_writes()
    versions = [t._version for t in allocation.made]
    read = []
    monkeypatch.setattr(fast_lora, "_slots_holding_anything",
                        lambda stack: read.append(stack) or torch.ones(len(stack), dtype=bool))
    VocabParallelEmbeddingWithLoRA.reset_lora(embedding, 5)
    LogitsProcessorWithLoRA.reset_lora(logits, 5)
    assert [t._version for t in allocation.made] == versions  # nothing written...
    assert read and all(49152 not in t.shape for t in read)  # ...nor read: the small ones are
    monkeypatch.undo()
    logits.lora_b_stacked[5, 0, :3] = 1.0  # vLLM writes the slot...
    LogitsProcessorWithLoRA.reset_lora(logits, 5)  # ...so the next reset zeroes it
    assert float(logits.lora_b_stacked.abs().sum()) == 0.0


def test_a_slot_holds_anything_exactly_when_torch_says_so_and_untouched_until_written():
    """fast_lora reads a stack's slots' bits as integers of their width: the same answer
    as torch's any() in every dtype LoRA stacks come in (-0.0 counts as written, which
    zeroing leaves as vLLM's); a zero-page stack is untouched until anything writes to it."""
    from zoo.serve.zero_pages import untouched, zero_pages

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8):
        stack = zero_pages((4, 1, 8, 512), dtype)
        assert untouched(stack) and not fast_lora._slots_holding_anything(stack).any()
        stack[2, 0, 7, 511] = 3
        assert not untouched(stack)
        assert fast_lora._slots_holding_anything(stack).tolist() == [False, False, True, False]
        stack[0, 0, 0, 0] = 1
        assert fast_lora._slots_holding_anything(stack).tolist() == \
            [bool(stack[i].any()) for i in range(4)]
    negative_zero = torch.zeros(2, 8)
    negative_zero[1, 3] = -0.0
    assert fast_lora._slots_holding_anything(negative_zero).tolist() == [False, True]
    assert not negative_zero[1].any()
    assert not untouched(torch.zeros(4))  # not made of zero pages: nothing known
