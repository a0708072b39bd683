"""A faster multi-LoRA path for vLLM on the CPU: work that grows with tokens, not adapters.

vLLM's PyTorch-native punica ops (``vllm/lora/ops/torch_ops``) run every token
through every projection's LoRA slot at ``--max-lora-rank``, whether or not
the adapter trained that projection, with a per-token einsum. This wrapper

* skips a projection (a slice of a fused layer) when no adapter has weights
  there: a q/v adapter costs q and v only, not all seven;
* computes each row at its adapter's own rank (vLLM stacks every slot at
  ``--max-lora-rank``; the rows past an adapter's own rank are zeros). The native
  kernel's views of a layer's stacks do not depend on the step, so a step that
  brings other adapters than the last (every step, under continuous batching)
  reuses them; the PyTorch plans cut them at the step's largest rank;
* runs every step that has adapters (one or many, decode or prefill) through one
  native kernel call per fused layer (``lora_kernel.cpp``, built for this CPU when vLLM
  starts: ``native.py``): each token reads its own adapter's rows of A and B where they
  lie, at that adapter's own rank, and adds the result in place; nothing is gathered,
  padded or converted to float32 first. The rows it reads are int8 copies of vLLM's
  stacks, each row's numbers with one float32 scale (its largest magnitude / 127), made
  per slot as adapters are written: a step of 64 adapters reads half the bytes of bf16
  rows, a quarter of float32's. Each weight moves by at most half its row's step: a
  token's log-probability moves 6 to 20 times less than bf16 activations move it
  (``bench/int8_rows.py``; ``ZOO_LORA_INT8=0``: the stacks' own dtype);
* where that kernel cannot be built or does not take the call (float16, a rank over
  64), runs the same arithmetic in PyTorch, planned by the step's shape: for a single
  adapter, a matmul pair on its rows; for many with few tokens each (decode), a gather
  of each token's weights; for several with many tokens each (prefills), two batched
  matmuls over the step's adapters, each one's tokens padded to the longest group, or,
  when padding would more than double the rows, a matmul pair per adapter;
* skips the LoRA pass of the logits and of the embeddings when no adapter in the step
  has weights there (it would add exact zeros).

The products accumulate in float32 and the result is rounded once, when it is added to
the output. The per-slot values (each slot's rank, B rank-major) are recomputed only
for the slots vLLM rewrites, and an adapter entering a slot has all its layers' writes
made in two calls (:func:`place_in_bulk`, its own patch). zoo's plugin selects this
wrapper on the CPU platform (a guarded patch, ``patches.py``); ``ZOO_FAST_LORA=0``
restores vLLM's own. A call this path was not written for goes to vLLM's own ops
instead: a keyword it does not know, a torch compile in progress (one step's grouping
must never be baked into a graph), or a token-to-slot mapping outside -1 (no adapter)
.. slots - 1. Tests compare the two on the same inputs, and end to end on the real base.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from zoo.serve import native
from zoo.serve.zero_pages import in_huge_pages, untouched

logger = logging.getLogger("zoo.serve")
QUALNAME = "zoo.serve.fast_lora.GroupedPunicaWrapperCPU"
# Without the native kernel, several adapters in a step: with at most GATHER_LIMIT tokens
# each on average (decode), each token's weights gathered; more, their tokens padded to
# the longest group and run as one batched matmul pair, unless padding would more than
# double the rows (a long prefill beside short ones), where a matmul pair per adapter is
# cheaper.
GATHER_LIMIT = 8
PADDING_LIMIT = 2
# The native kernel reads the adapters' rows as int8, a float32 scale per row, copied from
# vLLM's stacks per slot as adapters are written: half the bytes of bfloat16 rows (a
# quarter of float32's) in a step that waits on memory. ZOO_LORA_INT8=0: the stacks' own
# dtype.
INT8_ROWS = os.environ.get("ZOO_LORA_INT8", "1") != "0"
Groups = list[tuple[int, torch.Tensor | None]]  # (adapter slot, token rows or None = all)


class Parts(tuple):
    """The slices of a fused layer a step computes: (A [slots, rank, in], B [slots, rank,
    width], first output column) each, cut at the largest rank the step's adapters use
    (for the native kernel on int8 rows, each also with A's and B's row scales, [slots,
    rank]);
    ``ranks``: each slice's rank per slot (int64 [slots]); ``native``: the native kernel's
    arguments for them, made on first use (they point into these tensors)."""

    ranks: tuple[torch.Tensor, ...] = ()
    native: Any = None


def group_rows(indices: torch.Tensor) -> Groups:
    """Token rows per adapter slot; slot -1 (no adapter) is left out."""
    if indices.numel() == 0:
        return []
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    return [(slot, torch.nonzero(indices == slot).flatten())
            for slot in _slots_in(indices).tolist()]


def _slots_in(indices: torch.Tensor) -> torch.Tensor:
    """The adapter slots some row uses, ascending, in the indices' dtype (-1, no adapter,
    left out): what group_rows groups by, without the rows."""
    if indices.numel() == 0:
        return indices.new_empty(0)
    slots = torch.unique(indices)
    return slots[slots >= 0] if int(slots[0]) < 0 else slots


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
        self._token_slots = self.token_lora_indices.to(torch.int64).contiguous()
        self._tokens = self._token_slots.numel()
        self._step_slots = _slots_in(self._token_slots)
        self._step_key = tuple(self._step_slots.tolist())
        # each slot's rows, for the PyTorch plans and the logits: made when first needed
        # (the native kernel takes a slot per row; 64 adapters' rows took 0.3 ms a step)
        self._groups = {}
        self._plan = None

    def _rows(self, which: str) -> Groups:
        """``group_rows`` of this step's token or sampler indices, made once a step."""
        if which not in self._groups:
            indices = self.token_lora_indices if which == "token" else self.sampler_indices
            self._groups[which] = group_rows(indices)
        return self._groups[which]

    def _parts(self, lora_a_stacked, lora_b_stacked, output_slices, y_width: int,
               every_slot: bool) -> Parts | None:
        """The slices of a fused layer to compute, as views of the stacks. ``every_slot``
        (for the native kernel, which reads each row's adapter at that adapter's own rank):
        the slices some slot's adapter trains, cut at the largest rank any slot uses, kept
        until vLLM writes to the layer's stacks, whatever adapters the steps bring; None
        where that rank is more than the kernel takes. Else (for the PyTorch plans, which
        compute every row at the part's rank): the slices some adapter of this step trains,
        cut at the largest rank the step's adapters use, kept while the steps bring the
        same adapters."""
        key = (tuple(t._version for t in (*lora_a_stacked, *lora_b_stacked)),
               None if every_slot else self._step_key, y_width)
        name = "_zoo_parts" if every_slot else "_zoo_step_parts"
        cached = getattr(lora_a_stacked[0], name, None)
        if cached is not None and cached[0] == key:
            return cached[1]
        parts, part_ranks, offset = [], [], 0
        for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            ranks = _slot_ranks(a)
            slot_rank = int(ranks.max())  # 0: no adapter in any slot trains this slice
            if every_slot:
                rank = slot_rank
            else:
                rank = slot_rank and int(ranks.index_select(0, self._step_slots).max())
            width = min(size, b.shape[2], y_width - offset)
            if every_slot and rank > native.MAX_RANK:
                parts = None
                break
            if rank and width > 0 and every_slot and _int8_rows(a):
                a8, a_scales = _a_int8(a, rank)
                b8, b_scales = _b_int8(b, rank)
                parts.append((a8, b8[:, :, :width], offset, a_scales, b_scales))
                part_ranks.append(ranks)
            elif rank and width > 0:
                parts.append((a[:, 0, :rank], _b_by_rank(b, slot_rank)[:, :rank, :width], offset))
                part_ranks.append(ranks)
            offset += size
        if parts is not None:
            parts = Parts(parts)
            parts.ranks = tuple(part_ranks)
        setattr(lora_a_stacked[0], name, (key, parts))
        return parts

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor,
                        lora_a_stacked: tuple[torch.Tensor, ...],
                        lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                        output_slices: tuple[int, ...], *, buffer=None, **kwargs: Any) -> None:
        if kwargs or not self._grouped or _compiling():
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        if not self._step_key:
            return
        stacks = (lora_a_stacked, lora_b_stacked, output_slices, y.shape[-1])
        parts = self._parts(*stacks, every_slot=True) if native.kernel() else None
        if parts is None:
            parts = self._parts(*stacks, every_slot=False)
        if not parts:  # no adapter (of any slot, or of this step) trains this layer
            return
        # vLLM hands the CPU's layers 2-D rows already; a view costs more than the rest
        flat_y = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        flat_x = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        if flat_x.shape[0] != self._tokens:  # not a row per token
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        if _native_add(flat_y, flat_x, self._token_slots, parts, scale):
            return
        parts = self._parts(*stacks, every_slot=False)
        if parts:
            if self._plan is None:
                self._plan = _plan(self._rows("token"), self.token_lora_indices)
            self._plan.add(flat_y, self._plan.inputs(flat_x), parts, scale)

    def add_lora_prepared(self, y: torch.Tensor, x: torch.Tensor, kernel, arguments,
                          stacks: tuple) -> None:
        """``add_lora_linear(y, x, *stacks)`` at scale 1, as vLLM's linear LoRA layers call
        it, for a layer whose native arguments this step's routing made (``layer_routes``):
        the kernel's call alone where it takes the rows (a row per token of the step),
        else the whole of ``add_lora_linear``."""
        if x.dim() != 2 or x.shape[0] != self._tokens or not kernel.gather(
                y, x, self._token_slots, arguments, 1.0, torch.get_num_threads()):
            a, b, slices = stacks
            self.add_lora_linear(y, x, a, b, 1.0, slices)

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor,
                           lora_b_stacked: torch.Tensor, add_inputs: bool = True,
                           **kwargs: Any) -> None:
        # vLLM's embedding layer passes add_input=True, which its CPU ops ignore (they add)
        if self._grouped and add_inputs and set(kwargs) <= {"add_input"} and \
                kwargs.get("add_input", True) and not _compiling() and \
                not _slots_with_weights(lora_b_stacked).intersection(self._step_key):
            return  # no adapter of the step has embedding weights: it would add zeros
        return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None,
                        **kwargs: Any) -> None:
        if kwargs or not self._grouped or _compiling():
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           buffer=buffer, **kwargs)
        # A slot whose A is all zeros adds exact zeros; A is [rank, hidden] a slot where
        # B is [vocab, rank] (1.5 MB for SmolLM2): vLLM rewrites slots as adapters come
        live = _slots_with_weights(lora_a_stacked)
        if not live.intersection(self._step_key):
            return  # no adapter of the step has lm_head weights (rows not grouped: 0.5 ms)
        groups = [(s, r) for s, r in self._rows("sampler") if s in live]
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

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.rows is None else x.index_select(0, self.rows)).float()

    def add(self, y, xs, parts: Parts, scale: float) -> None:
        for a, b, start in parts:
            out = y[:, start:start + b.shape[2]]
            if self.rows is None:
                out.add_(_lora(xs, a[self.slot], b[self.slot], scale))
                continue
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

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.rows).float()

    def add(self, y, xs, parts: Parts, scale: float) -> None:
        for a, b, column in parts:
            delta = _with_zero_row(len(self.rows), b.shape[2])
            for slot, start, end in self.bounds:
                _lora(xs[start:end], a[slot], b[slot], scale, into=delta[start:end])
            y[:, column:column + b.shape[2]].add_(delta.index_select(0, self.positions))


