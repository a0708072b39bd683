"""``zoo generate``: a quick greedy answer from a base or any adapter, through transformers."""

from __future__ import annotations

from zoo.catalog.integrity import ORIGINAL
from zoo.catalog.registry import Registry
from zoo.errors import NotSupported


def chat_ids(tokenizer, prompt: str):
    """Token ids of a one-turn chat (plain text for a model without a chat template)."""
    from zoo.models.data import render

    text = render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def generate(prompt: str, adapter: str | None = None, base: str | None = None,
             max_new_tokens: int = 64, registry: Registry | None = None) -> str:
    """Greedy answer of ``adapter`` (on its base) or of ``base`` alone to one user message."""
    import torch

    from zoo.catalog.integrity import variant_path
    from zoo.catalog.loading import load_adapted, load_model, load_tokenizer

    if max_new_tokens < 1:
        raise NotSupported(f"max_new_tokens {max_new_tokens}: at least 1")
    registry = registry or Registry()
    catalog = registry.load()
    if adapter:
        model, tokenizer = load_adapted(registry, catalog.adapter(adapter))
    elif base:
        entry = catalog.base(base)
        model = load_model(registry, entry)
        tokenizer = load_tokenizer(variant_path(registry, entry, ORIGINAL))
    else:
        raise NotSupported("nothing to run", hint="Pass --adapter NAME or --base NAME.")
    ids = chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
