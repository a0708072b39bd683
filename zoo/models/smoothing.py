"""LoRA adapters on a SmoothQuant-ed base: the same function, rescaled.

Smoothing (``zoo.quantize.smooth``) divides what some layers read by a per-channel
``s`` and multiplies their weights' input columns by it, so the base computes
the same thing. A LoRA adapter trained on the unsmoothed base reads and writes
the same tensors and needs the same treatment, or it computes something else:

* q/k/v read the attention norm's output, now ``x / s_attn``: ``A' = A diag(s_attn)``;
* gate/up read the MLP norm's output, ``x / s_mlp``: ``A' = A diag(s_mlp)``;
* v writes ``v / s_v``: ``B' = diag(1 / s_v) B``; o reads that: ``A' = A diag(s_o)``
  (``s_v`` repeated for the query heads sharing each key/value head);
* up writes ``up / s_down``: ``B' = diag(1 / s_down) B``; down reads it:
  ``A' = A diag(s_down)``.

With these the adapted adapter on the smoothed base gives the original adapter's
outputs on the original base (tested against PEFT on both). The scales travel with
the quantized variant as ``zoo_smoothing.scales``.
"""

from __future__ import annotations

from pathlib import Path

from zoo.models.adapters import PEFT_PREFIX, PEFT_WEIGHTS

# safetensors inside, but not named *.safetensors: vLLM loads every such file of a
# checkpoint as model weights
SCALES_FILE = "zoo_smoothing.scales"


def save_scales(out: Path, scales: dict, config) -> None:
    """Write the smoothing scales beside a checkpoint, with the head layout o_proj needs."""
    import torch
    from safetensors.torch import save_file

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    save_file({k: v.to(torch.float32).contiguous() for k, v in scales.items()},
              str(out / SCALES_FILE),
              metadata={"format": "zoo-smoothing", "heads": str(heads),
                        "kv_heads": str(kv_heads)})


def load_scales(model_dir: Path) -> dict | None:
    """The scales saved with a smoothed checkpoint, or None for one that was not smoothed."""
    from safetensors import safe_open

    path = Path(model_dir) / SCALES_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt", backend="pread") as f:  # pread: see adapt_lora
        meta = f.metadata()
        scales = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    scales["_kv_heads"] = int(meta["kv_heads"])
    scales["_group"] = int(meta["heads"]) // int(meta["kv_heads"])
    return scales


def _layer_and_leaf(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    if "layers" not in parts:
        return None
    i = parts.index("layers")
    return int(parts[i + 1]), parts[-1]


def adapt_lora(adapter_dir: Path, scales: dict, out: Path) -> Path:
    """Write ``adapter_dir``'s LoRA, rescaled for the smoothed base, into ``out``."""
    import shutil

    from safetensors.torch import load_file, save_file

    # pread: safetensors 0.8.0's mmap backend keeps two small Python objects per tensor it
    # reads, for good (~7 KB for a rank-8 q/v LoRA of SmolLM2), and the API server does
    # this for every new adapter of its life (bench/memory.py)
    tensors = load_file(str(adapter_dir / PEFT_WEIGHTS), backend="pread")
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapt_tensors(tensors, scales), str(out / PEFT_WEIGHTS))
    for other in adapter_dir.iterdir():  # the config and anything else, as they are
        if other.name != PEFT_WEIGHTS and other.is_file():
            shutil.copyfile(other, out / other.name)
    return out


def adapt_tensors(tensors: dict, scales: dict, plans: dict | None = None) -> dict:
    """A LoRA's tensors (PEFT's names) rescaled for the smoothed base, each in its own
    dtype; tensors of other kinds as they are. ``plans`` keeps what each name needs (kept
    by a caller that adapts many LoRAs for the same ``scales``: the names repeat), up to
    PLANS_KEPT names (a model's layers have a few hundred; past it, it starts afresh).
    float32 tensors are rescaled in two calls (``torch._foreach_mul``/``_div``: each
    pair's own product, as ``value * s``), others one by one through float32 and back:
    the vLLM worker adapts every adapter it loads, on the core that runs every step."""
    import torch

    plans = {} if plans is None else plans
    if len(plans) > PLANS_KEPT:
        plans.clear()
    adapted = {}
    bulk = {True: ([], [], []), False: ([], [], [])}  # multiply?: (keys, values, scales)
    for key, value in tensors.items():
        plan = plans.get(key, _UNPLANNED)
        if plan is _UNPLANNED:
            plan = plans[key] = _rescaling(key, scales)
        if plan is None:
            adapted[key] = value  # a tensor the smoothed base does not rescale
            continue
        multiply, s = plan
        adapted[key] = None  # the order of ``tensors``, filled in below
        if value.dtype == torch.float32:
            for column, item in zip(bulk[multiply], (key, value, s), strict=True):
                column.append(item)
        else:
            adapted[key] = _rescaled(value, multiply, s)
    for multiply, (keys, values, factors) in bulk.items():
        if keys:
            results = (torch._foreach_mul if multiply else torch._foreach_div)(values, factors)
            adapted.update(zip(keys, results, strict=True))
    return adapted


def _rescaled(value, multiply: bool, s):
    """One tensor rescaled in float32, back in its own dtype."""
    scaled = value.float() * s if multiply else value.float() / s
    return scaled.to(value.dtype).contiguous()


_UNPLANNED = object()
PLANS_KEPT = 8192


def _rescaling(key: str, scales: dict) -> tuple[bool, object] | None:
    """How a LoRA tensor of this name is rescaled: A's columns multiplied by the scales
    of its input (True, a row of them), B's rows divided by those of its output (False, a
    column), or None for a tensor the smoothed base does not rescale."""
    inner = key.removeprefix(PEFT_PREFIX)
    role = "A" if ".lora_A." in inner else "B" if ".lora_B." in inner else None
    where = _layer_and_leaf(inner.split(".lora_")[0]) if role else None
    if where is None:
        return None
    i, leaf = where
    column = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in",
              "o_proj": "v_out"}.get(leaf)
    row = {"v_proj": "v_out", "up_proj": "down_in"}.get(leaf)
    if role == "A" and column:
        s = scales[f"layers.{i}.{column}"]
        if leaf == "o_proj":  # o reads every query head; s_v is per key/value head
            kv_heads, group = scales["_kv_heads"], scales["_group"]
            s = s.view(kv_heads, 1, -1).expand(kv_heads, group, -1).flatten()
        return True, s[None, :]
    if role == "B" and row:
        return False, scales[f"layers.{i}.{row}"][:, None]
    return None
