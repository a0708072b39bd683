"""Adapter algebra whose results stay adapters: combine, compress, extract, compare.

Every operation works on one module at a time, on the module's update
``ΔW = s·B·A`` ([out, in], float32), and ends in a rank-R factorization of the
result (``ΔW ≈ B'·A'`` with B' = U·S and A' = Vᵀ, alpha = r so the scale is 1:
PEFT's own convention for ``add_weighted_adapter``):

- a sum of low-rank updates is factored exactly from its factors (QR of the
  stacked Bs and As, then the SVD of a small core), never materialized;
- TIES and DARE use PEFT's own ``merge_utils`` on the dense updates, then SVD;
- a DoRA adapter's update includes its magnitude (needs the base weight);
- extraction factors the dense difference of two models' weights.

Results are written as PEFT adapters into a staging directory and registered
through the catalog, which inspects them against the base like any adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from zoo.catalog.home import split_variant, staging_dir, validate_name
from zoo.catalog.integrity import ORIGINAL, require_intact, variant_path
from zoo.catalog.registry import Registry
from zoo.catalog.store import BaseRef, claim_name, register_adapter
from zoo.core.records import AdapterEntry, BaseEntry
from zoo.core.tables import COMBINE_METHODS
from zoo.errors import BaseMismatch, NotSupported, ShapeMismatch
from zoo.merge import adapters_of_one_base
from zoo.merge.lora import LoraFile, fold
from zoo.merge.nf4 import dequantize_from, quantized_weights
from zoo.merge.tensors import TensorSource
from zoo.models.adapters import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS

Method = Literal["linear", "svd", "ties", "dare_linear"]
DENSE_SVD_LIMIT = 2048  # larger modules use a randomized SVD (torch.svd_lowrank)
NOT_EXTRACTED = ("embed_tokens", "lm_head", "wte", "wpe")


@dataclass
class AlgebraResult:
    entry: AdapterEntry
    rank: int
    energy_kept: float  # of the whole update, summed over modules (1.0: exact)
    modules: int
    logits: dict | None = None  # PEFT with the inputs against PEFT with the result
    worst_module: tuple[str, float] | None = None


# -- factoring -------------------------------------------------------------------------

@dataclass
class Factored:
    b: torch.Tensor  # [out, rank]
    a: torch.Tensor  # [rank, in]
    kept: float      # squared singular values kept
    total: float     # squared Frobenius norm of the update


def factor_product(pairs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> Factored:
    """The best rank-``rank`` factorization of ``sum(B_i @ A_i)`` from the factors alone."""
    b = torch.cat([p[0].float() for p in pairs], dim=1)  # [out, K]
    a = torch.cat([p[1].float() for p in pairs], dim=0)  # [K, in]
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _truncate(qb @ u, s, vh @ qa.T, rank)


def factor_dense(delta: torch.Tensor, rank: int) -> Factored:
    """The best (exact SVD) or near-best (randomized, for large modules) rank-``rank``
    factorization of a dense update."""
    delta = delta.float()
    small = min(delta.shape)
    if small <= DENSE_SVD_LIMIT or rank >= small // 2:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return _truncate(u, s, vh, rank)
    u, s, v = torch.svd_lowrank(delta, q=min(rank + 16, small), niter=6)
    found = _truncate(u, s, v.T, rank)
    found.total = float(delta.pow(2).sum())
    return found


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Factored:
    """B = U·S and A = Vᵀ at ``rank`` columns, or fewer where the update holds fewer (its
    singular values: at most the smaller side, and the ranks it was made of)."""
    keep = min(rank, s.numel())
    return Factored(u[:, :keep] * s[:keep], vh[:keep].clone(), float(s[:keep].pow(2).sum()),
                    float(s.pow(2).sum()))


# -- the inputs ------------------------------------------------------------------------

def _lora_entries(registry: Registry, names, weights=None) -> tuple[list[LoraFile], BaseEntry,
                                                                    str]:
    """Open LoRA adapters of one base (and variant) for algebra; refuse what cannot be."""
    entries, weights, base = adapters_of_one_base(registry.load(), names, weights)
    for e in entries:
        if e.kind == "bottleneck":
            raise NotSupported(f"{e.name!r} is a bottleneck adapter: it has no low-rank update")
        if e.lora and (e.lora.lora_bias or e.lora.bias != "none" or e.lora.modules_to_save):
            raise NotSupported(f"{e.name!r} trains biases or whole modules, which a LoRA "
                               "adapter cannot carry as a low-rank update")
    if len({e.base_variant for e in entries}) != 1:
        raise BaseMismatch("the adapters were trained on different variants of "
                           f"{base.name}: "
                           + ", ".join(sorted({e.base_variant for e in entries})))
    # named as asked (NAME, or NAME:vN for one version), so provenance names that version
    loras = [LoraFile.open(ref, require_intact(registry, e), w)
             for ref, e, w in zip(names, entries, weights, strict=True)]
    for lora in loras:
        if any(lora.is_embedding(m) for m in lora.modules()):
            raise NotSupported(f"{lora.name!r} adapts an embedding: algebra covers linear layers")
    return loras, base, entries[0].base_variant


def module_order(model_dir: Path) -> dict[str, int]:
    """Module paths in the model's own order (what PEFT walks), from its config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: i for i, (name, _m) in enumerate(model.named_modules())}


