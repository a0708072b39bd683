"""An adapter's first use, read in fewer steps by vLLM's worker.

vLLM's worker loads an adapter it has not seen (``LoRAModel.from_local_checkpoint``)
on the core that runs every engine step, so each millisecond of it, times the adapters
a burst brings, delays every request in flight. Two of its steps are redone per
tensor: it reads the safetensors file one tensor at a time (120 reads for a rank-8 q/v
adapter of SmolLM2) and parses each tensor's name three times (the module it belongs
to, with and without the model's renames), each name the same for every adapter of the
same targets. Within ``lora_model`` (nowhere else in the process):

* ``safetensors.safe_open`` reads the file in one go and hands out its tensors
  (:class:`WholeFile`: the same keys in the same order, the same tensors);
* ``parse_fine_tuned_lora_name`` remembers its answers, per name and renaming map
  (the worker builds an equal map for every adapter; a different one starts afresh).

And within ``model_manager``, ``str`` of a tensor is ``"tensor(...)"`` (:func:`text`):
its one ``str(...)`` asks whether a packed adapter's first tensor, taken for its device,
is ``"cpu"``, and torch formatted that tensor's numbers to say no (0.5 ms an adapter).

A plain LoRA file (every tensor a linear layer's ``lora_A``/``lora_B``, all of one float
dtype, laid end to end) is read in fewer passes still. Read into one buffer the thread
keeps, its tensors are lent (views of that buffer, valid until the thread's next read),
and ``LoRAModel.from_lora_tensors`` settles them (:func:`settle`) before vLLM sees them:
the smoothed base's rescale (:func:`rescale_with`) as two operations on the whole file,
and the conversion to the LoRA dtype as one, into one tensor the adapter owns. The same
numbers as the tensors one by one (each one's product and quotient, rounded once to
the file's dtype and once to the LoRA dtype, as before). Reading a rank-8 q/v adapter of
SmolLM2 took 3.0-3.2 ms against 4.3-4.6 (``bench/first_use.py``): one pass over the file
where there were four, and no fresh buffer for the file or the rescale to page-fault.
Each tensor, lent or settled, is one ``as_strided`` of the whole (:meth:`Layout.views`):
2.6 ms where a slice and a view took 3.2.
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path


class WholeFile:
    """What ``lora_model`` uses of ``safetensors.safe_open`` (a context manager with
    ``keys()`` and ``get_tensor(name)``), over the file read in one go."""

    def __init__(self, path: str | Path, framework: str = "pt", device: str = "cpu"):
        import safetensors.torch

        if framework != "pt" or str(device) != "cpu":
            raise ValueError(f"WholeFile reads PyTorch tensors to the CPU, not {framework} "
                             f"on {device}")
        lent = _lend(Path(path))
        self._tensors = lent if lent is not None else \
            safetensors.torch.load(Path(path).read_bytes())

    def __enter__(self) -> WholeFile:
        return self

    def __exit__(self, *exc) -> None:
        self._tensors = {}

    def keys(self) -> list[str]:
        return sorted(self._tensors)  # as safe_open lists them

    def get_tensor(self, name: str):
        return self._tensors[name]


class _SafetensorsInLoraModel:
    """The ``safetensors`` module as ``lora_model`` sees it: its ``safe_open`` is
    :class:`WholeFile`, anything else is the module's own."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return WholeFile if name == "safe_open" else getattr(self._module, name)


class RememberedNames:
    """``parse_fine_tuned_lora_name(name, weights_mapper)``, each answer remembered for
    the renaming map it was given (compared by value once per new map object), up to
    ``LIMIT`` names (the names of one model's layers; past it, it starts afresh)."""

    LIMIT = 8192

    def __init__(self, parse):
        self.parse = parse
        self._mapper = None
        self._answers: dict[tuple[str, bool], tuple[str, bool]] = {}

    def __call__(self, name: str, weights_mapper=None) -> tuple[str, bool]:
        if weights_mapper is not None and weights_mapper is not self._mapper:
            if weights_mapper != self._mapper:
                self._answers = {}
            self._mapper = weights_mapper
        key = (name, weights_mapper is not None)
        answer = self._answers.get(key)
        if answer is None:
            answer = self.parse(name, weights_mapper)
            if len(self._answers) >= self.LIMIT:
                self._answers = {}
            self._answers[key] = answer
        return answer


# the lent tensors' dtypes, by safetensors' names
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
KEEP_BYTES = 32 << 20  # a thread keeps a read buffer and a scratch up to this size
LAYOUTS_KEPT = 64      # the layouts remembered (a catalog's adapters share a few)


