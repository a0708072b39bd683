"""Check a merged model against the unmerged base + adapters, run by PEFT itself.

Both run in float32 on the same token ids; the largest logit difference must
stay within what rounding the merged weights to the output dtype explains (bf16's
rounding for an NF4 reference: bitsandbytes' 4-bit GEMM computes through bf16).
"""

from __future__ import annotations

from pathlib import Path

from zoo.errors import VerificationFailed
from zoo.models.nf4 import load_nf4

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, a fox")
# Relative to the largest reference logit: what rounding W' to the dtype can move.
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 2e-3}


def reference_model(source_dir: Path, adapters, nf4: bool):
    """The base (NF4 computed in float32, or 16-bit upcast) with the adapters active."""
    import torch
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


def _inputs(original_dir: Path, vocab_size: int):
    """Token ids to compare on: the prompts through the base's tokenizer, and a fixed
    random sequence (all that is left for a model saved without a tokenizer)."""
    import torch

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


def verify_merge(merged_dir: Path, source_dir: Path, original_dir: Path, plan, registry) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    reference = reference_model(source_dir, plan.adapters, plan.source_variant == "nf4")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    worst, scale, tokens = 0.0, 0.0, 0
    with torch.no_grad():
        for ids in _inputs(original_dir, merged.config.vocab_size):
            want = reference(input_ids=ids).logits.float()
            got = merged(input_ids=ids).logits.float()
            worst = max(worst, float((want - got).abs().max()))
            scale = max(scale, float(want.abs().max()))
            tokens += ids.shape[1]
    # bitsandbytes' 4-bit GEMM (inference and training alike) rounds through bf16,
    # so a reference on the NF4 base is only as exact as bf16, whatever we write.
    precision = "bfloat16" if plan.source_variant == "nf4" else plan.dtype
    tolerance = max(TOLERANCE[plan.dtype], TOLERANCE[precision]) * max(scale, 1.0)
    result = {"max_abs_diff": worst, "tolerance": tolerance, "max_abs_logit": scale,
              "tokens": tokens}
    if not worst <= tolerance:
        raise VerificationFailed(
            f"merged logits differ from base + adapters by {worst:.4g} (tolerance "
            f"{tolerance:.4g} for {plan.dtype})")
    return result