def _ordered(modules, order: dict[str, int]) -> list[str]:
    return sorted(modules, key=lambda m: (order.get(m, len(order)), m))


# -- writing and registering -----------------------------------------------------------

def _register(registry: Registry, name: str, base: BaseEntry, variant: str,
              factors: dict[str, Factored], asked: int, template: dict, source: dict,
              fan_in_fan_out: bool = False, new_version: bool = False,
              log: Callable[[str], None] = lambda _: None) -> AdapterEntry:
    """The factors as a PEFT LoRA at one rank: the ``asked`` one, or the largest any module
    holds when that is less (every module is then exact; a larger rank would only write
    zeros). Modules of a lower rank are padded with zeros."""
    from safetensors.torch import save_file

    rank = max(f.b.shape[1] for f in factors.values())
    if rank < asked:
        log(f"rank {asked} is more than these updates hold: written at rank {rank}, exactly")
    tensors = {}
    for module, f in factors.items():
        pad = rank - f.b.shape[1]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.cat(
            [f.a, f.a.new_zeros(pad, f.a.shape[1])]).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.cat(
            [f.b, f.b.new_zeros(f.b.shape[0], pad)], dim=1).contiguous()
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise NotSupported("the result has NaN or Inf values; nothing was registered")
    config = {k: v for k, v in template.items() if k not in (
        "rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "modules_to_save",
        "layers_to_transform", "layers_pattern", "exclude_modules", "target_modules")}
    config.update(peft_type="LORA", r=rank, lora_alpha=rank, use_rslora=False, use_dora=False,
                  rank_pattern={}, alpha_pattern={}, bias="none", init_lora_weights=True,
                  fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base.name,
                  target_modules=sorted({m.rsplit(".", 1)[-1] for m in factors}))
    config.setdefault("task_type", "CAUSAL_LM")
    with staging_dir(registry.home, name) as stage:
        save_file(tensors, str(stage / PEFT_WEIGHTS), metadata={"format": "pt"})
        (stage / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return register_adapter(registry, stage, name, BaseRef(base, variant), source,
                                new_version=new_version)


def _check_new_name(registry: Registry, name: str, new_version: bool = False) -> None:
    validate_name(name)
    if new_version and isinstance(registry.load().entries.get(name), AdapterEntry):
        return  # its next version
    claim_name(registry.load(), name)  # refused before any work


# -- combine: merge --to-adapter -------------------------------------------------------

@dataclass(frozen=True)
class CombineOptions:
    adapters: tuple[str, ...]
    name: str
    weights: tuple[float, ...] | None = None
    method: Method = "linear"
    rank: int | None = None  # default: exact for linear (sum of ranks), else the largest
    density: float = 0.5
    seed: int = 0
    logits: bool = True
    new_version: bool = False  # the next version of an existing adapter name


def combine(options: CombineOptions, registry: Registry | None = None,
            log: Callable[[str], None] = lambda _: None) -> AlgebraResult:
    """Several adapters of one base as one LoRA adapter, registered and servable."""
    from peft.utils.merge_utils import dare_linear, ties

    registry = registry or Registry()
    if options.method not in COMBINE_METHODS:
        raise NotSupported(f"unknown method {options.method!r}",
                           hint=f"Use {', '.join(COMBINE_METHODS)}.")
    if not 0.0 < options.density <= 1.0:
        raise NotSupported(f"density {options.density} is not in (0, 1]")
    _check_new_name(registry, options.name, options.new_version)
    loras, base, variant = _lora_entries(registry, options.adapters, options.weights)
    if len({lora.fan_in_fan_out for lora in loras}) != 1:
        raise NotSupported("the adapters disagree on fan_in_fan_out")
    ranks = [max(lora.rank(m) for m in lora.modules()) for lora in loras]
    rank = options.rank if options.rank is not None else (
        sum(ranks) if options.method == "linear" else max(ranks))
    _check_rank(rank)
    base_dir = variant_path(registry, base, ORIGINAL)
    modules = _ordered({m for lora in loras for m in lora.modules()}, module_order(base_dir))
    log(f"combining {len(loras)} adapters over {len(modules)} modules ({options.method}, "
        f"rank {rank})")
    factors: dict[str, Factored] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)  # DARE's drops: PEFT's own, from this seed
        for module in modules:
            present = [lora for lora in loras if lora.has(module)]
            if options.method in ("linear", "svd"):
                factors[module] = factor_product(
                    [lora.factors(module, weighted=True) for lora in present], rank)
                continue
            deltas = [lora.delta(module, weighted=False) for lora in present]
            weights = torch.tensor([lora.weight for lora in present])
            if options.method == "ties":
                combined = ties(deltas, weights, options.density, "total")
            else:
                combined = dare_linear(deltas, weights, options.density)
            factors[module] = factor_dense(combined, rank)
    source = {"type": "combine", "method": options.method, "rank": rank,
              "density": options.density if options.method in ("ties", "dare_linear") else None,
              "seed": options.seed if options.method == "dare_linear" else None,
              "adapters": [{"name": lora.name.partition(":")[0], "weight": lora.weight,
                            **_provenance(registry, lora.name)} for lora in loras]}
    entry = _register(registry, options.name, base, variant, factors, rank, loras[0].config,
                      source, loras[0].fan_in_fan_out, options.new_version, log)
    result = _result(entry, factors)
    if options.logits:
        result.logits = logit_change(registry, base, variant, loras, entry)
    return result


