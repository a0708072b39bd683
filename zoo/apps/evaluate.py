"""``zoo eval``: held-out loss and perplexity of a base or an adapter, on any variant.

Servable variants (the 16-bit original, int8 W8A8) are measured through the
engine that serves them: zoo serve on that variant, the tokens' log-probabilities
from vLLM's own ``prompt_logprobs``. The rest (NF4, bottleneck adapters) run in
transformers, the way they were trained. Data is a JSONL of the training formats
(only the answers' tokens count) or plain text (every token after the first of
each 512-token window). The result is kept in the entry (``zoo show``), one per
variant.

A quantized variant is also compared with its original, domain by domain
(``compare_domains``): prose, dialogue, code, formal writing, technical
documentation and a second language that zoo ships and never calibrates on, plus
zoo's own held-out text. A quantized base is as good as its worst domain.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from zoo.catalog.integrity import ORIGINAL, variant_path
from zoo.catalog.registry import Registry
from zoo.core.files import sha256_file
from zoo.core.records import AdapterEntry, BaseEntry, now
from zoo.errors import NotSupported, ServeError

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


@dataclass(frozen=True)
class DomainRatio:
    """A variant's perplexity against its original's on one held-out text."""

    domain: str
    tokens: int
    original: float
    variant: float

    @property
    def ratio(self) -> float:
        return self.variant / self.original


def held_out_domains() -> dict[str, Path]:
    """The held-out texts a quantized variant is measured on, by domain."""
    from zoo.models.data import HELDOUT_DOMAINS, HELDOUT_TEXT

    return {"zoo": HELDOUT_TEXT, **{p.stem: p for p in sorted(HELDOUT_DOMAINS.glob("*.txt"))}}


def sequences(tokenizer, data: Path, window: int = WINDOW) -> list[Sequence]:
    """What to score in ``data``: answers of a JSONL dataset, or all of a text file, in
    pieces of at most ``window`` tokens."""
    from zoo.models.data import IGNORE, load_dataset, texts_of, token_batches, tokenize_example

    if data.suffix == ".jsonl":
        out = []
        for example in load_dataset(data).examples:
            ids, labels = tokenize_example(tokenizer, example, window)
            out.append((ids, labels))
        return out
    return [(ids, [IGNORE] + ids[1:]) for ids in
            (batch[0].tolist() for batch in token_batches(tokenizer, texts_of(data), window))]


def _reader(registry: Registry, base: BaseEntry) -> Callable[[Path], list[Sequence]]:
    """How to read a text's sequences for ``base``: in windows of WINDOW tokens, or where
    the base takes fewer at once, of one less than that (an engine adds the token it
    answers)."""
    from zoo.catalog.loading import load_tokenizer
    from zoo.models.bases import context_length

    original = variant_path(registry, base, ORIGINAL)
    context = context_length(original)
    window = WINDOW if context is None else max(1, min(WINDOW, context - 1))
    tokenizer = load_tokenizer(original)
    return lambda data: sequences(tokenizer, data, window)


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


def nll_served(url: str, model: str, seqs: list[Sequence],
               key: str | None = None) -> tuple[float, int]:
    """The same through a zoo serve engine: vLLM's prompt_logprobs of each token (``key``:
    an API key, where the server asks for one)."""
    total, count = 0.0, 0
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for ids, labels in seqs:
        body = json.dumps({"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                           "prompt_logprobs": 1}).encode()
        request = urllib.request.Request(url + "/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                steps = json.loads(response.read())["choices"][0]["prompt_logprobs"]
        except urllib.error.HTTPError as error:
            raise ServeError(f"{url} refused to score {len(ids)} tokens with {model!r} "
                             f"(HTTP {error.code}): {_said(error)}",
                             hint="The engine's log says more.") from None
        for position, (step, label) in enumerate(zip(steps, labels, strict=True)):
            if position == 0 or label < 0:
                continue
            total -= step[str(ids[position])]["logprob"]
            count += 1
    return total, count


def _said(error) -> str:
    """What an OpenAI-compatible server's error response says, in a line."""
    try:
        message = json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        message = error.reason
    return " ".join(str(message).split())[:300]


def evaluate(name: str, variant: str | None = None, data: Path | None = None,
             registry: Registry | None = None, log: Callable[[str], None] = lambda _: None,
             record: bool = True, engine: str = "auto") -> Evaluation:
    """Held-out loss of a base or an adapter (``NAME:vN`` for one of its versions) on
    ``variant`` of its base (default: the base's original, an adapter's own training
    variant); ``engine="transformers"`` skips the serving engine even where one serves."""
    from zoo.catalog import versions
    from zoo.models.data import HELDOUT_TEXT

    registry = registry or Registry()
    catalog = registry.load()
    entry = versions.resolve(catalog, name) if versions.SEPARATOR in name else catalog.get(name)
    base = entry if isinstance(entry, BaseEntry) else catalog.base(entry.base)
    variant = variant or (entry.base_variant if isinstance(entry, AdapterEntry) else ORIGINAL)
    if variant not in VARIANTS:
        raise NotSupported(f"unknown variant {variant!r}", hint=f"Use one of {', '.join(VARIANTS)}.")
    data = Path(data or HELDOUT_TEXT)
    seqs = _reader(registry, base)(data)
    variant_path(registry, base, variant)  # present and intact: eval never quantizes
    log(f"evaluating {name} on {base.name} ({variant}): {data.name}")
    with scorer(registry, base, entry, variant, log, engine) as (score, used):
        total, count = score(seqs)
    if count == 0:
        raise NotSupported(f"{data} has nothing to score", hint="Give answers or longer text.")
    result = Evaluation(name, variant, data.name, sha256_file(data), count, total / count,
                        used, now())
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


