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
        return lora_scale(int(rank), float(alpha), bool(self.config.get("use_rslora", False)))

    def factors(self, module: str, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B, A)`` of a linear module in float32 (times the user's weight if
        ``weighted``): their product is the update, [out, in]."""
        roles = self.modules()[module]
        factor = self.scale(module) * (self.weight if weighted else 1.0)
        return (self.tensors.get(roles["B"]).float().mul_(factor),
                self.tensors.get(roles["A"]).float())

    def add_update(self, weight: torch.Tensor, module: str, roles: dict[str, str]) -> None:
        """Add this adapter's weighted update to ``weight`` (float32, [out, in]; [num, dim]
        for an embedding) in place, without building the update on its own."""
        factor = self.weight * self.scale(module)
        if "embA" in roles:  # (B [dim, r] @ A [r, num]).T = A.T @ B.T
            a, b = self.tensors.get(roles["embA"]).float(), self.tensors.get(roles["embB"]).float()
            weight.addmm_(a.T, b.T, alpha=factor)
        else:
            a, b = self.tensors.get(roles["A"]).float(), self.tensors.get(roles["B"]).float()
            weight.addmm_(b, a, alpha=factor)

    def delta(self, module: str, roles: dict[str, str], weighted: bool = True) -> torch.Tensor:
        """This adapter's (weighted) update of ``module`` in float32, shaped [out, in]
        ([num, dim] for an embedding)."""
        factor = self.scale(module) * (self.weight if weighted else 1.0)
        if "embA" in roles:  # embeddings: B [dim, r] @ A [r, num], transposed to [num, dim]
            a, b = self.tensors.get(roles["embA"]).float(), self.tensors.get(roles["embB"]).float()
            return (b @ a).mul_(factor).T
        a, b = self.tensors.get(roles["A"]).float(), self.tensors.get(roles["B"]).float()
        return (b @ a).mul_(factor)


def fold(weight: torch.Tensor, module: str, contributions, fan_in_fan_out: bool = False,
         magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + the contributions' updates (``[(LoraFile, roles)]``) in float32; DoRA rescales
    the rows. ``weight`` is not changed unless it is already a float32 tensor."""
    merged = weight.float()
    rows = merged.T if fan_in_fan_out else merged  # a view: [out, in]
    for lora, roles in contributions:
        lora.add_update(rows, module, roles)
    if magnitude is not None:
        norm = torch.linalg.norm(rows, dim=1)
        rows.mul_((magnitude.float() / norm).view(-1, 1))
    return merged
