"""LoRA slots that cost memory only where adapters put weights.

vLLM allocates every LoRA layer's stacks with ``torch.zeros`` at ``--max-loras`` slots
and ``--max-lora-rank`` on every projection it can adapt, the lm_head's and the
embeddings' included: 12.9 MB a slot for SmolLM2 at rank 16 in bf16, written through at
start, so 256 slots took 3.3 GB before the first request, whatever the adapters train. The
stacks made here are fresh private anonymous pages instead: they read as zeros and take
memory only once written, so a slot costs what its adapters write (a q/v adapter of rank
8 writes about 1.4 MB of it) and a projection no adapter trains costs nothing. zoo's
``reset_lora`` (``fast_lora.py``) zeroes only the slots written since they were last
zeroed (writing zeros would commit the pages), and neither reads nor writes a stack
nothing has written since it was made here (:func:`untouched`): reading a fresh slot of
every stack mapped 3,300 pages, and placing an adapter in a fresh slot took 16.6 ms of
the worker (1.8 ms now; ``bench/first_use.py``).

A page first written costs a fault, and on a virtual machine whose host hands memory
back and forth (this one) about 13 us: 4.4 ms of a rank-8 q/v adapter's 6 ms placement
into a fresh slot, on the CPU that runs every step, times the adapters a cold burst
brings. So the stacks of the projections the served catalog's adapters train
(``ZOO_SERVE_TARGETS``, set by ``zoo serve``) are committed as they are made
(:func:`populate`: ``MADV_POPULATE_WRITE``, the faults taken at start, the pages still
zeros): the memory those slots reach once adapters of the largest rank have used them
(450 MiB at start for a catalog of q/v adapters of SmolLM2 at rank 16 in bf16, 256
slots); the other projections' stacks stay zero pages. Those committed stacks, and the
values zoo derives from them (:func:`in_huge_pages`), lie in 2 MB pages where whole ones
fit: a decode step of 64 adapters reads each token's adapter rows where they lie, a few
KB on each of about eight 4 kB pages a layer, and the translation misses of 4 kB pages
took about a fifth of the LoRA kernel's time (the kernel alone, a decode step of 64
rank-8 q/v adapters in 256 slots: 8.2 ms in 4 kB pages, 6.5 ms in 2 MB ones).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Collection
from math import prod

import torch
from torch.overrides import TorchFunctionMode

# Smaller tensors come from the allocator as before: a mapping each would cost a page at
# least and count against the process's limit on mappings.
MIN_BYTES = 1 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14
HUGE_PAGE = 2 << 20
SMALL_PAGE = mmap.PAGESIZE
logger = logging.getLogger("zoo.serve")


def zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of zeros in memory that the kernel commits page by page as it is written
    (reads of untouched pages map the shared zero page). One of 2 MB or more starts on a
    2 MB boundary, so that :func:`populate` can give it 2 MB pages. The tensor holds the
    mapping; it is unmapped when the last view of it goes."""
    tensor = _mapped(shape, dtype)
    tensor._zoo_made_at = tensor._version
    return tensor