@dataclass
class Layout:
    """Where a plain LoRA file's tensors lie, by its header (adapters of the same
    targets and ranks have the same one): ``index`` maps each name to its first element,
    element count and shape in the file's data, one ``dtype`` throughout."""

    dtype: object  # torch.dtype
    count: int
    index: dict[str, tuple[int, int, tuple[int, ...]]]
    factors: dict = field(default_factory=dict)  # id(scales): (multipliers, divisors) or None
    strided: dict = field(init=False)  # name: (first, shape, contiguous strides)

    def __post_init__(self):
        self.strided = {name: (first, shape, _strides(shape))
                        for name, (first, _, shape) in self.index.items()}

    def views(self, flat) -> dict:
        """Each of the file's tensors as a view of ``flat`` (its data, or the data
        converted), by name: one ``as_strided`` a tensor, where a slice and then a view
        took two calls (about 3 us a torch call on the Xeon; 240 a rank-8 q/v adapter)."""
        start = flat.storage_offset()
        return {name: flat.as_strided(shape, strides, start + first)
                for name, (first, shape, strides) in self.strided.items()}

    def rescaling(self, scales: dict):
        """The whole file's multipliers and divisors, float32 (1 where a tensor is not
        rescaled, so each element gets its own tensor's one operation), or None where
        ``scales`` rescale none of these tensors."""
        import torch

        from zoo.models.smoothing import _rescaling

        key = id(scales)
        if key not in self.factors:
            by = {True: torch.ones(self.count), False: torch.ones(self.count)}
            touched = False
            for name, (start, count, shape) in self.index.items():
                plan = _rescaling(name, scales)
                if plan is not None:
                    multiply, s = plan
                    by[multiply][start:start + count].view(shape).copy_(s.expand(shape))
                    touched = True
            self.factors = {key: (by[True], by[False]) if touched else None}
        return self.factors[key]


@dataclass
class _Lent:
    layout: Layout
    flat: object  # the file's data, a view of the thread's buffer
    tensors: dict


class _Thread(threading.local):
    def __init__(self):
        self.buffer = bytearray()
        self.scratch = None  # float32 for the rescale
        self.lent: _Lent | None = None


_THREAD = _Thread()
_LAYOUTS: dict[bytes, Layout | None] = {}
_RESCALE: dict = {}  # "scales": the smoothed base's, once rescale_with is called


def rescale_with(scales: dict) -> None:
    """Lent tensors are rescaled for a smoothed base with these ``scales`` as they settle
    (``zoo.models.smoothing``'s rescale, the same numbers)."""
    _RESCALE["scales"] = scales


