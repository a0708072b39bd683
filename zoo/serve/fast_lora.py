"""A faster multi-LoRA path for vLLM on the CPU: one matmul per adapter in the batch.

vLLM's PyTorch-native punica ops (``vllm/lora/ops/torch_ops``) gather a full
copy of the adapter weights for every token (``lora_b[indices]``) and run a
per-token einsum: work and memory traffic that grow with tokens, not with
adapters. This wrapper groups the batch's tokens by adapter once per step and
runs two plain matmuls per adapter and slice, and it skips the LoRA pass of
the logits when no adapter in the batch has weights for ``lm_head`` (it adds
exact zeros then). It keeps vLLM's dtypes: the shrink accumulates in float32,
the expand runs in the output's dtype.

zoo's plugin selects it on the CPU platform; ``ZOO_FAST_LORA=0`` restores
vLLM's own. Tests compare the two on the same inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = "zoo.serve.fast_lora.GroupedPunicaWrapperCPU"
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


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_groups = group_rows(self.token_lora_indices)
        self._sampler_groups = group_rows(self.sampler_indices)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        flat_y = y.view(-1, y.shape[-1])
        flat_x = x.view(-1, x.shape[-1])
        for slot, rows in self._token_groups:
            xs = flat_x if rows is None else flat_x.index_select(0, rows)
            xs = xs.float()
            offset = 0
            for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
                shrunk = (xs @ a[slot, 0].float().T) * scale  # [tokens, rank], float32
                expanded = shrunk.to(flat_y.dtype) @ b[slot, 0].to(flat_y.dtype).T
                width = min(size, expanded.shape[1])
                if rows is None:
                    flat_y[:, offset:offset + width] += expanded[:, :width]
                else:
                    flat_y[rows, offset:offset + width] += expanded[:, :width]
                offset += size

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


_LIVE: dict[int, tuple[int, frozenset[int]]] = {}


def _slots_with_weights(stacked: torch.Tensor) -> frozenset[int]:
    """Adapter slots whose weights are not all zero, recomputed only when the tensor
    changed (vLLM writes and clears slots in place, which bumps ``_version``)."""
    key = id(stacked)
    cached = _LIVE.get(key)
    if cached is not None and cached[0] == stacked._version:
        return cached[1]
    nonzero = stacked.flatten(1).abs().amax(dim=1) > 0
    live = frozenset(int(i) for i in torch.nonzero(nonzero).flatten())
    _LIVE[key] = (stacked._version, live)
    return live