def populate(tensor: torch.Tensor) -> bool:
    """Commit the pages of a tensor :func:`zero_pages` made, now, in 2 MB pages where
    whole ones fit in it: their first writes then take no page faults, and they still
    read as zeros. False where the kernel cannot (before Linux 5.14) or the tensor is not
    zero pages."""
    pages, offset = getattr(tensor, "_zoo_pages", (None, 0))
    if pages is None:
        return False
    huge = tensor.nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        if huge:  # _mapped starts such a tensor on a 2 MB boundary
            pages.madvise(mmap.MADV_HUGEPAGE, offset, huge)
        pages.madvise(MADV_POPULATE_WRITE, offset, -(-tensor.nbytes // SMALL_PAGE) * SMALL_PAGE)
    except (OSError, ValueError):
        return False
    return True


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (contiguous), copied into committed memory in 2 MB pages where whole
    ones fit; as it is where it is smaller than one, or the kernel cannot."""
    if tensor.nbytes < HUGE_PAGE or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return tensor
    copy = _mapped(tuple(tensor.shape), tensor.dtype)
    return copy.copy_(tensor) if populate(copy) else tensor


def _mapped(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor on fresh private anonymous pages (zeros, committed as written); one of 2 MB
    or more starts on a 2 MB boundary (the mapping is 2 MB longer; the pages past the
    tensor are never touched). ``_zoo_pages``: the mapping and the tensor's offset in it."""
    nbytes = prod(shape) * dtype.itemsize
    spare = HUGE_PAGE if nbytes >= HUGE_PAGE else 0
    pages = mmap.mmap(-1, nbytes + spare, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(pages, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE if spare else 0
    tensor = whole[offset:offset + nbytes].view(dtype).view(shape)
    tensor._zoo_pages = (pages, offset)
    return tensor


def untouched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` was made by :func:`zero_pages` and nothing has written to it
    since (its version counter has not moved): zeros, without reading a page."""
    return getattr(tensor, "_zoo_made_at", None) == tensor._version


class ZeroPageAllocation(TorchFunctionMode):
    """Within it, ``torch.zeros`` of at least MIN_BYTES on the CPU (plain strided
    tensors, nothing else asked of them) gives :func:`zero_pages`; ``made`` holds what
    it gave."""

    def __init__(self):
        super().__init__()
        self.made: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.zeros and _plain(kwargs):
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            shape = torch.zeros(*args, dtype=dtype, device="meta").shape
            if prod(shape) * dtype.itemsize >= MIN_BYTES:
                tensor = zero_pages(tuple(shape), dtype)
                self.made.append(tensor)
                return tensor
        return func(*args, **kwargs)


def _plain(kwargs: dict) -> bool:
    device = kwargs.get("device")
    device = torch.get_default_device() if device is None else torch.device(device)
    return (device.type == "cpu" and set(kwargs) <= {"dtype", "device", "layout"} and
            kwargs.get("layout") in (None, torch.strided))


def populate_trained(manager, targets: Collection[str]) -> int:
    """:func:`populate` the stacks of ``manager``'s LoRA layers (a vLLM
    ``LoRAModelManager``) for the projections named in ``targets`` (names' last parts, as
    adapters name them: ``q_proj``, not the packed ``qkv_proj``); the bytes committed."""
    committed = 0
    for name, layer in manager.modules.items():
        last = name.rsplit(".", 1)[-1]
        parts = manager.packed_modules_mapping.get(last, [last])
        for which in ("lora_a_stacked", "lora_b_stacked"):
            stacks = getattr(layer, which, ())  # none on a layer without LoRA
            stacks = (stacks,) if isinstance(stacks, torch.Tensor) else stacks
            for part, stacked in zip(parts, stacks, strict=False):
                if part in targets and populate(stacked):
                    committed += stacked.nbytes
    return committed


def allocate_slots_lazily(trained: Collection[str] = ()) -> None:
    """vLLM's ``LoRAModelManager._create_lora_modules`` (which makes every LoRA layer and
    its stacks) under :class:`ZeroPageAllocation`, the stacks of the projections in
    ``trained`` committed after (:func:`populate_trained`)."""
    from vllm.lora.model_manager import LoRAModelManager

    original = LoRAModelManager._create_lora_modules
    if getattr(original, "_zoo_zero_pages", False):
        return

    def _create_lora_modules(self):
        with ZeroPageAllocation():
            result = original(self)
        if trained:
            committed = populate_trained(self, trained)
            logger.info("zoo: LoRA slots for %s committed at start: %.0f MB",
                        ", ".join(sorted(trained)), committed / 2**20)
        return result

    _create_lora_modules._zoo_zero_pages = True
    _create_lora_modules.__wrapped__ = original
    LoRAModelManager._create_lora_modules = _create_lora_modules