def _layout(header: bytes) -> Layout | None:
    """The layout a plain LoRA file's header gives, or None for any other file."""
    import torch

    if header in _LAYOUTS:
        return _LAYOUTS[header]
    if len(_LAYOUTS) >= LAYOUTS_KEPT:
        _LAYOUTS.clear()
    layout = None
    try:
        entries = json.loads(header)
        entries.pop("__metadata__", None)
        dtypes = {entry["dtype"] for entry in entries.values()}
        if (entries and len(dtypes) == 1 and dtypes <= set(_DTYPES)
                and all(name.endswith(_LORA_SUFFIXES) for name in entries)):
            dtype = getattr(torch, _DTYPES[dtypes.pop()])
            size = dtype.itemsize
            end, index = 0, {}
            for name, entry in sorted(entries.items(), key=lambda e: e[1]["data_offsets"]):
                begin, stop = entry["data_offsets"]
                shape = tuple(entry["shape"])
                if not all(type(n) is int and n >= 0 for n in (begin, stop, *shape)):
                    break
                count = 1
                for n in shape:
                    count *= n
                if begin != end or stop - begin != count * size:
                    break
                index[name] = (begin // size, count, shape)
                end = stop
            else:
                layout = Layout(dtype, end // size, dict(sorted(index.items())))
    except (ValueError, TypeError, KeyError, AttributeError):
        layout = None  # safetensors says what is wrong with it
    _LAYOUTS[header] = layout
    return layout


def _lend(path: Path) -> dict | None:
    """A plain LoRA file's tensors, lent from the thread's read buffer; None for any
    other file (read as before)."""
    import torch

    thread = _THREAD
    thread.lent = None
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buffer = thread.buffer
        if len(buffer) < size:
            # a new one: the old may still be exported to a tensor's view
            buffer = bytearray(size)
            if size <= KEEP_BYTES:
                thread.buffer = buffer
        view = memoryview(buffer)
        read = 0
        while read < size:
            got = f.readinto(view[read:size])
            if not got:
                break
            read += got
    if read != size or size < 8:
        return None
    (length,) = struct.unpack_from("<Q", buffer, 0)
    layout = _layout(bytes(view[8:8 + length])) if 8 + length <= size else None
    start = 8 + length
    if (layout is None or start % layout.dtype.itemsize
            or size != start + layout.count * layout.dtype.itemsize):
        return None
    flat = torch.frombuffer(buffer, dtype=layout.dtype, count=layout.count, offset=start)
    flat._zoo_lent = True  # its views' _base: settle tells a lent tensor read over
    tensors = layout.views(flat)
    thread.lent = _Lent(layout, flat, tensors)
    return tensors


class Settled(dict):
    """An adapter's tensors, its own, rescaled for the smoothed base where one is set."""


def settle(tensors: dict, dtype=None) -> dict:
    """``tensors`` (an adapter's, by name) as the adapter's own: lent ones rescaled
    (:func:`rescale_with`) and converted to ``dtype`` (their own where None) into one
    tensor, a :class:`Settled`; a mix of lent and other tensors with the lent ones copied
    (rescaled later, as any); anything else as it is."""
    import torch

    if isinstance(tensors, Settled):
        return tensors
    lent = _THREAD.lent
    mine = set() if lent is None else \
        {name for name, tensor in tensors.items() if lent.tensors.get(name) is tensor}
    if not mine:
        if any(getattr(t._base, "_zoo_lent", False) for t in tensors.values()
               if isinstance(t, torch.Tensor)):
            raise RuntimeError("an adapter's lent tensors were read over by a later read "
                               "before they settled")
        return tensors
    _THREAD.lent = None
    if len(mine) < len(tensors):
        return {name: tensor.clone() if name in mine else tensor
                for name, tensor in tensors.items()}
    layout = lent.layout
    target = layout.dtype if dtype is None else dtype
    scales = _RESCALE.get("scales")
    factors = None if scales is None else layout.rescaling(scales)
    if factors is None:
        owned = lent.flat.to(target, copy=True)
    else:
        multipliers, divisors = factors
        work = _scratch(layout.count)
        torch.mul(lent.flat, multipliers, out=work)  # in float32, as value.float() * s
        work.div_(divisors)
        # rounded to the file's dtype first, as adapt_tensors' rescaled tensors are
        rounded = work if layout.dtype == torch.float32 else work.to(layout.dtype)
        owned = rounded.to(target, copy=True)
    views = layout.views(owned)
    return Settled((name, views[name]) for name in tensors)


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides for ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _scratch(count: int):
    import torch

    thread = _THREAD
    if thread.scratch is None or thread.scratch.numel() < count:
        scratch = torch.empty(count, dtype=torch.float32)
        if count * 4 > KEEP_BYTES:
            return scratch
        thread.scratch = scratch
    return thread.scratch[:count]


def dtype_of(args: tuple, kwargs: dict):
    """``dtype`` of a ``LoRAModel.from_lora_tensors`` call, given what follows
    ``tensors`` (``peft_helper, device, dtype, ...``: the patch checks the order)."""
    return kwargs["dtype"] if "dtype" in kwargs else args[2] if len(args) > 2 else None


def settling(original):
    """``LoRAModel.from_lora_tensors`` (the function under the classmethod) that
    settles lent tensors first."""
    def from_lora_tensors(cls, lora_model_id, tensors, *args, **kwargs):
        return original(cls, lora_model_id, settle(tensors, dtype_of(args, kwargs)), *args,
                        **kwargs)

    from_lora_tensors._zoo_settles = True
    from_lora_tensors.__wrapped__ = original
    return from_lora_tensors


def _settles(function) -> bool:
    """``function`` or one it wraps (``__wrapped__``) settles lent tensors."""
    while function is not None:
        if getattr(function, "_zoo_settles", False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def text(*args, **kwargs) -> str:
    """``str``, except that a tensor's text is ``"tensor(...)"``: as its whole text, it
    never equals a device's name, which is all ``model_manager`` asks of it."""
    import torch

    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return "tensor(...)"
    return builtins.str(*args, **kwargs)


def install() -> None:
    import safetensors
    from vllm.lora import lora_model, model_manager

    model_class = lora_model.LoRAModel
    if not _settles(model_class.from_lora_tensors.__func__):
        model_class.from_lora_tensors = classmethod(
            settling(model_class.from_lora_tensors.__func__))
    if not isinstance(lora_model.safetensors, _SafetensorsInLoraModel):
        lora_model.safetensors = _SafetensorsInLoraModel(safetensors)
    if not isinstance(lora_model.parse_fine_tuned_lora_name, RememberedNames):
        lora_model.parse_fine_tuned_lora_name = RememberedNames(
            lora_model.parse_fine_tuned_lora_name)
    model_manager.str = text
