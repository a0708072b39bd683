"""A cold adapter read by the engine core and placed by the worker.

vLLM's worker reads an adapter it has not seen (``WorkerLoRAManager._load_adapter``:
the file, 120 tensors of a rank-8 q/v adapter of SmolLM2, each converted and wrapped)
on the CPU that runs every engine step: 2-3.5 ms of a first use of 5-6, times the
adapters a burst brings, before the burst's first step. The engine core, another
process, can do that part while the worker places the adapter before it:

* once, the worker says what ``_load_adapter`` reads of it (:func:`context_of`: the
  modules it takes LoRA on, the LoRA config, the vocabulary size, ...);
* for each cold adapter, the engine core runs vLLM's own ``_load_adapter`` on a stand-in
  that carries those (:func:`read`), and sends the ``LoRAModel`` it made to the worker
  (:func:`place`) without waiting for it: vLLM's message queue carries the tensors as
  buffers (about 0.7 ms each side for that adapter);
* the worker's ``_load_adapter`` hands over what it was sent, after vLLM's checks that
  need the model itself, instead of reading the file (:func:`install_worker_side`); the
  rest of ``add_lora`` (packing, the slot) is vLLM's and zoo's as before.

``first_use.py`` decides when: it holds the requests of the adapters it sent until
their places are confirmed, one wait before the step (the worker runs the queue's
messages in order, so the placements are done before the step's forward anyway). It
reads every other cold adapter here and leaves the rest to the worker's own read: a
burst of new adapters waits for all of their loads, and the worker, idle meanwhile,
reads as fast as the core (the core shares its CPU with the API server).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

_HANDED = "_zoo_handed_over"  # the worker manager's dict of models sent, by adapter id


@dataclass(frozen=True)
class Context:
    """What vLLM's ``_load_adapter`` reads of the worker's LoRA manager (0.32)."""

    supported_lora_modules: list[str]
    packed_modules_mapping: dict[str, list[str]]
    max_position_embeddings: int | None
    vocab_size: int
    lora_config: Any
    lora_model_cls: type
    rename_mapper: Any  # the model's hf_to_vllm_mapper's renames, or None
    skip_prefixes: Any

    def stand_in(self) -> SimpleNamespace:
        """A worker LoRA manager as ``_load_adapter`` sees it. vLLM's checks of the
        model read (MoE layout, modules to save, classification) are the worker's."""
        mapper = None
        if self.rename_mapper is not None:
            mapper = SimpleNamespace(get_rename_mapper=lambda: self.rename_mapper)
        later = lambda lora: None  # noqa: E731 - see the worker's _load_adapter
        return SimpleNamespace(
            _adapter_manager=SimpleNamespace(
                supported_lora_modules=self.supported_lora_modules,
                packed_modules_mapping=self.packed_modules_mapping,
                model=SimpleNamespace(hf_to_vllm_mapper=mapper,
                                      lora_skip_prefixes=self.skip_prefixes),
                moe_ep_load_spec=None,
                _validate_moe_lora_format=later, _validate_modules_to_save=later,
                _validate_token_classification_lora=later),
            max_position_embeddings=self.max_position_embeddings,
            lora_config=self.lora_config, _lora_model_cls=self.lora_model_cls,
            vocab_size=self.vocab_size)


def context_of(worker) -> Context | None:
    """In the worker: what the engine core needs to read adapters for it, or None where
    it should not (the hand-over is not installed here, or a mixture-of-experts model,
    whose expert-parallel loading reads the worker's layout)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    manager = getattr(worker.model_runner, "lora_manager", None)
    if (manager is None or not handing_over()
            or not isinstance(manager, WorkerLoRAManager)):
        return None
    adapters = manager._adapter_manager
    if getattr(adapters, "moe_ep_load_spec", None) is not None:
        return None
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    return Context(
        supported_lora_modules=list(adapters.supported_lora_modules),
        packed_modules_mapping={k: list(v) for k, v in adapters.packed_modules_mapping.items()},
        max_position_embeddings=manager.max_position_embeddings,
        vocab_size=manager.vocab_size, lora_config=manager.lora_config,
        lora_model_cls=manager._lora_model_cls,
        rename_mapper=None if mapper is None else mapper.get_rename_mapper(),
        skip_prefixes=getattr(model, "lora_skip_prefixes", None))


def read(context: Context, lora_request):
    """In the engine core: the adapter's ``LoRAModel``, made by vLLM's own
    ``_load_adapter`` (its errors too: a missing adapter, a rank over the limit, DoRA),
    each layer's scaling already folded into its B by vLLM's own ``optimize``. The
    worker's ``add_lora`` calls ``optimize`` on every layer as it packs them; done here, it
    finds nothing left to do (60 in-place products a rank-8 q/v adapter of SmolLM2, 0.3 ms
    of the worker's, which a burst of new adapters waits on; the core waits on the worker
    meanwhile)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    load = WorkerLoRAManager._load_adapter
    load = getattr(load, "__wrapped__", load)  # vLLM's, not the hand-over
    model = load(context.stand_in(), lora_request)
    for lora in model.loras.values():
        lora.optimize()
    return model


def place(worker, lora_request, lora_model) -> bool:
    """In the worker: vLLM's ``add_lora`` for the adapter, its ``_load_adapter`` handing
    over ``lora_model`` instead of reading the file."""
    manager = worker.model_runner.lora_manager
    handed = manager.__dict__.setdefault(_HANDED, {})
    handed[lora_request.lora_int_id] = lora_model
    try:
        return worker.add_lora(lora_request)
    finally:
        handed.pop(lora_request.lora_int_id, None)  # unused when it was loaded already


def handing_over() -> bool:
    from vllm.lora.worker_manager import WorkerLoRAManager

    return getattr(WorkerLoRAManager._load_adapter, "_zoo_hands_over", False)


def install_worker_side() -> None:
    """Patch ``WorkerLoRAManager._load_adapter`` to hand over a model :func:`place` was
    sent for that adapter (after vLLM's checks that read the model)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    original = WorkerLoRAManager._load_adapter
    if getattr(original, "_zoo_hands_over", False):
        return

    def _load_adapter(self, lora_request):
        handed = self.__dict__.get(_HANDED)
        lora = handed.pop(lora_request.lora_int_id, None) if handed else None
        if lora is None:
            return original(self, lora_request)
        adapters = self._adapter_manager
        adapters._validate_moe_lora_format(lora)
        adapters._validate_modules_to_save(lora)
        adapters._validate_token_classification_lora(lora)
        return lora

    _load_adapter._zoo_hands_over = True
    _load_adapter.__wrapped__ = original
    WorkerLoRAManager._load_adapter = _load_adapter
