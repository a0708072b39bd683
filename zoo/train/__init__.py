"""``zoo train``: LoRA, QLoRA and bottleneck adapters, registered when they finish.

The adapter is written to a staging directory and registered only after the
last step, with its losses, steps, time, data hash and seed; an interrupted
or failed run leaves nothing behind.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from zoo.catalog.home import staging_dir, validate_name
from zoo.catalog.integrity import ORIGINAL
from zoo.catalog.registry import Registry
from zoo.catalog.store import BaseRef, register_adapter
from zoo.core.measure import peak_rss_bytes
from zoo.core.records import AdapterEntry
from zoo.core.tables import TRAIN_METHODS
from zoo.errors import DuplicateEntry, NotSupported
from zoo.models.data import IGNORE, Dataset, load_dataset, tokenize_example

Method = Literal["lora", "qlora", "bottleneck"]
DEFAULT_TARGETS = ("q_proj", "v_proj")  # as in the LoRA paper
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "bottleneck": 1e-3}
PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class TrainOptions:
    base: str
    method: Method
    data: Path
    name: str
    rank: int | None = None          # LoRA r, or the bottleneck size m (default d/16)
    alpha: float | None = None       # default 2 x rank
    targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: int | None = None
    steps: int | None = None
    lr: float | None = None
    seed: int = 0
    eval_split: float = 0.1
    batch_size: int = 4
    max_length: int = 256
    new_version: bool = False  # the next version of an existing adapter name


@dataclass
class TrainResult:
    entry: AdapterEntry | None
    metrics: dict = field(default_factory=dict)


def train(options: TrainOptions, registry: Registry | None = None,
          log: Callable[[str], None] = lambda _: None, progress: bool = True,
          register: bool = True) -> TrainResult:
    """Train one adapter and register it (``register=False``: measure only)."""
    import torch

    registry = registry or Registry()
    validate_name(options.name)
    check_options(options)
    catalog = registry.load()
    present = catalog.entries.get(options.name)
    if register and present is not None and not (options.new_version and
                                                 isinstance(present, AdapterEntry)):
        raise DuplicateEntry(options.name)
    dataset = load_dataset(options.data)  # refuse bad data before loading any model
    base = catalog.base(options.base)
    variant = "nf4" if options.method == "qlora" else ORIGINAL
    if variant == "nf4":
        from zoo.quantize import quantize

        quantize(base.name, "nf4", registry, log=log)  # reused when present and intact
        base = registry.load().base(base.name)

    from zoo.catalog.integrity import variant_path
    from zoo.catalog.loading import load_model, load_tokenizer

    torch.manual_seed(options.seed)
    random.seed(options.seed)
    tokenizer = load_tokenizer(variant_path(registry, base, ORIGINAL))
    train_set, eval_set = _split(dataset, options, tokenizer)
    model = load_model(registry, base, variant, dtype="fp32")
    model, trainable, adapter_config = _wrap(model, options, base.hidden_size)
    log(f"training {options.method} '{options.name}' on {base.name}"
        f"{'@nf4' if variant == 'nf4' else ''}: {len(train_set)} train / {len(eval_set)} "
        f"eval examples, {sum(p.numel() for p in trainable)} trainable parameters")

    metrics = _run(model, trainable, train_set, eval_set, tokenizer, options, progress)
    metrics.update(method=options.method, data=str(options.data), data_sha256=dataset.sha256,
                   seed=options.seed, lr=options.lr or DEFAULT_LR[options.method],
                   batch_size=options.batch_size, base_variant=variant, **adapter_config)
    if not register:
        return TrainResult(None, metrics)
    label = base.name if variant == ORIGINAL else f"{base.name}@{variant}"
    with staging_dir(registry.home, options.name) as stage:
        _save(model, options.method, stage, label)
        source = {"type": "train", "method": options.method, "data": options.data.name,
                  "data_sha256": dataset.sha256, **_recipe(options)}
        entry = register_adapter(registry, stage, options.name, BaseRef(base, variant),
                                 source=source, training=metrics,
                                 new_version=options.new_version)
    return TrainResult(entry, metrics)


def _recipe(options: TrainOptions) -> dict:
    keep = ("rank", "alpha", "epochs", "steps", "lr", "seed", "eval_split", "batch_size",
            "max_length")
    recipe = {k: v for k, v in asdict(options).items() if k in keep and v is not None}
    if options.method != "bottleneck":
        recipe["targets"] = list(options.targets)
    return recipe


def train_from_recipe(known: AdapterEntry, registry: Registry,
                      log: Callable[[str], None] = lambda _: None) -> AdapterEntry:
    """Re-create a catalog adapter from its recorded recipe (the shipped demo adapters)."""
    from zoo.core.files import sha256_file
    from zoo.errors import IntegrityError

    src = known.source
    data = PACKAGE_DATA / src["data"]
    if sha256_file(data) != src["data_sha256"]:
        raise IntegrityError(f"{data} differs from the data {known.name!r} was recorded with")
    options = TrainOptions(
        base=known.base, method=src["method"], data=data, name=known.name,
        rank=src.get("rank"), alpha=src.get("alpha"),
        targets=tuple(src.get("targets", DEFAULT_TARGETS)), epochs=src.get("epochs"),
        steps=src.get("steps"), lr=src.get("lr"), seed=src.get("seed", 0),
        eval_split=src.get("eval_split", 0.1), batch_size=src.get("batch_size", 4),
        max_length=src.get("max_length", 256))
    result = train(options, registry, log=log)
    assert result.entry is not None
    return result.entry


def check_options(options: TrainOptions) -> None:
    """Refuse settings no run can use, before any data or model is read."""
    if options.method not in TRAIN_METHODS:
        raise NotSupported(f"unknown method {options.method!r}",
                           hint=f"Use {', '.join(TRAIN_METHODS)}.")
    wrong = [f"{flag} {value}" for flag, value, fine in (
        ("--rank", options.rank, lambda v: v >= 1),
        ("--alpha", options.alpha, lambda v: math.isfinite(v) and v > 0),
        ("--lr", options.lr, lambda v: math.isfinite(v) and v > 0),
        ("--epochs", options.epochs, lambda v: v >= 1),
        ("--steps", options.steps, lambda v: v >= 1),
        ("--eval-split", options.eval_split, lambda v: 0 <= v < 1),
        ("--batch-size", options.batch_size, lambda v: v >= 1),
        ("max_length", options.max_length, lambda v: v >= 2),
    ) if value is not None and not fine(value)]
    if options.method != "bottleneck" and not (options.targets and all(options.targets)):
        wrong.append("--targets (empty)")
    if wrong:
        raise NotSupported(f"cannot train with {', '.join(wrong)}", hint=(
            "Ranks, epochs, steps and the batch size are whole numbers of at least 1; alpha "
            "and the learning rate positive numbers; the eval split a fraction in [0, 1)."))


def _split(dataset: Dataset, options: TrainOptions, tokenizer):
    encoded = [tokenize_example(tokenizer, ex, options.max_length) for ex in dataset.examples]
    encoded = [e for e in encoded if any(label != IGNORE for label in e[1])]
    order = list(range(len(encoded)))
    random.Random(options.seed).shuffle(order)
    n_eval = int(round(len(encoded) * options.eval_split)) if options.eval_split > 0 else 0
    n_eval = min(n_eval, len(encoded) - 1)
    return [encoded[i] for i in order[n_eval:]], [encoded[i] for i in order[:n_eval]]


def _wrap(model, options: TrainOptions, hidden_size: int):
    """Freeze the base and add the adapter: ``(model, trainable params, config facts)``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if options.method == "bottleneck":
        from zoo.models.bottleneck import new_bottleneck

        adapter = new_bottleneck(model, m=options.rank)
        adapter.attach(model)
        model._zoo_bottleneck = adapter
        return model, list(adapter.parameters()), {"bottleneck_size": adapter.config[
            "bottleneck_size"]}
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    rank = options.rank or 8
    alpha = options.alpha if options.alpha is not None else 2 * rank
    if options.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(options.targets),
                        lora_dropout=0.0, init_lora_weights="gaussian", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable, {"rank": rank, "alpha": alpha, "targets": list(options.targets)}


