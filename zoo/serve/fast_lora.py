"""A faster multi-LoRA path for vLLM on the CPU: work that grows with tokens, not adapters.

vLLM's PyTorch-native punica ops (``vllm/lora/ops/torch_ops``) run every token
through every projection's LoRA slot at ``--max-lora-rank``, whether or not
the adapter trained that projection, with a per-token einsum. This wrapper

* skips a projection (a slice of a fused layer) when no adapter in the step
  has weights there: a q/v adapter costs q and v only, not all seven;
* computes each slice at the largest rank the step's adapters really use
  (vLLM stacks every slot at ``--max-lora-rank``; the rows past an adapter's
  own rank are zeros);
* for a step of many adapters with few tokens each (decode), runs two batched
  matmuls over the adapters, each one's tokens padded to the longest group; when
  the step's adapters fill most of the stack, over the stack itself, so no
  adapter's weights are gathered;
* for few adapters with many tokens each (prefill, or one adapter), runs two
  plain matmuls per adapter on its rows;
* skips the LoRA pass of the logits when no adapter in the step has weights
  for ``lm_head`` (it would add exact zeros).

Both matmuls run in float32 on float32 copies of the slots (cut at the largest
rank any slot uses; a slot is copied again only when vLLM rewrites it): on the
CPU small and batched matmuls are several times faster in float32 than in bf16,
and the result is rounded once, when it is added to the output. zoo's plugin
selects it on the CPU platform (a guarded patch, ``patches.py``);
``ZOO_FAST_LORA=0`` restores vLLM's own. A call this path was not
written for goes to vLLM's own ops instead: a keyword it does not know, a torch
compile in progress (one step's grouping must never be baked into a graph), or a
token-to-slot mapping outside -1 (no adapter) .. slots - 1. Tests compare the two on
the same inputs, and end to end on the real base.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = "zoo.serve.fast_lora.GroupedPunicaWrapperCPU"
# Several adapters in a step: their tokens are padded to the longest group and run as
# one batched matmul pair, unless padding would more than double the rows (a long
# prefill beside short ones), where a matmul pair per adapter is cheaper.
PADDING_LIMIT = 2
Groups = list[tuple[int, torch.Tensor | None]]  # (adapter slot, token rows or None = all)


def group_rows(indices: torch.Tensor) -> Groups:
    """Token rows per adapter slot; slot -1 (no adapter) is left out."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    groups = []
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            groups.append((slot, torch.nonzero(indices == slot).flatten()))
    return groups


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    def update_metadata(self, mapping, lora_index_to_id, max_loras: int, vocab_size: int,
                        **kwargs: Any) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        # the mapping zoo was written for: -1 (no adapter) or a slot of the stack
        self._grouped = all(_valid_slots(i, max_loras) for i in
                            (self.token_lora_indices, self.sampler_indices))
        if not self._grouped:
            return
        self._token_groups = group_rows(self.token_lora_indices)
        self._sampler_groups = group_rows(self.sampler_indices)
        self._step_slots = torch.tensor([s for s, _rows in self._token_groups], dtype=torch.long)
        self._ranks: dict[tuple[int, int], int] = {}  # (tensor id, version) -> rank in step
        self._plan = _plan(self._token_groups, self.token_lora_indices.numel())

    def _step_rank(self, a: torch.Tensor) -> int:
        """The largest rank any adapter of this step uses in this slice (0: none has it)."""
        key = (id(a), a._version)
        rank = self._ranks.get(key)
        if rank is None:
            rank = int(_slot_ranks(a).index_select(0, self._step_slots).max())
            self._ranks[key] = rank
        return rank

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        if kwargs or not self._grouped or _compiling():
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        plan = self._plan
        if plan is None:
            return
        flat_y = y.view(-1, y.shape[-1])
        flat_x = x.view(-1, x.shape[-1])
        if flat_x.shape[0] != self.token_lora_indices.numel():  # not a row per token
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        xs = None  # the inputs in float32, arranged as the plan needs them, once for all slices
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            rank = self._step_rank(a)
            width = min(size, b.shape[2], flat_y.shape[1] - offset)
            if rank and width > 0:
                if xs is None:
                    xs = plan.inputs(flat_x, a.shape[0])
                a32 = _float_a(a)
                b32 = _float_b(b, a32.shape[1])
                plan.add(flat_y[:, offset:offset + width], xs, a32[:, :rank],
                         b32[:, :rank, :width], scale)
            offset += size

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None,
                        **kwargs: Any) -> None:
        if kwargs or not self._grouped or _compiling():
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           buffer=buffer, **kwargs)
        live = _slots_with_weights(lora_b_stacked)
        groups = [(s, r) for s, r in self._sampler_groups if s in live]
        if not groups:
            return  # every adapter in the batch has zero lm_head weights: nothing to add
        if x.view(-1, x.shape[-1]).shape[0] != self.sampler_indices.numel():
            # prompt log-probabilities give a row per prompt token, not per sequence: the
            # sequence-to-slot mapping does not say which adapter each row is for
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           buffer=buffer, **kwargs)
        flat_y = y.view(-1, y.shape[-1])
        flat_x = x.view(-1, x.shape[-1])
        for slot, rows in groups:
            xs = (flat_x if rows is None else flat_x.index_select(0, rows)).float()
            shrunk = (xs @ lora_a_stacked[slot, 0].float().T) * scale
            expanded = shrunk.to(flat_y.dtype) @ lora_b_stacked[slot, 0].to(flat_y.dtype).T
            width = min(flat_y.shape[1], expanded.shape[1])
            if rows is None:
                flat_y[:, :width] += expanded[:, :width]
            else:
                flat_y[rows, :width] += expanded[:, :width]


