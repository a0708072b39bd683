"""zoo's Houlsby bottleneck adapters: the modules, and attaching them to a model.

Format (a directory)::

    zoo_adapter.json           {"format": "zoo-bottleneck", "format_version": 1,
                                "base_model": NAME, "hidden_size": d, "bottleneck_size": m,
                                "non_linearity": "relu", "positions": [...], "layers": [...]}
    adapter_model.safetensors  layers.{i}.{position}.down.weight [m, d], .down.bias [m],
                               layers.{i}.{position}.up.weight [d, m], .up.bias [d]

``position`` is ``attention`` (on the output of the attention block) or
``feed_forward`` (on the output of the MLP), each before the residual add,
as in Houlsby et al. 2019. Each module computes ``h + up(act(down(h)))``:
2md + d + m parameters. The nonlinearity is why it cannot be folded into W.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from zoo.errors import FormatError
from zoo.models.adapters import (
    BOTTLENECK_ACTIVATIONS,
    BOTTLENECK_CONFIG,
    BOTTLENECK_FORMAT,
    BOTTLENECK_POSITIONS,
    PEFT_WEIGHTS,
    bottleneck_key,
)

ACTIVATIONS = dict(zip(BOTTLENECK_ACTIVATIONS, (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh), strict=True))
UP_INIT_STD = 1e-4  # near zero: training starts from the base's behaviour


class Bottleneck(nn.Module):
    """down (d->m), nonlinearity, up (m->d), plus the skip connection."""

    def __init__(self, d: int, m: int, non_linearity: str = "relu"):
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise FormatError(f"unknown nonlinearity {non_linearity!r}; use one of "
                              f"{sorted(ACTIVATIONS)}")
        self.down = nn.Linear(d, m)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(m, d)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.up.weight, std=UP_INIT_STD)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return list(obj)
    raise FormatError(f"cannot find the decoder layers of {type(model).__name__}")


def _sublayer(layer: nn.Module, position: str) -> nn.Module:
    names = ("self_attn", "attn", "attention") if position == "attention" else ("mlp", "feed_forward")
    for name in names:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise FormatError(f"cannot find the {position} block of {type(layer).__name__}")


class BottleneckSet(nn.Module):
    """All the bottleneck modules of one adapter, attached to a model by forward hooks."""

    def __init__(self, d: int, m: int, layers: list[int], positions: list[str],
                 non_linearity: str = "relu"):
        super().__init__()
        self.config = {"format": BOTTLENECK_FORMAT, "format_version": 1, "hidden_size": d,
                       "bottleneck_size": m, "non_linearity": non_linearity,
                       "positions": list(positions), "layers": list(layers)}
        self.blocks = nn.ModuleDict({
            f"{i}_{pos}": Bottleneck(d, m, non_linearity) for i in layers for pos in positions})
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        """Run each module on its sublayer's output (before the residual add)."""
        decoder = _decoder_layers(model)
        for key, block in self.blocks.items():
            i, pos = key.split("_", 1)
            target = _sublayer(decoder[int(i)], pos)
            self._handles.append(target.register_forward_hook(_hook(block)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_for_file(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for key, block in self.blocks.items():
            i, pos = key.split("_", 1)
            for part in ("down", "up"):
                for param in ("weight", "bias"):
                    value = getattr(getattr(block, part), param)
                    tensors[bottleneck_key(int(i), pos, part, param)] = value.detach().contiguous()
        return tensors

    def save(self, out: Path, base_model: str) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(self.state_for_file(), out / PEFT_WEIGHTS)
        (out / BOTTLENECK_CONFIG).write_text(
            json.dumps({**self.config, "base_model": base_model}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> BottleneckSet:
        from safetensors.torch import load_file

        config = json.loads((path / BOTTLENECK_CONFIG).read_text())
        adapter = cls(config["hidden_size"], config["bottleneck_size"], config["layers"],
                      config["positions"], config["non_linearity"])
        tensors = load_file(path / PEFT_WEIGHTS)
        with torch.no_grad():
            for key, block in adapter.blocks.items():
                i, pos = key.split("_", 1)
                for part in ("down", "up"):
                    for param in ("weight", "bias"):
                        getattr(getattr(block, part), param).copy_(
                            tensors[bottleneck_key(int(i), pos, part, param)])
        return adapter


def _hook(block: Bottleneck):
    def apply(_module, _inputs, output):
        if isinstance(output, tuple):
            return (block(output[0]), *output[1:])
        return block(output)
    return apply


def new_bottleneck(model: nn.Module, m: int | None = None, non_linearity: str = "relu",
                   positions: tuple[str, ...] = BOTTLENECK_POSITIONS) -> BottleneckSet:
    """A fresh adapter for ``model``: every layer, both positions, m = d/16 by default."""
    d = model.config.hidden_size
    layers = list(range(len(_decoder_layers(model))))
    return BottleneckSet(d, m or max(1, d // 16), layers, list(positions), non_linearity)
