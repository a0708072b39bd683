"""Each LoRA layer's route for the step: its base layer where no adapter of the step trains
it, else straight to the native kernel. vLLM's own forwards both ways, the same outputs to
the bit, step after step, whatever wrote the stacks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm.lora.layers.column_parallel_linear import (
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
)
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA
from vllm.lora.layers.utils import LoRAMapping
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from zoo.serve import layer_routes
from zoo.serve.fast_lora import GroupedPunicaWrapperCPU

SLOTS, RANK, HIDDEN = 4, 8, 16
IDS = [11, 22, 33, 44]  # slot -> adapter id
# name -> (LoRA class, base class, slices' widths, input width)
LAYERS = {
    "qkv": (MergedQKVParallelLinearWithLoRA, QKVParallelLinear, (16, 8, 8), HIDDEN),
    "o": (RowParallelLinearWithLoRA, RowParallelLinear, (16,), HIDDEN),
    "gate_up": (MergedColumnParallelLinearWithLoRA, MergedColumnParallelLinear, (24, 24),
                HIDDEN),
    "down": (RowParallelLinearWithLoRA, RowParallelLinear, (16,), 24),
}


class PlainLinear:
    """The base's linear method: what vLLM's unquantized one computes, without its CPU
    dispatch (the method is not what is tested; both routes call the same one)."""

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


def _made(cls):
    """An instance of vLLM's class with torch's module set-up only (vLLM's own __init__
    asks for a tensor-parallel group); the attributes its forwards read are set below."""
    module = object.__new__(cls)
    torch.nn.Module.__init__(module)
    return module


def layer(name: str, wrapper, g: torch.Generator):
    lora_cls, base_cls, slices, width = LAYERS[name]
    base = _made(base_cls)
    base.weight = torch.nn.Parameter(torch.randn(sum(slices), width, generator=g),
                                     requires_grad=False)
    base.bias = torch.nn.Parameter(torch.randn(sum(slices), generator=g),
                                   requires_grad=False) if name == "o" else None
    base.quant_method = PlainLinear()
    base.skip_bias_add, base.return_bias, base.gather_output = False, name != "down", False
    base.input_is_parallel, base.reduce_results = True, True
    base.tp_size, base.tp_rank = 1, 0
    lora = _made(lora_cls)
    lora.base_layer = base
    lora.tp_size, lora.tp_rank, lora._enable_aux_cuda_stream = 1, 0, False
    lora.output_slices, lora.n_slices = slices, len(slices)
    lora.lora_a_stacked = tuple(torch.zeros(SLOTS, 1, RANK, width) for _ in slices)
    lora.lora_b_stacked = tuple(torch.zeros(SLOTS, 1, s, RANK) for s in slices)
    lora.set_mapping(wrapper)
    return lora


class Manager:
    """What ``route`` reads of vLLM's LoRAModelManager, and the mapping it sets (vLLM's own
    ``set_adapter_mapping``, taken over by zoo's patch, calls ``_set_adapter_mapping``)."""

    supports_mm = False

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.wrapper = GroupedPunicaWrapperCPU(max_num_batched_tokens=64, max_batches=8,
                                               device="cpu")
        self.modules = {name: layer(name, self.wrapper, g) for name in LAYERS}
        self.lora_index_to_id = list(IDS)
        self._last_mapping = self._last_slot_layout = None

    def _set_adapter_mapping(self, mapping):
        self.wrapper.update_metadata(mapping, self.lora_index_to_id, SLOTS + 1, 256)


def place(manager: Manager, slot: int, trains: dict[str, tuple[bool, ...]], g, rank=RANK):
    """vLLM's set_lora for every layer: the slot zeroed, then the trained slices written."""
    for name, module in manager.modules.items():
        for a, b, on in zip(module.lora_a_stacked, module.lora_b_stacked,
                            trains.get(name, (False,) * module.n_slices), strict=True):
            a[slot] = 0
            b[slot] = 0
            if on:
                a[slot, 0, :rank] = torch.randn(rank, a.shape[-1], generator=g) * 0.1
                b[slot, 0, :, :rank] = torch.randn(b.shape[2], rank, generator=g) * 0.1


def step(manager: Manager, slots: list[int]):
    """Set a decode step's mapping (a token a slot, -1: no adapter) as vLLM does."""
    ids = tuple(IDS[s] if s >= 0 else 0 for s in slots)
    manager.set_adapter_mapping(LoRAMapping(ids, ids, is_prefill=False))


def trained_in_step(module, slots: list[int]) -> bool:
    """Independently of zoo's ranks: some slot of the step has a non-zero A in a slice."""
    return any(bool(a[s].any()) for a in module.lora_a_stacked for s in slots if s >= 0)