class _Batched:
    """Adapters with many tokens each, about as many each (prefills of like prompts): one
    batched matmul pair over the step's adapters, in float32, each adapter's tokens padded
    to the longest group."""

    def __init__(self, groups: Groups, tokens: int):
        longest = max(len(rows) for _slot, rows in groups)
        self.slots = torch.tensor([slot for slot, _rows in groups])
        self.shape = (len(groups), longest)
        # position in the padded batch -> token row; padding reads token 0, its output is
        # never read; token row -> position in the padded batch (none: the zero row after)
        self.padded_rows = torch.zeros(len(groups) * longest, dtype=torch.long)
        self.positions = torch.full((tokens,), len(self.padded_rows), dtype=torch.long)
        for g, (_slot, rows) in enumerate(groups):
            start = g * longest
            self.padded_rows[start:start + len(rows)] = rows
            self.positions[rows] = torch.arange(start, start + len(rows))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.padded_rows).float().view(*self.shape, x.shape[1])

    def add(self, y, xs, parts: Parts, scale: float) -> None:
        for a, b, start in parts:
            a, b = a.index_select(0, self.slots).float(), b.index_select(0, self.slots).float()
            shrunk = torch.bmm(xs, a.transpose(1, 2))  # [adapters, tokens, rank]
            if scale != 1.0:
                shrunk = shrunk * scale
            delta = _with_zero_row(xs.shape[0] * xs.shape[1], b.shape[2])
            torch.bmm(shrunk, b, out=delta[:-1].view(*xs.shape[:2], b.shape[2]))
            y[:, start:start + b.shape[2]].add_(delta.index_select(0, self.positions))