def versus_original(name: str, result: Evaluation, data: Path | None,
                    registry: Registry | None = None,
                    log: Callable[[str], None] = lambda _: None) -> Evaluation | None:
    """For a base's quantized variant: the original's evaluation on the same text and
    engine (the one kept in the entry when it matches, else measured now); else None."""
    registry = registry or Registry()
    entry = registry.load().get(name)
    if not isinstance(entry, BaseEntry) or result.variant == ORIGINAL:
        return None
    kept = entry.evaluations.get(ORIGINAL) or {}
    if (kept.get("data_sha256") == result.data_sha256 and kept.get("engine") == result.engine
            and kept.get("tokens") == result.tokens):
        return Evaluation(name, ORIGINAL, kept["data"], kept["data_sha256"], kept["tokens"],
                          kept["loss"], kept["engine"], kept["at"])
    engine = "transformers" if result.engine == "transformers" else "auto"
    return evaluate(name, ORIGINAL, data, registry=registry, log=log, engine=engine)


def compare_domains(base: str, variant: str, texts: dict[str, Path] | None = None,
                    registry: Registry | None = None,
                    log: Callable[[str], None] = lambda _: None,
                    engine: str = "auto") -> list[DomainRatio]:
    """``variant`` of ``base`` against its original on each held-out text (default: every
    domain zoo ships), worst ratio first: one engine (or model) per variant for them all."""
    registry = registry or Registry()
    entry = registry.load().base(base)
    if variant == ORIGINAL or variant not in VARIANTS:
        raise NotSupported(f"compare a quantized variant with the original, not {variant!r}",
                           hint="Use nf4 or w8a8.")
    texts = texts or held_out_domains()
    read = _reader(registry, entry)
    seqs = {domain: read(Path(path)) for domain, path in texts.items()}
    variant_path(registry, entry, variant)  # present and intact: eval never quantizes
    if variant not in SERVED:  # both through the same engine
        engine = "transformers"
    scored: dict[str, dict[str, tuple[float, int]]] = {}
    for which in (ORIGINAL, variant):
        log(f"scoring {len(seqs)} held-out texts on {base} ({which})")
        with scorer(registry, entry, entry, which, log, engine) as (score, _):
            scored[which] = {domain: score(s) for domain, s in seqs.items()}
    rows = []
    for domain in seqs:
        (full, count), (cheap, _) = scored[ORIGINAL][domain], scored[variant][domain]
        if count == 0:
            raise NotSupported(f"{texts[domain]} has nothing to score",
                               hint="Give answers or longer text.")
        rows.append(DomainRatio(domain, count, math.exp(full / count), math.exp(cheap / count)))
    return sorted(rows, key=lambda r: r.ratio, reverse=True)


@contextmanager
def scorer(registry, base: BaseEntry, entry, variant: str, log,
           engine: str = "auto") -> Iterator[tuple[Callable[[list[Sequence]], tuple[float, int]],
                                                    str]]:
    """(score, engine): score(sequences) is their summed NLL and count, through the engine
    that serves ``variant`` where one does (zoo serve), else transformers."""
    from zoo.serve.launch import cpu_attention_refuses

    served = engine != "transformers" and variant in SERVED and (
        isinstance(entry, BaseEntry) or entry.servable) and not cpu_attention_refuses(
        registry.resolve(base.path))
    if not served:
        model = _model(registry, base, entry, variant)
        yield (lambda seqs: nll_transformers(model, seqs)), "transformers"
        return
    from zoo.catalog.versions import label
    from zoo.serve.launch import ServeOptions, free_port, running_server

    options = ServeOptions(base=base.name, port=free_port(),
                           quantization="none" if variant == ORIGINAL else variant)
    model = entry.name if isinstance(entry, BaseEntry) else label(entry.name, entry.version)
    with running_server(options, registry, log=log) as server:
        yield (lambda seqs: nll_served(server.url, model, seqs)), "vllm"


def _model(registry, base: BaseEntry, entry, variant: str):
    from zoo.catalog.loading import load_adapted, load_model

    if isinstance(entry, BaseEntry):
        return load_model(registry, base, variant)
    if variant == "w8a8":
        raise NotSupported(f"{entry.name!r} cannot be served, so it has no w8a8 evaluation",
                           hint="Evaluate it on original or nf4.")
    return load_adapted(registry, entry, variant=variant)[0]
