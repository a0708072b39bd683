"""Rounding-error bounds for the suite's numeric comparisons, derived from the arithmetic
each one checks rather than guessed.

The model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2 and
§3.1): every operation's result is the exact one rounded once, with relative error at most
the unit roundoff ``u`` of its type; a dot product of length ``n`` accumulated in a type of
unit roundoff ``u`` is off by at most ``gamma(n) * sum |x_i y_i|``, ``gamma(n) = n u / (1 - n u)``.
Matrix products of bf16 or fp16 inputs on the CPU accumulate in float32 (oneDNN and
PyTorch's kernels do) and round the result to the input type once. References are
computed in float64, whose own error is negligible beside these bounds.
"""

from __future__ import annotations

import torch

F32 = torch.float32


def unit(dtype: torch.dtype) -> float:
    """The unit roundoff of a floating dtype (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


def units_off(out: torch.Tensor, exact: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """``out - exact`` in units in the last place of ``exact`` in ``out``'s dtype, signed
    toward zero negative (a truncating conversion's are all <= 0, a rounding one's lean
    neither way); numbers under ``floor`` are held to that one's unit."""
    _, exponent = torch.frexp(exact.abs().clamp(min=floor) if floor else exact.abs())
    ulp = torch.finfo(out.dtype).eps * torch.pow(2.0, exponent.double() - 1)
    return (out.double() - exact) * exact.sign() / ulp


def gamma(n: int, dtype: torch.dtype = F32) -> float:
    nu = n * unit(dtype)
    assert nu < 1, "bound meaningless: reduction too long for this dtype"
    return nu / (1 - nu)


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """The type a CPU matrix product of ``dtype`` inputs accumulates in."""
    return F32 if dtype in (torch.bfloat16, torch.float16) else dtype


def product_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on the error of ``a @ b`` computed from ``dtype`` inputs: the
    accumulation's gamma times ``|a| @ |b|``, plus one rounding of the result to ``dtype``."""
    a, b = a.double(), b.double()
    exact = a @ b
    return gamma(a.shape[-1], accumulation(dtype)) * (a.abs() @ b.abs()) + unit(dtype) * exact.abs()


def lora_output_bound(base: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Bound on the error of ``base + scale * (x @ a.T) @ b.T`` computed in ``dtype`` (the
    shrink, its scaling, the expand and the final add each rounded once), against the exact
    value. Errors of the shrink carry into the expand through ``|b|``."""
    u = unit(dtype)
    x, a, b, base = x.double(), a.double(), b.double(), base.double()
    shrunk = scale * (x @ a.T)
    shrink_error = abs(scale) * product_bound(x, a.T, dtype) + u * shrunk.abs()  # + scaling
    delta = shrunk @ b.T
    expand_error = shrink_error @ b.T.abs() + product_bound(shrunk, b.T, dtype)
    return expand_error + u * (base + delta).abs()


def fold_bound(weight: torch.Tensor, terms: list[tuple[float, torch.Tensor, torch.Tensor]],
               dtype: torch.dtype = F32) -> torch.Tensor:
    """Bound on the error of ``W + sum(s * B @ A)`` computed and stored in ``dtype``: each
    product's reduction over its rank, its scaling, one addition per term and the final
    rounding, each at most ``u`` relative, on the magnitudes involved."""
    rank = sum(a.shape[0] for _s, _b, a in terms)
    magnitude = weight.double().abs()
    for scale, b, a in terms:
        magnitude = magnitude + abs(scale) * (b.double().abs() @ a.double().abs())
    return gamma(rank + 2 * len(terms) + 1, dtype) * magnitude


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float,
                  what: str = "") -> None:
    """Every element of ``got`` within ``bound`` of ``want``; the message names the worst."""
    diff = (got.double() - want.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    excess = diff - bound
    worst = int(excess.flatten().argmax()) if diff.numel() else 0
    assert diff.numel() == 0 or bool((excess <= 0).all()), (
        f"{what}: element {worst} differs by {float(diff.flatten()[worst]):.3g}, beyond its "
        f"bound {float(bound.flatten()[worst]):.3g} ({int((excess > 0).sum())} of "
        f"{diff.numel()} beyond)")


def beyond(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float) -> bool:
    """Whether any element is outside its bound: what a wrong result must show."""
    diff = (got.double() - want.double()).abs()
    return bool((diff > torch.as_tensor(bound, dtype=torch.float64)).any())


def reported_loss_bound(loss: float, tokens: int, decimals: int = 4) -> float:
    """How far a mean loss zoo rounded to ``decimals`` places may sit from one recomputed
    in float32: the rounding, plus the float32 sum of ``tokens`` per-token losses."""
    return 0.5 * 10 ** -decimals + gamma(tokens) * abs(loss)


def forward_bound(max_abs_logit: float, widest: int, layers: int, ops_per_layer: int = 8,
                  dtype: torch.dtype = F32) -> float:
    """First-order bound on how far two computations of a model's logits may differ when
    their weights are equal up to rounding (the same update factored two ways) or their
    sums run in another order: each of a layer's ``ops_per_layer`` products perturbs the
    hidden state by at most gamma(widest reduction) relative, layer after layer."""
    return 2 * layers * ops_per_layer * gamma(widest, dtype) * max(max_abs_logit, 1.0)


def truncation_bound(update: torch.Tensor, rank: int, extra: int = 0) -> float:
    """Elementwise bound on how far a rank-``rank`` truncated SVD of ``update`` computed in
    float32 may sit from the exact one: the float32 error ``E`` of forming and factoring it
    (gamma of the reduction times its norm) moves the truncation by at most
    ``|E| (1 + 2 s1 / gap)`` (Wedin's theorem), ``gap`` between the singular values kept
    and the first dropped."""
    s = torch.linalg.svdvals(update.double())
    gap = float(s[rank - 1] - (s[rank] if rank < len(s) else 0.0))
    error = gamma(sum(update.shape) + extra) * float(s[0])
    return error * (1 + 2 * float(s[0]) / gap)