def _provenance(registry: Registry, ref: str) -> dict:
    """Which version of an adapter a result was derived from, and its content."""
    from zoo.catalog.versions import resolve

    record = resolve(registry.load(), ref)
    return {"version": record.version, "content_hash": record.content_hash}


def _check_rank(rank: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise NotSupported(f"rank {rank!r} must be a positive integer")


def _result(entry: AdapterEntry, factors: dict[str, Factored]) -> AlgebraResult:
    kept = sum(f.kept for f in factors.values())
    total = sum(f.total for f in factors.values())
    worst = min(factors.items(), key=lambda kv: kv[1].kept / kv[1].total if kv[1].total else 1)
    worst_share = worst[1].kept / worst[1].total if worst[1].total else 1.0
    return AlgebraResult(entry, entry.rank, kept / total if total else 1.0, len(factors),
                         worst_module=(worst[0], worst_share))


# -- compress --------------------------------------------------------------------------

def compress(name: str, rank: int, new_name: str | None = None, registry: Registry | None = None,
             logits: bool = True, log: Callable[[str], None] = lambda _: None,
             new_version: bool = False) -> AlgebraResult:
    """The best rank-``rank`` approximation of an adapter's update, registered. A DoRA
    adapter's magnitude is folded in first: the result is a plain, servable LoRA."""
    registry = registry or Registry()
    _check_rank(rank)
    new_name = new_name or f"{name.partition(':')[0]}-r{rank}"
    _check_new_name(registry, new_name, new_version)
    (lora,), base, variant = _lora_entries(registry, (name,))
    dora = bool(lora.config.get("use_dora"))
    source = TensorSource(variant_path(registry, base, variant)) if dora else None
    modules = _ordered(lora.modules(), module_order(variant_path(registry, base, ORIGINAL)))
    log(f"compressing {name} to rank {rank} over {len(modules)} modules"
        + (" (DoRA: folding the magnitude)" if dora else ""))
    factors = {}
    for module in modules:
        roles = lora.modules()[module]
        if dora:
            weight = _base_weight(source, module + ".weight")
            magnitude = lora.tensors.get(roles["magnitude"])
            merged = fold(weight, module, [lora], lora.fan_in_fan_out, magnitude)
            delta = merged - weight.float()
            factors[module] = factor_dense(delta.T if lora.fan_in_fan_out else delta, rank)
        else:
            factors[module] = factor_product([lora.factors(module, weighted=True)], rank)
    origin = _provenance(registry, name)
    source_record = {"type": "compress", "from": name.partition(":")[0], "rank": rank,
                     "dora_folded": dora, "from_version": origin["version"],
                     "from_hash": origin["content_hash"]}
    entry = _register(registry, new_name, base, variant, factors, rank, lora.config,
                      source_record, lora.fan_in_fan_out, new_version, log)
    result = _result(entry, factors)
    if logits:
        result.logits = logit_change(registry, base, variant, [lora], entry)
    return result


def _base_weight(source: TensorSource, name: str) -> torch.Tensor:
    if name in quantized_weights(source.names()):
        return dequantize_from(source, name)
    if name not in source:
        raise ShapeMismatch(name, (), (), "base (module not found)")
    return source.get(name)


# -- extract ---------------------------------------------------------------------------

def extract(model: str, base_ref: str, rank: int, name: str, registry: Registry | None = None,
            logits: bool = True, log: Callable[[str], None] = lambda _: None) -> AlgebraResult:
    """A LoRA adapter from a fine-tuned (or merged) model and its base: each linear weight's
    difference factored at ``rank``, one module at a time."""
    registry = registry or Registry()
    _check_rank(rank)
    _check_new_name(registry, name)
    catalog = registry.load()
    base_name, variant = split_variant(base_ref)
    if variant is not None:
        raise NotSupported("extract from the 16-bit base", hint=f"Use --base {base_name}.")
    base = catalog.base(base_name)
    base_dir = variant_path(registry, base, ORIGINAL)
    model_dir = Path(model) if Path(model).is_dir() else require_intact(
        registry, catalog.base(model))
    tuned, original = TensorSource(model_dir), TensorSource(base_dir)
    order = module_order(base_dir)
    modules = []
    for tensor in original.names():
        module = tensor.removesuffix(".weight")
        if not tensor.endswith(".weight") or len(original.shape(tensor)) != 2 \
                or module.rsplit(".", 1)[-1] in NOT_EXTRACTED:
            continue
        if tensor not in tuned:
            continue
        if tuned.shape(tensor) != original.shape(tensor):
            raise ShapeMismatch(tensor, original.shape(tensor), tuned.shape(tensor), "model")
        modules.append(module)
    log(f"extracting rank {rank} from {len(modules)} weights of {model}")
    factors = {}
    for module in _ordered(modules, order):
        delta = tuned.get(module + ".weight").float() - original.get(module + ".weight").float()
        if not delta.any():
            continue
        factors[module] = factor_dense(delta, rank)
    if not factors:
        raise NotSupported(f"{model} has the same linear weights as {base_name}: nothing to "
                           "extract")
    source = {"type": "extract", "model": str(model), "base": base_name, "rank": rank}
    entry = _register(registry, name, base, ORIGINAL, factors, rank, {}, source, log=log)
    result = _result(entry, factors)
    if logits:
        result.logits = model_logit_change(model_dir, base_dir, registry, entry)
    return result


# -- how much the outputs move ---------------------------------------------------------

def logit_change(registry: Registry, base: BaseEntry, variant: str, loras: list[LoraFile],
                 result: AdapterEntry) -> dict:
    """PEFT on the base with the input adapters (at their weights) against PEFT with the
    result, on the verification prompts: ``{max_abs_diff, max_abs_logit, tokens}``."""
    from zoo.merge.verify import reference_model, token_inputs

    source_dir = variant_path(registry, base, variant)
    adapters = [(None, lora.path, lora.weight) for lora in loras]
    model = reference_model(source_dir, adapters, variant == "nf4")
    batches = token_inputs(variant_path(registry, base, ORIGINAL), model.config.vocab_size)
    with torch.no_grad():
        want = [model(input_ids=ids).logits.float() for ids in batches]
        model.load_adapter(registry.resolve(result.path), adapter_name="result")
        model.base_model.set_adapter(["result"])
        got = [model(input_ids=ids).logits.float() for ids in batches]
    return _difference(want, got, batches)


def model_logit_change(model_dir: Path, base_dir: Path, registry: Registry,
                       result: AdapterEntry) -> dict:
    """The fine-tuned model's logits against the base + the extracted adapter's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zoo.merge.verify import token_inputs

    tuned = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = token_inputs(base_dir, tuned.config.vocab_size)
    with torch.no_grad():
        want = [tuned(input_ids=ids).logits.float() for ids in batches]
    del tuned
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        registry.resolve(result.path)).eval()
    with torch.no_grad():
        got = [model(input_ids=ids).logits.float() for ids in batches]
    return _difference(want, got, batches)


def _difference(want, got, batches) -> dict:
    return {"max_abs_diff": max(float((w - g).abs().max()) for w, g in zip(want, got,
                                                                           strict=True)),
            "max_abs_logit": max(float(w.abs().max()) for w in want),
            "tokens": sum(int(ids.shape[1]) for ids in batches)}


# -- similarity ------------------------------------------------------------------------

@dataclass
class Similarity:
    a: str
    b: str
    ranks: tuple[int, int]
    modules: dict[str, torch.Tensor]  # module -> phi[i-1, j-1]

    def mean(self) -> torch.Tensor:
        return torch.stack(list(self.modules.values())).mean(dim=0)


def similarity(a: str, b: str, registry: Registry | None = None) -> Similarity:
    """The LoRA paper's normalized subspace similarity of two adapters' updates, per
    module: phi(i, j) = ||V_a[:i] · V_b[:j]ᵀ||²_F / min(i, j), with V the right singular
    vectors (input directions) of each update, strongest first."""
    registry = registry or Registry()
    loras, base, _variant = _lora_entries(registry, (a, b))
    first, second = loras
    shared = _ordered(set(first.modules()) & set(second.modules()),
                      module_order(variant_path(registry, base, ORIGINAL)))
    if not shared:
        raise NotSupported(f"{a!r} and {b!r} adapt no module in common")
    ra = min(first.rank(m) for m in shared)
    rb = min(second.rank(m) for m in shared)
    found = {}
    for module in shared:
        va = _directions(first, module, ra)
        vb = _directions(second, module, rb)
        overlap = (va @ vb.T).pow(2)  # [ra, rb]
        cumulative = overlap.cumsum(0).cumsum(1)
        sizes = torch.minimum(torch.arange(1, ra + 1).view(-1, 1), torch.arange(1, rb + 1))
        found[module] = cumulative / sizes
    return Similarity(a, b, (ra, rb), found)


def _directions(lora: LoraFile, module: str, rank: int) -> torch.Tensor:
    """The update's top ``rank`` right singular vectors: A' of its exact factorization."""
    return factor_product([lora.factors(module, weighted=True)], rank).a


def similarity_rows(result: Similarity) -> list[dict]:
    ra, rb = result.ranks
    k = min(ra, rb)
    rows = []
    for module, phi in result.modules.items():
        row = {"module": module, "phi(1,1)": float(phi[0, 0])}
        if k >= 2:
            row[f"phi({k // 2},{k // 2})"] = float(phi[k // 2 - 1, k // 2 - 1])
        row[f"phi({ra},{rb})"] = float(phi[ra - 1, rb - 1])
        rows.append(row)
    return rows


def similarity_plot(result: Similarity, path: Path) -> Path:
    """A heatmap of phi(i, j) averaged over the modules, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = result.mean().numpy()
    figure, axes = plt.subplots(figsize=(4.5, 4))
    image = axes.imshow(mean, vmin=0, vmax=1, cmap="viridis", origin="upper",
                        extent=(0.5, mean.shape[1] + 0.5, mean.shape[0] + 0.5, 0.5))
    axes.set_xlabel(f"j (top directions of {result.b})")
    axes.set_ylabel(f"i (top directions of {result.a})")
    axes.set_title(f"subspace similarity, mean of {len(result.modules)} modules", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    return path

