"""Each LoRA linear layer's route for the step, chosen once a step: its base layer's
forward where no adapter of the step has weights in it, else straight to the kernel.

vLLM gives every module it can adapt a LoRA layer (SmolLM2: 120 linear ones) and runs
each through seven calls of its own to reach the punica wrapper's ``add_lora_linear``
(and zoo's wrapper four more to reach its native kernel), every step, whether or not an
adapter of the step trains the layer. With q/v adapters, 90 of the 120 add nothing in
every step, and none do in a step without adapters; inside a served step each Python
call costs several times what it costs in a loop (the interpreter's code and data have
left the caches by the time it runs): the wrapper's Python alone took 2.1 ms of a 74 ms
warm decode step.

After vLLM sets a step's adapter mapping (``LoRAModelManager.set_adapter_mapping``, once
every adapter of the step is in its slot), each LoRA linear layer of the language model
gets an entry ``forward`` in its ``__dict__``, which ``nn.Module.__call__`` finds before
the class's forward:

* where no adapter of the step has weights in it (a row of A, in its slot of some slice,
  that is not all zeros: ``_slot_ranks``), its base layer's forward, which its own does
  plus the adapters' product (the same bias, the same linear method): the same output,
  to the bit, as zoo's wrapper skips slices no adapter of the step trains;
* else, with zoo's native kernel, the base layer's forward and then the kernel's call
  (the wrapper's ``add_lora_prepared``) with the arguments ``_parts`` made for the
  stacks now: the same call, with the same arguments, that vLLM's forward reaches;
* else (a rank or dtype the kernel does not take, or a mapping the wrapper does not
  group) no entry: vLLM's own forward.

Nothing is trusted to stay as it was: every write to a stack moves its version counter,
seen by zoo or not, and the slots holding weights are read again, for the layers whose
stacks moved, whenever the sum of all stacks' versions moved (they only grow); the
routes are made anew when that or the step's slots changed, before the step's forward.
The sum over SmolLM2's 420 stacks is one ``map`` a step. Only layers whose forward is
one of vLLM's own, around a base layer whose forward is the matching base one, on one
device, are routed (:func:`routable`); the patch's checks hold those forwards to what
this was written against. vLLM runs a LoRA engine on the CPU eagerly: no traced graph
keeps a route.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from zoo.serve import native
from zoo.serve.fast_lora import _slot_ranks, _stacks_of, _unwrapped, native_arguments

_version = attrgetter("_version")
EVERY_SLOT = -1  # a step whose slots the wrapper does not say: every bit set


class _Routes:
    """A manager's routable layers, the slots holding weights in each (a bit a slot) at
    its stacks' versions, and what the last routing saw."""

    def __init__(self, layers: list):
        self.layers = layers
        self.stacks = [s for layer in layers for s in _stacks_of(layer)]
        wrappers = {id(layer.punica_wrapper): layer.punica_wrapper for layer in layers}
        self.wrapper = next(iter(wrappers.values())) if len(wrappers) == 1 else None
        self.held: list[tuple[int, int] | None] = [None] * len(layers)
        self.versions: int | None = None
        self.step: tuple | None = None


def install() -> None:
    """Take over ``LoRAModelManager.set_adapter_mapping``: vLLM's own, then :func:`route`."""
    from vllm.lora.model_manager import LoRAModelManager

    original = LoRAModelManager.set_adapter_mapping
    if getattr(original, "_zoo_routes", False):
        return

    def set_adapter_mapping(self, mapping) -> None:
        original(self, mapping)
        route(self)

    set_adapter_mapping._zoo_routes = True
    set_adapter_mapping.__wrapped__ = original
    LoRAModelManager.set_adapter_mapping = set_adapter_mapping