class _One:
    """Every token with an adapter uses the same one: a matmul pair on its rows."""

    def __init__(self, slot: int, rows: torch.Tensor | None, tokens: int):
        self.slot, self.rows = slot, rows
        self.positions = None if rows is None else _token_positions(rows, tokens)

    def inputs(self, x: torch.Tensor, stack_slots: int) -> torch.Tensor:
        return (x if self.rows is None else x.index_select(0, self.rows)).float()

    def add(self, out, xs, a, b, scale: float) -> None:
        if self.rows is None:
            out.add_(_lora(xs, a[self.slot], b[self.slot], scale))
            return
        delta = _with_zero_row(len(self.rows), b.shape[2])
        _lora(xs, a[self.slot], b[self.slot], scale, into=delta[:-1])
        out.add_(delta.index_select(0, self.positions))


class _Sorted:
    """Many tokens per adapter (a long prefill beside short ones): a matmul pair per
    adapter on its rows, the rows sorted by adapter."""

    def __init__(self, groups: Groups, tokens: int):
        self.rows = torch.cat([rows for _slot, rows in groups])
        self.positions = _token_positions(self.rows, tokens)
        self.bounds, start = [], 0
        for slot, rows in groups:
            self.bounds.append((slot, start, start + len(rows)))
            start += len(rows)

    def inputs(self, x: torch.Tensor, stack_slots: int) -> torch.Tensor:
        return x.index_select(0, self.rows).float()

    def add(self, out, xs, a, b, scale: float) -> None:
        delta = _with_zero_row(len(self.rows), b.shape[2])
        for slot, start, end in self.bounds:
            _lora(xs[start:end], a[slot], b[slot], scale, into=delta[start:end])
        out.add_(delta.index_select(0, self.positions))


