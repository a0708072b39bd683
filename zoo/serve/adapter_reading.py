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
"""

from __future__ import annotations

import builtins
from pathlib import Path


class WholeFile:
    """What ``lora_model`` uses of ``safetensors.safe_open`` (a context manager with
    ``keys()`` and ``get_tensor(name)``), over the file read in one go."""

    def __init__(self, path: str | Path, framework: str = "pt", device: str = "cpu"):
        import safetensors.torch

        if framework != "pt" or str(device) != "cpu":
            raise ValueError(f"WholeFile reads PyTorch tensors to the CPU, not {framework} "
                             f"on {device}")
        self._tensors = safetensors.torch.load(Path(path).read_bytes())

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

    if not isinstance(lora_model.safetensors, _SafetensorsInLoraModel):
        lora_model.safetensors = _SafetensorsInLoraModel(safetensors)
    if not isinstance(lora_model.parse_fine_tuned_lora_name, RememberedNames):
        lora_model.parse_fine_tuned_lora_name = RememberedNames(
            lora_model.parse_fine_tuned_lora_name)
    model_manager.str = text
