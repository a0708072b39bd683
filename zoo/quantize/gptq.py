"""Error-compensating int8 weight rounding (GPTQ, Frantar et al., 2022), per output row.

Rounding each weight to its nearest int8 step ignores how the layer is used. GPTQ
rounds the input columns one after another and moves each column's rounding error
onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs (``H = X^T X`` over calibration activations): the product ``W x`` on those
inputs stays closer to the original. The scale of each row stays absmax / ``levels``
(127, or 63 where the CPU's int8 kernel needs 7-bit weights: ``zoo.quantize.w8a8``), as
vLLM's kernel expects; only which integer each weight gets changes.
"""

from __future__ import annotations

import torch

BLOCK = 128
DAMPING = 0.01  # of the mean diagonal, added to H: keeps it invertible on few tokens


def hessian_hooks(model, names: set[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Forward hooks that sum ``x^T x`` of each named linear's inputs (and count rows)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    modules = dict(model.named_modules())

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1])
                sums[f"{name}#rows"] = torch.zeros(())
            sums[name] += x.T @ x
            sums[f"{name}#rows"] += x.shape[0]
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(hook_for(name)))
    return sums, hooks


def hessians(model, names: set[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The summed ``x^T x`` of each named linear's inputs over ``model`` run on ``batches``."""
    sums, hooks = hessian_hooks(model, names)
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return sums


def quantize_rows(weight: torch.Tensor, hessian: torch.Tensor, damping: float = DAMPING,
                  levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """``(integers, scale)``: the integers in [-levels, levels] GPTQ picks for ``weight``
    [out, in] and the per-row scale (absmax / levels), so that ``integers * scale``
    approximates it (``damping``: the share of H's mean diagonal added to its diagonal)."""
    w = weight.detach().float().clone()
    scale = (w.abs().amax(dim=1, keepdim=True) / levels).clamp(min=1e-8)
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    ints = torch.zeros_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv = inverse[start:end, start:end]
        for j in range(end - start):
            column = block[:, j]
            q = torch.round(column / scale[:, 0]).clamp(-levels, levels)
            ints[:, start + j] = q
            error = (column - q * scale[:, 0]) / inv[j, j]
            block[:, j:] -= error[:, None] * inv[j, j:][None, :]
            errors[:, j] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return ints, scale
