"""Calibration for int8 W8A8: SmoothQuant's migration of activation outliers, measured
per layer, and the layers that stay in 16 bits.

vLLM quantizes each token's activations to int8 with one scale per token, so a few
input channels with large values (the outliers that small LLMs have after their
norms) squeeze every other channel into a handful of int8 steps. SmoothQuant
(Xiao et al., 2022) divides those channels by ``s_j = max|X_j|^a / max|W_j|^(1-a)``
and multiplies the weights' input columns by the same ``s_j``: the product is
unchanged, the activations are flatter, and the weights (quantized per output row)
absorb the range. The division is folded into what produces the activations: the
RMSNorm weights before q/k/v and gate/up, v_proj's rows before o_proj, up_proj's
rows before down_proj.

Calibration runs the 16-bit model on text that ships with zoo (or the user's), so
the scales describe real activations. Afterwards each projection's int8 error is
measured on the same activations, and the worst (beyond ``tolerance``) stay in 16
bits: vLLM quantizes fused projections together, so q/k/v and gate/up are kept
or quantized as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Projections vLLM fuses into one layer: they are quantized, or kept in 16 bits, together.
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
         "up_proj": "gate_up"}


@dataclass(frozen=True)
class Calibration:
    """What the calibration pass saw, per linear layer (by module name)."""

    input_absmax: dict[str, torch.Tensor]  # [in_features]: max |x| per input channel
    inputs: dict[str, torch.Tensor]  # a sample of input rows, for measuring errors
    tokens: int


def calibrate(model, batches: list[torch.Tensor], sample_rows: int = 256) -> Calibration:
    """Run ``model`` on token id batches, recording each linear layer's inputs."""
    absmax: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def record(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            seen = x.abs().amax(dim=0)
            absmax[name] = seen if name not in absmax else torch.maximum(absmax[name], seen)
            kept = samples.setdefault(name, [])
            if sum(len(s) for s in kept) < sample_rows:
                kept.append(x[:: max(1, len(x) // 64)][:sample_rows])
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            hooks.append(module.register_forward_pre_hook(record(name)))
    tokens = 0
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
                tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
    return Calibration(absmax, {k: torch.cat(v)[:sample_rows] for k, v in samples.items()},
                       tokens)


def _smooth(previous_scale_into, linears: list[torch.nn.Linear], act_absmax: torch.Tensor,
            alpha: float) -> torch.Tensor:
    """Scale the linears' input columns up by s and return s (the caller divides the
    producer of their input by it)."""
    weight_absmax = torch.stack([m.weight.detach().float().abs().amax(dim=0) for m in linears])
    weight_absmax = weight_absmax.amax(dim=0)
    s = (act_absmax.clamp(min=1e-5) ** alpha) / (weight_absmax.clamp(min=1e-5) ** (1 - alpha))
    s = s.clamp(min=1e-5)
    previous_scale_into(s)
    for m in linears:
        m.weight.data = (m.weight.data.float() * s[None, :]).to(m.weight.dtype)
    return s


def smooth_llama(model, calibration: Calibration, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """SmoothQuant on a Llama-style model, in place: norms -> q/k/v and gate/up,
    v_proj -> o_proj, up_proj -> down_proj. Returns the scales by name
    (``layers.{i}.{attn_in,mlp_in,v_out,down_in}``): adapters trained on the unsmoothed
    model need them to stay exact on this one (``zoo.models.smoothing``)."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scales: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp

        def into_norm(norm):
            def divide(s):
                norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
            return divide

        scales[f"layers.{i}.attn_in"] = _smooth(
            into_norm(layer.input_layernorm), [attn.q_proj, attn.k_proj, attn.v_proj],
            calibration.input_absmax[f"{prefix}.self_attn.q_proj"], alpha)
        scales[f"layers.{i}.mlp_in"] = _smooth(
            into_norm(layer.post_attention_layernorm), [mlp.gate_proj, mlp.up_proj],
            calibration.input_absmax[f"{prefix}.mlp.gate_proj"], alpha)

        # o_proj's input channel (head h, dim d) is v_proj's output row (h // group, d):
        # one scale per v row, shared by the query heads that read it
        group = heads // kv_heads
        act = calibration.input_absmax[f"{prefix}.self_attn.o_proj"].view(kv_heads, group,
                                                                          head_dim)
        w = attn.o_proj.weight.detach().float().abs().amax(dim=0).view(kv_heads, group, head_dim)
        s_v = ((act.amax(dim=1).clamp(min=1e-5) ** alpha)
               / (w.amax(dim=1).clamp(min=1e-5) ** (1 - alpha))).clamp(min=1e-5).flatten()
        attn.v_proj.weight.data = (attn.v_proj.weight.data.float() / s_v[:, None]).to(
            attn.v_proj.weight.dtype)
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.data = (attn.v_proj.bias.data.float() / s_v).to(attn.v_proj.bias.dtype)
        scales[f"layers.{i}.v_out"] = s_v
        s_o = s_v.view(kv_heads, 1, head_dim).expand(kv_heads, group, head_dim).flatten()
        attn.o_proj.weight.data = (attn.o_proj.weight.data.float() * s_o[None, :]).to(
            attn.o_proj.weight.dtype)

        def into_up(up):
            def divide(s):
                up.weight.data = (up.weight.data.float() / s[:, None]).to(up.weight.dtype)
            return divide

        scales[f"layers.{i}.down_in"] = _smooth(
            into_up(mlp.up_proj), [mlp.down_proj],
            calibration.input_absmax[f"{prefix}.mlp.down_proj"], alpha)
    return scales


def fake_w8a8(x: torch.Tensor, weight: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """What vLLM's int8 kernel computes: integer weights in [-levels, levels] per output
    row, int8 activations per token, both symmetric; in float, for measuring."""
    w_scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / levels
    w_q = torch.round(weight / w_scale).clamp(-levels, levels) * w_scale
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    x_q = torch.round(x / x_scale).clamp(-127, 127) * x_scale
    return x_q @ w_q.T


def int8_errors(model, calibration: Calibration, levels: int = 127) -> dict[str, float]:
    """Per vLLM layer (q/k/v and gate/up fused), the relative error int8 (weights in
    [-levels, levels]) adds to its output on the calibration inputs: ||y_int8 - y|| / ||y||."""
    errors: dict[str, list[float]] = {}
    modules = dict(model.named_modules())
    for name, x in calibration.inputs.items():
        weight = modules[name].weight.detach().float()
        exact = x @ weight.T
        err = float((fake_w8a8(x, weight, levels) - exact).norm() / exact.norm().clamp(min=1e-12))
        errors.setdefault(vllm_layer(name), []).append(err)
    return {layer: max(values) for layer, values in errors.items()}


def vllm_layer(module: str) -> str:
    """``model.layers.3.self_attn.k_proj`` -> ``model.layers.3.self_attn.qkv``: the layer
    vLLM builds (and quantizes) for it."""
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{FUSED[leaf]}" if leaf in FUSED else module


def members(layer: str) -> list[str]:
    """The checkpoint's module names behind one of vLLM's layers."""
    parent, _, leaf = layer.rpartition(".")
    parts = [m for m, fused in FUSED.items() if fused == leaf]
    return [f"{parent}.{p}" for p in parts] if parts else [layer]


def layers_to_keep(errors: dict[str, float], tolerance: float, limit: int) -> list[str]:
    """The worst layers above ``tolerance``, at most ``limit`` of them, worst first."""
    worst = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)
    return [layer for layer, err in worst if err > tolerance][:limit]
