"""``zoo eval``: held-out loss and perplexity of a base or an adapter, on any variant.

Servable variants (the 16-bit original, int8 W8A8) are measured through the
engine that serves them: zoo serve on that variant, the tokens' log-probabilities
from vLLM's own ``prompt_logprobs``. The rest (NF4, bottleneck adapters) run in
transformers, the way they were trained. Data is a JSONL of the training formats
(only the answers' tokens count) or plain text (every token after the first of
each 512-token window). The result is kept in the entry (``zoo show``), one per
variant.
"""

from __future__ import annotations

import json
import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.catalog.integrity import ORIGINAL, variant_path
from zoo.catalog.registry import Registry
from zoo.core.files import sha256_file
from zoo.core.records import AdapterEntry, BaseEntry, now
from zoo.errors import NotSupported

VARIANTS = (ORIGINAL, "nf4", "w8a8")
SERVED = (ORIGINAL, "w8a8")
WINDOW = 512
Sequence = tuple[list[int], list[int]]  # token ids, and per position the id it scores or -100


@dataclass(frozen=True)
class Evaluation:
    name: str
    variant: str
    data: str
    data_sha256: str
    tokens: int
    loss: float
    engine: str
    at: str

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def record(self) -> dict:
        return {"data": self.data, "data_sha256": self.data_sha256, "tokens": self.tokens,
                "loss": round(self.loss, 5), "perplexity": round(self.perplexity, 4),
                "engine": self.engine, "at": self.at}


def sequences(tokenizer, data: Path) -> list[Sequence]:
    """What to score in ``data``: answers of a JSONL dataset, or all of a text file."""
    from zoo.models.data import IGNORE, load_dataset, texts_of, token_batches, tokenize_example

    if data.suffix == ".jsonl":
        out = []
        for example in load_dataset(data).examples:
            ids, labels = tokenize_example(tokenizer, example, WINDOW)
            out.append((ids, labels))
        return out
    return [(ids, [IGNORE] + ids[1:]) for ids in
            (batch[0].tolist() for batch in token_batches(tokenizer, texts_of(data), WINDOW))]


def nll_transformers(model, seqs: list[Sequence]) -> tuple[float, int]:
    """Summed negative log-likelihood of the scored tokens, and their count."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            keep = target >= 0
            if keep.any():
                logp = torch.log_softmax(logits[keep], dim=-1)
                total -= float(logp.gather(1, target[keep][:, None]).sum())
                count += int(keep.sum())
    return total, count


def nll_served(url: str, model: str, seqs: list[Sequence]) -> tuple[float, int]:
    """The same through a zoo serve engine: vLLM's prompt_logprobs of each token."""
    total, count = 0.0, 0
    for ids, labels in seqs:
        body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                           "prompt_logprobs": 1}).encode()
        request = urllib.request.Request(url + "/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            steps = json.loads(response.read())["choices"][0]["prompt_logprobs"]
        for position, (step, label) in enumerate(zip(steps, labels, strict=True)):
            if position == 0 or label < 0:
                continue
            total -= step[str(ids[position])]["logprob"]
            count += 1
    return total, count


def evaluate(name: str, variant: str | None = None, data: Path | None = None,
             registry: Registry | None = None, log: Callable[[str], None] = lambda _: None,
             record: bool = True, engine: str = "auto") -> Evaluation:
    """Held-out loss of a base or an adapter (``NAME:vN`` for one of its versions) on
    ``variant`` of its base (default: the base's original, an adapter's own training
    variant); ``engine="transformers"`` skips the serving engine even where one serves."""
    from zoo.catalog import versions
    from zoo.catalog.loading import load_tokenizer
    from zoo.models.data import HELDOUT_TEXT

    registry = registry or Registry()
    catalog = registry.load()
    entry = versions.resolve(catalog, name) if versions.SEPARATOR in name else catalog.get(name)
    base = entry if isinstance(entry, BaseEntry) else catalog.base(entry.base)
    variant = variant or (entry.base_variant if isinstance(entry, AdapterEntry) else ORIGINAL)
    if variant not in VARIANTS:
        raise NotSupported(f"unknown variant {variant!r}", hint=f"Use one of {', '.join(VARIANTS)}.")
    data = Path(data or HELDOUT_TEXT)
    tokenizer = load_tokenizer(variant_path(registry, base, ORIGINAL))
    seqs = sequences(tokenizer, data)
    variant_path(registry, base, variant)  # present and intact: eval never quantizes
    served = engine != "transformers" and variant in SERVED and (
        isinstance(entry, BaseEntry) or entry.servable)
    log(f"evaluating {name} on {base.name} ({variant}) through "
        f"{'vLLM' if served else 'transformers'}: {data.name}")
    if served:
        total, count = _served(registry, base, entry, variant, seqs, log)
    else:
        total, count = nll_transformers(_model(registry, base, entry, variant), seqs)
    if count == 0:
        raise NotSupported(f"{data} has nothing to score", hint="Give answers or longer text.")
    result = Evaluation(name, variant, data.name, sha256_file(data), count, total / count,
                        "vllm" if served else "transformers", now())
    if record:
        with registry.edit() as fresh:
            if isinstance(entry, AdapterEntry):
                versions.update_version(fresh, entry.name, entry.version, lambda r: replace(
                    r, evaluations={**r.evaluations, variant: result.record()}))
            else:
                current = fresh.get(name)
                fresh.entries[name] = replace(current, evaluations={
                    **current.evaluations, variant: result.record()})
    return result


def _served(registry, base, entry, variant, seqs, log) -> tuple[float, int]:
    from zoo.serve.launch import ServeOptions, free_port, running_server

    options = ServeOptions(base=base.name, port=free_port(),
                           quantization="none" if variant == ORIGINAL else variant)
    with running_server(options, registry, log=log) as server:
        from zoo.catalog.versions import label

        model = entry.name if isinstance(entry, BaseEntry) else label(entry.name, entry.version)
        return nll_served(server.url, model, seqs)


def _model(registry, base: BaseEntry, entry, variant: str):
    from zoo.catalog.loading import load_adapted, load_model

    if isinstance(entry, BaseEntry):
        return load_model(registry, base, variant)
    if variant == "w8a8":
        raise NotSupported(f"{entry.name!r} cannot be served, so it has no w8a8 evaluation",
                           hint="Evaluate it on original or nf4.")
    return load_adapted(registry, entry, variant=variant)[0]