class _Gathered:
    """Adapters with few tokens each (decode), without the native kernel: every token's
    adapter weights gathered and applied in PyTorch (``_gather_lora``)."""

    def __init__(self, indices: torch.Tensor):
        self.slots = indices

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add(self, y, xs, parts: Parts, scale: float) -> None:
        _gather_lora(y, xs, self.slots, parts, scale)


def _native_add(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, parts: Parts,
                scale: float) -> bool:
    """The step's LoRA for one fused layer through the native kernel; False (y untouched)
    where it is not available or does not take the call."""
    kernel = native.kernel()
    if kernel is None:
        return False
    arguments = native_arguments(kernel, parts)
    if arguments and kernel.gather(y, x, slots, arguments, scale, torch.get_num_threads()):
        return True
    _warn_declined(parts, x, y)
    return False


def native_arguments(kernel, parts: Parts):
    """The kernel's arguments for ``parts``, made on first use and kept on them (they
    point into the parts' tensors); False where the kernel does not take them."""
    if parts.native is None:
        parts.native = kernel.arguments(parts, parts.ranks) or False
    return parts.native


def _gather_lora(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, parts: Parts,
                 scale: float) -> None:
    """The native kernel's arithmetic in PyTorch: for every row t and every part (A, B,
    first column) of a fused layer, y[t, columns] += scale * (x[t] @ A[slots[t]].T) @
    B[slots[t]] (slot -1: no adapter, nothing added); A: [slots, rank, in], B: [slots,
    rank, width], any dtype. In float32, rounded to ``y``'s dtype once. ``A[index]``
    copies every row's weights."""
    live = (slots >= 0).to(torch.float32) * scale
    index = slots.clamp(min=0)
    xf = x.float()[:, None, :]
    for a, b, start in parts:
        shrunk = (a[index].float() * xf).sum(-1) * live[:, None]
        delta = (b[index].float() * shrunk[:, :, None]).sum(1)
        out = y[:, start:start + b.shape[2]]
        out.copy_(out.float() + delta)


