"""Checks that a merge wrote what PEFT computes, module by module or end to end.

**Module check** (the default, streamed): every merged weight is checked
while it is written, against PEFT's own LoRA layer on that module (built by
``inject_adapter_in_model`` from each adapter's config, so PEFT decides the
rank, alpha, rsLoRA and DoRA of the module, and the adapter's A, B and
magnitude read by their PEFT names with safetensors' own reader). Both sides
run in float64 on random, outlier-heavy and, where the width fits, real
activations (token embeddings of a few prompts), one block of rows at a time
as the merge makes them, so memory is a few blocks whatever the model's size.
Two bounds, each derived from rounding, not tuned:

- the merged weight in float32 must give PEFT's output to within the
  float32 rounding of W + sum(w·s·B·A): ``(k + 2) · u32 · |x| · M`` per output
  (M = |W| + sum |w·s|·|B|·|A|; k adapters), so a wrong scale, transpose or
  module fails in any output dtype;
- the weight as written must give it to within that plus the output dtype's
  rounding of each weight: ``u_dtype · |x| · |W'|``, so no valid adapter is
  refused in bf16 or fp16.

**Full check** (``--verify full``, on request): the merged model's logits
against the base + adapters run by PEFT, both whole in memory; the tolerance
is four times what rounding PEFT's own ``merge_and_unload`` to the output
dtype moves them, measured on the same tokens.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.errors import VerificationFailed
from zoo.merge.stream import TIED_EMBEDDINGS
from zoo.models.adapters import PEFT_PREFIX, PEFT_WEIGHTS
from zoo.models.nf4 import load_nf4

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a fox")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
RANDOM_ROWS = 16


class ModuleCheck:
    """Checks each merged weight as the merge makes it; keeps the worst numbers."""

    def __init__(self, loras, dtype: str, real_activations: dict[int, torch.Tensor] | None = None):
        self.loras = loras  # zoo.merge.lora.LoraFile, with .path
        self.unit = UNIT_ROUNDOFF[dtype]
        self.real = real_activations or {}
        self.modules = 0
        self.worst = {"float32": 0.0, "written": 0.0, "max_abs_diff": 0.0}
        self.rows = 0

    def module(self, module: str, weight: torch.Tensor) -> _ModuleCheck:
        """Start checking ``module``, whose base weight, rows first, is ``weight`` ([out, in];
        [num, dim] for an embedding): build PEFT's layer and read the adapters' tensors."""
        contributions = [(i, lora) for i, lora in enumerate(self.loras) if lora.has(module)]
        embedding = contributions[0][1].is_embedding(module)
        transposed = not embedding and contributions[0][1].fan_in_fan_out
        x = None if embedding else self._activations(weight.shape[1])
        layer = _peft_layer(module, weight[:1], contributions, embedding, transposed)
        stored = _adapter_tensors(module, contributions, embedding)
        self.modules += 1
        return _ModuleCheck(self, module, contributions, layer, stored, x, embedding, transposed)

    def record(self, vs_float32: float, vs_rounding: float, max_abs_diff: float,
               rows: int) -> None:
        self.worst["float32"] = max(self.worst["float32"], vs_float32)
        self.worst["written"] = max(self.worst["written"], vs_rounding)
        self.worst["max_abs_diff"] = max(self.worst["max_abs_diff"], max_abs_diff)
        self.rows += rows

    def _activations(self, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        gaussian = torch.randn(RANDOM_ROWS, width, generator=generator, dtype=torch.float64)
        outliers = torch.randn(4, width, generator=generator, dtype=torch.float64)
        channels = torch.randint(0, width, (max(1, width // 64),), generator=generator)
        outliers[:, channels] *= 30.0  # the few huge channels of real LLM activations
        parts = [gaussian, outliers]
        if width in self.real:
            parts.append(self.real[width].double())
        return torch.cat(parts)

    def report(self) -> dict:
        return {"mode": "modules", "modules": self.modules, "rows": self.rows,
                "worst_vs_float32_bound": self.worst["float32"],
                "worst_vs_rounding_bound": self.worst["written"],
                "max_abs_diff": self.worst["max_abs_diff"],
                "real_activations": sorted(self.real)}


@dataclass
class _ModuleCheck:
    owner: ModuleCheck
    module: str
    contributions: list
    layer: object
    stored: dict
    x: torch.Tensor | None
    embedding: bool
    transposed: bool

    @torch.no_grad()
    def check(self, rows: slice, base: torch.Tensor, merged: torch.Tensor,
              written: torch.Tensor) -> None:
        """These rows (first dimension: outputs, or the table's entries) of the base, the
        merged weight in float32 and the weight as written."""
        layer, unit = self.layer, self.owner.unit
        _load_rows(layer, self.stored, base, rows, self.embedding, self.transposed)
        if self.embedding:  # the rows are the table's: look up every one of them
            want = layer(torch.arange(base.shape[0]))
            got32, got = merged.double(), written.double()
            exact_bound, written_bound = _bound_embedding(layer, base, self.contributions,
                                                          unit, merged)
        else:
            want = layer(self.x)
            got32, got = self.x @ merged.double().T, self.x @ written.double().T
            exact_bound, written_bound = _bound_linear(layer, self.x, base, self.contributions,
                                                       merged, unit)
        r32 = float(((got32 - want).abs() / exact_bound).max())
        errors = (got - want).abs()
        rw = float((errors / written_bound).max())
        self.owner.record(r32, rw, float(errors.max()), int(want.shape[0]))
        if not (r32 <= 1.0 and rw <= 1.0):
            which = "the merged float32 weight" if not r32 <= 1.0 else "the written weight"
            raise VerificationFailed(
                f"{self.module}: {which} differs from PEFT's LoRA layer by {max(r32, rw):.3g}x "
                f"the rounding bound (rows {rows.start}-{rows.stop})")


def _bound_linear(layer, x, w, contributions, merged, unit):
    """Per output: what float32 rounding of W + deltas, and then the output dtype's rounding
    of each weight, can move ``x @ W'.T``."""
    magnitude = w.double().abs_()
    for i, _lora in contributions:
        name = f"a{i}"
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        magnitude.addmm_(b.abs(), a.abs(), alpha=abs(layer.scaling[name]))
    factor = len(contributions) + 2
    dora = getattr(layer, "lora_magnitude_vector", None)
    if dora is not None and len(dora):  # rows rescaled to m / ||W + s·B·A||
        scale = (merged.double().norm(dim=1) / (w.double() + _delta(layer, contributions))
                 .norm(dim=1)).abs()
        magnitude.mul_(scale.view(-1, 1))
        factor += 4 + 2 * math.sqrt(w.shape[1])
    ax = x.abs()
    exact = (ax @ magnitude.T).mul_(factor * 2.0**-24).add_(1e-300)
    del magnitude
    return exact, (ax @ merged.double().abs_().T).mul_(unit).add_(exact)


def _bound_embedding(layer, w, contributions, unit, merged):
    magnitude = w.double().abs()
    for i, _lora in contributions:
        name = f"a{i}"
        a = layer.lora_embedding_A[name].double()  # [r, rows]
        b = layer.lora_embedding_B[name].double()  # [dim, r]
        magnitude = magnitude + abs(layer.scaling[name]) * (b.abs() @ a.abs()).T
    exact = (len(contributions) + 2) * 2.0**-24 * magnitude + 1e-300
    return exact, exact + unit * merged.double().abs()


def _delta(layer, contributions) -> torch.Tensor:
    total = 0
    for i, _lora in contributions:
        name = f"a{i}"
        total = total + layer.scaling[name] * (layer.lora_B[name].weight.double()
                                               @ layer.lora_A[name].weight.double())
    return total


def _peft_layer(module: str, w: torch.Tensor, contributions, embedding: bool,
                transposed: bool):
    """PEFT's LoRA layer for ``module``, built by PEFT from each adapter's config around a
    block of the base's rows, every contributing adapter active at its user weight, in
    float64. ``_load_rows`` then points it at each block of rows in turn."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    if embedding:
        base = nn.Embedding(w.shape[0], w.shape[1], device="meta")
    elif transposed:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(w.shape[0], w.shape[1])
    else:
        base = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    base.weight = nn.Parameter(w.T.double() if transposed else w.double(), requires_grad=False)
    root = nn.Module()
    parent = root
    parts = module.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], base)
    names = []
    for i, lora in contributions:
        config = LoraConfig.from_pretrained(str(lora.path))  # PEFT's reading of the config
        config.target_modules = {module}
        config.exclude_modules = None
        config.layers_to_transform = None
        config.modules_to_save = None
        config.inference_mode = True
        with warnings.catch_warnings():  # patterns for other modules do not match this one
            warnings.simplefilter("ignore")
            inject_adapter_in_model(config, root, adapter_name=f"a{i}")
        names.append(f"a{i}")
    layer = root.get_submodule(module).double()
    for (_i, lora), name in zip(contributions, names, strict=True):
        layer.scaling[name] *= lora.weight
    layer.set_adapter(names)
    return layer.eval().requires_grad_(False)


def _adapter_tensors(module: str, contributions, embedding: bool) -> dict[str, dict]:
    """Each adapter's tensors for ``module``, read by their PEFT names with safetensors' own
    reader (not zoo's), in float64."""
    from safetensors import safe_open

    roles = ("lora_embedding_A", "lora_embedding_B") if embedding else (
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    found = {}
    for i, lora in contributions:
        with safe_open(str(lora.path / PEFT_WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
            found[f"a{i}"] = {role: f.get_tensor(f"{PEFT_PREFIX}{module}.{role}").double()
                              for role in roles if f"{PEFT_PREFIX}{module}.{role}" in keys}
    return found


def _load_rows(layer, stored: dict, w: torch.Tensor, rows: slice, embedding: bool,
               transposed: bool) -> None:
    """Point the layer at these rows of the base weight and of the adapters' tensors."""
    layer.base_layer.weight.data = w.T.double() if transposed else w.double()
    if transposed:  # transformers' Conv1D shapes its output by the width it was built with
        layer.base_layer.nf = w.shape[0]
    for name, tensors in stored.items():
        if embedding:
            layer.lora_embedding_A[name].data = tensors["lora_embedding_A"][:, rows]
            layer.lora_embedding_B[name].data = tensors["lora_embedding_B"]
            continue
        layer.lora_A[name].weight.data = tensors["lora_A.weight"]
        layer.lora_B[name].weight.data = tensors["lora_B.weight"][rows]
        if "lora_magnitude_vector" in tensors:
            layer.lora_magnitude_vector[name].weight.data = tensors["lora_magnitude_vector"][rows]


def real_activations(source, original_dir: Path) -> dict[int, torch.Tensor]:
    """``{width: rows}``: the prompts' token embeddings, RMS-normalized as a layer's
    input norm would, for modules as wide as the embedding. Read row by row."""
    from zoo.catalog.loading import load_tokenizer

    name = next((n for n in TIED_EMBEDDINGS if n in source), None)
    if name is None:
        return {}
    try:
        tokenizer = load_tokenizer(original_dir)
    except (OSError, ValueError, TypeError):
        return {}
    ids = sorted({int(t) for p in PROMPTS for t in tokenizer(p)["input_ids"]})
    vocab = source.shape(name)[0]
    found = [source.rows(name, i, i + 1).float() for i in ids if i < vocab]
    if not found:
        return {}
    rows = torch.cat(found)
    rows = rows / rows.pow(2).mean(dim=1, keepdim=True).add(1e-6).sqrt()
    return {rows.shape[1]: rows}


# -- end to end, on request ------------------------------------------------------------

def reference_model(source_dir: Path, adapters, nf4: bool):
    """The base (NF4 computed in float32, or 16-bit upcast) with the adapters active."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if nf4:
        model = load_nf4(source_dir)
        # bitsandbytes refuses .to(dtype) on a 4-bit model: upcast the 16-bit parts
        # (embeddings, norms, head) by hand and compute the 4-bit layers in float32.
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dtype in (torch.bfloat16, torch.float16):
                tensor.data = tensor.data.float()
        for module in model.modules():
            if hasattr(module, "compute_dtype"):
                module.compute_dtype = torch.float32
    else:
        model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    peft = None
    for name, (_entry, path, _w) in zip(names, adapters, strict=True):
        if peft is None:
            peft = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            peft.load_adapter(path, adapter_name=name)
    if peft is None:
        return model.eval()
    weights = dict(zip(names, (w for _e, _p, w in adapters), strict=True))
    for module in peft.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, w in weights.items():
                if name in scaling:
                    scaling[name] *= w
    peft.base_model.set_adapter(names)
    return peft.eval()


def token_inputs(original_dir: Path, vocab_size: int):
    """Token ids to compare on: the prompts through the base's tokenizer, and a fixed
    random sequence (all that is left for a model saved without a tokenizer)."""
    from zoo.catalog.loading import load_tokenizer

    batches = []
    try:
        tokenizer = load_tokenizer(original_dir)
        batches = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    except (OSError, ValueError, TypeError):
        pass
    batches = [ids for ids in batches if ids.shape[1] >= 2]
    generator = torch.Generator().manual_seed(0)
    batches.append(torch.randint(0, vocab_size, (1, 24), generator=generator))
    return batches


def verify_full(merged_dir: Path, source_dir: Path, original_dir: Path, plan) -> dict:
    """Logits of the merged model against PEFT's unmerged base + adapters."""
    from transformers import AutoModelForCausalLM

    reference = reference_model(source_dir, plan.adapters, plan.source_variant == "nf4")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    batches = token_inputs(original_dir, merged.config.vocab_size)
    worst, scale, tokens, wanted = 0.0, 0.0, 0, []
    with torch.no_grad():
        for ids in batches:
            want = reference(input_ids=ids).logits.float()
            got = merged(input_ids=ids).logits.float()
            worst = max(worst, float((want - got).abs().max()))
            scale = max(scale, float(want.abs().max()))
            tokens += ids.shape[1]
            wanted.append(want)
        del merged
        noise = _rounding_noise(reference, batches, wanted, plan, scale)
    tolerance = 4 * noise + 1e-4 * max(scale, 1.0)
    result = {"mode": "full", "max_abs_diff": worst, "tolerance": tolerance,
              "rounding_noise": noise, "max_abs_logit": scale, "tokens": tokens}
    if not worst <= tolerance:
        raise VerificationFailed(
            f"merged logits differ from base + adapters by {worst:.4g} (tolerance "
            f"{tolerance:.4g}: 4x what rounding PEFT's own merge to {plan.dtype} moves them)")
    return result


def _rounding_noise(reference, batches, want, plan, scale: float) -> float:
    """How far a correct merge written in the output dtype moves the logits: PEFT's own
    ``merge_and_unload`` of the reference, in float32, rounded to the dtype, run on the same
    tokens. (An NF4 reference computes through bf16 in bitsandbytes: its noise is bf16's.)"""
    if plan.source_variant == "nf4":
        return 2.5e-3 * max(scale, 1.0)
    dtype = getattr(torch, plan.dtype)
    if dtype == torch.float32:
        return 0.0
    model = reference.merge_and_unload() if hasattr(reference, "merge_and_unload") else reference
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype).float()
    return max(float((model(input_ids=ids).logits.float() - w).abs().max())
               for ids, w in zip(batches, want, strict=True))
