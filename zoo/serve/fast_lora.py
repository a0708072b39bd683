"""A faster multi-LoRA path for vLLM on the CPU: work that grows with tokens, not adapters.

vLLM's PyTorch-native punica ops (``vllm/lora/ops/torch_ops``) run every token
through every projection's LoRA slot at ``--max-lora-rank``, whether or not
the adapter trained that projection, with a per-token einsum. This wrapper

* skips a projection (a slice of a fused layer) when no adapter in the step
  has weights there: a q/v adapter costs q and v only, not all seven;
* computes each slice at the largest rank the step's adapters really use
  (vLLM stacks every slot at ``--max-lora-rank``; the rows past an adapter's
  own rank are zeros);
* for a step of many adapters with few tokens each (decode), gathers each
  token's own A and B and runs two batched matmuls: work and memory traffic
  proportional to tokens x rank, the same for 1 or 128 adapters;
* for few adapters with many tokens each (prefill, or one adapter), runs two
  plain matmuls per adapter on its rows;
* skips the LoRA pass of the logits when no adapter in the step has weights
  for ``lm_head`` (it would add exact zeros).

The shrink accumulates in float32 and the expand runs in the output's dtype,
as vLLM's own ops do. zoo's plugin selects it on the CPU platform (a guarded patch,
``patches.py``); ``ZOO_FAST_LORA=0`` restores vLLM's own. A call this path was not
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
        slots = [s for s, _rows in self._token_groups]
        self._step_slots = torch.tensor(slots, dtype=torch.long)
        self._ranks: dict[tuple[int, int], int] = {}  # (tensor id, version) -> rank in step
        indices = self.token_lora_indices
        with_adapter = indices >= 0
        self._rows = None if bool(with_adapter.all()) else torch.nonzero(with_adapter).flatten()
        self._row_slots = indices if self._rows is None else indices.index_select(0, self._rows)
        # the rows with an adapter, sorted by adapter: group g is sorted rows [start, end)
        if len(self._token_groups) > 1:
            self._sorted = torch.cat([rows for _slot, rows in self._token_groups])
            bounds, start = [], 0
            for slot, rows in self._token_groups:
                bounds.append((slot, start, start + len(rows)))
                start += len(rows)
            self._bounds = bounds
            # the same rows padded to [adapters, longest group]: position -> sorted row,
            # padding points at an extra zero row
            longest = max(end - start for _slot, start, end in bounds)
            self._padded_rows = longest * len(bounds)
            index = torch.full((len(bounds), longest), start, dtype=torch.long)
            for g, (_slot, begin, end) in enumerate(bounds):
                index[g, : end - begin] = torch.arange(begin, end)
            self._pad_index = index.flatten()
            self._valid = index.flatten() < start  # positions that hold a real row

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
        groups = self._token_groups
        if not groups:
            return
        flat_y = y.view(-1, y.shape[-1])
        flat_x = x.view(-1, x.shape[-1])
        if len(groups) == 1:
            path = "one"
        elif self._padded_rows <= PADDING_LIMIT * len(self._sorted):
            path = "batched"
        else:
            path = "sorted"
        xs = None  # the inputs as the chosen path needs them, made once for all slices
        offset = 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            rank = self._step_rank(a)
            width = min(size, b.shape[2], flat_y.shape[1] - offset)
            if rank and width > 0:
                out = flat_y[:, offset:offset + width]
                if path == "one":
                    slot, rows = groups[0]
                    if xs is None:
                        xs = (flat_x if rows is None else flat_x.index_select(0, rows)).float()
                    delta = _shrink_expand(xs, a[slot, 0, :rank], b[slot, 0, :width, :rank],
                                           scale, out.dtype)
                    if rows is None:
                        out += delta
                    else:
                        out.index_add_(0, rows, delta)
                elif path == "sorted":  # many tokens per adapter: one matmul pair per adapter
                    if xs is None:
                        xs = flat_x.index_select(0, self._sorted).float()
                    delta = out.new_empty(xs.shape[0], width)
                    for slot, start, end in self._bounds:
                        delta[start:end] = _shrink_expand(
                            xs[start:end], a[slot, 0, :rank], b[slot, 0, :width, :rank], scale,
                            out.dtype)
                    out.index_add_(0, self._sorted, delta)
                else:  # groups of similar size: one batched matmul pair over all adapters
                    groups_n = len(self._bounds)
                    if xs is None:
                        rows = flat_x.index_select(0, self._sorted).float()
                        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
                        xs = rows.index_select(0, self._pad_index).view(groups_n, -1, rows.shape[1])
                    a_g = _rank_cut(a, rank).index_select(0, self._step_slots)  # [G, r, in]
                    shrunk = torch.bmm(xs, a_g.float().transpose(1, 2))  # [G, n, r]
                    if scale != 1.0:
                        shrunk = shrunk * scale
                    b_g = _rank_major(b, rank).index_select(0, self._step_slots)  # [G, r, out]
                    delta = torch.bmm(shrunk.to(out.dtype), b_g[:, :, :width].to(out.dtype))
                    delta = delta.view(-1, width)[self._valid]  # sorted rows, padding dropped
                    out.index_add_(0, self._sorted, delta)
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


def _valid_slots(indices: torch.Tensor, slots: int) -> bool:
    if indices.numel() == 0:
        return True
    return indices.dtype in (torch.int32, torch.int64) and int(indices.min()) >= -1 and \
        int(indices.max()) < slots


def _shrink_expand(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """scale * (xs @ a.T) @ b.T: the shrink in float32, the expand in the output's dtype."""
    shrunk = xs @ a.float().T
    if scale != 1.0:
        shrunk = shrunk * scale
    return shrunk.to(dtype) @ b.to(dtype).T


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
            dirty = getattr(stacked, "_zoo_dirty", None)
            if dirty is not None:
                dirty.add(index)
        return original(self, index)

    reset_lora._zoo_tracks = True
    layer_class.reset_lora = reset_lora