class _Batched:
    """Adapters with few tokens each (decode): one batched matmul pair over all of them,
    each adapter's tokens padded to the longest group. When the step's adapters fill most
    of the stack, the batch is the stack itself: no weights are gathered, and the slots
    without tokens are all padding."""

    def __init__(self, groups: Groups, tokens: int):
        self.groups, self.tokens = groups, tokens
        self.real = sum(len(rows) for _slot, rows in groups)
        self.longest = max(len(rows) for _slot, rows in groups)
        self.stack_slots = None  # the layout below is for stacks of this many slots

    def _arrange(self, stack_slots: int) -> None:
        whole = max(slot for slot, _rows in self.groups) < stack_slots and \
            stack_slots * self.longest <= PADDING_LIMIT * self.real
        self.step_slots = None if whole else torch.tensor([s for s, _rows in self.groups])
        self.shape = (stack_slots if whole else len(self.groups), self.longest)
        padded = self.shape[0] * self.longest
        # position in the padded batch -> token row; padding reads token 0, its output is
        # never read; token row -> position in the padded batch (none: the zero row after)
        self.padded_rows = torch.zeros(padded, dtype=torch.long)
        self.positions = torch.full((self.tokens,), padded, dtype=torch.long)
        for g, (slot, rows) in enumerate(self.groups):
            start = (slot if whole else g) * self.longest
            rows = torch.arange(self.tokens) if rows is None else rows
            self.padded_rows[start:start + len(rows)] = rows
            self.positions[rows] = torch.arange(start, start + len(rows))
        self.stack_slots = stack_slots

    def inputs(self, x: torch.Tensor, stack_slots: int) -> torch.Tensor:
        if stack_slots != self.stack_slots:
            self._arrange(stack_slots)
        return x.index_select(0, self.padded_rows).float().view(*self.shape, x.shape[1])

    def add(self, out, xs, a, b, scale: float) -> None:
        if self.step_slots is not None:
            a, b = a.index_select(0, self.step_slots), b.index_select(0, self.step_slots)
        shrunk = torch.bmm(xs, a.transpose(1, 2))  # [adapters, tokens, rank]
        if scale != 1.0:
            shrunk = shrunk * scale
        delta = _with_zero_row(xs.shape[0] * xs.shape[1], b.shape[2])
        torch.bmm(shrunk, b, out=delta[:-1].view(*xs.shape[:2], b.shape[2]))
        out.add_(delta.index_select(0, self.positions))


def _plan(groups: Groups, tokens: int):
    """How this step's ``tokens`` rows meet their adapters (None: no row has one)."""
    if not groups:
        return None
    if len(groups) == 1:
        return _One(*groups[0], tokens)
    longest = max(len(rows) for _slot, rows in groups)
    if len(groups) * longest > PADDING_LIMIT * sum(len(rows) for _slot, rows in groups):
        return _Sorted(groups, tokens)
    return _Batched(groups, tokens)