def check_step(manager: Manager, slots: list[int], g) -> dict[str, bool]:
    """Each layer's output as routed equals its own forward's, to the bit; a layer is
    idle exactly when no adapter of the step has weights in it, and otherwise goes
    straight to the native kernel. Returns which were idle."""
    step(manager, slots)
    was_idle = {}
    for name, module in manager.modules.items():
        x = torch.randn(len(slots), module.lora_a_stacked[0].shape[-1], generator=g)
        was_idle[name] = layer_routes.idle(module)
        assert was_idle[name] == (not trained_in_step(module, slots)), name
        assert "forward" in module.__dict__, name  # idle, or straight to the kernel
        routed = module(x)
        route = module.__dict__.pop("forward")
        own = module(x)  # vLLM's LoRA forward: the base's, then the adapters' product
        module.__dict__["forward"] = route
        routed, own = (r[0] if isinstance(r, tuple) else r for r in (routed, own))
        assert torch.equal(routed, own), name
    return was_idle


@pytest.fixture(scope="module", autouse=True)
def patched():
    from vllm.lora.model_manager import LoRAModelManager

    layer_routes.install()
    Manager.set_adapter_mapping = LoRAModelManager.set_adapter_mapping
    assert getattr(Manager.set_adapter_mapping, "_zoo_routes", False)


def test_vllms_linear_lora_layers_are_routable():
    manager = Manager()
    assert all(layer_routes.routable(m) for m in manager.modules.values())
    assert not layer_routes.routable(manager.modules["qkv"].base_layer)

    class Own(RowParallelLinearWithLoRA):  # a forward of its own: not what was checked
        def forward(self, input_):
            return super().forward(input_)

    own = _made(Own)
    own.__dict__.update({k: v for k, v in vars(manager.modules["o"]).items()
                         if not k.startswith("_")})
    own.base_layer, own.tp_size, own._enable_aux_cuda_stream = \
        manager.modules["o"].base_layer, 1, False
    own.punica_wrapper = manager.wrapper
    assert not layer_routes.routable(own)


def test_qv_adapters_leave_three_layers_of_four_idle_and_the_base_all():
    g = torch.Generator().manual_seed(1)
    manager = Manager()
    place(manager, 0, {"qkv": (True, False, True)}, g)
    place(manager, 1, {"qkv": (True, False, True)}, g, rank=4)
    assert check_step(manager, [0, 1, -1, 0], g) == \
        {"qkv": False, "o": True, "gate_up": True, "down": True}
    assert all(check_step(manager, [-1, -1], g).values())  # the base alone: all idle
    # an adapter training every module enters a free slot: its steps run every layer ...
    place(manager, 2, {"qkv": (True, True, True), "o": (True,), "gate_up": (True, True),
                       "down": (True,)}, g)
    assert not any(check_step(manager, [2, 0, -1], g).values())
    # ... and the steps without it leave them idle again
    assert check_step(manager, [0, 1], g) == \
        {"qkv": False, "o": True, "gate_up": True, "down": True}
    # a write zoo never saw (no reset, no set_lora): the next step finds it
    manager.modules["down"].lora_a_stacked[0][0, 0, 3, 5] = 1.0
    assert check_step(manager, [0, 1], g)["down"] is False


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("place"), st.integers(0, SLOTS - 1),
              st.dictionaries(st.sampled_from(sorted(LAYERS)), st.booleans()),
              st.integers(1, RANK)),
    st.tuples(st.just("clear"), st.integers(0, SLOTS - 1)),
    st.tuples(st.just("unseen"), st.sampled_from(sorted(LAYERS)), st.integers(0, SLOTS - 1)),
    st.tuples(st.just("step"), st.lists(st.integers(-1, SLOTS - 1), min_size=1, max_size=6))),
    max_size=14))
def test_any_sequence_of_writes_and_steps_routes_to_the_same_outputs(ops):
    g = torch.Generator().manual_seed(len(ops))
    manager = Manager()
    for op in ops:
        if op[0] == "place":
            _, slot, which, rank = op
            trains = {name: tuple(on if i == 0 else not on for i in range(
                manager.modules[name].n_slices)) for name, on in which.items()}
            place(manager, slot, trains, g, rank=rank)
        elif op[0] == "clear":
            place(manager, op[1], {}, g)
        elif op[0] == "unseen":
            module = manager.modules[op[1]]
            module.lora_a_stacked[-1][op[2], 0, 0] = torch.randn(
                module.lora_a_stacked[-1].shape[-1], generator=g)
        else:
            check_step(manager, op[1], g)