def route(manager) -> None:
    """Route each routable layer of ``manager`` for the step whose mapping was just set.
    A manager of several punica wrappers (a multimodal model's) is left to vLLM."""
    routes = manager.__dict__.get("_zoo_routes")
    if routes is None:
        routes = manager._zoo_routes = _Routes(
            [m for m in manager.modules.values() if routable(m)])
        if routes.wrapper is None:
            routes.layers = []
    if not routes.layers:
        return
    versions = sum(map(_version, routes.stacks))
    step = getattr(routes.wrapper, "_step_key", None) \
        if getattr(routes.wrapper, "_grouped", False) else None
    if versions == routes.versions and step == routes.step:
        return
    if versions != routes.versions:
        for i, layer in enumerate(routes.layers):
            own = sum(map(_version, _stacks_of(layer)))
            if routes.held[i] is None or routes.held[i][0] != own:
                routes.held[i] = (own, _slots_holding_weights(layer))
        routes.versions = versions
    routes.step = step
    wanted = EVERY_SLOT if step is None else sum(1 << slot for slot in step)
    kernel = native.kernel() if step is not None else None
    for layer, (_, held) in zip(routes.layers, routes.held, strict=True):
        if not held & wanted:
            if not idle(layer):
                layer.__dict__["forward"] = layer.base_layer.forward
            continue
        forward = kernel and _straight_to_the_kernel(layer, kernel)
        if forward:
            layer.__dict__["forward"] = forward
        else:
            layer.__dict__.pop("forward", None)


def idle(layer) -> bool:
    """Whether ``layer`` runs as its base layer this step."""
    return getattr(layer.__dict__.get("forward"), "__self__", None) is layer.base_layer


def _straight_to_the_kernel(layer, kernel):
    """A forward for a layer some adapter of the step trains: its base layer's forward,
    then the native kernel's call with the arguments made here (the wrapper's
    ``add_lora_prepared``), where vLLM's forward takes seven calls to reach the wrapper
    and the wrapper four more to reach the kernel; None where the kernel does not take
    the layer's stacks (a rank above its limit, a dtype it was not built for): vLLM's own
    forward then runs, and the wrapper finds its way. The arguments point into the
    stacks' per-slot copies (``_parts``), made for the stacks' versions now: a write
    moves a version, and the next routing makes them anew before the next forward."""
    wrapper = layer.punica_wrapper
    stacks = (layer.lora_a_stacked, layer.lora_b_stacked, layer.output_slices)
    parts = wrapper._parts(*stacks, sum(layer.output_slices), every_slot=True)
    arguments = parts and native_arguments(kernel, parts)
    if not arguments:
        return None
    base_forward, add = layer.base_layer.forward, wrapper.add_lora_prepared

    def forward(x, _parts=parts):  # the parts keep what the arguments point into
        out = base_forward(x)
        add(out[0] if out.__class__ is tuple else out, x, kernel, arguments, stacks)
        return out

    return forward


def _slots_holding_weights(layer) -> int:
    """The slots (a bit each) where some slice's A has a row that is not all zeros."""
    a = layer.lora_a_stacked
    held = torch.zeros((), dtype=torch.bool)
    for stacked in (a if isinstance(a, (tuple, list)) else (a,)):
        held = held | (_slot_ranks(stacked) > 0)
    return sum(1 << int(slot) for slot in torch.nonzero(held).flatten())


def routable(layer) -> bool:
    """One of vLLM's linear LoRA layers as this was written for: its forward and
    ``apply`` vLLM's own (the base's linear method, then the adapters' product added in
    place), around a base layer whose forward is the matching base class's, on one
    device, with a punica wrapper."""
    pairs = _forward_pairs()
    base = getattr(layer, "base_layer", None)
    own = _unwrapped(type(layer).forward)
    return own in pairs and base is not None and \
        _unwrapped(type(base).forward) is pairs[own] and \
        _unwrapped(type(layer).apply) in _applies() and \
        getattr(layer, "tp_size", None) == 1 and \
        not getattr(layer, "_enable_aux_cuda_stream", False) and \
        getattr(layer, "punica_wrapper", None) is not None


def _forward_pairs() -> dict:
    """vLLM's LoRA linear forwards, each with the base forward it does the work of."""
    from vllm.lora.layers.column_parallel_linear import ColumnParallelLinearWithLoRA
    from vllm.lora.layers.replicated_linear import ReplicatedLinearWithLoRA
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )

    return {ColumnParallelLinearWithLoRA.forward: ColumnParallelLinear.forward,
            RowParallelLinearWithLoRA.forward: RowParallelLinear.forward,
            ReplicatedLinearWithLoRA.forward: ReplicatedLinear.forward}


def _applies() -> tuple:
    """vLLM's ``apply`` of the linear LoRA layers; the merged-column one calls its base
    layer's own forward only for a base class with a forward of its own, which
    :func:`routable` has already refused, else the other."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    return BaseLinearLayerWithLoRA.apply, MergedColumnParallelLinearWithLoRA.apply