def _token_positions(rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """For each of ``tokens`` rows, its index in ``rows``; len(rows) (the zero row that
    follows the deltas) for a row without an adapter."""
    positions = torch.full((tokens,), len(rows), dtype=torch.long)
    positions[rows] = torch.arange(len(rows))
    return positions


def _with_zero_row(rows: int, width: int) -> torch.Tensor:
    """A float32 buffer for ``rows`` deltas and, after them, a row of zeros: the deltas
    are then added to the output in token order by one gather and one add (an
    ``index_add_`` into a bf16 column slice is several times slower)."""
    delta = torch.empty(rows + 1, width)
    delta[rows].zero_()
    return delta


def _lora(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
          into: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (xs @ a.T) @ b for one adapter's rows, all in float32 (a: [rank, in],
    b: [rank, out]), written ``into`` a buffer if given."""
    shrunk = xs @ a.T
    if scale != 1.0:
        shrunk = shrunk * scale
    return torch.matmul(shrunk, b, out=into) if into is not None else shrunk @ b


def _valid_slots(indices: torch.Tensor, slots: int) -> bool:
    if indices.numel() == 0:
        return True
    return indices.dtype in (torch.int32, torch.int64) and int(indices.min()) >= -1 and \
        int(indices.max()) < slots


def track_slot_writes() -> None:
    """Record which slot vLLM writes: every LoRA layer's ``set_lora`` (load) starts with
    ``reset_lora(index)``, as does an eviction or the activation of an adapter that does
    not train that layer, so marking the index there lets the per-slot caches below redo
    one slot instead of the whole stack (the lm_head's stack alone is 64 slots x vocab x
    rank: 200 MB for SmolLM2)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    for layer_class in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        _track(layer_class)


def _track(layer_class) -> None:
    original = layer_class.reset_lora
    if getattr(original, "_zoo_tracks", False):
        return

    def reset_lora(self, index: int):
        stacks = (self.lora_a_stacked, self.lora_b_stacked)
        for stacked in (t for s in stacks for t in (s if isinstance(s, (tuple, list)) else (s,))):
            for dirty in getattr(stacked, "_zoo_dirty", {}).values():
                dirty.add(index)
        return original(self, index)

    reset_lora._zoo_tracks = True
    layer_class.reset_lora = reset_lora


def _per_slot(stacked: torch.Tensor, name: str, make, key=None):
    """A per-slot value derived from a stacked weight tensor, kept on the tensor. When vLLM
    wrote into it (its ``_version`` moved), only the slots marked by ``reset_lora`` (each
    value has its own marks) are recomputed; a write zoo did not see, or a new ``key``
    (the value's shape), recomputes every slot."""
    if not hasattr(stacked, "_zoo_dirty"):
        stacked._zoo_dirty = {}
    cached = getattr(stacked, name, None)
    dirty = stacked._zoo_dirty.get(name)
    if cached is not None and cached[2] == key and cached[0] == stacked._version:
        return cached[1]
    if cached is not None and cached[2] == key and dirty:
        value = cached[1]
        slots = torch.tensor(sorted(dirty), dtype=torch.long)
        value[slots] = make(stacked.index_select(0, slots))
    else:
        value = make(stacked)
    setattr(stacked, name, (stacked._version, value, key))
    stacked._zoo_dirty[name] = set()
    return value


def _ranks_of(a: torch.Tensor) -> torch.Tensor:
    used = a[:, 0].abs().amax(dim=2) > 0  # [slots, max_rank]
    return (used * torch.arange(1, used.shape[1] + 1)).amax(dim=1)


def _slot_ranks(stacked_a: torch.Tensor) -> torch.Tensor:
    """Per slot, the rank its adapter uses: one past the last row of A that is not all
    zeros (0 for an empty slot or a projection the adapter did not train)."""
    return _per_slot(stacked_a, "_zoo_slot_ranks", _ranks_of)


def _float_a(stacked_a: torch.Tensor) -> torch.Tensor:
    """A in float32 as [slots, rank, in], cut at the largest rank any slot uses (vLLM
    stacks every slot at ``--max-lora-rank``; the rows past an adapter's rank are zeros).
    Small batched matmuls are several times faster in float32 than in bf16 on the CPU."""
    width = max(1, int(_slot_ranks(stacked_a).max()))
    return _per_slot(stacked_a, "_zoo_float_a", lambda t: _float32(t[:, 0, :width]), width)


def _float_b(stacked_b: torch.Tensor, width: int) -> torch.Tensor:
    """B in float32, rank-major: [slots, rank, out], contiguous per slot, cut at ``width``
    (A's), so an adapter's B is one block."""
    return _per_slot(stacked_b, "_zoo_float_b",
                     lambda t: _float32(t[:, 0, :, :width].transpose(1, 2)), width)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 copy (never a view of vLLM's stack: the slots are rewritten)."""
    return torch.empty(t.shape, dtype=torch.float32).copy_(t)


def _slots_with_weights(stacked: torch.Tensor) -> frozenset[int]:
    """Adapter slots whose weights are not all zero (only the slots vLLM wrote are
    looked at again)."""
    def nonzero(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).abs().amax(dim=1) > 0
    live = _per_slot(stacked, "_zoo_live_slots", nonzero)
    return frozenset(int(i) for i in torch.nonzero(live).flatten())
