"""A faster multi-LoRA path for vLLM on the CPU: one matmul per adapter in the batch.

vLLM's PyTorch-native punica ops (``vllm/lora/ops/torch_ops``) gather a full
copy of the adapter weights for every token (``lora_b[indices]``) and run a
per-token einsum: work and memory traffic that grow with tokens, not with
adapters. This wrapper maps tokens to adapters once per step, then runs two
dense matmuls per slice: for one adapter, on its tokens; for several, every
token through all of the batch's A matrices at once, masked to its own (see
``Batch``). It skips the LoRA pass of the logits when no adapter in the batch
has weights for ``lm_head`` (it would add exact zeros). It keeps vLLM's dtypes:
the shrink accumulates in float32, the expand runs in the output's dtype.

zoo's plugin selects it on the CPU platform; ``ZOO_FAST_LORA=0`` restores
vLLM's own. Tests compare the two on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = "zoo.serve.fast_lora.GroupedPunicaWrapperCPU"
# Below this many tokens per adapter (decode steps), per-group matmuls are too small
# to pay for their overhead and the masked dense path is faster; above it (prefill),
# the dense path's G-fold arithmetic costs more than the loop. Measured on 2 cores.
DENSE_TOKENS_PER_GROUP = 16
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


@dataclass(frozen=True)
class Batch:
    """The step's adapters and, per token, which of them applies (a 0/1 mask).

    With several adapters in a batch, every token goes through all of their A
    matrices in one dense matmul; the mask zeroes the results of the others,
    so the expand matmul adds each token's own adapter only. That costs
    G x the LoRA arithmetic (still a few percent of the base layer's) but two
    well-shaped GEMMs instead of a per-token or per-group loop.
    """

    slots: torch.Tensor  # [G] adapter slots in the batch
    mask: torch.Tensor  # [tokens, G * rank_max] 1 where the token uses that group


def layout(groups: Groups, tokens: int, rank: int) -> Batch | None:
    if len(groups) < 2:
        return None
    mask = torch.zeros(tokens, len(groups))
    for g, (_slot, rows) in enumerate(groups):
        mask[rows, g] = 1.0
    return Batch(torch.tensor([s for s, _r in groups]), mask.repeat_interleave(rank, dim=1))


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_groups = group_rows(self.token_lora_indices)
        self._token_batches: dict[int, Batch | None] = {}  # by rank, made on first use
        self._sampler_groups = group_rows(self.sampler_indices)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        flat_y = y.view(-1, y.shape[-1])
        flat_x = x.view(-1, x.shape[-1])
        if not self._token_groups:
            return
        groups = self._token_groups
        if len(groups) == 1 or flat_x.shape[0] >= DENSE_TOKENS_PER_GROUP * len(groups):
            # one adapter, or many tokens each (a prefill): matmuls on each group's rows
            for slot, rows in groups:
                xs = (flat_x if rows is None else flat_x.index_select(0, rows)).float()
                parts = [(xs @ a[slot, 0].float().T * scale).to(flat_y.dtype)
                         @ b[slot, 0].to(flat_y.dtype).T
                         for a, b in zip(lora_a_stacked, lora_b_stacked, strict=True)]
                delta = _join(parts, output_slices)
                if rows is None:
                    flat_y[:, : delta.shape[1]] += delta[:, : flat_y.shape[1]]
                else:
                    flat_y.index_add_(0, rows, _fit(delta, flat_y.shape[1]))
            return
        # several adapters: all tokens through all their A's, masked, then all B's
        rank = lora_a_stacked[0].shape[2]
        if rank not in self._token_batches:
            self._token_batches[rank] = layout(self._token_groups, flat_x.shape[0], rank)
        batch = self._token_batches[rank]
        xs = flat_x.float()
        parts = []
        for a, b in zip(lora_a_stacked, lora_b_stacked, strict=True):
            a_all = a.view(a.shape[0], a.shape[2], a.shape[3]).index_select(0, batch.slots)
            shrunk = (xs @ a_all.view(-1, a.shape[-1]).float().T) * batch.mask  # [tokens, G*r]
            if scale != 1.0:
                shrunk = shrunk * scale
            b_all = _rank_major(b).index_select(0, batch.slots).view(-1, b.shape[2])
            parts.append(shrunk.to(flat_y.dtype) @ b_all.to(flat_y.dtype))  # [tokens, size]
        delta = _join(parts, output_slices)
        flat_y[:, : delta.shape[1]] += delta[:, : flat_y.shape[1]]

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None,
                        **kwargs: Any) -> None:
        live = _slots_with_weights(lora_b_stacked)
        groups = [(s, r) for s, r in self._sampler_groups if s in live]
        if not groups:
            return  # every adapter in the batch has zero lm_head weights: nothing to add
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


def _join(parts: list[torch.Tensor], sizes: tuple[int, ...], dim: int = 1) -> torch.Tensor:
    """Slices side by side along the last dim, each cut or zero-padded to its size
    (an adapter and the model may pad a projection differently)."""
    fitted = []
    for part, size in zip(parts, sizes, strict=True):
        width = part.shape[dim]
        fitted.append(part.narrow(dim, 0, size) if width >= size
                      else torch.nn.functional.pad(part, (0, size - width)))
    return fitted[0] if len(fitted) == 1 else torch.cat(fitted, dim=dim)


def _fit(delta: torch.Tensor, width: int) -> torch.Tensor:
    if delta.shape[1] == width:
        return delta
    out = delta.new_zeros(delta.shape[0], width)
    out[:, : min(width, delta.shape[1])] = delta[:, :width]
    return out


def _derived(stacked: torch.Tensor, name: str, make):
    """A value computed from a stacked weight tensor, kept on the tensor itself and
    recomputed only when vLLM writes into it (loading or evicting an adapter bumps
    the tensor's ``_version``)."""
    cached = getattr(stacked, name, None)
    if cached is None or cached[0] != stacked._version:
        cached = (stacked._version, make(stacked))
        setattr(stacked, name, cached)
    return cached[1]


def _rank_major(stacked_b: torch.Tensor) -> torch.Tensor:
    """B as [slots, rank, out], contiguous, so the batch's B's gather into one
    [G * rank, out] matrix without a strided copy."""
    return _derived(stacked_b, "_zoo_rank_major", lambda b: b[:, 0].transpose(1, 2).contiguous())


def _slots_with_weights(stacked: torch.Tensor) -> frozenset[int]:
    """Adapter slots whose weights are not all zero."""
    def live(t: torch.Tensor) -> frozenset[int]:
        nonzero = t.flatten(1).abs().amax(dim=1) > 0
        return frozenset(int(i) for i in torch.nonzero(nonzero).flatten())
    return _derived(stacked, "_zoo_live_slots", live)
