"""The arithmetic of folding LoRA adapters into base weights.

For a module with weight W ([out, in]; [in, out] for GPT-2's Conv1D, the
``fan_in_fan_out`` case) and adapters i with user weight w_i::

    W' = W + sum_i w_i * s_i * (B_i @ A_i)          s = alpha / r  (alpha / sqrt(r): rsLoRA)

with r and alpha per module from ``rank_pattern`` / ``alpha_pattern``. DoRA
rescales each output row of W + s·B·A to its learned magnitude. Everything is
computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from zoo.core.tables import LORA_SUFFIXES
from zoo.merge.tensors import TensorFile
from zoo.models.adapters import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, lora_scale, match_pattern

FOLD_BLOCK_BYTES = 256 * 1024
# bias is refused before a merge starts (adapters.vllm_servability / merge planning)
ROLE_SUFFIXES = {role: s for role, s in LORA_SUFFIXES.items() if role != "bias"}


@dataclass
class LoraFile:
    """One adapter's tensors, read lazily, with its config and the user's weight."""

    name: str
    config: dict
    tensors: TensorFile
    weight: float = 1.0
    path: Path | None = None

    @classmethod
    def open(cls, name: str, path: Path, weight: float = 1.0) -> LoraFile:
        config = json.loads((path / PEFT_CONFIG).read_text())
        return cls(name, config, TensorFile(path / PEFT_WEIGHTS), weight, path)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def modules(self) -> dict[str, dict[str, str]]:
        """``{module path: {role: tensor name}}`` for every LoRA module in the file."""
        return self._modules

    @cached_property
    def _modules(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for key in self.tensors.names():
            inner = key.removeprefix(PEFT_PREFIX)
            for role, suffix in ROLE_SUFFIXES.items():
                if inner.endswith(suffix):
                    found.setdefault(inner[: -len(suffix)], {})[role] = key
        return found

    def has(self, module: str) -> bool:
        return module in self.modules()

    def is_embedding(self, module: str) -> bool:
        return "embA" in self.modules().get(module, {})

    def saved_modules(self) -> dict[str, str]:
        """Whole tensors saved by ``modules_to_save``: ``{base tensor name: adapter tensor}``."""
        saved = {}
        for key in self.tensors.names():
            inner = key.removeprefix(PEFT_PREFIX)
            if ".modules_to_save." in inner or (
                    not any(inner.endswith(s) for s in ROLE_SUFFIXES.values())
                    and ".base_layer." not in inner):
                saved[inner.replace(".modules_to_save.default", "")] = key
        return saved

    def rank(self, module: str) -> int:
        return int(match_pattern(self.config.get("rank_pattern") or {}, module)
                   or self.config["r"])

    def scale(self, module: str) -> float:
        rank = self.rank(module)
        alpha = match_pattern(self.config.get("alpha_pattern") or {}, module)
        if alpha is None:
            alpha = self.config.get("lora_alpha", rank)
        return lora_scale(rank, float(alpha), bool(self.config.get("use_rslora", False)))

    def factors(self, module: str, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` in float32 whose product is this adapter's update of ``module``
        in rows-first layout: ``(w·s·B, A)``, [out, in] for a linear layer; ``(w·s·Aᵀ, Bᵀ)``,
        [num, dim] for an embedding (``w``, the user's weight, when ``weighted``)."""
        roles = self.modules()[module]
        factor = self.scale(module) * (self.weight if weighted else 1.0)
        if "embA" in roles:
            return (self.tensors.get(roles["embA"]).float().T.mul(factor),
                    self.tensors.get(roles["embB"]).float().T)
        return (self.tensors.get(roles["B"]).float().mul_(factor),
                self.tensors.get(roles["A"]).float())

    def delta(self, module: str, weighted: bool = True) -> torch.Tensor:
        """This adapter's (weighted) update of ``module``, dense, rows first."""
        left, right = self.factors(module, weighted)
        return left @ right


def rows_per_block(width: int) -> int:
    """Rows of a weight folded (and checked) at a time: about 256 KB of float32."""
    return max(1, FOLD_BLOCK_BYTES // (4 * width))


def fold_rows(rows: torch.Tensor, factors, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of W plus the updates ``left @ right`` for them, in a new float32 tensor; DoRA
    rescales each row to its magnitude."""
    merged = rows.to(torch.float32, copy=True)
    for left, right in factors:
        merged.addmm_(left, right)
    if magnitude is not None:
        merged.mul_((magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1))
    return merged


def fold(weight: torch.Tensor, module: str, loras: list[LoraFile], fan_in_fan_out: bool = False,
         magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + the adapters' updates of ``module`` in float32, in W's layout."""
    rows = weight.T if fan_in_fan_out else weight
    merged = fold_rows(rows, [lora.factors(module) for lora in loras],
                       None if magnitude is None else magnitude.float())
    return merged.T if fan_in_fan_out else merged
