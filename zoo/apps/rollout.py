"""``zoo promote``: a new version in front of users only when it measures no worse.

The candidate and the current version are evaluated on the same held-out data, in the
same engine (transformers, float32: the two numbers differ by the adapters alone), and
the promotion (or canary) is refused when the candidate's loss is above the current's
by more than ``max_regression`` (relative), with both numbers in the message.
``force`` overrides, and is recorded in the name's history with the numbers.

Before anything is evaluated, a version that a live ``zoo serve`` on this home would
refuse (a rank above its ``--max-lora-rank``, a module its engine has no LoRA layers
for: it was started before the version was registered) is refused too, with that
server's reason: otherwise every request it answers would fail with a 400.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo.apps.evaluate import Evaluation, evaluate
from zoo.catalog import versions
from zoo.catalog.registry import Registry
from zoo.core.records import AdapterEntry
from zoo.errors import NotSupported

DEFAULT_MAX_REGRESSION = 0.02  # 2% more held-out loss


@dataclass(frozen=True)
class Gate:
    candidate: Evaluation
    current: Evaluation
    max_regression: float

    @property
    def change(self) -> float:
        return self.candidate.loss / self.current.loss - 1.0

    @property
    def passed(self) -> bool:
        return self.change <= self.max_regression

    def record(self) -> dict:
        return {"candidate_loss": round(self.candidate.loss, 5),
                "current_loss": round(self.current.loss, 5), "data": self.current.data,
                "data_sha256": self.current.data_sha256, "tokens": self.current.tokens,
                "max_regression": self.max_regression}


@dataclass(frozen=True)
class Rollout:
    entry: AdapterEntry
    gate: Gate | None
    forced: bool


def evaluation_data(entry: AdapterEntry, candidate: AdapterEntry, given: Path | None) -> Path:
    """The data the gate measures on: given, else the data a version of the name was last
    evaluated on (when the file is still there), else the candidate's training data."""
    from zoo.train import PACKAGE_DATA

    if given is not None:
        return Path(given)
    for record in (candidate, entry):
        for evaluation in record.evaluations.values():
            path = Path(evaluation.get("data", ""))
            if path.is_file():
                return path
    trained = candidate.source.get("data")
    if isinstance(trained, str):
        for place in (Path(trained), PACKAGE_DATA / trained):
            if place.is_file():
                return place
    raise NotSupported(f"no held-out data to compare {versions.label(entry.name, candidate.version)} "
                       f"with {versions.label(entry.name, entry.version)}",
                       hint="Pass --data FILE (JSONL of the training formats, or text), or "
                            "--force to promote unmeasured.")


def promote(ref: str, canary: float | None = None, data: Path | None = None,
            max_regression: float = DEFAULT_MAX_REGRESSION, force: bool = False,
            registry: Registry | None = None,
            log: Callable[[str], None] = lambda _: None) -> Rollout:
    """Make the version ``ref`` current (or its canary), after the evaluation gate."""
    registry = registry or Registry()
    if canary is not None and not 0 < canary <= 100:  # before the minutes of the gate
        raise NotSupported(f"a canary share is above 0 and at most 100, not {canary}")
    if not (math.isfinite(max_regression) and max_regression >= 0):
        raise NotSupported(f"--max-regression {max_regression}: a fraction of at least 0 "
                           "(0.02: the held-out loss may rise by 2%)")
    name, _ = versions.split_ref(ref)
    catalog = registry.load()
    entry = catalog.adapter(name)
    candidate = versions.resolve(catalog, ref)
    if candidate.version == entry.version:
        raise NotSupported(f"{versions.label(name, candidate.version)} is already current")
    refusals = versions.refused_by_running_servers(registry.home, candidate)
    if refusals and not force:
        raise NotSupported(
            f"{versions.label(name, candidate.version)} would be refused by "
            f"{'; '.join(refusals)}; nothing changed",
            hint="Restart that zoo serve first (it sizes its engine from the catalog, this "
                 "version included), or --force: its requests fail until then (recorded).")
    for refusal in refusals:
        log(f"forced: {versions.label(name, candidate.version)} is refused by {refusal}")
    gate = None
    try:
        path = evaluation_data(entry, candidate, data)
    except NotSupported:
        if not force:
            raise
        path = None
    if path is not None:
        log(f"evaluating {versions.label(name, candidate.version)} and "
            f"{versions.label(name, entry.version)} on {path.name}")
        variant = candidate.base_variant
        measured = [evaluate(versions.label(name, n), variant, path, registry, log=log,
                             engine="transformers") for n in (candidate.version, entry.version)]
        gate = Gate(measured[0], measured[1], max_regression)
        if not gate.passed and not force:
            raise NotSupported(
                f"{versions.label(name, candidate.version)} raises the held-out loss by "
                f"{100 * gate.change:.1f}% ({gate.candidate.loss:.4f} against "
                f"{gate.current.loss:.4f} for {versions.label(name, entry.version)} on "
                f"{path.name}, {gate.current.tokens} tokens), above the "
                f"{100 * max_regression:.1f}% allowed; nothing changed",
                hint="Fix the candidate, raise --max-regression, or --force (recorded).")
    record = {"forced": True} if force else {}
    if refusals:
        record["refused_by"] = refusals
    if gate is not None:
        record["evaluation"] = gate.record()
    return Rollout(versions.promote(registry, ref, canary, record), gate, force)