_DECLINED: set[str] = set()


def _warn_declined(parts: Parts, x: torch.Tensor, y: torch.Tensor) -> None:
    what = f"{parts[0][0].dtype} weights, {x.dtype} inputs, {y.dtype} outputs"
    if what not in _DECLINED:
        _DECLINED.add(what)
        logger.warning("zoo: the native LoRA kernel does not take a call (%s; it takes "
                       "bfloat16 or float32 throughout, or float32 on bfloat16 weights, ranks "
                       "up to %d, slots in the stack); running it in PyTorch, which is slower",
                       what, native.MAX_RANK)


def _plan(groups: Groups, indices: torch.Tensor):
    """How this step's rows (``indices``: a slot per row, -1 for none) meet their adapters
    (None: no row has one)."""
    if not groups:
        return None
    tokens = indices.numel()
    if len(groups) == 1:
        return _One(*groups[0], tokens)
    real = sum(len(rows) for _slot, rows in groups)
    if real <= GATHER_LIMIT * len(groups):
        return _Gathered(indices)
    if len(groups) * max(len(rows) for _slot, rows in groups) <= PADDING_LIMIT * real:
        return _Batched(groups, tokens)
    return _Sorted(groups, tokens)


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
    """scale * (xs @ a.T) @ b for one adapter's rows ``xs`` (float32), computed in float32
    (a: [rank, in], b: [rank, out], any dtype), written ``into`` a buffer if given."""
    shrunk = xs @ a.float().T
    if scale != 1.0:
        shrunk = shrunk * scale
    b = b.float()
    return torch.matmul(shrunk, b, out=into) if into is not None else shrunk @ b


def _valid_slots(indices: torch.Tensor, slots: int) -> bool:
    if indices.numel() == 0:
        return True
    return indices.dtype in (torch.int32, torch.int64) and int(indices.min()) >= -1 and \
        int(indices.max()) < slots