def _per_slot(stacked: torch.Tensor, name: str, make_all, make_slots):
    """A per-slot value derived from a stacked weight tensor, kept on the tensor. When vLLM
    wrote into it (its ``_version`` moved), only the slots marked by ``reset_lora`` are
    recomputed; a write zoo did not see recomputes every slot."""
    cached = getattr(stacked, name, None)
    dirty = getattr(stacked, "_zoo_dirty", None)
    if cached is None or dirty is None:
        stacked._zoo_dirty = set()
        value = make_all(stacked)
    elif cached[0] == stacked._version:
        return cached[1]
    elif dirty:
        value = cached[1]
        slots = torch.tensor(sorted(dirty), dtype=torch.long)
        value[slots] = make_slots(stacked.index_select(0, slots))
    else:
        value = make_all(stacked)
    setattr(stacked, name, (stacked._version, value))
    stacked._zoo_dirty.clear()  # one per-slot value per stack: A has ranks, B rank-major
    return value


def _ranks_of(a: torch.Tensor) -> torch.Tensor:
    used = a[:, 0].abs().amax(dim=2) > 0  # [slots, max_rank]
    return (used * torch.arange(1, used.shape[1] + 1)).amax(dim=1)


def _slot_ranks(stacked_a: torch.Tensor) -> torch.Tensor:
    """Per slot, the rank its adapter uses: one past the last row of A that is not all
    zeros (0 for an empty slot or a projection the adapter did not train)."""
    return _per_slot(stacked_a, "_zoo_slot_ranks", _ranks_of, _ranks_of)


def _rank_cut(stacked_a: torch.Tensor, rank: int) -> torch.Tensor:
    """A as [slots, rank, in]: a view, no copy."""
    return stacked_a[:, 0, :rank]


def _rank_major(stacked_b: torch.Tensor, rank: int) -> torch.Tensor:
    """B as [slots, rank, out], contiguous per slot (a slot is redone when vLLM writes
    it), so gathering an adapter's B copies one block instead of a strided one."""
    def transposed(b: torch.Tensor) -> torch.Tensor:
        return b[:, 0].transpose(1, 2).contiguous()
    return _per_slot(stacked_b, "_zoo_rank_major", transposed, transposed)[:, :rank]


def _slots_with_weights(stacked: torch.Tensor) -> frozenset[int]:
    """Adapter slots whose weights are not all zero (only the slots vLLM wrote are
    looked at again)."""
    def nonzero(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).abs().amax(dim=1) > 0
    live = _per_slot(stacked, "_zoo_live_slots", nonzero, nonzero)
    return frozenset(int(i) for i in torch.nonzero(live).flatten())
