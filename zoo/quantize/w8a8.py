"""An int8 W8A8 compressed-tensors checkpoint of a base, for vLLM's CPU int8 kernel.

Weights: int8, one symmetric scale per output channel (absmax / 127), or 7-bit
(absmax / 63) where this CPU's int8 kernel needs them (``weight_bits``).
Activations: int8, quantized per token at run time by vLLM.

Calibrated by default (``smooth.py``, ``gptq.py``): SmoothQuant moves activation
outliers into the weights, GPTQ rounds the weights with error compensation, and
each of vLLM's layers is measured under int8 on the calibration activations: the
worst stay in 16 bits (compressed-tensors' ``ignore`` list,
which vLLM honours layer by layer). Smoothing rescales what some layers read and
write, so LoRA adapters trained on the 16-bit base would see other inputs: the
scales are saved beside the weights (``zoo_smoothing.scales``) and zoo serve
hands vLLM each adapter rescaled to match (``zoo.models.smoothing``), exactly.
``calibrate=False`` writes the plain round-to-nearest checkpoint zoo wrote before.

Written with the compressed-tensors library alone: llm-compressor, vLLM's
calibration library, declares requirements that exclude this stack (0.14 wants
transformers <= 5.17, 0.13 compressed-tensors 0.18, 0.12 torch <= 2.12).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Relative output error (||y_int8 - y|| / ||y|| on calibration inputs) above which a
# layer stays in 16 bits, and at most a share of the layers (``recipe``): measured on
# SmolLM2 on six held-out domains (docs/BENCHMARKS.md, bench/domains.py): at 0.10 no layer
# stayed and Spanish and formal text lost up to 4%; at 0.025 the worst eighth stays (+6%
# file).
KEEP_TOLERANCE = 0.025


def recipe(bits: int, flags: frozenset[str] | None = None) -> tuple[float, float]:
    """SmoothQuant's migration strength (alpha) and the largest share of the layers kept
    in 16 bits for ``bits``-wide weights served by this CPU's (or ``flags``') int8 kernel.

    Each was measured on the held-out domains with the kernel it serves on (worst domain,
    docs/BENCHMARKS.md): vLLM's AMX kernel (x86 with AMX-INT8): alpha 0.5 and an eighth,
    1.016x. oneDNN's GEMM with VNNI (an AVX-512 EPYC, bf16 activations): the same variant
    1.036x (Spanish), alpha 0.65 1.020x. zoo's GEMM (x86 without VNNI, float32
    activations): alpha 0.65 1.031x, 0.75 1.023x, 0.8 1.027x; 0.65 or 0.8 with up to 3/16
    in 16 bits 1.026x / 1.025x. 7-bit weights (oneDNN's GEMM without VNNI), where more of
    the activations' outliers must move into a coarser weight grid: alpha 0.35 1.048x, 0.5
    1.038x, 0.65 1.029x, 0.65 with a quarter in 16 bits 1.025x."""
    if bits == 7:
        return 0.65, 0.25
    if flags is None:
        from zoo.core.measure import cpu_flags

        flags = cpu_flags()
    if "amx_int8" in flags:
        return 0.5, 0.125
    return (0.75, 0.125) if zoos_gemm_serves(flags) else (0.65, 0.125)


# The projections whose input the others share: q (with k, v), o, gate (with up), down.
SHARED_INPUT = ("q_proj", "o_proj", "gate_proj", "down_proj")


_SHARES_INPUT_WITH = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}

# On x86 without VNNI, vLLM's int8 kernel (oneDNN) multiplies unsigned 8-bit activations by
# the signed 8-bit weights with vpmaddubsw, which adds each pair of products in 16 bits and
# saturates: with weights up to 127 a pair reaches 2 x 255 x 127 > 32767, and outputs came
# out up to 15% wrong (tests/test_int8_width.py; docs/BENCHMARKS.md). Weights up to 63 keep
# every pair in range. VNNI and AMX add in 32 bits, and so does zoo's own GEMM, which runs
# the int8 linears on x86 with AVX2 and without VNNI (zoo.serve.cpu_int8).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
ZOOS_GEMM_VARIABLE = "ZOO_CPU_INT8"  # "0": vLLM's oneDNN GEMM serves, as before zoo's
LEVELS = {8: 127, 7: 63}


def zoos_gemm_serves(flags: frozenset[str]) -> bool:
    """Whether zoo's int8 GEMM runs the int8 base's linears on a CPU with ``flags``: x86
    with AVX2 and without VNNI, unless ``ZOO_CPU_INT8=0``."""
    return "avx2" in flags and not flags & VNNI_FLAGS and \
        os.environ.get(ZOOS_GEMM_VARIABLE, "1") != "0"


def weight_bits(flags: frozenset[str] | None = None) -> int:
    """The weight width the int8 base's linears compute exactly on this CPU (or one with
    ``flags``): 8, or 7 where vLLM's oneDNN GEMM serves them without VNNI (x86 without
    AVX2, or ``ZOO_CPU_INT8=0``), whose pair sums saturate."""
    if flags is None:
        from zoo.core.measure import cpu_flags

        flags = cpu_flags()
    saturates = "sse2" in flags and not flags & VNNI_FLAGS and not zoos_gemm_serves(flags)
    return 7 if saturates else 8


def _reader(module: str) -> str:
    """The projection whose input (and so whose Hessian) ``module`` shares."""
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{_SHARES_INPUT_WITH.get(leaf, leaf)}"


def write_w8a8(source: Path, out: Path, calibrate: bool = True,
               calibration: Path | None = None, alpha: float | None = None,
               tolerance: float = KEEP_TOLERANCE, damping: float | None = None,
               gptq_sequences: int | None = None, bits: int | None = None,
               keep_at_most: float | None = None,
               bits_asked: bool | None = None) -> dict[str, Any]:
    """Write ``source``'s W8A8 checkpoint into ``out``; the details of how. ``bits``: the
    weights' width, 8 or 7 (default: what this CPU computes exactly, ``weight_bits``);
    SmoothQuant's ``alpha`` and the share of layers ``keep_at_most`` in 16 bits default by
    it and this CPU's int8 kernel (``recipe``). ``damping`` and ``gptq_sequences`` (how many
    of the calibration's 512-token sequences GPTQ's Hessians see; all by default) are there
    to measure them (bench/domains.py). ``bits`` is recorded as asked for unless
    ``bits_asked`` is False (zoo serve's choice for this CPU, made in another process)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    asked = bits is not None if bits_asked is None else bits_asked
    details: dict[str, Any] = {
        "calibrated": calibrate, "weight_bits": bits or weight_bits(),
        "weight_bits_asked": asked,
        # anything but this CPU's defaults: zoo serve keeps such a variant as it is
        "settings_asked": asked or alpha is not None or keep_at_most is not None}
    levels = LEVELS[details["weight_bits"]]
    default_alpha, default_keep = recipe(details["weight_bits"])
    alpha = default_alpha if alpha is None else alpha
    keep_at_most = default_keep if keep_at_most is None else keep_at_most
    ignore = ["lm_head"]
    scales_by_module: dict[str, torch.Tensor] = {}
    if calibrate:
        import zoo.quantize.gptq as gptq
        import zoo.quantize.smooth as smooth
        from zoo.core.files import sha256_bytes
        from zoo.models.data import calibration_texts, token_batches

        texts = calibration_texts(calibration)  # refused before the model is read
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        batches = token_batches(AutoTokenizer.from_pretrained(source), texts)
        before = smooth.calibrate(model, batches)
        worst_before = max(smooth.int8_errors(model, before, levels).values())
        scales = smooth.smooth_llama(model, before, alpha)
        readers = {n for n, m in model.named_modules()  # one H per distinct input
                   if isinstance(m, torch.nn.Linear) and n.endswith(SHARED_INPUT)}
        after = smooth.calibrate(model, batches)  # the activations int8 layers will see
        hessians = gptq.hessians(model, readers, batches[:gptq_sequences])
        damping = gptq.DAMPING if damping is None else damping
        errors = smooth.int8_errors(model, after, levels)
        limit = max(0, int(keep_at_most * len(errors)))
        keep = smooth.layers_to_keep(errors, tolerance, limit)
        ignore += [m for layer in keep for m in smooth.members(layer)]
        kept = set(ignore)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in name and name not in kept:
                    reader = _reader(name)
                    ints, scale = gptq.quantize_rows(module.weight, hessians[reader],
                                                      damping, levels)
                    module.weight.data = (ints * scale).to(module.weight.dtype)
                    scales_by_module[name] = scale
        quantized = [e for layer, e in errors.items() if layer not in keep]
        details.update({
            "method": "smoothquant", "alpha": alpha, "calibration_tokens": after.tokens,
            "calibration_sha256": sha256_bytes("\n\n".join(texts).encode()),
            "kept_16bit": keep, "keep_tolerance": tolerance, "keep_at_most": keep_at_most,
            "worst_int8_error": round(max(quantized, default=0.0), 4),
            "worst_int8_error_before_smoothing": round(worst_before, 4),
            "weight_rounding": "gptq", "gptq_damping": damping,
            "gptq_sequences": len(batches[:gptq_sequences])})
        model = model.to(torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])},
                                ignore=ignore)
    apply_quantization_config(model, config)
    names = {module: name for name, module in model.named_modules()}
    quantized_modules = 0
    with torch.no_grad():
        for module in model.modules():
            scale = getattr(module, "weight_scale", None)
            if scale is None:
                continue
            name = names[module]
            if name in scales_by_module:  # GPTQ chose integers on this scale: keep it exact
                scale.copy_(scales_by_module[name].to(scale.dtype))
            else:
                absmax = module.weight.detach().float().abs().amax(dim=1, keepdim=True)
                scale.copy_((absmax / levels).clamp(min=1e-8).to(scale.dtype))
            zero = getattr(module, "weight_zero_point", None)
            if zero is not None:
                zero.zero_()
            quantized_modules += 1
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    if calibrate:  # what adapters need to stay exact on this base (zoo.models.smoothing)
        from zoo.models.smoothing import save_scales

        save_scales(out, scales, model.config)
    details["quantized_modules"] = quantized_modules
    return details