def _batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    import torch

    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            yield _collate(chunk, pad_id, torch)


def _collate(chunk, pad_id, torch):
    width = max(len(ids) for ids, _ in chunk)
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, (toks, labs) in enumerate(chunk):
        ids[row, :len(toks)] = torch.tensor(toks)
        labels[row, :len(labs)] = torch.tensor(labs)
        mask[row, :len(toks)] = 1
    return ids, mask, labels


def evaluate(model, examples, pad_id: int, batch_size: int = 8) -> float | None:
    """Mean loss per answer token over ``examples`` (None when there are none)."""
    import torch

    if not examples:
        return None
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = _collate(examples[start:start + batch_size], pad_id, torch)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE, reduction="sum")
            total += loss.item()
            tokens += int((shift_labels != IGNORE).sum())
    return total / max(tokens, 1)


def _run(model, trainable, train_set, eval_set, tokenizer, options, progress: bool) -> dict:
    import torch
    from tqdm import tqdm

    pad_id = tokenizer.pad_token_id
    steps_per_epoch = math.ceil(len(train_set) / options.batch_size)
    steps = options.steps or (options.epochs or 1) * steps_per_epoch
    lr = options.lr or DEFAULT_LR[options.method]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (steps + 1))
    eval_before = evaluate(model, eval_set, pad_id)
    batches = _batches(train_set, options.batch_size, pad_id, random.Random(options.seed))
    start, tokens, losses = time.perf_counter(), 0, []
    bar = tqdm(range(steps), desc=f"train {options.name}", disable=not progress, unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    model.train()
    for _ in bar:
        ids, mask, labels = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    eval_after = evaluate(model, eval_set, pad_id)
    tail = losses[-max(1, min(len(losses), steps_per_epoch)):]
    return {
        "steps": steps, "epochs": round(steps / steps_per_epoch, 2),
        "train_loss_first": round(losses[0], 4), "train_loss": round(sum(tail) / len(tail), 4),
        "eval_loss_before": None if eval_before is None else round(eval_before, 4),
        "eval_loss": None if eval_after is None else round(eval_after, 4),
        "train_examples": len(train_set), "eval_examples": len(eval_set),
        "seconds": round(seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1),
    }


def _save(model, method: str, out: Path, base_label: str) -> None:
    if method == "bottleneck":
        model._zoo_bottleneck.save(out, base_label)
        return
    import json

    model.save_pretrained(out)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_label
    config_file.write_text(json.dumps(config, indent=2) + "\n")