def track_slot_writes() -> None:
    """Take over the LoRA layers' ``reset_lora(index)``, which vLLM calls for every layer
    whenever an adapter enters a slot (``set_lora`` starts with it; a layer the adapter
    does not train gets it alone) and which zeroes that slot of every stack. zoo's
    version zeroes only the slots that may hold anything (:func:`_zero_slot`), and
    ``set_lora`` is wrapped to say which slot it wrote: a q/v adapter entering a slot
    costs zeroing the q and v slots its predecessor left, and nothing is read. It also
    marks the slot on each stack, so that the values derived from the stacks (each
    slot's rank, B rank-major: the lm_head's stack alone is slots x vocab x rank, 200 MB
    for SmolLM2 at 64 slots) redo that slot only."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    for layer_class in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA,
                        VocabParallelEmbeddingWithLoRA):
        original = layer_class.reset_lora
        if not getattr(original, "_zoo_tracks", False):
            def reset_lora(self, index: int) -> None:
                _reset_slot(self, index)

            reset_lora.__wrapped__ = original  # what the patch's checks read, here as anywhere
            reset_lora._zoo_tracks = True
            layer_class.reset_lora = reset_lora
        for cls in (layer_class, *_subclasses(layer_class)):
            if "set_lora" in vars(cls) and not getattr(cls.set_lora, "_zoo_tracks", False):
                cls.set_lora = _telling_writes(cls.set_lora)


def place_in_bulk() -> None:
    """Take over ``LoRAModelManager.activate_adapter`` (an adapter entering a free slot)
    where vLLM's own does only what zoo's does in bulk: it visits every LoRA layer (122
    for SmolLM2) and calls ``set_lora(index, A, B)`` (reset the slot, then copy each
    slice's A and B in) or, where the adapter has no weights, ``reset_lora(index)``.
    zoo's makes the same writes: a layer whose ``set_lora`` is vLLM's own linear one
    (one tensor pair or one per slice, not tensor-parallel) has its slot's zeroing and
    copies gathered, and all of them run as one ``_foreach_zero_`` and one
    ``_foreach_copy_``; a stack whose slot zoo knows holds zeros and gets no weights is
    neither written nor marked (its derived values stay valid); any other layer gets
    its own ``set_lora`` or ``reset_lora``, as in vLLM. A manager with a classification
    head or a pooling model's renaming goes to vLLM's own. The adapter packing before it
    (``_create_merged_loras_inplace``) is vLLM's."""
    from vllm.lora import model_manager

    manager_class = model_manager.LoRAModelManager
    original = manager_class.activate_adapter
    if getattr(original, "_zoo_bulk", False):
        return
    placed = _placed_set_loras()

    def activate_adapter(self, lora_id: int) -> bool:
        lora_model = self._registered_adapters.get(lora_id)
        if lora_id in self._active_adapters or lora_model is None or not _plain(self):
            return original(self, lora_id)
        index = next((i for i, held in enumerate(self.lora_index_to_id) if held is None),
                     None)
        if index is None:
            raise ValueError("No free lora slots")
        self._active_adapters[lora_id] = None
        self.lora_index_to_id[index] = lora_model.id
        place = _Placement(index)
        for name, module in self.modules.items():
            weights = lora_model.get_lora(name)
            if weights is None:
                if getattr(type(module).reset_lora, "_zoo_tracks", False):
                    place.reset(module)
                else:
                    module.reset_lora(index)
            elif not place.copies(module, weights, placed):
                module.set_lora(index, weights.lora_a, weights.lora_b)
        place.run()
        return True

    activate_adapter._zoo_bulk = True
    activate_adapter.__wrapped__ = original
    manager_class.activate_adapter = activate_adapter


def _placed_set_loras() -> dict:
    """vLLM's linear ``set_lora`` bodies :class:`_Placement` does the work of: one A and
    B pair (``"pair"``) or a list of them, one per slice (``"slices"``)."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    return {_unwrapped(BaseLinearLayerWithLoRA.set_lora): "pair",
            _unwrapped(MergedColumnParallelLinearWithLoRA.set_lora): "slices"}


def _plain(manager) -> bool:
    """No classification head among the manager's layers and no pooling model (whose
    layer names vLLM looks up twice): what the bulk placement was written for."""
    plain = getattr(manager, "_zoo_plain", None)
    if plain is None:
        from vllm.lora.layers import ClassificationHeadWithLoRA

        plain = manager._zoo_plain = not getattr(manager, "is_pooling_model", False) and \
            not any(isinstance(m, ClassificationHeadWithLoRA) for m in manager.modules.values())
    return plain


class _Placement:
    """One slot's writes across many layers, gathered, then made in two calls. The
    records kept are :func:`_reset_slot`'s and :func:`_telling_writes`'s: the written
    slots of each stack at its version (:func:`_written_slots`), and the derived values'
    marks."""

    def __init__(self, index: int):
        self.index = index
        self.zeros: list[torch.Tensor] = []      # slot views to zero
        self.zeroed: list[tuple[torch.Tensor, dict]] = []
        self.targets: list[torch.Tensor] = []    # slot views to copy into ...
        self.sources: list[torch.Tensor] = []    # ... from these
        self.copied: list[tuple[torch.Tensor, dict, tuple[int, int]]] = []

    def reset(self, layer) -> None:
        """Gather ``reset_lora(index)`` of ``layer``, which gets no weights (those that
        do: :meth:`copies`); each stack's record is made current (the written slots at
        its version), for :meth:`run` to update."""
        index = self.index
        for stacked in _stacks_of(layer):
            record = getattr(stacked, "_zoo_written", None)
            if record is None or record[0] != stacked._version or index in record[1]:
                self._reset(stacked, False)
            # else: a current record without the slot: nothing to do
            # (about 300 of SmolLM2's 424 stacks an adapter), found without a call

    def _reset(self, stacked: torch.Tensor, copy_follows: bool,
               copied: tuple[int, int] | None = None) -> dict:
        """One stack's share of the reset; ``copied``: the part of the slot the copy that
        follows writes, which needs no zeroing first where it holds all that the slot's
        last adapter wrote (an adapter of the same rank: every adapter of a catalog of one
        rank, in slots of a larger)."""
        index = self.index
        record = getattr(stacked, "_zoo_written", None)
        if record is not None and record[0] == stacked._version:
            written = record[1]  # current: nothing to redo (most stacks, most adapters)
        else:
            written = _written_slots(stacked)
            stacked._zoo_written = (stacked._version, written)
        holds = index in written
        if holds or copy_follows:
            _mark_for_redoing(stacked, index)
        if holds and not _within(written[index], copied):
            self.zeros.append(stacked[index])
            self.zeroed.append((stacked, written))
        return written

    def copies(self, layer, weights, placed: dict) -> bool:
        """Gather ``layer.set_lora(index, A, B)``; False where it is not vLLM's linear
        one on a single device, or the weights are not what it takes without reshaping
        them (its packed groups expanded, its asserts)."""
        kind = _kinds.get(type(layer))
        if kind is None:
            kind = _kinds[type(layer)] = placed.get(_unwrapped(type(layer).set_lora), "")
        if not kind or getattr(layer, "tp_size", None) != 1:
            return False
        a, b = weights.lora_a, weights.lora_b
        stacks_a, stacks_b = layer.lora_a_stacked, layer.lora_b_stacked
        if kind == "pair":
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and len(stacks_a) == len(stacks_b) == layer.n_slices == 1):
                return False
            a, b = [a], [b]
        elif not (isinstance(a, list) and isinstance(b, list)
                  and len(a) == len(b) == layer.n_slices == len(stacks_a) == len(stacks_b)):
            return False
        index = self.index
        for stacks, tensors in ((stacks_a, a), (stacks_b, b)):
            for stacked, tensor in zip(stacks, tensors, strict=True):
                if tensor is None:
                    self._reset(stacked, True)
                    continue
                rows, columns = tensor.shape
                written = self._reset(stacked, True, (rows, columns))
                self.targets.append(_slot_view(stacked, index, rows, columns))
                self.sources.append(tensor)
                self.copied.append((stacked, written, (rows, columns)))
        return True

    def run(self) -> None:
        index = self.index
        if self.zeros:
            torch._foreach_zero_(self.zeros)
            for stacked, written in self.zeroed:
                written.pop(index, None)
                stacked._zoo_written = (stacked._version, written)
        if self.targets:
            torch._foreach_copy_(self.targets, self.sources)
            for stacked, written, part in self.copied:
                written[index] = part
                stacked._zoo_written = (stacked._version, written)


def _within(held: tuple[int, int] | None, copied: tuple[int, int] | None) -> bool:
    """Whether a slot's written part ``held`` (rows, columns of ``stacked[i, 0]``; None:
    any of the slot) lies inside the part a copy writes."""
    return held is not None and copied is not None and held[0] <= copied[0] \
        and held[1] <= copied[1]


_kinds: dict[type, str] = {}  # a layer class's set_lora: "pair", "slices" or "" (its own)


def _slot_view(stacked: torch.Tensor, index: int, rows: int, columns: int) -> torch.Tensor:
    """``stacked[index, 0, :rows, :columns]``, made from the strides: a cold burst of 64
    q/v adapters makes 7,680 of them, and the tuple index was 2.5% of the worker's samples
    in cold bursts on the Xeon (placing an adapter alone: 3.44 -> 3.23 ms). The last one
    made for each slot is kept on the stack and used again while the shape is the same
    (3 us to make, 0.1 to find: 0.35 ms an adapter of 120 tensors). At most one a slot
    and stack, about 730 bytes each: 22 MB for SmolLM2's 256 slots of q/v adapters. Out
    of range: the index's own view (which the copy into it then refuses, as vLLM's
    would)."""
    views = getattr(stacked, "_zoo_views", None)
    if views is None:
        views = stacked._zoo_views = {}
    kept = views.get(index)
    if kept is not None and kept[0] == rows and kept[1] == columns:
        return kept[2]
    if not (0 <= index < stacked.shape[0] and rows <= stacked.shape[2]
            and columns <= stacked.shape[3]):
        return stacked[index, 0, :rows, :columns]
    view = stacked.as_strided((rows, columns), stacked.stride()[2:],
                              stacked.storage_offset() + index * stacked.stride(0))
    views[index] = (rows, columns, view)
    return view


def _unwrapped(function):
    """``function`` without zoo's wrappers (each keeps vLLM's as ``__wrapped__``)."""
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _telling_writes(set_lora):
    """``set_lora(index, ...)`` that adds ``index`` to the written slots of each stack it
    wrote. Only when its own ``reset_lora`` (vLLM's set_lora starts with it) made the
    stack's record during the call: from there to the return, set_lora writes its slot
    only. Any other write leaves the record behind the stack's version, and the next reset
    finds the written slots by reading them."""
    def tracked(self, index: int, *args, **kwargs):
        stacks = _stacks_of(self)
        records = [getattr(s, "_zoo_written", None) for s in stacks]
        set_lora(self, index, *args, **kwargs)
        for stacked, before in zip(stacks, records, strict=True):
            record = getattr(stacked, "_zoo_written", None)
            if record is not before and record is not None and record[0] != stacked._version:
                record[1][index] = None  # any of the slot
                stacked._zoo_written = (stacked._version, record[1])

    tracked.__wrapped__ = set_lora
    tracked._zoo_tracks = True
    return tracked


def _reset_slot(layer, index: int) -> None:
    for stacked in _stacks_of(layer):
        _mark_for_redoing(stacked, index)  # a copy into the slot may follow
        _zero_slot(stacked, index)


def _mark_for_redoing(stacked: torch.Tensor, index: int) -> None:
    """Each value derived from ``stacked`` (:func:`_per_slot`) redoes slot ``index``."""
    dirty = getattr(stacked, "_zoo_dirty", None)
    if dirty:
        for slots in dirty.values():
            slots.add(index)


def _stacks_of(layer) -> tuple[torch.Tensor, ...]:
    """A layer's A and B stacks, one tensor per slice, kept on the layer while vLLM's
    tuples are the same objects (every adapter entering a slot resets all 122 layers)."""
    a, b = layer.lora_a_stacked, layer.lora_b_stacked
    kept = getattr(layer, "_zoo_stacks", None)
    if kept is None or kept[0] is not a or kept[1] is not b:
        flat = tuple(t for s in (a, b) for t in (s if isinstance(s, (tuple, list)) else (s,)))
        kept = layer._zoo_stacks = (a, b, flat)
    return kept[2]


def _zero_slot(stacked: torch.Tensor, index: int) -> None:
    """``stacked[index] = 0`` where the slot may hold anything: it is among the stack's
    written slots (``_zoo_written``: the stack's version and the slots that may hold
    anything but zeros then). The record is made anew each time (``set_lora``'s wrapper
    tells its own reset's record from an older one). A slot no adapter has used is
    never written: on zero pages writing zeros would commit its memory."""
    written = _written_slots(stacked)
    if index in written:
        stacked[index].zero_()
        del written[index]
    stacked._zoo_written = (stacked._version, written)


def _written_slots(stacked: torch.Tensor) -> dict[int, tuple[int, int] | None]:
    """The slots of ``stacked`` that may hold anything but zeros, each with the part of
    ``stacked[slot, 0]`` that may (rows, columns from the start: a placement's copy), or
    None (anywhere in the slot): the record's while the stack's version has not moved
    since; none while it is zero pages nothing has written (``zero_pages.untouched``);
    else found by reading every slot's bits as integers (a write zoo did not see, or a
    stack not made of zero pages: once)."""
    record = getattr(stacked, "_zoo_written", None)
    if record is not None and record[0] == stacked._version:
        return record[1]
    if untouched(stacked):
        return {}
    return dict.fromkeys(int(i) for i in torch.nonzero(_slots_holding_anything(stacked))
                         .flatten())


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _slots_holding_anything(stacked: torch.Tensor) -> torch.Tensor:
    """Per slot, whether any bit of it is set (-0.0 counts: zeroing it changes nothing
    that is read), its bits read as integers by numpy: torch's ``any()`` of one bf16 slot
    took 10 us, of the lm_head's 415 us; this takes 5 and 40."""
    rows = stacked.reshape(stacked.shape[0], -1)
    if rows.device.type != "cpu" or rows.requires_grad or rows.element_size() not in _BITS:
        return rows.any(dim=1)
    return torch.from_numpy(rows.view(_BITS[rows.element_size()]).numpy().any(axis=1))


def _per_slot(stacked: torch.Tensor, name: str, make, key=None, again=None):
    """A per-slot value derived from a stacked weight tensor (a tensor, or a tuple of
    tensors indexed by slot alike), kept on the tensor. When vLLM
    wrote into it (its ``_version`` moved), only the slots marked by ``reset_lora`` (each
    value has its own marks) are recomputed: vLLM writes a slot only after resetting it
    (``set_lora``). A write with no mark pending, or a new ``key`` (the value's shape),
    recomputes every slot (into 2 MB pages where it is large: the native kernel reads B's
    copy a token's rows at a time); marks are dropped while nothing was written (a reset
    zoo skipped), so a later write without marks is never taken for theirs. ``again(stacked,
    slots, value)``: recomputes those slots of the kept value in place, True when done
    (else ``make`` does, on a copy of the slots)."""
    if not hasattr(stacked, "_zoo_dirty"):
        stacked._zoo_dirty = {}
    cached = getattr(stacked, name, None)
    dirty = stacked._zoo_dirty.get(name)
    if cached is not None and cached[2] == key and cached[0] == stacked._version:
        if dirty:
            dirty.clear()
        return cached[1]
    if cached is not None and cached[2] == key and dirty:
        value = cached[1]
        slots = torch.tensor(sorted(dirty), dtype=torch.long)
        if again is None or not again(stacked, slots, value):
            fresh = make(stacked.index_select(0, slots))
            for kept, new in zip(_tensors(value), _tensors(fresh), strict=True):
                kept[slots] = new
    else:
        value = make(stacked)
        value = tuple(map(in_huge_pages, value)) if isinstance(value, tuple) else \
            in_huge_pages(value)
    setattr(stacked, name, (stacked._version, value, key))
    stacked._zoo_dirty[name] = set()
    return value


def _tensors(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _ranks_of(a: torch.Tensor) -> torch.Tensor:
    used = a[:, 0].abs().amax(dim=2) > 0  # [slots, max_rank]
    return (used * torch.arange(1, used.shape[1] + 1)).amax(dim=1)


def _ranks(a: torch.Tensor) -> torch.Tensor:
    """``_ranks_of`` by the native kernel where it is built."""
    kernel = native.kernel()
    ranks = kernel.row_ranks(a[:, 0]) if kernel else None
    return _ranks_of(a) if ranks is None else ranks


def _ranks_again(a: torch.Tensor, slots: torch.Tensor, kept: torch.Tensor) -> bool:
    """``_ranks`` of ``slots`` into ``kept``, in place, by the native kernel; False
    where it is not built or does not take them."""
    kernel = native.kernel()
    return bool(kernel) and kernel.row_ranks(a[:, 0], slots, kept) is not None


def _slot_ranks(stacked_a: torch.Tensor) -> torch.Tensor:
    """Per slot, the rank its adapter uses: one past the last row of A that is not all
    zeros (0 for an empty slot or a projection the adapter did not train)."""
    return _per_slot(stacked_a, "_zoo_slot_ranks", _ranks, again=_ranks_again)


def _b_by_rank(stacked_b: torch.Tensor, width: int) -> torch.Tensor:
    """B rank-major, [slots, rank, out], contiguous per slot, cut at ``width`` (the largest
    rank any slot uses), in the stack's dtype: a copy, never a view of vLLM's stack (the
    slots are rewritten). vLLM stacks B as [out, rank]: read per token, each row of the
    output would be a strided read of a few of its ``--max-lora-rank`` numbers."""
    def rank_major(t: torch.Tensor) -> torch.Tensor:
        return t[:, 0, :, :width].transpose(1, 2).contiguous()
    return _per_slot(stacked_b, "_zoo_b_by_rank", rank_major, width)


def _int8_rows(stacked_a: torch.Tensor) -> bool:
    """Whether the native kernel reads this stack's adapters as int8 rows (``INT8_ROWS``)."""
    return INT8_ROWS and stacked_a.dtype in (torch.bfloat16, torch.float32)


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (the last dimension) as int8 numbers times one float32 scale, its largest
    magnitude / 127, rounded to nearest: ([..., n] int8, [...] float32). An all-zero row
    has scale 0."""
    wide = rows.float()
    scales = wide.abs().amax(dim=-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    numbers = torch.round(wide / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return numbers, scales.contiguous()


def _quantized(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` of a 3-D view, by the native kernel where it is built: vLLM writes
    a slot as an adapter comes, and in PyTorch A's and B's copies of 64 new adapters took
    6.4 ms for each trained slice of each layer on the Xeon (0.4 s a cold burst, in the
    worker's steps); the same bits."""
    kernel = native.kernel()
    done = kernel.quantize_rows(rows) if kernel else None
    if done is None:
        numbers, scales = quantize_rows(rows)
        return numbers.contiguous(), scales
    return done


def _quantized_again(rows: torch.Tensor, slots: torch.Tensor, kept) -> bool:
    """``_quantized`` of ``slots`` of ``rows``, written into the ``kept`` (numbers,
    scales) in place by the native kernel, without copying those slots out and back;
    False where it is not built or does not take them."""
    kernel = native.kernel()
    return bool(kernel) and kernel.quantize_rows(rows, slots, kept) is not None


def dequantize_rows(numbers: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weights :func:`quantize_rows`' output stands for, exactly (float64): each
    number times its row's scale."""
    return numbers.double() * scales.double().unsqueeze(-1)


def _a_int8(stacked_a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A's rows up to ``rank`` (the largest any slot uses) as int8 with a scale each:
    ([slots, rank, in] int8, [slots, rank] float32), copies kept per slot."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[:, 0, :rank]
    return _per_slot(stacked_a, "_zoo_a_int8", lambda t: _quantized(rows(t)), rank,
                     lambda t, slots, kept: _quantized_again(rows(t), slots, kept))


def _b_int8(stacked_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B rank-major up to ``rank`` (as :func:`_b_by_rank`), each row of ``out`` numbers
    as int8 with a scale: ([slots, rank, out] int8, [slots, rank] float32)."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[:, 0, :, :rank].transpose(1, 2)
    return _per_slot(stacked_b, "_zoo_b_int8", lambda t: _quantized(rows(t)), rank,
                     lambda t, slots, kept: _quantized_again(rows(t), slots, kept))


def _slots_with_weights(stacked: torch.Tensor) -> frozenset[int]:
    """Adapter slots whose weights are not all zero (only the slots vLLM wrote are
    looked at again)."""
    def nonzero(t: torch.Tensor) -> torch.Tensor:
        low, high = t.flatten(1).aminmax(dim=1)  # no temporary the stack's size
        return (low != 0) | (high != 0)
    live = _per_slot(stacked, "_zoo_live_slots", nonzero)
    return frozenset(int(i) for i in torch.nonzero(live).flatten())
